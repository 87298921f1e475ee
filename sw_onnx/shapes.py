"""Weight-less views of a model, for the onnx checker, the version converter and shape inference."""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir

from sw_onnx.io import proto_with_placeholders

__all__ = ["structure_proto", "value_types"]

logger = logging.getLogger(__name__)



def structure_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a ModelProto without weight data: main-graph initializers become typed graph inputs.

    Reads no tensor data (weights stay memory-mapped or lazy), so it is cheap for any model size.
    """
    proto, _ = proto_with_placeholders(model)
    graph_inputs = {i.name for i in proto.graph.input}
    for tensor in proto.graph.initializer:
        if tensor.name not in graph_inputs:
            proto.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    del proto.graph.initializer[:]
    return proto


def value_types(model: ir.Model, structure: onnx.ModelProto | None = None) -> dict[str, tuple[int, int | None]]:
    """``{value name: (ONNX element type, rank or None)}`` from ONNX shape inference on `structure_proto`.

    Args:
        structure: `structure_proto` of the model as it is now, if one is at hand (serializing a large graph
            again costs about half a second per 10,000 nodes).

    Returns what inference could tell (possibly nothing, e.g. for graphs with unknown custom ops).
    """
    try:
        proto = structure if structure is not None else structure_proto(model)
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception as e:  # inference is a hint only
        logger.info("shape inference failed (%s); activation ranks unknown", e)
        return {}
    types: dict[str, tuple[int, int | None]] = {}
    graph = inferred.graph
    for info in list(graph.value_info) + list(graph.input) + list(graph.output):
        t = info.type.tensor_type
        if not info.type.HasField("tensor_type"):
            continue
        rank = len(t.shape.dim) if t.HasField("shape") else None
        types[info.name] = (t.elem_type, rank)
    return types
