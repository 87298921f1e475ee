"""`KeepOutActivationChannelsPass`: take super-activation input channels out of linear layers' MatMul.

Runs on the float model *before* `QuantizeWeightsPass`, for every layer whose plan lists ``sa_channels`` C::

    y = MatMul(x * mask, W') + side            # mask 0 on C, W' with rows C zeroed
    side = Gather(x, C, axis=-1) (x) (alpha * W[C, :])

``side`` is an exact float outer product (``Mul``; ``Unsqueeze -> Mul -> ReduceSum`` for several channels),
not a MatMul, so the weight pass leaves it float. ``MatMul(x * mask, DQ(Wq))`` still fuses into MatMulNBits,
whose int8 activation blocks (``accuracy_level`` 4) then never see the super activation, and the weight
rows that multiply it are not rounded either (docs/activation_quant.md has the measurements).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sw_onnx.discover import LinearLayer
from sw_onnx.passes._rewrite import GraphBuilder, layers_by_name, remove_orphans, rewire_output
from sw_onnx.plan import LayerPlan, QuantPlan, gemm_parameters

__all__ = ["KeepOutActivationChannelsPass"]

_NUMPY = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


class KeepOutActivationChannelsPass(ir.passes.InPlacePass):
    """Move the plan's super-activation input channels of each layer onto an exact float side path.

    Attributes:
        plan: the `QuantPlan`; layers with ``sa_channels`` are rewritten.
    """

    def __init__(self, plan: QuantPlan):
        super().__init__()
        self.plan = plan

    def requires(self, model: ir.Model) -> None:
        if any(p.sa_channels for p in self.plan.layers) and model.opset_imports.get("", 0) < 13:
            raise ir.passes.PreconditionError("the keep-out side path (Unsqueeze/ReduceSum inputs) needs opset >= 13")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = layers_by_name(model)
        shared: dict[tuple[int, tuple[int, ...]], tuple[ir.Value, ir.Value]] = {}  # one mask/Gather per input
        planned = [p for p in self.plan.layers if p.sa_channels]
        for p in planned:
            _keep_out(model.graph, layers[p.node], p, shared)
        return ir.passes.PassResult(model, modified=bool(planned))


def _dtype(layer: LinearLayer) -> ir.DataType:
    for value in (layer.input, layer.output):
        if value.dtype is not None:
            return value.dtype
    return ir.DataType.FLOAT


def _keep_out(main_graph: ir.Graph, layer: LinearLayer, p: LayerPlan, shared) -> None:
    node, channels = layer.node, p.sa_channels
    graph = node.graph if node.graph is not None else main_graph
    np_dtype = _NUMPY[_dtype(layer)]
    alpha, _, _ = gemm_parameters(node)
    prefix = f"{layer.name}/sw_onnx_sa_keep_out"
    b = GraphBuilder(graph, main_graph)
    x = node.inputs[0]
    key = (id(x), tuple(channels))
    if key not in shared:
        tag = f"{prefix}/input"
        mask = np.ones(layer.k, np_dtype)
        mask[channels] = 0
        masked = b.op("Mul", [x, b.const(f"{tag}/mask", mask)], f"{tag}/mask_Mul")
        xc = b.op("Gather", [x, b.const(f"{tag}/channels", np.array(channels, np.int64))], f"{tag}/Gather", {"axis": -1})
        shared[key] = (masked, xc)
    masked, xc = shared[key]
    w = layer.weight.effective_weight()
    rows = (w[channels, :].astype(np.float64) * alpha).astype(np_dtype)
    if len(channels) == 1:
        side = b.op("Mul", [xc, b.const(f"{prefix}/row", rows[0])], f"{prefix}/side_Mul")
    else:
        axes = b.const(f"{prefix}/axes", np.array([-1], np.int64))
        col = b.op("Unsqueeze", [xc, axes], f"{prefix}/side_Unsqueeze")
        prod = b.op("Mul", [col, b.const(f"{prefix}/rows", rows)], f"{prefix}/side_Mul")
        side = b.op("ReduceSum", [prod, b.const(f"{prefix}/sum_axes", np.array([-2], np.int64))], f"{prefix}/side_ReduceSum",
                    {"keepdims": 0})
    _zero_rows(main_graph, layer, channels, w, b)
    node.replace_input_with(0, masked)
    old_out = node.outputs[0]
    total = b.op("Add", [old_out, side], f"{prefix}/Add", output=f"{prefix}/sum")
    total.type, total.shape = old_out.type, old_out.shape
    add = b.nodes.pop()
    graph.insert_before(node, b.nodes)
    graph.insert_after(node, [add])
    rewire_output(graph, old_out, total, keep_user=add)


def _zero_rows(graph: ir.Graph, layer: LinearLayer, channels: list[int], w: np.ndarray, b: GraphBuilder) -> None:
    """Zero the effective rows `channels` of the layer's weight: lazily in place when nothing else reads the
    initializer, else in a copy."""
    chain, node = layer.weight, layer.node
    init = chain.initializer
    value, exclusive = node.inputs[1], True
    while value is not None:
        if len(value.uses()) != 1 or value.is_graph_output() or value.is_graph_input():
            exclusive = False
            break
        producer = value.producer()
        value = producer.inputs[0] if producer is not None else None
    if exclusive:
        original = init.const_value
        index = chain.effective_to_initializer_index(np.repeat(np.asarray(channels), layer.n),
                                                     np.tile(np.arange(layer.n), len(channels)))

        def zeroed(original=original, index=index):
            array = np.array(original.numpy())
            array[index] = 0
            return ir.Tensor(array, name=init.name)

        init.const_value = ir.LazyTensor(zeroed, dtype=original.dtype, shape=original.shape, name=init.name)
        return
    w = np.array(w, dtype=_NUMPY[_dtype(layer)])
    w[channels, :] = 0
    old = node.inputs[1]
    node.replace_input_with(1, b.const(f"{layer.name}/sw_onnx_sa_keep_out/weight", w.T if chain.transposed else w))
    remove_orphans(graph, old)
