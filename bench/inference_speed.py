"""CPU inference with onnxruntime: fp32 vs onnxruntime's int4 (MatMulNBitsQuantizer) vs sw-onnx's int4.

onnxruntime's quantizer leaves the tied lm_head float (it does not see its transposed weight as a constant);
sw-onnx rows: the same layers (`--lm-head-bits 0`), the default (lm_head 8-bit blocks of 32, fused into
MatMulNBits bits=8), and the lm_head at int4 like the rest (`--lm-head`, about +3-4 perplexity here).

For each model variant, in its own process: session load time, peak RSS, prefill latency (PROMPT tokens),
decode latency per token with the KV cache (median over steps and repetitions), tokens/s, file size.
The variants run in rounds (each once per round, order rotated); ratios to fp32 and to onnxruntime's int4 are
the median of the per-round ratios, so the machine's drift over minutes cancels. Writes a markdown table
(stdout, and --markdown FILE) and --json.

Usage: python bench/inference_speed.py [KV_MODEL_DIR] [--block-size 128] [--rounds 5] [--repeat 1] [--prefill 128] [--decode 32]
KV_MODEL_DIR defaults to the SmolLM2-135M KV-cache export (sample_models/export_smollm2.py --with-past).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import write_outputs  # noqa: E402

CHILD = r"""
import json, sys, time, numpy as np, onnxruntime as ort
def peak_rss_mb():  # VmHWM: this process image's own high-water mark (ru_maxrss survives exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
path, prefill, decode, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
o = ort.SessionOptions(); o.log_severity_level = 3
s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
load = time.perf_counter() - t0
inputs = {i.name: i for i in s.get_inputs()}
outs = [o.name for o in s.get_outputs()]
pasts = [n for n in inputs if n.startswith("past_key_values")]
presents = [n.replace("past_key_values", "present") for n in pasts]
def shape_of(n):
    return [1 if not isinstance(d, int) else d for d in inputs[n].shape]
def run(ids, past, past_len):
    t = len(ids)
    feeds = {"input_ids": np.array([ids], dtype=np.int64),
             "attention_mask": np.ones((1, past_len + t), dtype=np.int64),
             "position_ids": np.arange(past_len, past_len + t, dtype=np.int64)[None]}
    for n in pasts:
        feeds[n] = past[n]
    res = dict(zip(outs, s.run(outs, feeds)))
    return res["logits"][0, -1], {p: res[q] for p, q in zip(pasts, presents)}
rng = np.random.default_rng(0)
prompt = rng.integers(100, 10000, prefill).tolist()
prefill_s, decode_s = [], []
for _ in range(repeat):
    empty = {}
    for n in pasts:
        shp = shape_of(n); shp[2] = 0
        empty[n] = np.zeros(shp, dtype=np.float32)
    t = time.perf_counter(); logits, past = run(prompt, empty, 0); prefill_s.append(time.perf_counter() - t)
    tok = int(np.argmax(logits)); length = prefill
    for _ in range(decode):
        t = time.perf_counter(); logits, past = run([tok], past, length); decode_s.append(time.perf_counter() - t)
        tok = int(np.argmax(logits)); length += 1
print(json.dumps({"load_s": load, "prefill_s": float(np.median(prefill_s)), "decode_s": float(np.median(decode_s)),
                  "peak_rss_mb": peak_rss_mb()}))
"""


def _size(path: Path) -> int:
    data = [p for p in path.parent.iterdir() if p.name.startswith(path.name)]
    return sum(p.stat().st_size for p in data)


def _ort_int4(src: Path, dst: Path, block: int) -> None:
    import logging

    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    from onnxruntime.quantization.quant_utils import QuantFormat

    model = onnx.load(str(src))
    q = mnq.MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=False, quant_format=QuantFormat.QDQ)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--markdown")
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from sample_models.export_smollm2 import export_smollm2

        args.model = str(export_smollm2(with_past=True, quiet=True))
    src = Path(args.model)
    src = src / "model.onnx" if src.is_dir() else src
    work = Path(tempfile.mkdtemp(prefix="sw-onnx-bench-"))
    try:
        variants = {"fp32": src}
        variants["onnxruntime int4"] = work / "ort_int4.onnx"
        _ort_int4(src, variants["onnxruntime int4"], args.block_size)
        sw_variants = (("sw-onnx int4, lm_head float", ["--lm-head-bits", "0"]),
                       ("sw-onnx int4 (default: lm_head int8)", []),
                       ("sw-onnx int4 + lm_head int4", ["--lm-head"]))
        for name, extra in sw_variants:
            variants[name] = work / f"sw_{len(variants)}.onnx"
            subprocess.run([sys.executable, "-m", "sw_onnx.cli", "quantize", str(src), "-o", str(variants[name]),
                            "--block-size", str(args.block_size), "--bits", "4", *extra], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Rounds, each running every variant once (in a rotated order): the machine's drift over minutes
        # then cancels in the per-round ratios, of which the median is reported.
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        names = list(variants)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                out = subprocess.run([sys.executable, "-c", CHILD, str(variants[name]), str(args.prefill), str(args.decode),
                                      str(args.repeat)], capture_output=True, text=True, check=True).stdout
                runs[name].append(json.loads(out.strip().splitlines()[-1]))
        rows = {}
        for name, path in variants.items():
            rows[name] = {key: statistics.median(run[key] for run in runs[name]) for key in runs[name][0]}
            rows[name]["bytes"] = _size(path)
            for peer in ("fp32", "onnxruntime int4"):
                rows[name][f"decode_vs_{peer}"] = statistics.median(
                    a["decode_s"] / b["decode_s"] for a, b in zip(runs[name], runs[peer]))
            rows[name]["runs"] = runs[name]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"Block {args.block_size}, prefill {args.prefill} tokens, decode {args.decode} tokens with KV cache; {args.rounds} rounds "
        f"(each variant once per round, {args.repeat} run(s) each), medians; ratios: median of the per-round ratios; "
        f"{os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}.",
        "",
        "| model | size MB | load s | peak RSS MB | prefill ms | decode ms/token | tokens/s | decode vs fp32 | decode vs onnxruntime int4 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['bytes'] / 1e6:.0f} | {r['load_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['prefill_s'] * 1000:.0f} | "
                     f"{r['decode_s'] * 1000:.1f} | {1 / r['decode_s']:.1f} | {r['decode_vs_fp32']:.2f}x | "
                     f"{r['decode_vs_onnxruntime int4']:.2f}x |")
    same, sw = rows["sw-onnx int4, lm_head float"], rows["sw-onnx int4 (default: lm_head int8)"]
    lines.append("")
    lines.append(f"Same layers as onnxruntime: sw-onnx int4 decode = {same['decode_vs_onnxruntime int4']:.2f}x onnxruntime int4. "
                 f"sw-onnx default = {sw['decode_vs_fp32']:.2f}x fp32, {sw['decode_vs_onnxruntime int4']:.2f}x onnxruntime int4.")
    write_outputs("\n".join(lines), rows, args.markdown, args.json_path)


if __name__ == "__main__":
    main()
