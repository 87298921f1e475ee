"""Data-free detection of super activations and super weights, one onnxruntime pass per iteration.

Each iteration runs the instrumented graph once on a short prompt and reads, for every linear layer, the
per-channel max |input| and |output| and the input/output rows at its peak token, and for the residual
stream the per-channel max. Then:

1. Output spike: a channel whose max |output| is at least `spike_ratio` times both the layer's median
   channel max and the model's median of those medians. Relative rules only: magnitudes differ by model.
2. Located by contribution: at the spike's token t, `c_k = x[t, k] * W[k, j]`; the super weights are the
   largest same-sign contributions whose share of y[t, j] is at least `min_share` each (a group can share a
   row, as in Llama-13B), taken until they explain most of the spike.
3. Persistent vs one-off: a spike is a super activation when its layer writes it into the residual stream,
   the stream did not already carry it (this layer is its origin), and it is still carried (>= half its
   value) by at least `min_persist_fraction` of the residual values downstream. Spikes in q/k projections,
   the lm_head or late layers that cancel an existing activation are reported as one-off spikes.
4. The found super weights are zeroed in memory and the pass is repeated until no new super weight is found
   or `max_iterations`; the next pass measures the effect of zeroing on the super activation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx_ir as ir

from sw_onnx.analyze.flatten import inline_input_branches
from sw_onnx.analyze.input_stats import InputImportance, InputRange, InputStatsProbe, importance_from_stats, plan_input_ranges
from sw_onnx.analyze.instrument import InstrumentLinearStatsPass, stat_output_name
from sw_onnx.discover import LinearLayer, find_linear_layers, find_residual_chain, require_float_model
from sw_onnx.errors import UnsupportedGraphError
from sw_onnx.inputs import build_feeds, logits_output_name
from sw_onnx.io import open_session, ort_value
from sw_onnx.passes.ablate import scaled_initializers

logger = logging.getLogger(__name__)


@dataclass
class DetectConfig:
    """Detection settings; the defaults are the documented ones.

    Attributes:
        max_iterations: passes at most (each zeroes what the previous one found).
        spike_ratio: an output channel spikes when its max |y| is this many times the layer's and the
            model's typical (median) channel max.
        min_share: smallest share of the spike a single weight's contribution must explain.
        min_persist_fraction: fraction of the downstream residual values that must still carry half the
            spike for it to count as persistent.
        min_persist_span: the downstream residual values must also be at least this fraction of the
            longest residual stream (a spike in the last layers cannot show that it persists).
    """

    max_iterations: int = 4
    spike_ratio: float = 50.0
    min_share: float = 0.15
    min_persist_fraction: float = 0.5
    min_persist_span: float = 0.1
    providers: list[str] | None = None


@dataclass
class Spike:
    """An output spike of a linear layer: |y[token, channel]| far above the model's typical activations."""

    position: int
    node: str
    layer: int | None
    channel: int
    token: int
    value: float  # signed y[token, channel]
    ratio_to_layer: float
    ratio_to_model: float
    iteration: int
    kind: str = "one-off"  # "super_activation" or "one-off"
    reason: str = ""
    residual_before: float | None = None
    carried_fraction: float = 0.0
    explained_share: float = 0.0


@dataclass
class SuperWeight:
    """A weight whose contribution makes a super activation.

    `row`/`col` are in torch orientation ([out, in]): row = output (hidden) channel, col = input channel.
    `index` is the position in the initializer's own layout (ONNX MatMul `[in, out]`: (col, row)).
    """

    node: str
    initializer: str
    layer: int | None
    position: int
    row: int
    col: int
    index: list[int]
    layout: str
    value: float
    contribution: float
    share: float
    input_spike: dict
    output_spike: dict
    iteration: int
    effect: dict = field(default_factory=dict)


@dataclass
class DetectResult:
    super_weights: list[SuperWeight]
    super_activations: list[Spike]
    one_off_spikes: list[Spike]
    iterations: int
    token_ids: list[int]
    linear_layers: int
    seconds: float
    history: list[dict]  # per iteration: per-layer peaks (for the plot)
    # Linear-layer inputs on the prompt (first pass), with their super-activation entries: what quantize's
    # activation keep-out and W8A8 ranges use (`sw_onnx.analyze.input_stats.plan_input_ranges`).
    input_ranges: dict[str, InputRange] = field(default_factory=dict)
    # Per linear-layer input, sum of x^2 per channel on the prompt (first pass): the input importance of
    # quantize's activation-aware rounding and bit allocation.
    input_importance: dict[str, InputImportance] = field(default_factory=dict)
    # (output name, the model's own logits on the prompt, first pass): quantize's verification reference.
    reference_logits: tuple[str, np.ndarray] | None = None
    # The first pass's statistics and the layers they are keyed by (position): nbits accuracy levels.
    first_pass: LayerStats | None = None
    layers: list[LinearLayer] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "super_weights": [asdict(s) for s in self.super_weights],
            "super_activations": [asdict(s) for s in self.super_activations],
            "one_off_spikes": [asdict(s) for s in self.one_off_spikes],
            "iterations": self.iterations,
        }


@dataclass
class LayerStats:
    """What one instrumented run returned, as numpy arrays keyed by layer position / residual index."""

    in_max: dict[int, np.ndarray]
    in_argmax: dict[int, np.ndarray]
    out_max: dict[int, np.ndarray]
    out_argmax: dict[int, np.ndarray]
    peak_token: dict[int, int]
    in_row: dict[int, np.ndarray]
    out_row: dict[int, np.ndarray]
    resid_max: dict[int, np.ndarray]


class Detector:
    """Instruments a model once and runs detection passes on it.

    Args:
        model: the loaded model; it is instrumented in place (load a fresh one if you need it unchanged).
    """

    def __init__(self, model: ir.Model, config: DetectConfig | None = None):
        self.config = config or DetectConfig()
        require_float_model(model)  # AlreadyQuantizedError: QDQ weights, MatMulNBits, QLinear ops
        inline_input_branches(model)  # a merged decoder's If: the no-past branch, as the feeds select
        self.layers, self.skipped = find_linear_layers(model)
        if not self.layers:
            raise UnsupportedGraphError(
                "no linear layer found (no MatMul/Gemm with a constant 2-D weight)",
                hint="sw-onnx works on transformer graphs whose linear weights are initializers",
            )
        self.residual_values: list[ir.Value] = []
        self.chains: dict[int, tuple[int | None, list[int]]] = {}
        index_of: dict[int, int] = {}
        for layer in self.layers:
            before, chain = find_residual_chain(layer)
            ids = []
            for value in ([before] if before is not None else []) + chain:
                if id(value) not in index_of:
                    index_of[id(value)] = len(self.residual_values)
                    self.residual_values.append(value)
                ids.append(index_of[id(value)])
            if chain:
                self.chains[layer.position] = (ids[0] if before is not None else None, ids[1:] if before is not None else ids)
        self.weights = {layer.position: layer.weight.effective_weight for layer in self.layers}
        InstrumentLinearStatsPass(self.layers, self.residual_values)(model)
        self.input_probe = InputStatsProbe(model, self.layers)  # folded in by the first pass only
        # Weights become overridable initializers (also graph inputs): each pass feeds the ones with zeroed
        # super weights, so one session serves every pass.
        graph_inputs = {v.name for v in model.graph.inputs}
        for layer in self.layers:
            if layer.weight.initializer.name not in graph_inputs:
                model.graph.inputs.append(layer.weight.initializer)
                graph_inputs.add(layer.weight.initializer.name)
        self.model = model
        probe_outputs = set(self.input_probe.output_names)
        self.output_names = [v.name for v in model.graph.outputs
                             if v.name.startswith("sw_onnx/") and v.name not in probe_outputs]
        self._session = None
        self._inputs_measured = False
        self.reference_logits: tuple[str, np.ndarray] | None = None

    def run(self, token_ids: np.ndarray, overrides: dict[str, np.ndarray]) -> LayerStats:
        if self._session is None:
            # Weights fed from memory maps whose pages are dropped during the run: memory stays at the
            # working set, not the model's size (bench/large_model.py). No graph optimization: the session
            # runs once or twice on a short prompt, and optimizing the instrumented graph (SmolLM2: 11,852
            # nodes) took longer than it saved (session 1.04 -> 0.52 s, each run 0.15 -> 0.20 s).
            self._session = open_session(self.model, self.config.providers, stream_weights=True, optimize=False)
        feeds = build_feeds(self._session, token_ids)
        tokens = int(np.asarray(token_ids).size)
        feeds.update(self.input_probe.feeds(tokens))
        feeds.update({name: ort_value(array) for name, array in overrides.items()})  # bf16 too
        measure_inputs = not self._inputs_measured and not overrides
        fetch = self.output_names + (self.input_probe.output_names if measure_inputs else [])
        logits_name = None
        if measure_inputs:
            try:
                logits_name = logits_output_name(self._session)
                fetch = fetch + [logits_name]
            except UnsupportedGraphError:  # no logits-like output: nothing to keep
                pass
        values = dict(zip(fetch, self._session.run(fetch, feeds)))
        if measure_inputs:
            self.input_probe.add(values, tokens)
            self._inputs_measured = True
            if logits_name is not None:
                self.reference_logits = (logits_name, values[logits_name])

        def per(kind, keys):
            return {k: values[stat_output_name(kind, k)] for k in keys}

        positions = [layer.position for layer in self.layers]
        for layer in self.layers:  # topological order: the first layer that sees or makes one
            p = layer.position
            if not (np.isfinite(values[stat_output_name("in_max", p)]).all()
                    and np.isfinite(values[stat_output_name("out_max", p)]).all()):
                raise UnsupportedGraphError(
                    f"the model's activations hold NaN or infinite values on the prompt (from linear layer "
                    f"{layer.name!r} on): no super weight can be told apart",
                    hint="check that the weights are finite and that the export runs correctly")
        return LayerStats(
            in_max=per("in_max", positions),
            in_argmax=per("in_argmax", positions),
            out_max=per("out_max", positions),
            out_argmax=per("out_argmax", positions),
            peak_token={p: int(v[0]) for p, v in per("peak_token", positions).items()},
            in_row={p: v[0] for p, v in per("in_peak_row", positions).items()},
            out_row={p: v[0] for p, v in per("out_peak_row", positions).items()},
            resid_max=per("resid_max", range(len(self.residual_values))),
        )

    def find_spikes(self, stats: LayerStats, iteration: int) -> list[Spike]:
        """Output channels far above the layer's and the model's typical channel max."""
        medians = {p: float(np.median(v)) for p, v in stats.out_max.items()}
        model_median = float(np.median(list(medians.values())))
        tiny = np.finfo(np.float32).tiny
        spikes = []
        for layer in self.layers:
            p = layer.position
            out_max = stats.out_max[p]
            threshold = self.config.spike_ratio * max(medians[p], model_median, tiny)
            for j in np.flatnonzero(out_max >= threshold)[:16]:
                token = int(stats.out_argmax[p][j])
                value = float(stats.out_row[p][j]) if token == stats.peak_token[p] else float(out_max[j])
                spikes.append(Spike(
                    position=p, node=layer.name, layer=layer.layer, channel=int(j), token=token, value=value,
                    ratio_to_layer=float(out_max[j] / max(medians[p], tiny)),
                    ratio_to_model=float(out_max[j] / max(model_median, tiny)), iteration=iteration,
                ))
        return spikes

    def classify(self, spike: Spike, stats: LayerStats) -> None:
        """Set `kind`/`reason`: a super activation originates here and persists in the residual stream."""
        chain = self.chains.get(spike.position)
        if chain is None:
            spike.reason = "output does not enter a residual stream"
            return
        before, after = chain
        magnitude = abs(spike.value)
        if before is not None:
            spike.residual_before = float(stats.resid_max[before][spike.channel])
        if not after:
            spike.reason = "no residual values downstream"
            return
        carried = [stats.resid_max[r][spike.channel] >= 0.5 * magnitude for r in after]
        longest = max(len(a) for _, a in self.chains.values())
        spike.carried_fraction = float(np.mean(carried))
        if spike.residual_before is not None and spike.residual_before >= 0.5 * magnitude:
            spike.reason = "the residual stream already carried this channel (not its origin)"
        elif len(after) < max(2, self.config.min_persist_span * longest):
            spike.reason = f"too close to the end to persist ({len(after)} of {longest} residual values downstream)"
        elif spike.carried_fraction < self.config.min_persist_fraction:
            spike.reason = f"carried by only {spike.carried_fraction:.0%} of the residual stream downstream"
        else:
            spike.kind = "super_activation"
            spike.reason = f"created here, carried by {spike.carried_fraction:.0%} of the residual stream downstream"

    def locate(self, spike: Spike, stats: LayerStats, iteration: int, zeroed: set[tuple[int, int, int]]) -> list[SuperWeight]:
        """The weights whose contributions make the spike (needs the spike at the layer's peak token)."""
        p = spike.position
        if spike.token != stats.peak_token[p]:
            return []  # rows are exposed for the peak token only; a secondary spike waits for the next pass
        layer = self.layers[p]
        x = stats.in_row[p].astype(np.float64)
        w_col = self.weights[p]()[:, spike.channel].astype(np.float64)
        contributions = x * w_col
        y = spike.value
        shares = contributions / y if y != 0 else np.zeros_like(contributions)
        order = np.argsort(-shares)
        found, explained = [], 0.0
        input_median = float(np.median(stats.in_max[p])) or np.finfo(np.float32).tiny
        for k in order[:8]:
            if shares[k] < self.config.min_share or explained >= 0.9:
                break
            if (p, int(k), spike.channel) in zeroed:
                continue
            explained += float(shares[k])
            index = layer.weight.effective_to_initializer_index(np.array([k]), np.array([spike.channel]))
            found.append(SuperWeight(
                node=layer.name, initializer=layer.weight.initializer.name, layer=layer.layer, position=p,
                row=spike.channel, col=int(k), index=[int(i[0]) for i in index], layout=layer.weight.layout,
                value=float(w_col[k]), contribution=float(contributions[k]), share=float(shares[k]),
                input_spike={"channel": int(k), "token": spike.token, "value": float(x[k]),
                             "ratio": float(abs(x[k]) / input_median)},
                output_spike={"channel": spike.channel, "token": spike.token, "value": y},
                iteration=iteration,
            ))
        spike.explained_share = explained
        return found


def detect(
    model: ir.Model,
    token_ids: np.ndarray,
    config: DetectConfig | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> DetectResult:
    """Find super activations and super weights of `model` on the prompt `token_ids`.

    Args:
        model: a loaded model; it is instrumented in place (pass a clone to keep it unchanged).
        token_ids: int64 `[seq]`, BOS first when the model uses one.
        progress: called with a short message at each step.
    """
    started = time.perf_counter()
    say = progress or (lambda message: None)
    detector = Detector(model, config)
    say(f"instrumented {len(detector.layers)} linear layers")
    search = _Search(detector)
    first = None
    while True:
        say(f"pass {search.iteration + 1}: running onnxruntime")
        stats = detector.run(token_ids, search.overrides)
        first = first or stats
        search.record(stats)
        if search.iteration >= detector.config.max_iterations:
            break
        found = search.step(stats)
        if not found:
            break
        say(f"pass {search.iteration}: {found} super weight(s) found, zeroing them and repeating")
    return DetectResult(
        super_weights=search.super_weights,
        super_activations=search.activations,
        one_off_spikes=sorted(search.one_off.values(), key=lambda s: (s.position, s.channel)),
        iterations=len(search.history),
        token_ids=[int(t) for t in np.asarray(token_ids).ravel()],
        linear_layers=len(detector.layers),
        seconds=time.perf_counter() - started,
        history=search.history,
        input_ranges=plan_input_ranges(detector.input_probe.stats),
        input_importance=importance_from_stats(detector.input_probe.stats),
        reference_logits=detector.reference_logits,
        first_pass=first,
        layers=detector.layers,
    )


class _Search:
    """The zero-and-repeat loop's state: what was found so far and which weights are zeroed."""

    def __init__(self, detector: Detector):
        self.detector = detector
        self.iteration = 0
        self.overrides: dict[str, np.ndarray] = {}
        self.zeroed: set[tuple[int, int, int]] = set()
        self.coordinates: list[tuple[str, tuple[int, ...]]] = []
        self.super_weights: list[SuperWeight] = []
        self.activations: list[Spike] = []
        self.one_off: dict[tuple[int, int], Spike] = {}
        self.history: list[dict] = []
        self.pending: list[tuple[Spike, list[SuperWeight]]] = []

    def record(self, stats: LayerStats) -> None:
        """Keep the pass's per-layer peaks, and measure the effect of the previous pass's zeroing."""
        self.history.append({"in_peak": {p: float(v.max()) for p, v in stats.in_max.items()},
                             "out_peak": {p: float(v.max()) for p, v in stats.out_max.items()}})
        for spike, group in self.pending:
            after = float(stats.out_max[spike.position][spike.channel])
            effect = {"spike_before": abs(spike.value), "spike_after": after,
                      "reduction": abs(spike.value) / max(after, np.finfo(np.float32).tiny)}
            for sw in group:
                sw.effect = effect
        self.pending = []

    def step(self, stats: LayerStats) -> int:
        """Classify the pass's spikes, locate new super weights and zero them; how many were found."""
        detector, new_weights = self.detector, []
        for spike in detector.find_spikes(stats, self.iteration):
            detector.classify(spike, stats)
            if spike.kind != "super_activation":
                self.one_off.setdefault((spike.position, spike.channel), spike)
                continue
            group = detector.locate(spike, stats, self.iteration, self.zeroed)
            if not any((a.position, a.channel) == (spike.position, spike.channel) for a in self.activations):
                self.activations.append(spike)
            if group:
                self.pending.append((spike, group))
                new_weights.extend(group)
        for sw in new_weights:
            self.zeroed.add((sw.position, sw.col, sw.row))
            self.coordinates.append((sw.initializer, tuple(sw.index)))
        if new_weights:
            self.overrides = scaled_initializers(detector.model, self.coordinates, 0.0)
            self.super_weights.extend(new_weights)
            self.iteration += 1
        return len(new_weights)
