"""The `sw-onnx` command line: parses arguments, calls the library, maps its errors to exit codes.

Every failure ends in exactly one line on stderr, ``error: <what is wrong> (hint: <what to do>)``, and one of
these exit codes (`sw_onnx.errors`); tracebacks only with ``SW_ONNX_DEBUG=1``:

====  ==============================================================================================
0     success (also "No super weight found.")
1     the model: missing, not ONNX, corrupt, unsafe or broken external data, unsupported opset, no linear
      layer, already quantized, onnxruntime cannot run it
2     usage: bad option or combination (also click's own parsing errors), output == input, output exists
      without --force, output folder missing, a --keep report for another model
3     verification of the written model failed; nothing was published
4     an output could not be written (disk full, permission, read-only): nothing partial is left and a
      previous file at that path is unchanged; also any other OS-level I/O error
5     internal error (a bug: please report it with the SW_ONNX_DEBUG=1 traceback)
130   interrupted
====  ==============================================================================================

Inputs are only read. ``--json`` output is deterministic (same input and options, same bytes): its timing
fields (every ``"seconds"``) are null unless ``--timings``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from sw_onnx import _cli_measure
from sw_onnx._cli_common import ModelArg, ProviderOpt, TokenizerOpt, execution_providers, progress, write_json
from sw_onnx._version import __version__
from sw_onnx.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_MODEL, EXIT_OUTPUT, SwOnnxError, UsageError

app = typer.Typer(
    name="sw-onnx",
    help="Find and respect the super weights of LLMs in ONNX graphs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON here ('-' for stdout).")]
TimingsOpt = Annotated[bool, typer.Option("--timings", help="Fill the JSON's \"seconds\" fields (null by default, so that the same input and options give the same bytes).")]


def _check_output_folder(*targets: Optional[Path]) -> None:
    """Fail before any work when an output's folder does not exist (usage error, exit 2)."""
    for target in targets:
        if target is None or str(target) == "-":
            continue
        parent = Path(target).parent
        if not parent.is_dir():
            what = "is not a folder" if parent.exists() else "does not exist"
            raise UsageError(f"{target}: folder {parent} {what}", hint="create it, or write somewhere else")


@app.command(epilog="Example: sw-onnx detect ./smollm2-135m --json report.json --plot spikes.png")
def detect(
    model: ModelArg,
    tokenizer: TokenizerOpt = None,
    prompt: Annotated[Optional[str], typer.Option(help="Detection prompt (needs a tokenizer). Default: the paper's.")] = None,
    json_path: JsonOpt = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG of per-layer max |input|/|output|.")] = None,
    max_iterations: Annotated[int, typer.Option(min=1, help="Zero-and-repeat passes at most.")] = 4,
    provider: ProviderOpt = "cpu",
    timings: TimingsOpt = False,
) -> None:
    """Find super activations and super weights, data-free (one onnxruntime pass per iteration)."""
    from sw_onnx.api import detect_model
    from sw_onnx.detect import DetectConfig
    from sw_onnx.io import resolve_model_path
    from sw_onnx.report import detect_report, format_detect_table, plot_detect

    config = DetectConfig(max_iterations=max_iterations, providers=execution_providers(provider))
    _check_output_folder(json_path, plot)
    path = resolve_model_path(model)
    result, source = detect_model(model, config, tokenizer=tokenizer, prompt=prompt, progress=progress)
    report = detect_report(result, model_path=path, config=config, prompt=prompt, tokenizer=tokenizer, source=source)
    if json_path is not None:
        write_json(report, json_path, timings)
    if str(json_path) != "-":
        print(format_detect_table(result))
    if plot is not None:
        plot_detect(result, plot, layers=None)
        progress(f"plot written to {plot}")


from sw_onnx.quantize import QuantizeConfig as _QuantizeConfig  # noqa: E402  (light: no onnx import)

_QDEFAULT = _QuantizeConfig()  # the quantize command's defaults are the library's
OutputOpt = Annotated[Optional[Path], typer.Option("-o", "--output", help="Quantized .onnx to write (default: beside the input, e.g. model.uint4-b32.onnx).", show_default=False)]
BitsOpt = Annotated[int, typer.Option("--bits", help="Weight bits: 4 or 8.")]
BlockSizeOpt = Annotated[int, typer.Option("--block-size", help="Weights per quantization block along K: a power of two >= 16, or 0 for per-channel (one scale per output channel).")]
SymmetricOpt = Annotated[bool, typer.Option("--symmetric/--asymmetric", help="Signed codes without zero point, or unsigned codes with one.")]
ClipOpt = Annotated[str, typer.Option("--clip", help="Block range: none (min-max), zscore[:Z] (paper Eq. 2) or mse (w^2-weighted error search).")]
KeepOpt = Annotated[str, typer.Option("--keep", help="Super weights kept exact: auto (detect first), none, or a sw-onnx detect --json report.")]
ExcludeOpt = Annotated[Optional[list[str]], typer.Option("--exclude", help="Leave float the linear layers whose node name matches this glob (repeatable).", show_default=False)]
LmHeadOpt = Annotated[bool, typer.Option("--lm-head/--no-lm-head", help="Quantize the lm_head (the layer that outputs the logits) at --bits and --block-size like the others.")]
LmHeadBitsOpt = Annotated[int, typer.Option("--lm-head-bits", help="Without --lm-head: the lm_head's bits, blocks of 32 (8: no measurable loss, fused by onnxruntime; 0 keeps it float).")]
FormatOpt = Annotated[str, typer.Option("--format", help="qdq: standard ONNX DequantizeLinear+MatMul (opset 21), fused by onnxruntime; nbits: com.microsoft MatMulNBits.")]
VerifyOpt = Annotated[bool, typer.Option("--verify/--no-verify", help="Check the written model (checker, fusion, logits) before publishing it.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")]
ActivationsOpt = Annotated[str, typer.Option("--activations", help="none (weight-only) or int8: W8A8 QDQ with --bits 8, int8 per-channel weights, static per-tensor int8 activations.")]
CalibTextOpt = Annotated[Optional[Path], typer.Option("--calib-text", help="Text whose first 2048 tokens calibrate activation ranges and super-activation channels (default: the detection prompt).", show_default=False)]
BitsPerWeightOpt = Annotated[Optional[float], typer.Option("--bits-per-weight", help="Budget of bits per weight (codes, scales, zero points, float side paths, over every quantized weight): int4 layers go to a smaller block or to int8 where that buys the most.", show_default=False)]
AllocationOpt = Annotated[str, typer.Option("--allocation", help="With --bits-per-weight: damage (estimated damage per extra bit) or kquant (llama.cpp's use_more_bits rule, as k_quant_mixed; alone: the whole rule).")]
EmbeddingBitsOpt = Annotated[Optional[int], typer.Option("--embedding-bits", show_default=False, help="0 (float), 4 or 8 (default: 8 weight-only, float with --activations int8): embedding tables as GatherBlockQuantized, shared with a tied lm_head at the same bits.")]
LmHeadBlockOpt = Annotated[int, typer.Option("--lm-head-block-size", help="Block of --lm-head-bits and of embedding tables (a power of two >= 16).")]
GptqOpt = Annotated[bool, typer.Option("--gptq", help="GPTQ error compensation with the Hessian X^T X of each layer's inputs, from --calib-text (or the prompt: too few tokens for it).")]
ErrorWeightOpt = Annotated[str, typer.Option("--error-weight", help="With --clip mse, weight each weight's squared rounding error by w2 (its square), x2 (its input channel's E[x^2], measured on the prompt or --calib-text) or w2x2 (both).")]
SaKeepOutOpt = Annotated[bool, typer.Option("--sa-keep-out/--no-sa-keep-out", help="Keep super-activation entries out of activation quantization (int4: their channels leave MatMulNBits, exact on a float side path; W8A8: replaced by the median, restored exactly).")]


def _parse_clip(text: str) -> tuple[str, Optional[float]]:
    mode, _, z = text.partition(":")
    if not z:
        return mode, None
    if mode != "zscore":
        raise UsageError(f"--clip {text}: only zscore takes a value (zscore:Z)")
    try:
        return mode, float(z)
    except ValueError:
        raise UsageError(f"--clip {text}: Z must be a number, e.g. zscore:12") from None


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _format_quantize_summary(summary) -> str:
    lines = []
    total = len(summary.layers)
    for i, d in enumerate(summary.layers, 1):  # the plan, layer by layer
        head = f"[{i:{len(str(total))}d}/{total}] {d.node} [{d.k}x{d.n}]"
        kind = f"{'int' if d.symmetric else 'uint'}{d.bits} {f'b{d.block_size}' if d.block_size else 'per-channel'}"
        if d.form == "w8a8":
            kind += ", int8 activations"
        if d.action == "quantized":
            level = f", accuracy_level {d.accuracy_level}" if d.accuracy_level is not None else ""
            lines.append(f"{head} -> {kind} {d.form}{level} | {_mib(d.float_bytes)} -> {_mib(d.quantized_bytes)} | "
                         f"{d.bits_per_weight:.3f} bits per weight | kept {len(d.kept)}")
        else:
            lines.append(f"{head} float | skipped: {d.reason}")
    for e in getattr(summary, "embeddings", []):
        lines.append(f"embedding {e.initializer} [{e.vocab}x{e.hidden}] -> {e.reason}")
    t = summary.totals()
    lines.append(
        f"quantized {t['quantized']} of {t['linear_layers']} linear layers ({', '.join(f'{k} {v}' for k, v in t['forms'].items())}), "
        f"{t['kept_out']} super weight(s) kept out, {t['bits_per_weight']} bits per weight"
        + (f"; {t['embedding_tables']} embedding table(s) quantized, {t['bits_per_weight_with_embeddings']} bits per "
           "weight with them" if t.get("embedding_tables") else "")
    )
    lines.append(f"model size {_mib(summary.input_bytes)} -> {_mib(summary.output_bytes)}; opset {summary.opset['from']} -> {summary.opset['to']} ({summary.opset['method']})")
    v = summary.verification
    if v is not None:
        lg = v.get("logits") or {}
        lines.append(
            f"verified: checker {v['checker']}, {v['matmulnbits']} MatMulNBits / {v['expected_fused']} quantized, "
            f"{v['dequantize_linear']} DequantizeLinear left; logits max |diff| {lg.get('max_abs_diff', float('nan')):.4g} "
            f"(max |logit| {lg.get('max_abs_reference', float('nan')):.4g}), top-1 agreement {lg.get('top1_agreement', 0):.0%} over {lg.get('tokens', 0)} tokens"
        )
    else:
        lines.append("not verified (--no-verify)")
    lines.append(f"wrote {summary.output_path} in {summary.seconds.get('total', 0):.1f} s")
    return "\n".join(lines)


@app.command(epilog="Example: sw-onnx quantize ./smollm2-135m/model.onnx -o model.q4.onnx --json summary.json")
def quantize(
    model: ModelArg,
    output: OutputOpt = None,
    bits: BitsOpt = _QDEFAULT.bits,
    block_size: BlockSizeOpt = _QDEFAULT.block_size,
    symmetric: SymmetricOpt = _QDEFAULT.symmetric,
    clip: ClipOpt = _QDEFAULT.clip,
    keep: KeepOpt = _QDEFAULT.keep,
    exclude: ExcludeOpt = None,
    lm_head: LmHeadOpt = _QDEFAULT.include_lm_head,
    lm_head_bits: LmHeadBitsOpt = _QDEFAULT.lm_head_bits,
    format: FormatOpt = _QDEFAULT.format,
    verify: VerifyOpt = _QDEFAULT.verify,
    json_path: JsonOpt = None,
    force: ForceOpt = False,
    provider: ProviderOpt = "cpu",
    timings: TimingsOpt = False,
    activations: ActivationsOpt = _QDEFAULT.activations,
    calib_text: CalibTextOpt = None,
    sa_keep_out: SaKeepOutOpt = _QDEFAULT.sa_keep_out,
    error_weight: ErrorWeightOpt = _QDEFAULT.error_weight,
    bits_per_weight: BitsPerWeightOpt = _QDEFAULT.bits_per_weight,
    allocation: AllocationOpt = _QDEFAULT.allocation,
    embedding_bits: EmbeddingBitsOpt = _QDEFAULT.embedding_bits,
    gptq: GptqOpt = _QDEFAULT.gptq,
    lm_head_block_size: LmHeadBlockOpt = _QDEFAULT.lm_head_block_size,
) -> None:
    """Quantize the linear layers to int4/int8 blocks, keeping the super weights exact; verify before writing."""
    from sw_onnx.quantize import QuantizeConfig, quantize_model

    _check_output_folder(json_path)
    mode, z = _parse_clip(clip)
    if z is None and mode == "zscore":
        z = _QDEFAULT.zscore
    config = QuantizeConfig(
        bits=bits, block_size=block_size, symmetric=symmetric, clip=mode, zscore=z, keep=keep,
        exclude=tuple(exclude or ()), include_lm_head=lm_head, format=format, verify=verify, force=force,
        providers=tuple(execution_providers(provider)) if provider != "cpu" else None,
        activations=activations, calib_text=str(calib_text) if calib_text is not None else None, sa_keep_out=sa_keep_out,
        lm_head_bits=lm_head_bits, error_weight=error_weight, bits_per_weight=bits_per_weight, allocation=allocation,
        embedding_bits=embedding_bits, gptq=gptq, lm_head_block_size=lm_head_block_size,
    )
    try:
        summary = quantize_model(model, output, config, progress=progress)
    except SwOnnxError as e:
        partial = getattr(e, "summary", None)
        if partial is not None and json_path is not None:
            write_json(partial.to_dict(), json_path, timings)
        raise
    if json_path is not None:
        write_json(summary.to_dict(), json_path, timings)
    if str(json_path) != "-":
        print(_format_quantize_summary(summary))


@app.command()
def version() -> None:
    """Print the sw-onnx version."""
    print(__version__)


_cli_measure.register(app)  # eval, compare, generate, ablate: after version, in --help too


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(message: str, hint: str, code: int) -> None:
    line = f"error: {_one_line(message)}"
    if hint:
        line += f" (hint: {_one_line(hint, 200)})"
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: run the app; every failure becomes one stderr line and an exit code.

    sw-onnx's typed errors carry their code (`sw_onnx.errors`); click's parsing errors are usage errors (2);
    onnxruntime failing on the model is a model error (1); an OSError writing is 4; anything else is a bug
    (5), reported in one line unless SW_ONNX_DEBUG=1 (then the traceback is raised as is).
    """
    from typer import _click as click  # typer's own click

    from sw_onnx._process import configure_command_line_process

    configure_command_line_process()  # before any thread starts
    debug = os.environ.get("SW_ONNX_DEBUG") == "1"
    try:
        rc = app(args=argv, prog_name="sw-onnx", standalone_mode=False)
    except SwOnnxError as e:
        if debug:
            raise
        _fail(str(e), e.hint, e.exit_code)
    except click.exceptions.NoArgsIsHelpError as e:  # the help text was printed
        sys.exit(e.exit_code)
    except click.ClickException as e:
        if debug:
            raise
        ctx = getattr(e, "ctx", None)
        command = ctx.command_path if ctx is not None else "sw-onnx"
        _fail(e.format_message(), f"see {command} --help", e.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted; no output was published", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except MemoryError:
        if debug:
            raise
        _fail("out of memory", "free memory, or run on a machine with more RAM", EXIT_MODEL)
    except OSError as e:
        if debug:
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        _fail(f"I/O error: {e.strerror or e}{where}", "check the paths, permissions and free disk space", EXIT_OUTPUT)
    except Exception as e:
        if debug:
            raise
        if type(e).__module__.startswith("onnxruntime"):
            _fail(f"onnxruntime failed on this model: {type(e).__name__}: {e}",
                  "check that the model runs in onnxruntime; sw-onnx needs it to", EXIT_MODEL)
        _fail(f"internal error: {type(e).__name__}: {e}", "set SW_ONNX_DEBUG=1 for the traceback, and please report it",
              EXIT_INTERNAL)
    sys.exit(rc if isinstance(rc, int) else 0)


def entry_point() -> None:
    """The `sw-onnx` command: `main`, then the process ends without the interpreter's teardown
    (`sw_onnx._process.exit_without_teardown`)."""
    from sw_onnx._process import exit_without_teardown

    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    exit_without_teardown(code)


if __name__ == "__main__":
    entry_point()
