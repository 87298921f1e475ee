"""The KV cache's inputs: which graph inputs are past keys/values, and the sizes of their axes that the graph
leaves symbolic (onnxruntime-genai declares the head size as ``kv_cache_dim``)."""

from __future__ import annotations

import re

__all__ = ["CACHE_NAME", "cache_dim_hints"]

CACHE_NAME = re.compile(r"past|cache|present", re.IGNORECASE)
"""Names of KV-cache inputs and outputs."""


def cache_dim_hints(model) -> dict[str, dict[int, int]]:
    """Sizes of the past-KV inputs' symbolic axes that no name tells: ``{input name: {axis: size}}``.

    onnxruntime-genai's builder declares past KV as ``[batch_size, kv_heads, past_sequence_length,
    kv_cache_dim]``: the head size is a symbol. It comes from ``genai_config.json`` beside the model
    (``head_size``, ``num_key_value_heads``, the past name patterns) or else from the graph: the
    GroupQueryAttention nodes' ``num_heads``/``kv_num_heads`` and the width of the (packed) query projection.

    Args:
        model: an .onnx path, or an ``onnx_ir.Model``.
    """
    import onnx_ir as ir

    if not isinstance(model, ir.Model):
        from pathlib import Path

        from sw_onnx.genai import find_config, read_config

        config_path = find_config(Path(model))
        if config_path is not None:  # a genai folder says it; the graph need not be read
            config = read_config(config_path)
            key, value = config.past_patterns
            dims = {1: config.num_key_value_heads, 3: config.head_size}
            return {pattern % i: dict(dims) for i in range(config.num_hidden_layers) for pattern in (key, value)}
        from sw_onnx.io.load import load_model

        model = load_model(model)
    return _hints_from_attention(model)


def _hints_from_attention(model) -> dict[str, dict[int, int]]:
    from sw_onnx.discover import find_linear_layers

    widths = {id(layer.output): layer.n for layer in find_linear_layers(model)[0]}
    hints: dict[str, dict[int, int]] = {}
    for node in model.graph.all_nodes():
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft" or len(node.inputs) < 5:
            continue
        heads, kv_heads = node.attributes.get("num_heads"), node.attributes.get("kv_num_heads")
        query = node.inputs[0]
        width = widths.get(id(query)) or _width_through_add(query, widths)  # float, or already quantized
        if heads is None or kv_heads is None or width is None:
            continue
        packed = node.inputs[1] is None  # q, k and v in one input
        head_size = width // (heads.as_int() + (2 * kv_heads.as_int() if packed else 0))
        for past in node.inputs[3:5]:
            if past is not None and past.is_graph_input():
                hints[past.name] = {1: kv_heads.as_int(), 3: head_size}
    return hints


def _width_through_add(value, widths: dict) -> int | None:
    """The output width of the projection making `value`: a float linear layer (`widths`), a MatMulNBits
    (its ``N``) or a MatMul of a DequantizeLinear weight (quantized models), possibly behind a bias Add."""
    producer = value.producer()
    if producer is not None and producer.op_type == "Add":
        candidates = [i.producer() for i in producer.inputs if i is not None and i.producer() is not None]
        for i in producer.inputs:
            if i is not None and id(i) in widths:
                return widths[id(i)]
    else:
        candidates = [producer] if producer is not None else []
    for node in candidates:
        if node.op_type == "MatMulNBits" and "N" in node.attributes:
            return node.attributes["N"].as_int()
        weight = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) > 1 else None
        if weight is not None and weight.shape is not None and len(weight.shape) == 2 and isinstance(weight.shape[1], int):
            return weight.shape[1]
        dq = weight.producer() if weight is not None else None
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.inputs[0].shape is not None:
            return int(dq.inputs[0].shape[-1])
    return None
