"""Which operators exist: ONNX's own, and the ones the installed onnxruntime registers (its contrib ops).

onnxruntime-genai's builder and onnxruntime's transformer optimizer write ops that ONNX does not define:
``SimplifiedLayerNormalization`` (registered by onnxruntime in the default domain), and in ``com.microsoft``
``SkipSimplifiedLayerNormalization``, ``SkipLayerNormalization``, ``GroupQueryAttention``,
``MultiHeadAttention``, ``RotaryEmbedding``, ... A model may use any op that onnxruntime can run; an op that
neither ONNX nor the installed onnxruntime knows is refused, as before.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

__all__ = ["ONNXRUNTIME_DOMAINS", "OpSchema", "find_schema", "onnxruntime_only_ops"]

ONNXRUNTIME_DOMAINS = ("", "ai.onnx", "com.microsoft")
"""Domains whose ops are checked (others, e.g. custom ops of an application, are left to the runtime)."""


@dataclass(frozen=True)
class OpSchema:
    """What the loader checks of an op: where it comes from and how many inputs/outputs it takes."""

    source: str  # "onnx" or "onnxruntime"
    min_input: int
    max_input: int
    min_output: int
    max_output: int


def find_schema(domain: str, op_type: str, opset: int | None) -> OpSchema | None:
    """The schema of `op_type` in `domain` at `opset` (ONNX's first, then onnxruntime's), or None."""
    domain = "" if domain == "ai.onnx" else domain
    if domain == "" and opset is not None:
        import onnx

        try:
            s = onnx.defs.get_schema(op_type, opset, "")
            return OpSchema("onnx", s.min_input, s.max_input, s.min_output, s.max_output)
        except Exception:  # not an ONNX op at this opset: perhaps onnxruntime's
            pass
    return _onnxruntime_schemas().get((domain, op_type))


def onnxruntime_only_ops(nodes) -> list[str]:
    """``domain::op`` of the nodes whose op only onnxruntime defines (the onnx checker rejects them)."""
    found = set()
    for node in nodes:
        domain = "" if node.domain == "ai.onnx" else node.domain
        if domain == "com.microsoft" or (domain == "" and (domain, node.op_type) in _onnxruntime_schemas()
                                          and not _is_onnx_op(node.op_type)):
            found.add(f"{domain or 'ai.onnx'}::{node.op_type}")
    return sorted(found)


@functools.lru_cache(maxsize=None)
def _is_onnx_op(op_type: str) -> bool:
    import onnx

    return onnx.defs.has(op_type)


@functools.lru_cache(maxsize=1)
def _onnxruntime_schemas() -> dict[tuple[str, str], OpSchema]:
    """onnxruntime's registered schemas, newest version per op (contrib ops included)."""
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema
    except ImportError:  # pragma: no cover
        return {}
    found: dict[tuple[str, str], tuple[int, OpSchema]] = {}
    for s in get_all_operator_schema():
        key = (s.domain, s.name)
        if key not in found or s.since_version > found[key][0]:
            found[key] = (s.since_version, OpSchema("onnxruntime", s.min_input, s.max_input, s.min_output, s.max_output))
    return {key: schema for key, (_, schema) in found.items()}
