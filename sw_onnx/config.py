"""Quantization settings: `QuantizeConfig`, what the CLI's options and the Python API share."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from sw_onnx.errors import UsageError

__all__ = ["ALLOCATIONS", "CLIP_MODES", "ERROR_WEIGHTS", "FORMATS", "LM_HEAD_BLOCK_SIZE", "PER_CHANNEL", "QuantizeConfig"]

CLIP_MODES = ("none", "zscore", "mse")
ERROR_WEIGHTS = ("w2", "x2", "w2x2", "x2rms")
ALLOCATIONS = ("damage", "kquant")
FORMATS = ("qdq", "nbits")
LM_HEAD_BLOCK_SIZE = 32
"""Block of ``lm_head_bits``: 8-bit b32 cost nothing measurable on SmolLM2 (b128: +0.15 perplexity)."""
PER_CHANNEL = 0
"""``block_size`` value meaning one scale per output channel (DequantizeLinear ``axis=1``)."""


@dataclass
class QuantizeConfig:
    """Quantization settings, shared by the API and the CLI (defaults live here only).

    Defaults: int4 with a zero point per block of 32 (5.125 bits per weight with fp32 scales), ``clip="mse"``
    (per block, the candidate of least importance-weighted squared error among the min-max and symmetric ranges,
    each shrunk by 1, 0.95, ..., 0.8, then 2 rounds of least-squares scale refit; int8: 9 factors, no refit),
    ``error_weight="x2"`` (each weight's error weighted by its input channel's E[x^2], measured data-free on the
    detection prompt without its first token), super weights and super-activation input channels kept out, the
    lm_head at 8 bits (round-to-nearest), embedding tables at 8 bits (one table shared with a tied lm_head).
    Chosen by the worst case over SmolLM2-135M and Gemma-3-270M, each as exported (weights on a GGUF 4-bit
    grid) and off the grid (`sample_models/offgrid.py`). WikiText-2 perplexity, lm_head float, default vs the best onnxruntime RTN at
    the same block, b32 / b128: SmolLM2 exported 39.82 / 43.58 vs 45.46 / 50.15, off the grid 40.35 / 42.23 vs
    43.21 / 46.55 (16 windows, fp32 36.00); Gemma-3 exported 26.80 / 31.01 vs 28.99 / 37.79, off the grid
    27.24 / 30.61 vs 29.49 / 37.47 (8 windows, BOS + 511, fp32 23.46). Whole default outputs: SmolLM2 97.8 MiB
    at 39.78 (205.8 MiB with the embedding float), Gemma-3 247.5 MiB at 26.88 (887.5); the refit's arithmetic
    changed after the tables (within 0.1% either way, docs/quantize_defaults.md). docs/quantize_quality.md
    has the bench (blocks 32-256, onnxruntime's quantizers, budgets), docs/quantize_defaults.md every variant
    tried and what lost (GPTQ, AWQ-style scale migration, float zero points).

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
        error_weight: what ``clip="mse"`` weights each weight's squared rounding error by: ``"w2"`` (its
            own square: protects the large weights), ``"x2"`` (its input channel's importance E[x_k^2],
            as llama.cpp's imatrix), ``"w2x2"`` (their product) or ``"x2rms"`` (the importance times
            ``sqrt(2 mean(w^2) + w^2)`` over the block, as llama.cpp's k-quants weight an imatrix). The
            importance is measured by detection's
            first pass on the prompt (data-free), or on ``calib_text`` when given.
        bits_per_weight: a budget (e.g. 4.5): layers go from int4 at ``block_size`` to int4 at a smaller block
            or to int8 where that buys the most, until the bits per weight (`sw_onnx.plan.layer_bits`: codes,
            scales, zero points, side paths, over every quantized weight) reach it (None: every layer at
            ``bits``). The lm_head takes part (from int4) unless ``lm_head_bits`` is 0.
        allocation: with a budget: ``"damage"`` (estimated damage per extra bit: each option's int4/int8
            rounding error weighted by the input importance) or ``"kquant"`` (llama.cpp's use_more_bits rule,
            as onnxruntime-genai's k_quant_mixed: qkv and down_proj of layers i < n/8, i >= 7n/8,
            (i - n/8) % 3 == 2 and the lm_head at 8 bits, in that order while the budget lasts; without
            a budget, the whole rule).
        embedding_bits: 0 (float), 4 or 8: weight-only: embedding tables (a Gather's float initializer, or its
            Transpose) become ``com.microsoft::GatherBlockQuantized``, blockwise along the hidden axis in blocks
            of ``lm_head_block_size``. None (the default): 8 for weight-only quantization, float with W8A8 or a
            ``bits_per_weight`` budget (SmolLM2's output 205.8 -> 97.8 MiB, Gemma-3's 887.5 -> 247.5 MiB, at
            the same perplexity: docs/quantize_defaults.md). A table that a float lm_head also reads stays float
            (quantizing it would add a table). A table tied to a quantized lm_head at the same bits (also one
            exported as an equal copy) is shared with it: one set of codes and scales for both; with a bit
            budget the embedding always follows the lm_head. Counted in the bits per weight and the budget.
        gptq: GPTQ error compensation (`sw_onnx.kernels.quantize_gptq`): each layer's rows are quantized in
            order and each row's rounding error pushed onto the rows not yet quantized through the Hessian
            ``X^T X`` of its inputs, from ``calib_text`` (its first 2,048 tokens) or else the detection prompt
            (a few tokens: far fewer than the layers' K, see docs/quantize_quality.md). One K x K matrix per
            layer input is held while quantizing (SmolLM2: about 400 MB).
        lm_head_block_size: the block of ``lm_head_bits`` and of embedding tables (a power of two >= 16).
        lm_head_bits: weight-only, without ``include_lm_head``: the lm_head's own bits, in blocks of
            ``lm_head_block_size`` (8: onnxruntime fuses it into MatMulNBits ``bits=8``; 0 keeps it float),
            as llama.cpp keeps its output tensor at higher precision (docs/quantize_defaults.md).
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
    error_weight: str = "x2"
    bits_per_weight: float | None = None
    allocation: str = "damage"
    embedding_bits: int | None = None
    lm_head_block_size: int = LM_HEAD_BLOCK_SIZE
    gptq: bool = False

    @property
    def embedding_table_bits(self) -> int:
        """The bits embedding tables get: ``embedding_bits``, or by default 8 for weight-only quantization
        without a bit budget (W8A8 and ``bits_per_weight`` keep them float unless asked: a budget then means
        the linear layers' bits, as in every bench table)."""
        if self.embedding_bits is None:
            return 8 if self.activations == "none" and self.bits_per_weight is None else 0
        return self.embedding_bits

    @property
    def allocates(self) -> bool:
        """Whether the plan chooses per-layer bits (a budget, or the k_quant rule)."""
        return self.bits_per_weight is not None or self.allocation == "kquant"

    @property
    def uses_importance(self) -> bool:
        """Whether the plan needs the layers' input importance (E[x^2] per input channel)."""
        if self.activations != "none":
            return False
        return (self.clip == "mse" and "x2" in self.error_weight) or (self.allocates and self.allocation == "damage")

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
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"--allocation {self.allocation}: use one of {', '.join(ALLOCATIONS)}")
        bpw = self.bits_per_weight
        if bpw is not None and (isinstance(bpw, bool) or not isinstance(bpw, (int, float)) or not 1 <= bpw <= 32):
            raise UsageError(f"--bits-per-weight {bpw}: a number of bits, e.g. 4.5")
        if self.allocates and (self.bits != 4 or self.activations != "none"):
            raise UsageError("--bits-per-weight and --allocation kquant raise int4 layers to int8: they need --bits 4 "
                             "and weight-only quantization")
        hb = self.lm_head_block_size
        if isinstance(hb, bool) or not isinstance(hb, int) or hb < 16 or hb & (hb - 1):
            raise UsageError(f"--lm-head-block-size {hb}: use a power of two >= 16")
        if self.embedding_bits not in (None, 0, 4, 8):
            raise UsageError(f"--embedding-bits {self.embedding_bits}: use 4, 8, or 0 to keep embeddings float")
        if self.embedding_bits and self.activations != "none":
            raise UsageError("--embedding-bits is for weight-only quantization")
        if self.gptq and (self.activations != "none" or self.clip == "zscore"):
            raise UsageError("--gptq is for weight-only quantization with --clip none or mse")
        if self.error_weight not in ERROR_WEIGHTS:
            raise UsageError(f"--error-weight {self.error_weight}: use one of {', '.join(ERROR_WEIGHTS)}")
        if self.calib_text is not None and self.activations == "none" and not self.sa_keep_out and not self.uses_importance \
                and not self.gptq:
            raise UsageError("--calib-text is only used by --activations int8, --sa-keep-out or an input-importance "
                             "error weight (--error-weight x2|w2x2)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        d["providers"] = list(self.providers) if self.providers else None
        return d
