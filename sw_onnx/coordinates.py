"""Weight coordinates: the one type that names a weight scalar, its validation, and reading them from reports.

A coordinate is ``(initializer name, index in the initializer's own layout)``: what `sw-onnx detect` reports
as ``initializer`` and ``index``, what ``ablate`` scales and what ``quantize`` keeps out of its blocks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sw_onnx.errors import UsageError
from sw_onnx.schema import DETECT_SCHEMA

if TYPE_CHECKING:  # pragma: no cover
    import onnx_ir as ir

__all__ = ["Coordinate", "DetectReport", "normalize_coordinates", "read_detect_report", "validate_coordinates"]

Coordinate = tuple[str, tuple[int, ...]]
"""A weight scalar: (initializer name, index in the initializer's own layout)."""


def normalize_coordinates(coordinates: Iterable) -> list[Coordinate]:
    """``(str, tuple of int)`` pairs; `UsageError` for anything else."""
    out = []
    for c in coordinates:
        try:
            name, index = c
            out.append((str(name), tuple(int(i) for i in index)))
        except (TypeError, ValueError):
            raise UsageError(f"weight coordinate {c!r}: expected (initializer name, index tuple)") from None
    return out


def validate_coordinates(model: ir.Model, coordinates: Iterable, source: str = "coordinates", *,
                         values: Iterable[float | None] | None = None) -> list[Coordinate]:
    """Check that every coordinate names a float scalar of `model` (and, with `values`, holds that value);
    return them normalized, without duplicates.

    Raises:
        UsageError: an unknown or non-constant initializer, an index out of its shape, a non-float tensor, or
            a value that differs from the model's (the report is then for another model).
    """
    import numpy as np

    coords = normalize_coordinates(coordinates)
    expected = list(values) if values is not None else [None] * len(coords)
    problems, unique = [], []
    for (name, index), value in zip(coords, expected):
        tensor = model.graph.initializers.get(name)
        tensor = tensor.const_value if tensor is not None else None
        if tensor is None:
            problems.append(f"no initializer {name!r}")
            continue
        shape = tuple(int(d) for d in tensor.shape.numpy())
        if len(index) != len(shape) or any(not 0 <= i < d for i, d in zip(index, shape)):
            problems.append(f"index {list(index)} outside {name!r} of shape {list(shape)}")
        elif not tensor.dtype.is_floating_point():
            problems.append(f"{name!r} is not a float tensor ({tensor.dtype})")
        elif value is not None and not np.isclose(actual := float(np.asarray(tensor.numpy()[index], np.float64)),
                                                  float(value), rtol=1e-3, atol=1e-6):
            problems.append(f"{name}{list(index)} is {actual:.6g} in the model, {float(value):.6g} in {source}")
        elif (name, index) not in unique:
            unique.append((name, index))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UsageError(f"{source} does not match the model: {'; '.join(problems[:3])}{more}",
                         hint="the report is probably for another model: use one made by `sw-onnx detect` on it")
    return unique


@dataclass
class DetectReport:
    """What a ``sw-onnx detect --json`` report gives the other commands.

    Attributes:
        super_weights: ``{"node", "initializer", "index", "row", "col", "value"}`` per super weight.
        input_ranges: the ``input_ranges`` entries (dicts), or None for reports written before they existed.
        input_importance: the ``input_importance`` entries, or None likewise.
    """

    super_weights: list[dict] = field(default_factory=list)
    input_ranges: list[dict] | None = None
    input_importance: list[dict] | None = None

    @property
    def coordinates(self) -> list[Coordinate]:
        return normalize_coordinates((sw["initializer"], sw["index"]) for sw in self.super_weights)


def read_detect_report(path: str | os.PathLike, option: str = "--keep") -> DetectReport:
    """Read a ``sw-onnx detect --json`` report.

    Raises:
        UsageError: no file, not JSON, not a ``sw-onnx/detect`` report, or malformed super weights.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{option} {p}: no such file", hint="use auto, none, or a sw-onnx detect --json report") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"{option} {p}: not readable JSON ({e})") from None
    if not isinstance(data, dict) or data.get("schema") != DETECT_SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise UsageError(f"{option} {p}: not a sw-onnx detect report (schema {found!r}, expected {DETECT_SCHEMA!r})",
                         hint="write one with: sw-onnx detect MODEL --json REPORT.json")
    weights = data.get("super_weights")
    if not isinstance(weights, list):
        raise UsageError(f"{option} {p}: no super_weights list")
    records = []
    for i, sw in enumerate(weights):
        if not isinstance(sw, dict) or not isinstance(sw.get("initializer"), str) or not isinstance(sw.get("index"), list):
            raise UsageError(f"{option} {p}: super_weights[{i}] lacks an initializer name or an index list")
        records.append({"node": sw.get("node"), "initializer": sw["initializer"],
                        "index": [int(i) for i in sw["index"]], "row": sw.get("row"), "col": sw.get("col"),
                        "value": sw.get("value")})
    ranges, importance = data.get("input_ranges"), data.get("input_importance")
    return DetectReport(records, ranges if isinstance(ranges, list) else None,
                        importance if isinstance(importance, list) else None)
