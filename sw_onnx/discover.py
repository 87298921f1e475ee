"""Find the linear layers of a graph by structure: MatMul/Gemm whose weight is a constant 2-D initializer.

Names never decide what is a linear layer; they only label it (a layer index parsed from the node or
weight name, e.g. `/model/layers.3/mlp/down_proj/MatMul` or `blk.3.ffn_down`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

# Ops allowed between a weight initializer and the MatMul/Gemm that reads it.
_PASS_THROUGH_OPS = {"Identity", "Cast", "Transpose", "Reshape"}
# Ops a logits output may pass through after the lm_head (softcapping, reshapes, casts).
_LOGITS_TAIL_OPS = {"Cast", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Add", "Mul", "Div", "Tanh"}
_LAYER_INDEX_PATTERNS = (
    re.compile(r"(?:^|[/._])(?:layers?|blocks?|blk|h|block_|decoder\.layers)[._/]?(\d+)(?:[/._]|$)"),
    re.compile(r"layer_?(\d+)"),
)


@dataclass
class WeightChain:
    """How the effective weight `[K, N]` seen by the linear op is made from an initializer.

    Attributes:
        initializer: the initializer value.
        steps: the pass-through ops applied to it, in order (op_type, shape after the op, perm or None).
        transposed: the effective `[K, N]` is the transpose of the chain's output (Gemm transB=1).
    """

    initializer: ir.Value
    steps: list[tuple[str, tuple[int, ...], tuple[int, ...] | None]] = field(default_factory=list)
    transposed: bool = False

    def effective_to_initializer_index(self, k: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, ...]:
        """Map effective `[K, N]` coordinates to indices in the initializer's own layout."""
        idx = (n, k) if self.transposed else (k, n)
        shapes = [tuple(self.initializer.shape.numpy())] + [s for _, s, _ in self.steps]
        for (op, shape, perm), before in zip(reversed(self.steps), reversed(shapes[:-1])):
            if op == "Transpose":
                inverse = np.argsort(perm)
                idx = tuple(idx[i] for i in inverse)
            elif op == "Reshape":
                idx = np.unravel_index(np.ravel_multi_index(idx, shape), before)
        return tuple(np.asarray(i) for i in idx)

    def initializer_to_effective_index(self, index) -> tuple[int, int]:
        """Map an index in the initializer's own layout to the effective ``[K, N]`` (the inverse of
        `effective_to_initializer_index`).

        Raises:
            IndexError: the index does not fit the initializer.
        """
        shape = tuple(self.initializer.shape.numpy())
        idx = tuple(int(i) for i in index)
        if len(idx) != len(shape) or any(not 0 <= i < s for i, s in zip(idx, shape)):
            raise IndexError(f"{self.initializer.name}: index {list(idx)} outside shape {list(shape)}")
        current = shape
        for op, out_shape, perm in self.steps:
            if op == "Transpose":
                idx = tuple(idx[p] for p in perm)
            elif op == "Reshape":
                idx = tuple(int(i) for i in np.unravel_index(np.ravel_multi_index(idx, current), out_shape))
            current = out_shape
        k, n = (idx[1], idx[0]) if self.transposed else idx
        return int(k), int(n)

    def effective_weight(self) -> np.ndarray:
        """The float32 `[K, N]` weight the linear op computes with (reads the initializer)."""
        w = self.initializer.const_value.numpy()
        for op, shape, perm in self.steps:
            if op == "Transpose":
                w = np.transpose(w, perm)
            elif op == "Reshape":
                w = w.reshape(shape)
        w = np.asarray(w, dtype=np.float32)
        return w.T if self.transposed else w

    def to_initializer_layout(self, w: np.ndarray) -> np.ndarray:
        """An effective ``[K, N]`` weight laid out as the initializer (the inverse of `effective_weight`), in
        the initializer's dtype: what to feed in its place."""
        x = w.T if self.transposed else w
        shapes = [tuple(self.initializer.shape.numpy())] + [s for _, s, _ in self.steps]
        for (op, _, perm), before in zip(reversed(self.steps), reversed(shapes[:-1])):
            if op == "Transpose":
                x = np.transpose(x, np.argsort(perm))
            elif op == "Reshape":
                x = x.reshape(before)
        return np.ascontiguousarray(x.astype(self.initializer.const_value.numpy().dtype, copy=False))

    @property
    def layout(self) -> str:
        """`KN` when the initializer is stored `[in, out]` (ONNX MatMul), `NK` when `[out, in]` (torch)."""
        if len(self.initializer.shape) != 2:
            return "other"
        k, n = self.effective_to_initializer_index(np.array([1]), np.array([0]))
        return "KN" if (int(k[0]), int(n[0])) == (1, 0) else "NK"


@dataclass
class LinearLayer:
    """One linear layer `y = x @ W (+ b)` with `W` effective `[K, N]`.

    Attributes:
        position: index in topological order among the graph's linear layers.
        scope: ``""`` in the main graph; for a layer inside a subgraph the path to it, e.g.
            ``"optimum::if/then_branch"`` (an If's branches may hold nodes of the same name).
        layer: decoder layer index parsed from names, or None.
    """

    node: ir.Node
    weight: WeightChain
    k: int
    n: int
    position: int
    layer: int | None
    scope: str = ""

    @property
    def name(self) -> str:
        """Unique among the model's layers: the node's name, qualified by its scope inside a subgraph."""
        return f"{self.scope}/{self.node_name}" if self.scope else self.node_name

    @property
    def node_name(self) -> str:
        """The node's own name (``<op>_<position>`` when unnamed); the same in every branch of an If."""
        return self.node.name or f"{self.node.op_type}_{self.position}"

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def output(self) -> ir.Value:
        return self.node.outputs[0]


@dataclass
class SkippedNode:
    node: str
    op_type: str
    reason: str


def _trace_weight(value: ir.Value | None) -> WeightChain | str:
    """Walk back from a linear op's weight input to an initializer through pass-through ops."""
    steps = []
    while value is not None and value.const_value is None:
        producer = value.producer()
        if producer is None:
            return "weight is a graph input, not a constant"
        if producer.op_type not in _PASS_THROUGH_OPS or producer.domain not in ("", "ai.onnx"):
            return f"weight comes from {producer.op_type}, not a constant"
        if value.shape is None or not value.shape.is_static():
            shape = None
        else:
            shape = tuple(value.shape.numpy())
        perm = None
        if producer.op_type == "Transpose":
            attr = producer.attributes.get("perm")
            perm = tuple(attr.as_ints()) if attr is not None else None
        steps.append((producer.op_type, shape, perm))
        value = producer.inputs[0]
    if value is None or not value.is_initializer():
        return "weight is not an initializer"
    shape = tuple(value.const_value.shape.numpy())
    # Fill in shapes that shape inference did not give, forward from the initializer.
    resolved = []
    current = shape
    for op, known, perm in reversed(steps):
        if op == "Transpose":
            perm = perm if perm is not None else tuple(reversed(range(len(current))))
            current = tuple(current[i] for i in perm)
        elif op == "Reshape":
            if known is None:
                return "weight is reshaped to an unknown shape"
            current = known
        resolved.append((op, current, perm))
    return WeightChain(initializer=value, steps=resolved)


def _parse_layer_index(*names: str) -> int | None:
    for name in names:
        for pattern in _LAYER_INDEX_PATTERNS:
            m = pattern.search(name or "")
            if m:
                return int(m.group(1))
    return None


def find_linear_layers(model: ir.Model) -> tuple[list[LinearLayer], list[SkippedNode]]:
    """All MatMul/Gemm nodes that multiply activations by a constant 2-D weight, subgraphs (If/Loop bodies)
    included: a subgraph's layers follow the node that holds it.

    Returns:
        (layers in topological order, MatMul/Gemm nodes that are not linear layers with the reason).
    """
    layers: list[LinearLayer] = []
    skipped: list[SkippedNode] = []
    for node, scope in _nodes_with_scope(model.graph, ""):
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        found = _linear_layer(node, len(layers), scope)
        if isinstance(found, SkippedNode):
            skipped.append(found)
        else:
            layers.append(found)
    return layers, skipped


def _nodes_with_scope(graph: ir.Graph, scope: str):
    """Every node with the path of the subgraph holding it (``""`` for the main graph), in graph order."""
    for node in graph:
        yield node, scope
        for name, attr in node.attributes.items():
            if attr.type == ir.AttributeType.GRAPH:
                inner = f"{scope + '/' if scope else ''}{node.name or node.op_type}/{name}"
                yield from _nodes_with_scope(attr.as_graph(), inner)
            elif attr.type == ir.AttributeType.GRAPHS:
                for i, sub in enumerate(attr.as_graphs()):
                    yield from _nodes_with_scope(sub, f"{scope + '/' if scope else ''}{node.name or node.op_type}/{name}.{i}")


def _linear_layer(node: ir.Node, position: int, scope: str) -> LinearLayer | SkippedNode:
    transposed = False
    if node.op_type == "Gemm":
        trans_a = node.attributes.get("transA")
        if trans_a is not None and trans_a.as_int() != 0:
            return SkippedNode(node.name, node.op_type, "Gemm with transA=1")
        trans_b = node.attributes.get("transB")
        transposed = trans_b is not None and trans_b.as_int() != 0
    chain = _trace_weight(node.inputs[1])
    if isinstance(chain, str):
        return SkippedNode(node.name, node.op_type, chain)
    final_shape = chain.steps[-1][1] if chain.steps else tuple(chain.initializer.const_value.shape.numpy())
    if len(final_shape) != 2:
        return SkippedNode(node.name, node.op_type, f"weight has rank {len(final_shape)}, not 2")
    chain.transposed = transposed
    k, n = (final_shape[1], final_shape[0]) if transposed else final_shape
    layer = _parse_layer_index(node.name, chain.initializer.name)
    return LinearLayer(node, chain, int(k), int(n), position, layer, scope)


def _uses(value: ir.Value) -> list[ir.Node]:
    return [use.node for use in value.uses()]


def _is_residual_add(node: ir.Node) -> bool:
    return node.op_type == "Add" and all(i is not None and i.const_value is None for i in node.inputs)


# onnxruntime's fused norms that also make the residual sum: output 3 is input + skip (+ bias).
_SKIP_NORMS = {"SkipLayerNormalization", "SkipSimplifiedLayerNormalization"}


def _residual_sum(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The residual-stream value that `node` makes by adding `value` to another activation: an Add of two
    activations, or a com.microsoft Skip(Simplified)LayerNormalization reading `value` as its input or skip
    (its output 3, when the graph has it). None when `node` is no such junction."""
    if _is_residual_add(node):
        return node.outputs[0]
    if node.op_type in _SKIP_NORMS and node.domain == "com.microsoft" and any(
            i is value for i in node.inputs[:2]) and len(node.outputs) > 3 and node.outputs[3].name:
        return node.outputs[3]
    return None


def _is_junction(node: ir.Node) -> bool:
    return _is_residual_add(node) or (node.op_type in _SKIP_NORMS and node.domain == "com.microsoft")


def find_residual_chain(layer: LinearLayer) -> tuple[ir.Value | None, list[ir.Value]]:
    """The residual stream around a linear layer's output, found by structure.

    Follows the output through a bias Add, Reshape or Cast to the first residual junction (an Add of two
    activations, or onnxruntime's Skip(Simplified)LayerNormalization, whose output 3 is the sum), then from
    junction to junction: each residual value is consumed by the next one.

    Returns:
        (the stream's value before this layer's contribution, the stream's values after it, in order);
        (None, []) when the output does not enter a residual stream.
    """
    value = layer.output
    junction = None
    for _ in range(4):  # a few pass-through steps at most
        nodes = _uses(value)
        junctions = [n for n in nodes if _is_junction(n)]
        if junctions:
            junction = junctions[0]
            break
        follow = [n for n in nodes if n.op_type in ("Reshape", "Cast", "Identity") or (n.op_type == "Add" and not _is_residual_add(n))]
        if len(nodes) != 1 or not follow:
            return None, []
        value = follow[0].outputs[0]
    total = _residual_sum(junction, value) if junction is not None else None
    if total is None:
        return None, []
    before = junction.inputs[1] if junction.inputs[0] is value else junction.inputs[0]
    chain = [total]
    while (nxt := _next_residual(chain[-1])) is not None:
        chain.append(nxt)
    return before, chain


def _next_residual(value: ir.Value, depth: int = 3) -> ir.Value | None:
    """The residual value made from `value` by the next junction, directly or through Cast/Identity/Reshape
    (exporters add them)."""
    frontier = [value]
    for _ in range(depth):
        following = []
        for v in frontier:
            for node in _uses(v):
                total = _residual_sum(node, v)
                if total is not None:
                    return total
                if node.op_type in ("Cast", "Identity", "Reshape"):
                    following.append(node.outputs[0])
        frontier = following
    return None


# Ops that only appear in quantized graphs (default and com.microsoft domains).
_QUANTIZED_OPS = {
    "MatMulNBits", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul",
    "QLinearConv", "ConvInteger", "QGemm", "QAttention", "QOrderedMatMul", "GatherBlockQuantized",
    "MatMulBnb4", "DynamicQuantizeLSTM",
}


def find_quantized_nodes(model: ir.Model) -> dict[str, int]:
    """What makes a model already quantized: ``{kind: count}``, empty for a float model.

    Kinds: quantized ops (MatMulNBits, QLinearMatMul, MatMulInteger, ...) by op type, and
    ``"DequantizeLinear -> MatMul"`` for QDQ weights (a DequantizeLinear of a constant feeding a MatMul/Gemm,
    possibly through Transpose/Reshape/Cast).
    """
    found: dict[str, int] = {}
    for node in model.graph.all_nodes() if hasattr(model.graph, "all_nodes") else model.graph:
        if node.op_type in _QUANTIZED_OPS or node.op_type.startswith("QLinear"):
            found[node.op_type] = found.get(node.op_type, 0) + 1
        elif node.op_type == "DequantizeLinear" and node.inputs and node.inputs[0] is not None \
                and node.inputs[0].const_value is not None:
            frontier, hops = [node.outputs[0]], 0
            while frontier and hops < 4:
                users = [use.node for v in frontier for use in v.uses()]
                if any(u.op_type in ("MatMul", "Gemm", "FusedMatMul") for u in users):
                    found["DequantizeLinear -> MatMul"] = found.get("DequantizeLinear -> MatMul", 0) + 1
                    break
                frontier = [u.outputs[0] for u in users if u.op_type in _PASS_THROUGH_OPS and u.outputs]
                hops += 1
    return found


def require_float_model(model: ir.Model) -> None:
    """Refuse an already quantized model: detection and quantization work on float weights.

    Raises:
        AlreadyQuantizedError: the model holds quantized weights or ops (`find_quantized_nodes`).
    """
    from sw_onnx.errors import AlreadyQuantizedError

    found = find_quantized_nodes(model)
    if found:
        what = ", ".join(f"{count} {kind}" for kind, count in sorted(found.items()))
        raise AlreadyQuantizedError(
            f"the model is already quantized ({what}); sw-onnx detects and quantizes float models",
            hint="run it on the original fp32/fp16/bf16 model",
        )


def find_lm_head(model: ir.Model, layers: list[LinearLayer]) -> LinearLayer | None:
    """The last linear layer whose output is the logits graph output, found by structure.

    The output may pass through a few ops with one non-constant input (Cast, Reshape, softcapping
    Div/Tanh/Mul, a bias Add) on its way to the graph output. When an output is named ``logits`` only
    that one counts.
    """
    outputs = list(model.graph.outputs)
    targets = [o for o in outputs if o.name == "logits"] or outputs
    target_ids = {id(o) for o in targets}
    for layer in reversed(layers):
        value = layer.output
        for _ in range(6):
            if id(value) in target_ids:
                return layer
            uses = list(value.uses())
            if len(uses) != 1:
                break
            node = uses[0].node
            others = [i for i in node.inputs if i is not None and i is not value]
            if node.op_type not in _LOGITS_TAIL_OPS or (
                node.op_type not in ("Reshape", "Squeeze", "Unsqueeze") and any(i.const_value is None for i in others)
            ):
                break
            value = node.outputs[0]
    return None


@dataclass
class EmbeddingTable:
    """A float table read by ``Gather(table, indices, axis=0)`` nodes: an embedding.

    Attributes:
        initializer: the table's initializer value (2-D float [vocab, hidden], or [hidden, vocab] when
            ``transpose`` is set).
        gathers: the Gather nodes reading it.
        other_uses: the other nodes reading it (a tied lm_head's Transpose, ...).
        transpose: the ``Transpose(perm=[1, 0])`` the Gathers read it through (onnxruntime-genai's builder ties
            the embedding to the lm_head's [hidden, vocab] weight this way), else None.
    """

    initializer: ir.Value
    gathers: list[ir.Node]
    other_uses: list[ir.Node]
    transpose: ir.Node | None = None

    @property
    def vocab(self) -> int:
        return int(self.initializer.shape[1 if self.transpose is not None else 0])

    @property
    def hidden(self) -> int:
        return int(self.initializer.shape[0 if self.transpose is not None else 1])


def find_embeddings(model: ir.Model) -> list[EmbeddingTable]:
    """The model's embedding tables, by structure: 2-D float initializers that a Gather on axis 0 reads with
    non-constant indices, directly or through a ``Transpose(perm=[1, 0])`` that only Gathers read."""
    tables = []
    for value in model.graph.initializers.values():
        if value.const_value is None or value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16) or \
                value.shape is None or len(value.shape) != 2 or not all(isinstance(d, int) for d in value.shape):
            continue
        gathers, others = _split_gathers(value)
        if gathers:
            tables.append(EmbeddingTable(value, gathers, others))
            continue
        for node in others:
            perm = node.attributes.get("perm")
            if node.op_type == "Transpose" and perm is not None and list(perm.as_ints()) == [1, 0]:
                through, rest = _split_gathers(node.outputs[0])
                if through and not rest and not node.outputs[0].is_graph_output():
                    tables.append(EmbeddingTable(value, through, [n for n in others if n is not node], node))
                    break
    return tables


def _split_gathers(value: ir.Value) -> tuple[list[ir.Node], list[ir.Node]]:
    """(embedding Gathers reading `value`: axis 0, non-constant indices; every other reader)."""
    gathers, others = [], []
    for use in value.uses():
        node = use.node
        axis = node.attributes.get("axis")
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and use.idx == 0 and \
                (axis is None or axis.as_int() == 0) and node.inputs[1].const_value is None:
            gathers.append(node)
        else:
            others.append(node)
    return gathers, others
