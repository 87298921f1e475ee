"""`UpgradeOpsetPass`: raise the default-domain opset (to 21 for blocked int4 ``DequantizeLinear``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx
import onnx_ir as ir

from sw_onnx.shapes import structure_proto

__all__ = ["INT4_MIN_IR_VERSION", "QDQ_MIN_OPSET", "UpgradeOpsetPass", "UpgradeResult"]

logger = logging.getLogger(__name__)

INT4_MIN_IR_VERSION = 10
QDQ_MIN_OPSET = 21
"""``DequantizeLinear`` takes ``block_size`` and int4/uint4 from opset 21 (IR version 10)."""


@dataclass
class UpgradeResult(ir.passes.PassResult):
    """`PassResult` plus how the opset was reached.

    Attributes:
        method: ``"unchanged"`` (already there), ``"bumped"`` or ``"version_converter"``.
        from_opset: the opset before the pass.
        check_message: the checker's complaint that made the converter necessary, or "".
        structure: after a bump, the model's `structure_proto` at the new opset (for `value_types` while the
            graph is unchanged), else None.
    """

    method: str = "unchanged"
    from_opset: int | None = None
    check_message: str = ""
    structure: onnx.ModelProto | None = None


class UpgradeOpsetPass(ir.passes.InPlacePass):
    """Raise the default-domain opset import to `target` (and the IR version to 10).

    First a plain bump, kept when ``onnx.checker`` accepts every node of the weight-less graph at the new
    opset (true for most exports: the ops between 17 and 21 mostly gained types). Otherwise (e.g.
    ``ReduceMean`` with an ``axes`` attribute, an input since 18) the weight-less graph goes through
    ``onnx.version_converter`` and the original weights are re-attached by name.

    Attributes:
        target: the opset to reach.

    Returns an `UpgradeResult`.

    Raises:
        PreconditionError: the converted graph still fails the checker, or the conversion fails.
    """

    def __init__(self, target: int = QDQ_MIN_OPSET):
        super().__init__()
        self.target = target

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = model.opset_imports.get("", None)
        if current is not None and current >= self.target:
            return UpgradeResult(model, modified=False, method="unchanged", from_opset=current)
        proto = structure_proto(model)
        bumped = _with_opset(proto, self.target)
        try:
            onnx.checker.check_model(bumped)
        except onnx.checker.ValidationError as e:
            message = str(e).strip().splitlines()[0]
        else:
            model.opset_imports[""] = self.target
            model.ir_version = max(model.ir_version or 0, INT4_MIN_IR_VERSION)
            return UpgradeResult(model, modified=True, method="bumped", from_opset=current, structure=bumped)
        logger.info("opset %s -> %s: plain bump rejected (%s); using onnx.version_converter", current, self.target, message)
        self._convert(model, proto, current, message)
        return UpgradeResult(model, modified=True, method="version_converter", from_opset=current, check_message=message)

    def _convert(self, model: ir.Model, proto: onnx.ModelProto, current: int | None, message: str) -> None:
        """``onnx.version_converter`` on the weight-less graph; the original weights re-attached by name."""
        try:
            converted = onnx.version_converter.convert_version(proto, self.target)
            converted.ir_version = max(converted.ir_version, INT4_MIN_IR_VERSION)
            onnx.checker.check_model(converted)
        except Exception as e:
            raise ir.passes.PreconditionError(
                f"cannot raise the opset from {current} to {self.target}: plain bump: {message}; "
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


def _with_opset(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for imp in out.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = opset
    out.ir_version = max(out.ir_version, INT4_MIN_IR_VERSION)
    return out
