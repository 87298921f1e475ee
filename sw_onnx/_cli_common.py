"""What the `sw-onnx` commands share (`sw_onnx.cli`, `sw_onnx._cli_measure`): the common options,
--provider names, progress lines on stderr, and JSON output."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from sw_onnx.errors import UsageError

ModelArg = Annotated[Path, typer.Argument(help="An .onnx file, or an export folder holding model.onnx.", show_default=False)]
ProviderOpt = Annotated[str, typer.Option("--provider", help="onnxruntime execution provider: cpu or cuda.")]
TokenizerOpt = Annotated[Optional[Path], typer.Option("--tokenizer", help="tokenizer.json (default: the one beside the model).")]

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def progress(message: str) -> None:
    """One ``[sw-onnx] message`` line on stderr."""
    print(f"[sw-onnx] {message}", file=sys.stderr, flush=True)


def execution_providers(name: str) -> list[str]:
    """The onnxruntime providers of a --provider name.

    Raises:
        UsageError: an unknown name, or cuda with an onnxruntime without CUDA.
    """
    import onnxruntime as ort

    if name not in PROVIDERS:
        raise UsageError(f"--provider {name}: unknown (use cpu or cuda)")
    if name == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UsageError("--provider cuda: this onnxruntime has no CUDA support", hint="pip install 'sw-onnx[gpu]'")
    return PROVIDERS[name]


def without_timings(data):
    """`data` with every "seconds" value set to null: the JSON of a run is then a function of its inputs."""
    if isinstance(data, dict):
        return {k: (None if k == "seconds" else without_timings(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [without_timings(v) for v in data]
    return data


def write_json(data: dict, target: Path, timings: bool = True) -> None:
    """Write `data` as indented JSON to `target` (atomically), or to stdout for ``-``; without `timings`,
    every "seconds" is null."""
    from sw_onnx.io import write_text_atomic

    text = json.dumps(data if timings else without_timings(data), indent=2) + "\n"
    if str(target) == "-":
        sys.stdout.write(text)
        return
    write_text_atomic(target, text)
