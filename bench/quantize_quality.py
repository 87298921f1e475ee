"""WikiText-2 perplexity of int4/int8 SmolLM2-135M: onnxruntime's RTN vs sw-onnx with/without keep-out, per clip mode.

Protocol: sw_onnx.evaluate (WikiText-2 test from its start, no BOS, windows of 512, first --windows windows).
Same set of layers for both tools: the 210 linear layers with a weight initializer; the tied lm_head stays
float in both (onnxruntime's quantizer does not see its transposed weight as constant; sw-onnx's default).
Super weights come from one `sw-onnx detect` run, passed to every keep-out variant as a report.
Also records wall time and peak RSS (VmHWM, own process) of each quantizer, and file sizes.

Usage: python bench/quantize_quality.py [MODEL_DIR] [--windows 8] [--blocks 32 64 128 256 512 1024]
       [--markdown docs/quantize_quality.md] [--json docs/quantize_quality.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUANTIZE_CHILD = r"""
import json, sys, time, logging
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
tool, src, dst, bits, block, sym, clip, keep = sys.argv[1:9]
t = time.perf_counter()
if tool == "ort":
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    from onnxruntime.quantization.quant_utils import QuantFormat
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    q = mnq.MatMulNBitsQuantizer(onnx.load(src), bits=int(bits), block_size=int(block), is_symmetric=sym == "1",
                                 quant_format=QuantFormat.QDQ)
    q.process()
    q.model.save_model_to_file(dst, use_external_data_format=False)
else:
    from sw_onnx.quantize import QuantizeConfig, quantize_model
    quantize_model(src, dst, QuantizeConfig(bits=int(bits), block_size=int(block), symmetric=sym == "1", clip=clip,
                                            keep=keep, force=True, verify=False))
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": peak()}))
"""


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    parser.add_argument("--markdown", default="docs/quantize_quality.md")
    parser.add_argument("--json", dest="json_path", default="docs/quantize_quality.json")
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from sw_onnx.evaluate import default_wikitext_path, load_tokenizer, perplexity, wikitext_token_ids

    if args.model is None:
        from sample_models.export_smollm2 import export_smollm2

        args.model = str(export_smollm2(quiet=True))
    folder = Path(args.model)
    src = folder / "model.onnx" if folder.is_dir() else folder
    ids = wikitext_token_ids(load_tokenizer(src.parent), default_wikitext_path())
    work = Path(tempfile.mkdtemp(prefix="sw-onnx-quality-"))
    report = work / "detect.json"
    subprocess.run([sys.executable, "-m", "sw_onnx.cli", "detect", str(src), "--json", str(report)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ppl(path: Path) -> float:
        return perplexity(path, ids, context=512, max_windows=args.windows).perplexity

    rows = [{"name": "fp32", "bits": 32, "block": None, "ppl": ppl(src), "bytes": _size(src)}]
    print(f"fp32: {rows[0]['ppl']:.2f}", file=sys.stderr)
    configs = []
    for block in args.blocks:
        configs.append(("ort", 4, block, "1", "none", "none", f"onnxruntime RTN sym b{block}"))
        for clip in ("none", "zscore", "mse"):
            for keep in ("none", str(report)):
                label = f"sw-onnx sym b{block} clip={clip} keep={'yes' if keep != 'none' else 'no'}"
                configs.append(("sw", 4, block, "1", clip, keep, label))
    configs.append(("ort", 8, 128, "1", "none", "none", "onnxruntime RTN int8 sym b128"))
    configs.append(("sw", 8, 128, "1", "none", str(report), "sw-onnx int8 sym b128 keep=yes"))
    for tool, bits, block, sym, clip, keep, label in configs:
        dst = work / "q.onnx"
        out = subprocess.run([sys.executable, "-c", QUANTIZE_CHILD, tool, str(src), str(dst), str(bits), str(block), sym, clip, keep],
                             capture_output=True, text=True, cwd=root)
        if out.returncode != 0:
            rows.append({"name": label, "bits": bits, "block": block, "error": out.stderr.strip().splitlines()[-1][:200]})
            print(f"{label}: FAILED {rows[-1]['error']}", file=sys.stderr)
            continue
        stats = json.loads(out.stdout.strip().splitlines()[-1])
        row = {"name": label, "tool": tool, "bits": bits, "block": block, "clip": clip, "keep": keep != "none",
               "ppl": ppl(dst), "bytes": _size(dst), **stats}
        rows.append(row)
        print(f"{label}: {row['ppl']:.2f} ({row['seconds']:.1f} s, {row['peak_rss_mb']:.0f} MB)", file=sys.stderr)
        for p in work.iterdir():
            if p.name.startswith("q.onnx"):
                p.unlink()
    lines = [f"SmolLM2-135M-Instruct, WikiText-2 perplexity ({args.windows} windows of 512), {time.strftime('%Y-%m-%d')}, "
             f"`python bench/quantize_quality.py --windows {args.windows}`.", "",
             "| variant | ppl | size MB | quantize s | quantize peak RSS MB |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | |")
        else:
            lines.append(f"| {r['name']} | {r['ppl']:.2f} | {r['bytes'] / 1e6:.0f} | {r.get('seconds', 0):.1f} | {r.get('peak_rss_mb', 0):.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.markdown).write_text(text)
    Path(args.json_path).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
