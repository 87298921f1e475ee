"""Tiny Llama-like ONNX decoders with planted super weights (ground truth for tests).

Architecture (every variant): token embedding (vocab 256, hidden 64), 4 decoder layers with RMSNorm,
causal self-attention (4 heads, RoPE, causal mask built in-graph), gated MLP
``down(silu(gate(x)) * up(x))`` (intermediate 192), residual adds, final RMSNorm, lm_head -> ``logits``.
Weights are random with std ``1/sqrt(fan_in)`` (embedding std 1), so the clean model has no outliers.

The planted mechanism mimics a real super weight (Yu et al. 2024):

* In layer ``L = 1`` the rows of ``gate_proj`` / ``up_proj`` for the planted intermediate channel(s) ``col``
  are aligned with the (deterministic) normalized MLP input of the BOS token at position 0. Their norms stay
  ordinary (about that of any other row), yet at the BOS token ``silu(gate) * up`` becomes a large outlier
  (about 50x the typical per-channel max); other tokens are nearly orthogonal to that direction.
* ``down_proj`` column ``col`` is scaled down (the model "learned" not to spread the outlier), except for
  ``W[row, col]``, the super weight, which turns the input spike into an output spike in hidden channel
  ``row`` of a few hundred times the typical output. The residual stream carries it to the end, so every
  later RMSNorm output at token 0 is nearly one-hot on ``row`` and the logits depend on it.
* A few "decoy" weights larger than the super weight sit on near-dead intermediate channels of the same
  ``down_proj``: magnitude-based selection picks them, and zeroing them changes next to nothing.

Variants: see :data:`VARIANTS` and :func:`build_sample_model`. ``optimum`` (and ``kvcache``, which must share
its weights) plant two super weights in the same row of layer 1's down_proj (about 60% / 40% of the spike,
like Llama-13B); ``gemm``, ``fp16`` and ``external`` plant one; ``clean`` plants nothing.

:data:`CONTRIB_VARIANTS` (kept out of ``VARIANTS``: sw_onnx does not take these graphs yet):

* ``genai``: the graph onnxruntime-genai's model builder (0.15.2, ``-p fp32 -e cpu``) writes, with gemm's
  weights (one super weight): ``SimplifiedLayerNormalization`` (default domain, opset 21), then
  ``com.microsoft::SkipSimplifiedLayerNormalization`` carrying the residual adds (output 3 = residual sum),
  ``com.microsoft::GroupQueryAttention`` (RoPE from ``cos_cache``/``sin_cache``) on a packed qkv MatMul,
  inputs ``input_ids``, ``attention_mask``, ``past_key_values.{i}.key/value`` (no position_ids), every
  initializer in ``model.onnx.data``, and ``genai_config.json`` instead of ``config.json``.
  onnx.checker rejects it (as it rejects the builder's models); onnxruntime and onnxruntime_genai run it.
* ``merged``: optimum's older ``decoder_model_merged.onnx``, with optimum's weights (the pair): one
  ``If`` on the bool input ``use_cache_branch`` whose then-branch is the with-past decoder and else-branch
  the decoder without past; every weight is an outer-scope initializer read from inside both branches.

Run ``python -m sample_models.build --out DIR [--variant V ...]`` to write ``DIR/<variant>/model.onnx``,
``ground_truth.json`` and ``config.json`` (genai: ``genai_config.json``).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "PlantedSuperWeight",
    "SampleModel",
    "VARIANTS",
    "CONTRIB_VARIANTS",
    "ALL_VARIANTS",
    "build_sample_model",
    "build_all",
    "make_feeds",
    "run_sample_model",
    "DEFAULT_PROMPT",
]

VARIANTS = ("optimum", "gemm", "fp16", "external", "kvcache", "clean")
CONTRIB_VARIANTS = ("genai", "merged")
"""Graphs sw_onnx does not handle yet (onnxruntime contrib ops; an ``If`` with decoder subgraphs). Kept out of
:data:`VARIANTS`, which the detect / quantize tests iterate over."""
ALL_VARIANTS = VARIANTS + CONTRIB_VARIANTS

# Architecture constants.
VOCAB = 256
HIDDEN = 64
INTERMEDIATE = 192
NUM_LAYERS = 4
NUM_HEADS = 4
HEAD_DIM = HIDDEN // NUM_HEADS
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
RMS_EPS = 1e-5
ROPE_THETA = 10000.0
OPSET = 17

# Planting constants.
SW_LAYER = 1
INPUT_SPIKE = (60.0, 48.0)  # |silu(gate) * up| at BOS for the planted intermediate channel(s)
OUTPUT_SPIKE = 300.0  # |down_proj output| at [BOS, row] (typical per-channel max is about 1)
PAIR_SHARES = (0.6, 0.4)  # share of the output spike carried by each super weight of the pair
COLUMN_DAMPING = 0.05  # down_proj column `col` (other rows) is scaled by this
NUM_DECOYS = 6  # weights larger than the super weight, on near-dead intermediate channels
DEAD_SCALE = 0.05  # gate/up rows of the decoys' intermediate channels are scaled by this
BOS_MARKER = 12.0  # component of the BOS embedding along the "BOS direction" (other tokens: 0)
READER_NOISE = 0.3  # the planted gate/up rows keep this fraction of their random row

DEFAULT_PROMPT = (1, 5, 9, 33, 100, 7)  # BOS first

_PLANTING = {
    "optimum": "pair",
    "kvcache": "pair",  # must give the same logits as `optimum`, so it shares its weights
    "gemm": "single",
    "fp16": "single",
    "external": "single",
    "clean": None,
    "genai": "single",  # same weights as gemm / fp16 / external
    "merged": "pair",  # same weights as optimum / kvcache
}


@dataclass(frozen=True)
class PlantedSuperWeight:
    layer: int  # decoder layer index
    node: str  # name of the MatMul/Gemm node of that layer's MLP down projection
    initializer: str  # name of the weight initializer the node reads (through Cast/Transpose if any)
    row: int  # torch orientation [out, in]: output (hidden) channel
    col: int  # torch orientation: input (intermediate) channel
    index: tuple[int, int]  # index in the initializer's own layout
    value: float  # the value as stored (fp16-rounded in the fp16 variant)


@dataclass
class SampleModel:
    path: Path  # the .onnx file
    variant: str
    super_weights: list[PlantedSuperWeight]
    super_activation_channel: int | None  # hidden channel of the planted super activation
    config: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Weights (torch orientation: linear weights are [out, in])
# --------------------------------------------------------------------------------------------------


def _rms(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + RMS_EPS)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _base_weights(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    f32 = np.float32

    def lin(out_f, in_f):
        return (rng.standard_normal((out_f, in_f)) / math.sqrt(in_f)).astype(f32)

    def norm(n):
        return (1.0 + 0.05 * rng.standard_normal(n)).astype(f32)

    w = {"embed": rng.standard_normal((VOCAB, HIDDEN)).astype(f32), "layers": []}
    for _ in range(NUM_LAYERS):
        w["layers"].append(
            {
                "input_norm": norm(HIDDEN),
                "q": lin(HIDDEN, HIDDEN),
                "k": lin(HIDDEN, HIDDEN),
                "v": lin(HIDDEN, HIDDEN),
                "o": lin(HIDDEN, HIDDEN),
                "post_norm": norm(HIDDEN),
                "gate": lin(INTERMEDIATE, HIDDEN),
                "up": lin(INTERMEDIATE, HIDDEN),
                "down": lin(HIDDEN, INTERMEDIATE),
            }
        )
    w["final_norm"] = norm(HIDDEN)
    w["lm_head"] = lin(VOCAB, HIDDEN)
    return w


def _bos_mlp_input(w: dict, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(residual, normalized MLP input) of layer `layer` for the BOS token at position 0.

    Token 0 only attends to itself (and RoPE is the identity at position 0), so attention is just o(v(.)).
    """
    h = w["embed"][BOS_TOKEN_ID].astype(np.float64)
    for i in range(layer + 1):
        lw = w["layers"][i]
        n = _rms(h) * lw["input_norm"]
        h = h + lw["o"] @ (lw["v"] @ n)
        n = _rms(h) * lw["post_norm"]
        if i == layer:
            return h, n
        h = h + lw["down"] @ (_silu(lw["gate"] @ n) * (lw["up"] @ n))
    raise AssertionError


def _plant(w: dict, seed: int, mode: str) -> tuple[dict, list[dict]]:
    """Plant the super-weight mechanism in layer SW_LAYER. Returns (weights, planted records).

    1. A "BOS direction" d (random unit vector): the BOS embedding gets a component BOS_MARKER * d, every
       other embedding has none, and the residual writers (o_proj, down_proj) of the layers before the
       planted MLP get d projected out of their outputs. So up to that MLP the residual of *any* token has
       component d exactly equal to its embedding's: BOS_MARKER for BOS, 0 for every other token.
    2. The gate/up rows of the planted intermediate channel(s) read that direction (plus a damped copy of
       their random row, so they look ordinary): at BOS, silu(gate) * up is a large outlier; elsewhere small.
    3. down_proj column `col` is damped except W[row, col] (the super weight), sized for the output spike.
    4. Decoys: a few larger weights in the same down_proj, on near-dead intermediate channels.
    """
    rng = np.random.default_rng([seed, 0x5157])
    row = int(rng.integers(HIDDEN))
    cols = [int(c) for c in rng.choice(INTERMEDIATE, size=2 + NUM_DECOYS, replace=False)]
    sw_cols, dead_cols = cols[:2], cols[2:]
    spike_sign = float(rng.choice([-1.0, 1.0]))
    x_signs = [float(s) for s in rng.choice([-1.0, 1.0], size=2)]
    decoy_rows = [int(r) for r in rng.choice([r for r in range(HIDDEN) if r != row], NUM_DECOYS, replace=False)]
    decoy_factors = rng.uniform(1.3, 2.0, NUM_DECOYS)
    decoy_signs = rng.choice([-1.0, 1.0], NUM_DECOYS)
    d = rng.standard_normal(HIDDEN)
    d /= np.linalg.norm(d)
    out_spike = OUTPUT_SPIKE * float(rng.uniform(0.9, 1.2))
    x_targets = [x * float(j) for x, j in zip(INPUT_SPIKE, rng.uniform(0.9, 1.1, size=2))]

    # 1. BOS direction
    E = w["embed"].astype(np.float64)
    E -= np.outer(E @ d, d)
    E[BOS_TOKEN_ID] += BOS_MARKER * d
    w["embed"] = E.astype(np.float32)
    proj = np.eye(HIDDEN) - np.outer(d, d)
    for i in range(SW_LAYER + 1):
        w["layers"][i]["o"] = (proj @ w["layers"][i]["o"]).astype(np.float32)
        if i < SW_LAYER:
            w["layers"][i]["down"] = (proj @ w["layers"][i]["down"]).astype(np.float32)

    lw = w["layers"][SW_LAYER]
    h_bos, n_bos = _bos_mlp_input(w, SW_LAYER)
    reader = d / lw["post_norm"]  # reader @ n == (d @ h) / rms(h) for any token
    if mode == "pair":
        plan = list(zip(sw_cols, x_targets, PAIR_SHARES, x_signs))
    else:
        plan = [(sw_cols[0], x_targets[0], 1.0, x_signs[0])]
    w_single = out_spike / x_targets[0]  # the largest super weight any mode uses: decoys must beat it

    records = []
    for col, x_target, share, x_sign in plan:
        g0 = READER_NOISE * lw["gate"][col].astype(np.float64)
        u0 = READER_NOISE * lw["up"][col].astype(np.float64)

        def x_of(a):
            return float(_silu((a * reader + g0) @ n_bos) * ((x_sign * a * reader + u0) @ n_bos))

        lo, hi = 0.0, 20.0
        assert abs(x_of(hi)) > x_target
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if abs(x_of(mid)) < x_target else (lo, mid)
        a = 0.5 * (lo + hi)
        lw["gate"][col] = (a * reader + g0).astype(np.float32)
        lw["up"][col] = (x_sign * a * reader + u0).astype(np.float32)
        n32 = n_bos.astype(np.float32)
        x_spike = float(_silu(lw["gate"][col] @ n32) * (lw["up"][col] @ n32))
        lw["down"][:, col] *= COLUMN_DAMPING
        lw["down"][row, col] = np.float32(spike_sign * share * out_spike / x_spike)
        records.append({"row": row, "col": col, "input_spike": x_spike})

    for d_col, d_row, fac, sgn in zip(dead_cols, decoy_rows, decoy_factors, decoy_signs):
        lw["gate"][d_col] *= DEAD_SCALE
        lw["up"][d_col] *= DEAD_SCALE
        lw["down"][d_row, d_col] = np.float32(sgn * fac * w_single)
    return w, records


def _weights(variant: str, seed: int) -> tuple[dict, list[dict]]:
    w = _base_weights(seed)
    mode = _PLANTING[variant]
    if mode is None:
        return w, []
    return _plant(w, seed, mode)


# --------------------------------------------------------------------------------------------------
# Graph building
# --------------------------------------------------------------------------------------------------


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._init_names: set[str] = set()
        self._const_cache: dict = {}
        self._matmul_counter = 1000

    def init(self, name: str, arr: np.ndarray) -> str:
        assert name not in self._init_names, name
        self._init_names.add(name)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def const(self, value, dtype) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._const_cache:
            self._const_cache[key] = self.init(f"/model/constants/c{len(self._const_cache)}", arr)
        return self._const_cache[key]

    def op(self, op_type: str, inputs: Sequence[str], name: str, n_out: int = 1, outputs=None, **attrs):
        if outputs is None:
            outputs = [f"{name}_output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=name, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def matmul_name(self) -> str:
        self._matmul_counter += 1
        return f"onnx::MatMul_{self._matmul_counter}"


class _Builder:
    """Builds one variant's graph. `hf` = optimum-like (3-D activations), else gemm/gguf-like (2-D)."""

    def __init__(self, variant: str, w: dict, *, kv: bool | None = None, present: bool = False):
        self.variant = variant
        self.w = w
        self.hf = variant != "gemm"
        self.fp16 = variant == "fp16"
        self.kv = variant == "kvcache" if kv is None else kv
        self.present = present and not self.kv  # no past inputs, yet present.* outputs (optimum's decoder_model)
        self.g = _Graph()
        self.linear_info: dict[tuple[int, str], tuple[str, str]] = {}  # (layer, kind) -> (node, init)
        self.tensors: dict[str, list[str] | str] = {
            "attn_norm": [],
            "attn_residual": [],
            "mlp_norm": [],
            "down_proj_input": [],
            "down_proj_output": [],
            "residual": [],
        }

    # ---- helpers ------------------------------------------------------------------------------
    def p(self, hf_name: str, gguf_name: str) -> str:
        return hf_name if self.hf else gguf_name

    def linear(self, x: str, wt: np.ndarray, layer: int, kind: str, hf_prefix: str, gguf_name: str,
               gemm: bool) -> str:
        """x @ wt.T with wt in torch layout [out, in]."""
        g = self.g
        if self.hf:
            node = f"{hf_prefix}/MatMul"
            init = g.init(g.matmul_name(), wt.T.astype(np.float16 if self.fp16 else np.float32))
            b = init
            if self.fp16:
                b = g.op("Cast", [init], f"{hf_prefix}/Cast", to=TensorProto.FLOAT)
            out = g.op("MatMul", [x, b], node)
        else:
            node = gguf_name
            init = g.init(f"{gguf_name}.weight", wt.astype(np.float32))
            if gemm:
                out = g.op("Gemm", [x, init], node, transB=1)
            else:
                t = g.op("Transpose", [init], f"{gguf_name}.transpose", perm=[1, 0])
                out = g.op("MatMul", [x, t], node)
        self.linear_info[(layer, kind)] = (node, init)
        return out

    def rmsnorm(self, x: str, weight: np.ndarray, hf_prefix: str, gguf_name: str) -> str:
        g = self.g
        pre = hf_prefix if self.hf else gguf_name
        wname = g.init(self.p(f"{hf_prefix.strip('/').replace('/', '.')}.weight", f"{gguf_name}.weight"),
                       weight.astype(np.float32))
        sq = g.op("Pow", [x, g.const(2.0, np.float32)], f"{pre}/Pow")
        ms = g.op("ReduceMean", [sq], f"{pre}/ReduceMean", axes=[-1], keepdims=1)
        ms = g.op("Add", [ms, g.const(RMS_EPS, np.float32)], f"{pre}/Add")
        rt = g.op("Sqrt", [ms], f"{pre}/Sqrt")
        rc = g.op("Reciprocal", [rt], f"{pre}/Reciprocal")
        y = g.op("Mul", [x, rc], f"{pre}/Mul")
        return g.op("Mul", [wname, y], f"{pre}/Mul_1")

    def rotate(self, x: str, cos: str, sin: str, pre: str) -> str:
        g = self.g
        half = HEAD_DIM // 2
        ax = g.const([-1], np.int64)
        x1 = g.op("Slice", [x, g.const([0], np.int64), g.const([half], np.int64), ax], f"{pre}/Slice")
        x2 = g.op("Slice", [x, g.const([half], np.int64), g.const([HEAD_DIM], np.int64), ax], f"{pre}/Slice_1")
        nx2 = g.op("Neg", [x2], f"{pre}/Neg")
        rot = g.op("Concat", [nx2, x1], f"{pre}/Concat", axis=-1)
        a = g.op("Mul", [x, cos], f"{pre}/Mul")
        b = g.op("Mul", [rot, sin], f"{pre}/Mul_1")
        return g.op("Add", [a, b], f"{pre}/Add")

    # ---- model --------------------------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        g, w = self.g, self.w
        inputs, outputs = [], []
        if self.hf:
            inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]))
            mask_len = "total_sequence_length" if self.kv else "sequence_length"
            inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", mask_len]))
            inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]))
            if self.kv:
                for i in range(NUM_LAYERS):
                    for kind in ("key", "value"):
                        inputs.append(helper.make_tensor_value_info(
                            f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                            ["batch_size", NUM_HEADS, "past_sequence_length", HEAD_DIM]))
            ids = "input_ids"
        else:
            inputs.append(helper.make_tensor_value_info("tokens", TensorProto.INT64, ["sequence_length"]))
            ids = "tokens"

        # Embedding
        emb = g.init(self.p("model.embed_tokens.weight", "token_embd.weight"), w["embed"])
        h = g.op("Gather", [emb, ids], self.p("/model/embed_tokens/Gather", "token_embd"))

        # Sequence lengths and causal mask
        seq_axis = 1 if self.hf else 0
        ids_shape = g.op("Shape", [ids], self.p("/model/Shape", "shape"))
        s_len = g.op("Gather", [ids_shape, g.const(seq_axis, np.int64)], self.p("/model/Gather", "seq_len"), axis=0)
        zero, one = g.const(0, np.int64), g.const(1, np.int64)
        if self.hf:
            m_shape = g.op("Shape", [ "attention_mask"], "/model/Shape_1")
            t_len = g.op("Gather", [m_shape, g.const(1, np.int64)], "/model/Gather_1", axis=0)
        else:
            t_len = s_len
        q_start = g.op("Sub", [t_len, s_len], self.p("/model/Sub", "past_len"))
        kpos = g.op("Range", [zero, t_len, one], self.p("/model/Range", "key_pos"))
        qpos = g.op("Range", [q_start, t_len, one], self.p("/model/Range_1", "query_pos"))
        kpos2 = g.op("Unsqueeze", [kpos, g.const([0], np.int64)], self.p("/model/Unsqueeze", "key_pos_2d"))
        qpos2 = g.op("Unsqueeze", [qpos, g.const([1], np.int64)], self.p("/model/Unsqueeze_1", "query_pos_2d"))
        allowed = g.op("LessOrEqual", [kpos2, qpos2], self.p("/model/LessOrEqual", "causal"))  # [S, T]
        if self.hf:
            pad = g.op("Cast", ["attention_mask"], "/model/Cast", to=TensorProto.BOOL)
            pad = g.op("Unsqueeze", [pad, g.const([1, 2], np.int64)], "/model/Unsqueeze_2")  # [B,1,1,T]
            allowed = g.op("And", [allowed, pad], "/model/And")  # [B,1,S,T]
        neg = np.finfo(np.float32).min
        add_mask = g.op("Where", [allowed, g.const(0.0, np.float32), g.const(neg, np.float32)],
                        self.p("/model/Where", "attn_mask"))

        # RoPE tables
        inv_freq = 1.0 / (ROPE_THETA ** (np.arange(0, HEAD_DIM, 2, dtype=np.float64) / HEAD_DIM))
        if self.hf:
            pos = g.op("Cast", ["position_ids"], "/model/rotary_emb/Cast", to=TensorProto.FLOAT)  # [B,S]
        else:
            pos = g.op("Cast", [qpos], "rope.cast", to=TensorProto.FLOAT)  # [S]
        pos = g.op("Unsqueeze", [pos, g.const([-1], np.int64)], self.p("/model/rotary_emb/Unsqueeze", "rope.unsqueeze"))
        freqs = g.op("Mul", [pos, g.const(inv_freq.astype(np.float32), np.float32)],
                     self.p("/model/rotary_emb/Mul", "rope.freqs"))
        embf = g.op("Concat", [freqs, freqs], self.p("/model/rotary_emb/Concat", "rope.concat"), axis=-1)
        cos = g.op("Cos", [embf], self.p("/model/rotary_emb/Cos", "rope.cos"))
        sin = g.op("Sin", [embf], self.p("/model/rotary_emb/Sin", "rope.sin"))
        head_axis = [1] if self.hf else [0]
        cos = g.op("Unsqueeze", [cos, g.const(head_axis, np.int64)], self.p("/model/rotary_emb/Unsqueeze_1", "rope.cos_h"))
        sin = g.op("Unsqueeze", [sin, g.const(head_axis, np.int64)], self.p("/model/rotary_emb/Unsqueeze_2", "rope.sin_h"))

        present_names: dict[str, str] = {}
        split_shape = [0, 0, NUM_HEADS, HEAD_DIM] if self.hf else [0, NUM_HEADS, HEAD_DIM]
        merge_shape = [0, 0, HIDDEN] if self.hf else [0, HIDDEN]
        to_heads = [0, 2, 1, 3] if self.hf else [1, 0, 2]
        k_t = [0, 1, 3, 2] if self.hf else [0, 2, 1]

        for i, lw in enumerate(w["layers"]):
            L = f"/model/layers.{i}"
            B = f"blk.{i}"
            # --- attention
            n = self.rmsnorm(h, lw["input_norm"], f"{L}/input_layernorm", f"{B}.attn_norm")
            self.tensors["attn_norm"].append(n)
            heads = {}
            for kind in ("q", "k", "v"):
                y = self.linear(n, lw[kind], i, f"{kind}_proj", f"{L}/self_attn/{kind}_proj", f"{B}.attn_{kind}", gemm=False)
                pre = self.p(f"{L}/self_attn/{kind}", f"{B}.attn_{kind}")
                y = g.op("Reshape", [y, g.const(split_shape, np.int64)], f"{pre}/Reshape")
                y = g.op("Transpose", [y], f"{pre}/Transpose", perm=to_heads)
                if kind in ("q", "k"):
                    y = self.rotate(y, cos, sin, self.p(f"{L}/self_attn/rotary_{kind}", f"{B}.rope_{kind}"))
                heads[kind] = y
            if self.kv:
                for kind, name in (("k", "key"), ("v", "value")):
                    heads[kind] = g.op("Concat", [f"past_key_values.{i}.{name}", heads[kind]],
                                       f"{L}/self_attn/Concat_{name}", outputs=[f"present.{i}.{name}"], axis=2)
                    outputs.append(helper.make_tensor_value_info(
                        f"present.{i}.{name}", TensorProto.FLOAT,
                        ["batch_size", NUM_HEADS, "total_sequence_length", HEAD_DIM]))
            elif self.present:  # the key/value heads themselves are the outputs, renamed below
                for kind, name in (("k", "key"), ("v", "value")):
                    present_names[heads[kind]] = f"present.{i}.{name}"
                    outputs.append(helper.make_tensor_value_info(
                        f"present.{i}.{name}", TensorProto.FLOAT,
                        ["batch_size", NUM_HEADS, "total_sequence_length", HEAD_DIM]))
            A = self.p(f"{L}/self_attn", f"{B}.attn")
            kt = g.op("Transpose", [heads["k"]], f"{A}/Transpose_k", perm=k_t)
            sc = g.op("MatMul", [heads["q"], kt], f"{A}/MatMul")
            sc = g.op("Mul", [sc, g.const(1.0 / math.sqrt(HEAD_DIM), np.float32)], f"{A}/Mul")
            sc = g.op("Add", [sc, add_mask], f"{A}/Add")
            pr = g.op("Softmax", [sc], f"{A}/Softmax", axis=-1)
            ctx = g.op("MatMul", [pr, heads["v"]], f"{A}/MatMul_1")
            ctx = g.op("Transpose", [ctx], f"{A}/Transpose", perm=to_heads)
            ctx = g.op("Reshape", [ctx, g.const(merge_shape, np.int64)], f"{A}/Reshape")
            ao = self.linear(ctx, lw["o"], i, "o_proj", f"{L}/self_attn/o_proj", f"{B}.attn_output", gemm=False)
            h = g.op("Add", [h, ao], self.p(f"{L}/Add", f"{B}.attn_residual"))
            self.tensors["attn_residual"].append(h)
            # --- MLP
            n = self.rmsnorm(h, lw["post_norm"], f"{L}/post_attention_layernorm", f"{B}.ffn_norm")
            self.tensors["mlp_norm"].append(n)
            gt = self.linear(n, lw["gate"], i, "gate_proj", f"{L}/mlp/gate_proj", f"{B}.ffn_gate", gemm=True)
            up = self.linear(n, lw["up"], i, "up_proj", f"{L}/mlp/up_proj", f"{B}.ffn_up", gemm=True)
            M = self.p(f"{L}/mlp", f"{B}.ffn")
            sg = g.op("Sigmoid", [gt], f"{M}/act_fn/Sigmoid")
            act = g.op("Mul", [gt, sg], f"{M}/act_fn/Mul")
            x = g.op("Mul", [act, up], f"{M}/Mul")
            self.tensors["down_proj_input"].append(x)
            y = self.linear(x, lw["down"], i, "down_proj", f"{L}/mlp/down_proj", f"{B}.ffn_down", gemm=True)
            self.tensors["down_proj_output"].append(y)
            h = g.op("Add", [h, y], self.p(f"{L}/Add_1", f"{B}.ffn_residual"))
            self.tensors["residual"].append(h)

        n = self.rmsnorm(h, w["final_norm"], "/model/norm", "output_norm")
        self.tensors["final_norm"] = n
        if self.hf:
            node = "/lm_head/MatMul"
            init = g.init(g.matmul_name(), w["lm_head"].T.astype(np.float16 if self.fp16 else np.float32))
            b = g.op("Cast", [init], "/lm_head/Cast", to=TensorProto.FLOAT) if self.fp16 else init
            g.op("MatMul", [n, b], node, outputs=["logits"])
            logits_shape = ["batch_size", "sequence_length", VOCAB]
        else:
            node, init = "output", g.init("output.weight", w["lm_head"])
            g.op("Gemm", [n, init], node, outputs=["logits"], transB=1)
            logits_shape = ["sequence_length", VOCAB]
        self.linear_info[(-1, "lm_head")] = (node, init)
        outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, logits_shape))
        for node in g.nodes:
            for seq in (node.input, node.output):
                for k, name in enumerate(seq):
                    if name in present_names:
                        seq[k] = present_names[name]

        graph = helper.make_graph(g.nodes, f"sw_onnx_sample_{self.variant}", inputs, outputs, g.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="sw_onnx.sample_models", producer_version="0.1")
        model.ir_version = 8
        return model


# --------------------------------------------------------------------------------------------------
# Contrib-op graphs: onnxruntime-genai's model builder, optimum's merged decoder
# --------------------------------------------------------------------------------------------------

GENAI_OPSET = 21  # the builder's default-domain opset (onnxruntime-genai 0.15.2)
GENAI_CONTEXT = 2048  # rows of cos_cache / sin_cache, genai_config's context_length and max_length
GENAI_DATA = "model.onnx.data"
MERGED_IR_VERSION = 9  # optimum's merge_decoders writes IR 9


class _GenaiBuilder:
    """The graph onnxruntime-genai's model builder writes for a Llama decoder (``-p fp32 -e cpu``).

    Node, tensor and initializer names follow the builder: ``/model/layers.{i}/attn/qkv_proj/MatMul``
    (packed [hidden, (heads + 2 * kv_heads) * head_dim] weight ``model.layers.{i}.attn.qkv_proj.MatMul.weight``),
    ``com.microsoft::GroupQueryAttention`` (RoPE inside from ``cos_cache``/``sin_cache``, KV cache in
    ``past_key_values.{i}.key`` -> ``present.{i}.key``, sequence lengths from the attention mask),
    ``SimplifiedLayerNormalization`` (default domain) for the first norm, then
    ``com.microsoft::SkipSimplifiedLayerNormalization`` for every later norm: it adds the residual
    (output 3 = input + skip, the residual stream) and normalizes (output 0). The final norm has only
    output 0, so the residual after the last layer is never materialised. SiLU is Sigmoid + Mul.
    """

    def __init__(self, w: dict):
        self.w = w
        self.g = _Graph()
        self.linear_info: dict[tuple[int, str], tuple[str, str]] = {}
        self.tensors: dict[str, list | str] = {k: [] for k in (
            "attn_norm", "attn_residual", "mlp_norm", "down_proj_input", "down_proj_output", "residual")}

    def const(self, value, suffix: str) -> str:
        """An int64 Constant node, named as the builder names them."""
        out = f"/model/constants/INT64/{suffix}"
        self.g.nodes.append(helper.make_node(
            "Constant", [], [out], name=f"/model/constant_nodes/INT64/{suffix}",
            value=numpy_helper.from_array(np.asarray(value, dtype=np.int64), out)))
        return out

    def op(self, op_type: str, inputs: Sequence[str], name: str, n_out: int = 1, domain: str = "", **attrs):
        outputs = [f"{name}/output_{k}" for k in range(n_out)]
        self.g.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=name, domain=domain or None,
                                             **attrs))
        return outputs[0] if n_out == 1 else outputs

    def linear(self, x: str, wt: np.ndarray, layer: int, kind: str, prefix: str) -> str:
        """x @ wt.T, wt in torch layout [out, in]; the initializer is stored [in, out] (KN)."""
        node = f"{prefix}/MatMul"
        init = self.g.init(f"{prefix.strip('/').replace('/', '.')}.MatMul.weight", wt.T.astype(np.float32))
        self.linear_info[(layer, kind)] = (node, init)
        return self.op("MatMul", [x, init], node)

    def norm_weight(self, name: str, weight: np.ndarray) -> str:
        return self.g.init(name, weight.astype(np.float32))

    def build(self) -> onnx.ModelProto:
        g, w = self.g, self.w
        f32, i64 = TensorProto.FLOAT, TensorProto.INT64
        kv_dims = ["batch_size", NUM_HEADS, "past_sequence_length", "kv_cache_dim"]
        inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", VOCAB])]
        for kind in ("key", "value"):
            for i in range(NUM_LAYERS):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, kv_dims))
                outputs.append(helper.make_tensor_value_info(
                    f"present.{i}.{kind}", f32, ["batch_size", NUM_HEADS, "total_sequence_length", "kv_cache_dim"]))

        # attention mask -> GroupQueryAttention's seqlens_k (row sums - 1) and total_sequence_length, int32
        M = "/model/attn_mask_reformat/attn_mask_subgraph"
        one_1d = self.const([1], "[1]")
        rs = self.op("ReduceSum", ["attention_mask", one_1d], f"{M}/ReduceSum", keepdims=0)
        sub = self.op("Sub", [rs, one_1d], f"{M}/Sub")
        seqlens_k = self.op("Cast", [sub], f"{M}/Sub/Cast", to=TensorProto.INT32)
        shape = self.op("Shape", ["attention_mask"], f"{M}/Shape")
        tot = self.op("Gather", [shape, self.const(1, "1")], f"{M}/Gather", axis=0)
        total_len = self.op("Cast", [tot], f"{M}/Gather/Cast", to=TensorProto.INT32)

        emb = g.init("model.embed_tokens.weight", w["embed"])
        h = self.op("Gather", [emb, "input_ids"], "/model/embed_tokens/Gather")
        inv_freq = 1.0 / (ROPE_THETA ** (np.arange(0, HEAD_DIM, 2, dtype=np.float64) / HEAD_DIM))
        freqs = np.outer(np.arange(GENAI_CONTEXT, dtype=np.float64), inv_freq)
        cos_cache = sin_cache = None
        attrs = dict(epsilon=RMS_EPS)
        down = None
        for i, lw in enumerate(w["layers"]):
            L = f"/model/layers.{i}"
            # --- attention
            gamma = self.norm_weight(f"model.layers.{i}.input_layernorm.weight", lw["input_norm"])
            if i == 0:
                n = f"{L}/input_layernorm/output_0"
                g.nodes.append(helper.make_node("SimplifiedLayerNormalization", [h, gamma], [n],
                                                name=f"{L}/input_layernorm/LayerNorm", axis=-1, stash_type=1,
                                                **attrs))
            else:
                self._skip_norm(h, down, gamma, f"{L}/input_layernorm", attrs)
                n, h = f"{L}/input_layernorm/output_0", f"{L}/input_layernorm/output_3"
                self.tensors["residual"].append(h)
            self.tensors["attn_norm"].append(n)
            qkv = np.concatenate([lw["q"], lw["k"], lw["v"]], axis=0)  # [out = q | k | v, in]
            y = self.linear(n, qkv, i, "qkv_proj", f"{L}/attn/qkv_proj")
            if cos_cache is None:  # the builder stores the RoPE tables after the first qkv weight
                cos_cache = g.init("cos_cache", np.cos(freqs).astype(np.float32))
                sin_cache = g.init("sin_cache", np.sin(freqs).astype(np.float32))
            gqa = f"{L}/attn/GroupQueryAttention"
            g.nodes.append(helper.make_node(
                "GroupQueryAttention",
                [y, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len,
                 cos_cache, sin_cache, "", "", ""],
                [f"{gqa}/output_0", f"present.{i}.key", f"present.{i}.value"], name=gqa, domain="com.microsoft",
                num_heads=NUM_HEADS, kv_num_heads=NUM_HEADS, scale=1.0 / math.sqrt(HEAD_DIM), local_window_size=-1,
                softcap=0.0, do_rotary=1, rotary_interleaved=0))
            ao = self.linear(f"{gqa}/output_0", lw["o"], i, "o_proj", f"{L}/attn/o_proj")
            # --- MLP
            gamma = self.norm_weight(f"model.layers.{i}.post_attention_layernorm.weight", lw["post_norm"])
            self._skip_norm(h, ao, gamma, f"{L}/post_attention_layernorm", attrs)
            n, h = f"{L}/post_attention_layernorm/output_0", f"{L}/post_attention_layernorm/output_3"
            self.tensors["attn_residual"].append(h)
            self.tensors["mlp_norm"].append(n)
            gt = self.linear(n, lw["gate"], i, "gate_proj", f"{L}/mlp/gate_proj")
            up = self.linear(n, lw["up"], i, "up_proj", f"{L}/mlp/up_proj")
            sg = self.op("Sigmoid", [gt], f"{L}/mlp/act_fn/Sigmoid")
            act = self.op("Mul", [gt, sg], f"{L}/mlp/act_fn/Mul")
            x = self.op("Mul", [act, up], f"{L}/mlp/Mul")
            self.tensors["down_proj_input"].append(x)
            down = self.linear(x, lw["down"], i, "down_proj", f"{L}/mlp/down_proj")
            self.tensors["down_proj_output"].append(down)

        F = f"/model/layers.{NUM_LAYERS}/final_norm_layernorm"
        gamma = self.norm_weight(f"model.layers.{NUM_LAYERS}.final_norm_layernorm.weight", w["final_norm"])
        g.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [h, down, gamma], [f"{F}/output_0"],
                                        name=f"{F}/SkipLayerNorm", domain="com.microsoft", **attrs))
        self.tensors["residual"].append(None)  # the final norm writes no residual output (as the builder's)
        self.tensors["final_norm"] = f"{F}/output_0"
        init = g.init("lm_head.MatMul.weight", w["lm_head"].T.astype(np.float32))
        g.nodes.append(helper.make_node("MatMul", [f"{F}/output_0", init], ["logits"], name="/lm_head/MatMul"))
        self.linear_info[(-1, "lm_head")] = ("/lm_head/MatMul", init)

        graph = helper.make_graph(g.nodes, "main_graph", inputs, outputs, g.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", GENAI_OPSET),
                                                        helper.make_opsetid("com.microsoft", 1)],
                                  producer_name="onnxruntime-genai", producer_version="sw_onnx.sample_models")
        model.ir_version = 10
        return model

    def _skip_norm(self, residual: str, skip: str, gamma: str, prefix: str, attrs: dict) -> None:
        """SkipSimplifiedLayerNormalization: output_0 = norm(residual + skip) * gamma, output_3 = residual + skip."""
        self.g.nodes.append(helper.make_node(
            "SkipSimplifiedLayerNormalization", [residual, skip, gamma],
            [f"{prefix}/output_0", "", "", f"{prefix}/output_3"], name=f"{prefix}/SkipLayerNorm",
            domain="com.microsoft", **attrs))


def _genai_config() -> dict:
    """genai_config.json as onnxruntime-genai 0.15.2's builder writes it for this model."""
    return {
        "model": {
            "bos_token_id": BOS_TOKEN_ID,
            "context_length": GENAI_CONTEXT,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": HEAD_DIM,
                "hidden_size": HIDDEN,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": NUM_HEADS,
                "num_hidden_layers": NUM_LAYERS,
                "num_key_value_heads": NUM_HEADS,
            },
            "eos_token_id": EOS_TOKEN_ID,
            "pad_token_id": EOS_TOKEN_ID,  # the builder's fallback when config.json names no pad token
            "type": "llama",
            "vocab_size": VOCAB,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": GENAI_CONTEXT, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 50, "top_p": 1.0,
        },
    }


def _merged_model(w: dict) -> tuple[onnx.ModelProto, _Builder]:
    """optimum's (older) ``decoder_model_merged.onnx``: ``If(use_cache_branch)`` whose then-branch is the
    with-past decoder and else-branch the decoder without past (which still outputs ``present.*``).

    As optimum's ``merge_decoders``: the branches take no inputs, read the outer graph's inputs and the
    outer-scope initializers (every weight, so each linear layer's MatMul sits inside both branches and reads
    the same initializer); scalars and 1-D int64 constants stay inside each branch. Node and tensor names are
    the same in both branches; the branch outputs are named as the If outputs (``logits``, ``present.*``).
    """
    past = _Builder("merged", w, kv=True)
    no_past = _Builder("merged", w, kv=False, present=True)
    m_past, m_no_past = past.build(), no_past.build()
    assert past.linear_info == no_past.linear_info and past.tensors == no_past.tensors

    def small(t: onnx.TensorProto) -> bool:
        return len(t.dims) == 0 or (len(t.dims) == 1 and t.data_type in (TensorProto.INT32, TensorProto.INT64))

    shared = {t.name: t for t in m_past.graph.initializer if not small(t)}
    for t in m_no_past.graph.initializer:
        if not small(t):
            assert t.name in shared and t.SerializeToString() == shared[t.name].SerializeToString(), t.name
    outer_inits = [t for t in m_past.graph.initializer if not small(t)]

    def branch(m: onnx.ModelProto, name: str) -> onnx.GraphProto:
        return helper.make_graph(list(m.graph.node), name, [], list(m.graph.output),
                                 [t for t in m.graph.initializer if small(t)])

    with_past_branch, no_past_branch = branch(m_past, "with_past"), branch(m_no_past, "no_past")
    if_node = helper.make_node("If", ["use_cache_branch"], [o.name for o in no_past_branch.output],
                               name="optimum::if", then_branch=with_past_branch, else_branch=no_past_branch)
    use_cache = helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])
    graph = helper.make_graph([if_node], "merged", [*m_past.graph.input, use_cache], list(no_past_branch.output),
                              outer_inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="sw_onnx.sample_models", producer_version="0.1")
    model.ir_version = MERGED_IR_VERSION
    return model, past


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _hf_config(config: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "num_hidden_layers": config["num_layers"],
        "num_attention_heads": config["num_heads"],
        "num_key_value_heads": config["num_heads"],
        "head_dim": config["head_dim"],
        "vocab_size": config["vocab_size"],
        "rms_norm_eps": RMS_EPS,
        "rope_theta": ROPE_THETA,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "torch_dtype": "float16" if config["variant"] == "fp16" else "float32",
    }


def build_sample_model(variant: str, out_dir: Path | str, *, seed: int = 0) -> SampleModel:
    """Build one variant (of :data:`ALL_VARIANTS`) into ``out_dir/<variant>/`` (model.onnx, ground_truth.json,
    config.json; genai: model.onnx.data and genai_config.json instead of config.json)."""
    if variant not in ALL_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {ALL_VARIANTS}")
    w, records = _weights(variant, seed)
    if variant == "genai":
        b = _GenaiBuilder(w)
        model = b.build()
        # no onnx.checker: it rejects SimplifiedLayerNormalization in the default domain, as it rejects the
        # builder's own models ("No Op registered"); onnxruntime registers it, and the tests run the model
    elif variant == "merged":
        model, b = _merged_model(w)
        onnx.checker.check_model(model, full_check=True)
    else:
        b = _Builder(variant, w)
        model = b.build()
        onnx.checker.check_model(model, full_check=True)

    init_by_name = {t.name: t for t in model.graph.initializer}
    sws: list[PlantedSuperWeight] = []
    gt_records = []
    for rec in records:
        node, init = b.linear_info[(SW_LAYER, "down_proj")]
        row, col = rec["row"], rec["col"]
        index = (row, col) if variant == "gemm" else (col, row)
        arr = numpy_helper.to_array(init_by_name[init])
        value = float(arr[index])
        sw = PlantedSuperWeight(layer=SW_LAYER, node=node, initializer=init, row=row, col=col,
                                index=index, value=value)
        sws.append(sw)
        gt_records.append({**asdict(sw), "index": list(index), "input_spike": rec["input_spike"],
                           "input_spike_token": 0})

    vdir = Path(out_dir) / variant
    vdir.mkdir(parents=True, exist_ok=True)
    path = vdir / "model.onnx"
    if variant == "external":
        data = vdir / "model.onnx.data"
        if data.exists():
            data.unlink()
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024, convert_attribute=False)
    elif variant == "genai":  # as the builder: every initializer in one external file
        data = vdir / GENAI_DATA
        if data.exists():
            data.unlink()
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=GENAI_DATA, size_threshold=0, convert_attribute=False)
    else:
        onnx.save_model(model, str(path))

    input_names = [i.name for i in model.graph.input]
    config = {
        "variant": variant,
        "seed": seed,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_layers": NUM_LAYERS,
        "num_heads": NUM_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": VOCAB,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "input_names": input_names,
        "output_names": [o.name for o in model.graph.output],
        "batch_dim": variant != "gemm",
        "opset": GENAI_OPSET if variant == "genai" else OPSET,
        # names of intermediate tensors (one per layer unless noted), for tests / instrumentation
        "tensors": dict(b.tensors),
        # (layer, projection) -> node / initializer names; layer -1 is lm_head
        "linear_nodes": {f"{l}.{k}": {"node": n, "initializer": i} for (l, k), (n, i) in b.linear_info.items()},
    }
    notes = ("two super weights share the row (about 60% / 40% of the spike): zero them together"
             if len(records) > 1 else "")
    if variant == "genai":
        config["genai_config"] = _genai_config()
        notes += ("onnxruntime-genai builder layout: contrib ops (SimplifiedLayerNormalization, "
                  "com.microsoft SkipSimplifiedLayerNormalization / GroupQueryAttention), packed qkv, weights in "
                  f"{GENAI_DATA}; feed input_ids, attention_mask and empty past_key_values.* (no position_ids)")
    elif variant == "merged":
        config["if_node"] = "optimum::if"
        config["branches"] = {"then_branch": "with_past", "else_branch": "no_past"}
        notes += ("; optimum merged decoder: the nodes (and tensors) named here sit in both branches of the "
                  "If 'optimum::if' (use_cache_branch: then = with past, else = without), the weights are "
                  "outer-scope initializers")
    sa = records[0]["row"] if records else None
    if variant == "genai":  # the builder writes genai_config.json, no config.json
        (vdir / "genai_config.json").write_text(json.dumps(config["genai_config"], indent=4) + "\n")
    else:
        (vdir / "config.json").write_text(json.dumps(_hf_config(config), indent=2) + "\n")
    (vdir / "ground_truth.json").write_text(json.dumps({
        "variant": variant,
        "seed": seed,
        "model": "model.onnx",
        "prompt": list(DEFAULT_PROMPT),
        "bos_token_id": BOS_TOKEN_ID,
        "super_activation_channel": sa,
        "super_activation_layer": SW_LAYER if records else None,
        "super_weights": gt_records,
        "notes": notes,
    }, indent=2) + "\n")
    return SampleModel(path=path, variant=variant, super_weights=sws, super_activation_channel=sa, config=config)


def build_all(out_dir: Path | str, variants: Iterable[str] = VARIANTS, *, seed: int = 0) -> dict[str, SampleModel]:
    return {v: build_sample_model(v, out_dir, seed=seed) for v in variants}


def make_feeds(sample: SampleModel, tokens: Sequence[int] = DEFAULT_PROMPT, *,
               past: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """onnxruntime feeds for `tokens` (one sequence). For kvcache, genai and merged, `past` maps
    past_key_values.* names to arrays [1, heads, past, head_dim]; missing ones are empty (past length 0).
    genai takes no position_ids; merged takes use_cache_branch = [past given]."""
    ids = np.asarray(tokens, dtype=np.int64)
    if not sample.config["batch_dim"]:
        return {"tokens": ids}
    past = dict(past or {})
    past_len = next(iter(past.values())).shape[2] if past else 0
    s = len(ids)
    feeds = {
        "input_ids": ids[None, :],
        "attention_mask": np.ones((1, past_len + s), dtype=np.int64),
        "position_ids": np.arange(past_len, past_len + s, dtype=np.int64)[None, :],
    }
    names = sample.config["input_names"]
    if "position_ids" not in names:  # genai: GroupQueryAttention takes the positions from the mask
        del feeds["position_ids"]
    for name in names:
        if name.startswith("past_key_values."):
            feeds[name] = past.get(name, np.zeros((1, NUM_HEADS, 0, HEAD_DIM), dtype=np.float32))
    if "use_cache_branch" in names:
        feeds["use_cache_branch"] = np.asarray([bool(past)])
    return feeds


def run_sample_model(sample: SampleModel | str | Path, tokens: Sequence[int] = DEFAULT_PROMPT, *,
                     extra_outputs: Sequence[str] = (), model: onnx.ModelProto | None = None,
                     feeds: dict | None = None) -> dict[str, np.ndarray]:
    """Run with onnxruntime (CPU). `extra_outputs`: intermediate float tensors to expose as well.
    `model` overrides the file (e.g. a copy with a zeroed weight). Returns {output name: array}.
    In the merged variant, tensors of the If branches are exposed through both branches and the If."""
    import onnxruntime as ort

    if not isinstance(sample, SampleModel):
        raise TypeError("pass a SampleModel")
    m = model if model is not None else onnx.load(str(sample.path))
    if extra_outputs:
        m2 = onnx.ModelProto()
        m2.CopyFrom(m)
        have = {o.name for o in m2.graph.output}
        produced = {o for n in m2.graph.node for o in n.output}
        if_nodes = [n for n in m2.graph.node if n.op_type == "If"]
        for name in extra_outputs:
            if name not in have:
                if name not in produced and if_nodes:  # a tensor inside the branches (merged)
                    for attr in if_nodes[0].attribute:
                        attr.g.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
                    if_nodes[0].output.append(name)
                m2.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        m = m2
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    f = feeds if feeds is not None else make_feeds(sample, tokens)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, f)))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sample_models.build", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory (DIR/<variant>/model.onnx ...)")
    ap.add_argument("--variant", action="append", choices=ALL_VARIANTS, help="variant(s) to build (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for v in args.variant or ALL_VARIANTS:
        sm = build_sample_model(v, args.out, seed=args.seed)
        sws = ", ".join(f"L{s.layer}[{s.row},{s.col}]={s.value:.4g}" for s in sm.super_weights) or "none"
        print(f"{v:9s} {sm.path}  super weights: {sws}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
