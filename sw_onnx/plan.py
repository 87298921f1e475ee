"""The quantization plan: what happens to every linear layer, and why, decided before the graph is touched.

`build_quant_plan` turns the analysis of a model (its linear layers, the super weights to keep, the inputs'
super-activation channels and ranges, per-layer accuracy levels) and a `QuantizeConfig` into a `QuantPlan`
of one `LayerPlan` per linear layer (as llama.cpp decides each tensor's type before quantizing anything).
The rewrite passes take the plan as their only instruction; the summary prints it.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from sw_onnx.config import PER_CHANNEL, QuantizeConfig
from sw_onnx.coordinates import Coordinate
from sw_onnx.discover import EmbeddingTable, LinearLayer, find_embeddings, find_linear_layers, find_lm_head

if TYPE_CHECKING:  # pragma: no cover
    from sw_onnx.analyze.input_stats import InputImportance, InputRange

__all__ = ["ActivationPlan", "EmbeddingPlan", "LayerPlan", "QuantPlan", "allocate_bits", "block_label", "build_quant_plan", "kernel_block_size",
           "kquant_layers", "layer_bits"]

_FLOAT_WEIGHTS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
# The JSON "layers" entries of schema sw-onnx/quantize v1, in this order; the plan's other fields follow.
IMPORTANCE_SKIP_FIRST = True
"""Input importance leaves out each window's first token (the super-activation / attention-sink token, whose
huge entries would otherwise decide E[x^2] of its channels): on SmolLM2 off the grid, b128, error weight x2,
43.26 vs 43.92 with it (16 windows; docs/quantize_defaults.md)."""
MSE_REFIT_ITERATIONS = 2
"""``refit`` rounds after the ``clip="mse"`` search (`sw_onnx.kernels.quantize_blockwise`): the least-squares
scale of each block's codes where it lowers the weighted error. The search's grid of shrink factors is coarse;
on SmolLM2 off the grid, b128, error weight x2: 41.96 vs 43.26 without (docs/quantize_defaults.md)."""
MSE_GRID_WITH_REFIT = 5
"""Shrink factors the search tries when the refit follows (1, 0.95, ..., 0.8 instead of 9 steps): the refit
finds the scale between them. On SmolLM2's int4 b32 layers the importance-weighted error was the same (259.13
vs 259.16 with 9) in 0.79x the time, which keeps quantizing from a report within 1.5x of the w^2 search's."""
LM_HEAD_INT8_SEARCH = False
"""Whether the lm_head at its own 8 bits (``lm_head_bits``) gets the ``clip="mse"`` search; off: round-to-nearest.
At 8 bits the search moved perplexity by under 0.2% either way (SmolLM2 exported 39.81 -> 39.76, off the grid
40.40 -> 40.47, Gemma-3 26.84 -> 26.82) and was a third of Gemma-3's quantize time (its 168M-weight lm_head;
docs/quantize_defaults.md)."""
_V1_FIELDS = ("node", "op_type", "initializer", "position", "layer", "k", "n", "action", "reason", "form",
              "is_lm_head", "kept", "accuracy_level", "float_bytes", "quantized_bytes", "quantized_node")


@dataclass
class ActivationPlan:
    """W8A8: the static int8 range of a layer's input and its super-activation entries (paper Eq. 1).

    Attributes:
        range: the per-tensor range the scale is made from (``range / 127``).
        naive_range: max |x| over the calibration tokens.
        channels: super-activation channels restored exactly beyond `range` (empty: naive W8A8).
        median: the Eq. 1 replacement value.
    """

    range: float
    naive_range: float
    channels: list[int]
    median: float


@dataclass
class LayerPlan:
    """One linear layer's plan, and after the passes what was written for it.

    Attributes:
        node, op_type, initializer, position, layer, k, n, is_lm_head: the layer (``k, n``: effective
            ``[K, N]``; ``layer``: decoder index from names or None).
        action: ``"quantized"`` or ``"skipped"``; reason: why skipped, or how it is quantized.
        bits, block_size, symmetric, clip, zscore: its quantizer (``block_size`` 0: per-channel).
        form: ``"qdq"``, ``"qdq-3d"`` (2-D activations lifted so that no Gemm forms), ``"nbits"`` or ``"w8a8"``.
        lift_3d: 2-D activations go through the MatMul as 3-D (``Unsqueeze``/``Squeeze``): with them a
            MatMul followed by a non-constant Add would become a Gemm, which neither fusion takes.
        accuracy_level: MatMulNBits ``accuracy_level`` (nbits), else None.
        kept: super weights kept exact, ``{"index", "k", "n", "value"}`` each (index in the initializer).
        side_keep: of those, ``(k, n, value)`` for the weight pass's side path (the others leave with their
            row on the super-activation channel side path).
        sa_channels: input channels taken out of the MatMul and applied in float (int4/int8 weight-only).
        activation: W8A8 input quantization, else None.
        error_weight: the ``clip="mse"`` error weight (`QuantizeConfig.error_weight`).
        refit: ``clip="mse"``: rounds of least-squares scale refitting after the search (`MSE_REFIT_ITERATIONS`).
        mse_grid: ``clip="mse"``: shrink factors per range family (None: the kernel's default, 9).
        importance: float64 [K], E[x_k^2] of the layer's input channels when the error weight uses it
            (else None; not in the JSON).
        hessian: ``X^T X`` [K, K] of its input for GPTQ (super-activation channels zeroed: they leave the
            MatMul), else None (not in the JSON).
        compute_dtype: the float type the layer multiplies in (ONNX element type).
        float_bytes: bytes of the float weight; quantized_bytes, quantized_node: written by the passes.
        bits_per_weight: `layer_bits` over ``k * n``: codes, scales, zero points and the float side paths
            (kept-out weights, super-activation rows), as the passes write them (0 when skipped).
    """

    node: str
    op_type: str
    initializer: str
    position: int
    layer: int | None
    k: int
    n: int
    is_lm_head: bool = False
    action: str = "quantized"
    reason: str = ""
    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    clip: str = "mse"
    zscore: float | None = None
    form: str | None = None
    lift_3d: bool = False
    accuracy_level: int | None = None
    kept: list[dict] = field(default_factory=list)
    side_keep: list[tuple[int, int, float]] = field(default_factory=list)
    sa_channels: list[int] = field(default_factory=list)
    activation: ActivationPlan | None = None
    error_weight: str = "x2"
    refit: int = 0
    mse_grid: int | None = None
    importance: np.ndarray | None = None
    hessian: np.ndarray | None = None
    compute_dtype: int | None = None
    float_bytes: int = 0
    quantized_bytes: int = 0
    quantized_node: str | None = None
    written: dict[str, str] = field(default_factory=dict)  # part -> initializer name, by the weight pass

    @property
    def quantized(self) -> bool:
        return self.action == "quantized"

    @property
    def bits_per_weight(self) -> float:
        return sum(layer_bits(self).values()) / (self.k * self.n) if self.quantized else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        for internal in ("side_keep", "compute_dtype", "lift_3d", "importance", "written", "hessian"):
            d.pop(internal)
        d["bits_per_weight"] = round(self.bits_per_weight, 4)
        d["bit_count"] = layer_bits(self) if self.quantized else None
        return {**{k: d.pop(k) for k in _V1_FIELDS}, **d}


@dataclass
class EmbeddingPlan:
    """An embedding table's plan: ``Gather(table, ids)`` -> ``com.microsoft::GatherBlockQuantized``.

    Attributes:
        initializer: the table; nodes: the Gathers reading it; vocab, hidden: its shape.
        bits, block_size, symmetric: its quantizer (blocks along hidden).
        shared_with: the lm_head node whose MatMulNBits codes, scales and zero points it reads (a tied
            table), else None (its own tensors).
        compute_dtype: the table's float type (ONNX element type): the scales' and the output's.
        reason: how it is quantized.
        transposed: the initializer is [hidden, vocab], read through a Transpose (`EmbeddingTable.transpose`).
    """

    initializer: str
    nodes: list[str]
    vocab: int
    hidden: int
    bits: int
    block_size: int
    symmetric: bool
    shared_with: str | None = None
    compute_dtype: int = int(ir.DataType.FLOAT)
    reason: str = ""
    transposed: bool = False

    @property
    def weights(self) -> int:
        """Parameters this plan adds to the count: 0 for a table shared with (counted as) the lm_head."""
        return 0 if self.shared_with else self.vocab * self.hidden

    def bit_count(self) -> dict[str, int]:
        """Bits written for the table (none when shared: the lm_head's are counted there)."""
        if self.shared_with:
            return {"codes": 0, "scales": 0, "zero_points": 0, "side": 0}
        nb = -(-self.hidden // self.block_size)
        zp = 0 if self.symmetric else self.vocab * (-(-nb // 2) * 8 if self.bits == 4 else nb * 8)
        return {"codes": self.vocab * -(-self.hidden * self.bits // 8) * 8,
                "scales": self.vocab * nb * _FLOAT_BITS.get(self.compute_dtype, 32), "zero_points": zp, "side": 0}

    def to_dict(self) -> dict:
        return {**asdict(self), "bits_per_weight": round(sum(self.bit_count().values()) / self.weights, 4)
                if self.weights else None, "bit_count": self.bit_count()}


@dataclass
class QuantPlan:
    """Every linear layer's `LayerPlan`, in topological order, and what the plan could not use.

    Attributes:
        format: ``"qdq"`` or ``"nbits"`` (the W8A8 plan is ``"qdq"`` with form ``"w8a8"`` layers).
        layers: one plan per linear layer.
        unused_keep: keep coordinates that match no quantized layer.
        embeddings: the embedding tables to quantize (``embedding_bits``).
    """

    format: str
    layers: list[LayerPlan]
    unused_keep: list[Coordinate] = field(default_factory=list)
    embeddings: list[EmbeddingPlan] = field(default_factory=list)

    @property
    def quantized(self) -> list[LayerPlan]:
        return [p for p in self.layers if p.quantized]

    def by_node(self) -> dict[str, LayerPlan]:
        return {p.node: p for p in self.layers}

    def lines(self) -> list[str]:
        """One line per layer: what happens to it and why (the summary's table)."""
        return [f"{p.node}: {p.action} ({p.reason})" for p in self.layers]


def block_label(block_size: int) -> str:
    """``"b32"``, or ``"per-channel"`` for `PER_CHANNEL`."""
    return "per-channel" if block_size == PER_CHANNEL else f"b{block_size}"


def kernel_block_size(block_size: int, k: int, form: str) -> int:
    """The kernel's block size for a layer of depth `k`: `block_size`, or for per-channel `k` (QDQ
    ``axis=1``) or, for MatMulNBits written directly, the next power of two >= max(k, 16): one padded block
    per column, the same codes and scales as per-channel."""
    if block_size != PER_CHANNEL:
        return block_size
    if form != "nbits":
        return k
    return max(16, 1 << (k - 1).bit_length())


_FLOAT_BITS = {int(ir.DataType.FLOAT): 32, int(ir.DataType.FLOAT16): 16, int(ir.DataType.BFLOAT16): 16}


def layer_bits(p: LayerPlan) -> dict[str, int]:
    """The bits a quantized layer costs, as the passes write them: ``codes``, ``scales``, ``zero_points``
    (padding of the nbits layout included) and ``side`` (float side paths: the kept-out weights' matrix and
    column indices, and the super-activation rows ``[len(sa_channels), N]``).

    Bits per weight = their sum over ``k * n``: what an equal-bits comparison counts.
    """
    k, n, bits = p.k, p.n, p.bits
    float_bits = _FLOAT_BITS.get(p.compute_dtype or int(ir.DataType.FLOAT), 32)
    if p.form == "w8a8":
        scale_bits, nblocks, code_bits = 32, 1, 8 * k * n
    else:
        bs = kernel_block_size(p.block_size, k, p.form or "qdq")
        nblocks, scale_bits = -(-k // bs), float_bits
        code_bits = n * nblocks * bs * bits if p.form == "nbits" else k * n * bits
    zp_bits = 0
    if not p.symmetric:
        zp_bits = n * -(-nblocks // 2) * 8 if p.form == "nbits" and bits == 4 else n * nblocks * (4 if bits == 4 else 8)
        if p.form == "w8a8":
            zp_bits = 8 * n
    cols = len({c for c, _, _ in p.side_keep})
    side = cols * (n * float_bits + 64) + len(p.sa_channels) * n * float_bits
    if p.activation is not None and p.activation.channels:  # W8A8's float rows of the restored entries
        side += len(p.activation.channels) * n * 32
    return {"codes": code_bits, "scales": n * nblocks * scale_bits, "zero_points": zp_bits, "side": side}


# ----------------------------------------------------------------------------------------------
# Building the plan


@dataclass
class _Context:
    """What the planner reads besides the layer itself."""

    config: QuantizeConfig
    lm_head: LinearLayer | None
    keep_by_initializer: dict[str, list[tuple[int, ...]]]
    channels: dict[str, list[int]]
    ranges: Mapping[str, InputRange]
    importance: Mapping[str, InputImportance]
    hessians: Mapping[str, np.ndarray]
    accuracy_levels: Mapping[str, int]
    types: Mapping[str, tuple[int, int | None]]


def build_quant_plan(
    model: ir.Model,
    config: QuantizeConfig,
    *,
    keep: Sequence[Coordinate] = (),
    ranges: Mapping[str, InputRange] | None = None,
    importance: Mapping[str, InputImportance] | None = None,
    accuracy_levels: Mapping[str, int] | None = None,
    types: Mapping[str, tuple[int, int | None]] | None = None,
    sensitivity: Mapping[str, float] | None = None,
    hessians: Mapping[str, np.ndarray] | None = None,
) -> QuantPlan:
    """Decide every linear layer's quantization.

    Raises:
        UsageError: a bad configuration (`QuantizeConfig.validate`).

    Args:
        model: the float model, at the opset the passes will write (after `UpgradeOpsetPass` for QDQ).
        config: the settings.
        keep: super weights to keep exact.
        ranges: ``{input value name: InputRange}`` (super-activation channels; W8A8 ranges).
        importance: ``{input value name: InputImportance}`` (error weights ``x2``/``w2x2``; a layer
            without an entry gets uniform importance).
        accuracy_levels: nbits: ``accuracy_level`` per node name (default 4).
        types: ``{value name: (elem type, rank)}`` for activations the graph does not declare
            (`sw_onnx.shapes.value_types`); computed here when needed and not given.
        sensitivity: ``{node: KL}`` of each layer's int4 rounding on the prompt (bit allocation).
        hessians: ``{input value name: X^T X}`` (``gptq``).
    """
    config.validate()
    layers, _ = find_linear_layers(model)
    if types is None:
        types = {}
        if any(layer.input.shape is None or layer.input.dtype is None for layer in layers):
            from sw_onnx.shapes import value_types

            types = value_types(model)
    by_init: dict[str, list[tuple[int, ...]]] = {}
    for name, index in keep:
        by_init.setdefault(name, []).append(tuple(index))
    w8a8 = config.activations == "int8"
    channels = {} if w8a8 or not config.sa_keep_out else _channels_by_node(ranges or {})
    ctx = _Context(config, find_lm_head(model, layers), by_init, channels, ranges or {}, importance or {},
                   hessians or {}, accuracy_levels or {}, types)
    plans = [(_plan_w8a8 if w8a8 else _plan_weight_only)(layer, ctx) for layer in layers]
    embeddings = _plan_embeddings(model, plans, config) if config.embedding_table_bits and not w8a8 else []
    if config.allocates:
        allocate_bits(plans, {layer.name: layer for layer in layers}, ctx.importance, config, fixed=embeddings,
                      sensitivity=sensitivity)
    _share_tables(embeddings, {p.node: p for p in plans}, config)
    used = {(p.initializer, tuple(k["index"])) for p in plans if p.quantized for k in p.kept}
    unused = [(name, tuple(index)) for name, index in keep if (name, tuple(index)) not in used]
    return QuantPlan(format=config.format, layers=plans, unused_keep=unused, embeddings=embeddings)


def _plan_embeddings(model: ir.Model, plans: Sequence[LayerPlan], config: QuantizeConfig) -> list[EmbeddingPlan]:
    """One plan per embedding table (`find_embeddings`). A table read by anything but Gathers and the
    quantized lm_head's weight chain stays float (its other readers need the float values)."""
    heads = {p.initializer: p for p in plans if p.is_lm_head and p.quantized and p.op_type == "MatMul" and not p.side_keep}
    out = []
    for table in find_embeddings(model):
        name = table.initializer.name
        head = heads.get(name) or _equal_head(table, heads, model)
        if table.other_uses and (head is None or not _only_feeds(table, head.node)):
            continue
        out.append(EmbeddingPlan(
            initializer=name, nodes=[g.name for g in table.gathers], vocab=table.vocab, hidden=table.hidden,
            bits=config.embedding_table_bits, block_size=config.lm_head_block_size, symmetric=config.symmetric,
            shared_with=head.node if head is not None else None, compute_dtype=int(table.initializer.dtype),
            transposed=table.transpose is not None))
    return out


def _equal_head(table: EmbeddingTable, heads: Mapping[str, LayerPlan], model: ir.Model) -> LayerPlan | None:
    """The quantized lm_head whose own weight [hidden, vocab] holds the table's values transposed: a tie the
    export wrote as two copies (Gemma-3 through optimum), shared like one. Compared in vocab chunks."""
    if table.transpose is not None:
        return None
    for name, head in heads.items():
        weight = model.graph.initializers.get(name)
        if weight is None or weight.const_value is None or weight.shape is None or \
                tuple(weight.shape) != (table.hidden, table.vocab) or weight.dtype != table.initializer.dtype:
            continue
        a, b = table.initializer.const_value.numpy(), weight.const_value.numpy()  # [V, H], [H, V]
        step = max(1, (1 << 22) // max(1, table.hidden))  # vocab rows per chunk: each read once, in long runs
        if all(np.array_equal(a[i:i + step], b[:, i:i + step].T) for i in range(0, table.vocab, step)):
            return head
    return None


def _only_feeds(table: EmbeddingTable, lm_head_node: str) -> bool:
    """Whether the table's non-Gather readers are a Transpose/Cast/Identity chain ending in the lm_head."""
    for node in table.other_uses:
        while node.op_type in ("Transpose", "Cast", "Identity") and len(node.outputs[0].uses()) == 1:
            node = next(iter(node.outputs[0].uses())).node
        if node.name != lm_head_node:
            return False
    return True


def _share_tables(embeddings: list[EmbeddingPlan], plans: Mapping[str, LayerPlan], config: QuantizeConfig) -> None:
    """A tied table shares the lm_head's codes when they are at the same bits (with a budget: always), the
    lm_head then written as MatMulNBits; otherwise it gets its own."""
    for e in embeddings:
        head = plans.get(e.shared_with) if e.shared_with else None
        if head is None or not (config.allocates or head.bits == e.bits) or e.hidden % head.block_size:
            e.shared_with = None  # (MatMulNBits pads a ragged last block; GatherBlockQuantized's rows are not)
        else:
            e.bits, e.block_size = head.bits, head.block_size
            head.form, head.lift_3d, head.accuracy_level = "nbits", False, 4
            head.reason += "; its table is shared with the embedding (GatherBlockQuantized), so MatMulNBits"
        kind = f"{'int' if e.symmetric else 'uint'}{e.bits} {block_label(e.block_size)} along hidden"
        e.reason = f"GatherBlockQuantized {kind}" + (f", codes shared with {e.shared_with}" if e.shared_with else "")


def _channels_by_node(ranges: Mapping[str, InputRange]) -> dict[str, list[int]]:
    return {node: sorted({int(c) for c in r.channels}) for r in ranges.values() if r.channels for node in r.nodes}


def _new_plan(layer: LinearLayer, ctx: _Context) -> LayerPlan:
    init = layer.weight.initializer
    return LayerPlan(
        node=layer.name, op_type=layer.node.op_type, initializer=init.name, position=layer.position,
        layer=layer.layer, k=layer.k, n=layer.n, is_lm_head=layer is ctx.lm_head,
        float_bytes=layer.k * layer.n * (max(1, int(init.dtype.itemsize)) if init.dtype is not None else 4),
    )


def _skip_reason(layer: LinearLayer, ctx: _Context, *, lm_head_quantized: bool) -> str | None:
    """Why a layer stays float, from the options and its weight type (None: it is quantized)."""
    for pattern in ctx.config.exclude:
        if fnmatch.fnmatchcase(layer.name, pattern):
            return f"excluded by pattern {pattern!r}"
    if layer is ctx.lm_head and not ctx.config.include_lm_head and not lm_head_quantized:
        return "lm_head (its output is the logits) kept float: include_lm_head is off"
    dtype = layer.weight.initializer.dtype
    if dtype not in _FLOAT_WEIGHTS:
        return f"weight is {dtype}, not floating point"
    return None


def _plan_weight_only(layer: LinearLayer, ctx: _Context) -> LayerPlan:
    plan, config = _new_plan(layer, ctx), ctx.config
    compute = _compute_dtype(layer, ctx.types)
    plan.compute_dtype = int(compute) if compute is not None else None
    plan.sa_channels = _sa_channels(layer, ctx)
    alpha, beta, bias = gemm_parameters(layer.node)
    reason = _skip_reason(layer, ctx, lm_head_quantized=bool(config.lm_head_bits))
    if reason is None and compute not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        reason = f"activations are {compute}: MatMulNBits needs float or float16"
    if reason is None and bias is not None and beta != 1.0 and bias.const_value is None:
        reason = f"Gemm with beta={beta} on a non-constant C"
    if reason is not None:
        plan.action, plan.reason = "skipped", reason
        return plan
    own_bits = plan.is_lm_head and not config.include_lm_head and not config.allocates  # with lm_head_bits only
    plan.bits, plan.block_size = (config.lm_head_bits, config.lm_head_block_size) if own_bits else (config.bits, config.block_size)
    plan.symmetric, plan.clip, plan.zscore = config.symmetric, config.clip, config.zscore
    if own_bits and plan.bits == 8 and config.clip == "mse" and not LM_HEAD_INT8_SEARCH:
        plan.clip = "none"
    plan.error_weight = config.error_weight
    plan.refit = MSE_REFIT_ITERATIONS if plan.clip == "mse" and plan.bits == 4 else 0  # int8: its error is ~1/300
    plan.mse_grid = MSE_GRID_WITH_REFIT if plan.refit else None
    if config.uses_importance:
        plan.importance = _importance(layer, ctx)
    _plan_keep(plan, layer, ctx, alpha)
    if config.gptq:
        plan.hessian = _hessian(layer, plan.sa_channels, ctx)
    wrap = config.format == "qdq" and _rank(layer.input, ctx.types) != 3 and (
        bool(plan.side_keep) or (bias is not None and bias.const_value is None)
        or bool(plan.sa_channels) or _feeds_nonconstant_add(layer.output))  # the keep-out side path adds one
    # onnxruntime's QDQ -> MatMulNBits fusion cannot reach a branch's outer-scope weights: write MatMulNBits.
    in_branch = config.format == "qdq" and bool(layer.scope)
    if config.format == "nbits" or in_branch:
        plan.form, wrap = "nbits", False
        plan.accuracy_level = 4 if own_bits or plan.is_lm_head else ctx.accuracy_levels.get(layer.node_name, 4)
    else:
        plan.form, plan.lift_3d = ("qdq-3d", True) if wrap else ("qdq", False)
    plan.reason = _describe(plan, wrap) + ("; the lm_head's own bits (lm_head_bits)" if own_bits else "")
    if in_branch:
        plan.reason += "; MatMulNBits written directly (inside a subgraph, where onnxruntime does not fuse QDQ)"
    if plan.sa_channels:
        plan.reason += f", super-activation input channels {plan.sa_channels} kept out (float side path)"
    return plan


def _sa_channels(layer: LinearLayer, ctx: _Context) -> list[int]:
    """The layer's super-activation input channels that the keep-out pass takes out (it skips the lm_head,
    excluded and non-float layers, and channels outside K)."""
    channels = ctx.channels.get(layer.node_name, [])  # by the node's own name: both branches of an If
    if not channels or _skip_reason(layer, ctx, lm_head_quantized=False) is not None:
        return []
    if any(not 0 <= c < layer.k for c in channels) or _activation_dtype(layer) not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        return []
    return list(channels)


def _importance(layer: LinearLayer, ctx: _Context) -> np.ndarray | None:
    """E[x_k^2] of the layer's input, or None (uniform) when it was not measured for this input."""
    entry = ctx.importance.get(layer.input.name)
    if entry is None or entry.k != layer.k:
        return None
    return entry.mean_sq(skip_first=IMPORTANCE_SKIP_FIRST)


def _hessian(layer: LinearLayer, sa_channels: Sequence[int], ctx: _Context) -> np.ndarray | None:
    """The layer input's ``X^T X`` with its super-activation channels zeroed (they leave the MatMul)."""
    h = ctx.hessians.get(layer.input.name)
    if h is None or h.shape != (layer.k, layer.k):
        return None
    if sa_channels:
        h = np.array(h)
        h[sa_channels, :] = 0.0
        h[:, sa_channels] = 0.0
    return h


def _plan_keep(plan: LayerPlan, layer: LinearLayer, ctx: _Context, alpha: float) -> None:
    """Fill `kept` and `side_keep` from the keep coordinates on this layer's initializer."""
    indices = ctx.keep_by_initializer.get(plan.initializer, [])
    if not indices:
        return
    stored = layer.weight.initializer.const_value.numpy()
    act_np = np.float16 if _activation_dtype(layer) == ir.DataType.FLOAT16 else np.float32
    on_side, on_rows = [], []
    for index in indices:
        k, n = layer.weight.initializer_to_effective_index(index)
        value = float(np.asarray(stored[index], dtype=np.float64)) * alpha
        if k in plan.sa_channels:  # its whole row is exact on the keep-out side path already
            on_rows.append({"index": list(index), "k": k, "n": n, "value": float(act_np(value))})
        else:
            plan.side_keep.append((k, n, value))
            on_side.append({"index": list(index), "k": k, "n": n, "value": value})
    plan.kept = on_side + on_rows


def _plan_w8a8(layer: LinearLayer, ctx: _Context) -> LayerPlan:
    plan, config = _new_plan(layer, ctx), ctx.config
    reason = _skip_reason(layer, ctx, lm_head_quantized=False)
    if reason is None and _activation_dtype(layer) != ir.DataType.FLOAT:
        reason = f"activations are {_activation_dtype(layer)}: W8A8 here takes float32 activations"
    r = ctx.ranges.get(layer.input.name)
    if reason is None and r is None:
        reason = "no calibration statistics for its input"
    if reason is not None:
        plan.action, plan.reason = "skipped", reason
        return plan
    alpha, _, _ = gemm_parameters(layer.node)
    plan.bits, plan.block_size, plan.symmetric, plan.clip, plan.zscore = 8, PER_CHANNEL, config.symmetric, config.clip, config.zscore
    plan.form, plan.compute_dtype = "w8a8", int(ir.DataType.FLOAT)
    plan.lift_3d = _rank(layer.input, ctx.types) == 2
    handled = config.sa_keep_out and bool(r.channels)
    rng = r.handled_range if handled else r.naive_range
    plan.activation = ActivationPlan(rng, r.naive_range, list(r.channels) if handled else [], r.median)
    _plan_keep(plan, layer, ctx, alpha)
    act = f"int8 activations per tensor, range {rng:.4g}"
    if handled:
        act += f" (naive {r.naive_range:.4g}; super-activation channels {r.channels} restored exactly beyond it)"
    kept = [f"{len(plan.side_keep)} kept out"] if plan.side_keep else []
    plan.reason = ", ".join([f"{'int' if plan.symmetric else 'uint'}8 per-channel, clip {plan.clip}", act] + kept)
    return plan


def _describe(plan: LayerPlan, wrap: bool) -> str:
    parts = [f"{'int' if plan.symmetric else 'uint'}{plan.bits} {block_label(plan.block_size)}", f"clip {plan.clip}"]
    if plan.hessian is not None:
        parts.append("GPTQ")
    if plan.clip == "mse" and plan.error_weight != "w2":
        parts.append(f"error weight {plan.error_weight}" + ("" if plan.importance is not None else " (no importance: uniform)"))
    if plan.op_type == "Gemm":
        parts.append("Gemm rewritten as MatMul")
    if plan.side_keep:
        parts.append(f"{len(plan.side_keep)} kept out")
    if wrap:
        parts.append("2-D activations lifted to 3-D so MatMul+Add does not become Gemm")
    if plan.accuracy_level is not None:
        parts.append(f"accuracy_level {plan.accuracy_level}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# Bit allocation: per-layer bits (and blocks) within a budget of bits per weight

ALLOCATION_DAMAGE = "measured"
"""How the ``damage`` allocation compares layers: ``"relative"`` (each option's importance-weighted squared
rounding error over the layer's importance-weighted squared weights: the relative output error, as HIGGS'
linearity uses), ``"absolute"`` (the error itself) or ``"measured"`` (the KL its int4 rounding causes on the
prompt, `sw_onnx.analyze.sensitivity.layer_sensitivity`, scaled per option by the error relative to int4)."""
_SMALLEST_BLOCK = 32


@dataclass
class _Option:
    bits: int
    block_size: int
    cost: int  # bits, `layer_bits`
    damage: float = 0.0
    relative: float = 0.0


def allocate_bits(plans: Sequence[LayerPlan], layers: Mapping[str, LinearLayer],
                  importance: Mapping[str, InputImportance], config: QuantizeConfig,
                  fixed: Sequence[EmbeddingPlan] = (), sensitivity: Mapping[str, float] | None = None) -> None:
    """Set each quantized layer's ``bits``/``block_size`` within ``config.bits_per_weight`` (see
    `QuantizeConfig.allocation`); every layer starts at ``config.bits``/``config.block_size``. `fixed`:
    embedding tables counted in the budget at their own bits (a table tied to the lm_head counts as it).
    `sensitivity`: measured KL per layer at int4 (`ALLOCATION_DAMAGE` ``"measured"``).

    Raises:
        UsageError: a budget below what every layer at its cheapest option costs.
    """
    from sw_onnx.errors import UsageError

    cands = [p for p in plans if p.quantized and p.form in ("qdq", "qdq-3d", "nbits")]
    untied = [e for e in fixed if not e.shared_with]
    weights = sum(p.k * p.n for p in cands) + sum(e.weights for e in untied)
    base = sum(_cost(p, p.bits, p.block_size) for p in cands) + sum(sum(e.bit_count().values()) for e in untied)
    budget = float("inf") if config.bits_per_weight is None else config.bits_per_weight * weights
    if config.bits_per_weight is not None and budget < base:
        raise UsageError(f"--bits-per-weight {config.bits_per_weight}: int{config.bits} "
                         f"{block_label(config.block_size)} alone costs {base / weights:.4g} bits per weight here",
                         hint="raise the budget or the --block-size")
    if config.allocation == "kquant":
        choice = _kquant_choice(cands, budget - base)
    else:
        options = {p.node: _options(p, layers[p.node], importance) for p in cands}
        _set_damage(options, sensitivity or {})
        choice = _damage_choice(cands, options, budget - base)
    for p in cands:
        bits, block = choice.get(p.node, (p.bits, p.block_size))
        if (bits, block) != (p.bits, p.block_size):
            p.bits, p.block_size = bits, block
            p.reason = f"{'int' if p.symmetric else 'uint'}{bits} {block_label(block)} (bit allocation: " \
                       f"{config.allocation}); " + p.reason
        if p.form == "nbits" and bits == 8:
            p.accuracy_level = 4  # MatMulNBits' 8-bit kernel: levels 0-3 fall back to a slow path


def _cost(p: LayerPlan, bits: int, block_size: int) -> int:
    from dataclasses import replace

    return sum(layer_bits(replace(p, bits=bits, block_size=block_size)).values())


def _options(p: LayerPlan, layer: LinearLayer, importance: Mapping[str, InputImportance]) -> list[_Option]:
    """The layer's options, cheapest first: int4 at its block and each smaller power of two down to 32, and
    int8 at its block; each with its estimated damage (round-to-nearest error, importance-weighted)."""
    from sw_onnx.kernels import dequantize_blockwise, quantize_blockwise

    entry = importance.get(layer.input.name)
    imp = entry.mean_sq(skip_first=IMPORTANCE_SKIP_FIRST) if entry is not None and entry.k == p.k else np.ones(p.k)
    w = layer.weight.effective_weight().astype(np.float32)
    blocks = [p.block_size] if p.block_size == PER_CHANNEL else [b for b in (p.block_size, p.block_size // 2,
              p.block_size // 4, p.block_size // 8) if b >= _SMALLEST_BLOCK] or [p.block_size]
    menu = [(p.bits, b) for b in blocks] + [(8, p.block_size)]
    signal = float(imp @ np.square(w, dtype=np.float64).sum(axis=1)) or 1.0
    options = []
    for bits, block in menu:
        kernel_block = kernel_block_size(block, p.k, p.form) or None
        q = quantize_blockwise(w, bits=bits, block_size=kernel_block, symmetric=p.symmetric)
        err = np.square(w - dequantize_blockwise(q), dtype=np.float64).sum(axis=1)
        if p.sa_channels:
            err[p.sa_channels] = 0.0  # those rows stay float
        options.append(_Option(bits, block, _cost(p, bits, block), float(imp @ err), float(imp @ err) / signal))
    return sorted(options, key=lambda o: o.cost)


def _set_damage(options: Mapping[str, list[_Option]], sensitivity: Mapping[str, float]) -> None:
    """Each option's damage by `ALLOCATION_DAMAGE` (measured: KL at the base option times the option's error
    over the base's; a layer not measured gets the median KL per unit of relative error)."""
    if ALLOCATION_DAMAGE == "absolute":
        return
    per_unit = [sensitivity[node] / opts[0].relative for node, opts in options.items()
                if node in sensitivity and opts[0].relative > 0]
    fallback = float(np.median(per_unit)) if per_unit else 1.0
    for node, opts in options.items():
        base = opts[0].damage
        for o in opts:
            if ALLOCATION_DAMAGE == "relative" or not sensitivity:
                o.damage = o.relative
            elif node in sensitivity and base > 0:
                o.damage = sensitivity[node] * o.damage / base
            else:
                o.damage = fallback * o.relative


def _damage_choice(cands: Sequence[LayerPlan], options: Mapping[str, list[_Option]], spare: float) -> dict:
    """Multiple-choice knapsack, greedy on each layer's lower convex hull of (cost, damage): the steps of
    largest damage saved per extra bit first, each taken when it fits what is left of the budget."""
    steps = []
    for p in cands:
        hull = _hull(options[p.node])
        for i in range(1, len(hull)):
            extra = hull[i].cost - hull[i - 1].cost
            steps.append(((hull[i - 1].damage - hull[i].damage) / max(extra, 1), p.node, i, extra, hull))
    steps.sort(key=lambda s: -s[0])
    at: dict[str, int] = {}
    choice = {}
    for _, node, i, extra, hull in steps:
        if at.get(node, 0) != i - 1 or extra > spare:
            continue
        spare -= extra
        at[node] = i
        choice[node] = (hull[i].bits, hull[i].block_size)
    return choice


def _hull(options: list[_Option]) -> list[_Option]:
    """The lower convex hull of (cost, damage), cheapest first, damage strictly falling."""
    hull: list[_Option] = []
    for o in options:
        if hull and o.damage >= hull[-1].damage:
            continue
        while len(hull) >= 2 and ((hull[-1].damage - o.damage) * (hull[-1].cost - hull[-2].cost)
                                  >= (hull[-2].damage - hull[-1].damage) * (o.cost - hull[-1].cost)):
            hull.pop()
        hull.append(o)
    return hull


_QKV = re.compile(r"(^|[/._])(q|k|v|qkv)_proj|attn_(q|k|v|qkv)([/._]|$)")
_DOWN = re.compile(r"down_proj|ffn_down")


def kquant_layers(plans: Sequence[LayerPlan]) -> list[LayerPlan]:
    """llama.cpp's use_more_bits rule as onnxruntime-genai's k_quant_mixed applies it, in its order: the
    lm_head, then for each decoder layer i (ascending) with i < n/8, i >= 7n/8 or (i - round(n/8)) % 3 == 2,
    its q/k/v (fused qkv) projections and its down projection. Roles and indices come from node names."""
    indexed = [p for p in plans if p.layer is not None]
    n = max((p.layer for p in indexed), default=-1) + 1
    chosen = [p for p in plans if p.is_lm_head]
    for i in range(n):
        if i < n / 8 or i >= 7 * n / 8 or (i - round(n / 8)) % 3 == 2:
            chosen += [p for p in indexed if p.layer == i and _QKV.search(p.node)]
            chosen += [p for p in indexed if p.layer == i and _DOWN.search(p.node)]
    return chosen


def _kquant_choice(cands: Sequence[LayerPlan], spare: float) -> dict:
    choice = {}
    for p in kquant_layers(cands):
        extra = _cost(p, 8, p.block_size) - _cost(p, p.bits, p.block_size)
        if extra <= spare:
            spare -= extra
            choice[p.node] = (8, p.block_size)
    return choice


# ----------------------------------------------------------------------------------------------
# Facts about a layer's graph neighbourhood that the plan depends on


def gemm_parameters(node: ir.Node) -> tuple[float, float, ir.Value | None]:
    """(alpha, beta, C) of a Gemm; (1, 1, None) for a MatMul."""
    if node.op_type != "Gemm":
        return 1.0, 1.0, None
    alpha, beta = node.attributes.get("alpha"), node.attributes.get("beta")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return (alpha.as_float() if alpha is not None else 1.0), (beta.as_float() if beta is not None else 1.0), bias


def _activation_dtype(layer: LinearLayer) -> ir.DataType:
    for value in (layer.input, layer.output):
        if value.dtype is not None:
            return value.dtype
    return ir.DataType.FLOAT


def _compute_dtype(layer: LinearLayer, types: Mapping[str, tuple[int, int | None]]) -> ir.DataType | None:
    """The float type the layer multiplies in: its activation's type, else the weight chain's last Cast."""
    for value in (layer.input, layer.output):
        if value.dtype is not None:
            return value.dtype
        if value.name in types and types[value.name][0]:
            return ir.DataType(types[value.name][0])
    value = layer.node.inputs[1]
    while value is not None and value.const_value is None:
        producer = value.producer()
        if producer is None:
            break
        if producer.op_type == "Cast":
            return ir.DataType(producer.attributes["to"].as_int())
        value = producer.inputs[0]
    return layer.weight.initializer.dtype


def _rank(value: ir.Value, types: Mapping[str, tuple[int, int | None]]) -> int | None:
    """3 for rank >= 3, else the known rank, else None."""
    rank = len(value.shape) if value.shape is not None else types.get(value.name, (0, None))[1]
    return None if rank is None else min(rank, 3)


def _feeds_nonconstant_add(value: ir.Value) -> bool:
    """Whether an Add of two activations reads `value` (onnxruntime would fuse a 2-D MatMul into a Gemm)."""
    for use in value.uses():
        node = use.node
        if node.op_type == "Add" and all(i is not None and i.const_value is None for i in node.inputs):
            return True
    return False
