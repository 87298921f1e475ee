"""Tiny Llama-like ONNX decoders with planted super weights: ground truth for sw-onnx tests.

See :mod:`sample_models.build` for the architecture and the planted mechanism.
The names below are loaded lazily so that ``python -m sample_models.build`` runs cleanly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = [
    "ALL_VARIANTS",
    "CONTRIB_VARIANTS",
    "DEFAULT_PROMPT",
    "VARIANTS",
    "PlantedSuperWeight",
    "SampleModel",
    "build_all",
    "build_sample_model",
    "make_feeds",
    "run_sample_model",
]

if TYPE_CHECKING:  # pragma: no cover
    from sample_models.build import (
        ALL_VARIANTS,
        CONTRIB_VARIANTS,
        DEFAULT_PROMPT,
        VARIANTS,
        PlantedSuperWeight,
        SampleModel,
        build_all,
        build_sample_model,
        make_feeds,
        run_sample_model,
    )


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("sample_models.build"), name)
    raise AttributeError(f"module 'sample_models' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
