"""Loading a model: find the .onnx a user means, parse it with its weights left lazy, and refuse what sw-onnx
should not touch.

Loading refuses, with a `ModelLoadError` / `UnsupportedGraphError`, anything sw-onnx should not touch: a path
that is not a regular file, an empty or non-ONNX file (GGUF, PNG, zip, safetensors... are named), a protobuf
that does not parse or holds non-UTF-8 strings, an opset outside `supported_opsets()`, a standard node whose
input/output count its schema does not allow or whose inputs are defined nowhere, and every external-data
reference that is unsafe or broken. **External data is validated before anything reads it**: every `ir.ExternalTensor` of the model (main
graph, subgraphs, node attributes, functions) must name a relative location without ``..`` whose real path
(symlinks resolved) stays inside the model's folder, a regular file with one hard link, and an
``offset + length`` within that file. Inline tensors must hold as many bytes as their shape says.

Weights stay lazy: `onnx_ir.load` memory-maps external data (`_MappedOnDemand`: each read maps just that
tensor, afresh), and large inline models have their weights mapped from the .onnx file itself
(`_MappedInline`).
"""

from __future__ import annotations

import logging
import os
import stat
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

from sw_onnx.errors import ModelLoadError, SwOnnxError, UnsafeModelError, UnsupportedGraphError
from sw_onnx.io._util import nbytes, one_line

logger = logging.getLogger("sw_onnx.io")

MODEL_FILE_NAMES = ("model.onnx", "decoder_model.onnx", "model_quantized.onnx")
MIN_OPSET = 7
"""Oldest default-domain opset accepted (onnxruntime's own minimum)."""
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
        from sw_onnx.genai import find_config, read_config

        genai = find_config(p)
        if genai is not None:  # an onnxruntime-genai folder names its decoder
            return read_config(genai).filename
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
        first_line = one_line(e)
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
    """Every node of ONNX's or onnxruntime's domains must be an op that ONNX (at the model's opset) or the
    installed onnxruntime defines (its contrib ops: `sw_onnx.opschema`), with as many inputs/outputs as its
    schema allows, so that code walking the graph can index them (a corrupt file can drop or add some).

    Raises:
        ModelLoadError: an op nothing knows, or a node that does not fit its schema.
    """
    from sw_onnx.opschema import ONNXRUNTIME_DOMAINS, find_schema

    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    schemas: dict[tuple[str, str], object] = {}
    for node in model.graph.all_nodes():
        if node.domain not in ONNXRUNTIME_DOMAINS or (node.domain in ("", "ai.onnx") and opset is None):
            continue
        key = (node.domain, node.op_type)
        if key not in schemas:
            schemas[key] = find_schema(node.domain, node.op_type, opset)
        schema = schemas[key]
        where = f"node {node.name or node.op_type!r}"
        if schema is None:
            what = f"ONNX opset {opset}" if node.domain in ("", "ai.onnx") else f"domain {node.domain}"
            raise ModelLoadError(f"{path}: corrupt or invalid model: {where} uses {node.op_type!r}, which {what} does "
                                 "not have (nor does the installed onnxruntime)", hint="re-export the model")
        n_in, n_out = len(node.inputs), len(node.outputs)
        if not schema.min_input <= n_in <= schema.max_input or not schema.min_output <= n_out <= schema.max_output:
            where_from = f"opset {opset}" if schema.source == "onnx" else "onnxruntime"
            raise ModelLoadError(
                f"{path}: corrupt or invalid model: {where} ({node.op_type}) has {n_in} inputs and {n_out} outputs; "
                f"{where_from} allows {schema.min_input}-{schema.max_input} and {schema.min_output}-{schema.max_output}",
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
        needed = nbytes(tensor)
    except Exception as e:
        raise ModelLoadError(f"{path}: tensor {name!r} has an invalid shape or type ({one_line(e)})",
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
        needed = nbytes(tensor)
        if proto.HasField("raw_data"):
            if len(proto.raw_data) != needed:
                raise ValueError(f"{len(proto.raw_data)} bytes of data for a shape that needs {needed}")
        elif needed:
            tensor.numpy()  # typed fields (float_data...): small in practice; checks count against shape
    except Exception as e:
        raise ModelLoadError(f"{path}: tensor {name!r} is corrupt ({one_line(e)})",
                             hint="re-export it, or check that the download is complete") from None

