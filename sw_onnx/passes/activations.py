"""Super-activation-aware activation quantization: calibration, W8A8 QDQ, and the int4 channel keep-out.

A super activation (Yu et al. 2024) reaches the inputs of some linear layers as a few huge entries at the
super-activation token (the first token): on SmolLM2-135M 2,996 and 1,041 in layer 11's down_proj input,
whose other tokens stay below 12.4 over 2,048 WikiText tokens; the late down_proj layers react to it with
inputs of 2,381 (layer 28) and 494 (layer 29). Everything here starts from one calibration pass that finds
these *super-activation entries*.

**Calibration** (`calibrate_linear_inputs`, `plan_input_ranges`): every linear-layer input is reduced
in-graph, per calibration window, to the per-channel top-k |x| over tokens (values and token positions)
and the input row at the token of the largest |x|; only these small tensors leave onnxruntime. Calibration
text is the detection prompt (data-free, the default) or ``--calib-text`` (its first 2,048 tokens in
windows of 512, BOS first when the model adds one). Then, per input (per tensor, static):

- the *naive range* ``R0``: max |x| over every calibration token;
- the *other range* ``R1``: max |x| over the tokens that are not the super-activation token (position 0 of
  each window, `DEFAULT_SA_TOKENS`);
- the *super-activation channels* ``C``: channels whose entry at the super-activation token exceeds
  ``R1``, kept only when ``R0 >= min_gain * R1`` (`DEFAULT_MIN_GAIN` = 2: handling must buy at least one
  bit of resolution for everything else); the *handled range* is then ``R1``, else ``R0``;
- the *median* ``m``: the median of the input row at the peak token (the super-activation token when
  ``C`` is set): the vector a per-token quantizer, as in the paper's Eq. 1, would see.

**W8A8** (`QuantizeW8A8Pass`): weights int8 per output channel (``sw_onnx.kernels.quantize_blockwise``,
``block_size=None``), activations int8 per tensor with the static scale ``s = range / 127``, zero point 0,
as standard QDQ with one ``QuantizeLinear -> DequantizeLinear`` pair per layer (onnxruntime runs
``DQ(Q(x)) -> MatMul <- DQ(W)`` as ``MatMulIntegerToFloat``; a pair shared by q/k/v would not be). The
naive pass uses ``R0``. With super-activation handling (paper Eq. 1, ``A_hat = RESTORE(DQ(Q(REPLACE(A))))``)
the scale uses ``R1`` and, for inputs with channels ``C``::

    xc    = Gather(x, C, axis=-1)                     # [..., |C|]
    delta = Where(|xc| > R1, xc - m_hat, 0)           # the super-activation entries, minus the median
    x_r   = x - delta @ E                             # E one-hot [|C|, K]: those entries become m_hat
    y     = MatMul(DQ(Q(x_r)), DQ(Wq)) + delta @ W_hat[C, :]

Run-time rule: an entry is a super-activation entry when it lies on a channel of ``C`` and beyond the
calibrated range (``|x| > R1``), at any token: exactly the entries the range cannot hold. ``m_hat`` is
``m`` rounded onto the int8 grid (``clip(rint(m / s)) * s``), so ``DQ(Q(m_hat)) == m_hat`` and
``y == RESTORE(...) @ W_hat`` with the restored entries exact up to float32 rounding: the super
activation never passes through the quantizer. With a static scale the output does not depend on ``m``
(any in-range value gives the same result); it is kept for fidelity to Eq. 1. The restore path leaves
the ``DQ -> MatMul`` node units intact, so onnxruntime still builds its integer kernel.

**int4 channel keep-out** (`KeepOutActivationChannelsPass`, run on the float model *before*
``QuantizeWeightsPass``): for a layer whose input has super-activation channels ``C``::

    y = MatMul(x * mask, W')  +  Gather(x, C, axis=-1) (x) W[C, :]       # mask 0 on C, 1 elsewhere

``W'`` is the weight with rows ``C`` zeroed (so they also leave their int4 blocks' ranges) and the side
path is an exact float outer product (``Mul``, broadcast; ``Unsqueeze -> Mul -> ReduceSum`` when
``|C| > 1``), not a MatMul, so the weight pass leaves it float. ``MatMul(x * mask, DQ(Wq))`` still fuses
into ``MatMulNBits``, whose int8 activation blocks (``accuracy_level`` 4) then never see the super
activation, and the weight rows that multiply it are not rounded to int4 either. See
``docs/activation_quant.md`` for what each choice measures on SmolLM2-135M.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx_ir as ir

from sw_onnx.discover import LinearLayer, find_linear_layers
from sw_onnx.kernels import ClipMode, dequantize_blockwise, quantize_blockwise
from sw_onnx.passes.instrument import _append, _const, _expose
from sw_onnx.passes.quantize import KeepCoordinate, LayerDecision, _initializer_to_effective, find_lm_head, remove_orphans, value_types

__all__ = [
    "CALIB_CONTEXT",
    "CALIB_MAX_TOKENS",
    "CALIB_TOP_K",
    "DEFAULT_MIN_GAIN",
    "DEFAULT_SA_TOKENS",
    "InputRange",
    "InputStats",
    "InputStatsProbe",
    "KeepOutActivationChannelsPass",
    "QuantizeW8A8Pass",
    "calibrate_for_quantize",
    "calibrate_linear_inputs",
    "calibration_windows",
    "channels_by_node",
    "plan_input_ranges",
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
_INT8_MAX = 127.0


# ----------------------------------------------------------------------------------------------
# Calibration


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
                x = _append(graph, "Cast", [x], {"to": ir.DataType.FLOAT}, name=f"{tag}/cast").outputs[0]
            shape = _const(graph, f"{tag}/shape", np.array([-1, width], np.int64))
            flat = _append(graph, "Reshape", [x, shape], name=f"{tag}/flatten").outputs[0]
            a = _append(graph, "Abs", [flat], name=f"{tag}/abs").outputs[0]
            topk = ir.node("TopK", [a, k_input], {"axis": 0, "largest": 1, "sorted": 1}, num_outputs=2, name=f"{tag}/topk")
            topk.outputs[0].name, topk.outputs[1].name = f"{tag}/top_values", f"{tag}/top_tokens"
            graph.append(topk)
            if opset >= 18:
                axes = _const(graph, f"{tag}/axes", np.array([1], np.int64))
                token_max = _append(graph, "ReduceMax", [a, axes], {"keepdims": 0}, name=f"{tag}/token_max").outputs[0]
            else:
                token_max = _append(graph, "ReduceMax", [a], {"axes": [1], "keepdims": 0}, name=f"{tag}/token_max").outputs[0]
            peak = _append(graph, "ArgMax", [token_max], {"axis": 0, "keepdims": 1}, name=f"{tag}/peak_token").outputs[0]
            row = _append(graph, "Gather", [flat, peak], {"axis": 0}, name=f"{tag}/peak_row").outputs[0]
            out = (f"{tag}/out/top_values", f"{tag}/out/top_tokens", f"{tag}/out/peak_token", f"{tag}/out/peak_row")
            _expose(graph, topk.outputs[0], out[0], ir.DataType.FLOAT, [None, width])
            _expose(graph, topk.outputs[1], out[1], ir.DataType.INT64, [None, width])
            _expose(graph, peak, out[2], ir.DataType.INT64, [1])
            _expose(graph, row, out[3], ir.DataType.FLOAT, [1, width])
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
        for name, (tv, tt, pt, pr) in self.names.items():
            s = self.stats[name]
            top = result[tv]
            s.top_values.append(top.astype(np.float32))
            s.top_tokens.append(result[tt].astype(np.int64))
            s.window_tokens.append(tokens)
            np.maximum(s.absmax, top[0], out=s.absmax)
            peak = float(top[0].max())
            if peak > s.peak:
                s.peak, s.peak_row = peak, result[pr][0].astype(np.float32)
                s.peak_token, s.peak_window = int(result[pt][0]), w


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
    from sw_onnx.io import create_session, load_model

    if not isinstance(model, ir.Model):
        model = load_model(model)
    layers, _ = find_linear_layers(model)
    model.graph.outputs.clear()
    probe = InputStatsProbe(model, layers, top_k=top_k)
    session = create_session(model, providers=list(providers) if providers else None, stream_weights=True)
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


def channels_by_node(ranges: Mapping[str, InputRange]) -> dict[str, list[int]]:
    """``{linear node name: super-activation channels of its input}`` for inputs that have any."""
    return {node: list(r.channels) for r in ranges.values() if r.channels for node in r.nodes}


def calibrate_for_quantize(
    src,
    token_ids: np.ndarray,
    *,
    calib_text: str | None = None,
    providers: Sequence[str] | None = None,
) -> dict[str, InputRange]:
    """`plan_input_ranges` of the model at `src` on the detection prompt `token_ids`, or on `calib_text`.

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
        from sw_onnx.inputs import bos_convention
        from sw_onnx.measure import text_token_ids

        ids, _ = text_token_ids(src, text=calib_text)
        bos, add_bos = bos_convention(Path(src).parent)
        windows = calibration_windows(ids, bos=bos if add_bos else None)
    stats = calibrate_linear_inputs(str(src), windows, providers=providers)
    gc.collect()  # the instrumented copy's graph cycles hold its weights
    return plan_input_ranges(stats)


# ----------------------------------------------------------------------------------------------
# Shared helpers


def _skip_reason(layer: LinearLayer, lm_head: LinearLayer | None, exclude: Sequence[str], include_lm_head: bool) -> str | None:
    for pattern in exclude:
        if fnmatch.fnmatchcase(layer.name, pattern):
            return f"excluded by pattern {pattern!r}"
    if layer is lm_head and not include_lm_head:
        return "lm_head (its output is the logits) kept float: include_lm_head is off"
    if layer.weight.initializer.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        return f"weight is {layer.weight.initializer.dtype}, not floating point"
    return None


def _gemm_parameters(node: ir.Node) -> tuple[float, float, ir.Value | None]:
    if node.op_type != "Gemm":
        return 1.0, 1.0, None
    alpha, beta = node.attributes.get("alpha"), node.attributes.get("beta")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return (alpha.as_float() if alpha is not None else 1.0), (beta.as_float() if beta is not None else 1.0), bias


def _activation_dtype(layer: LinearLayer) -> ir.DataType:
    for value in (layer.input, layer.output):
        if value.dtype is not None:
            return value.dtype
    return ir.DataType.FLOAT


_NUMPY = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


class _Builder:
    """Appends named nodes and initializers to a graph (every name under one prefix)."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.nodes: list[ir.Node] = []

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        tensor = ir.tensor(np.asarray(array), name=name)
        value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def op(self, op_type: str, inputs, name: str, attributes=None) -> ir.Value:
        node = ir.node(op_type, inputs, attributes, name=name)
        node.outputs[0].name = f"{name}/out"
        self.nodes.append(node)
        return node.outputs[0]


def _rewire_output(graph: ir.Graph, old: ir.Value, new: ir.Value, keep_user: ir.Node | None = None) -> None:
    """Make every reader of `old` (but `keep_user`) read `new`; a graph output `old` becomes `new`, name kept."""
    for use in list(old.uses()):
        if use.node is not keep_user:
            use.node.replace_input_with(use.idx, new)
    if old.is_graph_output():
        outputs = graph.outputs
        for i, value in enumerate(outputs):
            if value is old:
                outputs[i] = new
        name = old.name
        old.name = f"{name}/sw_onnx_inner"
        new.name = name


def _keep_by_initializer(keep: Iterable[KeepCoordinate]) -> dict[str, list[tuple[int, ...]]]:
    found: dict[str, list[tuple[int, ...]]] = {}
    for name, index in keep:
        found.setdefault(str(name), []).append(tuple(int(i) for i in index))
    return found


# ----------------------------------------------------------------------------------------------
# W8A8


class QuantizeW8A8Pass(ir.passes.InPlacePass):
    """Rewrite linear layers as W8A8 QDQ: int8 per-channel weights, int8 per-tensor static activations.

    See the module docstring for the graph written with and without super-activation handling.

    Attributes:
        ranges: ``{input value name: InputRange}`` from `plan_input_ranges` on the same model.
        handle_super_activations: replace the super-activation entries by the median before quantizing
            and restore them exactly after (paper Eq. 1); False: the naive W8A8 (range ``naive_range``).
        symmetric, clip, zscore: the weight quantizer (`sw_onnx.kernels.quantize_blockwise`, per output
            channel, 8 bits).
        keep: super weights kept out of the weight quantizer, exact on a side path
            ``MatMul(Gather(x, cols), S)`` (x unquantized).
        exclude: node-name glob patterns of layers left float.
        include_lm_head: quantize the layer whose output is the logits too.
        decisions: after a call, one `LayerDecision` per linear layer (form ``"w8a8"``).
        unused_keep: after a call, keep coordinates that matched no quantized layer.
    """

    def __init__(
        self,
        ranges: Mapping[str, InputRange],
        *,
        handle_super_activations: bool = True,
        symmetric: bool = True,
        clip: ClipMode = "none",
        zscore: float | None = None,
        keep: Iterable[KeepCoordinate] = (),
        exclude: Iterable[str] = (),
        include_lm_head: bool = False,
    ):
        super().__init__()
        self.ranges = dict(ranges)
        self.handle_super_activations = handle_super_activations
        self.symmetric, self.clip, self.zscore = symmetric, clip, zscore
        self.keep = [(str(n), tuple(int(i) for i in idx)) for n, idx in keep]
        self.exclude = list(exclude)
        self.include_lm_head = include_lm_head
        self.decisions: list[LayerDecision] = []
        self.unused_keep: list[KeepCoordinate] = []
        quantize_blockwise(np.zeros((1, 1), np.float32), bits=8, block_size=None, symmetric=symmetric, clip=clip, zscore=zscore)

    def requires(self, model: ir.Model) -> None:
        if model.opset_imports.get("", 0) < 13:
            raise ir.passes.PreconditionError("per-channel DequantizeLinear needs opset >= 13")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        layers, _ = find_linear_layers(model)
        lm_head = find_lm_head(model, layers)
        keep_by_init = _keep_by_initializer(self.keep)
        used: set[KeepCoordinate] = set()
        shared: dict[str, tuple[ir.Value, ir.Value | None]] = {}  # input -> (replaced x, delta)
        self.decisions = []
        types = value_types(model) if any(layer.input.shape is None for layer in layers) else {}
        for layer in layers:
            decision = LayerDecision(
                node=layer.name, op_type=layer.node.op_type, initializer=layer.weight.initializer.name,
                position=layer.position, layer=layer.layer, k=layer.k, n=layer.n, is_lm_head=layer is lm_head,
                float_bytes=layer.k * layer.n * max(1, int(layer.weight.initializer.dtype.itemsize)),
            )
            self.decisions.append(decision)
            reason = _skip_reason(layer, lm_head, self.exclude, self.include_lm_head)
            if reason is None and _activation_dtype(layer) != ir.DataType.FLOAT:
                reason = f"activations are {_activation_dtype(layer)}: W8A8 here takes float32 activations"
            if reason is None and layer.input.name not in self.ranges:
                reason = "no calibration statistics for its input"
            if reason is not None:
                decision.action, decision.reason = "skipped", reason
                continue
            rank = len(layer.input.shape) if layer.input.shape is not None else types.get(layer.input.name, (0, None))[1]
            self._rewrite(graph, layer, decision, keep_by_init, used, shared, lift=rank == 2)
        self.unused_keep = [c for c in self.keep if c not in used]
        quantized = sum(d.action == "quantized" for d in self.decisions)
        logger.info("W8A8: quantized %d of %d linear layers", quantized, len(self.decisions))
        return ir.passes.PassResult(model, modified=quantized > 0)

    def _rewrite(self, graph, layer, decision, keep_by_init, used, shared, lift: bool) -> None:
        node, chain = layer.node, layer.weight
        r = self.ranges[layer.input.name]
        handled = self.handle_super_activations and bool(r.channels)
        alpha, beta, bias = _gemm_parameters(node)
        prefix = f"{layer.name}/sw_onnx_w8a8"
        b = _Builder(graph)
        x = node.inputs[0]

        keep_kn = []
        stored = chain.initializer.const_value.numpy() if chain.initializer.name in keep_by_init else None
        for index in keep_by_init.get(chain.initializer.name, []):
            k, n = _initializer_to_effective(chain, index)
            keep_kn.append((k, n, float(np.asarray(stored[index], np.float64)) * alpha))
            decision.kept.append({"index": list(index), "k": k, "n": n, "value": keep_kn[-1][2]})
            used.add((chain.initializer.name, index))
        w = chain.effective_weight()
        if alpha != 1.0:
            w = w * np.float32(alpha)
        qw = quantize_blockwise(w, bits=8, block_size=None, symmetric=self.symmetric, clip=self.clip,
                                zscore=self.zscore, keep_out=[(k, n) for k, n, _ in keep_kn] or None)
        del w
        w_hat = dequantize_blockwise(qw)

        # Activations: the super-activation replacement is computed once per input value.
        rng = r.handled_range if handled else r.naive_range
        scale = np.float32(rng / _INT8_MAX) if rng > 0 else np.float32(1.0)
        key = f"{x.name}|{handled}"
        if key not in shared:
            tag = f"{prefix}/input"
            delta = None
            x_r = x
            if handled:
                median_hat = np.float32(np.clip(np.rint(np.float32(r.median) / scale), -_INT8_MAX, _INT8_MAX) * scale)
                cols = b.const(f"{tag}/sa_channels", np.array(r.channels, np.int64))
                xc = b.op("Gather", [x, cols], f"{tag}/sa_gather", {"axis": -1})
                beyond = b.op("Greater", [b.op("Abs", [xc], f"{tag}/sa_abs"), b.const(f"{tag}/sa_threshold", np.float32(rng))],
                              f"{tag}/sa_beyond_range")
                shifted = b.op("Sub", [xc, b.const(f"{tag}/sa_median", median_hat)], f"{tag}/sa_minus_median")
                delta = b.op("Where", [beyond, shifted, b.const(f"{tag}/zero", np.float32(0))], f"{tag}/sa_delta")
                onehot = np.zeros((len(r.channels), r.k), np.float32)
                onehot[np.arange(len(r.channels)), r.channels] = 1.0
                scatter = b.op("MatMul", [delta, b.const(f"{tag}/sa_onehot", onehot)], f"{tag}/sa_scatter")
                x_r = b.op("Sub", [x, scatter], f"{tag}/sa_replaced")
            shared[key] = (x_r, delta)
        x_r, delta = shared[key]
        # One QuantizeLinear/DequantizeLinear pair per layer: onnxruntime turns a pair shared by several
        # MatMuls (q/k/v, gate/up) into MatMulIntegerToFloat for none of them.
        if lift:  # 2-D activations: MatMul + Add would become a Gemm first, which has no integer form here
            axes0 = b.const(f"{prefix}/axes_0", np.array([0], np.int64))
            x_r = b.op("Unsqueeze", [x_r, axes0], f"{prefix}/input_3d")  # before Q: no Q/DQ around it
        s = b.const(f"{prefix}/input_scale", scale)
        zp = b.const(f"{prefix}/input_zero_point", np.int8(0))
        xq = b.op("QuantizeLinear", [x_r, s, zp], f"{prefix}/input_QuantizeLinear")
        xd = b.op("DequantizeLinear", [xq, s, zp], f"{prefix}/input_DequantizeLinear")

        tensors = [b.const(f"{prefix}/weight", qw.q), b.const(f"{prefix}/weight_scale", qw.scale[0].astype(np.float32))]
        if qw.zero_point is not None:
            tensors.append(b.const(f"{prefix}/weight_zero_point", qw.zero_point[0]))
        wd = b.op("DequantizeLinear", tensors, f"{prefix}/weight_DequantizeLinear", {"axis": 1})
        mm = ir.node("MatMul", [xd, wd], name=layer.name)
        mm.outputs[0].name = f"{prefix}/matmul_output"
        b.nodes.append(mm)
        y = mm.outputs[0]
        if lift:
            y = b.op("Squeeze", [y, axes0], f"{prefix}/output_2d")
        if bias is not None:
            if beta != 1.0:
                bias = b.const(f"{prefix}/bias", (np.asarray(bias.const_value.numpy(), np.float64) * beta).astype(np.float32))
            y = b.op("Add", [y, bias], f"{prefix}/AddBias")
        if handled:
            side = b.const(f"{prefix}/sa_rows", w_hat[r.channels, :].astype(np.float32))
            y = b.op("Add", [y, b.op("MatMul", [delta, side], f"{prefix}/sa_restore_MatMul")], f"{prefix}/sa_restore")
        if keep_kn:
            cols = sorted({k for k, _, _ in keep_kn})
            rows = np.zeros((len(cols), layer.n), np.float32)
            for k, n, value in keep_kn:
                rows[cols.index(k), n] = value
            g = b.op("Gather", [x, b.const(f"{prefix}/keep_out/cols", np.array(cols, np.int64))], f"{prefix}/keep_out/Gather", {"axis": -1})
            y = b.op("Add", [y, b.op("MatMul", [g, b.const(f"{prefix}/keep_out/values", rows)], f"{prefix}/keep_out/MatMul")],
                     f"{prefix}/keep_out/Add")

        old_out, old_weight = node.outputs[0], node.inputs[1]
        y.type, y.shape = old_out.type, old_out.shape
        name = old_out.name
        old_out.replace_all_uses_with(y, replace_graph_outputs=True)
        graph.insert_after(node, b.nodes)
        graph.remove(node, safe=True)
        old_out.name = None
        y.name = name
        remove_orphans(graph, old_weight)
        decision.form = "w8a8"
        decision.quantized_node = layer.name
        decision.quantized_bytes = int(qw.q.nbytes + qw.scale.nbytes + (qw.zero_point.nbytes if qw.zero_point is not None else 0))
        kind = f"{'int' if self.symmetric else 'uint'}8 per-channel, clip {self.clip}"
        act = f"int8 activations per tensor, range {rng:.4g}"
        if handled:
            act += f" (naive {r.naive_range:.4g}; super-activation channels {r.channels} restored exactly beyond it)"
        decision.reason = ", ".join([kind, act] + ([f"{len(keep_kn)} kept out"] if keep_kn else []))


# ----------------------------------------------------------------------------------------------
# int4: super-activation channels kept out of the quantized MatMul


class KeepOutActivationChannelsPass(ir.passes.InPlacePass):
    """Take super-activation input channels out of linear layers' MatMul; add them back exactly.

    Runs on the float model *before* ``QuantizeWeightsPass``: ``y = MatMul(x * mask, W') + side`` where
    ``mask`` is 0 on the channels, ``W'`` has their rows zeroed (in place when the initializer has no
    other reader, else a copy) and ``side = Gather(x, C) (x) (alpha * W[C, :])`` is an outer product in
    float (``Mul``; ``Unsqueeze -> Mul -> ReduceSum`` for several channels): not a MatMul, so it stays
    float. A Gemm keeps its bias and alpha on the main path.

    Attributes:
        channels: ``{linear node name: input channels}`` (e.g. `channels_by_node`).
        exclude: node-name glob patterns of layers to leave alone (as the weight pass's).
        include_lm_head: also rewrite the layer whose output is the logits.
        decisions: after a call, ``{"node", "channels", "action", "reason"}`` per requested node.
        covered_rows: after a call, ``{initializer name: set of effective K rows moved to the side path}``.
    """

    def __init__(self, channels: Mapping[str, Sequence[int]], *, exclude: Iterable[str] = (), include_lm_head: bool = False):
        super().__init__()
        self.channels = {str(k): sorted({int(c) for c in v}) for k, v in channels.items() if len(v)}
        self.exclude = list(exclude)
        self.include_lm_head = include_lm_head
        self.decisions: list[dict] = []
        self.covered_rows: dict[str, set[int]] = {}
        self._rows: dict[str, tuple[list[int], np.ndarray]] = {}  # node -> (channels, float rows [C, N])
        self._covered: dict[str, list[dict]] = {}

    def requires(self, model: ir.Model) -> None:
        if self.channels and model.opset_imports.get("", 0) < 13:
            raise ir.passes.PreconditionError("the keep-out side path (Unsqueeze/ReduceSum inputs) needs opset >= 13")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        layers, _ = find_linear_layers(model)
        lm_head = find_lm_head(model, layers)
        by_name = {layer.name: layer for layer in layers}
        self.decisions, self.covered_rows, self._rows, self._covered = [], {}, {}, {}
        shared: dict[tuple[int, tuple[int, ...]], tuple[ir.Value, ir.Value]] = {}
        modified = False
        # Graph order, so that an input's shared mask/Gather lands before every layer that reads it.
        order = sorted(self.channels, key=lambda n: by_name[n].position if n in by_name else -1)
        for name in order:
            channels = self.channels[name]
            layer = by_name.get(name)
            reason = "not a linear layer of this model" if layer is None else _skip_reason(layer, lm_head, self.exclude, self.include_lm_head)
            if reason is None and any(not 0 <= c < layer.k for c in channels):
                reason = f"channels {channels} outside K={layer.k}"
            if reason is None and _activation_dtype(layer) not in _NUMPY:
                reason = f"activations are {_activation_dtype(layer)}"
            if reason is not None:
                self.decisions.append({"node": name, "channels": channels, "action": "skipped", "reason": reason})
                continue
            how = self._rewrite(graph, layer, channels, shared)
            self.decisions.append({"node": name, "channels": channels, "action": "kept_out",
                                   "reason": f"input channels {channels} out of the quantized MatMul, exact on a float side path ({how})"})
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    def uncovered(self, keep: Iterable[KeepCoordinate], model: ir.Model) -> list[KeepCoordinate]:
        """`keep` without the coordinates whose weight row went to the side path (exact there already).

        The removed ones are remembered and `annotate` reports them as kept out of their layer.
        """
        layers, _ = find_linear_layers(model)
        chains = {layer.weight.initializer.name: layer for layer in layers}
        out = []
        for name, index in keep:
            layer = chains.get(name)
            if layer is not None and layer.name in self._rows:
                k, n = _initializer_to_effective(layer.weight, index)
                channels, rows = self._rows[layer.name]
                if k in channels:
                    self._covered.setdefault(layer.name, []).append(
                        {"index": [int(i) for i in index], "k": k, "n": n, "value": float(rows[channels.index(k), n])})
                    continue
            out.append((name, index))
        return out

    def annotate(self, decisions: Iterable[LayerDecision]) -> None:
        """Add this pass's work to the weight pass's decisions: a note in ``reason``, and the super weights of
        kept-out rows in ``kept`` (they are exact on this pass's side path)."""
        notes = {d["node"]: d for d in self.decisions if d["action"] == "kept_out"}
        for decision in decisions:
            note = notes.get(decision.node)
            if note is None or decision.action != "quantized":
                continue
            decision.reason = f"{decision.reason}, super-activation input channels {note['channels']} kept out (float side path)"
            decision.kept.extend(self._covered.get(decision.node, []))

    def _rewrite(self, graph: ir.Graph, layer: LinearLayer, channels: list[int], shared) -> str:
        node, chain = layer.node, layer.weight
        dtype = _activation_dtype(layer)
        np_dtype = _NUMPY[dtype]
        alpha, _, _ = _gemm_parameters(node)
        prefix = f"{layer.name}/sw_onnx_sa_keep_out"
        b = _Builder(graph)
        x = node.inputs[0]
        key = (id(x), tuple(channels))
        if key not in shared:
            tag = f"{prefix}/input"
            mask = np.ones(layer.k, np_dtype)
            mask[channels] = 0
            masked = b.op("Mul", [x, b.const(f"{tag}/mask", mask)], f"{tag}/mask_Mul")
            xc = b.op("Gather", [x, b.const(f"{tag}/channels", np.array(channels, np.int64))], f"{tag}/Gather", {"axis": -1})
            shared[key] = (masked, xc)
        masked, xc = shared[key]

        w = chain.effective_weight()
        rows = (w[channels, :].astype(np.float64) * alpha).astype(np_dtype)
        self._rows[layer.name] = (list(channels), rows)
        if len(channels) == 1:
            side = b.op("Mul", [xc, b.const(f"{prefix}/row", rows[0])], f"{prefix}/side_Mul")
        else:
            axes = b.const(f"{prefix}/axes", np.array([-1], np.int64))
            col = b.op("Unsqueeze", [xc, axes], f"{prefix}/side_Unsqueeze")
            prod = b.op("Mul", [col, b.const(f"{prefix}/rows", rows)], f"{prefix}/side_Mul")
            side = b.op("ReduceSum", [prod, b.const(f"{prefix}/sum_axes", np.array([-2], np.int64))], f"{prefix}/side_ReduceSum",
                        {"keepdims": 0})

        how = self._zero_rows(graph, layer, channels, w, b)
        node.replace_input_with(0, masked)
        old_out = node.outputs[0]
        add = ir.node("Add", [old_out, side], name=f"{prefix}/Add")
        add.outputs[0].name = f"{prefix}/sum"
        add.outputs[0].type, add.outputs[0].shape = old_out.type, old_out.shape
        b.nodes.append(add)
        graph.insert_before(node, [n for n in b.nodes if n is not add])
        graph.insert_after(node, [add])
        _rewire_output(graph, old_out, add.outputs[0], keep_user=add)
        self.covered_rows.setdefault(chain.initializer.name, set()).update(channels)
        return how

    def _zero_rows(self, graph: ir.Graph, layer: LinearLayer, channels: list[int], w: np.ndarray, b: _Builder) -> str:
        """Zero the effective rows `channels` of the layer's weight: in place if nothing else reads it."""
        chain, node = layer.weight, layer.node
        init = chain.initializer
        value, exclusive = node.inputs[1], True
        while value is not None:
            if len(value.uses()) != 1 or value.is_graph_output() or value.is_graph_input():
                exclusive = False
                break
            producer = value.producer()
            value = producer.inputs[0] if producer is not None else None
        if exclusive:
            original = init.const_value
            k_idx = np.repeat(np.asarray(channels), layer.n)
            n_idx = np.tile(np.arange(layer.n), len(channels))
            index = chain.effective_to_initializer_index(k_idx, n_idx)

            def zeroed(original=original, index=index):
                array = np.array(original.numpy())
                array[index] = 0
                return ir.Tensor(array, name=init.name)

            init.const_value = ir.LazyTensor(zeroed, dtype=original.dtype, shape=original.shape, name=init.name)
            return "rows zeroed in place"
        w = np.array(w, dtype=_NUMPY[_activation_dtype(layer)])
        w[channels, :] = 0
        old = node.inputs[1]
        new = b.const(f"{layer.name}/sw_onnx_sa_keep_out/weight", w.T if chain.transposed else w)
        node.replace_input_with(1, new)
        remove_orphans(graph, old)
        return "weight copied: its initializer has other readers"
