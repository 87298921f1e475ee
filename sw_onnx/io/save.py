"""Writing models and reports, atomically.

Writing is atomic: files are written under a temporary name in the target's folder and renamed into place
only when complete (`publish`); a failure (disk full, permission) leaves no partial output and the previous
file at that path untouched, and is raised as `OutputWriteError`.

Weights are written without a second copy in memory: mapped ones stay in their mapping, lazy ones (quantized
weights) are computed a bounded number at a time while the file is written.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from sw_onnx.errors import OutputWriteError, SwOnnxError, UnsupportedGraphError
from sw_onnx.io._util import nbytes
from sw_onnx.io.load import _LIVE_MAPPINGS, _MappedInline
from sw_onnx.io.session import _PageDropper

logger = logging.getLogger("sw_onnx.io")

_SAVE_IN_FLIGHT_BYTES = 64 << 20

PREFETCH = "sw_onnx.prefetch"
"""Key in a lazy tensor's ``meta``: ``(compute, work)``, a function computing (and keeping) the tensors one
quantization makes without handing any out, and its size in weights. `save_model` starts the largest first."""


def publish(moves: Sequence[tuple[Path, Path]]) -> None:
    """Rename finished temporary files into place, all or nothing.

    Each ``(temporary, final)`` pair must be on the same file system; the last one is normally the .onnx that
    names the others. Before a final that exists is replaced (all but the last), a backup of it is kept; if a
    rename fails, the files already moved are taken back out and the previous ones restored.

    Raises:
        OutputWriteError: a rename failed (the previous files are restored).
    """
    done: list[tuple[Path, Path | None]] = []  # (final, backup of its previous file or None)
    try:
        for i, (tmp, final) in enumerate(moves):
            backup = None
            if i < len(moves) - 1 and final.exists():  # the last rename is atomic on its own
                backup = tmp.with_name(tmp.name + ".previous")
                try:
                    os.link(final, backup)  # the previous file stays in place until replaced
                except OSError:
                    os.replace(final, backup)
            try:
                os.replace(tmp, final)
            except OSError:
                if backup is not None:
                    if final.exists():
                        backup.unlink()
                    else:
                        os.replace(backup, final)
                raise
            done.append((final, backup))
    except OSError as e:
        for final, backup in reversed(done):
            try:
                if backup is not None:
                    os.replace(backup, final)
                else:
                    final.unlink(missing_ok=True)
            except OSError:  # pragma: no cover - nothing more we can do
                logger.error("could not restore %s", final)
        raise _write_error(e, moves[-1][1]) from e
    for _, backup in done:
        if backup is not None:
            backup.unlink(missing_ok=True)


def _write_error(e: OSError, path: Path) -> OutputWriteError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = f"free disk space in {path.parent} (or write elsewhere); nothing was written"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = f"choose a writable folder for {path.name}; nothing was written"
    elif e.errno in (errno.ENOTDIR, errno.ENOENT):
        hint = "the output's folder must exist; nothing was written"
    else:
        hint = "nothing was written; the previous file, if any, is unchanged"
    return OutputWriteError(f"cannot write {path}: {e.strerror or e}", hint=hint)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (temporary file in the same folder, then rename).

    Raises:
        OutputWriteError: the folder is missing or unwritable, or the disk is full; nothing is left behind.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(tmp_name)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        publish([(tmp, path)])
        tmp = None
    except OSError as e:
        raise _write_error(e, path) from e
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def save_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write `model` atomically: to a temporary folder beside `path`, then rename over `path` (`publish`).

    Args:
        external_data: write weights to `<name>.data` beside the model; None decides by size (> 1.8 GB).
            A model holding external (memory-mapped) tensors always gets its own data file.

    Returns:
        The path written.

    Raises:
        OutputWriteError: the disk filled up or the folder is not writable; no partial file is left and a
            previous file at `path` is unchanged.
    """
    path = Path(path)
    tensors = [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]
    if external_data is None:
        external_data = sum(nbytes(t) for t in tensors) > 1_800_000_000
    if not external_data and any(isinstance(t, ir.ExternalTensor) and not isinstance(t, _MappedInline) for t in tensors):
        # The input kept its weights in a data file: so does the output (its own).
        external_data = True
    tmp_dir = None
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        tmp_model = tmp_dir / path.name
        data_name = f"{path.name}.data"
        # Every weight is read once (copied, or quantized); mapped pages would otherwise stay resident while
        # their tensor is in use: a whole embedding table at once.
        with _PageDropper(_LIVE_MAPPINGS), _largest_computed_first(tensors):
            if external_data:
                _save_external(model, tmp_model, data_name)
            else:
                _save_inline(model, tmp_model)
        moves = []
        if external_data and (tmp_dir / data_name).exists():
            moves.append((tmp_dir / data_name, path.parent / data_name))
        moves.append((tmp_model, path))
        publish(moves)
    except OSError as e:
        raise _write_error(e, path) from e
    except SwOnnxError:
        raise
    except Exception as e:  # raised while serializing, e.g. by a lazy tensor computing a quantized weight
        error = _serialization_error(e, path)
        if error is None:
            raise
        raise error from e
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


@contextlib.contextmanager
def _largest_computed_first(tensors: Sequence[ir.TensorProtocol]) -> Iterator[None]:
    """Compute the largest `PREFETCH` work on a thread from the start: written in file order, an lm_head is
    the last job and otherwise runs alone at the end of the save (SmolLM2: 0.6 s with one CPU busy). A failure
    is left to the writer, which computes the tensor again and reports it."""
    import threading

    works = [t.meta[PREFETCH] for t in tensors if isinstance(t, ir.LazyTensor) and PREFETCH in t.meta]
    if not works:
        yield
        return
    compute, _ = max(works, key=lambda work: work[1])

    def run() -> None:
        try:
            compute()
        except Exception:  # noqa: BLE001 - raised again by the writer's own call
            pass

    thread = threading.Thread(target=run, name="sw-onnx-save-first", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()


def _serialization_error(e: Exception, path: Path) -> Exception | None:
    """What `save_model` raises for an exception raised while serializing (its root cause decides), or None
    to raise it as it is."""
    root = e
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    if isinstance(root, SwOnnxError):
        return root
    if isinstance(root, OSError):
        return _write_error(root, path)
    if isinstance(root, ValueError) and "NaN or infinite" in str(root):
        return UnsupportedGraphError(f"cannot write the model: a {root}",
                                     hint="the model's weights must be finite; check the export")
    return None


def _save_external(model: ir.Model, path: Path, data_name: str) -> None:
    """Write `model` to `path` with its weights in `data_name` beside it."""
    # 4096-aligned large tensors: onnxruntime can memory-map them instead of copying them to its
    # heap. Lazy tensors (quantized weights) are computed by several threads, a bounded number at a time.
    ir.save(model, path, format="protobuf", external_data=data_name, alignment=4096,
            max_workers=_save_workers(), max_in_flight_bytes=_SAVE_IN_FLIGHT_BYTES)


def _save_workers() -> int:
    """Threads computing lazy tensors while saving: three per CPU. A quantized layer's codes, scales and zero
    points are separate tensors computed together, so the jobs for the last two wait on the first; with
    one thread per CPU a 2-CPU save mostly ran one layer at a time (SmolLM2: 6.3 s wall for 6.3 s CPU)."""
    from sw_onnx.kernels import usable_cpus

    return 3 * usable_cpus()


def _tensor_bytes(tensor: ir.TensorProtocol):
    """The tensor's raw_data bytes. A view of its array where that is the same bytes (byte-sized elements,
    little-endian): a mapped weight's then stay in its mapping and a computed one's are not copied."""
    if (not isinstance(tensor, ir.TensorProtoTensor) and tensor.dtype.bitwidth >= 8 and sys.byteorder == "little"
            and tensor.size):
        return memoryview(np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8))
    return tensor.tobytes()  # packed 4-bit types, big-endian hosts, and parsed protobuf bytes as they are


def proto_with_placeholders(model: ir.Model, select: Callable[[ir.TensorProtocol], bool] = lambda tensor: True):
    """(the model as a ModelProto whose `select`-ed main-graph initializers are data-less external
    references, their names): serializing it reads no weight, whatever holds them (mapped, lazy, in memory)."""
    originals: dict[str, ir.TensorProtocol] = {}
    for name, value in model.graph.initializers.items():
        const = value.const_value
        if const is not None and select(const):
            originals[name] = const
            value.const_value = ir.ExternalTensor(
                "sw-onnx-placeholder.bin", 0, 0, const.dtype, shape=const.shape, name=name,
                doc_string=const.doc_string, metadata_props=dict(const.metadata_props) or None)
    try:
        return ir.to_proto(model), set(originals)
    finally:
        for name, const in originals.items():
            model.graph.initializers[name].const_value = const


def _computed_ahead(pool, jobs: Sequence[Callable[[], object]], sizes: Sequence[int], limit: int) -> Iterator:
    """Each job's result in order, the next ones computed on `pool` meanwhile: at most `limit` bytes (by
    `sizes`) in flight, and always at least the one being waited for."""
    pending: collections.deque = collections.deque()
    in_flight = submitted = 0
    for i in range(len(jobs)):
        while submitted < len(jobs) and (submitted == i or in_flight + sizes[submitted] <= limit):
            pending.append(pool.submit(jobs[submitted]))
            in_flight += sizes[submitted]
            submitted += 1
        yield pending.popleft().result()
        in_flight -= sizes[i]


def _save_inline(model: ir.Model, path: Path) -> None:
    """Write `model` as one .onnx with inline weights, tensor by tensor (`sw_onnx.wire.write_model`): the
    graph is serialized without its initializers, which are then computed (lazy ones by a few threads ahead
    of the writer, at most `_SAVE_IN_FLIGHT_BYTES` at once) and appended one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from sw_onnx.wire import write_model

    # All but strings (no raw_data), however small: the file's layout then does not depend on how each
    # tensor is held (computing a lazy one may read any weight, a mapped one must not become a reference).
    proto, streamed = proto_with_placeholders(model, lambda tensor: tensor.dtype != ir.DataType.STRING)
    headers, tensors, kept = [], [], []
    for tensor in proto.graph.initializer:
        if tensor.name in streamed:
            del tensor.external_data[:]
            tensor.ClearField("data_location")
            const = model.graph.initializers[tensor.name].const_value
            headers.append((tensor.SerializeToString(), nbytes(const)))
            tensors.append(const)
        else:
            kept.append(tensor)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    skeleton = proto.SerializeToString()
    del proto
    jobs = [functools.partial(_tensor_bytes, tensor) for tensor in tensors]
    with ThreadPoolExecutor(max_workers=_save_workers(), thread_name_prefix="sw-onnx-save") as pool, open(path, "wb") as f:
        write_model(f, skeleton, headers, _computed_ahead(pool, jobs, [n for _, n in headers], _SAVE_IN_FLIGHT_BYTES))

