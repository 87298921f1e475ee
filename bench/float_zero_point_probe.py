"""Probe for issue 13's item 4: do float zero points (MatMulNBits accepts zero points of the scale's type in
``--format nbits``) help int4 off the GGUF grid, and are they worth their bits?

Both arms are fake-quantized copies of the model (every linear layer's weight replaced by its dequantized
int4 value, the lm_head float, activations fp32), so the difference is the zero point alone:

- *integer zp*: `sw_onnx.kernels.quantize_blockwise(clip="mse", refit=2)` (the default's search and scale
  refit, w^2-weighted: no detection report needed), uint4 zero point per block;
- *float zp*: the same codes, then per block a weighted least-squares fit of ``w ~ s * q + m`` (scale and
  offset free, as GGUF's Q4_1 stores them), codes re-rounded with it, 3 rounds, kept where the weighted
  error falls; the zero point ``-m / s`` is a float (32 bits per block with fp32 scales, vs 4).

Usage::

    python bench/float_zero_point_probe.py [MODEL_DIR] [--blocks 32 128] [--windows 16] [--json OUT]
"""

from __future__ import annotations

import argparse
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


def float_zero_point(w: np.ndarray, block: int, rounds: int = 3) -> tuple[np.ndarray, float, float]:
    """(dequantized weight, weighted error of the integer-zp start, of the float-zp result) for w [K, N]."""
    qw = quantize_blockwise(w, bits=4, block_size=block, clip="mse", refit=2)
    k, n = w.shape
    nb = -(-k // block)
    pad = nb * block - k
    blocks = np.pad(w, ((0, pad), (0, 0))).reshape(nb, block, n)
    q = np.pad(qw.q.astype(np.float32), ((0, pad), (0, 0))).reshape(nb, block, n)
    s = qw.scale[:, None, :].astype(np.float32)
    m = -qw.zero_point[:, None, :].astype(np.float32) * s
    c = np.square(blocks)  # the w^2 error weight of the start

    def error(s, m, q):
        r = blocks - (q * s + m)
        return (c * r * r).sum(axis=1, keepdims=True)

    best = error(s, m, q)
    start = float(best.sum())
    for _ in range(rounds):
        sw = c.sum(axis=1, keepdims=True)
        sw = np.where(sw > 0, sw, 1)
        mq, mw = (c * q).sum(axis=1, keepdims=True) / sw, (c * blocks).sum(axis=1, keepdims=True) / sw
        cov = (c * (q - mq) * (blocks - mw)).sum(axis=1, keepdims=True)
        var = (c * (q - mq) ** 2).sum(axis=1, keepdims=True)
        s_new = np.where(var > 0, cov / np.where(var > 0, var, 1), s).astype(np.float32)
        m_new = (mw - s_new * mq).astype(np.float32)
        safe = np.where(s_new != 0, s_new, 1)
        q_new = np.clip(np.rint((blocks - m_new) / safe), 0, 15).astype(np.float32)
        err = error(s_new, m_new, q_new)
        better = err < best
        s, m, q, best = np.where(better, s_new, s), np.where(better, m_new, m), np.where(better, q_new, q), np.minimum(err, best)
    deq = (q * s + m).reshape(nb * block, n)[:k]
    return deq, start, float(best.sum())


def fake_quantized(src: Path, dst: Path, block: int, arm: str) -> dict:
    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    done, errors = set(), [0.0, 0.0]
    for node in model.graph.node:
        name = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else None
        if name not in inits or name in done or "lm_head" in node.name or len(inits[name].dims) != 2:
            continue
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        if arm == "int":
            deq = dequantize_blockwise(quantize_blockwise(w, bits=4, block_size=block, clip="mse", refit=2))
        else:
            deq, e0, e1 = float_zero_point(w, block)
            errors[0] += e0
            errors[1] += e1
        inits[name].CopyFrom(numpy_helper.from_array(deq.astype(np.float32), name))
        done.add(name)
    onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    return {"layers": len(done), "weighted_error_int_zp": errors[0] or None, "weighted_error_float_zp": errors[1] or None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(Path.home() / ".cache/sw-onnx/smollm2-135m-offgrid-s0"))
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    folder = Path(args.model)
    arms = [({"block": block, "zero_point": arm, "bits_per_weight": 4 + (32 + (4 if arm == "int" else 32)) / block},
             lambda dst, block=block, arm=arm: fake_quantized(folder / "model.onnx", dst, block, arm))
            for block in args.blocks for arm in ("int", "float")]
    evaluate_arms(folder, arms, windows=args.windows, json_path=args.json_path)

if __name__ == "__main__":
    main()
