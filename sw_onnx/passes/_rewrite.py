"""What the rewrite passes share: adding named nodes and initializers, the kept-out side path, swapping a
layer's output for a new one, and removing what a replaced weight leaves behind."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx_ir as ir

from sw_onnx.discover import LinearLayer, find_linear_layers
from sw_onnx.io import PREFETCH
from sw_onnx.kernels import pack_int4_low_first

__all__ = ["GraphBuilder", "LazyParts", "codes_tensor", "layers_by_name", "remove_orphans", "replace_output",
           "rewire_output", "side_path", "tensor_bytes"]


class GraphBuilder:
    """Makes named initializers and nodes for one graph; `nodes` collects the nodes made, in order.

    Initializers go to `initializers_graph` (the main graph, also for nodes inside an If branch: outer-scope
    weights are visible in every branch). Output names: ``output`` when given, else ``"<node name>/out"``.
    """

    def __init__(self, graph: ir.Graph, initializers_graph: ir.Graph | None = None):
        self.graph = graph
        self.initializers_graph = initializers_graph if initializers_graph is not None else graph
        self.nodes: list[ir.Node] = []

    def initializer(self, name: str, tensor: ir.TensorProtocol) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.initializers_graph.register_initializer(value)
        return value

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        return self.initializer(name, ir.tensor(np.asarray(array), name=name))

    def lazy(self, name: str, dtype: ir.DataType, shape: Sequence[int], make, prefetch=None) -> ir.Value:
        """An initializer whose data `make()` computes when the model is saved; `prefetch`: see
        `sw_onnx.io.PREFETCH`."""
        tensor = ir.LazyTensor(make, dtype=dtype, shape=ir.Shape(list(shape)), name=name)
        if prefetch is not None:
            tensor.meta[PREFETCH] = prefetch
        return self.initializer(name, tensor)

    def op(self, op_type: str, inputs, name: str, attributes=None, *, output: str | None = None,
           domain: str = "") -> ir.Value:
        node = ir.node(op_type, inputs, attributes, domain=domain, name=name)
        node.outputs[0].name = output if output is not None else f"{name}/out"
        self.nodes.append(node)
        return node.outputs[0]


class LazyParts:
    """The arrays one computation makes (a layer's codes, scales and zero points), handed one part at a time
    to the lazy tensors that write them: computed on the first request or by `prefetch`, forgotten once every
    part was taken (peak memory: one computation's, however large the model), computed again if a part is
    asked for later (a second save). The saver's threads call it concurrently."""

    def __init__(self, compute: Callable[[], dict[str, np.ndarray | None]], part_names: Iterable[str]):
        self._compute = compute
        self.part_names = set(part_names)
        self._parts: dict[str, np.ndarray | None] | None = None
        self._taken: set[str] = set()
        self._lock = threading.Lock()

    def prefetch(self) -> None:
        """Compute now (if not yet done) without taking a part (`sw_onnx.io.PREFETCH`)."""
        with self._lock:
            if self._parts is None:
                self._parts = self._compute()

    def get(self, part: str) -> np.ndarray | None:
        with self._lock:
            if self._parts is None:
                self._parts = self._compute()
            array = self._parts[part]
            self._taken.add(part)
            if self._taken >= self.part_names:
                self._parts, self._taken = None, set()
            return array


def side_path(b: GraphBuilder, x: ir.Value, main: ir.Value, side_keep: Sequence[tuple[int, int, float]], n: int,
              np_dtype, prefix: str, *, names: Sequence[str] | None = None) -> ir.Value:
    """``main + MatMul(Gather(x, cols, axis=-1), S)``: the exact values of kept-out weights, where ``S`` is
    float ``[len(cols), N]`` holding only them. It does not stop onnxruntime's MatMulNBits fusion.

    Args:
        names: the Gather, MatMul and Add output names (default ``<node>/out``).
    """
    cols = sorted({k for k, _, _ in side_keep})
    side = np.zeros((len(cols), n), dtype=np_dtype)
    for k, j, value in side_keep:
        side[cols.index(k), j] = value
    g_out, m_out, a_out = names or (None, None, None)
    cols_v = b.const(f"{prefix}/keep_out/cols", np.array(cols, np.int64))
    gathered = b.op("Gather", [x, cols_v], f"{prefix}/keep_out/Gather", {"axis": -1}, output=g_out)
    values = b.const(f"{prefix}/keep_out/values", side)
    contribution = b.op("MatMul", [gathered, values], f"{prefix}/keep_out/MatMul", output=m_out)
    return b.op("Add", [main, contribution], f"{prefix}/keep_out/Add", output=a_out)


def replace_output(graph: ir.Graph, node: ir.Node, new_nodes: list[ir.Node], new_output: ir.Value) -> None:
    """Put `new_nodes` in place of `node`, `new_output` taking over its output (readers, graph output, name)."""
    old_out = node.outputs[0]
    name = old_out.name
    new_output.type = old_out.type if old_out.type is not None else new_output.type
    new_output.shape = old_out.shape if old_out.shape is not None else new_output.shape
    old_out.replace_all_uses_with(new_output, replace_graph_outputs=True)
    graph.insert_after(node, new_nodes)
    graph.remove(node, safe=True)
    old_out.name = None
    new_output.name = name


def rewire_output(graph: ir.Graph, old: ir.Value, new: ir.Value, keep_user: ir.Node | None = None) -> None:
    """Make every reader of `old` (but `keep_user`) read `new`; a graph output `old` becomes `new`, name kept."""
    for use in list(old.uses()):
        if use.node is not keep_user:
            use.node.replace_input_with(use.idx, new)
    if old.is_graph_output():
        outputs = graph.outputs
        for i, value in enumerate(outputs):
            if value is old:
                outputs[i] = new
        name = old.name
        old.name = f"{name}/sw_onnx_inner"
        new.name = name


def remove_orphans(graph: ir.Graph, value: ir.Value | None) -> None:
    """Remove a replaced weight's Cast/Transpose chain and initializer once nothing reads them (each from the
    graph that holds it: a branch's nodes, the main graph's initializers)."""
    while value is not None and not value.uses() and not value.is_graph_output():
        producer = value.producer()
        if producer is None:
            owner = value.graph if value.graph is not None else graph
            if value.is_initializer() and not value.is_graph_input() and value.name in owner.initializers:
                owner.initializers.pop(value.name)
            return
        if any(o.uses() or o.is_graph_output() for o in producer.outputs):
            return
        upstream = producer.inputs[0] if producer.inputs else None
        (producer.graph if producer.graph is not None else graph).remove(producer, safe=True)
        value = upstream


def layers_by_name(model: ir.Model) -> dict[str, LinearLayer]:
    """The model's linear layers as they are now, by node name (a pass finds its planned layers so)."""
    layers, _ = find_linear_layers(model)
    return {layer.name: layer for layer in layers}


def codes_tensor(codes: np.ndarray, dtype: ir.DataType) -> ir.TensorProtocol:
    """An ONNX tensor of int4/uint4 (packed two per byte, low nibble first) or int8/uint8 codes."""
    if dtype in (ir.DataType.INT4, ir.DataType.UINT4):
        return ir.PackedTensor(pack_int4_low_first(codes), dtype, shape=list(codes.shape))
    return ir.Tensor(codes.astype(np.int8 if dtype == ir.DataType.INT8 else np.uint8))


def tensor_bytes(tensor: ir.TensorProtocol) -> int:
    count = math.prod(tensor.shape.numpy())
    return int(math.ceil(count * tensor.dtype.itemsize))
