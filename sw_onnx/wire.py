"""Inline weights read and written tensor by tensor, through the protobuf wire format of a ModelProto.

An .onnx file under 2 GB usually holds its weights inline (``TensorProto.raw_data``), and protobuf parses the
whole message at once: every weight on the heap before anything can start. Here the file is memory-mapped and
only its small parts are parsed: `inline_as_external` walks the framing (ModelProto.graph ->
GraphProto.initializer -> TensorProto.raw_data), skipping over the weight bytes, and returns a ModelProto
whose large initializers are external-data references (location, offset, length) into the .onnx file itself.
`sw_onnx.io` then treats them like any external data: memory-mapped on demand, streamed to onnxruntime.

`write_model` is the converse: the model's small parts serialized by protobuf, then each initializer framed
and written in turn, so the output is never held in memory whole. Field order does not matter to protobuf
parsers; lengths are computed before the bytes are.

Only framing is handled here (tags, varints, lengths of fields 7, 5 and 9); every field's content is still
parsed by protobuf. Anything unexpected (groups, a repeated graph field, a truncated frame) returns None and
the caller parses the file the ordinary way.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

__all__ = ["inline_as_external", "write_model"]

# ModelProto.graph, GraphProto.initializer, TensorProto.raw_data / external_data / data_location.
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_TENSOR_RAW_DATA, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 9, 13, 14
_LENGTH_DELIMITED = 2


class _Malformed(Exception):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        bits = n & 0x7F
        n >>= 7
        if n:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, payload start, field end) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
            payload = field_start
        elif wire == 1:
            payload, pos = pos, pos + 8
        elif wire == _LENGTH_DELIMITED:
            length, payload = _varint(buf, pos, end)
            pos = payload + length
        elif wire == 5:
            payload, pos = pos, pos + 4
        else:  # groups (3, 4) and invalid types: not in ONNX files
            raise _Malformed
        if pos > end or number == 0:
            raise _Malformed
        yield number, wire, field_start, payload, pos


def _field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | _LENGTH_DELIMITED) + _encode_varint(len(payload)) + payload


def _external_entries(location: str, offset: int, length: int) -> bytes:
    out = b""
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = _field(1, key.encode()) + _field(2, value.encode())
        out += _field(_TENSOR_EXTERNAL_DATA, entry)
    return out + _encode_varint(_TENSOR_DATA_LOCATION << 3) + _encode_varint(1)  # TensorProto.EXTERNAL


def _tensor_as_reference(buf, start: int, end: int, location: str, min_bytes: int) -> bytes | None:
    """The TensorProto at buf[start:end] with its raw_data replaced by a reference, or None to keep it."""
    raw = None
    for number, wire, _, payload, field_end in _fields(buf, start, end):
        if number in (_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION):
            return None  # already external (or odd): leave it to protobuf and the external-data checks
        if number == _TENSOR_RAW_DATA and wire == _LENGTH_DELIMITED:
            if raw is not None:
                return None  # repeated raw_data: protobuf keeps the last; not worth special-casing
            raw = (payload, field_end)
    if raw is None or raw[1] - raw[0] < min_bytes:
        return None
    parts = []
    for number, wire, field_start, _, field_end in _fields(buf, start, end):
        if not (number == _TENSOR_RAW_DATA and wire == _LENGTH_DELIMITED):
            parts.append(bytes(buf[field_start:field_end]))
    parts.append(_external_entries(location, raw[0], raw[1] - raw[0]))
    return b"".join(parts)


def inline_as_external(path: str | os.PathLike, *, min_bytes: int = 1 << 16) -> bytes | None:
    """The serialized ModelProto at `path` with its main graph's inline initializers of at least `min_bytes`
    turned into external-data references into `path` itself (location = its file name).

    Returns None when there is nothing to turn (no large inline initializer) or the framing is not what
    protobuf would accept without question; the caller then parses the file as usual.
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return None
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _strip(buf, size, path.name, min_bytes)
    except _Malformed:
        return None
    finally:
        buf.close()


def _strip(buf, size: int, location: str, min_bytes: int) -> bytes | None:
    model_parts, graph_seen, turned = [], False, 0
    for number, wire, field_start, payload, field_end in _fields(buf, 0, size):
        if number != _MODEL_GRAPH:
            model_parts.append(bytes(buf[field_start:field_end]))
            continue
        if wire != _LENGTH_DELIMITED or graph_seen:
            return None  # a second graph field is merged into the first by protobuf: leave that to it
        graph_seen = True
        graph_parts = []
        for g_number, g_wire, g_start, g_payload, g_end in _fields(buf, payload, field_end):
            tensor = None
            if g_number == _GRAPH_INITIALIZER and g_wire == _LENGTH_DELIMITED:
                tensor = _tensor_as_reference(buf, g_payload, g_end, location, min_bytes)
            if tensor is None:
                graph_parts.append(bytes(buf[g_start:g_end]))
            else:
                graph_parts.append(_field(_GRAPH_INITIALIZER, tensor))
                turned += 1
        model_parts.append(_field(_MODEL_GRAPH, b"".join(graph_parts)))
    return b"".join(model_parts) if turned else None


def write_model(
    f: BinaryIO,
    skeleton: bytes,
    initializers: Sequence[tuple[bytes, int]],
    data: Iterable[bytes | memoryview],
) -> None:
    """Write a ModelProto: `skeleton` (the serialized model without the main graph's initializers; its graph
    field, if any, is extended) plus each initializer, given as (its TensorProto serialized without raw_data,
    the raw_data length), whose bytes `data` yields in the same order. `data` is drawn one tensor at a time,
    while writing: only the tensors it holds ahead exist at once.
    """
    framed = []  # (field head up to the raw_data bytes, raw_data length)
    graph_extra = 0
    for header, length in initializers:
        raw_head = _encode_varint(_TENSOR_RAW_DATA << 3 | _LENGTH_DELIMITED) + _encode_varint(length)
        tensor_len = len(header) + len(raw_head) + length
        head = _encode_varint(_GRAPH_INITIALIZER << 3 | _LENGTH_DELIMITED) + _encode_varint(tensor_len) + header + raw_head
        framed.append((head, length))
        graph_extra += len(head) + length
    parts: list[bytes] = []
    graph = None
    size = len(skeleton)
    try:
        for number, wire, field_start, payload, field_end in _fields(skeleton, 0, size):
            if number == _MODEL_GRAPH and wire == _LENGTH_DELIMITED and graph is None:
                graph = bytes(skeleton[payload:field_end])
            else:
                parts.append(bytes(skeleton[field_start:field_end]))
    except _Malformed:
        raise ValueError("write_model: the skeleton is not a serialized ModelProto") from None
    graph = graph or b""
    f.write(b"".join(parts))
    f.write(_encode_varint(_MODEL_GRAPH << 3 | _LENGTH_DELIMITED) + _encode_varint(len(graph) + graph_extra))
    f.write(graph)
    chunks = iter(data)
    for head, length in framed:
        f.write(head)
        chunk = next(chunks, None)
        if chunk is None or len(chunk) != length:
            got = "nothing" if chunk is None else f"{len(chunk)} bytes"
            raise ValueError(f"write_model: a tensor produced {got}, {length} announced")
        f.write(chunk)
        del chunk
