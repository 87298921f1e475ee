"""An "off the grid" copy of an exported decoder: the same function, its weights off the GGUF's 4-bit grid.

Why (issue 13, docs/findings.md): the real test models are dequantized GGUFs. SmolLM2's weights are Q4_1,
``d*q + m`` with q in 0..15 in blocks of 32 along K, so a blockwise asymmetric int4 quantizer with blocks of 32
recovers them almost exactly and looks far better than it is. This module permutes the K axis of every linear
layer consistently with whatever produces that axis, so each new block of 32 mixes weights of different GGUF
blocks while the network computes the same function (up to fp32 summation order):

- **residual stream**: one permutation of the hidden axis, applied to every tensor aligned with it: the
  embedding table's columns, every norm weight on the stream (also behind ``1 + w`` as Gemma writes it), the K
  rows of every linear layer reading the stream (q/k/v/gate/up/lm_head), the N columns of every one writing it
  (o_proj/down_proj, also through Gemma's post-norms);
- **MLP width**: one permutation per layer (gate/up columns, down_proj rows);
- **attention values**: per kv head, a permutation of that head's v_proj columns, applied to the o_proj rows
  of every q head that reads it (grouped-query: q head j reads kv head ``j // (heads / kv_heads)``).
  q/k columns are never permuted (RoPE pairs them; q/k norms are per head dimension). A permutation across
  heads would not preserve attention, so an o_proj block of 32 mixes only ``head_dim / 32`` GGUF blocks
  (SmolLM2: 2, Gemma-3: 8); every other layer's K axis is permuted across all of it.

Found **by structure**, not by names: tensors whose last axis is elementwise-aligned (Add, Mul, Div, Pow, Cast,
... and norm ops; a reduction over the last axis, e.g. RMSNorm's ReduceMean, is invariant) are joined with a
union-find from onnx shape inference; a group is permuted when every op touching it is one whose result the
permutation provably preserves (elementwise, last-axis reductions, Shape, MatMul with a constant weight on
either side, the embedding Gather); a group reaching anything else (Reshape into heads, a graph output...) is
left alone. The residual group is the one holding the embedding Gather's output. The lm_head tied to the
embedding (optimum writes ``MatMul(x, Transpose(embed_tokens))``) follows the table's column permutation
through the Transpose; a separate lm_head initializer is permuted as any layer reading the stream. The value
path is followed from each attention's ``Softmax -> MatMul(P, V)`` back to its v_proj and forward to its
o_proj; head counts come from config.json beside the model (``num_attention_heads``, ``num_key_value_heads``,
``head_dim``) and are checked against the weight shapes.

Convention (``permutation.json``): ``new_to_old[i]`` is the old index of new channel i (new tensor
``W_new[..., i] = W_old[..., new_to_old[i]]``), ``old_to_new`` its inverse. A super weight at torch ``[row,
col]`` of layer L's down_proj moves to ``[residual.old_to_new[row], mlp[L].old_to_new[col]]``; a super
activation in hidden channel c moves to ``residual.old_to_new[c]``.

Output folder (default ``$SW_ONNX_CACHE`` or ``~/.cache/sw-onnx``, then ``/<source>-offgrid-s<seed>``)::

    model.onnx (+ model.onnx.data above 1.8 GB of weights)
    permutation.json      the permutations, see above
    config.json, tokenizer.json, ...   copied from the source folder
    .complete             JSON marker written last: source, seed, verification figures

Built once (``.complete``), in a temporary folder beside the output renamed into place at the end, under a
lock; before publishing, the logits of the copy are compared with the source's on real text (ORT, fp32) and
the build fails above ``LOGITS_TOLERANCE``.

CLI: ``python sample_models/offgrid.py [SOURCE_DIR] [--seed 0] [--out DIR] [--tokens 256]``
(SOURCE_DIR default: the SmolLM2 export, exported if missing). Python: ``make_offgrid(source, seed=0)``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:  # as a module (python -m sample_models.offgrid, tests) or as a script (python sample_models/offgrid.py)
    from sample_models.export_smollm2 import _file_lock, cache_root
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from sample_models.export_smollm2 import _file_lock, cache_root

MARKER = ".complete"
MARKER_FORMAT = 1
PERMUTATION_FILE = "permutation.json"
LOGITS_TOLERANCE = 2e-2  # max |logit diff| allowed between source and copy (fp32 summation order only)
EXTERNAL_DATA_ABOVE = 1_800_000_000  # bytes of weights above which model.onnx gets a model.onnx.data
SKIP_COPY = {"model.onnx", "model.onnx_data", "model.onnx.data", MARKER, PERMUTATION_FILE}

ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "Sum", "Mean",
    "Cast", "Identity", "Neg", "Sqrt", "Reciprocal", "Sigmoid", "Tanh", "Erf", "Relu", "Exp", "Log", "Abs",
    "Softplus", "Softsign", "Gelu", "FastGelu", "QuickGelu", "HardSigmoid", "HardSwish", "Mish", "Elu",
    "Celu", "Selu", "LeakyRelu", "Clip", "Round", "Floor", "Ceil", "Sign", "IsNaN", "IsInf", "Not",
    "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "BitShift", "Mod",
}
LAST_AXIS_NORMS = {"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
                   "SkipLayerNormalization", "SkipSimplifiedLayerNormalization"}
REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceL1", "ReduceMax", "ReduceMin",
              "ReduceProd", "ReduceLogSumExp"}
WEIGHT_CHAIN = {"Transpose", "Cast", "Identity"}  # ops a MatMul weight may sit behind
DATA_MOVEMENT = {"Reshape", "Transpose", "Expand", "Unsqueeze", "Squeeze", "Concat", "Cast", "Identity",
                 "Tile", "Flatten"}  # what may lie between v_proj, P @ V and o_proj


class OffgridError(RuntimeError):
    """The graph cannot be permuted safely (an unexpected structure): nothing is written."""


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[offgrid] {msg}", file=sys.stderr, flush=True)


def default_out_dir(source: Path, seed: int) -> Path:
    return cache_root() / f"{Path(source).name}-offgrid-s{seed}"


def is_complete(folder: Path) -> bool:
    folder = Path(folder)
    return all((folder / f).is_file() for f in (MARKER, "model.onnx", PERMUTATION_FILE))


# --------------------------------------------------------------------------------------------- graph


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


@dataclass
class _Graph:
    model: "object"  # onnx.ModelProto
    nodes: list
    inits: dict  # name -> TensorProto
    consts: dict  # name -> Constant node (output name)
    producer: dict  # tensor -> (node index)
    consumers: dict  # tensor -> [(node index, input index)]
    shapes: dict  # tensor -> list of int|None, or None when unknown
    outputs: set


def _build_graph(model) -> _Graph:
    import onnx

    g = model.graph
    for n in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            raise OffgridError(f"node {n.name} ({n.op_type}) holds a subgraph: not supported")
    nodes = list(g.node)
    inits = {t.name: t for t in g.initializer}
    consts = {}
    producer, consumers = {}, defaultdict(list)
    for i, n in enumerate(nodes):
        for o in n.output:
            if o:
                producer[o] = i
        for k, x in enumerate(n.input):
            if x:
                consumers[x].append((i, k))
        if n.op_type == "Constant":
            consts[n.output[0]] = n

    # Shapes: shape inference on the graph without weight bytes (cheap, no 2 GB limit).
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.graph.name = g.name
    light.graph.node.extend(g.node)
    light.graph.input.extend(g.input)
    light.graph.output.extend(g.output)
    for t in g.initializer:
        light.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    shapes: dict = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tt = v.type.tensor_type
        if tt.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    for name, t in inits.items():
        shapes[name] = list(t.dims)
    for name, n in consts.items():
        for a in n.attribute:
            if a.name == "value":
                shapes[name] = list(a.t.dims)
            elif a.name in ("value_float", "value_int"):
                shapes[name] = []
    return _Graph(model, nodes, inits, consts, producer, dict(consumers), shapes, {o.name for o in g.output})


def _last(g: _Graph, name: str):
    """Static size of the tensor's last axis; 1 for scalars; None when unknown."""
    s = g.shapes.get(name)
    if s is None:
        return None
    if len(s) == 0:
        return 1
    return s[-1]


def _attr(node, name, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _const_value(g: _Graph, name: str):
    import onnx.numpy_helper as nh

    if name in g.inits:
        return nh.to_array(g.inits[name])
    if name in g.consts:
        n = g.consts[name]
        for a in n.attribute:
            if a.name == "value":
                return nh.to_array(a.t)
    return None


def _weight_source(g: _Graph, name: str):
    """Follow a MatMul weight back through Transpose/Cast/Identity to a 2-D initializer.

    Returns (initializer name, swapped, chain tensor names) or None when it is not a constant weight."""
    chain, swapped = [], False
    while name not in g.inits:
        i = g.producer.get(name)
        if i is None:
            return None
        n = g.nodes[i]
        if n.op_type not in WEIGHT_CHAIN:
            return None
        if n.op_type == "Transpose":
            perm = _attr(n, "perm")
            if perm is not None and list(perm) != [1, 0]:
                return None
            swapped = not swapped
        chain.append(name)
        name = n.input[0]
    if len(g.inits[name].dims) != 2:
        return None
    return name, swapped, chain


def _is_linear(g: _Graph, i: int) -> bool:
    """MatMul, or Gemm without transA, whose weight (input 1) is a constant 2-D initializer."""
    n = g.nodes[i]
    if n.op_type == "Gemm" and _attr(n, "transA", 0):
        return False
    return n.op_type in ("MatMul", "Gemm") and _weight_source(g, n.input[1]) is not None


@dataclass
class _Group:
    root: str
    size: int
    tensors: list
    problems: list = field(default_factory=list)
    requests: list = field(default_factory=list)  # (kind, payload)
    linear_in: list = field(default_factory=list)  # node indices reading the group as A
    linear_out: list = field(default_factory=list)  # node indices writing the group as Y
    embedding: list = field(default_factory=list)  # Gather node indices producing it


def _aligned_groups(g: _Graph) -> dict:
    """Union-find of the tensors whose last axes are elementwise-aligned."""
    uf = _UnionFind()
    undecided = set()
    for i, n in enumerate(g.nodes):
        if n.op_type in ELEMENTWISE:
            outs = [o for o in n.output if o]
            if len(outs) != 1:
                continue
            o = outs[0]
            lo = _last(g, o)
            if lo is None:
                # derive from the inputs by broadcasting, if they are all known
                lasts = [_last(g, x) for x in n.input if x]
                if any(v is None for v in lasts):
                    undecided.add(o)
                    for x in n.input:
                        if x:
                            undecided.add(x)
                    continue
                lo = max(lasts) if lasts else 1
            if lo == 1:
                continue
            for x in n.input:
                if x and _last(g, x) == lo:
                    uf.union(o, x)
                elif x and _last(g, x) is None:
                    undecided.add(o)
        elif n.op_type in LAST_AXIS_NORMS:
            axis = _attr(n, "axis", -1)
            rank = len(g.shapes.get(n.input[0]) or [])
            if axis == -1 or (rank and axis == rank - 1):
                for x in [n.input[0], n.output[0], *[y for y in n.input[1:] if y]]:
                    if _last(g, x) == _last(g, n.input[0]):
                        uf.union(n.output[0], x)
    groups: dict[str, list] = defaultdict(list)
    for t in uf.parent:
        groups[uf.find(t)].append(t)
    return groups, uf, undecided


def _reduce_axes(g: _Graph, n):
    axes = _attr(n, "axes")
    if axes is None and len(n.input) > 1 and n.input[1]:
        v = _const_value(g, n.input[1])
        axes = None if v is None else v.reshape(-1).tolist()
    return axes


def _classify(g: _Graph, tensors: list, undecided: set) -> _Group:
    size = {_last(g, t) for t in tensors} - {None}
    grp = _Group(root=tensors[0], size=max(size) if size else 0, tensors=tensors)
    if len(size) != 1:
        grp.problems.append(f"inconsistent last-axis sizes {sorted(size)}")
    tset = set(tensors)
    for t in tensors:
        if t in undecided:
            grp.problems.append(f"{t}: shape unknown")
        if t in g.outputs:
            grp.problems.append(f"{t} is a graph output")
        # who makes it
        if t in g.inits:
            grp.requests.append(("init_last", t))
        elif t in g.consts:
            grp.requests.append(("const_last", t))
        elif t in g.producer:
            i = g.producer[t]
            n = g.nodes[i]
            if n.op_type in ELEMENTWISE or n.op_type in LAST_AXIS_NORMS:
                pass
            elif _is_linear(g, i) and n.output[0] == t:
                grp.linear_out.append(i)
            elif (n.op_type == "Gather" and n.input[0] in g.inits and len(g.inits[n.input[0]].dims) == 2
                  and _attr(n, "axis", 0) == 0):
                grp.embedding.append(i)
            else:
                grp.problems.append(f"{t} is made by {n.op_type} {n.name}")
        else:
            grp.problems.append(f"{t} is a graph input")
        # who reads it
        for i, k in g.consumers.get(t, []):
            n = g.nodes[i]
            op = n.op_type
            if op in ELEMENTWISE or op == "Shape":
                continue
            if op in LAST_AXIS_NORMS and n.input[0] in tset:
                continue
            if op in REDUCTIONS and k == 0:
                axes = _reduce_axes(g, n)
                rank = len(g.shapes.get(t) or [])
                if axes is not None and rank and sorted(a % rank for a in axes) == [rank - 1]:
                    continue
                grp.problems.append(f"{t} reduced by {n.name} over axes {axes}")
                continue
            if k == 0 and _is_linear(g, i):
                grp.linear_in.append(i)
                continue
            grp.problems.append(f"{t} is read by {op} {n.name} (input {k})")
    return grp


# ------------------------------------------------------------------------------------ value path


def _walk(g: _Graph, start: str, forward: bool, stop_at_linear: bool = True):
    """Linear layers reached from `start` along data-movement ops (forward: consumers; else producers)."""
    seen, stack, found = {start}, [start], set()
    while stack:
        t = stack.pop()
        if forward:
            for i, k in g.consumers.get(t, []):
                n = g.nodes[i]
                if _is_linear(g, i) and k == 0:
                    found.add(i)
                elif n.op_type in DATA_MOVEMENT and (k == 0 or n.op_type == "Concat"):
                    for o in n.output:
                        if o and o not in seen:
                            seen.add(o)
                            stack.append(o)
        else:
            i = g.producer.get(t)
            if i is None:
                continue
            n = g.nodes[i]
            if _is_linear(g, i):
                found.add(i)
            elif n.op_type in DATA_MOVEMENT:
                ins = n.input if n.op_type == "Concat" else n.input[:1]
                for x in ins:
                    if x and x not in seen:
                        seen.add(x)
                        stack.append(x)
    return found


def _attention_pairs(g: _Graph) -> list[tuple[int, int]]:
    """(v_proj node, o_proj node) per attention: Softmax -> MatMul(P, V); V back to v_proj, out to o_proj."""
    pairs = []
    for i, n in enumerate(g.nodes):
        if n.op_type != "Softmax":
            continue
        # P may pass through Cast/Where/Identity before P @ V
        frontier, pv = [n.output[0]], []
        seen = set(frontier)
        while frontier:
            t = frontier.pop()
            for j, k in g.consumers.get(t, []):
                m = g.nodes[j]
                if m.op_type == "MatMul" and k == 0:
                    pv.append(j)
                elif m.op_type in ("Cast", "Where", "Identity", "Dropout") and m.output[0] not in seen:
                    seen.add(m.output[0])
                    frontier.append(m.output[0])
        if len(pv) != 1:
            raise OffgridError(f"Softmax {n.name}: expected one MatMul(P, V), found {len(pv)}")
        pvn = g.nodes[pv[0]]
        vs = _walk(g, pvn.input[1], forward=False)
        os_ = _walk(g, pvn.output[0], forward=True)
        if len(vs) != 1 or len(os_) != 1:
            raise OffgridError(f"attention at {pvn.name}: found {len(vs)} value projections and {len(os_)} "
                               "output projections (expected one each)")
        pairs.append((vs.pop(), os_.pop()))
    return pairs


# ---------------------------------------------------------------------------------------- permute


def _head_config(source: Path) -> tuple[int, int, int] | None:
    cfg_path = source / "config.json"
    if not cfg_path.is_file():
        return None
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg = cfg.get("text_config", cfg)
    nq = cfg.get("num_attention_heads")
    nkv = cfg.get("num_key_value_heads", nq)
    hd = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // nq if nq else None)
    if not (nq and nkv and hd):
        return None
    return int(nq), int(nkv), int(hd)


def _layer_of(name: str) -> int | None:
    import re

    m = re.search(r"(?:layers|blk|h|block|blocks)[._/](\d+)[._/]", name)
    return int(m.group(1)) if m else None


@dataclass
class Plan:
    """What to permute: {(initializer or Constant output, axis): new_to_old}."""

    axes: dict = field(default_factory=dict)
    claimed: dict = field(default_factory=lambda: defaultdict(set))  # init -> {(node idx, input idx)}
    summary: dict = field(default_factory=dict)

    def request(self, name: str, axis: int, perm: np.ndarray, use=None) -> None:
        key = (name, axis)
        if key in self.axes and not np.array_equal(self.axes[key], perm):
            raise OffgridError(f"{name} axis {axis}: two different permutations requested")
        self.axes[key] = perm
        if use is not None:
            self.claimed[name].add(use)


def _weight_axis(g: _Graph, node_idx: int, role: str) -> tuple[str, int]:
    """(initializer, axis) holding role 'K' (rows of the effective [K, N] weight) or 'N' (its columns)."""
    n = g.nodes[node_idx]
    name, swapped, _chain = _weight_source(g, n.input[1])
    axis = {"K": 0, "N": 1}[role]
    if swapped != bool(n.op_type == "Gemm" and _attr(n, "transB", 0)):
        axis = 1 - axis
    return name, axis


def _request_weight(g: _Graph, plan: Plan, node_idx: int, role: str, perm: np.ndarray) -> str:
    """role 'K' (rows of [K, N]) or 'N' (columns) of the MatMul's effective weight."""
    n = g.nodes[node_idx]
    name, axis = _weight_axis(g, node_idx, role)
    if g.inits[name].dims[axis] != len(perm):
        raise OffgridError(f"{n.name}: weight {name} axis {axis} has {g.inits[name].dims[axis]} != {len(perm)}")
    plan.request(name, axis, perm, use=(node_idx, 1))
    if role == "N" and n.op_type == "Gemm" and len(n.input) > 2 and n.input[2]:
        bias = n.input[2]
        dims = list(g.inits[bias].dims) if bias in g.inits else None
        if dims is None:
            raise OffgridError(f"{n.name}: bias {bias} is not an initializer")
        if dims and dims[-1] == len(perm):
            plan.request(bias, len(dims) - 1, perm, use=(node_idx, 2))
        elif dims and dims[-1] != 1:
            raise OffgridError(f"{n.name}: bias {bias} of shape {dims}")
    return name


def plan_offgrid(model, source: Path, seed: int) -> Plan:
    """Find every permutable axis group and draw its permutations (deterministic in `seed`)."""
    g = _build_graph(model)
    rng = np.random.default_rng(seed)
    plan = Plan()
    groups, _uf, undecided = _aligned_groups(g)
    classified = [_classify(g, ts, undecided) for ts in groups.values()]
    residual = [c for c in classified if c.embedding]
    if len(residual) != 1:
        raise OffgridError(f"expected one residual stream (the group of the embedding Gather), found {len(residual)}")
    res = residual[0]
    if res.problems:
        raise OffgridError("the residual stream cannot be permuted: " + "; ".join(sorted(set(res.problems))[:8]))
    # MLP-like groups: made by linear layers and read by linear layers, nothing else in the way
    mlps = [c for c in classified if c is not res and not c.problems and c.linear_in and c.linear_out]
    # deterministic order: by the first node touching the group
    mlps.sort(key=lambda c: min(c.linear_in + c.linear_out))

    def apply_group(c: _Group, perm: np.ndarray) -> dict:
        names = {"reads": [], "writes": [], "vectors": [], "embedding": []}
        for i in c.linear_in:
            names["reads"].append(_request_weight(g, plan, i, "K", perm))
        for i in c.linear_out:
            names["writes"].append(_request_weight(g, plan, i, "N", perm))
        for i in c.embedding:
            table = g.nodes[i].input[0]
            plan.request(table, 1, perm, use=(i, 0))
            names["embedding"].append(table)
        for kind, t in c.requests:
            if kind == "init_last":
                dims = list(g.inits[t].dims)
            else:
                dims = g.shapes[t]
            if not dims:
                continue
            plan.request(t, len(dims) - 1, perm, use=None if kind == "const_last" else "vector")
            names["vectors"].append(t)
        return names

    d = res.size
    res_perm = rng.permutation(d)
    res_names = apply_group(res, res_perm)
    plan.summary["vocab"] = int(g.inits[res.embedding and g.nodes[res.embedding[0]].input[0]].dims[0])
    plan.summary["residual"] = {"size": d, "new_to_old": res_perm.tolist(),
                                "old_to_new": np.argsort(res_perm).tolist(),
                                "reads": len(res_names["reads"]), "writes": len(res_names["writes"]),
                                "vectors": res_names["vectors"], "embedding": res_names["embedding"]}
    plan.summary["mlp"] = []
    for c in mlps:
        perm = rng.permutation(c.size)
        names = apply_group(c, perm)
        layer = _layer_of(g.nodes[c.linear_in[0]].name) if c.linear_in else None
        plan.summary["mlp"].append({
            "layer": layer, "size": c.size, "down_proj": names["reads"], "gate_up": names["writes"],
            "node": [g.nodes[i].name for i in c.linear_in],
            "new_to_old": perm.tolist(), "old_to_new": np.argsort(perm).tolist()})

    # attention values: per kv head, within the head
    heads = _head_config(source)
    pairs = _attention_pairs(g)
    plan.summary["attention"] = []
    if pairs and heads is None:
        raise OffgridError("config.json with num_attention_heads/num_key_value_heads is needed for the v/o heads")
    for v_i, o_i in pairs:
        nq, nkv, hd = heads
        v_name, v_axis = _weight_axis(g, v_i, "N")
        o_name, o_axis = _weight_axis(g, o_i, "K")
        v_n, o_k = g.inits[v_name].dims[v_axis], g.inits[o_name].dims[o_axis]
        if v_n != nkv * hd or o_k != nq * hd or nq % nkv:
            raise OffgridError(f"{g.nodes[v_i].name}/{g.nodes[o_i].name}: shapes {v_n}, {o_k} do not match "
                               f"{nkv} kv heads, {nq} heads of {hd}")
        rep = nq // nkv
        head_perms = [rng.permutation(hd) for _ in range(nkv)]
        v_perm = np.concatenate([h * hd + p for h, p in enumerate(head_perms)])
        o_perm = np.concatenate([j * hd + head_perms[j // rep] for j in range(nq)])
        _request_weight(g, plan, v_i, "N", v_perm)
        _request_weight(g, plan, o_i, "K", o_perm)
        plan.summary["attention"].append({
            "layer": _layer_of(g.nodes[v_i].name), "v_proj": v_name, "o_proj": o_name,
            "v_new_to_old": v_perm.tolist(), "o_new_to_old": o_perm.tolist()})

    # every use of a permuted initializer must be one that asked for it
    for (name, _axis) in list(plan.axes):
        if name not in g.inits:
            continue
        claimed = plan.claimed.get(name, set())
        if "vector" in claimed:
            # an aligned vector: each of its readers is elementwise in the same group (checked by _classify)
            continue
        for use in _terminal_uses(g, name):
            if use not in claimed:
                n = g.nodes[use[0]]
                raise OffgridError(f"{name} is also read by {n.op_type} {n.name}, which asked no permutation")
    plan.summary["counts"] = {
        "initializers_permuted": len({k[0] for k in plan.axes}),
        "axes_permuted": len(plan.axes),
        "linear_layers": sum(1 for i in range(len(g.nodes)) if _is_linear(g, i)),
        "mlp_groups": len(mlps), "attention_pairs": len(pairs),
        "groups_left_alone": sum(1 for c in classified if c is not res and c not in mlps
                                 and (c.linear_in or c.linear_out)),
    }
    plan.summary["heads"] = None if heads is None else {"heads": heads[0], "kv_heads": heads[1], "head_dim": heads[2]}
    return plan


def _terminal_uses(g: _Graph, name: str) -> list:
    """(node, input) uses of an initializer, looking through the Transpose/Cast/Identity a weight sits behind
    (the use of the chain's last tensor is reported as the MatMul's (node, 1))."""
    uses, stack = [], [name]
    while stack:
        t = stack.pop()
        for i, k in g.consumers.get(t, []):
            n = g.nodes[i]
            if n.op_type in WEIGHT_CHAIN:
                stack.append(n.output[0])
            else:
                uses.append((i, k))
    return uses


def apply_plan(model, plan: Plan) -> None:
    """Permute the planned axes in place."""
    import onnx.numpy_helper as nh

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    by_name: dict[str, list] = defaultdict(list)
    for (name, axis), perm in plan.axes.items():
        by_name[name].append((axis, perm))
    for name, items in by_name.items():
        if name in inits:
            t = inits[name]
            arr = nh.to_array(t)
            for axis, perm in items:
                arr = np.take(arr, perm, axis=axis)
            t.CopyFrom(nh.from_array(np.ascontiguousarray(arr), name))
        else:
            node = consts[name]
            for a in node.attribute:
                if a.name == "value":
                    arr = nh.to_array(a.t)
                    for axis, perm in items:
                        arr = np.take(arr, perm, axis=axis)
                    a.t.CopyFrom(nh.from_array(np.ascontiguousarray(arr), a.t.name))


# ------------------------------------------------------------------------------------ verification


def grid_error(w: np.ndarray, block: int = 32, bits: int = 4) -> float:
    """Relative RMS error of asymmetric min-max RTN of a [K, N] MatMul weight, blocks of `block` along K.

    ~0 (1e-7) when the weight already sits on such a grid, as a dequantized Q4_1 GGUF does."""
    w = np.asarray(w, dtype=np.float64)
    k, n = w.shape
    k_used = (k // block) * block
    b = w[:k_used].reshape(k // block, block, n)
    lo, hi = b.min(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
    levels = (1 << bits) - 1
    scale = np.where(hi > lo, (hi - lo) / levels, 1.0)
    q = np.clip(np.round((b - lo) / scale), 0, levels)
    err = q * scale + lo - b
    return float(np.sqrt(np.mean(err ** 2)) / np.sqrt(np.mean(b ** 2)))


def grid_levels(w: np.ndarray, block: int = 32) -> tuple[float, int, float]:
    """Distinct values per block of `block` along K of a [K, N] MatMul weight: (median, max, share of blocks
    with at most 16).

    A dequantized 4-bit GGUF block (Q4_1, Q4_K) holds at most 16 distinct values whatever its scale/min search
    did (min-max RTN recovers Q4_1 exactly, not Q4_K, whose scales are optimised). Off the grid a block of 32
    mixes up to 32 GGUF blocks and holds about 30; o_proj's rows are only permuted within a head, so its
    blocks mix head_dim / 32 GGUF blocks (2 on SmolLM2: median 18, a fifth of them still <= 16)."""
    w = np.asarray(w)
    k, n = w.shape
    b = np.sort(w[: (k // block) * block].reshape(k // block, block, n), axis=1)
    distinct = 1 + (np.diff(b, axis=1) != 0).sum(axis=1)
    return float(np.median(distinct)), int(distinct.max()), float(np.mean(distinct <= 16))


def _text_ids(source: Path, n_tokens: int, vocab: int) -> np.ndarray:
    """WikiText-2 through the folder's tokenizer.json; without one, seeded random ids below `vocab`."""
    if not (source / "tokenizer.json").is_file():
        return np.random.default_rng(0).integers(0, vocab, size=(1, n_tokens), dtype=np.int64)
    from tokenizers import Tokenizer

    wikitext = os.environ.get("SW_ONNX_WIKITEXT")
    candidates = [Path(wikitext)] if wikitext else []
    candidates += [Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_test.txt",
                   Path("/work/shared/data/wikitext2_test.txt")]
    text = next((p.read_text(encoding="utf-8")[:200_000] for p in candidates if p.is_file()), None)
    if text is None:
        text = "The quick brown fox jumps over the lazy dog. " * 200
    tok = Tokenizer.from_file(str(source / "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids[:n_tokens]
    return np.asarray([ids], dtype=np.int64)


def compare_logits(a_path: Path, b_path: Path, ids: np.ndarray) -> dict:
    """Max |logit difference| of two models on `ids` (ORT CPU, fp32), and argmax agreement."""
    import onnxruntime as ort

    def feeds(sess):
        out = {}
        for inp in sess.get_inputs():
            rank = len(inp.shape)
            if inp.name == "attention_mask":
                out[inp.name] = np.ones_like(ids)
            elif "position" in inp.name:
                out[inp.name] = np.arange(ids.shape[1], dtype=np.int64).reshape(ids.shape if rank == 2 else (-1,))
            elif inp.type in ("tensor(int64)", "tensor(int32)") and rank in (1, 2):
                out[inp.name] = (ids if rank == 2 else ids[0]).astype(np.int32 if "32" in inp.type else np.int64)
            elif inp.name.startswith("past_key_values"):
                shape = [1 if i == 0 else (0 if i == 2 else d) for i, d in enumerate(inp.shape)]
                if any(not isinstance(d, int) for d in shape):
                    raise OffgridError(f"cannot build an empty cache for {inp.name} {inp.shape}")
                out[inp.name] = np.zeros(shape, dtype=np.float16 if "float16" in inp.type else np.float32)
            else:
                raise OffgridError(f"no feed for model input {inp.name} {inp.type} {inp.shape}")
        return out

    def run(path):
        so = ort.SessionOptions()
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        out = dict(zip(names, sess.run(None, feeds(sess))))
        out = out["logits"] if "logits" in out else out[names[0]]
        del sess
        return out

    la = run(a_path)
    lb = run(b_path)
    diff = np.abs(la.astype(np.float64) - lb)
    return {"tokens": int(ids.shape[1]), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "logit_range": [float(la.min()), float(la.max())],
            "argmax_agreement": float(np.mean(la.argmax(-1) == lb.argmax(-1)))}


# ------------------------------------------------------------------------------------------- build


def make_offgrid(source: str | os.PathLike | None = None, *, seed: int = 0, out_dir=None,
                 tokens: int = 256, quiet: bool = False) -> Path:
    """Build (once) the off-grid copy of the export folder `source` and return its folder."""
    import onnx

    if source is None:
        from sample_models.export_smollm2 import export_smollm2

        source = export_smollm2(quiet=quiet)
    source = Path(source).expanduser().absolute()
    if not (source / "model.onnx").is_file():
        raise OffgridError(f"{source} holds no model.onnx")
    out = Path(out_dir).expanduser().absolute() if out_dir is not None else default_out_dir(source, seed)
    if is_complete(out):
        _log(f"already complete: {out}", quiet)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out.parent / f".{out.name}.lock"):
        if is_complete(out):
            _log(f"already complete: {out}", quiet)
            return out
        t0 = time.perf_counter()
        model = onnx.load(str(source / "model.onnx"))
        t_load = time.perf_counter() - t0
        plan = plan_offgrid(model, source, seed)
        t_plan = time.perf_counter() - t0 - t_load
        c = plan.summary["counts"]
        _log(f"residual {plan.summary['residual']['size']}, {c['mlp_groups']} MLP groups, "
             f"{c['attention_pairs']} v/o pairs; {c['axes_permuted']} axes of {c['initializers_permuted']} "
             f"tensors over {c['linear_layers']} linear layers", quiet)
        apply_plan(model, plan)
        weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
            tmp = Path(tmp)
            if weight_bytes > EXTERNAL_DATA_ABOVE:
                onnx.save_model(model, str(tmp / "model.onnx"), save_as_external_data=True,
                                all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
            else:
                onnx.save_model(model, str(tmp / "model.onnx"))
            del model
            for p in sorted(source.iterdir()):
                if p.is_file() and p.name not in SKIP_COPY:
                    shutil.copy2(p, tmp / p.name)
            (tmp / PERMUTATION_FILE).write_text(json.dumps(
                {"format": 1, "seed": seed, "source": str(source),
                 "convention": "W_new[..., i] = W_old[..., new_to_old[i]]; old channel c is new channel "
                               "old_to_new[c]",
                 **{k: plan.summary[k] for k in ("residual", "mlp", "attention", "heads", "counts")}}) + "\n",
                encoding="utf-8")
            t_write = time.perf_counter() - t0 - t_load - t_plan
            ids = _text_ids(source, tokens, plan.summary["vocab"])
            check = compare_logits(source / "model.onnx", tmp / "model.onnx", ids)
            _log(f"logits vs source on {check['tokens']} tokens: max |diff| {check['max_abs_diff']:.3g} "
                 f"(range {check['logit_range'][0]:.1f}..{check['logit_range'][1]:.1f}), argmax agreement "
                 f"{check['argmax_agreement']:.4f}", quiet)
            if not np.isfinite(check["max_abs_diff"]) or check["max_abs_diff"] > LOGITS_TOLERANCE:
                raise OffgridError(f"the permuted model's logits differ by {check['max_abs_diff']} "
                                   f"(> {LOGITS_TOLERANCE}): the permutation is not function-preserving")
            marker = {"format": MARKER_FORMAT, "source": str(source), "seed": seed,
                      "external_data": weight_bytes > EXTERNAL_DATA_ABOVE, "counts": plan.summary["counts"],
                      "verify": check,
                      "seconds": {"load": round(t_load, 1), "plan": round(t_plan, 1), "write": round(t_write, 1),
                                  "total": round(time.perf_counter() - t0, 1)}}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            if out.exists() or out.is_symlink():  # an incomplete leftover
                if out.is_symlink() or not out.is_dir():
                    raise OffgridError(f"{out} exists and is not a folder; remove it")
                shutil.rmtree(out)
            os.replace(tmp, out)
            with contextlib.suppress(OSError):
                os.chmod(out, 0o755)
        _log(f"done in {time.perf_counter() - t0:.1f}s: {out}", quiet)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", nargs="?", type=Path, default=None,
                    help="export folder (model.onnx + config.json + tokenizer.json); default: SmolLM2's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: cache folder)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens of the logits check")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        path = make_offgrid(args.source, seed=args.seed, out_dir=args.out, tokens=args.tokens, quiet=args.quiet)
    except (OffgridError, OSError) as e:
        print(f"[offgrid] error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
