"""Wall time and peak RSS of `sw-onnx detect` vs one plain onnxruntime forward pass on the same prompt.

Each measurement runs in its own process (`_proc.run_measured`: peak RSS from wait4, that process's own).
The detect time is one pass per iteration over the same prompt; "per pass" divides the total by the passes.
Usage: python bench/detect_speed.py [MODEL] [--repeat 3] [--markdown FILE] [--json FILE]
MODEL defaults to the SmolLM2-135M export (sample_models/export_smollm2.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import run_measured, write_outputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

PLAIN = r"""
import sys, time, json, onnxruntime as ort
from sw_onnx.inputs import build_feeds, prompt_token_ids
from sw_onnx.io import resolve_model_path
path = resolve_model_path(sys.argv[1]); ids, _ = prompt_token_ids(sys.argv[1])
t0 = time.perf_counter()
o = ort.SessionOptions(); o.log_severity_level = 3
s = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
t1 = time.perf_counter()
s.run(None, build_feeds(s, ids))
t2 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "run_s": t2 - t1, "total_s": t2 - t0}))
"""

DETECT = r"""
import sys, time, json
from sw_onnx.detect import detect
from sw_onnx.inputs import prompt_token_ids
from sw_onnx.io import load_model
t0 = time.perf_counter()
ids, _ = prompt_token_ids(sys.argv[1])
r = detect(load_model(sys.argv[1]), ids)
t1 = time.perf_counter()
from sw_onnx.detect import Detector
detector = Detector(load_model(sys.argv[1]))
detector.run(ids, {})  # creates the session
t2 = time.perf_counter()
detector.run(ids, {})  # one iteration's run alone, as the plain run below
print(json.dumps({"total_s": t1 - t0, "passes": r.iterations, "super_weights": len(r.super_weights),
                  "pass_run_s": time.perf_counter() - t2}))
"""


def _child(code: str, model: str) -> dict:
    run = run_measured([sys.executable, "-c", code, model], cwd=ROOT)
    return json.loads(run["stdout"].strip().splitlines()[-1]) | {"peak_rss_mb": run["peak_rss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--markdown")
    args = parser.parse_args()
    model = args.model
    if model is None:  # the SmolLM2 export (made and cached on first use), from a child: this process stays small
        model = run_measured([sys.executable, "-c", "from sample_models.export_smollm2 import export_smollm2; "
                              "print(export_smollm2(quiet=True))"], cwd=ROOT)["stdout"].strip().splitlines()[-1]
    plain = [_child(PLAIN, model) for _ in range(args.repeat)]
    detect = [_child(DETECT, model) for _ in range(args.repeat)]
    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    summary = {
        "model": model,
        "plain_load_s": med(plain, "load_s"),
        "plain_run_s": med(plain, "run_s"),
        "plain_total_s": med(plain, "total_s"),
        "plain_peak_rss_mb": med(plain, "peak_rss_mb"),
        "detect_total_s": med(detect, "total_s"),
        "detect_passes": detect[0]["passes"],
        "detect_peak_rss_mb": med(detect, "peak_rss_mb"),
        "detect_pass_run_s": med(detect, "pass_run_s"),
    }
    summary["detect_per_pass_s"] = summary["detect_total_s"] / summary["detect_passes"]
    summary["ratio_total"] = summary["detect_total_s"] / summary["plain_total_s"]
    summary["ratio_per_pass"] = summary["detect_per_pass_s"] / summary["plain_total_s"]
    lines = [
        "| measure | plain onnxruntime (load + 1 forward) | sw-onnx detect |",
        "|---|---|---|",
        f"| wall time (median of {args.repeat}) | {summary['plain_total_s']:.2f} s (load {summary['plain_load_s']:.2f} s, "
        f"run {summary['plain_run_s'] * 1000:.0f} ms) | {summary['detect_total_s']:.2f} s ({summary['detect_passes']} passes, "
        f"{summary['detect_per_pass_s']:.2f} s/pass) |",
        f"| ratio to plain | 1.00 | {summary['ratio_total']:.2f}x total, {summary['ratio_per_pass']:.2f}x per pass |",
        f"| one forward run alone (session loaded) | {summary['plain_run_s'] * 1000:.0f} ms | "
        f"{summary['detect_pass_run_s'] * 1000:.0f} ms ({summary['detect_pass_run_s'] / summary['plain_run_s']:.2f}x: the "
        "instrumentation's outputs, weights fed from memory maps) |",
        f"| peak RSS (whole process) | {summary['plain_peak_rss_mb']:.0f} MB | {summary['detect_peak_rss_mb']:.0f} MB |",
        "",
        f"(measured {time.strftime('%Y-%m-%d')}, {model}, `python bench/detect_speed.py`)",
    ]
    write_outputs("\n".join(lines), summary, args.markdown, args.json_path)


if __name__ == "__main__":
    main()
