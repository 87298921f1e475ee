"""The one place that loads and saves models, and turns a model into an onnxruntime session.

- `sw_onnx.io.load`: find the .onnx a user means (`resolve_model_path`), load it with its weights lazy and
  everything validated first (`load_model`), walk its tensors (`iter_tensors`).
- `sw_onnx.io.save`: write a model (`save_model`, the largest `PREFETCH` work started first) or a text file
  (`write_text_atomic`) atomically (`publish`); serialize a model without its weights (`proto_with_placeholders`).
- `sw_onnx.io.session`: the one session factory (`open_session`: a file, an export folder, an in-memory
  model or a session), in-memory models without a copy of their weights (`create_session`,
  `StreamingSession`), arrays as OrtValues (`ort_value`).

Every name below is importable from `sw_onnx.io` itself.
"""

from __future__ import annotations

from sw_onnx.io.load import (
    MIN_OPSET,
    MODEL_FILE_NAMES,
    check_acyclic,
    check_arity,
    check_graph_references,
    check_names,
    check_opset,
    check_tensors,
    iter_tensors,
    load_model,
    resolve_model_path,
    stores_weights_externally,
    supported_opsets,
)
from sw_onnx.io.save import PREFETCH, proto_with_placeholders, publish, save_model, write_text_atomic
from sw_onnx.io.session import StreamingSession, create_session, open_session, ort_value

__all__ = [
    "MIN_OPSET",
    "MODEL_FILE_NAMES",
    "PREFETCH",
    "StreamingSession",
    "check_acyclic",
    "check_arity",
    "check_graph_references",
    "check_names",
    "check_opset",
    "check_tensors",
    "create_session",
    "iter_tensors",
    "load_model",
    "open_session",
    "ort_value",
    "proto_with_placeholders",
    "publish",
    "resolve_model_path",
    "save_model",
    "stores_weights_externally",
    "supported_opsets",
    "write_text_atomic",
]
