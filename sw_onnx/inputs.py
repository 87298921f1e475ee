"""Build onnxruntime feeds for any decoder-like graph from a sequence of token ids.

Inputs are recognised by name and type, never required: a graph may take `input_ids` (or any single integer
input such as `tokens`), `attention_mask`, `position_ids`, `token_type_ids`, KV-cache inputs
(`past_key_values.*`, `past.*`, `cache_*`), and anything else is filled with zeros of its declared
type and shape (symbolic dimensions become 1, or 0 for a cache's sequence axis).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from sw_onnx.errors import UnsupportedGraphError

# Token ids used when no tokenizer is available: BOS followed by a fixed, model-independent pseudo-sentence.
# Super activations sit on the first token, so the content matters less than BOS coming first.
DEFAULT_TOKEN_IDS_AFTER_BOS = (17, 42, 7, 99, 64, 23, 5, 88, 31, 12)
DEFAULT_BOS_TOKEN_ID = 1

_ORT_TYPE_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
from sw_onnx.kvcache import CACHE_NAME as _CACHE_NAME  # noqa: E402  (past/present KV inputs, by name)
_IDS_NAME = re.compile(r"input_ids|^ids$|tokens?$|token_ids", re.IGNORECASE)


def _is_integer(type_str: str) -> bool:
    return type_str in ("tensor(int64)", "tensor(int32)")


def find_ids_input(inputs) -> str:
    """Return the name of the graph input that takes token ids.

    Args:
        inputs: `session.get_inputs()` (objects with `.name`, `.type`, `.shape`).

    Raises:
        UnsupportedGraphError: no integer input could be the token ids.
    """
    candidates = [i for i in inputs if _is_integer(i.type) and not _CACHE_NAME.search(i.name)]
    for i in candidates:
        if _IDS_NAME.search(i.name):
            return i.name
    others = [i for i in candidates if not re.search(r"mask|position|type", i.name, re.IGNORECASE)]
    if len(others) == 1:
        return others[0].name
    raise UnsupportedGraphError(
        "cannot tell which graph input takes the token ids "
        f"(integer inputs: {[i.name for i in candidates] or 'none'})",
        hint="name it input_ids, or pass a model with a single integer input",
    )


def _fill_shape(shape, batch: int, seq: int, total: int, *, is_cache: bool) -> list[int]:
    dims = []
    for axis, d in enumerate(shape):
        if isinstance(d, int) and d >= 0:
            dims.append(d)
            continue
        name = str(d or "").lower()
        if "batch" in name:
            dims.append(batch)
        elif is_cache and (("seq" in name or "length" in name or "past" in name) or axis == len(shape) - 2):
            dims.append(0)  # an empty past
        elif "seq" in name or "length" in name:
            dims.append(total if "total" in name or "past" in name else seq)
        else:
            dims.append(1)
    return dims


def build_feeds(session, token_ids: np.ndarray | Sequence[int]) -> dict[str, np.ndarray]:
    """Feeds for one forward pass over `token_ids` with an empty KV cache.

    Args:
        session: an `onnxruntime.InferenceSession`.
        token_ids: int [seq] or [batch, seq]. For a graph whose ids input has rank 1, batch must be 1.

    Returns:
        A dict from every graph input name to a numpy array.

    >>> import numpy as np
    >>> class I:  # stand-in for onnxruntime's NodeArg
    ...     def __init__(self, name, type, shape): self.name, self.type, self.shape = name, type, shape
    >>> class S:
    ...     def get_inputs(self): return [I("input_ids", "tensor(int64)", ["batch", "seq"]),
    ...                                 I("attention_mask", "tensor(int64)", ["batch", "seq"])]
    >>> build_feeds(S(), [1, 5, 9])["attention_mask"]
    array([[1, 1, 1]])
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None, :]
    batch, seq = ids.shape
    inputs = session.get_inputs()
    ids_name = find_ids_input(inputs)
    hints = getattr(session, "sw_onnx_input_dims", None) or {}  # `cache_dim_hints`, set by sw_onnx.io.open_session
    feeds: dict[str, np.ndarray] = {}
    for i in inputs:
        dtype = _ORT_TYPE_TO_NUMPY.get(i.type)
        if dtype is None:
            raise UnsupportedGraphError(f"graph input {i.name!r} has unsupported type {i.type}")
        name = i.name.lower()
        rank = len(i.shape)
        if i.name == ids_name:
            value = ids if rank == 2 else ids[0]
        elif _CACHE_NAME.search(name):
            shape = _fill_shape(i.shape, batch, seq, seq, is_cache=True)
            for axis, size in hints.get(i.name, {}).items():
                if axis < len(shape) and not isinstance(i.shape[axis], int):
                    shape[axis] = size
            value = np.zeros(shape, dtype=dtype)
        elif "attention_mask" in name or name == "mask":
            value = np.ones((batch, seq), dtype=dtype)
        elif "position" in name:
            value = np.broadcast_to(np.arange(seq, dtype=dtype), (batch, seq)).copy()
        elif "token_type" in name or "segment" in name:
            value = np.zeros((batch, seq), dtype=dtype)
        else:
            value = np.zeros(_fill_shape(i.shape, batch, seq, seq, is_cache=False), dtype=dtype)
        if rank == 1 and value.ndim == 2:
            value = value[0]
        feeds[i.name] = value
    return feeds


def logits_output_name(session) -> str:
    """The graph output holding next-token logits: `logits`, else the first float output of rank 3 (or 2)."""
    outputs = session.get_outputs()
    for o in outputs:
        if o.name == "logits":
            return o.name
    for rank in (3, 2):
        for o in outputs:
            if o.type in ("tensor(float)", "tensor(float16)") and len(o.shape) == rank:
                return o.name
    raise UnsupportedGraphError("the graph has no logits-like output (float, rank 3 or 2)")


DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."  # the paper's detection prompt


def _read_json(path) -> dict:
    import json

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def bos_convention(model_dir) -> tuple[int | None, bool]:
    """(BOS token id, whether the model expects it prepended) from config.json / tokenizer_config.json.

    `add_bos_token` is read from tokenizer_config.json, then config.json; when neither says, a model
    that names a BOS id is assumed to use it (the Llama convention).
    """
    from pathlib import Path

    folder = Path(model_dir)
    config = _read_json(folder / "config.json")
    tok_config = _read_json(folder / "tokenizer_config.json")
    bos = config.get("bos_token_id")
    bos = bos[0] if isinstance(bos, list) and bos else bos
    add = tok_config.get("add_bos_token", config.get("add_bos_token"))
    if add is None:
        add = bos is not None
    return (int(bos) if isinstance(bos, int) else None), bool(add)


def prompt_token_ids(model_path, *, tokenizer=None, prompt: str | None = None) -> tuple[np.ndarray, str]:
    """Token ids for detection and how they were made.

    With a tokenizer (`tokenizer` path, or tokenizer.json beside the model) the prompt (default: the paper's
    "Apple Inc. is a worldwide tech company.") is encoded and BOS prepended when the model expects it.
    Without one, the documented default: BOS (config.json's id, else 1) then `DEFAULT_TOKEN_IDS_AFTER_BOS`.

    Returns:
        (int64 ids `[seq]`, a short description of the source).
    """
    from pathlib import Path

    from sw_onnx.errors import UsageError

    model_path = Path(model_path)
    folder = model_path if model_path.is_dir() else model_path.parent
    bos, add_bos = bos_convention(folder)
    tok_path = Path(tokenizer) if tokenizer else folder / "tokenizer.json"
    if tokenizer and tok_path.is_dir():
        tok_path = tok_path / "tokenizer.json"
    if tokenizer and not tok_path.is_file():
        raise UsageError(f"--tokenizer {tokenizer}: no tokenizer.json there")
    if tok_path.is_file():
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(tok_path))
        except Exception as e:
            raise UsageError(f"{tok_path}: not a readable tokenizer.json ({e})") from e
        text = DEFAULT_PROMPT if prompt is None else prompt
        ids = tok.encode(text).ids
        if add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        if not ids:
            raise UsageError("the prompt encodes to no tokens")
        return np.array(ids, dtype=np.int64), f"tokenizer {tok_path.name}: {text!r}" + (" with BOS" if ids[0] == bos else "")
    if prompt is not None:
        raise UsageError("--prompt needs a tokenizer", hint="put tokenizer.json beside the model or pass --tokenizer")
    first = bos if bos is not None else DEFAULT_BOS_TOKEN_ID
    return np.array((first, *DEFAULT_TOKEN_IDS_AFTER_BOS), dtype=np.int64), "default ids (no tokenizer)"
