"""`QuantizeEmbeddingsPass`: embedding tables as ``com.microsoft::GatherBlockQuantized``.

``Gather(table [V, H], ids)`` becomes ``GatherBlockQuantized(data, ids, scales[, zero_points], gather_axis=0,
quantize_axis=1, block_size=B, bits=b)`` with ``data`` uint8 ``[V, ceil(H * b / 8)]``: each row's unsigned
codes in blocks of B along H (the last block may be shorter), 4-bit codes two per byte low nibble first, scales
``[V, ceil(H / B)]``, zero points packed the same way (symmetric: none, codes offset by 2**(b-1), the kernel's
default zero point). A table tied to the lm_head (plan ``shared_with``; only when B divides H, so that
MatMulNBits' padded layout is the same bytes) reads the lm_head's MatMulNBits tensors through
``Reshape(B [V, H/B, B*b/8] -> [V, -1])``: one copy of the codes in the file for both.

A table read through ``Transpose(W [H, V])`` (onnxruntime-genai's builder ties the embedding to the lm_head's
weight so) is handled the same way; the Transpose goes with the Gathers.

Runs after `QuantizeWeightsPass` (a shared table needs the lm_head's tensors written). The float table is
quantized lazily at save time, like the weights.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sw_onnx.kernels import pack_nibbles_along_rows, quantize_rows_blockwise
from sw_onnx.passes._rewrite import GraphBuilder, LazyParts
from sw_onnx.plan import EmbeddingPlan, QuantPlan

__all__ = ["QuantizeEmbeddingsPass"]

MS_DOMAIN = "com.microsoft"
_NUMPY = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


class QuantizeEmbeddingsPass(ir.passes.InPlacePass):
    """Replace the plan's embedding Gathers by GatherBlockQuantized."""

    def __init__(self, plan: QuantPlan):
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        heads = {p.node: p for p in self.plan.layers}
        for e in self.plan.embeddings:
            _rewrite_table(model.graph, e, heads)
        if self.plan.embeddings:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=bool(self.plan.embeddings))


def _rewrite_table(graph: ir.Graph, e: EmbeddingPlan, heads) -> None:
    table = graph.initializers[e.initializer]
    b = GraphBuilder(graph)
    prefix = f"{e.initializer}/sw_onnx_gbq"
    if e.shared_with:
        written = heads[e.shared_with].written
        parts = [graph.initializers[written[k]] for k in ("B", "scales", "zp") if k in written]
        shape = b.const(f"{prefix}/data_shape", np.array([e.vocab, -1], np.int64))
        data = b.op("Reshape", [parts[0], shape], f"{prefix}/data_Reshape", output=f"{prefix}/data")
        tensors = [data, *parts[1:]]
    else:
        tensors = _own_tensors(b, table, e, prefix)
    gathers = [node for node in graph if node.name in e.nodes and node.op_type == "Gather"]
    attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": e.block_size, "bits": e.bits}
    for node in gathers:
        inputs = [tensors[0], node.inputs[1], *tensors[1:]]
        new = ir.node("GatherBlockQuantized", inputs, attrs, domain=MS_DOMAIN, name=node.name)
        out = node.outputs[0]
        new.outputs[0].name, new.outputs[0].type, new.outputs[0].shape = None, out.type, out.shape
        out.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
        graph.insert_before(node, [*b.nodes, new] if node is gathers[0] else [new])
        graph.remove(node, safe=True)
        name = out.name
        out.name = None
        new.outputs[0].name = name
    for use in list(table.uses()):  # a Transpose the Gathers read it through (onnxruntime-genai's tied table)
        if use.node.op_type == "Transpose" and not use.node.outputs[0].uses() and not use.node.outputs[0].is_graph_output():
            graph.remove(use.node, safe=True)
    if not table.uses() and not table.is_graph_output():
        graph.initializers.pop(e.initializer)


def _own_tensors(b: GraphBuilder, table: ir.Value, e: EmbeddingPlan, prefix: str) -> list[ir.Value]:
    """The table's own codes, scales and zero points, computed when the model is saved."""
    source = table.const_value

    def quantize() -> dict[str, np.ndarray | None]:
        w = source.numpy()
        w = w.T if e.transposed else w  # [V, H]: each row's blocks along the hidden axis
        codes, scales, zp = quantize_rows_blockwise(w, bits=e.bits, block_size=e.block_size, symmetric=e.symmetric)
        if e.bits == 4:
            codes, zp = pack_nibbles_along_rows(codes), None if zp is None else pack_nibbles_along_rows(zp, pad=8)
        return {"data": codes, "scales": scales, "zp": zp}

    parts = LazyParts(quantize, {"data", "scales"} if e.symmetric else {"data", "scales", "zp"})
    dtype = ir.DataType(e.compute_dtype)
    nb = -(-e.hidden // e.block_size)
    out = [b.lazy(f"{prefix}/data", ir.DataType.UINT8, (e.vocab, -(-e.hidden * e.bits // 8)),
                  lambda: ir.Tensor(parts.get("data")), prefetch=(parts.prefetch, e.vocab * e.hidden)),
           b.lazy(f"{prefix}/scales", dtype, (e.vocab, nb), lambda: ir.Tensor(parts.get("scales").astype(_NUMPY[dtype])))]
    if not e.symmetric:
        cols = -(-nb // 2) if e.bits == 4 else nb
        out.append(b.lazy(f"{prefix}/zero_points", ir.DataType.UINT8, (e.vocab, cols), lambda: ir.Tensor(parts.get("zp"))))
    return out

