"""Quantization cost: wall time and peak RSS of sw-onnx vs onnxruntime's MatMulNBitsQuantizer, same model.

Both tools quantize the same linear layers to int4 (block --block-size, symmetric) in their own process
(peak RSS = that process's VmHWM); each measurement is the median of --repeat runs. The model is measured
as given (inline weights) and as an external-data copy (where sw-onnx memory-maps the weights). sw-onnx runs
with a precomputed detect report (`--keep REPORT`) and `--no-verify`, so both tools do the same work: read,
quantize, write. Also reports weight bytes processed per second.

Usage: python bench/quantize_speed.py [MODEL] [--block-size 32] [--repeat 3] [--markdown FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, logging
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
tool, src, dst, block, keep = sys.argv[1:6]
t = time.perf_counter()
if tool == "onnxruntime":
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    from onnxruntime.quantization.quant_utils import QuantFormat
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    q = mnq.MatMulNBitsQuantizer(onnx.load(src), bits=4, block_size=int(block), is_symmetric=True, quant_format=QuantFormat.QDQ)
    q.process()
    q.model.save_model_to_file(dst, use_external_data_format=True)
else:
    from sw_onnx.quantize import QuantizeConfig, quantize_model
    quantize_model(src, dst, QuantizeConfig(bits=4, block_size=int(block), symmetric=True, keep=keep, verify=False, force=True))
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": peak()}))
"""


def _weights_bytes(path: Path) -> int:
    import onnx_ir as ir

    from sw_onnx.discover import find_linear_layers

    layers, _ = find_linear_layers(ir.load(path))
    seen = {layer.weight.initializer.name: layer.k * layer.n * 4 for layer in layers}
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--markdown")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    if args.model is None:
        from sample_models.export_smollm2 import export_smollm2

        args.model = str(export_smollm2(quiet=True))
    src = Path(args.model)
    src = src / "model.onnx" if src.is_dir() else src
    work = Path(tempfile.mkdtemp(prefix="sw-onnx-qspeed-"))
    try:
        import onnx

        external = work / "external" / "model.onnx"
        external.parent.mkdir()
        onnx.save(onnx.load(str(src)), str(external), save_as_external_data=True, location="model.onnx.data")
        report = work / "detect.json"
        subprocess.run([sys.executable, "-m", "sw_onnx.cli", "detect", str(src), "--json", str(report)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root)
        weight_bytes = _weights_bytes(src)
        rows = []
        for storage, model in (("inline", src), ("external data", external)):
            for tool in ("onnxruntime", "sw-onnx"):
                runs = []
                for i in range(args.repeat):
                    dst = work / f"out{i}" / "q.onnx"
                    dst.parent.mkdir(exist_ok=True)
                    out = subprocess.run([sys.executable, "-c", CHILD, tool, str(model), str(dst), str(args.block_size), str(report)],
                                         capture_output=True, text=True, check=True, cwd=root)
                    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                    shutil.rmtree(dst.parent)
                rows.append({"storage": storage, "tool": tool,
                             "seconds": statistics.median(r["seconds"] for r in runs),
                             "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"int4 sym block {args.block_size}, {weight_bytes / 1e6:.0f} MB of fp32 linear weights, median of {args.repeat}, "
             f"{time.strftime('%Y-%m-%d')}, `python bench/quantize_speed.py`.", "",
             "| model storage | tool | wall s | peak RSS MB | weights MB/s | time vs onnxruntime | RSS vs onnxruntime |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        peer = next(p for p in rows if p["storage"] == r["storage"] and p["tool"] == "onnxruntime")
        lines.append(f"| {r['storage']} | {r['tool']} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{weight_bytes / 1e6 / r['seconds']:.0f} | {r['seconds'] / peer['seconds']:.2f}x | "
                     f"{r['peak_rss_mb'] / peer['peak_rss_mb']:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"weight_bytes": weight_bytes, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
