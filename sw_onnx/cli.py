"""The `sw-onnx` command line: parses arguments, calls the library, maps its errors to exit codes.

Exit codes: 0 success, 1 runtime failure (bad model, unsupported graph), 2 usage error, 3 verification failed.
Tracebacks are shown only with SW_ONNX_DEBUG=1.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from sw_onnx._version import __version__
from sw_onnx.errors import SwOnnxError, UsageError

app = typer.Typer(
    name="sw-onnx",
    help="Find and respect the super weights of LLMs in ONNX graphs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ModelArg = Annotated[Path, typer.Argument(help="An .onnx file, or an export folder holding model.onnx.", show_default=False)]
JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON here ('-' for stdout).")]
ProviderOpt = Annotated[str, typer.Option("--provider", help="onnxruntime execution provider: cpu or cuda.")]
TokenizerOpt = Annotated[Optional[Path], typer.Option("--tokenizer", help="tokenizer.json (default: the one beside the model).")]

_PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def _progress(message: str) -> None:
    print(f"[sw-onnx] {message}", file=sys.stderr, flush=True)


def _providers(name: str) -> list[str]:
    import onnxruntime as ort

    if name not in _PROVIDERS:
        raise UsageError(f"--provider {name}: unknown (use cpu or cuda)")
    if name == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UsageError("--provider cuda: this onnxruntime has no CUDA support", hint="pip install 'sw-onnx[gpu]'")
    return _PROVIDERS[name]


def _write_json(data: dict, target: Path) -> None:
    text = json.dumps(data, indent=2) + "\n"
    if str(target) == "-":
        sys.stdout.write(text)
        return
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)


@app.command(epilog="Example: sw-onnx detect ./smollm2-135m --json report.json --plot spikes.png")
def detect(
    model: ModelArg,
    tokenizer: TokenizerOpt = None,
    prompt: Annotated[Optional[str], typer.Option(help="Detection prompt (needs a tokenizer). Default: the paper's.")] = None,
    json_path: JsonOpt = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG of per-layer max |input|/|output|.")] = None,
    max_iterations: Annotated[int, typer.Option(min=1, help="Zero-and-repeat passes at most.")] = 4,
    provider: ProviderOpt = "cpu",
) -> None:
    """Find super activations and super weights, data-free (one onnxruntime pass per iteration)."""
    from sw_onnx.detect import DetectConfig
    from sw_onnx.detect import detect as run_detect
    from sw_onnx.inputs import prompt_token_ids
    from sw_onnx.io import load_model, resolve_model_path
    from sw_onnx.report import detect_report, format_detect_table, plot_detect

    config = DetectConfig(max_iterations=max_iterations, providers=_providers(provider))
    path = resolve_model_path(model)
    token_ids, source = prompt_token_ids(model, tokenizer=tokenizer, prompt=prompt)
    _progress(f"loading {path}")
    loaded = load_model(path)
    _progress(f"prompt: {source}, {len(token_ids)} tokens")
    result = run_detect(loaded, token_ids, config, progress=_progress)
    report = detect_report(result, model_path=path, config=config, prompt=prompt, tokenizer=tokenizer, source=source)
    if json_path is not None:
        _write_json(report, json_path)
    if str(json_path) != "-":
        print(format_detect_table(result))
    if plot is not None:
        plot_detect(result, plot, layers=None)
        _progress(f"plot written to {plot}")


@app.command()
def version() -> None:
    """Print the sw-onnx version."""
    print(__version__)


def main() -> None:
    """Console entry point: run the app, turning sw-onnx errors into one line and an exit code.

    Click handles usage errors itself (exit 2); sw-onnx's typed errors get their own code; anything else
    is a bug, reported in one line unless SW_ONNX_DEBUG=1.
    """
    debug = os.environ.get("SW_ONNX_DEBUG") == "1"
    try:
        app()
    except SwOnnxError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception as e:
        if debug:
            raise
        print(f"error: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        print("hint: set SW_ONNX_DEBUG=1 for the traceback, and please report it", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
