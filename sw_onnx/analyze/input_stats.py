"""Statistics of linear-layer inputs: calibration, and the super-activation channels and int8 ranges.

A super activation (Yu et al. 2024) reaches the inputs of some linear layers as a few huge entries at the
super-activation token (the first token): on SmolLM2-135M 2,996 and 1,041 in layer 11's down_proj input,
whose other tokens stay below 12.4 over 2,048 WikiText tokens. Everything here starts from one pass that
finds these *super-activation entries*.

**Calibration** (`InputStatsProbe`, `calibrate_linear_inputs`): every linear-layer input is reduced
in-graph, per window, to the per-channel top-k |x| over tokens (values and positions) and the input row at
the token of the largest |x|; only these small tensors leave onnxruntime. Detection's first pass carries the
same probe, so quantizing after detection needs no calibration run. Text: the detection prompt (data-free,
the default) or ``--calib-text`` (its first 2,048 tokens in windows of 512, BOS first when the model adds one).

**Ranges** (`plan_input_ranges`), per input: the *naive range* R0 (max |x| over every token), the *other
range* R1 (max |x| over the tokens that are not the super-activation token, position 0 of each window), the
*super-activation channels* C (entries at that token above R1, kept only when R0 >= min_gain * R1: handling
must buy at least one bit), and the *median* of the input row at the peak token (the paper's Eq. 1 value).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx_ir as ir

from sw_onnx.analyze.instrument import add_constant, append_op, expose_output
from sw_onnx.discover import LinearLayer, find_linear_layers

__all__ = [
    "CALIB_CONTEXT",
    "CALIB_MAX_TOKENS",
    "CALIB_TOP_K",
    "DEFAULT_MIN_GAIN",
    "DEFAULT_SA_TOKENS",
    "InputImportance",
    "InputRange",
    "InputStats",
    "InputStatsProbe",
    "calibrate_for_quantize",
    "calibrate_linear_inputs",
    "calibration_windows",
    "collect_hessians",
    "importance_from_entries",
    "importance_from_stats",
    "plan_input_ranges",
    "ranges_from_entries",
]

logger = logging.getLogger(__name__)

DEFAULT_SA_TOKENS = (0,)
"""Position of the super-activation token in a calibration window: the first token."""
DEFAULT_MIN_GAIN = 2.0
"""Handle an input's super-activation entries when that shrinks its int8 range at least this many times."""
CALIB_TOP_K = 8
"""Largest |x| per channel kept per calibration window (values and tokens)."""
CALIB_CONTEXT = 512
"""Tokens per calibration window of a ``--calib-text`` file."""
CALIB_MAX_TOKENS = 2048
"""Tokens of a ``--calib-text`` file used at most (the first windows)."""
_PREFIX = "sw_onnx/calib"




@dataclass
class InputStats:
    """Calibration statistics of one linear-layer input value (shared by every layer reading it).

    Attributes:
        value: the input value's name.
        nodes: the linear layers reading it.
        k: its channel count (the layers' K).
        absmax: float64 [K], max |x| per channel over every calibration token.
        top_values: per window, float32 [k, K]: the largest |x| per channel, descending.
        top_tokens: per window, int64 [k, K]: their tokens (positions in the window).
        window_tokens: per window, its token count.
        peak: the largest |x| over everything; ``peak_row`` (float32 [K], signed) is the input row at its
            token, ``peak_token`` that token's position, ``peak_window`` the window.
        sum_sq: float64 [K], sum of x^2 per channel over every token; ``first_sq`` the same over the first
            token of each window only; ``tokens`` the token count (`InputImportance`).
    """

    value: str
    nodes: list[str]
    k: int
    absmax: np.ndarray
    top_values: list[np.ndarray] = field(default_factory=list)
    top_tokens: list[np.ndarray] = field(default_factory=list)
    window_tokens: list[int] = field(default_factory=list)
    peak: float = -1.0
    peak_row: np.ndarray | None = None
    peak_token: int = 0
    peak_window: int = 0
    sum_sq: np.ndarray | None = None
    first_sq: np.ndarray | None = None
    tokens: int = 0


def calibration_windows(token_ids: np.ndarray, *, context: int = CALIB_CONTEXT, max_tokens: int = CALIB_MAX_TOKENS,
                        bos: int | None = None) -> list[np.ndarray]:
    """Non-overlapping windows of at most `context` tokens from the start of `token_ids`, `max_tokens` in all.

    With `bos`, each window starts with it (it counts toward `context`): models that put their super
    activation on the BOS token show it in every window. A window of one token is dropped unless it is the
    only one.
    """
    ids = np.asarray(token_ids, dtype=np.int64).ravel()[:max_tokens]
    step = context - (1 if bos is not None else 0)
    windows = []
    for start in range(0, len(ids), step):
        chunk = ids[start:start + step]
        if bos is not None and (len(chunk) == 0 or chunk[0] != bos):
            chunk = np.concatenate([[bos], chunk]).astype(np.int64)
        if len(chunk) >= 2 or not windows:
            windows.append(chunk)
    return windows


class InputStatsProbe:
    """Instruments a model's linear-layer inputs, in place, for `InputStats`; then folds run results into them.

    Per input value (shared by the layers reading it): the top-k |x| per channel over tokens (values and
    tokens), the token of the largest |x| and the input row there, as extra graph outputs (`output_names`);
    k is a graph input (`feeds`), so windows of any length run in one session. Used by the calibration
    below and by detection's first pass (`sw_onnx.detect`), which then needs no calibration session.
    """

    def __init__(self, model: ir.Model, layers: Sequence[LinearLayer], *, top_k: int = CALIB_TOP_K):
        self.top_k = top_k
        self.groups: dict[str, list[LinearLayer]] = {}
        values: dict[str, ir.Value] = {}
        for layer in layers:
            x = layer.input
            if x.name is None:
                x.name = f"{_PREFIX}/linear_input_{layer.position}"
            self.groups.setdefault(x.name, []).append(layer)
            values[x.name] = x
        graph = model.graph
        opset = model.opset_imports.get("", 13)
        k_input = ir.Value(name=f"{_PREFIX}/top_k", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1]))
        graph.inputs.append(k_input)
        self.k_input_name = k_input.name
        self.names: dict[str, tuple[str, str, str, str]] = {}
        for i, (name, group) in enumerate(self.groups.items()):
            width = group[0].k
            tag = f"{_PREFIX}/{i}"
            x = values[name]
            if x.dtype not in (None, ir.DataType.FLOAT):
                x = append_op(graph, "Cast", [x], {"to": ir.DataType.FLOAT}, name=f"{tag}/cast").outputs[0]
            shape = add_constant(graph, np.array([-1, width], np.int64))
            flat = append_op(graph, "Reshape", [x, shape], name=f"{tag}/flatten").outputs[0]
            a = append_op(graph, "Abs", [flat], name=f"{tag}/abs").outputs[0]
            topk = ir.node("TopK", [a, k_input], {"axis": 0, "largest": 1, "sorted": 1}, num_outputs=2, name=f"{tag}/topk")
            topk.outputs[0].name, topk.outputs[1].name = f"{tag}/top_values", f"{tag}/top_tokens"
            graph.append(topk)
            if opset >= 18:
                axes = add_constant(graph, np.array([1], np.int64))
                token_max = append_op(graph, "ReduceMax", [a, axes], {"keepdims": 0}, name=f"{tag}/token_max").outputs[0]
            else:
                token_max = append_op(graph, "ReduceMax", [a], {"axes": [1], "keepdims": 0}, name=f"{tag}/token_max").outputs[0]
            peak = append_op(graph, "ArgMax", [token_max], {"axis": 0, "keepdims": 1}, name=f"{tag}/peak_token").outputs[0]
            row = append_op(graph, "Gather", [flat, peak], {"axis": 0}, name=f"{tag}/peak_row").outputs[0]
            sum_sq, first = _square_sums(graph, flat, opset, tag)
            out = (f"{tag}/out/top_values", f"{tag}/out/top_tokens", f"{tag}/out/peak_token", f"{tag}/out/peak_row",
                   f"{tag}/out/sum_sq", f"{tag}/out/first_row")
            expose_output(graph, topk.outputs[0], out[0], ir.DataType.FLOAT, [None, width])
            expose_output(graph, topk.outputs[1], out[1], ir.DataType.INT64, [None, width])
            expose_output(graph, peak, out[2], ir.DataType.INT64, [1])
            expose_output(graph, row, out[3], ir.DataType.FLOAT, [1, width])
            expose_output(graph, sum_sq, out[4], ir.DataType.FLOAT, [width])
            expose_output(graph, first, out[5], ir.DataType.FLOAT, [width])
            self.names[name] = out
        self.output_names = [n for out in self.names.values() for n in out]
        self.stats = {name: InputStats(value=name, nodes=[layer.name for layer in group], k=group[0].k,
                                       absmax=np.zeros(group[0].k, np.float64)) for name, group in self.groups.items()}

    def feeds(self, tokens: int) -> dict[str, np.ndarray]:
        """The extra feed of a run over `tokens` tokens (k, at most the token count)."""
        return {self.k_input_name: np.array([min(self.top_k, tokens)], np.int64)}

    def add(self, result: Mapping[str, np.ndarray], tokens: int) -> None:
        """Fold one window's outputs (`output_names` -> arrays) into `stats`."""
        w = len(next(iter(self.stats.values())).window_tokens) if self.stats else 0
        for name, (tv, tt, pt, pr, ss, fr) in self.names.items():
            s = self.stats[name]
            if s.sum_sq is None:
                s.sum_sq, s.first_sq = np.zeros(s.k, np.float64), np.zeros(s.k, np.float64)
            s.sum_sq += result[ss].astype(np.float64)
            s.first_sq += np.square(result[fr].astype(np.float64))
            s.tokens += tokens
            top = result[tv]
            s.top_values.append(top.astype(np.float32))
            s.top_tokens.append(result[tt].astype(np.int64))
            s.window_tokens.append(tokens)
            np.maximum(s.absmax, top[0], out=s.absmax)
            peak = float(top[0].max())
            if peak > s.peak:
                s.peak, s.peak_row = peak, result[pr][0].astype(np.float32)
                s.peak_token, s.peak_window = int(result[pt][0]), w


def _square_sums(graph: ir.Graph, flat: ir.Value, opset: int, tag: str) -> tuple[ir.Value, ir.Value]:
    """``(sum over tokens of x^2 per channel, the first token's row)`` of a float [tokens, K] value."""
    if opset >= 18:
        axes = add_constant(graph, np.array([0], np.int64))
        sum_sq = append_op(graph, "ReduceSumSquare", [flat, axes], {"keepdims": 0}, name=f"{tag}/sum_sq").outputs[0]
    else:
        sum_sq = append_op(graph, "ReduceSumSquare", [flat], {"axes": [0], "keepdims": 0}, name=f"{tag}/sum_sq").outputs[0]
    zero = add_constant(graph, np.array(0, np.int64))
    first = append_op(graph, "Gather", [flat, zero], {"axis": 0}, name=f"{tag}/first_row").outputs[0]
    return sum_sq, first


def calibrate_linear_inputs(
    model: str | ir.Model,
    windows: Sequence[np.ndarray],
    *,
    providers: Sequence[str] | None = None,
    top_k: int = CALIB_TOP_K,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, InputStats]:
    """Run `windows` through the model and gather `InputStats` for every linear-layer input.

    Args:
        model: a model path (loaded fresh) or a loaded model, which is instrumented in place: its graph
            outputs are replaced by the statistics (load a fresh copy if you need it unchanged).
        windows: int64 token-id arrays, one forward pass each (batch of one, empty KV cache).
        providers: onnxruntime providers (default CPU).
        top_k: largest |x| per channel kept per window.
        progress: ``progress(done, total)`` after each window.

    Returns:
        ``{input value name: InputStats}``.
    """
    from sw_onnx.inputs import build_feeds
    from sw_onnx.io import load_model, open_session

    if not isinstance(model, ir.Model):
        model = load_model(model)
    layers, _ = find_linear_layers(model)
    model.graph.outputs.clear()
    probe = InputStatsProbe(model, layers, top_k=top_k)
    session = open_session(model, providers, stream_weights=True)
    for w, window in enumerate(windows):
        window = np.asarray(window, dtype=np.int64).ravel()
        feeds = build_feeds(session, window[None, :])
        feeds.update(probe.feeds(len(window)))
        probe.add(dict(zip(probe.output_names, session.run(probe.output_names, feeds))), len(window))
        if progress is not None:
            progress(w + 1, len(windows))
    return probe.stats


@dataclass
class InputRange:
    """Static int8 range of one linear-layer input, with and without its super-activation entries.

    Attributes:
        value, nodes, k: as in `InputStats`.
        naive_range: max |x| over the calibration tokens (the naive per-tensor range).
        other_range: max |x| over the tokens that are not super-activation tokens.
        channels: super-activation channels: those whose entry at a super-activation token exceeds
            `other_range`, when that shrinks the range at least `min_gain` times; else empty.
        handled_range: the range with the super-activation entries left out: `other_range` when
            `channels` is set, else `naive_range`. The run-time rule restores the entries of `channels`
            beyond it.
        median: median of the input row at the peak token (the super-activation token when `channels`
            is set): the Eq. 1 replacement value.
        sa_entries: ``{"channel", "token", "window", "value"}`` of the largest super-activation-token entry
            of each channel.
    """

    value: str
    nodes: list[str]
    k: int
    naive_range: float
    other_range: float
    channels: list[int]
    handled_range: float
    median: float
    sa_entries: list[dict] = field(default_factory=list)

    @property
    def gain(self) -> float:
        """How many times the handled range is smaller than the naive one."""
        return self.naive_range / self.handled_range if self.handled_range > 0 else 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "gain": self.gain}


def plan_input_ranges(
    stats: Mapping[str, InputStats],
    *,
    sa_tokens: Sequence[int] = DEFAULT_SA_TOKENS,
    min_gain: float = DEFAULT_MIN_GAIN,
) -> dict[str, InputRange]:
    """Turn calibration statistics into per-input ranges and super-activation channels (see module doc).

    Args:
        stats: from `calibrate_linear_inputs`.
        sa_tokens: positions of the super-activation token(s) in each calibration window (the first token
            in SmolLM2 and in every model of the paper; `sw_onnx.detect` reports it).
        min_gain: handle an input's super-activation entries only when leaving them out shrinks its range
            at least this many times (2: one more bit of resolution for everything else).
    """
    if not min_gain >= 1:
        raise ValueError(f"min_gain must be >= 1, got {min_gain!r}")
    sa = np.asarray(sorted({int(t) for t in sa_tokens}), np.int64)
    ranges = {}
    for name, s in stats.items():
        other = np.zeros(s.k, np.float64)
        at_sa = np.zeros(s.k, np.float64)
        where = np.zeros((s.k, 2), np.int64)  # (window, token) of each channel's largest SA-token entry
        for w, (top, tokens) in enumerate(zip(s.top_values, s.top_tokens)):
            is_sa = np.isin(tokens, sa)
            # Largest entry at another token; when all top-k entries sit at SA tokens, the k-th bounds it.
            best_other = np.where(is_sa, -1.0, top).max(axis=0)
            best_other = np.where(best_other < 0, top[-1], best_other)
            np.maximum(other, best_other, out=other)
            sa_top = np.where(is_sa, top, -1.0)
            row = sa_top.argmax(axis=0)
            value = sa_top[row, np.arange(s.k)]
            better = value > at_sa
            at_sa[better] = value[better]
            where[better] = np.stack([np.full(int(better.sum()), w), tokens[row, np.arange(s.k)][better]], axis=1)
        naive = float(s.absmax.max()) if s.k else 0.0
        other_range = float(other.max()) if s.k else 0.0
        channels = np.flatnonzero(at_sa > other_range).tolist()
        if not channels or naive < min_gain * other_range:
            channels = []
        ranges[name] = InputRange(
            value=name, nodes=list(s.nodes), k=s.k, naive_range=naive, other_range=other_range, channels=channels,
            handled_range=other_range if channels else naive,
            median=float(np.median(s.peak_row)) if s.peak_row is not None else 0.0,
            sa_entries=[{"channel": c, "window": int(where[c, 0]), "token": int(where[c, 1]), "value": float(at_sa[c])}
                        for c in channels],
        )
    return ranges


def calibrate_for_quantize(
    src,
    token_ids: np.ndarray,
    *,
    calib_text: str | None = None,
    providers: Sequence[str] | None = None,
    model: ir.Model | None = None,
) -> tuple[dict[str, InputRange], dict[str, InputImportance]]:
    """`plan_input_ranges` and `importance_from_stats` of the model at `src` on the detection prompt
    `token_ids`, or on `calib_text`.

    Args:
        model: the loaded model to instrument (a clone: it is changed), instead of loading `src` again.

    A calibration text is tokenized as for perplexity (`sw_onnx.measure.text_token_ids`, no special
    token), its first `CALIB_MAX_TOKENS` tokens cut into windows of `CALIB_CONTEXT`, each starting with BOS
    when the model's convention adds one (`sw_onnx.inputs.bos_convention`).

    Raises:
        UsageError: no tokenizer beside the model for `calib_text`, or an unreadable file.
    """
    import gc
    from pathlib import Path

    if calib_text is None:
        windows = [np.asarray(token_ids, np.int64)]
    else:
        from sw_onnx.measure import text_token_ids
        from sw_onnx.inputs import bos_convention

        ids, _ = text_token_ids(src, text=calib_text)
        bos, add_bos = bos_convention(Path(src).parent)
        windows = calibration_windows(ids, bos=bos if add_bos else None)
    stats = calibrate_linear_inputs(model if model is not None else str(src), windows, providers=providers)
    gc.collect()  # the instrumented copy's graph cycles hold its weights
    return plan_input_ranges(stats), importance_from_stats(stats)


def ranges_from_entries(entries: Sequence[Mapping]) -> dict[str, InputRange]:
    """`InputRange`s from a detect report's ``input_ranges`` (`InputRange.to_dict` entries).

    Raises:
        KeyError, TypeError, ValueError: a malformed entry.
    """
    from dataclasses import fields

    ranges = {}
    for entry in entries:
        r = InputRange(**{f.name: entry[f.name] for f in fields(InputRange)})
        r.channels = [int(c) for c in r.channels]
        ranges[r.value] = r
    return ranges


@dataclass
class InputImportance:
    """The input importance of the linear layers reading one value: per channel, the sum of x^2 over the
    calibration tokens (all of them, and the first token of each window alone).

    Attributes:
        value, nodes, k: as in `InputStats`.
        tokens, windows: the calibration tokens and windows.
        sum_sq, first_sq: float32 [K] (float32 so that a report's JSON carries them exactly: quantizing from
            the report and after detection give the same file).
    """

    value: str
    nodes: list[str]
    k: int
    tokens: int
    windows: int
    sum_sq: np.ndarray
    first_sq: np.ndarray

    def mean_sq(self, *, skip_first: bool = False) -> np.ndarray:
        """E[x_k^2] (float64 [K]); `skip_first` leaves out each window's first token."""
        total, first = self.sum_sq.astype(np.float64), self.first_sq.astype(np.float64)
        if skip_first and self.tokens > self.windows:
            return np.maximum(total - first, 0.0) / (self.tokens - self.windows)
        return total / max(self.tokens, 1)

    def to_dict(self) -> dict:
        def exact(a: np.ndarray) -> list[float]:  # the shortest decimal that reads back as the same float32
            return [float(str(v)) for v in np.asarray(a, np.float32)]

        return {"value": self.value, "nodes": list(self.nodes), "k": self.k, "tokens": self.tokens,
                "windows": self.windows, "sum_sq": exact(self.sum_sq), "first_sq": exact(self.first_sq)}


def importance_from_stats(stats: Mapping[str, InputStats]) -> dict[str, InputImportance]:
    """`InputImportance` per input value from calibration statistics (those that measured x^2)."""
    return {name: InputImportance(name, list(s.nodes), s.k, s.tokens, len(s.window_tokens), s.sum_sq.astype(np.float32),
                                  s.first_sq.astype(np.float32))
            for name, s in stats.items() if s.sum_sq is not None and s.tokens}


def importance_from_entries(entries: Sequence[Mapping]) -> dict[str, InputImportance]:
    """`InputImportance`s from a detect report's ``input_importance`` entries.

    Raises:
        KeyError, TypeError, ValueError: a malformed entry.
    """
    out = {}
    for e in entries:
        k = int(e["k"])
        sum_sq, first_sq = np.asarray(e["sum_sq"], np.float32), np.asarray(e["first_sq"], np.float32)
        if sum_sq.shape != (k,) or first_sq.shape != (k,):
            raise ValueError(f"input_importance {e['value']!r}: sum_sq/first_sq must hold k={k} values")
        out[str(e["value"])] = InputImportance(str(e["value"]), [str(n) for n in e["nodes"]], k, int(e["tokens"]),
                                               int(e["windows"]), sum_sq, first_sq)
    return out


HESSIAN_SKIP_FIRST = False
"""Leave each window's first token (attention sink, super activation) out of the GPTQ Hessians."""


def collect_hessians(model: ir.Model, windows: Sequence[np.ndarray], *,
                     providers: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """``{input value name: X^T X}`` (float64 [K, K], X the value's rows over every token of `windows`) of
    every linear-layer input: the Hessian of GPTQ's layer-wise objective (up to a factor 2).

    Args:
        model: a loaded model (a clone: it is instrumented in place, its outputs replaced).
    """
    from sw_onnx.inputs import build_feeds
    from sw_onnx.io import create_session

    layers, _ = find_linear_layers(model)
    graph = model.graph
    graph.outputs.clear()
    names: dict[str, str] = {}
    for i, layer in enumerate(layers):
        x = layer.input
        if x.name in names:
            continue
        tag = f"{_PREFIX}/hessian/{i}"
        if x.dtype not in (None, ir.DataType.FLOAT):
            x = append_op(graph, "Cast", [x], {"to": ir.DataType.FLOAT}, name=f"{tag}/cast").outputs[0]
        shape = add_constant(graph, np.array([-1, layer.k], np.int64))
        flat = append_op(graph, "Reshape", [x, shape], name=f"{tag}/flatten").outputs[0]
        if HESSIAN_SKIP_FIRST:
            starts, ends = (add_constant(graph, np.array([v], np.int64)) for v in (1, 1 << 62))
            axes = add_constant(graph, np.array([0], np.int64))
            flat = append_op(graph, "Slice", [flat, starts, ends, axes], name=f"{tag}/skip_first").outputs[0]
        flat_t = append_op(graph, "Transpose", [flat], {"perm": [1, 0]}, name=f"{tag}/transpose").outputs[0]
        xtx = append_op(graph, "MatMul", [flat_t, flat], name=f"{tag}/xtx").outputs[0]
        names[layer.input.name] = f"{tag}/out"
        expose_output(graph, xtx, names[layer.input.name], ir.DataType.FLOAT, [layer.k, layer.k])
    session = create_session(model, providers=list(providers) if providers else None, stream_weights=True)
    out: dict[str, np.ndarray] = {}
    fetch = list(names.values())
    for window in windows:
        feeds = build_feeds(session, np.asarray(window, np.int64).ravel()[None, :])
        for (value, _), array in zip(names.items(), session.run(fetch, feeds)):
            out[value] = out.get(value, 0) + array.astype(np.float64)
    return out
