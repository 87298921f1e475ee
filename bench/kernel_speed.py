"""Time of the default int4 kernel (`sw_onnx.kernels.quantize_blockwise`: clip mse, 5 shrink factors, 2 refit
rounds, input importance as the error weight) in one process, on SmolLM2's int4 layers (every third, with the
importance of a `sw-onnx detect --json` report) and on random layers of bench/large_model.py's MLP shapes
(2048x8192, 8192x2048, random importance). Compare checkouts by running it with SWQ=CHECKOUT for each, alternating.

Usage: python bench/kernel_speed.py [MODEL] [--report REPORT.json] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("SWQ", str(ROOT)))


def _smollm2_layers(model: Path, report: Path | None) -> list[tuple[np.ndarray, np.ndarray]]:
    from sw_onnx.analyze.input_stats import importance_from_entries
    from sw_onnx.discover import find_linear_layers
    from sw_onnx.io import load_model

    if report is None:
        report = Path(tempfile.mkdtemp(prefix="sw-onnx-kernel-")) / "detect.json"
        subprocess.run([sys.executable, "-m", "sw_onnx.cli", "detect", str(model), "--json", str(report)], check=True,
                       capture_output=True)
    entries = importance_from_entries(json.loads(report.read_text())["input_importance"])
    by_node = {node: e for e in entries.values() for node in e.nodes}
    layers, _ = find_linear_layers(load_model(model))
    chosen = [layer for layer in layers if layer.name in by_node][:-1:3]  # int4 layers: not the lm_head
    return [(np.ascontiguousarray(layer.weight.effective_weight(), np.float32),
             by_node[layer.name].mean_sq(skip_first=True).astype(np.float32)) for layer in chosen]


def _synthetic_layers() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [((rng.standard_normal(shape) * 0.02).astype(np.float32), rng.random(shape[0]).astype(np.float32))
            for shape in ((2048, 8192), (8192, 2048))]


def _time(layers, repeat: int) -> dict:
    from sw_onnx.kernels import quantize_blockwise

    def run():
        for w, importance in layers:
            quantize_blockwise(w, bits=4, block_size=32, clip="mse", weighting="none", importance=importance,
                               refit=2, mse_grid=5)

    run()  # warm-up: thread pools, page faults of the weights
    walls, cpus = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    weights = sum(w.size for w, _ in layers)
    wall, cpu = float(np.median(walls)), float(np.median(cpus))
    return {"weights_m": round(weights / 1e6, 1), "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "cpu_ns_per_weight": round(cpu / weights * 1e9, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(Path.home() / ".cache/sw-onnx/smollm2-135m/model.onnx"))
    parser.add_argument("--report", type=Path, help="a detect --json report of MODEL (default: made here)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = {"smollm2 int4 layers (every third)": _time(_smollm2_layers(Path(args.model), args.report), args.repeat),
            "synthetic 2048x8192 + 8192x2048": _time(_synthetic_layers(), args.repeat)}
    for name, row in rows.items():
        print(json.dumps({"layers": name, **row}))


if __name__ == "__main__":
    main()
