"""Wall time and peak RSS of `sw-onnx detect` vs one plain onnxruntime forward pass on the same prompt.

Each measurement runs in its own process (peak RSS from the OS: ru_maxrss of the child).
Usage: python bench/detect_speed.py [MODEL] [--repeat 3] [--json out.json]
MODEL defaults to the SmolLM2-135M export (sample_models/export_smollm2.py).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

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
print(json.dumps({"total_s": t1 - t0, "passes": r.iterations, "super_weights": len(r.super_weights)}))
"""


def _child(code: str, model: str) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run([sys.executable, "-c", code, model], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["peak_rss_mb"] = peak / 1024 if peak > before else None  # maxrss of children is a running max
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    model = args.model
    if model is None:
        sys.path.insert(0, ".")
        from sample_models.export_smollm2 import export_smollm2

        model = str(export_smollm2(quiet=True))
    # plain first: the children's max RSS is monotonic, so the smaller process must run first
    plain = [_child(PLAIN, model) for _ in range(args.repeat)]
    detect = [_child(DETECT, model) for _ in range(args.repeat)]
    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    summary = {
        "model": model,
        "plain_load_s": med(plain, "load_s"),
        "plain_run_s": med(plain, "run_s"),
        "plain_total_s": med(plain, "total_s"),
        "plain_peak_rss_mb": plain[0]["peak_rss_mb"],
        "detect_total_s": med(detect, "total_s"),
        "detect_passes": detect[0]["passes"],
        "detect_peak_rss_mb": detect[0]["peak_rss_mb"],
    }
    summary["detect_per_pass_s"] = summary["detect_total_s"] / summary["detect_passes"]
    summary["ratio_total"] = summary["detect_total_s"] / summary["plain_total_s"]
    summary["ratio_per_pass"] = summary["detect_per_pass_s"] / summary["plain_total_s"]
    print("| measure | plain onnxruntime (load + 1 forward) | sw-onnx detect |")
    print("|---|---|---|")
    print(f"| wall time (median of {args.repeat}) | {summary['plain_total_s']:.2f} s (load {summary['plain_load_s']:.2f} s, run {summary['plain_run_s'] * 1000:.0f} ms) | {summary['detect_total_s']:.2f} s ({summary['detect_passes']} passes, {summary['detect_per_pass_s']:.2f} s/pass) |")
    print(f"| ratio to plain | 1.00 | {summary['ratio_total']:.2f}x total, {summary['ratio_per_pass']:.2f}x per pass |")
    print(f"| peak RSS | {summary['plain_peak_rss_mb']:.0f} MB | {summary['detect_peak_rss_mb']:.0f} MB |")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(summary, f, indent=2)
    started = time.strftime("%Y-%m-%d")
    print(f"\n(measured {started}, {model})")


if __name__ == "__main__":
    main()
