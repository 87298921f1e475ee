"""Measure what a change does to a model: perplexity, a logits comparison, greedy generation, ablation.

- :func:`evaluate_model`: perplexity by the protocol of :mod:`sw_onnx.evaluate` (non-overlapping windows,
  mean next-token NLL, exp), with a token budget.
- :func:`compare_models`: two models on the same windows: max |logit difference|, mean KL(reference ||
  candidate) over every position, top-1 agreement, and each model's perplexity from the same logits.
- :func:`generate`: greedy decoding; with the KV cache when the graph has one (``present.*`` outputs fed
  back as ``past_key_values.*`` inputs), otherwise recomputing the whole sequence at each step.
- :func:`ablate_model`: write a copy of a model whose chosen weight scalars (its super weights) are
  multiplied by a scale (0 prunes them). Atomic, never over its input.

JSON schemas (fields may be added; a rename or removal bumps the version):

``sw-onnx/eval`` v1::

    {"schema", "schema_version", "tool_version", "model": {"path"}, "input": {"source", "tokens_available"},
     "context", "windows", "tokens", "perplexity", "nll_mean", "seconds", "provider"}

``sw-onnx/compare`` v1::

    {"schema", "schema_version", "tool_version", "reference": {"path", "perplexity", "nll_mean"},
     "candidate": {"path", "perplexity", "nll_mean"}, "input": {"source", "tokens_available"},
     "context", "windows", "positions" (logit rows compared), "tokens" (predicted tokens, for perplexity),
     "max_abs_logit_diff", "mean_kl", "max_kl", "top1_agreement", "seconds", "provider",
     "fail_above_kl": float | null, "passed": bool}

``sw-onnx/ablate`` v1::

    {"schema", "schema_version", "tool_version", "input": {"path"}, "output": {"path"}, "scale",
     "source", "weights": [{"initializer", "index", "before", "after"}], "copied": [file names], "seconds"}
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sw_onnx._version import __version__
from sw_onnx.errors import UnsupportedGraphError, UsageError
from sw_onnx.evaluate import text_token_ids

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime

__all__ = [
    "COMPARE_SCHEMA",
    "EVAL_SCHEMA",
    "CompareResult",
    "EvalResult",
    "GenerateResult",
    "compare_models",
    "eos_token_ids",
    "evaluate_model",
    "generate",
    "text_token_ids",
    "windows_for",
]

from sw_onnx.schema import COMPARE_SCHEMA, EVAL_SCHEMA, SCHEMA_VERSION  # noqa: E402


Progress = Callable[[int, int], None]


# ------------------------------------------------------------------------------------------------ sessions


def open_session(model, providers: Sequence[str] | None = None) -> "onnxruntime.InferenceSession":
    """An onnxruntime session for an .onnx path, an export folder, an in-memory ``onnx_ir.Model``, or a
    session (returned as is): `sw_onnx.io.open_session`, a file it cannot load raised as ModelLoadError.

    Raises:
        ModelLoadError: no model there, or onnxruntime cannot load it.
    """
    from sw_onnx.io import open_session as open_any

    return open_any(model, providers, wrap_errors=True)


def _run(session, names: list[str], feeds: dict) -> list[np.ndarray]:
    try:
        return session.run(names, feeds)
    except Exception as e:  # onnxruntime's RuntimeException / Fail / InvalidArgument
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise UnsupportedGraphError(f"onnxruntime failed to run the model ({type(e).__name__}: {first})") from e


# ------------------------------------------------------------------------------------------------ tokens


def windows_for(n_tokens: int, context: int, max_tokens: int | None = None) -> tuple[int, int]:
    """(context, windows) for ``n_tokens`` of text: non-overlapping windows of ``context`` tokens, at most
    ``max_tokens`` tokens in all. A text shorter than one window gives one window of the whole text.

    Raises:
        UsageError: context < 2, max_tokens < 2, or fewer than 2 tokens.
    """
    if context < 2:
        raise UsageError(f"--context {context}: use at least 2")
    if max_tokens is not None and max_tokens < 2:
        raise UsageError(f"--max-tokens {max_tokens}: use at least 2")
    budget = n_tokens if max_tokens is None else min(n_tokens, max_tokens)
    if budget < 2:
        raise UsageError(f"{n_tokens} token(s): need at least 2 to predict one")
    if budget < context:
        return budget, 1
    return context, budget // context


# ------------------------------------------------------------------------------------------------ eval


@dataclass
class EvalResult:
    """Outcome of :func:`evaluate_model` (``tokens`` = predicted tokens, ``windows * (context - 1)``)."""

    model: str
    perplexity: float
    nll_mean: float
    tokens: int
    windows: int
    context: int
    seconds: float
    source: str = ""
    tokens_available: int = 0
    provider: str = "CPUExecutionProvider"

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": EVAL_SCHEMA, "schema_version": SCHEMA_VERSION, "tool_version": __version__,
            "model": {"path": self.model},
            "input": {"source": self.source, "tokens_available": self.tokens_available},
            "context": self.context, "windows": self.windows, "tokens": self.tokens,
            "perplexity": _json_float(self.perplexity), "nll_mean": _json_float(self.nll_mean),
            "seconds": round(self.seconds, 3), "provider": self.provider,
        }


def evaluate_model(
    model,
    token_ids: np.ndarray | Sequence[int],
    *,
    context: int = 512,
    max_tokens: int | None = None,
    providers: Sequence[str] | None = None,
    progress: Progress | None = None,
    source: str = "",
    bos: int | None = None,
) -> EvalResult:
    """Perplexity of ``model`` on ``token_ids`` (:func:`sw_onnx.evaluate.perplexity`), at most ``max_tokens``
    tokens (whole windows of ``context``; one shorter window when the text is shorter than ``context``).
    With ``bos``, every window is BOS then ``context - 1`` text tokens (models that need their BOS, Gemma).

    Args:
        model: an .onnx path, an export folder, an ``onnx_ir.Model`` or an onnxruntime session.
        providers: onnxruntime providers when a session is made here (default CPU).
        progress: ``progress(windows_done, windows_total)``.
    """
    from sw_onnx.evaluate import perplexity

    ids = np.asarray(token_ids, dtype=np.int64).ravel()
    n_tokens = len(ids)
    if bos is not None:  # each window holds BOS and context - 1 text tokens
        n_tokens = (len(ids) // (context - 1)) * context if len(ids) >= context - 1 else len(ids) + 1
    ctx, n_windows = windows_for(n_tokens, context, max_tokens)
    session = open_session(model, providers)
    result = perplexity(session, ids, context=ctx, max_windows=n_windows, progress=progress, bos=bos)
    return EvalResult(
        model=_describe(model), perplexity=result.perplexity, nll_mean=result.nll_mean, tokens=result.tokens,
        windows=result.windows, context=ctx, seconds=result.seconds, source=source, tokens_available=len(ids),
        provider=session.get_providers()[0],
    )


# ------------------------------------------------------------------------------------------------ compare


@dataclass
class CompareResult:
    """Outcome of :func:`compare_models`.

    Attributes:
        positions: logit rows compared (every position of every window).
        tokens: predicted tokens behind the perplexities (``windows * (context - 1)``).
        max_abs_logit_diff: max over positions and vocabulary of |reference - candidate|.
        mean_kl: mean over positions of KL(softmax(reference) || softmax(candidate)), nats.
        max_kl: the largest per-position KL.
        top1_agreement: fraction of positions whose argmax agree.
    """

    reference: str
    candidate: str
    positions: int
    tokens: int
    windows: int
    context: int
    max_abs_logit_diff: float
    mean_kl: float
    max_kl: float
    top1_agreement: float
    reference_perplexity: float
    candidate_perplexity: float
    reference_nll: float
    candidate_nll: float
    seconds: float
    source: str = ""
    tokens_available: int = 0
    provider: str = "CPUExecutionProvider"
    fail_above_kl: float | None = None

    @property
    def passed(self) -> bool:
        """False when ``fail_above_kl`` is set and the mean KL is above it (or not a number)."""
        return self.fail_above_kl is None or bool(self.mean_kl <= self.fail_above_kl)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": COMPARE_SCHEMA, "schema_version": SCHEMA_VERSION, "tool_version": __version__,
            "reference": {"path": self.reference, "perplexity": _json_float(self.reference_perplexity),
                          "nll_mean": _json_float(self.reference_nll)},
            "candidate": {"path": self.candidate, "perplexity": _json_float(self.candidate_perplexity),
                          "nll_mean": _json_float(self.candidate_nll)},
            "input": {"source": self.source, "tokens_available": self.tokens_available},
            "context": self.context, "windows": self.windows, "positions": self.positions, "tokens": self.tokens,
            "max_abs_logit_diff": _json_float(self.max_abs_logit_diff), "mean_kl": _json_float(self.mean_kl),
            "max_kl": _json_float(self.max_kl), "top1_agreement": self.top1_agreement,
            "seconds": round(self.seconds, 3), "provider": self.provider,
            "fail_above_kl": self.fail_above_kl, "passed": self.passed,
        }


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis."""
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _window_logits(session, out_name: str, window: np.ndarray) -> np.ndarray:
    from sw_onnx.inputs import build_feeds

    (logits,) = _run(session, [out_name], build_feeds(session, window[None, :]))
    if logits.ndim == 3:
        logits = logits[0]
    if logits.ndim != 2 or logits.shape[0] != len(window):
        raise UnsupportedGraphError(f"logits output {out_name!r} has shape {logits.shape}; "
                                    f"expected [1, {len(window)}, vocab]")
    return logits


def compare_models(
    reference,
    candidate,
    token_ids: np.ndarray | Sequence[int],
    *,
    context: int = 512,
    max_tokens: int | None = None,
    providers: Sequence[str] | None = None,
    progress: Progress | None = None,
    fail_above_kl: float | None = None,
    source: str = "",
    chunk: int = 128,
) -> CompareResult:
    """Run both models on the same windows of ``token_ids`` and compare their logits.

    Args:
        reference, candidate: .onnx paths, export folders, ``onnx_ir.Model`` or onnxruntime sessions.
        fail_above_kl: recorded in the result (``result.passed``); raising is the caller's choice.
        chunk: positions per float64 block (bounds memory for large vocabularies).

    Raises:
        UsageError: the models' vocabularies differ, or token ids outside them.
    """
    from sw_onnx.inputs import logits_output_name

    ids = np.asarray(token_ids, dtype=np.int64).ravel()
    ctx, n_windows = windows_for(len(ids), context, max_tokens)
    ref_s = open_session(reference, providers)
    cand_s = open_session(candidate, providers)
    ref_out, cand_out = logits_output_name(ref_s), logits_output_name(cand_s)
    t0 = time.perf_counter()
    max_diff = 0.0
    kl_sum = 0.0
    kl_max = 0.0
    agree = 0
    positions = 0
    nll = [0.0, 0.0]
    for w in range(n_windows):
        window = ids[w * ctx:(w + 1) * ctx]
        a = _window_logits(ref_s, ref_out, window)
        b = _window_logits(cand_s, cand_out, window)
        if a.shape[-1] != b.shape[-1]:
            raise UsageError(f"the models' vocabularies differ ({a.shape[-1]} vs {b.shape[-1]} logits)",
                             hint="compare two versions of the same model")
        if int(window.min()) < 0 or int(window.max()) >= a.shape[-1]:
            raise UsageError(f"token ids span {int(window.min())}..{int(window.max())}, outside the model's "
                             f"vocabulary of {a.shape[-1]}", hint="use the model's own tokenizer")
        for start in range(0, len(window), chunk):
            sl = slice(start, start + chunk)
            la, lb = _log_softmax(a[sl]), _log_softmax(b[sl])
            with np.errstate(invalid="ignore", over="ignore"):
                diff = np.abs(a[sl].astype(np.float64) - b[sl].astype(np.float64))
                max_diff = max(max_diff, float(np.max(diff))) if np.all(np.isfinite(diff)) else math.nan
                p = np.exp(la)
                # p * (la - lb) with 0 * anything = 0 where p underflows to 0
                kl = np.where(p > 0, p * (la - lb), 0.0).sum(axis=-1)
            kl_sum += float(kl.sum())
            kl_max = max(kl_max, float(kl.max())) if np.all(np.isfinite(kl)) else math.nan
            agree += int(np.sum(np.argmax(a[sl], axis=-1) == np.argmax(b[sl], axis=-1)))
            positions += len(kl)
            # next-token NLL for rows that have a target in this window
            rows = np.arange(start, min(start + chunk, len(window) - 1))
            if rows.size:
                targets = window[rows + 1]
                nll[0] -= float(la[rows - start, targets].sum())
                nll[1] -= float(lb[rows - start, targets].sum())
        if progress is not None:
            progress(w + 1, n_windows)
    tokens = n_windows * (ctx - 1)
    ref_nll, cand_nll = nll[0] / tokens, nll[1] / tokens
    return CompareResult(
        reference=_describe(reference), candidate=_describe(candidate), positions=positions, tokens=tokens,
        windows=n_windows, context=ctx, max_abs_logit_diff=max_diff, mean_kl=kl_sum / positions, max_kl=kl_max,
        top1_agreement=agree / positions, reference_perplexity=_exp(ref_nll), candidate_perplexity=_exp(cand_nll),
        reference_nll=ref_nll, candidate_nll=cand_nll, seconds=time.perf_counter() - t0, source=source,
        tokens_available=len(ids), provider=ref_s.get_providers()[0], fail_above_kl=fail_above_kl,
    )


# ------------------------------------------------------------------------------------------------ generate


@dataclass
class GenerateResult:
    """Outcome of :func:`generate`.

    Attributes:
        prompt_ids: the prompt's token ids.
        new_ids: generated ids (the EOS that stopped it included).
        stop_reason: ``"eos"`` or ``"max_new_tokens"``.
        used_kv_cache: whether the KV cache carried state between steps.
    """

    prompt_ids: list[int]
    new_ids: list[int]
    stop_reason: str
    used_kv_cache: bool
    seconds: float

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.new_ids

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def eos_token_ids(model) -> set[int]:
    """EOS ids of a model from config.json, generation_config.json and genai_config.json beside it (empty
    if none)."""
    from sw_onnx.genai import find_config, read_config
    from sw_onnx.io import resolve_model_path

    folder = Path(model)
    if not folder.is_dir():
        folder = resolve_model_path(model).parent
    genai = find_config(folder)
    found: set[int] = set(read_config(genai).eos_token_ids) if genai is not None else set()
    for name in ("config.json", "generation_config.json"):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        eos = data.get("eos_token_id") if isinstance(data, dict) else None
        for v in eos if isinstance(eos, list) else [eos]:
            if isinstance(v, int) and not isinstance(v, bool):
                found.add(v)
    return found


def _cache_pairs(session) -> dict[str, str]:
    """KV-cache graph input -> the output that gives its next value ({} when the graph has no usable cache)."""
    from sw_onnx.kvcache import CACHE_NAME as _CACHE_NAME

    outputs = {o.name for o in session.get_outputs()}
    pairs = {}
    for i in session.get_inputs():
        if not _CACHE_NAME.search(i.name) or i.type not in ("tensor(float)", "tensor(float16)", "tensor(bfloat16)"):
            continue
        candidates = [
            i.name.replace("past_key_values", "present"),
            re.sub(r"^past", "present", i.name),
            i.name.replace("past", "present"),
            re.sub(r"^cache", "present", i.name),
        ]
        match = next((c for c in candidates if c in outputs and c != i.name), None)
        if match is None:
            return {}
        pairs[i.name] = match
    return pairs


def _step_feeds(session, step_ids: np.ndarray, past_len: int, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds for ``step_ids`` after ``past_len`` cached tokens (``past``: cache input -> value)."""
    from sw_onnx.inputs import build_feeds

    feeds = build_feeds(session, step_ids[None, :])
    seq = len(step_ids)
    for i in session.get_inputs():
        name = i.name.lower()
        value = feeds[i.name]
        if i.name in past:
            feeds[i.name] = past[i.name]
        elif "attention_mask" in name or name == "mask":
            feeds[i.name] = np.ones((1, past_len + seq), dtype=value.dtype).reshape(
                (past_len + seq,) if value.ndim == 1 else (1, past_len + seq))
        elif "position" in name:
            pos = np.arange(past_len, past_len + seq, dtype=value.dtype)
            feeds[i.name] = pos if value.ndim == 1 else pos[None, :]
        elif "use_cache" in name and value.dtype == np.bool_:
            feeds[i.name] = np.full(value.shape, past_len > 0, dtype=np.bool_)
    return feeds


def generate(
    model,
    prompt_ids: np.ndarray | Sequence[int],
    *,
    max_new_tokens: int = 32,
    eos_token_id: int | Iterable[int] | None = None,
    providers: Sequence[str] | None = None,
    use_cache: bool = True,
    on_token: Callable[[int], None] | None = None,
) -> GenerateResult:
    """Greedy decoding (argmax of the last position's logits) until EOS or ``max_new_tokens``.

    With ``use_cache`` and a graph that has KV-cache inputs with matching ``present`` outputs, the prompt is
    run once and each further step runs one token with the cache (attention mask and positions grown);
    otherwise every step runs the whole sequence with an empty cache.

    Args:
        model: an .onnx path, an export folder, an ``onnx_ir.Model`` or an onnxruntime session.
        eos_token_id: stop after generating one of these ids (None: never, before ``max_new_tokens``).
        on_token: called with each new id as it is generated.

    Raises:
        UsageError: an empty prompt or ``max_new_tokens`` < 0.
    """
    from sw_onnx.inputs import build_feeds, logits_output_name

    prompt = np.asarray(prompt_ids, dtype=np.int64).ravel()
    if prompt.size == 0:
        raise UsageError("the prompt encodes to no tokens")
    if max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: use 0 or more")
    eos = set() if eos_token_id is None else ({int(eos_token_id)} if isinstance(eos_token_id, (int, np.integer))
                                               else {int(e) for e in eos_token_id})
    session = open_session(model, providers)
    out_name = logits_output_name(session)
    pairs = _cache_pairs(session) if use_cache else {}
    names = [out_name, *pairs.values()]
    t0 = time.perf_counter()
    seq = [int(t) for t in prompt]
    new: list[int] = []
    past: dict[str, np.ndarray] = {}
    past_len = 0
    step = prompt
    stop = "max_new_tokens"
    while len(new) < max_new_tokens:
        feeds = _step_feeds(session, step, past_len, past) if pairs and past_len else build_feeds(session, step[None, :])
        values = _run(session, names, feeds)
        logits = values[0]
        last = logits.reshape(-1, logits.shape[-1])[-1]
        token = int(np.argmax(last))
        new.append(token)
        seq.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos:
            stop = "eos"
            break
        if pairs:
            past = {inp: v for inp, v in zip(pairs, values[1:])}
            past_len = len(seq) - 1
            step = np.asarray([token], dtype=np.int64)
        else:
            step = np.asarray(seq, dtype=np.int64)
    return GenerateResult(prompt_ids=[int(t) for t in prompt], new_ids=new, stop_reason=stop,
                          used_kv_cache=bool(pairs), seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------ helpers


def _describe(model) -> str:
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    return type(model).__name__


def _exp(x: float) -> float:
    with np.errstate(over="ignore"):
        return float(np.exp(np.float64(x)))


def _json_float(x: float):
    """JSON has no inf/nan: write them as strings."""
    if x is None or math.isfinite(x):
        return x
    return str(x)
