"""Probe for issue 13's scale migration (AWQ-style, data-free): does scaling each input channel of a layer
group by ``s_k = E[x_k^2] ** (alpha / 2)`` before int4 rounding (and dividing its producer by ``s_k``) help?

Both arms are fake-quantized copies of the model (each linear layer's weight replaced by its dequantized int4
value; lm_head float; activations fp32), quantized like the default (`quantize_blockwise(clip="mse",
refit=2)`, each weight's error weighted by its input channel's importance E[x_k^2] from a `sw-onnx detect
--json` report, super-activation input channels left float as `--sa-keep-out` does):

- *no migration*: alpha = 0;
- *migration*: per group of layers that read one tensor (q/k/v; gate/up; down_proj alone, whose producer is
  up_proj's columns), alpha from {0, 0.125, 0.25, 0.375, 0.5} by the least importance-weighted error of the
  group's dequantized weights in their original units, ``sum_k E[x_k^2] sum_n (W - W_hat)^2`` (the same
  statistics, no data): the codes of ``W * s`` with importance ``E[x^2] / s^2``, divided back by ``s``. This
  equals folding ``1 / s`` into the producer (RMSNorm weight, up_proj columns) up to float rounding. o_proj is
  left at alpha 0: its producer, v_proj, is shared by several query heads (GQA), so one scale per kv-head
  channel would be needed.

Usage::

    python bench/scale_migration_probe.py [MODEL_DIR] --report DETECT.json [--blocks 32 128] [--windows 16] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sw_onnx.kernels import dequantize_blockwise, quantize_blockwise  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fakequant import evaluate_arms  # noqa: E402

ALPHAS = (0.0, 0.125, 0.25, 0.375, 0.5)


def fake_quantize(w: np.ndarray, x2: np.ndarray, alpha: float, block: int, sa: list[int]) -> np.ndarray:
    s = np.power(np.maximum(x2, 1e-12), alpha / 2)
    s = s / np.exp(np.mean(np.log(s)))  # geometric mean 1: only the channels' ratios matter
    scaled = w * s[:, None].astype(np.float32)
    if sa:
        scaled[sa] = 0.0  # these rows leave the int4 weight (--sa-keep-out) and stay float
    qw = quantize_blockwise(scaled.astype(np.float32), bits=4, block_size=block, clip="mse", refit=2,
                            weighting="none", importance=x2 / np.square(s))
    out = dequantize_blockwise(qw) / s[:, None].astype(np.float32)
    if sa:
        out[sa] = w[sa]
    return out.astype(np.float32)


def error(w: np.ndarray, w_hat: np.ndarray, x2: np.ndarray) -> float:
    return float((x2[:, None] * np.square(w - w_hat)).sum())


def build(src: Path, dst: Path, report: dict, block: int, migrate: bool) -> dict:
    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    weight_of = {n.name: n.input[1] for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1
                 and n.input[1] in inits and len(inits[n.input[1]].dims) == 2 and "lm_head" not in n.name}
    sa = {node: [int(c) for c in r.get("channels") or []] for r in report.get("input_ranges", []) for node in r["nodes"]}
    chosen, total = {}, 0.0
    for entry in report["input_importance"]:
        nodes = [n for n in entry["nodes"] if n in weight_of]
        if not nodes:
            continue
        x2 = np.asarray(entry["sum_sq"], np.float64) / max(1, entry["tokens"])
        ws = {n: numpy_helper.to_array(inits[weight_of[n]]).astype(np.float32) for n in nodes}
        alphas = ALPHAS if migrate and not any("o_proj" in n for n in nodes) else (0.0,)
        best = None
        for alpha in alphas:
            hats = {n: fake_quantize(w, x2, alpha, block, sa.get(n, [])) for n, w in ws.items()}
            err = sum(error(ws[n], hats[n], x2) for n in nodes)
            if best is None or err < best[0]:
                best = (err, alpha, hats)
        total += best[0]
        for n in nodes:
            chosen[n] = best[1]
            inits[weight_of[n]].CopyFrom(numpy_helper.from_array(best[2][n], weight_of[n]))
    onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    used = [a for a in chosen.values()]
    return {"layers": len(chosen), "weighted_error": total,
            "alpha_counts": {str(a): used.count(a) for a in ALPHAS if used.count(a)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(Path.home() / ".cache/sw-onnx/smollm2-135m-offgrid-s0"))
    parser.add_argument("--report", required=True, help="sw-onnx detect --json of the model")
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--bos", action="store_true", help="BOS + context - 1 tokens per window (Gemma)")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    from sw_onnx.inputs import bos_convention

    folder = Path(args.model)
    report = json.loads(Path(args.report).read_text())
    arms = [({"model": folder.name, "block": block, "migration": migrate},
             lambda dst, block=block, migrate=migrate: build(folder / "model.onnx", dst, report, block, migrate))
            for block in args.blocks for migrate in (False, True)]
    evaluate_arms(folder, arms, windows=args.windows, bos=bos_convention(folder)[0] if args.bos else None,
                  json_path=args.json_path)

if __name__ == "__main__":
    main()
