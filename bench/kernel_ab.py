"""The default int4 kernel of two checkouts in one process, alternating (drift on a shared VM hits both alike):
`sw_onnx/kernels.py` loaded from each (it imports only numpy), one thread, CPU time per weight, the best of
--repeat rounds, on random layers of SmolLM2's and bench/large_model.py's shapes with random input importance.

Usage: python bench/kernel_ab.py OLD_CHECKOUT [NEW_CHECKOUT (default: this one)] [--repeat 15]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = ((2048, 8192), (8192, 2048), (576, 1536), (1536, 576), (576, 576), (576, 192))


def _kernels(checkout: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, checkout / "sw_onnx" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    module.usable_cpus = lambda limit=8: 1  # one thread: CPU time is the kernel's own
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path, nargs="?", default=Path(__file__).resolve().parents[1])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    kernels = {"old": _kernels(args.old, "kernels_old"), "new": _kernels(args.new, "kernels_new")}
    rng = np.random.default_rng(0)
    layers = [((rng.standard_normal(s) * 0.02).astype(np.float32), rng.random(s[0]).astype(np.float32)) for s in SHAPES]
    best: dict[tuple[str, tuple], float] = {}
    for _ in range(args.repeat):
        for name, module in kernels.items():
            for w, importance in layers:
                t = time.thread_time()
                module.quantize_blockwise(w, bits=4, block_size=32, clip="mse", weighting="none", importance=importance,
                                          refit=2, mse_grid=5)
                ns = (time.thread_time() - t) / w.size * 1e9
                best[name, w.shape] = min(best.get((name, w.shape), float("inf")), ns)
    print("| shape | old ns/weight | new ns/weight | new/old |\n|---|---|---|---|")
    for shape in SHAPES:
        old, new = best["old", shape], best["new", shape]
        print(f"| {shape[0]}x{shape[1]} | {old:.1f} | {new:.1f} | {new / old:.2f}x |")


if __name__ == "__main__":
    main()
