"""Perplexity of an ONNX causal language model with onnxruntime (no torch).

Protocol (the one findings.md uses, GPTQ-style):

- Text: the WikiText-2 test file *as is* (its documents are already joined), read as UTF-8 and tokenized
  once with the model's ``tokenizer.json``, **without BOS** and without any other special token, and
  without truncation (:func:`wikitext_token_ids`).
- Windows: non-overlapping windows of ``context`` tokens (default :data:`WIKITEXT_CONTEXT` = 512) taken
  from the start of the token stream; an incomplete last window is dropped. ``max_windows`` keeps only
  the first windows (findings.md tables: 32 windows; quick probes: 8).
- Each window is run on its own (batch of one, positions 0..context-1, attention mask of ones, empty KV
  cache; feeds from :func:`sw_onnx.inputs.build_feeds`). Logits at position ``i`` predict token ``i + 1``
  of the same window, so a window gives ``context - 1`` predictions (32 windows of 512 = 16,352 tokens).
- NLL per prediction: ``logsumexp(logits) - logits[target]``, the log-softmax computed stably in
  float64 numpy. Mean NLL over all predicted tokens of all windows; perplexity = ``exp(mean NLL)``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sw_onnx.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime
    import tokenizers

WIKITEXT_CONTEXT = 512
"""Tokens per window in the documented protocol."""
WIKITEXT_WINDOWS = 32
"""Windows the findings.md tables use (16,352 predicted tokens at 512); ``None`` means all of them."""
WIKITEXT_FILE_NAME = "wikitext2_test.txt"
WIKITEXT_ENV = "SW_ONNX_WIKITEXT"


def default_wikitext_path() -> Path:
    """The WikiText-2 test text: ``$SW_ONNX_WIKITEXT``, else ``<repo>/../shared/data/wikitext2_test.txt``,
    else ``./shared/data/wikitext2_test.txt``, else the copy shipped in the package (``sw_onnx/data``).

    Raises:
        FileNotFoundError: none of these exists (or the environment variable names a missing file).
    """
    env = os.environ.get(WIKITEXT_ENV)
    if env:
        p = Path(env).expanduser()
        if p.is_file():
            return p
        raise FileNotFoundError(f"${WIKITEXT_ENV} = {env}: no such file")
    repo = Path(__file__).resolve().parents[1]
    candidates = [
        repo.parent / "shared" / "data" / WIKITEXT_FILE_NAME,
        Path.cwd() / "shared" / "data" / WIKITEXT_FILE_NAME,
        Path(str(resources.files("sw_onnx") / "data" / WIKITEXT_FILE_NAME)),  # packaged (CC BY-SA 3.0)
    ]
    for p in candidates:
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"WikiText-2 test text not found (looked at {', '.join(str(c) for c in candidates)}); "
        f"set ${WIKITEXT_ENV} to the path of {WIKITEXT_FILE_NAME}"
    )


def load_tokenizer(model_dir_or_path: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> "tokenizers.Tokenizer":
    """A ``tokenizers.Tokenizer`` from ``tokenizer`` (a tokenizer.json, or a folder holding one), else from
    the tokenizer.json beside the model (``model_dir_or_path`` is an export folder or an .onnx file).

    Raises:
        UsageError: no tokenizer.json there, or an unreadable one.
    """
    from tokenizers import Tokenizer

    if tokenizer is not None:
        path = Path(tokenizer)
        if path.is_dir():
            path = path / "tokenizer.json"
        where = f"tokenizer {tokenizer}"
    else:
        base = Path(model_dir_or_path)
        path = (base if base.is_dir() else base.parent) / "tokenizer.json"
        where = f"beside the model ({path.parent})"
    if not path.is_file():
        raise UsageError(f"no tokenizer.json {where}", hint="pass --tokenizer PATH/tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise UsageError(f"{path}: not a readable tokenizer.json ({e})") from e


def _bos_from_tokenizer(tokenizer) -> int | None:
    """The token the tokenizer's own post-processor puts first, if it adds one."""
    with_special = tokenizer.encode("a", add_special_tokens=True).ids
    without = tokenizer.encode("a", add_special_tokens=False).ids
    if len(with_special) > len(without) and with_special[1 : 1 + len(without)] == without:
        return int(with_special[0])
    return None


def encode_text(tokenizer, text: str, *, add_bos: bool, bos_id: int | None = None) -> np.ndarray:
    """Token ids of ``text`` as int64 ``[n]``: no special token added except, with ``add_bos``, one BOS first.

    Args:
        add_bos: prepend BOS (not repeated when the text already starts with it).
        bos_id: the BOS id (e.g. config.json's ``bos_token_id``); default: the token the tokenizer's
            post-processor prepends, if it prepends one.

    Raises:
        UsageError: ``add_bos`` without a known BOS id.
    """
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if add_bos:
        bos = bos_id if bos_id is not None else _bos_from_tokenizer(tokenizer)
        if bos is None:
            raise UsageError("add_bos: the tokenizer adds no BOS of its own; pass bos_id")
        if not ids or ids[0] != bos:
            ids = [int(bos), *ids]
    return np.asarray(ids, dtype=np.int64)


def wikitext_token_ids(tokenizer, path: str | os.PathLike | None = None) -> np.ndarray:
    """The protocol's token stream: the whole file (default :func:`default_wikitext_path`) as is, UTF-8,
    tokenized once, without BOS or any special token, without truncation. int64 ``[n]``."""
    p = Path(path) if path is not None else default_wikitext_path()
    text = p.read_text(encoding="utf-8")
    # tokenizer.json may carry a truncation setting: the protocol wants every token.
    truncation = getattr(tokenizer, "truncation", None)
    if truncation:
        tokenizer.no_truncation()
    try:
        return encode_text(tokenizer, text, add_bos=False)
    finally:
        if truncation:
            tokenizer.enable_truncation(**truncation)


def text_token_ids(model, *, text: str | os.PathLike | None = None,
                   tokenizer: str | os.PathLike | None = None) -> tuple[np.ndarray, str]:
    """Token ids of a text file by the perplexity protocol (as is, once, no BOS), and their source.

    Args:
        model: the model path or folder (its tokenizer.json is used unless ``tokenizer`` is given).
        text: the text file; default: the WikiText-2 test text (:func:`default_wikitext_path`).
        tokenizer: a tokenizer.json or a folder holding one.

    Raises:
        UsageError: no tokenizer, no such text file, or a text that encodes to no token.
    """
    if text is None:
        try:
            path = default_wikitext_path()
        except FileNotFoundError as e:
            raise UsageError(f"no --text given and {e}", hint="pass --text FILE") from None
    else:
        path = Path(text)
        if not path.is_file():
            raise UsageError(f"--text {text}: no such file")
    tok = load_tokenizer(model, tokenizer)
    try:
        ids = wikitext_token_ids(tok, path)
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason})") from None
    if ids.size == 0:
        raise UsageError(f"{path}: the text encodes to no token")
    return ids, f"{path} ({len(ids):,} tokens)"


@dataclass
class PerplexityResult:
    """Outcome of :func:`perplexity`.

    Attributes:
        perplexity: ``exp(nll_mean)``.
        nll_mean: mean next-token negative log-likelihood (nats) over all predicted tokens.
        tokens: predicted tokens, ``windows * (context - 1)``.
        windows: windows evaluated.
        seconds: wall time of the forward passes and NLL computation (session creation excluded).
    """

    perplexity: float
    nll_mean: float
    tokens: int
    windows: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _window_nll_sum(logits: np.ndarray, window: np.ndarray) -> float:
    """Sum over positions 0..n-2 of -log softmax(logits[i])[window[i + 1]], in float64."""
    x = np.asarray(logits[:-1], dtype=np.float64)
    targets = window[1:]
    m = x.max(axis=-1)
    if not np.all(np.isfinite(m)):
        return math.inf if not np.any(np.isnan(m)) else math.nan
    np.subtract(x, m[:, None], out=x)
    picked = x[np.arange(len(targets)), targets]
    np.exp(x, out=x)
    lse = np.log(x.sum(axis=-1))
    return float(np.sum(lse - picked))


def perplexity(
    model: "str | os.PathLike | onnxruntime.InferenceSession",
    token_ids: np.ndarray | Sequence[int],
    *,
    context: int = WIKITEXT_CONTEXT,
    max_windows: int | None = None,
    providers: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    bos: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``token_ids`` by the module's protocol (non-overlapping windows).

    Args:
        model: an onnxruntime session, an .onnx path, an export folder holding model.onnx, or an
            in-memory ``onnx_ir.Model``.
        token_ids: the token stream, int ``[n]`` (e.g. :func:`wikitext_token_ids`).
        context: tokens per window (>= 2).
        max_windows: evaluate only the first windows; None: every complete window.
        providers: onnxruntime providers when a session is created here (default CPU).
        progress: called as ``progress(done, total)`` after each window.
        bos: a BOS id to start every window with (then ``context - 1`` text tokens per window, the first
            predicted from BOS alone): models such as Gemma that need their BOS. None: the protocol as is.

    Raises:
        UsageError: bad arguments, or fewer than ``context`` tokens, or token ids outside the vocabulary.
        UnsupportedGraphError: the graph has no logits-like output or no token-ids input.
    """
    from sw_onnx.inputs import build_feeds, logits_output_name

    ids = np.asarray(token_ids)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise UsageError(f"token_ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if context < 2:
        raise UsageError(f"context must be at least 2, got {context}")
    if max_windows is not None and max_windows < 1:
        raise UsageError(f"max_windows must be at least 1, got {max_windows}")
    step = context - (1 if bos is not None else 0)
    available = len(ids) // step
    if available == 0:
        raise UsageError(f"{len(ids)} tokens: not one complete window of {context}")
    n_windows = available if max_windows is None else min(available, max_windows)

    from sw_onnx.io import open_session

    session = open_session(model, providers)
    out_name = logits_output_name(session)
    declared_vocab = next((o.shape[-1] for o in session.get_outputs() if o.name == out_name), None)
    used = ids[: n_windows * step]
    if int(used.min()) < 0 or (isinstance(declared_vocab, int) and int(used.max()) >= declared_vocab):
        raise UsageError(f"token ids span {int(used.min())}..{int(used.max())}, outside the model's "
                         f"vocabulary of {declared_vocab}", hint="use the model's own tokenizer")
    t0 = time.perf_counter()
    nll_sum = 0.0
    for w in range(n_windows):
        window = ids[w * step : (w + 1) * step]
        if bos is not None:
            window = np.concatenate([np.array([bos], np.int64), window])
        (logits,) = session.run([out_name], build_feeds(session, window[None, :]))
        if logits.ndim == 3:
            logits = logits[0]
        if logits.ndim != 2 or logits.shape[0] != context:
            raise UsageError(f"logits output {out_name!r} has shape {logits.shape}; expected [1, {context}, vocab]")
        vocab = logits.shape[-1]
        if int(window.max()) >= vocab or int(window.min()) < 0:
            raise UsageError(f"token id outside the model's vocabulary of {vocab} in window {w}")
        nll_sum += _window_nll_sum(logits, window)
        if progress is not None:
            progress(w + 1, n_windows)
    seconds = time.perf_counter() - t0
    tokens = n_windows * (context - 1)
    nll_mean = nll_sum / tokens
    with np.errstate(over="ignore"):
        ppl = float(np.exp(np.float64(nll_mean)))  # inf past float64 range, nan stays nan
    return PerplexityResult(perplexity=ppl, nll_mean=nll_mean, tokens=tokens, windows=n_windows, seconds=seconds)
