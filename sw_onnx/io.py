"""The one place that loads and saves models, and turns an in-memory model into an onnxruntime session.

Loading refuses, with a `ModelLoadError` / `UnsupportedGraphError`, anything sw-onnx should not touch: a path
that is not a regular file, an empty or non-ONNX file (GGUF, PNG, zip, safetensors... are named), a protobuf
that does not parse or holds non-UTF-8 strings, an opset outside `supported_opsets()`, a standard node whose
input/output count its schema does not allow or whose inputs are defined nowhere, and every external-data
reference that is unsafe or broken. **External data is validated before anything reads it**: every `ir.ExternalTensor` of the model (main
graph, subgraphs, node attributes, functions) must name a relative location without ``..`` whose real path
(symlinks resolved) stays inside the model's folder, a regular file with one hard link, and an
``offset + length`` within that file. Inline tensors must hold as many bytes as their shape says.

Weights stay lazy: `onnx_ir.load` memory-maps external data, and sessions receive large initializers as
in-memory OrtValues (`add_external_initializers`) instead of a second serialized copy.

Writing is atomic: files are written under a temporary name in the target's folder and renamed into place
only when complete (`publish`); a failure (disk full, permission) leaves no partial output and the previous
file at that path untouched, and is raised as `OutputWriteError`.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import math
import os
import shutil
import stat
import sys
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from sw_onnx.errors import ModelLoadError, OutputWriteError, SwOnnxError, UnsafeModelError, UnsupportedGraphError

logger = logging.getLogger(__name__)

MODEL_FILE_NAMES = ("model.onnx", "decoder_model.onnx", "model_quantized.onnx")
MIN_OPSET = 7
"""Oldest default-domain opset accepted (onnxruntime's own minimum)."""
# Initializers at least this large go to onnxruntime as in-memory OrtValues rather than protobuf bytes.
_IN_MEMORY_THRESHOLD_BYTES = 1024
_IN_MEMORY_LOCATION = "sw-onnx-in-memory.bin"  # never read: onnxruntime gets these bytes from memory
# Inline models at least this large are read lazily (`sw_onnx.wire.inline_as_external`): their tensors of at
# least _LAZY_INLINE_MIN_TENSOR_BYTES are mapped from the file instead of parsed.
_LAZY_INLINE_MIN_FILE_BYTES = 8 << 20
_LAZY_INLINE_MIN_TENSOR_BYTES = 1 << 16
# Signatures of files people mistake for ONNX models: (prefix, what it is, what to do).
_NOT_ONNX = (
    (b"GGUF", "a GGUF file", "export the model to ONNX first (e.g. optimum-cli export onnx)"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image", "pass the .onnx model file"),
    (b"\xff\xd8\xff", "a JPEG image", "pass the .onnx model file"),
    (b"PK\x03\x04", "a zip archive (e.g. a PyTorch checkpoint)", "export the model to ONNX first, or unzip it"),
    (b"\x1f\x8b", "a gzip file", "decompress it first"),
    (b"%PDF", "a PDF document", "pass the .onnx model file"),
    (b"\x7fELF", "an executable (ELF)", "pass the .onnx model file"),
    (b"version https://git-lfs", "a Git LFS pointer, not the model itself", "run git lfs pull"),
)


def supported_opsets() -> tuple[int, int]:
    """(oldest, newest) default-domain opset accepted: `MIN_OPSET` to the newest the installed onnx knows."""
    import onnx

    return MIN_OPSET, int(onnx.defs.onnx_opset_version())


def resolve_model_path(path: str | os.PathLike) -> Path:
    """The .onnx file a user means: the path itself, or the model inside an export folder.

    Raises:
        ModelLoadError: nothing there, a folder without a model, or not a regular file (a device, a FIFO).
    """
    p = Path(path)
    try:
        exists = p.exists()
    except (OSError, ValueError) as e:  # e.g. a name too long, or a NUL byte
        raise ModelLoadError(f"{p}: cannot be used as a path ({e})", hint="check the path") from None
    if not exists:
        raise ModelLoadError(f"{p}: no such file or folder", hint="check the path")
    if p.is_dir():
        for name in MODEL_FILE_NAMES:
            if (p / name).is_file():
                return p / name
        onnx_files = sorted(q for q in p.glob("*.onnx") if q.is_file())
        if len(onnx_files) == 1:
            return onnx_files[0]
        what = "no .onnx file" if not onnx_files else f"{len(onnx_files)} .onnx files"
        raise ModelLoadError(f"{p}: folder holds {what}", hint="pass the .onnx file itself")
    if not p.is_file():
        raise ModelLoadError(f"{p}: not a regular file", hint="pass an .onnx file")
    return p


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model with its weights memory-mapped (external data) or parsed once (inline).

    Checks everything described in the module docstring before returning; nothing reads external data
    before its reference is validated.

    Raises:
        ModelLoadError: missing, empty, not ONNX, or a model whose graph or tensors cannot be read
            (`UnsafeModelError` for external data outside the model's folder).
        UnsupportedGraphError: an opset outside `supported_opsets`.
    """
    p = resolve_model_path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise ModelLoadError(f"{p}: cannot read it ({e.strerror or e})", hint="check its permissions") from None
    if size == 0:
        raise ModelLoadError(f"{p}: empty file", hint="re-export the model")
    _refuse_known_formats(p, head, size)
    try:
        with warnings.catch_warnings(record=True) as caught:  # e.g. unknown external-data keys: logged, not shown
            warnings.simplefilter("always")
            model = _load_ir(p)
        for w in caught:
            logger.info("%s: %s", p, w.message)
    except SwOnnxError:
        raise
    except MemoryError:
        raise ModelLoadError(f"{p}: not a readable ONNX model (parsing it ran out of memory)",
                             hint="check that this is an .onnx file") from None
    except Exception as e:  # protobuf and the IR raise several unrelated types for garbage input
        first_line = _one_line(e)
        raise ModelLoadError(f"{p}: not a readable ONNX model ({type(e).__name__}: {first_line})",
                             hint="re-export it, or check that the download is complete") from e
    if model.graph is None or (len(model.graph) == 0 and not model.graph.outputs):
        raise ModelLoadError(f"{p}: not an ONNX model (empty graph)", hint="pass the .onnx model file")
    check_names(model, p)
    check_opset(model, p)
    check_arity(model, p)
    check_graph_references(model, p)
    check_acyclic(model, p)
    check_tensors(model, p)
    return model


def _graphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    yield graph
    for node in graph:
        for attr in node.attributes.values():
            if attr.is_ref() or attr.value is None:
                continue
            if attr.type == ir.AttributeType.GRAPH:
                yield from _graphs(attr.value)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.value:
                    yield from _graphs(sub)


def check_acyclic(model: ir.Model, path: Path | str = "model") -> None:
    """Every graph must be a DAG (a corrupt file can make a node consume its own output; walking such a graph
    would never end).

    Raises:
        ModelLoadError: a graph has a cycle.
    """
    for graph in _graphs(model.graph):
        nodes = list(graph)
        index = {id(node): i for i, node in enumerate(nodes)}
        pending = [0] * len(nodes)
        users: list[list[int]] = [[] for _ in nodes]
        for i, node in enumerate(nodes):
            for value in node.inputs:
                producer = value.producer() if value is not None else None
                if producer is not None and id(producer) in index:
                    pending[i] += 1
                    users[index[id(producer)]].append(i)
        ready = [i for i, n in enumerate(pending) if n == 0]
        done = 0
        while ready:
            i = ready.pop()
            done += 1
            for j in users[i]:
                pending[j] -= 1
                if pending[j] == 0:
                    ready.append(j)
        if done != len(nodes):
            stuck = next(nodes[i] for i, n in enumerate(pending) if n > 0)
            raise ModelLoadError(f"{path}: corrupt or invalid model: the graph has a cycle (through node "
                                 f"{stuck.name or stuck.op_type!r})", hint="re-export the model")


def check_arity(model: ir.Model, path: Path | str = "model") -> None:
    """Every standard ONNX node must exist at the model's opset and have as many inputs/outputs as its schema
    allows, so that code walking the graph can index them (a corrupt file can drop or add some).

    Raises:
        ModelLoadError: a node does not fit its schema.
    """
    import onnx

    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None:
        return
    schemas: dict[str, object] = {}
    for node in model.graph.all_nodes():
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type not in schemas:
            try:
                schemas[node.op_type] = onnx.defs.get_schema(node.op_type, opset, "")
            except Exception:
                schemas[node.op_type] = None
        schema = schemas[node.op_type]
        where = f"node {node.name or node.op_type!r}"
        if schema is None:
            raise ModelLoadError(f"{path}: corrupt or invalid model: {where} uses {node.op_type!r}, "
                                 f"which ONNX opset {opset} does not have", hint="re-export the model")
        n_in, n_out = len(node.inputs), len(node.outputs)
        if not schema.min_input <= n_in <= schema.max_input or not schema.min_output <= n_out <= schema.max_output:
            raise ModelLoadError(
                f"{path}: corrupt or invalid model: {where} ({node.op_type}) has {n_in} inputs and {n_out} outputs; "
                f"opset {opset} allows {schema.min_input}-{schema.max_input} and {schema.min_output}-{schema.max_output}",
                hint="re-export the model")


def _load_ir(p: Path) -> ir.Model:
    """`onnx_ir.load` with a check between parsing and building the IR: every string field must be text."""
    import onnx

    proto = None
    st = os.lstat(p)
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size >= _LAZY_INLINE_MIN_FILE_BYTES:
        # Weights inline in the file: parse only the rest, and map the weights from the file like external data.
        from sw_onnx.wire import inline_as_external

        skeleton = inline_as_external(p, min_bytes=_LAZY_INLINE_MIN_TENSOR_BYTES)
        if skeleton is not None:
            proto = onnx.ModelProto.FromString(skeleton)
    if proto is None:
        proto = onnx.load(str(p), format="protobuf", load_external_data=False)
    _check_proto_strings(proto, p)
    ir_logger = logging.getLogger("onnx_ir")
    level = ir_logger.level
    ir_logger.setLevel(logging.ERROR)  # "the model is invalid but we will still...": refused below instead
    try:
        model = ir.serde.deserialize_model(proto)
    finally:
        ir_logger.setLevel(level)
    return model  # `check_tensors` sets every external tensor's base folder (before anything reads one)


def _check_proto_strings(proto, path: Path) -> None:
    """protobuf hands back `bytes` for a string field that is not UTF-8 (corrupt file): refuse those."""
    from google.protobuf.descriptor import FieldDescriptor

    stack = [proto]
    while stack:
        message = stack.pop()
        for field, value in message.ListFields():
            repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == 3
            if field.type == FieldDescriptor.TYPE_STRING:
                for v in (value if repeated else (value,)):
                    if not isinstance(v, str):
                        raise ModelLoadError(f"{path}: corrupt model: {field.full_name} {v[:40]!r} is not valid "
                                             "UTF-8 text", hint="re-export it, or check that the download is complete")
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                if repeated:
                    stack.extend(value)
                else:
                    stack.append(value)


def check_graph_references(model: ir.Model, path: Path | str = "model") -> None:
    """Every node input and graph output must be produced by a node, or be a graph input or initializer.

    Raises:
        ModelLoadError: a reference to a value that nothing defines (a corrupt or truncated graph).
    """
    def defined(value: ir.Value) -> bool:
        return value.producer() is not None or value.is_graph_input() or value.is_initializer()

    for node in model.graph.all_nodes():
        for value in node.inputs:
            if value is not None and not defined(value):
                raise ModelLoadError(f"{path}: corrupt or invalid model: input {value.name!r} of node "
                                     f"{node.name or node.op_type!r} is defined nowhere", hint="re-export the model")
    for value in model.graph.outputs:
        if not defined(value):
            raise ModelLoadError(f"{path}: corrupt or invalid model: output {value.name!r} is produced by no node",
                                 hint="re-export the model")


def check_names(model: ir.Model, path: Path | str = "model") -> None:
    """Every name, op type and domain must be text: a corrupt file can carry bytes that are not UTF-8.

    Raises:
        ModelLoadError: one is not.
    """
    def bad(what: str, value) -> None:
        raise ModelLoadError(f"{path}: corrupt model: {what} {value!r} is not valid UTF-8 text",
                             hint="re-export it, or check that the download is complete")

    for key in model.opset_imports:
        if not isinstance(key, str):
            bad("opset domain", key)
    graphs = [model.graph, *(f for f in model.functions.values())]
    for graph in graphs:
        nodes = graph.all_nodes() if hasattr(graph, "all_nodes") else graph
        for node in nodes:
            for what, value in (("node name", node.name), ("op type", node.op_type), ("domain", node.domain)):
                if value is not None and not isinstance(value, str):
                    bad(what, value)
            for value in (*node.inputs, *node.outputs):
                if value is not None and value.name is not None and not isinstance(value.name, str):
                    bad("value name", value.name)
            for name in node.attributes:
                if not isinstance(name, str):
                    bad("attribute name", name)
    for value in (*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()):
        if value.name is not None and not isinstance(value.name, str):
            bad("value name", value.name)


def _refuse_known_formats(p: Path, head: bytes, size: int) -> None:
    for magic, what, hint in _NOT_ONNX:
        if head.startswith(magic):
            if magic == b"GGUF":
                raise ModelLoadError(f"{p}: this is a GGUF file, not ONNX", hint=hint)
            raise ModelLoadError(f"{p}: not a readable ONNX model: this is {what}", hint=hint)
    # safetensors: an 8-byte little-endian header length, then a JSON object.
    if len(head) > 9 and head[8:10] == b'{"' and int.from_bytes(head[:8], "little") + 8 <= size:
        raise ModelLoadError(f"{p}: not a readable ONNX model: this is a safetensors file",
                             hint="export the model to ONNX first (e.g. optimum-cli export onnx)")
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"[") or stripped[:5].lower() in (b"<?xml", b"<html", b"<!doc"):
        raise ModelLoadError(f"{p}: not a readable ONNX model: this is a text (JSON/HTML) file",
                             hint="pass the .onnx model file")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return
    if len(head) >= 16 and all(c.isprintable() or c in "\n\r\t" for c in text):
        # An ONNX protobuf starts with a field tag such as 0x08 (ir_version): never all printable text.
        raise ModelLoadError(f"{p}: not a readable ONNX model: this is a text file", hint="pass the .onnx model file")


def check_opset(model: ir.Model, path: Path | str = "model") -> None:
    """Refuse a default-domain opset sw-onnx (onnx, onnxruntime) cannot work with.

    Raises:
        UnsupportedGraphError: the opset is below `MIN_OPSET` or above what the installed onnx knows, or the
            graph uses default-domain ops without declaring an opset for them.
    """
    low, high = supported_opsets()
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None:
        if any(node.domain in ("", "ai.onnx") for node in model.graph):
            raise UnsupportedGraphError(f"{path}: the model uses standard ONNX ops but declares no opset for them",
                                        hint="re-export the model")
        return
    if not low <= opset <= high:
        what = "too old" if opset < low else "newer than this onnx knows"
        raise UnsupportedGraphError(
            f"{path}: unsupported opset {opset} ({what}; sw-onnx supports opsets {low} to {high})",
            hint=("convert it with onnx.version_converter.convert_version(model, 17)" if opset < low
                  else "re-export the model at a released opset, or upgrade onnx and onnxruntime"),
        )


def iter_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Every tensor of the model: initializers and tensor attributes of all graphs, subgraphs and functions."""
    def walk(graph: ir.Graph) -> Iterator[ir.TensorProtocol]:  # one pass over the nodes, subgraphs included
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value
        for node in graph:
            for attr in node.attributes.values():
                if attr.is_ref() or attr.value is None:
                    continue
                if attr.type == ir.AttributeType.TENSOR:
                    yield attr.value
                elif attr.type == ir.AttributeType.TENSORS:
                    yield from attr.value
                elif attr.type == ir.AttributeType.GRAPH:
                    yield from walk(attr.value)
                elif attr.type == ir.AttributeType.GRAPHS:
                    for sub in attr.value:
                        yield from walk(sub)

    yield from walk(model.graph)
    for function in model.functions.values():
        for node in function.all_nodes() if hasattr(function, "all_nodes") else function:
            for attr in node.attributes.values():
                if attr.is_ref():
                    continue
                if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                    yield attr.value
                elif attr.type == ir.AttributeType.TENSORS and attr.value is not None:
                    yield from attr.value


# Every mapping `_MappedOnDemand.mapped` made that is still alive: what a save keeps dropping pages of.
_LIVE_MAPPINGS: weakref.WeakSet = weakref.WeakSet()


class _MappedOnDemand(ir.ExternalTensor):
    """An `ir.ExternalTensor` whose `numpy()` maps just its own bytes, afresh, and caches nothing.

    onnx-ir's ExternalTensor maps the whole data file once per tensor and keeps the mapping, so every weight
    ever read stays resident (and counted in the process's RSS) until the model is freed. Here the mapping
    lives as long as the returned array: reading the layers one at a time (quantization, detection's weight
    lookups) keeps one layer's pages mapped at a time.
    """

    __slots__ = ()

    def numpy(self) -> np.ndarray:
        self._check_validity()
        if self.size == 0 or self.dtype.bitwidth < 8 or self._array is not None:
            return super().numpy()
        return self.mapped()[0]

    def mapped(self):
        """(the array, its own read-only `mmap.mmap`): the array lives on the mapping, nothing is read yet."""
        import mmap

        self._check_path_containment()
        offset = self.offset or 0
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        dt = np.dtype(self.dtype.numpy()).newbyteorder("<")
        with open(self.path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), self.nbytes + offset - start, offset=start, access=mmap.ACCESS_READ)
        _LIVE_MAPPINGS.add(mapping)
        array = np.frombuffer(mapping, dtype=dt, offset=offset - start, count=self.size)
        return array.reshape(self.shape.numpy()), mapping

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)


class _MappedInline(_MappedOnDemand):
    """A weight stored inline in the .onnx file itself, mapped from there (`sw_onnx.wire.inline_as_external`):
    external to onnxruntime and to memory, but part of the model file (saved inline, not as a data file)."""

    __slots__ = ()


def stores_weights_externally(model: ir.Model) -> bool:
    """Whether the model's initializers live in a separate data file (not inline in its .onnx)."""
    return any(isinstance(v.const_value, ir.ExternalTensor) and not isinstance(v.const_value, _MappedInline)
               for v in model.graph.initializers.values())


def check_tensors(model: ir.Model, path: Path) -> None:
    """Validate every tensor's data reference (external) or size (inline), reading no external data.

    Raises:
        UnsafeModelError: an external-data location outside the model's folder (absolute, ``..``, a symlink
            or hard link to elsewhere): it is never read.
        ModelLoadError: a missing or short external-data file, or a tensor whose bytes do not match its shape.
    """
    base = path.parent
    base_real = os.path.realpath(base)
    model_real = os.path.realpath(path)
    files: dict[str, int] = {}  # real path -> size, each file checked once
    for tensor in iter_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            tensor.base_dir = str(base)  # functions' tensors come without one (onnx-ir skips its checks then)
            real = _check_location(tensor, path, base_real, files)
            _check_extent(tensor, path, files[real])
            if type(tensor) is ir.ExternalTensor:
                tensor.__class__ = _MappedInline if real == model_real else _MappedOnDemand
        elif isinstance(tensor, ir.TensorProtoTensor):
            _check_inline(tensor, path)


def _check_location(tensor: ir.ExternalTensor, path: Path, base_real: str, files: dict[str, int]) -> str:
    location = tensor.location
    name = tensor.name or "?"
    hint = "keep the weights file in the model's folder and reference it by its plain name"
    if not isinstance(location, (str, os.PathLike)) or not os.fspath(location) or "\0" in os.fspath(location):
        raise ModelLoadError(f"{path}: tensor {name!r} has an invalid external-data location {location!r}",
                             hint="re-export the model")
    location = os.fspath(location)
    if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise UnsafeModelError(f"{path}: tensor {name!r} points at external data by absolute path {location!r}; "
                               "refused (sw-onnx reads only files inside the model's folder)", hint=hint)
    parts = location.replace("\\", "/").split("/")
    if ".." in parts:
        raise UnsafeModelError(f"{path}: tensor {name!r} points at external data outside the model's folder "
                               f"({location!r}); refused", hint=hint)
    target = os.path.join(os.fspath(tensor.base_dir), location)
    real = os.path.realpath(target)
    if os.path.commonpath([real, base_real]) != base_real:
        raise UnsafeModelError(f"{path}: external data {location!r} of tensor {name!r} is a symlink to {real}, "
                               "outside the model's folder; refused", hint="copy the weights file into the folder")
    if real in files:
        return real
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: external data file {location!r} (tensor {name!r}) is missing",
                             hint=f"put {location} beside the model, as exported") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read external data file {location!r} ({e.strerror or e})",
                             hint="check its permissions") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelLoadError(f"{path}: external data {location!r} is not a regular file", hint="re-export the model")
    if st.st_nlink > 1:
        # onnx-ir refuses hard links when it maps the file: another name could expose any file.
        raise UnsafeModelError(f"{path}: external data file {location!r} has {st.st_nlink} hard links; refused",
                               hint=f"replace it with a plain copy (cp --no-preserve=links {location} tmp && mv tmp {location})")
    files[real] = st.st_size
    return real


def _check_extent(tensor: ir.ExternalTensor, path: Path, file_size: int) -> None:
    name = tensor.name or "?"
    try:
        needed = _nbytes(tensor)
    except Exception as e:
        raise ModelLoadError(f"{path}: tensor {name!r} has an invalid shape or type ({_one_line(e)})",
                             hint="re-export the model") from None
    offset = tensor.offset or 0
    length = tensor.length if tensor.length is not None else needed
    if offset < 0 or length < 0 or needed < 0:
        raise ModelLoadError(f"{path}: tensor {name!r} has a negative external-data offset, length or shape",
                             hint="re-export the model")
    if length != needed:
        raise ModelLoadError(f"{path}: tensor {name!r} says its external data is {length} bytes but its shape "
                             f"and type need {needed}", hint="re-export the model")
    if offset + length > file_size:
        raise ModelLoadError(
            f"{path}: external data file {os.fspath(tensor.location)!r} is shorter ({file_size} bytes) than tensor "
            f"{name!r} needs (bytes {offset} to {offset + length}): truncated or for another model",
            hint="copy or download the weights file again",
        )


def _check_inline(tensor: ir.TensorProtoTensor, path: Path) -> None:
    name = tensor.name or "?"
    if tensor.dtype == ir.DataType.STRING:
        return
    try:
        proto = tensor.raw
        needed = _nbytes(tensor)
        if proto.HasField("raw_data"):
            if len(proto.raw_data) != needed:
                raise ValueError(f"{len(proto.raw_data)} bytes of data for a shape that needs {needed}")
        elif needed:
            tensor.numpy()  # typed fields (float_data...): small in practice; checks count against shape
    except Exception as e:
        raise ModelLoadError(f"{path}: tensor {name!r} is corrupt ({_one_line(e)})",
                             hint="re-export it, or check that the download is complete") from None


def _nbytes(tensor) -> int:
    count = math.prod(int(d) for d in tensor.shape.numpy())
    return int(math.ceil(count * tensor.dtype.itemsize))


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return (text or type(e).__name__)[:limit]


# ----------------------------------------------------------------------------------------------
# Writing


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
        external_data = sum(_nbytes(t) for t in tensors) > 1_800_000_000
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
        with _PageDropper(_LIVE_MAPPINGS):
            if external_data:
                from sw_onnx.kernels import usable_cpus

                # 4096-aligned large tensors: onnxruntime can memory-map them instead of copying them to its
                # heap. Lazy tensors (quantized weights) are computed by several threads, a bounded number at a time.
                ir.save(model, tmp_model, format="protobuf", external_data=data_name, alignment=4096,
                        max_workers=usable_cpus(), max_in_flight_bytes=_SAVE_IN_FLIGHT_BYTES)
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
        root = e
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__
        if isinstance(root, SwOnnxError):
            raise root from e
        if isinstance(root, OSError):
            raise _write_error(root, path) from e
        if isinstance(root, ValueError) and "NaN or infinite" in str(root):
            raise UnsupportedGraphError(f"cannot write the model: a {root}",
                                        hint="the model's weights must be finite; check the export") from e
        raise
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


_SAVE_IN_FLIGHT_BYTES = 64 << 20


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

    from sw_onnx.kernels import usable_cpus
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
            headers.append((tensor.SerializeToString(), _nbytes(const)))
            tensors.append(const)
        else:
            kept.append(tensor)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    skeleton = proto.SerializeToString()
    del proto
    jobs = [functools.partial(_tensor_bytes, tensor) for tensor in tensors]
    with ThreadPoolExecutor(max_workers=usable_cpus(), thread_name_prefix="sw-onnx-save") as pool, open(path, "wb") as f:
        write_model(f, skeleton, headers, _computed_ahead(pool, jobs, [n for _, n in headers], _SAVE_IN_FLIGHT_BYTES))


# ----------------------------------------------------------------------------------------------
# onnxruntime


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


_STREAM_MIN_BYTES = 1 << 20


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


def create_session(
    model: ir.Model,
    *,
    overrides: Mapping[str, np.ndarray] | None = None,
    providers: list[str] | None = None,
    optimize: bool = True,
    stream_weights: bool = False,
):
    """An onnxruntime session for an in-memory model, without a copy of its weights.

    External (memory-mapped) weights stay references into their file: onnxruntime maps the file itself
    (``session.model_external_initializers_file_folder_path``), so no weight is copied to the heap and only
    the pages a run touches become resident (page cache, shared with other readers). Other large initializers
    are handed over as OrtValues (`add_external_initializers`; onnxruntime copies those), as is `overrides`,
    which replaces named initializers (e.g. weights with super weights zeroed). Constant weights are not
    pre-packed (``session.disable_prepacking``): a packed copy of every MatMul weight would double the memory
    of one forward pass.

    With `stream_weights`, every external weight of at least 1 MiB becomes an overridable initializer fed at
    each run from sw-onnx's own memory map, whose pages are dropped while the run goes: a `StreamingSession`
    (same interface) whose peak memory is one run's working set rather than the model's size. Constant
    folding of those weights (e.g. a Transpose or Cast of a weight) then happens at every run.

    Raises:
        UnsupportedGraphError: onnxruntime cannot load the model.
    """
    import onnxruntime as ort

    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(model.graph.initializers))
    if unknown:
        raise KeyError(f"no initializer named {unknown}")
    folder = _external_folder(model, overrides)
    names, arrays, values = [], [], []
    originals = {}
    for name, value in model.graph.initializers.items():
        const = value.const_value
        if const is None:
            continue
        external = isinstance(const, ir.ExternalTensor)
        if name not in overrides and external and folder is not None:
            continue  # onnxruntime maps it from the file
        if name not in overrides and not external and _nbytes(const) < _IN_MEMORY_THRESHOLD_BYTES:
            continue
        array = overrides[name] if name in overrides else const.numpy()
        ort_array = None
        if const.dtype.bitwidth >= 8 and const.dtype != ir.DataType.STRING:
            try:
                ort_array = ort_value(array)
            except Exception:  # a type onnxruntime has no OrtValue for: leave it to protobuf
                ort_array = None
        if ort_array is None:
            if external or name in overrides:
                # e.g. int4: protobuf carries a copy (never a reference to a file onnxruntime would re-read).
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
    streamed, mappings = {}, []
    if stream_weights and folder is not None:
        import mmap

        graph_inputs = {i.name for i in proto.graph.input}
        for name, value in model.graph.initializers.items():
            const = value.const_value
            if (name in overrides or not isinstance(const, _MappedOnDemand) or const.dtype.bitwidth < 8
                    or const.dtype == ir.DataType.STRING or _nbytes(const) < _STREAM_MIN_BYTES
                    or not hasattr(mmap, "MADV_DONTNEED")):
                continue
            array, mapping = const.mapped()
            streamed[name] = ort_value(array)
            mappings.append(mapping)
            if name not in graph_inputs:  # overridable: onnxruntime takes the fed value over the file's
                import onnx

                proto.graph.input.append(onnx.helper.make_tensor_value_info(
                    name, int(const.dtype), [int(d) for d in const.shape.numpy()]))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_prepacking", "1")
    if folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if names:
        options.add_external_initializers(names, values)
    try:
        session = ort.InferenceSession(proto.SerializeToString(), options,
                                       providers=providers or ["CPUExecutionProvider"])
    except Exception as e:
        if type(e).__module__.startswith("onnxruntime"):
            raise UnsupportedGraphError(
                f"onnxruntime {ort.__version__} cannot load this model: {_one_line(e, 300)}",
                hint="check that the model runs in onnxruntime; sw-onnx needs it to",
            ) from e
        raise
    session._sw_onnx_keep_alive = (arrays, values)  # the session reads these buffers
    if streamed:
        return StreamingSession(session, streamed, mappings)
    return session
