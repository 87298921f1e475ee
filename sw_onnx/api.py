"""The pipelines behind the commands, each a short sequence of named stages.

``quantize_model``: load (once) -> analyze (detect on a clone, or read a report; calibrate only when asked)
-> plan (`sw_onnx.plan.build_quant_plan`) -> passes (opset, channel keep-out, weights or W8A8) -> save to a
temporary file -> verify -> publish. ``detect_model``: load -> detect -> report. ``ablate_model``: load ->
(detect on a clone) -> validate the coordinates -> scale -> save.

The input is loaded once: analysis instruments a clone, which shares the (memory-mapped) weights. The
sessions are the analysis's (the instrumented clone) and verification's (the written file, as a user runs it).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sw_onnx._process import release_freed_memory
from sw_onnx._version import __version__
from sw_onnx.config import QuantizeConfig
from sw_onnx.coordinates import Coordinate, normalize_coordinates
from sw_onnx.errors import UnsupportedGraphError, UsageError, VerificationError
from sw_onnx.outputs import check_output, data_path, file_bytes, publish_model, staging_path
from sw_onnx.schema import ABLATE_SCHEMA, QUANTIZE_SCHEMA, QUANTIZE_SCHEMA_VERSION, SCHEMA_VERSION

if TYPE_CHECKING:  # heavy imports stay out of `sw-onnx --help`
    import numpy as np
    import onnx_ir as ir

    from sw_onnx.detect import DetectConfig, DetectResult
    from sw_onnx.plan import LayerPlan, QuantPlan

__all__ = ["AblateResult", "QuantizeSummary", "ablate_model", "ablate_super_weights", "detect_coordinates", "default_output_path", "detect_model", "quantize_model"]

_EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Files of an export folder that describe the model rather than hold it: copied beside an ablated model
# written to another folder, so that eval/generate find its tokenizer and EOS there.
SIDECAR_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja",
)


# ----------------------------------------------------------------------------------------------
# detect


def detect_model(model_path: str | os.PathLike, config: DetectConfig | None = None, *, tokenizer=None,
                 prompt: str | None = None, progress: Callable[[str], None] | None = None) -> tuple[DetectResult, str]:
    """Load the model at `model_path` and detect its super weights on the prompt; (result, prompt source)."""
    from sw_onnx.detect import detect
    from sw_onnx.inputs import prompt_token_ids
    from sw_onnx.io import load_model, resolve_model_path

    say = progress or (lambda message: None)
    path = resolve_model_path(model_path)
    token_ids, source = prompt_token_ids(model_path, tokenizer=tokenizer, prompt=prompt)
    say(f"loading {path}")
    model = load_model(path)
    say(f"prompt: {source}, {len(token_ids)} tokens")
    return detect(model, token_ids, config, progress=progress), source


# ----------------------------------------------------------------------------------------------
# quantize


@dataclass
class QuantizeSummary:
    """What `quantize_model` did; `to_dict` is the ``sw-onnx/quantize`` JSON (schema in docs/quantize.md).

    Attributes:
        input_path, output_path: the files.
        config: the resolved configuration.
        opset: ``{"from", "to", "method"}``.
        keep_source: ``"auto"``, ``"none"`` or the report's path.
        kept: the super weights asked to be kept out, with ``quantized_layer`` telling whether their layer
            was quantized (otherwise they simply stay float with it).
        unused_keep: keep coordinates matching no quantized layer.
        layers: the plan, one `LayerPlan` per linear layer.
        embeddings: the embedding tables quantized (`EmbeddingPlan`), empty unless ``embedding_bits``.
        input_bytes, output_bytes: on-disk sizes, external data included.
        input_sha256: hash of the input .onnx file (not of its external data).
        external_data: whether the output's weights are in ``<output>.data``.
        verification: the `sw_onnx.verify.VerifyResult` as a dict, or None (``--no-verify``).
        seconds: wall times ``{"detect", "rewrite_and_save", "verify", "total"}``.
    """

    input_path: str
    output_path: str
    config: QuantizeConfig
    opset: dict
    keep_source: str
    kept: list[dict]
    unused_keep: list[dict]
    layers: list[LayerPlan]
    embeddings: list = field(default_factory=list)
    input_bytes: int = 0
    output_bytes: int = 0
    input_sha256: str = ""
    external_data: bool = False
    verification: dict | None = None
    seconds: dict = field(default_factory=dict)

    @property
    def quantized(self) -> list[LayerPlan]:
        return [d for d in self.layers if d.action == "quantized"]

    @property
    def skipped(self) -> list[LayerPlan]:
        return [d for d in self.layers if d.action != "quantized"]

    def totals(self) -> dict:
        q = self.quantized
        forms: dict[str, int] = {}
        for d in q:
            forms[d.form] = forms.get(d.form, 0) + 1
        from sw_onnx.plan import layer_bits

        quant_bytes = sum(d.quantized_bytes for d in q)
        weights = sum(d.k * d.n for d in q)
        bits = {"codes": 0, "scales": 0, "zero_points": 0, "side": 0}
        for d in q:
            for key, value in layer_bits(d).items():
                bits[key] += value
        emb_weights = sum(e.weights for e in self.embeddings)
        emb_bits = sum(sum(e.bit_count().values()) for e in self.embeddings)
        everything = weights + emb_weights
        return {
            "linear_layers": len(self.layers), "quantized": len(q), "skipped": len(self.layers) - len(q),
            "forms": forms, "kept_out": sum(len(d.kept) for d in q),
            "float_weight_bytes": sum(d.float_bytes for d in q), "quantized_weight_bytes": quant_bytes,
            "weights": weights, "bit_count": bits,
            "bits_per_weight": round(sum(bits.values()) / weights, 4) if weights else None,
            "embedding_tables": len(self.embeddings), "embedding_weights": emb_weights, "embedding_bits": emb_bits,
            "bits_per_weight_with_embeddings": round((sum(bits.values()) + emb_bits) / everything, 4) if everything else None,
        }

    def to_dict(self) -> dict:
        return {
            "schema": QUANTIZE_SCHEMA, "schema_version": QUANTIZE_SCHEMA_VERSION, "tool_version": __version__,
            "input": {"path": self.input_path, "bytes": self.input_bytes, "sha256": self.input_sha256},
            "output": {"path": self.output_path, "bytes": self.output_bytes, "external_data": self.external_data},
            "config": self.config.to_dict(), "opset": self.opset,
            "keep": {"source": self.keep_source, "super_weights": self.kept, "unused": self.unused_keep},
            "layers": [d.to_dict() for d in self.layers], "embeddings": [e.to_dict() for e in self.embeddings],
            "totals": self.totals(),
            "verification": self.verification, "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


def default_output_path(input_path: str | os.PathLike, config: QuantizeConfig) -> Path:
    """``<stem>.<u?int><bits>-<b<block>|pc>[-nbits].onnx`` beside the input, e.g. ``model.uint4-b32.onnx``
    (``pc``: per-channel)."""
    from sw_onnx.io import resolve_model_path

    src = resolve_model_path(input_path)
    block = f"b{config.block_size}" if config.block_size else "pc"
    kind = f"{'int' if config.symmetric else 'uint'}{config.bits}-{block}"
    suffix = "-nbits" if config.format == "nbits" else ""
    if config.activations == "int8":
        kind, suffix = "w8a8", ""
    return src.with_name(f"{src.stem}.{kind}{suffix}.onnx")


@dataclass
class _Run:
    """One quantize run: its request, and what each stage hands the next."""

    src: Path
    out: Path
    config: QuantizeConfig
    say: Callable[[str], None]
    started: float
    token_ids: np.ndarray | None = None
    input_sha256: object = None
    keep_records: list[dict] = field(default_factory=list)
    keep: list[Coordinate] = field(default_factory=list)
    ranges: dict | None = None
    importance: dict | None = None
    sensitivity: dict | None = None
    hessians: dict | None = None
    accuracy_levels: dict[str, int] = field(default_factory=dict)
    reference_logits: tuple[str, np.ndarray] | None = None
    input_dims: dict = field(default_factory=dict)
    opset: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)


def quantize_model(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    config: QuantizeConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> QuantizeSummary:
    """Quantize the model at `input_path` and write it to `output_path` (default: `default_output_path`).

    Args:
        input_path: an .onnx file, an export folder holding model.onnx, or an onnxruntime-genai folder
            (genai_config.json beside the model: the output is then a complete genai folder).
        output_path: the .onnx to write (its weights go to ``<output>.data`` when the input used external
            data or the output would pass 1.8 GB); for a genai folder, the folder to write.
        config: settings (default `QuantizeConfig()`).
        progress: called with a short message at each step.

    Raises:
        UsageError: bad settings, output == input, an existing output without ``force``, a bad keep report.
        ModelLoadError: the input is not a readable model.
        UnsupportedGraphError: nothing to quantize, or the opset cannot be raised.
        VerificationError: the written model failed verification; nothing was published. The summary is
            attached as ``error.summary``.
    """
    genai = _genai_config(input_path)
    if genai is not None:
        return _quantize_genai_folder(genai, output_path, config or QuantizeConfig(), progress)
    run = _start(input_path, output_path, config or QuantizeConfig(), progress)
    with staging_path(run.out) as tmp, _no_huge_pages():
        with _full_collections_deferred():
            plan, summary = _write_quantized(run, tmp)
        if run.config.verify:
            gc.collect()  # the graph's node/value cycles hold the source weights; free them before sessions
            release_freed_memory()  # verification's peak is the run's (sw_onnx._process)
            _verify(run, tmp, plan, summary)
        publish_model(tmp, run.out)
    summary.output_bytes = file_bytes(run.out) + file_bytes(data_path(run.out))
    summary.seconds["total"] = time.perf_counter() - run.started
    run.say(f"wrote {run.out}")
    return summary


@contextlib.contextmanager
def _full_collections_deferred():
    """Python's automatic full collections off while the graph is built and saved: each walks every object
    of the graph and its clones, and they took 0.3 s of SmolLM2's bare quantize (7 of them) while finding
    little to free; young generations are still collected. Restored on the way out."""
    threshold = gc.get_threshold()
    gc.set_threshold(threshold[0], threshold[1], 1 << 30)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)


@contextlib.contextmanager
def _no_huge_pages():
    """numpy's arrays without transparent huge pages while quantizing, restored on the way out. numpy asks the
    kernel for them on every array of 4 MB or more; where the kernel grants them only when asked (the
    ``madvise`` setting, Debian's default) each fresh 2 MB page is compacted and zeroed on first touch, and the
    quantizer's temporaries are fresh memory: bench/large_model.py's decoder spent 1.3 s more in the kernel and
    0.8 s more wall with them (3 alternating runs of the bare command)."""
    set_huge_pages = _madvise_hugepage_switch()
    if set_huge_pages is None:  # pragma: no cover - a numpy without the switch
        yield
        return
    previous = set_huge_pages(False)
    try:
        yield
    finally:
        set_huge_pages(previous)


def _madvise_hugepage_switch():
    """numpy's ``_set_madvise_hugepage(enabled) -> previous`` (numpy 1.20+, private module), or None."""
    import importlib

    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return importlib.import_module(module)._set_madvise_hugepage
        except (ImportError, AttributeError):
            continue
    return None


def _write_quantized(run: _Run, tmp: Path) -> tuple[QuantPlan, QuantizeSummary]:
    """Load, analyze, plan, rewrite and save to `tmp`; the model is released when this returns.

    The analysis works on a clone taken before the opset upgrade (it runs the model as loaded); clones share
    the memory-mapped weights, so the input is read once.
    """
    from sw_onnx.io import save_model, stores_weights_externally
    from sw_onnx.plan import build_quant_plan

    model = _load(run)
    external_input = stores_weights_externally(model)  # an input with a data file keeps one, whatever is rewritten
    t0 = time.perf_counter()
    run.input_dims = _input_dims(run.src, model)
    pristine = model.clone()
    types = _upgrade_opset(run, model)
    _analyze(run, model, pristine)
    del pristine
    t1 = time.perf_counter()
    plan = build_quant_plan(model, run.config, keep=run.keep, ranges=run.ranges, importance=run.importance,
                            accuracy_levels=run.accuracy_levels, types=types, sensitivity=run.sensitivity,
                            hessians=run.hessians)
    if run.config.embedding_bits and not plan.embeddings:  # asked for explicitly: say why nothing happened
        run.say(f"--embedding-bits {run.config.embedding_bits}: no embedding table to quantize (a Gather of a float "
                "initializer, or of its Transpose, that nothing but a quantized lm_head also reads)")
    _rewrite(run, model, plan)
    summary = _summary(run, model, plan)
    summary.seconds["detect"] = t1 - t0
    estimated = sum(p.quantized_bytes for p in plan.quantized) + _unquantized_bytes(model)
    summary.external_data = external_input or estimated > _EXTERNAL_DATA_THRESHOLD
    run.say(f"quantizing {len(plan.quantized)} of {len(plan.layers)} linear layers and writing")
    save_model(model, tmp, external_data=summary.external_data)
    summary.seconds["rewrite_and_save"] = time.perf_counter() - t1
    return plan, summary


def _input_dims(src: Path, model: ir.Model) -> dict:
    """The KV-cache sizes the graph leaves symbolic (genai_config.json, else the attention nodes), taken from
    the original: verification feeds its quantized copy with them."""
    from sw_onnx.genai import find_config
    from sw_onnx.kvcache import cache_dim_hints

    return cache_dim_hints(src if find_config(src) is not None else model)


def _genai_config(input_path):
    from sw_onnx.genai import find_config, read_config

    path = Path(input_path)
    config_path = find_config(path) if path.is_dir() else None
    return read_config(config_path) if config_path is not None else None


def default_output_folder(folder: Path, config: QuantizeConfig) -> Path:
    """``<folder>-<kind>`` beside an onnxruntime-genai folder, e.g. ``smollm2-genai-uint4-b32``."""
    kind = default_output_path(folder / "model.onnx", config).name[len("model."):-len(".onnx")]
    return folder.resolve().with_name(f"{folder.resolve().name}-{kind}")


def _quantize_genai_folder(genai, output_path, config: QuantizeConfig, progress) -> QuantizeSummary:
    """An onnxruntime-genai folder in, a complete one out: the decoder quantized (and verified) as a file
    in a staging folder beside the target, the config (file name) and tokenizer files beside it, one short
    generation through onnxruntime-genai when installed, then the folder renamed into place."""
    from dataclasses import replace

    from sw_onnx.genai import copy_folder_files, write_config
    from sw_onnx.outputs import check_output_folder, external_files, publish_folder, staging_folder

    folder = genai.path.parent
    out = Path(output_path) if output_path is not None else default_output_folder(folder, config)
    check_output_folder(folder, out, force=config.force)
    with staging_folder(out) as staging:
        summary = quantize_model(genai.filename, staging / genai.filename.name, replace(config, force=False), progress)
        skip = {genai.filename.name, "genai_config.json"} | {p.name for p in external_files(genai.filename)}
        copy_folder_files(folder, staging, skip)
        write_config(genai, staging, genai.filename.name)
        if config.verify:
            _verify_genai(staging, summary, progress)
        publish_folder(staging, out)
    summary.input_path, summary.output_path = str(folder), str(out)
    return summary


def _verify_genai(staging: Path, summary: QuantizeSummary, progress) -> None:
    from sw_onnx.genai import generate_check
    from sw_onnx.inputs import prompt_token_ids

    (progress or (lambda message: None))("verifying: one greedy generation through onnxruntime-genai")
    ids, _ = prompt_token_ids(staging)
    check = generate_check(staging, [int(t) for t in ids])
    summary.verification = {**(summary.verification or {}), "genai": check}
    if not check["ran"] and "not installed" not in (check["error"] or ""):
        error = VerificationError(f"onnxruntime-genai cannot run the quantized folder: {check['error']}",
                                  hint="rerun with --no-verify to keep the unverified folder")
        error.summary = summary  # type: ignore[attr-defined]
        raise error


def _start(input_path, output_path, config: QuantizeConfig, progress) -> _Run:
    """Validate the request before any work: settings, input, output path; start hashing the input."""
    from sw_onnx.inputs import prompt_token_ids
    from sw_onnx.io import resolve_model_path

    config.validate()
    src = resolve_model_path(input_path)
    out = Path(output_path) if output_path is not None else default_output_path(src, config)
    check_output(src, out, force=config.force)
    run = _Run(src, out, config, progress or (lambda message: None), time.perf_counter())
    run.input_sha256 = _Sha256InBackground(src)  # hashing a large inline model overlaps the work below
    run.token_ids, _ = prompt_token_ids(src)
    return run


def _load(run: _Run) -> ir.Model:
    from sw_onnx.discover import require_float_model
    from sw_onnx.io import load_model

    run.say(f"loading {run.src}")
    model = load_model(run.src)
    require_float_model(model)  # "already quantized": refused
    return model


def _analyze(run: _Run, model: ir.Model, pristine: ir.Model) -> None:
    """The facts the plan needs: super weights to keep, input ranges and super-activation channels,
    accuracy levels (nbits), and the original's logits for verification. Sessions run on clones of
    `pristine` (the model as loaded: instrumentation changes what it is given)."""
    from sw_onnx.coordinates import validate_coordinates

    config = run.config
    first_pass = None
    if config.keep == "auto":
        run.say("detecting super weights (keep=auto)")
        first_pass = _detect_for_keep(run, pristine)
    elif config.keep != "none":
        _read_keep_report(run, Path(config.keep))
    values = [r.get("value") for r in run.keep_records] if config.keep not in ("auto", "none") else None
    run.keep = validate_coordinates(model, [(r["initializer"], r["index"]) for r in run.keep_records],
                                    f"--keep {config.keep}", values=values)
    if config.format == "nbits":
        run.say("measuring layer inputs for accuracy_level (nbits)")
        run.accuracy_levels = _accuracy_levels(run, pristine, first_pass)
    if config.activations != "none" or config.sa_keep_out or config.uses_importance:
        _input_statistics(run, model, pristine)
    if config.gptq:
        run.say("collecting each layer input's X^T X (GPTQ)")
        run.hessians = _hessians(run, pristine)
    if config.allocates and config.allocation == "damage" and _measures_sensitivity():
        run.say("measuring each layer's int4 sensitivity on the prompt (bit allocation)")
        run.sensitivity = _sensitivity(run, pristine)


def _detect_for_keep(run: _Run, model: ir.Model):
    """Detection on a clone (it is instrumented); keeps its super weights, input ranges, logits and first pass."""
    from sw_onnx.detect import DetectConfig, detect

    providers = list(run.config.providers) if run.config.providers else None
    # The copy is instrumented in place: a later calibration (--calib-text) needs a clean one.
    result = detect(model.clone() if run.config.calib_text else model, run.token_ids, DetectConfig(providers=providers))
    run.keep_records = [{"node": sw.node, "initializer": sw.initializer, "index": [int(i) for i in sw.index],
                         "row": sw.row, "col": sw.col, "value": sw.value} for sw in result.super_weights]
    run.ranges, run.reference_logits = result.input_ranges, result.reference_logits
    run.importance = result.input_importance
    return result


def _hessians(run: _Run, model: ir.Model) -> dict:
    """``X^T X`` per linear-layer input over ``calib_text``'s calibration windows, or the prompt."""
    import numpy as np

    from sw_onnx.analyze.input_stats import calibration_windows, collect_hessians

    windows = [run.token_ids]
    if run.config.calib_text is not None:
        from sw_onnx.inputs import bos_convention
        from sw_onnx.measure import text_token_ids

        ids, _ = text_token_ids(run.src, text=run.config.calib_text)
        bos, add_bos = bos_convention(run.src.parent)
        windows = calibration_windows(ids, bos=bos if add_bos else None)
    hessians = collect_hessians(model.clone(), windows, providers=run.config.providers)
    gc.collect()
    return {name: h.astype(np.float32) for name, h in hessians.items()}


def _measures_sensitivity() -> bool:
    from sw_onnx import plan

    return plan.ALLOCATION_DAMAGE == "measured"


def _sensitivity(run: _Run, model: ir.Model) -> dict[str, float]:
    """KL of each layer's int4 round-to-nearest (super-activation rows and kept weights left exact) on the
    prompt, one layer at a time (`sw_onnx.analyze.sensitivity.layer_sensitivity`)."""
    from sw_onnx.analyze.sensitivity import layer_sensitivity
    from sw_onnx.discover import find_linear_layers
    from sw_onnx.kernels import dequantize_blockwise, quantize_blockwise
    from sw_onnx.plan import kernel_block_size

    clone = model.clone()
    layers, _ = find_linear_layers(clone)
    channels = {node: r.channels for r in (run.ranges or {}).values() for node in r.nodes}
    config = run.config

    def replacement(layer):
        if len(layer.weight.initializer.uses()) > 1:  # shared (a tied lm_head): the others would change too
            return None
        w = layer.weight.effective_weight()
        block = kernel_block_size(config.block_size, layer.k, config.format) or None
        q = dequantize_blockwise(quantize_blockwise(w, bits=config.bits, block_size=block, symmetric=config.symmetric))
        rows = [c for c in channels.get(layer.name, []) if 0 <= c < layer.k] if config.sa_keep_out else []
        q[rows] = w[rows]
        return q

    return layer_sensitivity(clone, layers, run.token_ids, replacement, providers=config.providers)


def _read_keep_report(run: _Run, path: Path) -> None:
    from sw_onnx.analyze.input_stats import importance_from_entries, ranges_from_entries
    from sw_onnx.coordinates import read_detect_report

    report = read_detect_report(path)
    run.keep_records = report.super_weights
    for key, entries, read in (("input_ranges", report.input_ranges, ranges_from_entries),
                               ("input_importance", report.input_importance, importance_from_entries)):
        if entries is None:  # older reports: calibrate instead
            continue
        try:
            setattr(run, "ranges" if key == "input_ranges" else "importance", read(entries))
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"--keep {path}: malformed {key} ({e})",
                             hint="write the report again with: sw-onnx detect MODEL --json REPORT.json") from None


def _accuracy_levels(run: _Run, model: ir.Model, detected) -> dict[str, int]:
    """From detection's first pass, or else one instrumented pass on a clone."""
    from sw_onnx.analyze.sensitivity import accuracy_levels
    from sw_onnx.detect import DetectConfig, Detector

    if detected is not None:
        layers, stats = detected.layers, detected.first_pass
    else:
        providers = list(run.config.providers) if run.config.providers else None
        detector = Detector(model.clone(), DetectConfig(providers=providers))
        layers, stats = detector.layers, detector.run(run.token_ids, {})
    return accuracy_levels(layers, stats.in_max, stats.in_row, ratio=run.config.sensitive_input_ratio,
                           kept_nodes=[r.get("node") for r in run.keep_records])


def _input_statistics(run: _Run, model: ir.Model, pristine: ir.Model) -> None:
    """Detection's input ranges and importance (checked against the model), or a calibration run on a clone
    of `pristine` (``calib_text``, or what detection or the report did not give)."""
    from sw_onnx.analyze.input_stats import calibrate_for_quantize

    config = run.config
    needs_ranges = config.activations != "none" or config.sa_keep_out
    if config.calib_text is None:
        if config.keep not in ("auto", "none"):  # a report's; detection's own are this model's by construction
            _check_report_statistics(run, model)
        if not (needs_ranges and run.ranges is None) and not (config.uses_importance and run.importance is None):
            return
    run.say("calibrating linear-layer inputs (super-activation entries, activation ranges, input importance)")
    ranges, importance = calibrate_for_quantize(run.src, run.token_ids, calib_text=config.calib_text,
                                                providers=config.providers, model=pristine.clone())
    if config.calib_text is not None or run.ranges is None:
        run.ranges = ranges
    if config.calib_text is not None or run.importance is None:
        run.importance = importance


def _check_report_statistics(run: _Run, model: ir.Model) -> None:
    """A report's input ranges and importance must name this model's linear layers, channels and widths."""
    from sw_onnx.discover import find_linear_layers

    widths = {layer.node_name: layer.k for layer in find_linear_layers(model)[0]}
    entries = [(r.nodes, r.k, r.channels) for r in (run.ranges or {}).values()]
    entries += [(i.nodes, i.k, []) for i in (run.importance or {}).values()]
    for nodes, k, channels in entries:
        if any(widths.get(node) != k or any(not 0 <= c < k for c in channels) for node in nodes):
            raise UsageError(f"--keep {run.config.keep}: its input statistics name {nodes[0]!r}, which is not a "
                             "linear layer of this model with those channels",
                             hint="the report is probably for another model")


def _upgrade_opset(run: _Run, model: ir.Model):
    """Raise the opset for QDQ; returns the activations' shape-inference hints when the bump left a
    weight-less copy to infer them from (else None: the planner infers them if it needs them)."""
    import onnx_ir as ir

    from sw_onnx.passes.opset import QDQ_MIN_OPSET, UpgradeOpsetPass
    from sw_onnx.shapes import value_types

    from_opset, method, structure = model.opset_imports.get("", None), "unchanged", None
    if run.config.format == "qdq":
        try:
            result = UpgradeOpsetPass(QDQ_MIN_OPSET)(model)
        except ir.passes.PassError as e:
            raise UnsupportedGraphError(str(e), hint="try --format nbits, which needs no opset change") from e
        method, structure = result.method, result.structure
        if method != "unchanged":
            run.say(f"opset {from_opset} -> {QDQ_MIN_OPSET} ({method})")
    run.opset = {"from": from_opset, "to": model.opset_imports.get(""), "method": method}
    return value_types(model, structure) if structure is not None else None


def _rewrite(run: _Run, model: ir.Model, plan: QuantPlan) -> None:
    """The passes, in order: channel keep-out, then the weights (or W8A8); each reads only the plan."""
    import onnx_ir as ir

    from sw_onnx.passes.keep_out_channels import KeepOutActivationChannelsPass
    from sw_onnx.passes.quantize_embeddings import QuantizeEmbeddingsPass
    from sw_onnx.passes.quantize_weights import QuantizeWeightsPass
    from sw_onnx.passes.w8a8 import QuantizeW8A8Pass

    if not plan.quantized:
        reasons = sorted({p.reason for p in plan.layers}) or ["no linear layer found"]
        raise UnsupportedGraphError(f"nothing to quantize: {'; '.join(reasons)[:300]}", hint="check --exclude and --lm-head")
    weights = QuantizeW8A8Pass(plan) if run.config.activations == "int8" else QuantizeWeightsPass(plan)
    ir.passes.Sequential(KeepOutActivationChannelsPass(plan), weights, QuantizeEmbeddingsPass(plan))(model)


def _summary(run: _Run, model: ir.Model, plan: QuantPlan) -> QuantizeSummary:
    kept_keys = {(p.initializer, tuple(k["index"])) for p in plan.quantized for k in p.kept}
    for record in run.keep_records:
        record["quantized_layer"] = (record["initializer"], tuple(record["index"])) in kept_keys
    summary = QuantizeSummary(
        input_path=str(run.src), output_path=str(run.out), config=run.config, opset=run.opset,
        keep_source=run.config.keep, kept=run.keep_records,
        unused_keep=[{"initializer": n, "index": list(i)} for n, i in plan.unused_keep],
        layers=plan.layers, embeddings=plan.embeddings, input_bytes=_model_bytes(run.src, model),
        input_sha256=run.input_sha256.result(),
    )
    model.metadata_props["sw_onnx.quantize"] = json.dumps(
        {"tool_version": __version__, "config": run.config.to_dict(),
         "kept_out": sum(len(p.kept) for p in plan.quantized), "input_sha256": summary.input_sha256}, sort_keys=True)
    return summary


def _verify(run: _Run, tmp: Path, plan: QuantPlan, summary: QuantizeSummary) -> None:
    from sw_onnx.verify import prepack_for_verification, verify_quantized

    t2 = time.perf_counter()
    run.say("verifying: onnx checker, onnxruntime fusion, logits vs the original")
    fused = [p.quantized_node for p in plan.quantized] if run.config.activations == "none" else []
    prepack = prepack_for_verification(sum(p.quantized_bytes for p in plan.quantized),
                                       max(p.k * p.n for p in plan.quantized))
    result = verify_quantized(tmp, run.src, fused, run.token_ids, providers=run.config.providers,
                              min_top1_agreement=run.config.min_top1_agreement, reference_logits=run.reference_logits,
                              input_dims=run.input_dims, prepack=prepack)
    summary.verification = result.to_dict()
    summary.seconds["verify"] = time.perf_counter() - t2
    if not result.passed:
        error = VerificationError(f"verification failed, nothing written to {run.out}: {'; '.join(result.failures)}",
                                  hint="rerun with --format nbits, or --no-verify to keep the unverified file")
        error.summary = summary  # type: ignore[attr-defined]
        raise error


def _unquantized_bytes(model: ir.Model) -> int:
    import onnx_ir as ir

    total = 0
    for value in model.graph.initializers.values():
        const = value.const_value
        if const is not None and not isinstance(const, ir.LazyTensor):
            total += int(math.prod(const.shape.numpy()) * const.dtype.itemsize)
    return total


def _model_bytes(src: Path, model: ir.Model) -> int:
    import onnx_ir as ir

    total, seen = file_bytes(src), set()
    for value in model.graph.initializers.values():
        const = value.const_value
        if isinstance(const, ir.ExternalTensor):
            path = Path(const.base_dir) / const.location
            if path not in seen and not _same_file(path, src):  # inline weights, mapped from the .onnx
                seen.add(path)
                total += file_bytes(path)
    return total


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class _Sha256InBackground:
    """The SHA-256 of a file, computed on a thread (hashlib and file reads release the GIL)."""

    def __init__(self, path: Path):
        import threading

        self.path, self._value = path, None
        self._thread = threading.Thread(target=self._run, name="sw-onnx-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = _sha256(self.path)
        except OSError:
            self._value = None

    def result(self) -> str:
        self._thread.join()
        return self._value if self._value is not None else _sha256(self.path)


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# ablate


@dataclass
class AblateResult:
    """Outcome of `ablate_model`: the weights changed (``before``/``after`` values) and files written."""

    input_path: str
    output_path: str
    scale: float
    weights: list[dict] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    source: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "schema": ABLATE_SCHEMA, "schema_version": SCHEMA_VERSION, "tool_version": __version__,
            "input": {"path": self.input_path}, "output": {"path": self.output_path}, "scale": self.scale,
            "source": self.source, "weights": self.weights, "copied": self.copied,
            "seconds": round(self.seconds, 3),
        }


def detect_coordinates(model, *, tokenizer=None, providers: Sequence[str] | None = None,
                       progress: Callable[[str], None] | None = None) -> list[Coordinate]:
    """Run detection (default prompt) on the model; its super weights' coordinates."""
    from sw_onnx.detect import DetectConfig

    result, _ = detect_model(model, DetectConfig(providers=list(providers) if providers else None),
                             tokenizer=tokenizer, progress=progress)
    return [(sw.initializer, tuple(sw.index)) for sw in result.super_weights]


def ablate_super_weights(input_path: str | os.PathLike, output_path: str | os.PathLike, *, keep: str = "auto",
                         scale: float = 0.0, tokenizer=None, providers: Sequence[str] | None = None, force: bool = False,
                         progress: Callable[[str], None] | None = None) -> AblateResult:
    """`ablate_model` on the super weights that detection finds (``keep="auto"``) or a detect report names.

    Raises:
        UsageError: a bad output (checked before detection), or `keep` neither ``auto`` nor a report file.
    """
    from sw_onnx.coordinates import read_detect_report
    from sw_onnx.io import resolve_model_path

    src = resolve_model_path(input_path)
    check_output(src, Path(output_path), force=force)  # fail before detection, not after
    if keep == "auto":
        from sw_onnx.detect import DetectConfig, detect
        from sw_onnx.inputs import prompt_token_ids
        from sw_onnx.io import load_model

        (progress or (lambda message: None))(f"detecting super weights in {src}")
        model = load_model(src)  # loaded once: detection instruments a clone
        ids, _ = prompt_token_ids(src, tokenizer=tokenizer)
        found = detect(model.clone(), ids, DetectConfig(providers=list(providers) if providers else None)).super_weights
        return _ablate(src, Path(output_path), model, [(sw.initializer, tuple(sw.index)) for sw in found], scale,
                       source="auto (sw-onnx detect)")
    if not Path(keep).is_file():
        raise UsageError(f"--keep {keep}: neither 'auto' nor an existing report file",
                         hint="pass auto, or a report written by `sw-onnx detect --json`")
    return ablate_model(src, output_path, read_detect_report(keep, "--keep").coordinates, scale, force=force, source=str(keep))


def ablate_model(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    coordinates: Iterable,
    scale: float = 0.0,
    *,
    force: bool = False,
    copy_sidecars: bool = True,
    source: str = "coordinates",
) -> AblateResult:
    """Write a copy of the model with the weight scalars at ``coordinates`` multiplied by ``scale``.

    The output is written atomically, never over the input or its external data. When it goes to another
    folder, the input folder's config/tokenizer files are copied beside it (unless already there), so that
    ``eval``/``generate`` work on it as they do on the input.

    Args:
        coordinates: (initializer name, index in the initializer's own layout), e.g. ``SuperWeight.index``.
        scale: the factor (0 prunes).
        force: replace an existing output.

    Raises:
        UsageError: no coordinates, a bad output, coordinates not in the model, a non-finite scale.
        ModelLoadError: the input is not a readable model.
    """
    from sw_onnx.io import load_model, resolve_model_path

    src, out = resolve_model_path(input_path), Path(output_path)
    check_output(src, out, force=force)
    return _ablate(src, out, load_model(src), coordinates, scale, source=source, copy_sidecars=copy_sidecars)


def _ablate(src: Path, out: Path, model: ir.Model, coordinates: Iterable, scale: float, *, source: str,
            copy_sidecars: bool = True) -> AblateResult:
    """Validate the coordinates, scale them (`ScaleWeightsPass`), save atomically, copy the sidecar files."""
    from sw_onnx.coordinates import validate_coordinates
    from sw_onnx.io import save_model
    from sw_onnx.passes.ablate import ScaleWeightsPass

    t0 = time.perf_counter()
    if not math.isfinite(scale):
        raise UsageError(f"--scale {scale}: use a finite number")
    coords = normalize_coordinates(coordinates)
    if not coords:
        raise UsageError("no weight to ablate (no super weight found or given)")
    coords = validate_coordinates(model, coords, source)
    before = {c: _scalar(model, c) for c in coords}
    ScaleWeightsPass(coords, scale)(model)
    weights = [{"initializer": name, "index": list(index), "before": before[(name, index)],
                "after": _scalar(model, (name, index))} for name, index in coords]
    save_model(model, out)
    copied = _copy_sidecars(src, out) if copy_sidecars else []
    return AblateResult(input_path=str(src), output_path=str(out), scale=float(scale), weights=weights,
                        copied=copied, source=source, seconds=time.perf_counter() - t0)


def _copy_sidecars(src: Path, out: Path) -> list[str]:
    import shutil

    copied = []
    if os.path.abspath(out.parent) != os.path.abspath(src.parent):
        for name in SIDECAR_FILES:
            if (src.parent / name).is_file() and not (out.parent / name).exists():
                shutil.copy2(src.parent / name, out.parent / name)
                copied.append(name)
    return copied


def _scalar(model: ir.Model, coordinate: Coordinate) -> float:
    name, index = coordinate
    return float(model.graph.initializers[name].const_value.numpy()[index])
