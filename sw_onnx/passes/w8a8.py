"""`QuantizeW8A8Pass`: int8 per-channel weights and int8 per-tensor static activations, as standard QDQ.

Per planned layer one ``QuantizeLinear -> DequantizeLinear`` pair on the input (onnxruntime runs
``DQ(Q(x)) -> MatMul <- DQ(W)`` as ``MatMulIntegerToFloat``; a pair shared by q/k/v would not be). With
super-activation channels C in the plan (paper Eq. 1, ``A_hat = RESTORE(DQ(Q(REPLACE(A))))``)::

    xc    = Gather(x, C, axis=-1)
    delta = Where(|xc| > range, xc - m_hat, 0)        # the super-activation entries, minus the median
    x_r   = x - delta @ E                             # E one-hot [|C|, K]: those entries become m_hat
    y     = MatMul(DQ(Q(x_r)), DQ(Wq)) + delta @ W_hat[C, :]

``m_hat`` is the median on the int8 grid, so the super activation never passes through the quantizer and
the restored entries are exact up to float32 rounding; the node units stay intact for onnxruntime.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from sw_onnx.discover import LinearLayer
from sw_onnx.kernels import dequantize_blockwise, quantize_blockwise
from sw_onnx.passes._rewrite import GraphBuilder, layers_by_name, remove_orphans, replace_output, side_path
from sw_onnx.plan import ActivationPlan, LayerPlan, QuantPlan, gemm_parameters

__all__ = ["QuantizeW8A8Pass"]

logger = logging.getLogger(__name__)

_INT8_MAX = 127.0


class QuantizeW8A8Pass(ir.passes.InPlacePass):
    """Rewrite the plan's ``w8a8`` layers as W8A8 QDQ.

    Attributes:
        plan: the `QuantPlan` (`sw_onnx.plan.build_quant_plan` with ``activations="int8"``).
    """

    def __init__(self, plan: QuantPlan):
        super().__init__()
        self.plan = plan

    def requires(self, model: ir.Model) -> None:
        if model.opset_imports.get("", 0) < 13:
            raise ir.passes.PreconditionError("per-channel DequantizeLinear needs opset >= 13")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = layers_by_name(model)
        shared: dict[str, tuple[ir.Value, ir.Value | None]] = {}  # input|handled -> (replaced x, delta)
        planned = [p for p in self.plan.layers if p.quantized and p.form == "w8a8"]
        for p in planned:
            _rewrite(model.graph, layers[p.node], p, shared)
        logger.info("W8A8: quantized %d of %d linear layers", len(planned), len(self.plan.layers))
        return ir.passes.PassResult(model, modified=bool(planned))


def _replaced_input(b: GraphBuilder, x: ir.Value, a: ActivationPlan, k: int, scale: np.float32,
                    prefix: str) -> tuple[ir.Value, ir.Value | None]:
    """``(x_r, delta)``: the input with its super-activation entries replaced by the median on the grid."""
    if not a.channels:
        return x, None
    tag = f"{prefix}/input"
    median_hat = np.float32(np.clip(np.rint(np.float32(a.median) / scale), -_INT8_MAX, _INT8_MAX) * scale)
    cols = b.const(f"{tag}/sa_channels", np.array(a.channels, np.int64))
    xc = b.op("Gather", [x, cols], f"{tag}/sa_gather", {"axis": -1})
    beyond = b.op("Greater", [b.op("Abs", [xc], f"{tag}/sa_abs"), b.const(f"{tag}/sa_threshold", np.float32(a.range))],
                  f"{tag}/sa_beyond_range")
    shifted = b.op("Sub", [xc, b.const(f"{tag}/sa_median", median_hat)], f"{tag}/sa_minus_median")
    delta = b.op("Where", [beyond, shifted, b.const(f"{tag}/zero", np.float32(0))], f"{tag}/sa_delta")
    onehot = np.zeros((len(a.channels), k), np.float32)
    onehot[np.arange(len(a.channels)), a.channels] = 1.0
    scatter = b.op("MatMul", [delta, b.const(f"{tag}/sa_onehot", onehot)], f"{tag}/sa_scatter")
    return b.op("Sub", [x, scatter], f"{tag}/sa_replaced"), delta


def _rewrite(main_graph: ir.Graph, layer: LinearLayer, p: LayerPlan, shared) -> None:
    node, a = layer.node, p.activation
    graph = node.graph if node.graph is not None else main_graph
    alpha, beta, bias = gemm_parameters(node)
    prefix = f"{layer.name}/sw_onnx_w8a8"
    b = GraphBuilder(graph, main_graph)
    x = node.inputs[0]
    w = layer.weight.effective_weight()
    if alpha != 1.0:
        w = w * np.float32(alpha)
    qw = quantize_blockwise(w, bits=8, block_size=None, symmetric=p.symmetric, clip=p.clip, zscore=p.zscore,
                            keep_out=[(k, n) for k, n, _ in p.side_keep] or None)
    del w
    scale = np.float32(a.range / _INT8_MAX) if a.range > 0 else np.float32(1.0)
    key = f"{id(graph)}|{x.name}|{bool(a.channels)}"
    if key not in shared:  # the replacement is computed once per input value
        shared[key] = _replaced_input(b, x, a, layer.k, scale, prefix)
    x_r, delta = shared[key]
    # One QuantizeLinear/DequantizeLinear pair per layer: onnxruntime turns a pair shared by several
    # MatMuls (q/k/v, gate/up) into MatMulIntegerToFloat for none of them.
    if p.lift_3d:  # MatMul + Add would become a Gemm first, which has no integer form here
        axes0 = b.const(f"{prefix}/axes_0", np.array([0], np.int64))
        x_r = b.op("Unsqueeze", [x_r, axes0], f"{prefix}/input_3d")  # before Q: no Q/DQ around it
    s = b.const(f"{prefix}/input_scale", scale)
    zp = b.const(f"{prefix}/input_zero_point", np.int8(0))
    xq = b.op("QuantizeLinear", [x_r, s, zp], f"{prefix}/input_QuantizeLinear")
    xd = b.op("DequantizeLinear", [xq, s, zp], f"{prefix}/input_DequantizeLinear")
    tensors = [b.const(f"{prefix}/weight", qw.q), b.const(f"{prefix}/weight_scale", qw.scale[0].astype(np.float32))]
    if qw.zero_point is not None:
        tensors.append(b.const(f"{prefix}/weight_zero_point", qw.zero_point[0]))
    wd = b.op("DequantizeLinear", tensors, f"{prefix}/weight_DequantizeLinear", {"axis": 1})
    y = b.op("MatMul", [xd, wd], layer.node_name, output=f"{prefix}/matmul_output")
    if p.lift_3d:
        y = b.op("Squeeze", [y, axes0], f"{prefix}/output_2d")
    if bias is not None:
        if beta != 1.0:
            bias = b.const(f"{prefix}/bias", (np.asarray(bias.const_value.numpy(), np.float64) * beta).astype(np.float32))
        y = b.op("Add", [y, bias], f"{prefix}/AddBias")
    if a.channels:
        side = b.const(f"{prefix}/sa_rows", dequantize_blockwise(qw)[a.channels, :].astype(np.float32))
        y = b.op("Add", [y, b.op("MatMul", [delta, side], f"{prefix}/sa_restore_MatMul")], f"{prefix}/sa_restore")
    if p.side_keep:
        y = side_path(b, x, y, p.side_keep, layer.n, np.float32, prefix)
    old_weight = node.inputs[1]
    replace_output(graph, node, b.nodes, y)
    remove_orphans(main_graph, old_weight)
    p.quantized_node = layer.node_name
    p.quantized_bytes = int(qw.q.nbytes + qw.scale.nbytes + (qw.zero_point.nbytes if qw.zero_point is not None else 0))
