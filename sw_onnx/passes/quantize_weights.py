"""`QuantizeWeightsPass`: rewrite the planned linear layers into forms onnxruntime runs as MatMulNBits.

``qdq`` (standard ONNX, opset >= 21)::

    y = MatMul(x, DequantizeLinear(Wq [K, N], scale [ceil(K/B), N], zero_point, axis=0, block_size=B))
    y = MatMul(x, DequantizeLinear(Wq [K, N], scale [N], zero_point [N], axis=1))      # per-channel

onnxruntime fuses both at session load. Form ``qdq-3d`` lifts 2-D activations to 3-D
(``Unsqueeze -> MatMul -> Squeeze``) where a following non-constant Add would first make a Gemm.
``nbits``: ``com.microsoft::MatMulNBits`` written directly, with the plan's ``accuracy_level``.

Kept-out super weights are zeroed in ``Wq`` and left out of their block's range; their exact values come
back on a side path (`sw_onnx.passes._rewrite.side_path`). A Gemm becomes ``MatMul(x, DQ(alpha * W^T))``
(+ ``Add(beta * C)``). Quantized tensors are ``ir.LazyTensor``s: the kernels run when the model is saved,
one layer at a time, so peak memory is about one float weight whatever the model's size.
"""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import onnx_ir as ir

from sw_onnx.config import PER_CHANNEL
from sw_onnx.discover import LinearLayer
from sw_onnx.kernels import quantize_blockwise, quantize_gptq, to_matmulnbits
from sw_onnx.passes.opset import INT4_MIN_IR_VERSION, QDQ_MIN_OPSET
from sw_onnx.passes._rewrite import (GraphBuilder, LazyParts, codes_tensor, layers_by_name, remove_orphans,
                                     replace_output, side_path, tensor_bytes)
from sw_onnx.plan import LayerPlan, QuantPlan, gemm_parameters, kernel_block_size

__all__ = ["MS_DOMAIN", "QuantizeWeightsPass"]

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
_SCALE_NUMPY = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16, ir.DataType.BFLOAT16: ml_dtypes.bfloat16}
_CODE_TYPES = {(4, False): ir.DataType.INT4, (4, True): ir.DataType.UINT4,
               (8, False): ir.DataType.INT8, (8, True): ir.DataType.UINT8}


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Quantize the weights of the plan's quantized (weight-only) layers.

    Attributes:
        plan: the `QuantPlan`; the pass writes each layer's ``quantized_node`` and ``quantized_bytes``.
    """

    def __init__(self, plan: QuantPlan):
        super().__init__()
        self.plan = plan
        for p in self._layers():  # bad clip options fail now, not at save time inside a lazy tensor
            quantize_blockwise(np.zeros((1, 1), np.float32), bits=p.bits, block_size=p.block_size or None,
                               symmetric=p.symmetric, clip=p.clip, zscore=p.zscore)

    def _layers(self) -> list[LayerPlan]:
        return [p for p in self.plan.layers if p.quantized and p.form in ("qdq", "qdq-3d", "nbits")]

    def requires(self, model: ir.Model) -> None:
        if self.plan.format == "qdq" and model.opset_imports.get("", 0) < QDQ_MIN_OPSET:
            raise ir.passes.PreconditionError("blocked int4/int8 DequantizeLinear needs opset >= 21: run UpgradeOpsetPass first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers, planned = layers_by_name(model), self._layers()
        axes0: list[ir.Value] = []  # one shared [0] for every Unsqueeze/Squeeze
        shared: dict[tuple, tuple[list[ir.Value], set[int]]] = {}  # one quantized weight per initializer and If
        # The names a layer's prefix must not take: those some initializer's name continues with "/".
        prefixes = {prefix for name in model.graph.initializers for prefix in _slash_prefixes(name)}
        for p in planned:
            _rewrite_layer(model.graph, layers[p.node], p, axes0, shared, prefixes)
        if any(p.form == "nbits" for p in planned):
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        if any(p.form != "nbits" and p.bits == 4 for p in planned):
            model.ir_version = max(model.ir_version or 0, INT4_MIN_IR_VERSION)
        logger.info("quantized %d of %d linear layers", len(planned), len(self.plan.layers))
        return ir.passes.PassResult(model, modified=bool(planned))


class _LayerQuantizer(LazyParts):
    """Quantizes one layer's weight when its first lazy tensor is saved (or prefetched), its parts handed out
    as `LazyParts`: peak memory is then about one float weight (plus the kernel's temporaries)."""

    def __init__(self, layer: LinearLayer, plan: LayerPlan, alpha: float):
        self.chain, self.plan, self.alpha = layer.weight, plan, alpha
        names = {"B", "scales"} if plan.form == "nbits" else {"q", "scale"}
        super().__init__(self.quantize, names if plan.symmetric else names | {"zp"})

    def quantize(self) -> dict[str, np.ndarray | None]:
        p = self.plan
        w = self.chain.effective_weight()
        if self.alpha != 1.0:
            w = w * np.float32(self.alpha)
        search = {}
        if p.clip == "mse":
            search = {"weighting": {"x2": "none", "x2rms": "rms"}.get(p.error_weight, "w2"), "importance": p.importance,
                      "refit": p.refit, "mse_grid": p.mse_grid}
        block = kernel_block_size(p.block_size, w.shape[0], p.form)
        keep_out = [(k, n) for k, n, _ in p.side_keep] or None
        if p.hessian is not None:
            qw = quantize_gptq(w, p.hessian, bits=p.bits, block_size=block, symmetric=p.symmetric, clip=p.clip,
                               keep_out=keep_out, **search)
        else:
            qw = quantize_blockwise(w, bits=p.bits, block_size=block, symmetric=p.symmetric, clip=p.clip,
                                    zscore=p.zscore, keep_out=keep_out, **search)
        del w
        if p.form == "nbits":
            b, scales, zp = to_matmulnbits(qw)
            return {"B": b, "scales": scales, "zp": zp}
        if p.block_size == PER_CHANNEL:  # DequantizeLinear axis=1: scale and zero point [N]
            return {"q": qw.q, "scale": qw.scale[0], "zp": None if qw.zero_point is None else qw.zero_point[0]}
        return {"q": qw.q, "scale": qw.scale, "zp": qw.zero_point}


def _slash_prefixes(name: str) -> list[str]:
    """Every "a/b" that `name` continues with "/" ("a/b/c" -> "a", "a/b")."""
    return [name[:i] for i, c in enumerate(name) if c == "/"]


def _rewrite_layer(main_graph: ir.Graph, layer: LinearLayer, p: LayerPlan, axes0: list[ir.Value], shared: dict,
                   prefixes: set[str]) -> None:
    node = layer.node
    graph = node.graph if node.graph is not None else main_graph  # an If branch's own graph, or the main one
    prefix = f"{layer.name}/sw_onnx_q"
    if prefix in prefixes:  # two nodes share a name
        prefix = f"{layer.name}/sw_onnx_q{layer.position}"
    prefixes.update(_slash_prefixes(prefix + "/"))  # its own tensors are named "<prefix>/..."
    alpha, beta, bias = gemm_parameters(node)
    lq = _LayerQuantizer(layer, p, alpha)
    b = GraphBuilder(graph, main_graph)
    x, old_weight = node.inputs[0], node.inputs[1]
    write = _write_nbits if p.form == "nbits" else _write_qdq
    # Layers in different branches of an If that read one initializer share its quantized tensors (quantized
    # once); within one graph each reader gets its own copy, which onnxruntime's fusion needs.
    key = (p.initializer, p.bits, p.block_size, p.symmetric, p.clip, p.zscore, p.form, alpha, tuple(p.side_keep))
    reuse = shared.get(key) if id(graph) not in shared.get(key, ((), set()))[1] else None
    main, tensors = write(b, layer, p, lq, prefix, x, axes0, reuse[0] if reuse else None)
    if reuse:
        reuse[1].add(id(graph))
        p.reason += f"; shares the quantized weight of {p.initializer} with another branch"
    else:
        shared[key] = (list(tensors), {id(graph)})
    if bias is not None:
        if beta != 1.0:
            scaled = np.asarray(bias.const_value.numpy(), dtype=np.float64) * beta
            bias = b.initializer(f"{prefix}/bias", ir.tensor(scaled.astype(bias.const_value.numpy().dtype)))
            tensors.append(bias)
        main = b.op("Add", [main, bias], f"{prefix}/AddBias", output=f"{prefix}/biased")
    if p.side_keep:
        start = len(main_graph.initializers)
        main = side_path(b, x, main, p.side_keep, layer.n, _SCALE_NUMPY[ir.DataType(p.compute_dtype)], prefix,
                         names=(f"{prefix}/keep_out/inputs", f"{prefix}/keep_out/contribution", f"{prefix}/keep_out/sum"))
        tensors += list(main_graph.initializers.values())[start:]
    replace_output(graph, node, b.nodes, main)
    p.quantized_bytes = sum(tensor_bytes(v.const_value) for v in tensors) if not reuse else 0
    remove_orphans(main_graph, old_weight)


def _write_qdq(b: GraphBuilder, layer: LinearLayer, p: LayerPlan, lq: _LayerQuantizer, prefix: str, x: ir.Value,
               axes0: list[ir.Value], weights: list[ir.Value] | None) -> tuple[ir.Value, list[ir.Value]]:
    """``MatMul(x, DequantizeLinear(codes, scale[, zero point]))``, lifted to 3-D for form ``qdq-3d``."""
    k, n, asym = layer.k, layer.n, not p.symmetric
    per_channel = p.block_size == PER_CHANNEL
    shape = (n,) if per_channel else (-(-k // kernel_block_size(p.block_size, k, p.form)), n)
    dtype = ir.DataType(p.compute_dtype)
    code_type = _CODE_TYPES[(p.bits, asym)]
    if weights is not None:
        tensors = list(weights)
    else:
        tensors = [b.lazy(f"{prefix}/weight", code_type, (k, n), lambda: codes_tensor(lq.get("q"), code_type),
                          prefetch=(lq.prefetch, k * n)),
                   b.lazy(f"{prefix}/scale", dtype, shape, lambda: ir.Tensor(lq.get("scale").astype(_SCALE_NUMPY[dtype])))]
        if asym:
            zp_type = ir.DataType.UINT4 if p.bits == 4 else ir.DataType.UINT8
            tensors.append(b.lazy(f"{prefix}/zero_point", zp_type, shape, lambda: codes_tensor(lq.get("zp"), zp_type)))
    attrs = {"axis": 1} if per_channel else {"axis": 0, "block_size": kernel_block_size(p.block_size, k, p.form)}
    weight = b.op("DequantizeLinear", tensors, f"{prefix}/DequantizeLinear", attrs, output=f"{prefix}/weight_dequantized")
    a = x
    if p.lift_3d:
        a = b.op("Unsqueeze", [x, _axes0(b, axes0)], f"{prefix}/Unsqueeze", output=f"{prefix}/input_3d")
    main = b.op("MatMul", [a, weight], layer.node_name, output=f"{prefix}/matmul_output")
    p.quantized_node = layer.node_name
    if p.lift_3d:
        main = b.op("Squeeze", [main, _axes0(b, axes0)], f"{prefix}/Squeeze", output=f"{prefix}/matmul_output_2d")
    return main, tensors


def _write_nbits(b: GraphBuilder, layer: LinearLayer, p: LayerPlan, lq: _LayerQuantizer, prefix: str, x: ir.Value,
                 axes0: list[ir.Value], weights: list[ir.Value] | None) -> tuple[ir.Value, list[ir.Value]]:
    """``com.microsoft::MatMulNBits(x, B, scales[, zero_points])``."""
    k, n = layer.k, layer.n
    bs = kernel_block_size(p.block_size, k, p.form)
    nblocks = -(-k // bs)
    dtype = ir.DataType(p.compute_dtype)
    if weights is not None:
        tensors = list(weights)
    else:
        tensors = [b.lazy(f"{prefix}/B", ir.DataType.UINT8, (n, nblocks, bs * p.bits // 8), lambda: ir.Tensor(lq.get("B")),
                          prefetch=(lq.prefetch, k * n)),
                   b.lazy(f"{prefix}/scales", dtype, (n, nblocks), lambda: ir.Tensor(lq.get("scales").astype(_SCALE_NUMPY[dtype])))]
        if not p.symmetric:
            zp_cols = -(-nblocks // 2) if p.bits == 4 else nblocks
            tensors.append(b.lazy(f"{prefix}/zero_points", ir.DataType.UINT8, (n, zp_cols), lambda: ir.Tensor(lq.get("zp"))))
    attrs = {"K": k, "N": n, "bits": p.bits, "block_size": bs, "accuracy_level": p.accuracy_level}
    main = b.op("MatMulNBits", [x, *tensors], layer.node_name, attrs, output=f"{prefix}/matmulnbits_output", domain=MS_DOMAIN)
    p.quantized_node = layer.node_name
    p.written = {part: t.name for part, t in zip(("B", "scales", "zp"), tensors)}
    return main, tensors


def _axes0(b: GraphBuilder, axes0: list[ir.Value]) -> ir.Value:
    if not axes0:
        axes0.append(b.initializer("sw_onnx/quantize/axes_0", ir.tensor(np.array([0], np.int64), name="sw_onnx/quantize/axes_0")))
    return axes0[0]
