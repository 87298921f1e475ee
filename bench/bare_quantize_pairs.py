"""The bare `sw-onnx quantize MODEL` (detect + quantize + verify) against onnxruntime's RTN quantizer, and
against the same command from another checkout (before/after a change), in paired rounds.

Each round runs every command once, as its own process, in a rotated order (drift and other load on the
machine hit all of them alike); the table gives medians of the per-round ratios to onnxruntime.

`--keep REPORT` times quantizing from a `sw-onnx detect --json` report instead (no detection run).

Usage: python bench/bare_quantize_pairs.py [MODEL] [--old CHECKOUT] [--keep REPORT] [--rounds 3] [--markdown FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import run_measured, write_outputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _commands(model: Path, work: Path, old: Path | None, keep: Path | None) -> dict[str, tuple[list[str], dict | None]]:
    extra = ["--keep", str(keep)] if keep else []
    ort = [sys.executable, "-m", "onnxruntime.quantization.matmul_nbits_quantizer", "--input_model", str(model),
           "--output_model", str(work / "ort.onnx"), "--block_size", "32", "--symmetric", "False", "--quant_format", "QDQ"]
    commands = {"onnxruntime RTN": (ort, None),
                "sw-onnx quantize (this checkout)": ([sys.executable, "-m", "sw_onnx.cli", "quantize", str(model), "-o",
                                                      str(work / "new.onnx"), "--force", *extra], {**os.environ, "PYTHONPATH": str(ROOT)})}
    if old is not None:
        commands["sw-onnx quantize (--old checkout)"] = (
            [sys.executable, "-m", "sw_onnx.cli", "quantize", str(model), "-o", str(work / "old.onnx"), "--force", *extra],
            {**os.environ, "PYTHONPATH": str(old)})
    return commands


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(Path.home() / ".cache/sw-onnx/smollm2-135m/model.onnx"))
    parser.add_argument("--old", type=Path, help="a checkout whose sw_onnx is timed too (e.g. a git worktree)")
    parser.add_argument("--keep", type=Path, help="quantize from this detect --json report (both checkouts)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--markdown")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sw-onnx-pairs-"))
    commands = _commands(Path(args.model), work, args.old, args.keep)
    names = list(commands)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for f in work.glob("*.onnx*"):
                f.unlink()
            cmd, env = commands[name]
            runs[name].append(run_measured(cmd, cwd=str(work), env=env))
            print(f"round {r + 1} | {name}: {runs[name][-1]['seconds']:.2f} s", file=sys.stderr)
    lines = [f"{Path(args.model).parent.name}, {args.rounds} rounds, rotated order, {time.strftime('%Y-%m-%d')}; "
             "`python bench/bare_quantize_pairs.py" + (" --old CHECKOUT" if args.old else "")
             + (" --keep REPORT" if args.keep else "") + "`.", "",
             "| command | median wall s | median peak RSS MB | median ratio to onnxruntime (per round) | to --old (per round): wall, RSS |",
             "|---|---|---|---|---|"]
    old = runs.get("sw-onnx quantize (--old checkout)")
    for name in names:
        ratios = [a["seconds"] / b["seconds"] for a, b in zip(runs[name], runs["onnxruntime RTN"])]
        to_old = "" if old is None else (
            f"{statistics.median(a['seconds'] / b['seconds'] for a, b in zip(runs[name], old)):.2f}x, "
            f"{statistics.median(a['peak_rss_mb'] / b['peak_rss_mb'] for a, b in zip(runs[name], old)):.2f}x")
        lines.append(f"| {name} | {statistics.median(x['seconds'] for x in runs[name]):.2f} | "
                     f"{statistics.median(x['peak_rss_mb'] for x in runs[name]):.0f} | {statistics.median(ratios):.2f}x | {to_old} |")
    write_outputs("\n".join(lines), {"model": args.model, "runs": {k: [{"seconds": x["seconds"], "peak_rss_mb": x["peak_rss_mb"]}
                                                                    for x in v] for k, v in runs.items()}},
                  args.markdown, args.json_path)


if __name__ == "__main__":
    main()
