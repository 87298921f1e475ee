"""Where a command may write its model: the checks every writer makes before any work, and the final move.

Nothing is written over the input, its external data, a folder, or an existing file without ``--force``; a
model is written under a temporary name beside its target and renamed into place only once it is complete
(and verified, for quantize), so a failed run leaves nothing at the target.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sw_onnx.errors import UsageError

__all__ = ["check_output", "check_output_folder", "data_path", "external_files", "file_bytes", "publish_folder",
           "publish_model", "staging_folder", "staging_path"]


def data_path(out: Path) -> Path:
    """The external-data file sw-onnx writes beside `out`."""
    return out.with_name(out.name + ".data")


def file_bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def check_output(src: Path, out: Path, *, force: bool = False) -> None:
    """Refuse an output that is not an .onnx file, is a folder, is in no folder, is the input or one of its
    external-data files, or exists (without `force`).

    Raises:
        UsageError: the reason, with a hint.
    """
    if out.suffix != ".onnx":
        raise UsageError(f"-o {out}: the output must be an .onnx file")
    if out.exists() and out.is_dir():
        raise UsageError(f"-o {out}: is a folder", hint="name the .onnx file to write")
    if out.resolve() == src.resolve() or data_path(out).resolve() == src.resolve():
        raise UsageError(f"-o {out}: would overwrite the input model", hint="choose another output name")
    if not out.parent.is_dir():
        what = "is not a folder" if out.parent.exists() else "does not exist"
        raise UsageError(f"-o {out}: folder {out.parent} {what}", hint="create it, or write somewhere else")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists", hint="pass --force to overwrite it")
    # Only an existing file in the input's folder can be the input's external data; parsing the input (all
    # of it, for an inline model) is needed only then.
    for target in (out, data_path(out)):
        resolved = target.resolve()
        if resolved.is_file() and resolved.is_relative_to(src.parent.resolve()) and resolved in _external_locations(src):
            raise UsageError(f"-o {out}: its weights file {resolved.name} is the input's external data",
                             hint="choose another output name")


def external_files(src: Path) -> set[Path]:
    """The external-data files the model at `src` names (resolved paths; read without loading the data)."""
    return _external_locations(src)


def _external_locations(src: Path) -> set[Path]:
    import onnx

    from sw_onnx.wire import inline_as_external

    try:
        # Inline weights are skipped, not parsed (parsing SmolLM2's 540 MB file took 0.6 s and 1 GB); they
        # come back as references to `src` itself, which is no other file's.
        skeleton = inline_as_external(src)
        proto = onnx.load(str(src), load_external_data=False) if skeleton is None else onnx.ModelProto.FromString(skeleton)
    except Exception:
        return set()
    found = set()
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    found.add((src.parent / entry.value).resolve())
    return found - {src.resolve()}


@contextmanager
def staging_path(out: Path) -> Iterator[Path]:
    """A path to write `out`'s content to first: in a temporary folder beside it (same file system, so the
    final rename is atomic), removed afterwards whatever happens."""
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp_dir / out.name
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def publish_model(tmp: Path, out: Path) -> None:
    """Move a written model into place: weights first, then the .onnx that names them (all or nothing:
    `sw_onnx.io.publish` restores a previous output if a rename fails). A previous output's weights file
    that nothing refers to any more is removed."""
    from sw_onnx.io import publish

    tmp_data = data_path(tmp)
    external = tmp_data.exists()
    publish(([(tmp_data, data_path(out))] if external else []) + [(tmp, out)])
    if not external and data_path(out).exists():
        data_path(out).unlink()


def check_output_folder(src_folder: Path, out: Path, *, force: bool = False) -> None:
    """Refuse an output folder that is the input folder or inside it (or holds it), a file, a folder in no
    folder, or a non-empty existing folder without `force`."""
    src, target = src_folder.resolve(), out.resolve()
    if target == src or src in target.parents or target in src.parents:
        raise UsageError(f"-o {out}: would write into the input folder {src_folder}", hint="choose a folder beside it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out}: is a file; a genai model is written as a folder", hint="name a new folder")
    if not out.parent.is_dir():
        raise UsageError(f"-o {out}: folder {out.parent} does not exist", hint="create it, or write somewhere else")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} already exists and is not empty", hint="pass --force to replace it")


@contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` to fill before `publish_folder`; removed afterwards if still there."""
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp_dir
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def publish_folder(staging: Path, out: Path) -> None:
    """Rename the filled staging folder to `out`; a previous `out` (``--force``) is moved aside first and
    removed only once the new one is in place."""
    previous = None
    if out.exists():
        previous = out.with_name(f".{out.name}.previous")
        shutil.rmtree(previous, ignore_errors=True)
        out.rename(previous)
    try:
        staging.rename(out)
    except OSError:
        if previous is not None:
            previous.rename(out)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
