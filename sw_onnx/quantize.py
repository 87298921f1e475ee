"""Quantize an ONNX LLM's linear layers to int4/int8, keeping its super weights exact: the library entry.

`quantize_model` plans, rewrites, writes to a temporary file beside the target, verifies that file, and only
then renames it into place: a failed run leaves nothing at the target path, and the input is never written.

JSON summary schema ``sw-onnx/quantize``, version 1 (fields may be added; a rename or removal bumps it)::

    {"schema": "sw-onnx/quantize", "schema_version": 1, "tool_version": str,
     "input": {"path", "bytes", "sha256"}, "output": {"path", "bytes", "external_data"},
     "config": {every QuantizeConfig field, resolved},
     "opset": {"from", "to", "method": "unchanged" | "bumped" | "version_converter"},
     "keep": {"source": "auto" | "none" | <report path>, "super_weights": [{"node", "initializer", "index",
              "row", "col", "value", "quantized_layer": bool}], "unused": [...]},
     "layers": [{"node", "op_type", "initializer", "position", "layer", "k", "n", "action", "reason",
                 "form", "is_lm_head", "kept", "accuracy_level", "float_bytes", "quantized_bytes",
                 "quantized_node"}],
     "totals": {"linear_layers", "quantized", "skipped", "forms": {form: count}, "float_weight_bytes",
                "quantized_weight_bytes", "bits_per_weight"},
     "verification": VerifyResult.to_dict() | null, "seconds": {"detect", "rewrite_and_save", "verify", "total"}}
"""

from __future__ import annotations

import gc
import hashlib
import math
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from sw_onnx._version import __version__
from sw_onnx.errors import UnsupportedGraphError, UsageError, VerificationError

if TYPE_CHECKING:  # heavy imports stay out of `sw-onnx --help`
    import numpy as np
    import onnx_ir as ir

    from sw_onnx.passes.quantize import KeepCoordinate, LayerDecision

__all__ = ["QUANTIZE_SCHEMA", "QuantizeConfig", "QuantizeSummary", "default_output_path", "quantize_model"]

logger = logging.getLogger(__name__)

QUANTIZE_SCHEMA = "sw-onnx/quantize"
QUANTIZE_SCHEMA_VERSION = 1
CLIP_MODES = ("none", "zscore", "mse")
FORMATS = ("qdq", "nbits")
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@dataclass
class QuantizeConfig:
    """Quantization settings, shared by the API and the CLI (defaults live here only).

    The defaults are the best measured on SmolLM2-135M-Instruct (WikiText-2, 8 windows of 512, fp32 30.36;
    onnxruntime 1.32 CPU, default session: the QDQ weights fused into MatMulNBits at accuracy_level 4; the
    same 210 layers for both tools, lm_head float; ``python bench/quantize_quality.py``, all rows in
    docs/quantize_quality.md). sw-onnx rows are the defaults except for what they name:

    ==================================  =====  =====  =====  =====  =====  =====
    int4 perplexity                     b32    b64    b128   b256   b512   b1024
    ==================================  =====  =====  =====  =====  =====  =====
    onnxruntime RTN, symmetric          37.64  39.78  43.26  45.00  47.83  49.59
    onnxruntime RTN, asymmetric         39.18  40.93  41.85  43.30  46.82  47.78
    clip none (asymmetric min-max)      36.66  38.58  39.74  41.58  45.49  47.16
    symmetric (mse: symmetric range)    35.52  37.93  39.95  41.62  44.55  45.17
    **default**                         34.87  37.64  38.04  41.37  44.32  45.06
    default, sa_keep_out off            36.61  39.73  40.08  42.87  44.83  45.39
    ==================================  =====  =====  =====  =====  =====  =====

    int8: onnxruntime's 8-bit RTN only writes MatMulNBits with blocks up to 256: 31.21 (sym) / 30.82
    (asym) at b256; sw-onnx per-channel (``block_size=0``) 30.54 (222 MB vs 250 MB), b256 30.80.

    So: int4 with a zero point per block of 32 (5.125 bits per weight) and ``clip="mse"``: each block
    takes, of the min-max range and the symmetric range (largest-magnitude weight on the end code, as
    onnxruntime's symmetric RTN), each shrunk by 1, 0.975, ..., 0.8, the candidate of least w^2-weighted
    squared error (`sw_onnx.kernels.quantize_blockwise`; the asymmetric format holds both, and about 60%
    of SmolLM2's blocks pick min-max). Before, the default was symmetric with a 21-step shrink search of
    the symmetric range only (the "symmetric" row, with the grid cut to what it ever chose); it and plain
    asymmetric RTN both lose to the default at every block size. Super weights kept out
    (``keep="auto"``; with ``sa_keep_out`` their input rows already leave the int4 weight, so it changes
    nothing then, but it is what protects them without it). lm_head left float (quantizing it costs 5
    perplexity points here, and a tied lm_head's float weight stays for the embedding anyway).

    Attributes:
        bits: 4 or 8.
        block_size: weights per block along K: a power of two >= 16 (so onnxruntime fuses it), or 0 for
            per-channel (one scale per output channel over all of K: DequantizeLinear ``axis=1``, which
            onnxruntime also fuses; ``--format nbits`` writes it as one block of the next power of two >= K).
            A block larger than a layer's K is accepted and gives one block per column for that layer (the
            same numbers as per-channel, written with the block size as given, as onnxruntime's quantizer
            does), so one size fits models whose layers differ in K.
        symmetric: signed codes, scale ``m / -2**(bits-1)``, no zero point; else unsigned codes with a zero
            point per block (default: it holds both range shapes, see above).
        clip: ``"none"`` (min-max round-to-nearest, as onnxruntime), ``"zscore"`` (clamp ``|w|`` at
            ``mean + z*std`` per block, the paper's Eq. 2) or ``"mse"`` (w^2-weighted error search over
            shrunk min-max and, when asymmetric, symmetric ranges).
        zscore: z for ``clip="zscore"`` (None: `sw_onnx.kernels.DEFAULT_ZSCORE`).
        keep: ``"auto"`` (run detection first), ``"none"``, or the path of a ``sw-onnx detect --json``
            report.
        exclude: node-name glob patterns of linear layers to leave float.
        include_lm_head: quantize the lm_head (the layer whose output is the logits) too.
        format: ``"qdq"`` (standard ONNX DequantizeLinear + MatMul, opset 21, fused by onnxruntime) or
            ``"nbits"`` (com.microsoft MatMulNBits written directly, per-node accuracy_level).
        verify: check the written model (checker, fusion, logits) before publishing it.
        force: overwrite an existing output.
        providers: onnxruntime providers for detection and the logits comparison (None: CPU).
        min_top1_agreement: verification fails below this top-1 agreement with the original (None: report
            only).
        sensitive_input_ratio: nbits only: a layer whose input has a channel (max |x| over the prompt) or,
            at its peak token, an entry this many times above the median carries a super activation and
            gets accuracy_level 1 (fp32 activations); the others get 4 (int8 activations).
        activations: ``"none"`` (weight-only) or ``"int8"``: W8A8 QDQ, int8 per-channel weights and int8
            per-tensor static activation scales (`sw_onnx.passes.activations`; needs ``bits=8``).
        calib_text: UTF-8 text whose first 2,048 tokens calibrate the activation ranges and the
            super-activation channels (None: the detection prompt, data-free).
        sa_keep_out: keep super-activation entries out of activation quantization. int4/int8 weight-only:
            their input channels leave the MatMul (and its int8 activation blocks at accuracy_level 4) and
            come back exactly, with their weight rows in float, on a side path (SmolLM2-135M int4 b32:
            35.52 vs 37.49 without; docs/activation_quant.md). W8A8: replaced by the median before
            quantization and restored exactly after (paper Eq. 1); off is the naive W8A8.
        lm_head_bits: weight-only, without ``include_lm_head``: the lm_head's own bits, in blocks of
            `sw_onnx.passes.quantize.LM_HEAD_BLOCK_SIZE` (8: onnxruntime fuses it into MatMulNBits
            ``bits=8``; 0 keeps it float).
            As llama.cpp keeps its output tensor at 6 bits: the lm_head is 21% of SmolLM2-135M's weights;
            at 8 bits, perplexity 34.86 vs 34.87 float (int4 b32 default; 4 bits: 37.62) and KV-cache
            decoding 0.49x fp32 instead of 0.63x (block 128, ``bench/inference_speed.py``).
            A tied lm_head's float table stays for the embedding (+33 MB on disk here).
    """

    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    clip: str = "mse"
    zscore: float | None = None
    keep: str = "auto"
    exclude: tuple[str, ...] = ()
    include_lm_head: bool = False
    format: str = "qdq"
    verify: bool = True
    force: bool = False
    providers: tuple[str, ...] | None = None
    min_top1_agreement: float | None = None
    sensitive_input_ratio: float = 100.0
    activations: str = "none"
    calib_text: str | None = None
    sa_keep_out: bool = True
    lm_head_bits: int = 8

    def validate(self) -> None:
        """Raise `UsageError` on a bad value or combination (nothing is silently overridden)."""
        if self.bits not in (4, 8):
            raise UsageError(f"--bits {self.bits}: use 4 or 8")
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or (bs != 0 and (bs < 16 or bs & (bs - 1))):
            raise UsageError(f"--block-size {bs}: use a power of two >= 16 (what MatMulNBits accepts), "
                             "or 0 for per-channel")
        if self.clip not in CLIP_MODES:
            raise UsageError(f"--clip {self.clip}: use one of {', '.join(CLIP_MODES)} (zscore:Z sets z)")
        if self.zscore is not None and (self.clip != "zscore" or not math.isfinite(self.zscore) or self.zscore < 0):
            raise UsageError(f"zscore {self.zscore}: only with --clip zscore, a finite number >= 0")
        if self.format not in FORMATS:
            raise UsageError(f"--format {self.format}: use one of {', '.join(FORMATS)}")
        if not self.keep:
            raise UsageError("--keep: use auto, none or the path of a sw-onnx detect --json report")
        if self.min_top1_agreement is not None and not 0 <= self.min_top1_agreement <= 1:
            raise UsageError(f"min_top1_agreement {self.min_top1_agreement}: a fraction in [0, 1]")
        if self.activations not in ("none", "int8"):
            raise UsageError(f"--activations {self.activations}: use none or int8")
        if self.activations == "int8" and (self.bits != 8 or self.format != "qdq"):
            raise UsageError("--activations int8 is W8A8 QDQ: it needs --bits 8 and --format qdq",
                             hint="sw-onnx quantize MODEL --bits 8 --activations int8")
        if self.lm_head_bits not in (0, 4, 8):
            raise UsageError(f"--lm-head-bits {self.lm_head_bits}: use 8, 4, or 0 to keep the lm_head float")
        if self.calib_text is not None and self.activations == "none" and not self.sa_keep_out:
            raise UsageError("--calib-text is only used by --activations int8 or --sa-keep-out")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        d["providers"] = list(self.providers) if self.providers else None
        return d


@dataclass
class QuantizeSummary:
    """What `quantize_model` did (see the module docstring for its JSON form, `to_dict`).

    Attributes:
        input_path, output_path: the files.
        config: the resolved configuration.
        opset: ``{"from", "to", "method"}``.
        keep_source: ``"auto"``, ``"none"`` or the report's path.
        kept: the super weights asked to be kept out, with ``quantized_layer`` telling whether their layer
            was quantized (otherwise they simply stay float with it).
        unused_keep: keep coordinates matching no quantized layer.
        layers: one decision per linear layer.
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
    layers: list[LayerDecision]
    input_bytes: int = 0
    output_bytes: int = 0
    input_sha256: str = ""
    external_data: bool = False
    verification: dict | None = None
    seconds: dict = field(default_factory=dict)

    @property
    def quantized(self) -> list[LayerDecision]:
        return [d for d in self.layers if d.action == "quantized"]

    @property
    def skipped(self) -> list[LayerDecision]:
        return [d for d in self.layers if d.action != "quantized"]

    def totals(self) -> dict:
        q = self.quantized
        forms: dict[str, int] = {}
        for d in q:
            forms[d.form] = forms.get(d.form, 0) + 1
        float_bytes = sum(d.float_bytes for d in q)
        quant_bytes = sum(d.quantized_bytes for d in q)
        weights = sum(d.k * d.n for d in q)
        return {
            "linear_layers": len(self.layers),
            "quantized": len(q),
            "skipped": len(self.layers) - len(q),
            "forms": forms,
            "kept_out": sum(len(d.kept) for d in q),
            "float_weight_bytes": float_bytes,
            "quantized_weight_bytes": quant_bytes,
            "bits_per_weight": round(8 * quant_bytes / weights, 3) if weights else None,
        }

    def to_dict(self) -> dict:
        return {
            "schema": QUANTIZE_SCHEMA,
            "schema_version": QUANTIZE_SCHEMA_VERSION,
            "tool_version": __version__,
            "input": {"path": self.input_path, "bytes": self.input_bytes, "sha256": self.input_sha256},
            "output": {"path": self.output_path, "bytes": self.output_bytes, "external_data": self.external_data},
            "config": self.config.to_dict(),
            "opset": self.opset,
            "keep": {"source": self.keep_source, "super_weights": self.kept, "unused": self.unused_keep},
            "layers": [asdict(d) for d in self.layers],
            "totals": self.totals(),
            "verification": self.verification,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
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


def quantize_model(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    config: QuantizeConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> QuantizeSummary:
    """Quantize the model at `input_path` and write it to `output_path` (default: `default_output_path`).

    Args:
        input_path: an .onnx file or an export folder holding model.onnx.
        output_path: the .onnx to write (its weights go to ``<output>.data`` when the input used external
            data or the output would pass 1.8 GB).
        config: settings (default `QuantizeConfig()`).
        progress: called with a short message at each step.

    Returns:
        The summary.

    Raises:
        UsageError: bad settings, output == input, an existing output without ``force``, a bad keep report.
        ModelLoadError: the input is not a readable model.
        UnsupportedGraphError: nothing to quantize, or the opset cannot be raised.
        VerificationError: the written model failed verification; nothing was published. The summary is
            attached as ``error.summary``.

    Example:
        >>> summary = quantize_model("model.onnx", config=QuantizeConfig(keep="none"))  # doctest: +SKIP
        >>> summary.output_path  # doctest: +SKIP
        'model.uint4-b32.onnx'
    """
    import onnx_ir as ir

    from sw_onnx.io import load_model, resolve_model_path, save_model, stores_weights_externally
    from sw_onnx.passes.quantize import QDQ_MIN_OPSET, QuantizeWeightsPass, UpgradeOpsetPass

    config = config or QuantizeConfig()
    config.validate()
    say = progress or (lambda message: None)
    started = time.perf_counter()
    src = resolve_model_path(input_path)
    out = Path(output_path) if output_path is not None else default_output_path(src, config)
    _check_output(src, out, config)
    input_sha256 = _Sha256InBackground(src)  # hashing a large inline model overlaps the work below

    token_ids, _ = _token_ids(src)
    t0 = time.perf_counter()
    keep_records: list[dict] = []
    detected_ranges = None  # linear-layer input ranges measured by detection on the same prompt
    reference_logits = None  # and the original's logits there: verification's reference
    if config.keep == "auto":
        say("detecting super weights (keep=auto)")
        keep_records, detected_ranges, reference_logits = _detect_keep(src, token_ids, config)
    elif config.keep != "none":
        keep_records, detected_ranges = _read_keep_report(Path(config.keep))
    detect_seconds = time.perf_counter() - t0

    say(f"loading {src}")
    model = load_model(src)
    from sw_onnx.discover import require_float_model

    require_float_model(model)  # "already quantized": refused
    input_external = stores_weights_externally(model)
    input_bytes = _model_bytes(src, model)
    keep = _validate_keep(model, keep_records, config.keep)

    accuracy_levels: dict[str, int] = {}
    if config.format == "nbits":
        say("measuring layer inputs for accuracy_level (nbits)")
        t_sens = time.perf_counter()
        accuracy_levels = _sensitive_layers(src, token_ids, config, keep_records)
        detect_seconds += time.perf_counter() - t_sens
    ranges = None
    if config.activations != "none" or config.sa_keep_out:  # sw_onnx.passes.activations
        if detected_ranges is not None and config.calib_text is None:
            ranges = _check_ranges(model, detected_ranges, config.keep)  # detection already measured them
        else:
            from sw_onnx.passes.activations import calibrate_for_quantize

            say("calibrating linear-layer inputs (super-activation entries, activation ranges)")
            t_cal = time.perf_counter()
            ranges = calibrate_for_quantize(src, token_ids, calib_text=config.calib_text, providers=config.providers)
            detect_seconds += time.perf_counter() - t_cal

    t1 = time.perf_counter()
    upgrade = UpgradeOpsetPass(QDQ_MIN_OPSET)
    from_opset = model.opset_imports.get("", None)
    if config.format == "qdq":
        try:
            upgrade(model)
        except ir.passes.PassError as e:
            raise UnsupportedGraphError(str(e), hint="try --format nbits, which needs no opset change") from e
        if upgrade.method != "unchanged":
            say(f"opset {from_opset} -> {QDQ_MIN_OPSET} ({upgrade.method})")
    sa_pass = None
    if config.activations == "int8":
        from sw_onnx.passes.activations import QuantizeW8A8Pass

        qpass = QuantizeW8A8Pass(ranges, handle_super_activations=config.sa_keep_out, symmetric=config.symmetric,
                                 clip=config.clip, zscore=config.zscore, keep=keep, exclude=config.exclude,
                                 include_lm_head=config.include_lm_head)
    else:
        if config.sa_keep_out:
            from sw_onnx.passes.activations import KeepOutActivationChannelsPass, channels_by_node

            sa_pass = KeepOutActivationChannelsPass(channels_by_node(ranges), exclude=config.exclude,
                                                    include_lm_head=config.include_lm_head)
            sa_pass(model)
            keep = sa_pass.uncovered(keep, model)
        qpass = QuantizeWeightsPass(
            bits=config.bits, block_size=config.block_size, symmetric=config.symmetric, clip=config.clip,
            zscore=config.zscore, keep=keep, exclude=config.exclude, include_lm_head=config.include_lm_head,
            lm_head_bits=config.lm_head_bits, format=config.format, accuracy_levels=accuracy_levels,
            structure=upgrade.structure if sa_pass is None else None,  # still the graph as it is
        )
    qpass(model)
    if sa_pass is not None:
        sa_pass.annotate(qpass.decisions)
    decisions = qpass.decisions
    quantized = [d for d in decisions if d.action == "quantized"]
    if not quantized:
        reasons = sorted({d.reason for d in decisions}) or ["no linear layer found"]
        raise UnsupportedGraphError(f"nothing to quantize: {'; '.join(reasons)[:300]}",
                                    hint="check --exclude and --lm-head")
    kept_keys = {(d.initializer, tuple(k["index"])) for d in quantized for k in d.kept}
    for record in keep_records:
        record["quantized_layer"] = (record["initializer"], tuple(record["index"])) in kept_keys

    summary = QuantizeSummary(
        input_path=str(src), output_path=str(out), config=config,
        opset={"from": from_opset, "to": model.opset_imports.get(""), "method": upgrade.method},
        keep_source=config.keep, kept=keep_records,
        unused_keep=[{"initializer": n, "index": list(i)} for n, i in qpass.unused_keep],
        layers=decisions, input_bytes=input_bytes, input_sha256=input_sha256.result(),
    )
    model.metadata_props["sw_onnx.quantize"] = json.dumps(
        {"tool_version": __version__, "config": config.to_dict(), "kept_out": sum(len(d.kept) for d in quantized),
         "input_sha256": summary.input_sha256}, sort_keys=True)

    estimated = sum(d.quantized_bytes for d in quantized) + _unquantized_bytes(model)
    external = input_external or estimated > _EXTERNAL_DATA_THRESHOLD
    summary.external_data = external
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp = tmp_dir / out.name
        say(f"quantizing {len(quantized)} of {len(decisions)} linear layers and writing")
        save_model(model, tmp, external_data=external)
        del model, qpass, upgrade
        if config.verify:
            gc.collect()  # the graph's node/value cycles hold the source weights; free them before sessions
        summary.seconds["rewrite_and_save"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        if config.verify:
            from sw_onnx.verify import verify_quantized

            say("verifying: onnx checker, onnxruntime fusion, logits vs the original")
            result = verify_quantized(
                tmp, src, [d.quantized_node for d in quantized] if config.activations == "none" else [], token_ids,
                providers=config.providers, min_top1_agreement=config.min_top1_agreement,
                reference_logits=reference_logits,
            )
            summary.verification = result.to_dict()
            summary.seconds["verify"] = time.perf_counter() - t2
            if not result.passed:
                error = VerificationError(
                    f"verification failed, nothing written to {out}: {'; '.join(result.failures)}",
                    hint="rerun with --format nbits, or --no-verify to keep the unverified file",
                )
                error.summary = summary  # type: ignore[attr-defined]
                raise error
        _publish(tmp, out, external)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    summary.output_bytes = _file_bytes(out) + _file_bytes(_data_path(out))
    summary.seconds["detect"] = detect_seconds
    summary.seconds["total"] = time.perf_counter() - started
    say(f"wrote {out}")
    return summary


# ----------------------------------------------------------------------------------------------


def _check_output(src: Path, out: Path, config: QuantizeConfig) -> None:
    if out.suffix != ".onnx":
        raise UsageError(f"-o {out}: the output must be an .onnx file")
    if out.exists() and out.is_dir():
        raise UsageError(f"-o {out}: is a folder", hint="name the .onnx file to write")
    if out.resolve() == src.resolve() or _data_path(out).resolve() == src.resolve():
        raise UsageError(f"-o {out}: would overwrite the input", hint="choose another output name")
    if not out.parent.is_dir():
        what = "is not a folder" if out.parent.exists() else "does not exist"
        raise UsageError(f"-o {out}: folder {out.parent} {what}", hint="create it, or write somewhere else")
    if out.exists() and not config.force:
        raise UsageError(f"{out} already exists", hint="pass --force to overwrite it")
    data = _data_path(out).resolve()
    # Only an existing file in the input's folder can be the input's external data; parsing the input (all
    # of it, for an inline model) is needed only then.
    maybe_input_data = data.is_file() and data.is_relative_to(src.parent.resolve())
    for location in (_external_locations(src) if maybe_input_data else ()):
        if location == data:
            raise UsageError(f"-o {out}: its weights file {data.name} is the input's external data",
                             hint="choose another output name")


def _data_path(out: Path) -> Path:
    return out.with_name(out.name + ".data")


def _external_locations(src: Path) -> set[Path]:
    import onnx

    try:
        proto = onnx.load(str(src), load_external_data=False)
    except Exception:
        return set()
    found = set()
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    found.add((src.parent / entry.value).resolve())
    return found


def _publish(tmp: Path, out: Path, external: bool) -> None:
    """Move the verified files into place: weights first, then the .onnx that names them (all or nothing:
    `sw_onnx.io.publish` restores a previous output if a rename fails)."""
    from sw_onnx.io import publish

    tmp_data = _data_path(tmp)
    publish(([(tmp_data, _data_path(out))] if tmp_data.exists() else []) + [(tmp, out)])
    if not external and _data_path(out).exists():
        # A previous (--force-overwritten) output's weights file: nothing refers to it now.
        _data_path(out).unlink()


def _token_ids(src: Path) -> tuple[np.ndarray, str]:
    from sw_onnx.inputs import prompt_token_ids

    return prompt_token_ids(src)


def _detect_keep(src: Path, token_ids: np.ndarray, config: QuantizeConfig) -> list[dict]:
    from sw_onnx.detect import DetectConfig, detect
    from sw_onnx.io import load_model

    fresh = load_model(src)
    providers = list(config.providers) if config.providers else None
    result = detect(fresh, token_ids, DetectConfig(providers=providers))
    records = [_keep_record(sw.node, sw.initializer, sw.index, sw.row, sw.col, sw.value) for sw in result.super_weights]
    return records, result.input_ranges, result.reference_logits


def _keep_record(node, initializer, index, row, col, value) -> dict:
    return {"node": node, "initializer": initializer, "index": [int(i) for i in index],
            "row": row, "col": col, "value": value}


def _read_keep_report(path: Path) -> list[dict]:
    from sw_onnx.report import DETECT_SCHEMA

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--keep {path}: no such file", hint="use auto, none, or a sw-onnx detect --json report") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--keep {path}: not readable JSON ({e})") from e
    if not isinstance(data, dict) or data.get("schema") != DETECT_SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise UsageError(f"--keep {path}: not a sw-onnx detect report (schema {found!r}, expected {DETECT_SCHEMA!r})",
                         hint="write one with: sw-onnx detect MODEL --json REPORT.json")
    records = []
    for i, sw in enumerate(data.get("super_weights") or []):
        if not isinstance(sw, dict) or not isinstance(sw.get("initializer"), str) or not isinstance(sw.get("index"), list):
            raise UsageError(f"--keep {path}: super_weights[{i}] lacks an initializer name and index")
        records.append(_keep_record(sw.get("node"), sw["initializer"], sw["index"], sw.get("row"), sw.get("col"), sw.get("value")))
    ranges = None
    if data.get("input_ranges") is not None:  # reports before sw-onnx 0.1.0's input_ranges: calibrate instead
        from sw_onnx.passes.activations import InputRange

        try:
            ranges = {}
            for entry in data["input_ranges"]:
                r = InputRange(**{f.name: entry[f.name] for f in fields(InputRange)})
                r.channels = [int(c) for c in r.channels]
                ranges[r.value] = r
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"--keep {path}: malformed input_ranges ({e})",
                             hint="write the report again with: sw-onnx detect MODEL --json REPORT.json") from None
    return records, ranges


def _check_ranges(model: ir.Model, ranges: dict, source: str) -> dict:
    """Input ranges from detection must name this model's linear layers and channels within their inputs."""
    from sw_onnx.discover import find_linear_layers

    widths = {layer.name: layer.k for layer in find_linear_layers(model)[0]}
    for r in ranges.values():
        for node in r.nodes:
            if node not in widths or any(not 0 <= c < widths[node] for c in r.channels):
                raise UsageError(f"--keep {source}: its input_ranges name {node!r}, which is not a linear layer "
                                 "of this model with those channels", hint="the report is probably for another model")
    return ranges


def _validate_keep(model: ir.Model, records: list[dict], source: str) -> list[KeepCoordinate]:
    """Check that every kept weight exists in the model (and holds the reported value)."""
    import numpy as np

    keep = []
    for record in records:
        name, index = record["initializer"], tuple(record["index"])
        value = model.graph.initializers.get(name)
        if value is None or value.const_value is None:
            raise UsageError(f"--keep {source}: the model has no initializer {name!r}",
                             hint="the report is probably for another model")
        shape = tuple(value.const_value.shape.numpy())
        if len(index) != len(shape) or any(not 0 <= i < s for i, s in zip(index, shape)):
            raise UsageError(f"--keep {source}: index {list(index)} is outside {name} of shape {list(shape)}",
                             hint="the report is probably for another model")
        if record.get("value") is not None and source not in ("auto", "none"):
            actual = float(np.asarray(value.const_value.numpy()[index], dtype=np.float64))
            if not np.isclose(actual, float(record["value"]), rtol=1e-3, atol=1e-6):
                raise UsageError(f"--keep {source}: {name}{list(index)} is {actual:.6g} in the model, "
                                 f"{float(record['value']):.6g} in the report", hint="the report is for another model")
        keep.append((name, index))
    return keep


def _sensitive_layers(src: Path, token_ids: np.ndarray, config: QuantizeConfig, keep_records: list[dict]) -> dict[str, int]:
    """accuracy_level per node for the nbits format: 1 where the input carries a super activation.

    At accuracy_level 4 onnxruntime quantizes activations to int8 per K-block with ``scale = max|a| / 127``:
    inputs far below a block's largest one lose their precision. One instrumented onnxruntime pass on the
    prompt gives each layer's per-channel max |input| over tokens and its input row at its peak token; a
    layer whose largest channel (or largest entry of that row) is `config.sensitive_input_ratio` times the
    median gets 1 (fp32 activations), as does a layer holding a kept super weight (its input is the spike);
    every other layer 4. On SmolLM2-135M this flags 20 of 210 layers: the down_proj layers with input
    spikes and the last layers' gate/up, whose normalized input holds the super activation; the residual
    readers of the middle layers do not see it as an outlier (their norm weights damp it).
    """
    import numpy as np

    from sw_onnx.detect import DetectConfig, Detector
    from sw_onnx.io import load_model

    providers = list(config.providers) if config.providers else None
    detector = Detector(load_model(src), DetectConfig(providers=providers))
    stats = detector.run_pass(token_ids, {})
    levels = {}
    kept_nodes = {r.get("node") for r in keep_records}
    tiny = float(np.finfo(np.float32).tiny)
    for layer in detector.layers:
        in_max = stats.in_max[layer.position]
        row = np.abs(stats.in_row[layer.position])
        ratio = max(float(in_max.max()) / max(float(np.median(in_max)), tiny),
                    float(row.max()) / max(float(np.median(row)), tiny))
        levels[layer.name] = 1 if ratio >= config.sensitive_input_ratio or layer.name in kept_nodes else 4
    return levels


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

    total = _file_bytes(src)
    seen = set()
    for value in model.graph.initializers.values():
        const = value.const_value
        if isinstance(const, ir.ExternalTensor):
            path = Path(const.base_dir) / const.location
            if path not in seen and not _same_file(path, src):  # inline weights, mapped from the .onnx
                seen.add(path)
                total += _file_bytes(path)
    return total


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _file_bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class _Sha256InBackground:
    """`_sha256` of a file computed on a thread (hashlib and file reads release the GIL)."""

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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
