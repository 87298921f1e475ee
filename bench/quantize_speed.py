"""Quantization cost: wall time and peak RSS of `sw-onnx quantize` vs onnxruntime's MatMulNBitsQuantizer.

Each row is a whole command as a user runs it, in its own process (`_proc.run_measured`: fork to exit,
imports included; peak RSS of that process), the median of --repeat runs, on the model as given (inline
weights) and on an external-data copy. Same format for all: int4 with a zero point, block --block-size,
QDQ, lm_head left float (onnxruntime does not see the tied lm_head's weight as a constant).

- onnxruntime RTN: `python -m onnxruntime.quantization.matmul_nbits_quantizer ... --symmetric False
  --quant_format QDQ` (round-to-nearest, native code).
- sw-onnx RTN: round-to-nearest too (`--clip none`), super weights and super-activation channels from a
  `sw-onnx detect --json` report made once beforehand, no verification: read, quantize, write. First with
  the same layers as onnxruntime (`--lm-head-bits 0`), then as by default, with the lm_head (21% of
  SmolLM2's weights) at 8 bits too.
- sw-onnx default, from a report: the default MSE range search (what buys its perplexity, see
  docs/quantize_quality.md), report, no verification.
- sw-onnx bare command: `sw-onnx quantize MODEL -o OUT`: detection, quantization and verification (the
  checker, a session of each model and the logits compared).

Weights MB/s is the fp32 bytes of the linear layers' weights over the wall time.

Usage: python bench/quantize_speed.py [MODEL] [--block-size 32] [--repeat 3] [--markdown FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import run_measured, write_outputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# Run in child processes: a child's peak RSS counts its parent's memory at fork (Linux keeps the pre-exec
# high-water mark), so this process stays small.
_WEIGHT_BYTES = """
import sys
from sw_onnx.discover import find_linear_layers
from sw_onnx.io import load_model
layers, _ = find_linear_layers(load_model(sys.argv[1]))
print(sum({layer.weight.initializer.name: layer.k * layer.n * 4 for layer in layers}.values()))
"""
_TO_EXTERNAL = """
import sys, onnx
onnx.save(onnx.load(sys.argv[1]), sys.argv[2], save_as_external_data=True, location="model.onnx.data")
"""


def _commands(model: Path, out: Path, block: int, report: Path) -> dict[str, list[str]]:
    sw = [sys.executable, "-m", "sw_onnx.cli", "quantize", str(model), "-o", str(out), "--block-size", str(block), "--force"]
    return {
        "onnxruntime RTN": [sys.executable, "-m", "onnxruntime.quantization.matmul_nbits_quantizer", "--input_model",
                            str(model), "--output_model", str(out), "--block_size", str(block), "--symmetric", "False",
                            "--quant_format", "QDQ"],
        "sw-onnx RTN, same layers (--lm-head-bits 0), report, no verify": sw + ["--clip", "none", "--lm-head-bits", "0",
                                                                             "--keep", str(report), "--no-verify"],
        "sw-onnx RTN, report, no verify": sw + ["--clip", "none", "--keep", str(report), "--no-verify"],
        "sw-onnx default, report, no verify": sw + ["--keep", str(report), "--no-verify"],
        "sw-onnx bare command (detect + quantize + verify)": sw,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--markdown")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    if args.model is None:  # the SmolLM2 export (made and cached on first use)
        args.model = run_measured([sys.executable, "-c", "from sample_models.export_smollm2 import export_smollm2; "
                                   "print(export_smollm2(quiet=True))"], cwd=ROOT)["stdout"].strip().splitlines()[-1]
    src = Path(args.model)
    src = src / "model.onnx" if src.is_dir() else src
    work = Path(tempfile.mkdtemp(prefix="sw-onnx-qspeed-"))
    rows = []
    try:
        external = work / "external" / "model.onnx"
        external.parent.mkdir()
        run_measured([sys.executable, "-c", _TO_EXTERNAL, str(src), str(external)])
        weight_bytes = int(run_measured([sys.executable, "-c", _WEIGHT_BYTES, str(src)], cwd=ROOT)["stdout"])
        for storage, model in (("inline", src), ("external data", external)):
            report = work / f"{storage.replace(' ', '-')}-detect.json"
            run_measured([sys.executable, "-m", "sw_onnx.cli", "detect", str(model), "--json", str(report)], cwd=ROOT)
            out_dir = work / "out"
            for tool, cmd in _commands(model, out_dir / "q.onnx", args.block_size, report).items():
                runs = []
                for _ in range(args.repeat):
                    out_dir.mkdir(exist_ok=True)
                    runs.append(run_measured(cmd, cwd=ROOT))
                    shutil.rmtree(out_dir)
                rows.append({"storage": storage, "tool": tool,
                             "seconds": statistics.median(r["seconds"] for r in runs),
                             "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
                             "runs": [{k: r[k] for k in ("seconds", "peak_rss_mb")} for r in runs]})
                print(f"{storage:>13} | {tool}: {rows[-1]['seconds']:.2f} s, {rows[-1]['peak_rss_mb']:.0f} MB", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"{src.parent.name}: int4 asymmetric, block {args.block_size}, QDQ; {weight_bytes / 1e6:.0f} MB of fp32 linear "
             f"weights; whole commands in their own process, median of {args.repeat}; {time.strftime('%Y-%m-%d')}; "
             "`python bench/quantize_speed.py`.", "",
             "| model storage | command | wall s | peak RSS MB | weights MB/s | time vs onnxruntime | RSS vs onnxruntime |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        peer = next(p for p in rows if p["storage"] == r["storage"] and p["tool"] == "onnxruntime RTN")
        lines.append(f"| {r['storage']} | {r['tool']} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{weight_bytes / 1e6 / r['seconds']:.0f} | {r['seconds'] / peer['seconds']:.2f}x | "
                     f"{r['peak_rss_mb'] / peer['peak_rss_mb']:.2f}x |")
    write_outputs("\n".join(lines), {"model": str(src), "block_size": args.block_size, "weight_bytes": weight_bytes,
                                     "rows": rows}, args.markdown, args.json_path)


if __name__ == "__main__":
    main()
