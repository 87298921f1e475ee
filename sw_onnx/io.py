"""The one place that loads and saves models, and turns an in-memory model into an onnxruntime session.

Weights stay lazy: `onnx_ir.load` memory-maps external data, and sessions receive large initializers as
in-memory OrtValues (`add_external_initializers`) instead of a second serialized copy.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from sw_onnx.errors import ModelLoadError

logger = logging.getLogger(__name__)

MODEL_FILE_NAMES = ("model.onnx", "decoder_model.onnx", "model_quantized.onnx")
# Initializers at least this large go to onnxruntime as in-memory OrtValues rather than protobuf bytes.
_IN_MEMORY_THRESHOLD_BYTES = 1024
_IN_MEMORY_LOCATION = "sw-onnx-in-memory.bin"  # never read: onnxruntime gets these bytes from memory


def resolve_model_path(path: str | os.PathLike) -> Path:
    """The .onnx file a user means: the path itself, or the model inside an export folder.

    Raises:
        ModelLoadError: nothing there, or a folder without a model.
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file or folder", hint="check the path")
    if p.is_dir():
        for name in MODEL_FILE_NAMES:
            if (p / name).is_file():
                return p / name
        onnx_files = sorted(p.glob("*.onnx"))
        if len(onnx_files) == 1:
            return onnx_files[0]
        what = "no .onnx file" if not onnx_files else f"{len(onnx_files)} .onnx files"
        raise ModelLoadError(f"{p}: folder holds {what}", hint="pass the .onnx file itself")
    return p


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model with its weights memory-mapped (external data) or parsed once (inline).

    Raises:
        ModelLoadError: missing, empty, not ONNX, or a model whose graph cannot be read.
    """
    p = resolve_model_path(path)
    if p.stat().st_size == 0:
        raise ModelLoadError(f"{p}: empty file", hint="re-export the model")
    with open(p, "rb") as f:
        head = f.read(8)
    if head.startswith(b"GGUF"):
        raise ModelLoadError(f"{p}: this is a GGUF file, not ONNX", hint="export it to ONNX first (e.g. optimum-cli)")
    try:
        model = ir.load(p)
    except Exception as e:  # protobuf raises several unrelated types for garbage input
        first_line = (str(e).strip().splitlines() or [""])[0][:160]
        raise ModelLoadError(f"{p}: not a readable ONNX model ({type(e).__name__}: {first_line})") from e
    if model.graph is None or (len(model.graph) == 0 and not model.graph.outputs):
        raise ModelLoadError(f"{p}: not an ONNX model (empty graph)")
    return model


def save_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write `model` atomically: to a temporary name in the same folder, then rename over `path`.

    Args:
        external_data: write weights to `<name>.data` beside the model; None decides by size (> 1.8 GB).
            A model holding external (memory-mapped) tensors always gets its own data file.

    Returns:
        The path written.
    """
    path = Path(path)
    tensors = [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]
    if external_data is None:
        external_data = sum(_nbytes(t) for t in tensors) > 1_800_000_000
    if not external_data and any(isinstance(t, ir.ExternalTensor) for t in tensors):
        # Inline saving would keep references into the *input's* data file; write our own data file instead.
        external_data = True
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp_model = tmp_dir / path.name
        data_name = f"{path.name}.data"
        ir.save(model, tmp_model, external_data=data_name if external_data else None)
        if external_data and (tmp_dir / data_name).exists():
            os.replace(tmp_dir / data_name, path.parent / data_name)
        os.replace(tmp_model, path)
    finally:
        for leftover in tmp_dir.iterdir():
            leftover.unlink()
        tmp_dir.rmdir()
    return path


def _nbytes(tensor) -> int:
    return int(np.prod(tensor.shape.numpy(), dtype=np.int64)) * tensor.dtype.itemsize


def create_session(
    model: ir.Model,
    *,
    overrides: Mapping[str, np.ndarray] | None = None,
    providers: list[str] | None = None,
    optimize: bool = True,
):
    """An onnxruntime session for an in-memory model, without serializing its weights a second time.

    Large initializers are handed to onnxruntime as OrtValues that share memory with the (memory-mapped)
    numpy arrays. `overrides` replaces named initializers (e.g. weights with super weights zeroed).
    """
    import onnxruntime as ort

    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(model.graph.initializers))
    if unknown:
        raise KeyError(f"no initializer named {unknown}")
    names, arrays = [], []
    originals = {}
    for name, value in model.graph.initializers.items():
        const = value.const_value
        if const is None or (name not in overrides and _nbytes(const) < _IN_MEMORY_THRESHOLD_BYTES):
            continue
        array = overrides[name] if name in overrides else const.numpy()
        if array.dtype.kind not in "fiub":  # e.g. bfloat16 or int4: leave it to protobuf
            continue
        names.append(name)
        arrays.append(np.ascontiguousarray(array))
        # A placeholder, so that serializing the graph copies no weight bytes.
        originals[name] = const
        value.const_value = ir.ExternalTensor(
            _IN_MEMORY_LOCATION, 0, arrays[-1].nbytes, const.dtype, shape=const.shape, name=name
        )
    try:
        proto = ir.to_proto(model)
    finally:
        for name, const in originals.items():
            model.graph.initializers[name].const_value = const
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if names:
        options.add_external_initializers(names, values)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=providers or ["CPUExecutionProvider"])
    session._sw_onnx_keep_alive = (arrays, values)  # the session reads these buffers
    return session

