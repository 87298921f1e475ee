"""Quantize the weights of linear layers blockwise (int4/int8), keeping chosen super weights exact.

Two passes and their helpers:

- `UpgradeOpsetPass` raises the default-domain opset (to 21 for blocked int4 ``DequantizeLinear``): a plain
  bump when every node of the graph is still valid at the new opset (checked with ``onnx.checker`` on a copy
  of the graph *without weight data*), else ``onnx.version_converter`` on that weight-less copy, with the
  original weights re-attached by name.
- `QuantizeWeightsPass` rewrites every linear layer (MatMul/Gemm with a constant weight, found by
  `sw_onnx.discover.find_linear_layers`) into a form onnxruntime runs as ``com.microsoft::MatMulNBits``:

  ``format="qdq"`` (standard ONNX, opset >= 21)::

      y = MatMul(x, DequantizeLinear(Wq [K, N], scale [ceil(K/B), N], zero_point, axis=0, block_size=B))
      y = MatMul(x, DequantizeLinear(Wq [K, N], scale [N], zero_point [N], axis=1))      # per-channel

  onnxruntime fuses both (per-channel too, for int4/uint4/int8/uint8: it re-blocks the weight along K).
  A block size above a layer's K gives one block per column, the same numbers as per-channel; it is
  written as given (``block_size=B``, one padded block), as onnxruntime's own quantizer does.

  onnxruntime fuses this at session load (EXTENDED level). With 2-D activations a following non-constant
  ``Add`` would first turn the MatMul into a Gemm and block that fusion, so such layers are lifted to 3-D
  (``Unsqueeze(x, 0) -> MatMul -> Squeeze(0)``, form ``"qdq-3d"``), which fuses.

  ``format="nbits"``: ``com.microsoft::MatMulNBits`` written directly (`sw_onnx.kernels.to_matmulnbits`),
  with a per-node ``accuracy_level``.

  Kept-out super weights are zeroed in ``Wq`` (the code that dequantizes to exactly 0) and left out of their
  block's range; their exact values come back on a side path that does not stop the fusion::

      y = main + MatMul(Gather(x, cols, axis=-1), S)      # S float [len(cols), N], only the kept values

  A Gemm ``(transB=1)`` becomes ``MatMul(x, DQ(alpha * W^T))`` (+ ``Add(beta * C)``). Weights behind
  Cast/Transpose/Reshape are quantized as the effective float ``[K, N]`` the layer computes with; every
  quantized consumer of a shared (tied) weight gets its own copy, and the float original stays only while
  something else (e.g. an embedding Gather) still reads it. Quantized tensors are ``ir.LazyTensor``s: the
  kernels run when the model is saved, one layer at a time.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir

from sw_onnx.discover import LinearLayer, WeightChain, find_linear_layers
from sw_onnx.io import proto_with_placeholders
from sw_onnx.kernels import ClipMode, pack_int4_low_first, quantize_blockwise, to_matmulnbits

__all__ = [
    "FORMATS",
    "QDQ_MIN_OPSET",
    "KeepCoordinate",
    "PER_CHANNEL",
    "LayerDecision",
    "QuantizeWeightsPass",
    "UpgradeOpsetPass",
    "block_label",
    "kernel_block_size",
    "find_lm_head",
    "structure_proto",
    "value_types",
]

logger = logging.getLogger(__name__)

PER_CHANNEL = 0
"""``block_size`` value meaning one scale per output channel (DequantizeLinear ``axis=1``)."""
LM_HEAD_BLOCK_SIZE = 32
"""Block of ``lm_head_bits``: 8-bit b32 cost nothing measurable on SmolLM2 (b128: +0.15 perplexity)."""

QDQ_MIN_OPSET = 21
"""``DequantizeLinear`` takes ``block_size`` and int4/uint4 from opset 21 (IR version 10)."""
INT4_MIN_IR_VERSION = 10
FORMATS = ("qdq", "nbits")
MS_DOMAIN = "com.microsoft"

KeepCoordinate = tuple[str, tuple[int, ...]]
"""A weight scalar: (initializer name, index in the initializer's own layout)."""

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_SCALE_NUMPY = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16, ir.DataType.BFLOAT16: ml_dtypes.bfloat16}
# Ops a logits output may pass through after the lm_head (softcapping, reshapes, casts).
_LOGITS_TAIL_OPS = {"Cast", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Add", "Mul", "Div", "Tanh"}


@dataclass
class LayerDecision:
    """What the pass did with one linear layer, and why.

    Attributes:
        node: the MatMul/Gemm node's name (``<op>_<position>`` when unnamed).
        op_type: ``MatMul`` or ``Gemm``.
        initializer: the float weight initializer the layer read.
        position: index among the graph's linear layers, topological order.
        layer: decoder layer index parsed from names, or None.
        k, n: effective weight shape ``[K, N]`` (in, out).
        action: ``"quantized"`` or ``"skipped"``.
        reason: why skipped, or a short note on how it was quantized.
        form: ``"qdq"``, ``"qdq-3d"`` (2-D activations lifted to 3-D so that no Gemm forms) or ``"nbits"``.
        is_lm_head: the layer whose output is the logits.
        kept: kept-out weights, ``{"index": [...] (initializer layout), "k", "n", "value"}`` each.
        accuracy_level: MatMulNBits ``accuracy_level`` written (nbits format), else None.
        float_bytes: bytes of the effective float weight this layer read.
        quantized_bytes: bytes of the tensors written for it (codes, scales, zero points, side path).
        quantized_node: name of the node that multiplies by the quantized weight in the output graph.
    """

    node: str
    op_type: str
    initializer: str
    position: int
    layer: int | None
    k: int
    n: int
    action: str = "quantized"
    reason: str = ""
    form: str | None = None
    is_lm_head: bool = False
    kept: list[dict] = field(default_factory=list)
    accuracy_level: int | None = None
    float_bytes: int = 0
    quantized_bytes: int = 0
    quantized_node: str | None = None


# ----------------------------------------------------------------------------------------------
# Weight-less views of a model: for the checker, the version converter and shape inference.


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


# ----------------------------------------------------------------------------------------------


class UpgradeOpsetPass(ir.passes.InPlacePass):
    """Raise the default-domain opset import to `target` (and the IR version to 10).

    First a plain bump, kept when ``onnx.checker`` accepts every node of the weight-less graph at the new
    opset (true for most exports: the ops between 17 and 21 mostly gained types). Otherwise (e.g.
    ``ReduceMean`` with an ``axes`` attribute, an input since 18) the weight-less graph goes through
    ``onnx.version_converter`` and the original weights are re-attached by name.

    Attributes:
        target: the opset to reach.
        method: after a call: ``"unchanged"`` (already there), ``"bumped"`` or ``"version_converter"``.
        from_opset: the opset before the call.
        check_message: the checker's complaint that made the converter necessary, or "".
        structure: after a call that changed the opset, the model's `structure_proto` at the new opset (for
            `value_types`, as long as the graph is not changed further), else None.

    Raises:
        PreconditionError: the converted graph still fails the checker, or the conversion fails.
    """

    def __init__(self, target: int = QDQ_MIN_OPSET):
        super().__init__()
        self.target = target
        self.method = "unchanged"
        self.from_opset: int | None = None
        self.check_message = ""
        self.structure: onnx.ModelProto | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = model.opset_imports.get("", None)
        self.from_opset = current
        self.structure = None
        if current is not None and current >= self.target:
            self.method = "unchanged"
            return ir.passes.PassResult(model, modified=False)
        proto = structure_proto(model)
        bumped = _with_opset(proto, self.target)
        try:
            onnx.checker.check_model(bumped)
        except onnx.checker.ValidationError as e:
            self.check_message = str(e).strip().splitlines()[0]
        else:
            model.opset_imports[""] = self.target
            model.ir_version = max(model.ir_version or 0, INT4_MIN_IR_VERSION)
            self.method = "bumped"
            self.structure = bumped
            return ir.passes.PassResult(model, modified=True)
        logger.info("opset %s -> %s: plain bump rejected (%s); using onnx.version_converter", current, self.target, self.check_message)
        try:
            converted = onnx.version_converter.convert_version(proto, self.target)
            converted.ir_version = max(converted.ir_version, INT4_MIN_IR_VERSION)
            onnx.checker.check_model(converted)
        except Exception as e:
            raise ir.passes.PreconditionError(
                f"cannot raise the opset from {current} to {self.target}: plain bump: {self.check_message}; "
                f"onnx.version_converter: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
            ) from e
        new_graph = ir.from_proto(converted).graph
        weights = {name: value.const_value for name, value in model.graph.initializers.items()}
        declared_inputs = {value.name for value in model.graph.inputs}
        for value in list(new_graph.inputs):
            if value.name in weights and weights[value.name] is not None:
                if value.name not in declared_inputs:  # an initializer made an input by structure_proto
                    new_graph.inputs.remove(value)
                value.const_value = weights[value.name]
                new_graph.register_initializer(value)
        model.graph = new_graph
        model.ir_version = max(model.ir_version or 0, converted.ir_version, INT4_MIN_IR_VERSION)
        self.method = "version_converter"
        return ir.passes.PassResult(model, modified=True)


def _with_opset(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for imp in out.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = opset
    out.ir_version = max(out.ir_version, INT4_MIN_IR_VERSION)
    return out


# ----------------------------------------------------------------------------------------------


def find_lm_head(model: ir.Model, layers: Sequence[LinearLayer]) -> LinearLayer | None:
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
class _Plan:
    """Everything decided for one layer before the graph is touched."""

    layer: LinearLayer
    decision: LayerDecision
    compute_dtype: ir.DataType
    alpha: float
    bias: ir.Value | None
    beta: float
    keep_kn: list[tuple[int, int, float]]  # (k, n, exact value) in the effective [K, N]
    wrap_3d: bool
    bits: int  # the pass's, or the lm_head's own
    block_size: int


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Quantize linear-layer weights blockwise, keeping chosen weights exact on a fusable side path.

    The defaults are `sw_onnx.quantize.QuantizeConfig`'s (int4 with zero points, blocks of 32, ``clip="mse"``
    over both range families), where the measurements behind them are.

    Attributes:
        bits: 4 or 8.
        block_size: weights per block along K (power of two >= 16, what MatMulNBits accepts), or
            `PER_CHANNEL` (0): one scale per output channel over all of K. A layer whose K is at most the
            block size gets one block per column (the same numbers as per-channel).
        symmetric: signed codes, no zero point (scale ``m / -2**(bits-1)``); else uint codes + zero point.
        clip: ``"none"`` (min-max round-to-nearest), ``"zscore"`` or ``"mse"`` (see `sw_onnx.kernels`).
        zscore: z of ``clip="zscore"`` (None: the kernel's default).
        keep: weights kept out: (initializer name, index in its own layout). Coordinates of weights that
            are not quantized are ignored (and listed in `unused_keep`).
        exclude: node-name glob patterns (``fnmatch``) of layers to leave float.
        include_lm_head: quantize the layer whose output is the logits too, like the others.
        lm_head_bits: without `include_lm_head`: quantize the lm_head at these bits (4 or 8) in blocks of
            `lm_head_block_size` (``accuracy_level`` 4 in nbits: onnxruntime's 8-bit kernel at levels 0-3
            is a fallback ~15x slower than fp32 on CPU); 0 leaves it float.
        lm_head_block_size: see `lm_head_bits`.
        format: ``"qdq"`` (DequantizeLinear + MatMul, opset >= 21) or ``"nbits"`` (MatMulNBits).
        accuracy_levels: nbits only: per node name ``accuracy_level`` (1 fp32 ... 4 int8 activations);
            nodes not listed get `default_accuracy_level`.
        default_accuracy_level: nbits only, see above.
        activation_types: ``{value name: (ONNX elem type, rank)}`` hints (`value_types`), used for
            activations without a declared type/shape; None computes them when needed.
        structure: the model's current `structure_proto` (e.g. `UpgradeOpsetPass.structure`), used when the
            hints have to be computed; None serializes the graph for that.
        decisions: after a call, one `LayerDecision` per linear layer, in topological order.
        unused_keep: after a call, keep coordinates that matched no quantized layer.
    """

    def __init__(
        self,
        *,
        bits: int = 4,
        block_size: int = 32,
        symmetric: bool = False,
        clip: ClipMode = "mse",
        zscore: float | None = None,
        keep: Iterable[KeepCoordinate] = (),
        exclude: Iterable[str] = (),
        include_lm_head: bool = False,
        lm_head_bits: int = 0,
        lm_head_block_size: int = LM_HEAD_BLOCK_SIZE,
        format: str = "qdq",
        accuracy_levels: Mapping[str, int] | None = None,
        default_accuracy_level: int = 4,
        activation_types: Mapping[str, tuple[int, int | None]] | None = None,
        structure: onnx.ModelProto | None = None,
    ):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits!r}")
        if lm_head_bits not in (0, 4, 8):
            raise ValueError(f"lm_head_bits must be 0 (float), 4 or 8, got {lm_head_bits!r}")
        for name, size in (("block_size", block_size), ("lm_head_block_size", lm_head_block_size)):
            if (isinstance(size, bool) or not isinstance(size, int)
                    or (size != PER_CHANNEL and (size < 16 or size & (size - 1)))):
                raise ValueError(f"{name} must be a power of two >= 16 or {PER_CHANNEL} (per-channel), got {size!r}")
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        self.bits = bits
        self.block_size = block_size
        self.symmetric = symmetric
        self.clip = clip
        self.zscore = zscore
        self.keep = [(str(name), tuple(int(i) for i in index)) for name, index in keep]
        self.exclude = list(exclude)
        self.include_lm_head = include_lm_head
        self.lm_head_bits = lm_head_bits
        self.lm_head_block_size = lm_head_block_size
        self.format = format
        self.accuracy_levels = dict(accuracy_levels or {})
        self.default_accuracy_level = default_accuracy_level
        self.activation_types = activation_types
        self.structure = structure
        self.decisions: list[LayerDecision] = []
        self.unused_keep: list[KeepCoordinate] = []
        # Fail on bad clip options now, not at save time inside a lazy tensor.
        quantize_blockwise(np.zeros((1, 1), np.float32), bits=bits, block_size=block_size or None, symmetric=symmetric,
                           clip=clip, zscore=zscore)

    def requires(self, model: ir.Model) -> None:
        opset = model.opset_imports.get("", 0)
        if self.format == "qdq" and opset < QDQ_MIN_OPSET:
            raise ir.passes.PreconditionError(
                f"blocked int4/int8 DequantizeLinear needs opset >= {QDQ_MIN_OPSET}, the model has {opset}: "
                "run UpgradeOpsetPass first"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        plans, self.decisions, self.unused_keep = self._plan(model)
        rewriter = _Rewriter(model.graph, self)
        for plan in plans:
            rewriter.rewrite(plan)
        if plans:
            if self.format == "nbits":
                model.opset_imports.setdefault(MS_DOMAIN, 1)
            elif any(plan.bits == 4 for plan in plans):
                model.ir_version = max(model.ir_version or 0, INT4_MIN_IR_VERSION)
        logger.info("quantized %d of %d linear layers", len(plans), len(self.decisions))
        return ir.passes.PassResult(model, modified=bool(plans))

    # -- planning ------------------------------------------------------------------------------

    def _plan(self, model: ir.Model) -> tuple[list[_Plan], list[LayerDecision], list[KeepCoordinate]]:
        layers, _ = find_linear_layers(model)
        lm_head = find_lm_head(model, layers)
        keep_by_init: dict[str, list[tuple[int, ...]]] = {}
        for name, index in self.keep:
            keep_by_init.setdefault(name, []).append(index)
        types = self.activation_types
        if types is None and any(layer.input.shape is None or layer.input.dtype is None for layer in layers):
            types = value_types(model, self.structure)
        types = types or {}
        plans, decisions, used = [], [], set()
        for layer in layers:
            chain = layer.weight
            decision = LayerDecision(
                node=layer.name, op_type=layer.node.op_type, initializer=chain.initializer.name,
                position=layer.position, layer=layer.layer, k=layer.k, n=layer.n, is_lm_head=layer is lm_head,
                float_bytes=layer.k * layer.n * _itemsize(chain.initializer.dtype),
            )
            decisions.append(decision)
            compute_dtype = _compute_dtype(layer, types)
            reason = self._skip_reason(layer, decision, compute_dtype)
            alpha, beta, bias = _gemm_parameters(layer.node)
            if reason is None and bias is not None and beta != 1.0 and bias.const_value is None:
                reason = f"Gemm with beta={beta} on a non-constant C"
            if reason is not None:
                decision.action, decision.reason = "skipped", reason
                continue
            keep_kn = []
            stored = chain.initializer.const_value.numpy() if chain.initializer.name in keep_by_init else None
            for index in keep_by_init.get(chain.initializer.name, []):
                k, n = _initializer_to_effective(chain, index)
                value = float(np.asarray(stored[index], dtype=np.float64)) * alpha
                keep_kn.append((k, n, value))
                decision.kept.append({"index": list(index), "k": k, "n": n, "value": value})
                used.add((chain.initializer.name, index))
            wrap = self.format == "qdq" and _rank(layer.input, types) != 3 and (
                bool(keep_kn) or (bias is not None and bias.const_value is None) or _feeds_nonconstant_add(layer.output)
            )
            own_bits = decision.is_lm_head and not self.include_lm_head  # reached only with lm_head_bits
            bits, block_size = (self.lm_head_bits, self.lm_head_block_size) if own_bits else (self.bits, self.block_size)
            if self.format == "nbits":
                decision.form = "nbits"
                decision.accuracy_level = 4 if own_bits else self.accuracy_levels.get(layer.name, self.default_accuracy_level)
            else:
                decision.form = "qdq-3d" if wrap else "qdq"
            decision.reason = _describe(decision, self, wrap, bits, block_size)
            if own_bits:
                decision.reason += "; the lm_head's own bits (lm_head_bits)"
            plans.append(_Plan(layer, decision, compute_dtype, alpha, bias, beta, keep_kn, wrap, bits, block_size))
        unused = [c for c in self.keep if c not in used]
        return plans, decisions, unused

    def _skip_reason(self, layer: LinearLayer, decision: LayerDecision, compute_dtype: ir.DataType | None) -> str | None:
        for pattern in self.exclude:
            if fnmatch.fnmatchcase(layer.name, pattern):
                return f"excluded by pattern {pattern!r}"
        if decision.is_lm_head and not self.include_lm_head and not self.lm_head_bits:
            return "lm_head (its output is the logits) kept float: include_lm_head is off"
        dtype = layer.weight.initializer.dtype
        if dtype not in _FLOAT_TYPES:
            return f"weight is {dtype}, not floating point"
        if compute_dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            return f"activations are {compute_dtype}: MatMulNBits needs float or float16"
        return None


def _describe(decision: LayerDecision, p: QuantizeWeightsPass, wrap: bool, bits: int, block_size: int) -> str:
    kind = f"{'int' if p.symmetric else 'uint'}{bits} {block_label(block_size)}"
    parts = [kind, f"clip {p.clip}"]
    if decision.op_type == "Gemm":
        parts.append("Gemm rewritten as MatMul")
    if decision.kept:
        parts.append(f"{len(decision.kept)} kept out")
    if wrap:
        parts.append("2-D activations lifted to 3-D so MatMul+Add does not become Gemm")
    if decision.accuracy_level is not None:
        parts.append(f"accuracy_level {decision.accuracy_level}")
    return ", ".join(parts)


def block_label(block_size: int) -> str:
    """``"b32"``, or ``"per-channel"`` for `PER_CHANNEL`."""
    return "per-channel" if block_size == PER_CHANNEL else f"b{block_size}"


def kernel_block_size(block_size: int, k: int, form: str) -> int:
    """The kernel's block size for a layer of depth `k`: `block_size`, or for per-channel `k` (QDQ
    ``axis=1``) or, for MatMulNBits written directly, the next power of two >= max(k, 16): one padded block
    per column, the same codes and scales as per-channel."""
    if block_size != PER_CHANNEL:
        return block_size
    if form != "nbits":
        return k
    return max(16, 1 << (k - 1).bit_length())


def _itemsize(dtype: ir.DataType) -> int:
    return max(1, int(dtype.itemsize)) if dtype is not None else 4


def _gemm_parameters(node: ir.Node) -> tuple[float, float, ir.Value | None]:
    """(alpha, beta, C) of a Gemm; (1, 1, None) for a MatMul."""
    if node.op_type != "Gemm":
        return 1.0, 1.0, None
    alpha = node.attributes.get("alpha")
    beta = node.attributes.get("beta")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return (alpha.as_float() if alpha is not None else 1.0), (beta.as_float() if beta is not None else 1.0), bias


def _compute_dtype(layer: LinearLayer, types: Mapping[str, tuple[int, int | None]]) -> ir.DataType | None:
    """The float type the layer multiplies in: its activation's type, else the weight chain's last Cast."""
    for value in (layer.input, layer.output):
        if value.dtype is not None:
            return value.dtype
        if value.name in types and types[value.name][0]:
            return ir.DataType(types[value.name][0])
    value = layer.node.inputs[1]
    while value is not None and value.const_value is None:
        producer = value.producer()
        if producer is None:
            break
        if producer.op_type == "Cast":
            return ir.DataType(producer.attributes["to"].as_int())
        value = producer.inputs[0]
    return layer.weight.initializer.dtype


def _rank(value: ir.Value, types: Mapping[str, tuple[int, int | None]]) -> int | None:
    """3 for rank >= 3, else the known rank, else None."""
    rank = len(value.shape) if value.shape is not None else types.get(value.name, (0, None))[1]
    return None if rank is None else min(rank, 3)


def _feeds_nonconstant_add(value: ir.Value) -> bool:
    """Whether an Add of two activations reads `value` (onnxruntime would fuse a 2-D MatMul into a Gemm)."""
    for use in value.uses():
        node = use.node
        if node.op_type == "Add" and all(i is not None and i.const_value is None for i in node.inputs):
            return True
    return False


def _initializer_to_effective(chain: WeightChain, index: Sequence[int]) -> tuple[int, int]:
    """Map an index in the initializer's own layout to the effective ``[K, N]`` (inverse of
    `WeightChain.effective_to_initializer_index`).

    Raises:
        IndexError: the index does not fit the initializer.
    """
    shape = tuple(chain.initializer.shape.numpy())
    idx = tuple(int(i) for i in index)
    if len(idx) != len(shape) or any(not 0 <= i < s for i, s in zip(idx, shape)):
        raise IndexError(f"{chain.initializer.name}: index {list(idx)} outside shape {list(shape)}")
    current = shape
    for op, out_shape, perm in chain.steps:
        if op == "Transpose":
            idx = tuple(idx[p] for p in perm)
        elif op == "Reshape":
            idx = tuple(int(i) for i in np.unravel_index(np.ravel_multi_index(idx, current), out_shape))
        current = out_shape
    k, n = (idx[1], idx[0]) if chain.transposed else idx
    return int(k), int(n)


# ----------------------------------------------------------------------------------------------
# Rewriting


class _LayerQuantizer:
    """Quantizes one layer's weight when its first lazy tensor is saved; forgets it once all are taken.

    Peak memory is then about one float weight (plus the kernel's temporaries) however large the model.
    A part asked for again later (a second save) is simply recomputed.
    """

    def __init__(self, plan: _Plan, p: QuantizeWeightsPass):
        self.chain, self.p, self.alpha, self.keep_kn = plan.layer.weight, p, plan.alpha, plan.keep_kn
        self.bits, self.block_size = plan.bits, plan.block_size
        self.part_names = {"q", "scale"} if p.format == "qdq" else {"B", "scales"}
        if not p.symmetric:
            self.part_names.add("zp")
        self._parts: dict[str, np.ndarray | None] | None = None
        self._taken: set[str] = set()
        self._lock = threading.Lock()  # the saver computes several layers' parts on threads at once

    def get(self, part: str) -> np.ndarray:
        with self._lock:
            return self._get(part)

    def _get(self, part: str) -> np.ndarray:
        if self._parts is None:
            w = self.chain.effective_weight()
            if self.alpha != 1.0:
                w = w * np.float32(self.alpha)
            keep = [(k, n) for k, n, _ in self.keep_kn] or None
            qw = quantize_blockwise(
                w, bits=self.bits, block_size=kernel_block_size(self.block_size, w.shape[0], self.p.format),
                symmetric=self.p.symmetric, clip=self.p.clip, zscore=self.p.zscore, keep_out=keep,
            )
            del w
            if self.p.format == "nbits":
                b, scales, zp = to_matmulnbits(qw)
                self._parts = {"B": b, "scales": scales, "zp": zp}
            elif self.block_size == PER_CHANNEL:  # DequantizeLinear axis=1: scale and zero point [N]
                zp = None if qw.zero_point is None else qw.zero_point[0]
                self._parts = {"q": qw.q, "scale": qw.scale[0], "zp": zp}
            else:
                self._parts = {"q": qw.q, "scale": qw.scale, "zp": qw.zero_point}
        array = self._parts[part]
        self._taken.add(part)
        if self._taken >= self.part_names:
            self._parts, self._taken = None, set()
        return array


class _Rewriter:
    def __init__(self, graph: ir.Graph, p: QuantizeWeightsPass):
        self.graph, self.p = graph, p
        self._axes0: ir.Value | None = None

    def _initializer(self, name: str, tensor: ir.TensorProtocol) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def _lazy(self, name: str, dtype: ir.DataType, shape: Sequence[int], make) -> ir.Value:
        return self._initializer(name, ir.LazyTensor(make, dtype=dtype, shape=ir.Shape(list(shape)), name=name))

    def _axes0_value(self) -> ir.Value:
        if self._axes0 is None:
            self._axes0 = self._initializer("sw_onnx/quantize/axes_0", ir.tensor(np.array([0], np.int64), name="sw_onnx/quantize/axes_0"))
        return self._axes0

    def rewrite(self, plan: _Plan) -> None:
        layer, decision, p = plan.layer, plan.decision, self.p
        node, graph = layer.node, self.graph
        prefix = f"{layer.name}/sw_onnx_q"
        if any(name.startswith(prefix + "/") for name in graph.initializers):  # two nodes share a name
            prefix = f"{layer.name}/sw_onnx_q{layer.position}"
        k, n, bits = layer.k, layer.n, plan.bits
        bs = kernel_block_size(plan.block_size, k, p.format)
        nblocks = -(-k // bs)
        per_channel_qdq = p.format == "qdq" and plan.block_size == PER_CHANNEL
        scale_shape = (n,) if per_channel_qdq else (nblocks, n)
        scale_np = _SCALE_NUMPY[plan.compute_dtype]
        asym = not p.symmetric
        x = node.inputs[0]
        old_weight_input = node.inputs[1]
        new_nodes: list[ir.Node] = []
        tensors: list[ir.Value] = []

        if p.format == "qdq":
            lq = _LayerQuantizer(plan, p)
            code_type = {(4, False): ir.DataType.INT4, (4, True): ir.DataType.UINT4,
                         (8, False): ir.DataType.INT8, (8, True): ir.DataType.UINT8}[(bits, asym)]
            tensors.append(self._lazy(f"{prefix}/weight", code_type, (k, n), lambda: _codes_tensor(lq.get("q"), code_type)))
            tensors.append(self._lazy(f"{prefix}/scale", plan.compute_dtype, scale_shape,
                                      lambda: ir.Tensor(lq.get("scale").astype(scale_np))))
            if asym:
                zp_type = ir.DataType.UINT4 if bits == 4 else ir.DataType.UINT8
                tensors.append(self._lazy(f"{prefix}/zero_point", zp_type, scale_shape,
                                          lambda: _codes_tensor(lq.get("zp"), zp_type)))
            dq_attrs = {"axis": 1} if per_channel_qdq else {"axis": 0, "block_size": bs}
            dq = ir.node("DequantizeLinear", tensors, dq_attrs, name=f"{prefix}/DequantizeLinear")
            dq.outputs[0].name = f"{prefix}/weight_dequantized"
            new_nodes.append(dq)
            a = x
            if plan.wrap_3d:
                unsq = ir.node("Unsqueeze", [x, self._axes0_value()], name=f"{prefix}/Unsqueeze")
                unsq.outputs[0].name = f"{prefix}/input_3d"
                new_nodes.append(unsq)
                a = unsq.outputs[0]
            mm = ir.node("MatMul", [a, dq.outputs[0]], name=layer.name)
            mm.outputs[0].name = f"{prefix}/matmul_output"
            new_nodes.append(mm)
            main = mm.outputs[0]
            if plan.wrap_3d:
                sq = ir.node("Squeeze", [main, self._axes0_value()], name=f"{prefix}/Squeeze")
                sq.outputs[0].name = f"{prefix}/matmul_output_2d"
                new_nodes.append(sq)
                main = sq.outputs[0]
            decision.quantized_node = mm.name
        else:
            blob = bs * bits // 8
            lq = _LayerQuantizer(plan, p)
            tensors.append(self._lazy(f"{prefix}/B", ir.DataType.UINT8, (n, nblocks, blob),
                                      lambda: ir.Tensor(lq.get("B"))))
            tensors.append(self._lazy(f"{prefix}/scales", plan.compute_dtype, (n, nblocks),
                                      lambda: ir.Tensor(lq.get("scales").astype(scale_np))))
            inputs = [x, *tensors]
            if asym:
                zp_cols = -(-nblocks // 2) if bits == 4 else nblocks
                zp = self._lazy(f"{prefix}/zero_points", ir.DataType.UINT8, (n, zp_cols),
                                lambda: ir.Tensor(lq.get("zp")))
                tensors.append(zp)
                inputs.append(zp)
            attrs = {"K": k, "N": n, "bits": bits, "block_size": bs, "accuracy_level": decision.accuracy_level}
            mnb = ir.node("MatMulNBits", inputs, attrs, domain=MS_DOMAIN, name=layer.name)
            mnb.outputs[0].name = f"{prefix}/matmulnbits_output"
            new_nodes.append(mnb)
            main = mnb.outputs[0]
            decision.quantized_node = mnb.name

        if plan.bias is not None:
            bias = plan.bias
            if plan.beta != 1.0:
                scaled = np.asarray(bias.const_value.numpy(), dtype=np.float64) * plan.beta
                bias = self._initializer(f"{prefix}/bias", ir.tensor(scaled.astype(bias.const_value.numpy().dtype)))
                tensors.append(bias)
            add = ir.node("Add", [main, bias], name=f"{prefix}/AddBias")
            add.outputs[0].name = f"{prefix}/biased"
            new_nodes.append(add)
            main = add.outputs[0]
        if plan.keep_kn:
            cols = sorted({kk for kk, _, _ in plan.keep_kn})
            side = np.zeros((len(cols), n), dtype=scale_np)
            for kk, nn, value in plan.keep_kn:
                side[cols.index(kk), nn] = value
            cols_v = self._initializer(f"{prefix}/keep_out/cols", ir.tensor(np.array(cols, np.int64)))
            side_v = self._initializer(f"{prefix}/keep_out/values", ir.tensor(side))
            tensors += [cols_v, side_v]
            gather = ir.node("Gather", [x, cols_v], {"axis": -1}, name=f"{prefix}/keep_out/Gather")
            gather.outputs[0].name = f"{prefix}/keep_out/inputs"
            smm = ir.node("MatMul", [gather.outputs[0], side_v], name=f"{prefix}/keep_out/MatMul")
            smm.outputs[0].name = f"{prefix}/keep_out/contribution"
            add = ir.node("Add", [main, smm.outputs[0]], name=f"{prefix}/keep_out/Add")
            add.outputs[0].name = f"{prefix}/keep_out/sum"
            new_nodes += [gather, smm, add]
            main = add.outputs[0]

        old_out = node.outputs[0]
        name = old_out.name
        main.type = old_out.type if old_out.type is not None else main.type
        main.shape = old_out.shape if old_out.shape is not None else main.shape
        old_out.replace_all_uses_with(main, replace_graph_outputs=True)
        graph.insert_after(node, new_nodes)
        graph.remove(node, safe=True)
        old_out.name = None
        main.name = name
        decision.quantized_bytes = sum(_tensor_bytes(v.const_value) for v in tensors)
        remove_orphans(self.graph, old_weight_input)


def remove_orphans(graph: ir.Graph, value: ir.Value | None) -> None:
    """Remove a replaced weight's Cast/Transpose chain and initializer once nothing reads them."""
    while value is not None and not value.uses() and not value.is_graph_output():
        producer = value.producer()
        if producer is None:
            if value.is_initializer() and not value.is_graph_input() and value.name in graph.initializers:
                graph.initializers.pop(value.name)
            return
        if any(o.uses() or o.is_graph_output() for o in producer.outputs):
            return
        upstream = producer.inputs[0] if producer.inputs else None
        graph.remove(producer, safe=True)
        value = upstream


def _codes_tensor(codes: np.ndarray, dtype: ir.DataType) -> ir.TensorProtocol:
    """An ONNX tensor of int4/uint4 (packed two per byte, low nibble first) or int8/uint8 codes."""
    if dtype in (ir.DataType.INT4, ir.DataType.UINT4):
        return ir.PackedTensor(pack_int4_low_first(codes), dtype, shape=list(codes.shape))
    return ir.Tensor(codes.astype(np.int8 if dtype == ir.DataType.INT8 else np.uint8))


def _tensor_bytes(tensor: ir.TensorProtocol) -> int:
    count = math.prod(tensor.shape.numpy())
    return int(math.ceil(count * tensor.dtype.itemsize))
