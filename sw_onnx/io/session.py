"""onnxruntime sessions: one factory (`open_session`) for a file, an export folder or an in-memory model.

An in-memory model (`create_session`) becomes a session without a copy of its weights: onnxruntime maps the
external-data file itself, and other large initializers are handed over as in-memory OrtValues
(`add_external_initializers`) instead of a second serialized copy. With ``stream_weights`` its large mapped
weights are fed at every run from sw-onnx's own memory maps, whose pages are dropped as the run goes
(`StreamingSession`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from sw_onnx.errors import ModelLoadError, UnsupportedGraphError
from sw_onnx.io._util import nbytes, one_line
from sw_onnx.io.load import _MappedOnDemand, iter_tensors, resolve_model_path

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime

# Initializers at least this large go to onnxruntime as in-memory OrtValues rather than protobuf bytes.
_IN_MEMORY_THRESHOLD_BYTES = 1024
_IN_MEMORY_LOCATION = "sw-onnx-in-memory.bin"  # never read: onnxruntime gets these bytes from memory
# Mapped weights at least this large are fed at each run by a streaming session.
_STREAM_MIN_BYTES = 1 << 20
_DEFAULT_PROVIDERS = ["CPUExecutionProvider"]


def ort_value(array: np.ndarray):
    """An `onnxruntime.OrtValue` sharing `array`'s memory, for any dtype onnxruntime has (bfloat16 and the
    float8 types of ml_dtypes included, which plain numpy feeds cannot carry)."""
    import onnxruntime as ort

    array = np.ascontiguousarray(array)
    if array.dtype.kind in "fiub":
        return ort.OrtValue.ortvalue_from_numpy(array)
    dtype = ir.DataType.from_numpy(array.dtype)
    carrier = {1: np.uint8, 2: np.uint16}[array.dtype.itemsize]
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(carrier), int(dtype))


def _external_folder(model: ir.Model, overrides: Mapping[str, np.ndarray]) -> str | None:
    """The one folder all external tensors of the model live in, if they all do (onnxruntime can then map them
    itself); None otherwise."""
    folders = set()
    for tensor in iter_tensors(model):
        if isinstance(tensor, ir.ExternalTensor) and tensor.name not in overrides:
            if not tensor.base_dir:
                return None
            folders.add(os.path.realpath(os.fspath(tensor.base_dir)))
    return folders.pop() if len(folders) == 1 else None


class _PageDropper:
    """While onnxruntime runs (or a model is saved), keep dropping the resident pages of the weights' memory maps.

    A run reads every weight once; mapped file pages would otherwise stay resident (and counted in RSS) until
    the mapping goes, so the process would hold the whole model. ``madvise(MADV_DONTNEED)`` on a read-only
    file mapping only unmaps the pages: a later access faults them back in from the page cache, same bytes.
    So the run's footprint is its working set, as if the kernel reclaimed the pages under memory pressure.
    """

    def __init__(self, mappings, interval: float = 0.02):
        import threading

        self.mappings, self.interval = mappings, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sw-onnx-page-dropper", daemon=True)

    def _drop(self) -> None:
        import mmap

        try:
            mappings = list(self.mappings)
        except RuntimeError:  # a live set that another thread changed meanwhile: next time
            return
        for mapping in mappings:
            try:
                mapping.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):  # closed, or not supported here
                pass

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._drop()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._drop()


class StreamingSession:
    """An onnxruntime session whose large external weights are fed at every run from sw-onnx's own read-only
    memory maps (zero copy), with their pages dropped as the run goes (`_PageDropper`): peak memory is the
    run's working set instead of the whole model. Feeds given by the caller win (e.g. zeroed weights).
    Anything else is the wrapped `onnxruntime.InferenceSession`'s."""

    def __init__(self, session, weights: dict, mappings: list):
        self._session, self._weights, self._mappings = session, weights, mappings

    def __getattr__(self, name):
        return getattr(self._session, name)

    def run(self, output_names, input_feed, run_options=None):
        feeds = {**self._weights, **input_feed}
        with _PageDropper(self._mappings):
            return self._session.run(output_names, feeds, run_options)



def open_session(
    model,
    providers: Sequence[str] | None = None,
    *,
    overrides: Mapping[str, np.ndarray] | None = None,
    stream_weights: bool = False,
    optimize: bool | str = True,
    prepack: bool | None = None,
    optimized_path: str | os.PathLike | None = None,
    optimized_weights: bool = True,
    wrap_errors: bool = False,
):
    """An onnxruntime session for an in-memory ``onnx_ir.Model``, an .onnx path or an export folder; a
    session (onnxruntime's, or a `StreamingSession`) is returned as is.

    Args:
        model: what to run.
        providers: onnxruntime execution providers (default: CPU).
        overrides, stream_weights: in-memory models only (`create_session`).
        optimize: True: onnxruntime's default optimizations; False: none (``ORT_DISABLE_ALL``); or the name
            of an ``onnxruntime.GraphOptimizationLevel`` (e.g. ``"ORT_ENABLE_EXTENDED"``).
        prepack: let onnxruntime pre-pack constant weights. None: not for an in-memory model (a packed copy
            of every MatMul weight would double its memory), onnxruntime's default (on) for a file.
        optimized_path: also write onnxruntime's optimized graph here (its weights in ``<name>.data`` beside
            it, so that graphs past 2 GB serialize too).
        optimized_weights: for a file, False when only the optimized graph is wanted: its weights are sent to
            the null device where a link to it can be made (`_link_to_null_device`).
        wrap_errors: for a file, raise `ModelLoadError` for an empty file or one onnxruntime cannot load
            (default: onnxruntime's own exception).

    Raises:
        ModelLoadError: no model at that path (or, with ``wrap_errors``, an unloadable file).
        UnsupportedGraphError: onnxruntime cannot load the in-memory model.
        ValueError: ``overrides`` or ``stream_weights`` for something other than an in-memory model.
    """
    import onnxruntime as ort

    if isinstance(model, (ort.InferenceSession, StreamingSession)):
        return model
    providers = list(providers) if providers else None
    if isinstance(model, ir.Model):
        session = create_session(model, overrides=overrides, providers=providers, optimize=optimize,
                                 stream_weights=stream_weights, prepack=bool(prepack),
                                 optimized_path=optimized_path)
        return _with_input_dims(session, model)
    if overrides or stream_weights:
        raise ValueError("overrides and stream_weights need an in-memory model (sw_onnx.io.load_model)")
    path = resolve_model_path(model)
    if wrap_errors and path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: empty file", hint="re-export the model")
    options = _session_options(prepack=True if prepack is None else prepack, optimize=optimize,
                               optimized_path=optimized_path, optimized_weights=optimized_weights)
    try:
        session = ort.InferenceSession(str(path), options, providers=list(providers or _DEFAULT_PROVIDERS))
    except Exception as e:  # onnxruntime raises its own exception types for unreadable models
        if not wrap_errors:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ModelLoadError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: {first})") from e
    return _with_input_dims(session, path)


def _with_input_dims(session, model):
    """Attach `sw_onnx.inputs.cache_dim_hints` when a past-KV input has a symbolic axis no name explains
    (onnxruntime-genai's ``kv_cache_dim``): `build_feeds` reads them."""
    from sw_onnx.kvcache import CACHE_NAME, cache_dim_hints

    def unexplained(dim) -> bool:
        name = str(dim or "").lower()
        return not isinstance(dim, int) and not any(word in name for word in ("batch", "seq", "length", "past", "total"))

    if any(CACHE_NAME.search(i.name) and any(unexplained(d) for d in i.shape) for i in session.get_inputs()):
        session.sw_onnx_input_dims = cache_dim_hints(model)
    return session


def create_session(
    model: ir.Model,
    *,
    overrides: Mapping[str, np.ndarray] | None = None,
    providers: list[str] | None = None,
    optimize: bool | str = True,
    stream_weights: bool = False,
    prepack: bool = False,
    optimized_path: str | os.PathLike | None = None,
):
    """An onnxruntime session for an in-memory model, without a copy of its weights.

    External (memory-mapped) weights stay references into their file: onnxruntime maps the file itself
    (``session.model_external_initializers_file_folder_path``), so no weight is copied to the heap and only
    the pages a run touches become resident (page cache, shared with other readers). Other large initializers
    are handed over as OrtValues (`add_external_initializers`; onnxruntime copies those), as is `overrides`,
    which replaces named initializers (e.g. weights with super weights zeroed). Constant weights are not
    pre-packed (``session.disable_prepacking``) unless `prepack`: a packed copy of every MatMul weight would
    double the memory of one forward pass. `optimize` and `optimized_path` are as for `open_session`.

    With `stream_weights`, every external weight of at least 1 MiB becomes an overridable initializer fed at
    each run from sw-onnx's own memory map, whose pages are dropped while the run goes: a `StreamingSession`
    (same interface) whose peak memory is one run's working set rather than the model's size. Constant
    folding of those weights (e.g. a Transpose or Cast of a weight) then happens at every run.

    Raises:
        KeyError: an override names no initializer.
        UnsupportedGraphError: onnxruntime cannot load the model.
    """
    import onnxruntime as ort

    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(model.graph.initializers))
    if unknown:
        raise KeyError(f"no initializer named {unknown}")
    folder = _external_folder(model, overrides)
    proto, handed_over = _proto_handing_over_weights(model, overrides, folder)
    streamed, mappings = {}, []
    if stream_weights and folder is not None:
        streamed, mappings = _stream_weights(model, proto, overrides)
    names, arrays, values = handed_over
    options = _session_options(prepack=prepack, optimize=optimize, optimized_path=optimized_path,
                               weights_folder=folder, arena=not stream_weights)
    if names:
        options.add_external_initializers(names, values)
    try:
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=list(providers or _DEFAULT_PROVIDERS))
    except Exception as e:
        if type(e).__module__.startswith("onnxruntime"):
            raise UnsupportedGraphError(
                f"onnxruntime {ort.__version__} cannot load this model: {one_line(e, 300)}",
                hint="check that the model runs in onnxruntime; sw-onnx needs it to",
            ) from e
        raise
    session._sw_onnx_keep_alive = (arrays, values)  # the session reads these buffers
    if streamed:
        return StreamingSession(session, streamed, mappings)
    return session


def _handed_over(name: str, const: ir.TensorProtocol, overrides: Mapping, folder: str | None) -> bool:
    """Whether an initializer goes to onnxruntime from memory rather than as it is in the serialized model:
    overridden ones, external ones onnxruntime cannot map itself, and large inline ones."""
    if name in overrides:
        return True
    if isinstance(const, ir.ExternalTensor):
        return folder is None  # else onnxruntime maps it from the file
    return nbytes(const) >= _IN_MEMORY_THRESHOLD_BYTES


def _proto_handing_over_weights(model: ir.Model, overrides: Mapping[str, np.ndarray], folder: str | None):
    """(the model as a ModelProto in which every handed-over initializer (`_handed_over`) is a data-less
    placeholder, ([names], [arrays], [OrtValues]) for `add_external_initializers`).

    A handed-over tensor of a type onnxruntime has no OrtValue for (e.g. int4) is serialized as a copy instead
    when it is external or overridden (never a reference to a file onnxruntime would re-read). The model is
    left as it was.
    """
    names, arrays, values = [], [], []
    originals = {}
    for name, value in model.graph.initializers.items():
        const = value.const_value
        if const is None or not _handed_over(name, const, overrides, folder):
            continue
        array = overrides[name] if name in overrides else const.numpy()
        ort_array = _ort_value_or_none(array, const.dtype)
        if ort_array is None:
            if isinstance(const, ir.ExternalTensor) or name in overrides:
                originals[name] = const
                value.const_value = ir.Tensor(np.array(array), dtype=const.dtype, name=name)
            continue
        names.append(name)
        arrays.append(np.ascontiguousarray(array))
        values.append(ort_array)
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
    return proto, (names, arrays, values)


def _ort_value_or_none(array: np.ndarray, dtype: ir.DataType):
    """`ort_value(array)`, or None for a type onnxruntime has no OrtValue for (packed, strings...)."""
    if dtype.bitwidth < 8 or dtype == ir.DataType.STRING:
        return None
    try:
        return ort_value(array)
    except Exception:  # a type onnxruntime has no OrtValue for: leave it to protobuf
        return None


def _stream_weights(model: ir.Model, proto, overrides: Mapping[str, np.ndarray]) -> tuple[dict, list]:
    """({name: OrtValue on its own memory map}, [those maps]) for every mapped weight a streaming session
    feeds at each run; each becomes a graph input of `proto` (overridable: onnxruntime takes the fed value
    over the file's)."""
    import mmap

    streamed, mappings = {}, []
    graph_inputs = {i.name for i in proto.graph.input}
    for name, value in model.graph.initializers.items():
        const = value.const_value
        if (name in overrides or not isinstance(const, _MappedOnDemand) or const.dtype.bitwidth < 8
                or const.dtype == ir.DataType.STRING or nbytes(const) < _STREAM_MIN_BYTES
                or not hasattr(mmap, "MADV_DONTNEED")):
            continue
        array, mapping = const.mapped()
        streamed[name] = ort_value(array)
        mappings.append(mapping)
        if name not in graph_inputs:
            import onnx

            proto.graph.input.append(onnx.helper.make_tensor_value_info(
                name, int(const.dtype), [int(d) for d in const.shape.numpy()]))
    return streamed, mappings


def _session_options(*, prepack: bool, optimize: bool | str = True, optimized_path: str | os.PathLike | None = None,
                     optimized_weights: bool = True, weights_folder: str | None = None,
                     arena: bool = True) -> "onnxruntime.SessionOptions":
    """onnxruntime session options: quiet, and as `open_session`'s arguments say. `weights_folder`: where
    onnxruntime finds the external data of a model given as bytes. Without `arena` (streaming sessions, which
    run once or twice), buffers go back to the system once freed instead of staying in onnxruntime's arena:
    SmolLM2's detection (its tied lm_head's Transpose runs unfused) left 393 MB resident with it, 269 without."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = arena
    if not prepack:
        # No pre-packed copy of every constant MatMul weight: it doubled the memory (2.3 GB more on a 2.7 GB
        # fp32 model) for a single short run (bench/large_model.py).
        options.add_session_config_entry("session.disable_prepacking", "1")
    if weights_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", weights_folder)
    if isinstance(optimize, str):
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimize)
    elif not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path is not None:
        optimized = Path(optimized_path)
        options.optimized_model_filepath = str(optimized)
        # Weights of the optimized copy go to a side file, so graphs past 2 GB serialize too.
        data = optimized.with_name(optimized.name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data.name)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        if not optimized_weights:
            _link_to_null_device(data)
    return options


def _link_to_null_device(path: Path) -> None:
    """Make `path` a link to the null device, so that what onnxruntime writes there is dropped: writing the
    optimized copy's weights took 4.8 of the 5.5 s to open the quantized 2.67 GB decoder of bench/large_model.py
    for verification, which reads only the graph. onnxruntime (1.32) opens the file, then removes its name:
    the link is gone afterwards, the weights went to the null device. Where no link can be made, they are
    written."""
    try:
        os.symlink(os.devnull, path)
    except (OSError, NotImplementedError):
        pass
