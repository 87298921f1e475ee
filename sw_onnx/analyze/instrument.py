"""Add small per-channel statistics of every linear layer's input and output as extra graph outputs.

Everything is reduced in-graph to vectors of one channel axis (per-channel max |x| over tokens and its
token, plus the input/output rows at the layer's peak token), so the outputs stay small whatever the
sequence length: whole activations of every layer are never exposed. Tokens index the flattened
batch*sequence axis.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sw_onnx.discover import LinearLayer

OUTPUT_PREFIX = "sw_onnx/"


def stat_output_name(kind: str, position: int) -> str:
    """Name of an added output: e.g. in_max, out_argmax, peak_token, in_peak_row, resid_max."""
    return f"{OUTPUT_PREFIX}{kind}/{position}"


class InstrumentLinearStatsPass(ir.passes.InPlacePass):
    """Expose per-channel max |activation| (and its token) of linear-layer inputs/outputs and residual values.

    Per linear layer at position i: `in_max/i`, `in_argmax/i` `[K]`, `out_max/i`, `out_argmax/i` `[N]`,
    `peak_token/i` int64 `[1]` (the token of the layer's largest |output|), `in_peak_row/i` float32 `[K]` and
    `out_peak_row/i` `[N]` (input and signed output at that token: enough for exact contributions
    `x[t, k] * W[k, j]` of the spike). Per residual value r: `resid_max/r`, `resid_argmax/r`.

    Attributes:
        layers: the linear layers to instrument (from `find_linear_layers` on the same model).
        residual_values: residual-stream values to probe, numbered by their index in this list.
    """

    def __init__(self, layers: list[LinearLayer], residual_values: list[ir.Value] = ()):
        super().__init__()
        self.layers = layers
        self.residual_values = list(residual_values)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if any(v.name and v.name.startswith(OUTPUT_PREFIX) for v in graph.outputs):
            return ir.passes.PassResult(model, modified=False)  # already instrumented: idempotent
        probe = _Probe(graph, model.opset_imports.get("", 13))
        for layer in self.layers:
            tag = f"{OUTPUT_PREFIX}{layer.position}"
            probe.channel_stats(layer.input, layer.k, f"{tag}/in", "in", layer.position)
            y_abs = probe.channel_stats(layer.output, layer.n, f"{tag}/out", "out", layer.position)
            peak_per_token = probe.reduce_max(y_abs, axis=1, name=f"{tag}/out/token_max")
            token = append_op(graph, "ArgMax", [peak_per_token], {"axis": 0, "keepdims": 1}, name=f"{tag}/peak_token")
            expose_output(graph, token.outputs[0], stat_output_name("peak_token", layer.position), ir.DataType.INT64, [1])
            for kind, flat, width in (("in", probe.flat[layer.input.name], layer.k), ("out", probe.flat[layer.output.name], layer.n)):
                row = append_op(graph, "Gather", [flat, token.outputs[0]], {"axis": 0}, name=f"{tag}/{kind}/peak_row")
                expose_output(graph, row.outputs[0], stat_output_name(f"{kind}_peak_row", layer.position), ir.DataType.FLOAT, [1, width])
        for r, value in enumerate(self.residual_values):
            width = value.shape[-1] if value.shape is not None and isinstance(value.shape[-1], int) else None
            probe.channel_stats(value, width, f"{OUTPUT_PREFIX}resid/{r}", "resid", r)
        return ir.passes.PassResult(model, modified=True)


class _Probe:
    """Builds the small reductions; flattens each activation once, however many probes read it."""

    def __init__(self, graph: ir.Graph, opset: int):
        self.graph, self.opset = graph, opset
        self.flat: dict[str, ir.Value] = {}
        self.abs: dict[str, ir.Value] = {}

    def channel_stats(self, value: ir.Value, width: int | None, tag: str, kind: str, index: int) -> ir.Value:
        if value.name not in self.abs:
            self.flat[value.name] = self._flatten(value, width, tag)
            self.abs[value.name] = append_op(self.graph, "Abs", [self.flat[value.name]], name=f"{tag}/abs").outputs[0]
        x_abs = self.abs[value.name]
        maximum = self.reduce_max(x_abs, axis=0, name=f"{tag}/max")
        arg = append_op(self.graph, "ArgMax", [x_abs], {"axis": 0, "keepdims": 0}, name=f"{tag}/argmax")
        expose_output(self.graph, maximum, stat_output_name(f"{kind}_max", index), ir.DataType.FLOAT, [width])
        expose_output(self.graph, arg.outputs[0], stat_output_name(f"{kind}_argmax", index), ir.DataType.INT64, [width])
        return x_abs

    def reduce_max(self, value: ir.Value, *, axis: int, name: str) -> ir.Value:
        if self.opset >= 18:
            axes = add_constant(self.graph, np.array([axis], dtype=np.int64))
            return append_op(self.graph, "ReduceMax", [value, axes], {"keepdims": 0}, name=name).outputs[0]
        return append_op(self.graph, "ReduceMax", [value], {"axes": [axis], "keepdims": 0}, name=name).outputs[0]

    def _flatten(self, value: ir.Value, width: int | None, tag: str) -> ir.Value:
        """float32 `[tokens, width]` view of an activation of any rank and float type."""
        if value.dtype != ir.DataType.FLOAT:
            value = append_op(self.graph, "Cast", [value], {"to": ir.DataType.FLOAT}, name=f"{tag}/cast").outputs[0]
        if width is None:  # unknown last dimension: read it from the tensor's shape
            shape_node = append_op(self.graph, "Shape", [value], {"start": -1}, name=f"{tag}/last_dim")
            minus_one = add_constant(self.graph, np.array([-1], dtype=np.int64))
            shape = append_op(self.graph, "Concat", [minus_one, shape_node.outputs[0]], {"axis": 0}, name=f"{tag}/shape").outputs[0]
        else:
            shape = add_constant(self.graph, np.array([-1, width], dtype=np.int64))
        return append_op(self.graph, "Reshape", [value, shape], name=f"{tag}/flatten").outputs[0]


def append_op(graph: ir.Graph, op_type: str, inputs, attributes=None, *, name: str) -> ir.Node:
    node = ir.node(op_type, inputs, attributes, name=name)
    node.outputs[0].name = f"{name}/out"
    graph.append(node)
    return node


def add_constant(graph: ir.Graph, array: np.ndarray) -> ir.Value:
    """A small constant initializer, one per value in the graph (named by it): instrumenting SmolLM2 made
    1,681 copies of a few axes and shapes, and detection took 0.3 s longer with them."""
    name = f"{OUTPUT_PREFIX}const/{array.dtype.name}{list(array.shape)}={array.ravel().tolist()}"
    if name in graph.initializers:
        return graph.initializers[name]
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    graph.register_initializer(value)
    return value


def expose_output(graph: ir.Graph, value: ir.Value, name: str, dtype: ir.DataType, shape) -> None:
    if value.is_graph_output():  # one value cannot carry two output names; give it its own Identity
        value = append_op(graph, "Identity", [value], name=f"{name}/identity").outputs[0]
    value.name = name
    value.type = ir.TensorType(dtype)
    value.shape = ir.Shape(shape)
    graph.outputs.append(value)
