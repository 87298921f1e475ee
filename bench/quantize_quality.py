"""int4 quality on real float weights: WikiText-2 perplexity and bits per weight of every quantizer row, on
several models, on and off the GGUF's 4-bit grid (issue 13).

Models (by name; each is a folder under the cache, `sample_models/`): ``smollm2`` (SmolLM2-135M-Instruct as
exported from its Q4_1 GGUF: its weights sit on a 4-bit grid), ``smollm2-offgrid`` (the same network with every
linear layer's K axis permuted, `sample_models/offgrid.py`: same function, weights off the grid), ``gemma3``
and ``gemma3-offgrid`` (Gemma-3-270M from its Q4_K_M GGUF, `sample_models/export_gemma3.py`).

Protocol: `sw_onnx.evaluate.perplexity`, WikiText-2 test from its start, non-overlapping windows of 512, the
first --windows windows (16 for SmolLM2, 8 for Gemma); a model whose tokenizer config adds BOS (Gemma) gets
BOS + 511 tokens per window. onnxruntime CPU, default session (QDQ fused into MatMulNBits, accuracy_level 4).
The lm_head stays float in every row (onnxruntime's quantizer is told to leave it: same layers for all), so
bits per weight count the same weights: every bit written for the quantized linear layers (codes, scales,
zero points; for sw-onnx also its float side paths: `sw_onnx.plan.layer_bits`) over their weights.

Rows per block size: onnxruntime `MatMulNBitsQuantizer` RTN symmetric and asymmetric (QDQ), HQQ (float zero
points, QOperator), k_quant (QOperator; failures noted); sw-onnx RTN (``--clip none``), the sw-onnx default,
``--bits-per-weight 4.5`` and ``4.85`` (``--allocation damage``, the default planner), the k_quant_mixed-style
rule (``--allocation kquant``) at the same budgets, the whole rule, and the planner at the whole rule's bits.
Super weights (and input statistics) come from one ``sw-onnx detect --json`` report per model.

Rows are kept in --json as they are measured (``--resume`` skips those already there), so a long run can be
continued. Usage::

    python bench/quantize_quality.py [--models smollm2 smollm2-offgrid gemma3 gemma3-offgrid] [--blocks 32 64 128 256]
        [--windows N] [--resume] [--only ROW ...] [--markdown docs/quantize_quality.md] [--json docs/quantize_quality.json]
    python bench/quantize_quality.py --from-json      # rewrite the markdown only
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

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"smollm2": "smollm2-135m", "smollm2-offgrid": "smollm2-135m-offgrid-s0", "gemma3": "gemma3-270m",
          "gemma3-offgrid": "gemma3-270m-offgrid-s0"}
DEFAULT_WINDOWS = {"smollm2": 16, "smollm2-offgrid": 16, "gemma3": 8, "gemma3-offgrid": 8}
BUDGETS = (4.5, 4.85)
ROWS = ("ort-rtn-sym", "ort-rtn-asym", "ort-hqq", "ort-kquant", "sw-rtn", "sw-default", "sw-bpw-4.5", "sw-bpw-4.85",
        "kquant-bpw-4.5", "kquant-bpw-4.85", "kquant-rule", "sw-bpw-rule")
SIZE_ROWS = ("size-default", "size-emb-float", "size-emb8-b128", "size-emb4", "size-emb4-head4", "size-head-float")
"""Whole outputs as shipped (the lm_head and embedding included), at the default block: size and perplexity."""
SIZE_PARAMS = {"size-default": {}, "size-emb-float": {"embedding_bits": 0}, "size-emb4": {"embedding_bits": 4},
               "size-emb8-b128": {"embedding_bits": 8, "lm_head_block_size": 128},
               "size-emb4-head4": {"embedding_bits": 4, "lm_head_bits": 4}, "size-head-float": {"lm_head_bits": 0, "embedding_bits": 0}}
LABELS = {
    "ort-rtn-sym": "onnxruntime RTN symmetric", "ort-rtn-asym": "onnxruntime RTN asymmetric",
    "ort-hqq": "onnxruntime HQQ", "ort-kquant": "onnxruntime k_quant", "sw-rtn": "sw-onnx RTN (`--clip none`)",
    "sw-default": "sw-onnx default", "sw-bpw-4.5": "sw-onnx `--bits-per-weight 4.5`",
    "sw-bpw-4.85": "sw-onnx `--bits-per-weight 4.85`", "kquant-bpw-4.5": "k_quant_mixed-style rule within 4.5",
    "kquant-bpw-4.85": "k_quant_mixed-style rule within 4.85", "kquant-rule": "k_quant_mixed-style rule, whole",
    "sw-bpw-rule": "sw-onnx `--bits-per-weight` = the whole rule's",
    "size-default": "default (`QuantizeConfig()`: lm_head and embedding 8-bit, one shared table when tied)",
    "size-emb-float": "`--embedding-bits 0` (embedding float)",
    "size-emb8-b128": "`--embedding-bits 8 --lm-head-block-size 128`", "size-emb4": "`--embedding-bits 4`",
    "size-emb4-head4": "`--embedding-bits 4 --lm-head-bits 4`", "size-head-float": "`--lm-head-bits 0 --embedding-bits 0`",
}

CHILD = r"""
import json, sys, time, logging
t = time.perf_counter()
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
tool, src, dst, params = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
out = {}
if tool == "ort":
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    from onnxruntime.quantization.quant_utils import QuantFormat
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    algo = None
    fmt = QuantFormat.QDQ
    if params["algo"] == "hqq":
        algo, fmt = mnq.HQQWeightOnlyQuantConfig(block_size=params["block_size"], bits=4), QuantFormat.QOperator
    elif params["algo"] == "k_quant":
        algo, fmt = mnq.KQuantWeightOnlyQuantConfig(), QuantFormat.QOperator
    q = mnq.MatMulNBitsQuantizer(onnx.load(src), bits=4, block_size=params["block_size"], is_symmetric=params["symmetric"],
                                 quant_format=fmt, nodes_to_exclude=params["exclude"], algo_config=algo)
    q.process()
    q.model.save_model_to_file(dst, use_external_data_format=False)
else:
    from sw_onnx.quantize import QuantizeConfig, quantize_model
    s = quantize_model(src, dst, QuantizeConfig(**params, force=True, verify=False))
    t_ = s.totals()
    out = {"bits_per_weight": t_["bits_per_weight"], "eight_bit_share": sum(p.k * p.n for p in s.quantized if p.bits == 8) / t_["weights"],
           "bits_per_weight_with_embeddings": t_["bits_per_weight_with_embeddings"], "quantized_layers": t_["quantized"]}
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": peak(), **out}))
"""


def _run_child(tool: str, src: Path, dst: Path, params: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, tool, str(src), str(dst), json.dumps(params)],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        raise RuntimeError((out.stderr.strip().splitlines() or ["failed"])[-1][:300])
    # k_quant's progress bar ends without a newline, so the result may share its line: parse from its start
    return json.loads(out.stdout[out.stdout.rindex('{"seconds"'):].splitlines()[0])


def file_bits_per_weight(path: Path) -> tuple[float, int]:
    """(bits per weight, layers) of a file's quantized linear layers: the bytes of MatMulNBits' B, scales and
    zero points, or of a DequantizeLinear's codes, scales and zero points, over their K * N weights."""
    import numpy as np
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    sizes = {t.name: _tensor_bits(t) for t in model.graph.initializer}
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    bits = weights = layers = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            weights += attrs["K"] * attrs["N"]
        elif node.op_type == "DequantizeLinear" and node.input[0] in dims and len(dims[node.input[0]]) == 2:
            weights += int(np.prod(dims[node.input[0]]))
        else:
            continue
        layers += 1
        bits += sum(sizes.get(i, 0) for i in (node.input[1:4] if node.op_type == "MatMulNBits" else node.input[:3]))
    return (bits / weights if weights else float("nan")), layers


def _tensor_bits(t) -> int:
    import numpy as np
    from onnx import TensorProto

    width = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.UINT8: 8, TensorProto.INT8: 8,
             TensorProto.FLOAT16: 16, TensorProto.FLOAT: 32}.get(t.data_type, 0)
    return int(np.prod(t.dims)) * width if t.dims else width


def _params(row: str, block: int, report: str, rule_bpw: float | None) -> tuple[str, dict] | None:
    if row in SIZE_PARAMS:
        return "sw", {"keep": report, **SIZE_PARAMS[row]}
    sw = {"block_size": block, "keep": report, "lm_head_bits": 0, "embedding_bits": 0}  # the linear layers only
    if row.startswith("ort-"):
        algo = {"ort-hqq": "hqq", "ort-kquant": "k_quant"}.get(row, "rtn")
        return "ort", {"algo": algo, "block_size": block, "symmetric": row == "ort-rtn-sym", "exclude": ["/lm_head/MatMul"]}
    if row == "sw-rtn":
        return "sw", {**sw, "clip": "none"}
    if row == "sw-default":
        return "sw", sw
    if row.startswith("sw-bpw-") and row != "sw-bpw-rule":
        return "sw", {**sw, "bits_per_weight": float(row.rsplit("-", 1)[1])}
    if row.startswith("kquant-bpw-"):
        return "sw", {**sw, "allocation": "kquant", "bits_per_weight": float(row.rsplit("-", 1)[1])}
    if row == "kquant-rule":
        return "sw", {**sw, "allocation": "kquant"}
    if row == "sw-bpw-rule":
        return ("sw", {**sw, "bits_per_weight": rule_bpw}) if rule_bpw else None
    raise ValueError(row)


def measure(args) -> None:
    from sw_onnx.evaluate import default_wikitext_path, load_tokenizer, perplexity, wikitext_token_ids
    from sw_onnx.inputs import bos_convention

    cache = Path(os.environ.get("SW_ONNX_CACHE", Path.home() / ".cache" / "sw-onnx"))
    data = json.loads(Path(args.json_path).read_text()) if args.resume and Path(args.json_path).is_file() else {"rows": []}
    selected = set(ROWS if args.only is None else args.only) | set(args.size or ())

    def retried(r: dict) -> bool:  # a failed row this run measures again (a refused budget stays refused)
        return args.retry_failed and "error" in r and "alone costs" not in r["error"] and r["row"] in selected \
            and r["model"] in args.models and (r["block"] in args.blocks or r["row"] in SIZE_ROWS)

    data["rows"] = [r for r in data["rows"] if not retried(r)]
    done = {(r["model"], r["block"], r["row"]) for r in data["rows"]}
    work = Path(tempfile.mkdtemp(prefix="sw-onnx-quality-"))
    for name in args.models:
        folder = cache / MODELS[name]
        if not (folder / "model.onnx").is_file():
            print(f"{name}: {folder} missing, skipped", file=sys.stderr)
            continue
        windows = args.windows or DEFAULT_WINDOWS[name]
        bos, add_bos = bos_convention(folder)
        ids = wikitext_token_ids(load_tokenizer(folder), default_wikitext_path())

        def ppl(path: Path) -> float:
            return perplexity(path, ids, context=512, max_windows=windows, bos=bos if add_bos else None).perplexity

        report = work / f"{name}.detect.json"
        if not report.is_file():
            subprocess.run([sys.executable, "-m", "sw_onnx.cli", "detect", str(folder), "--json", str(report)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if (name, 0, "fp32") not in done:
            _record(data, args, {"model": name, "block": 0, "row": "fp32", "windows": windows, "ppl": ppl(folder / "model.onnx")})
        for block in args.blocks:
            for row in ROWS if args.only is None else args.only:
                if (name, block, row) in done:
                    continue
                rule = next((r.get("bits_per_weight") for r in data["rows"] if (r["model"], r["block"], r["row"]) == (name, block, "kquant-rule")), None)
                spec = _params(row, block, str(report), rule)
                if spec is None:
                    continue
                _record(data, args, _measure_row(name, block, row, spec, folder, work, windows, ppl))
        for row in args.size or ():
            if (name, 0, row) not in done:
                _record(data, args, _measure_row(name, 0, row, _params(row, 0, str(report), None), folder, work,
                                                 windows, ppl))
    data.update(date=time.strftime("%Y-%m-%d"), cores=os.cpu_count())
    Path(args.json_path).write_text(json.dumps(data, indent=1))


def _measure_row(name, block, row, spec, folder, work, windows, ppl) -> dict:
    tool, params = spec
    rec = {"model": name, "block": block, "row": row, "windows": windows,
           "params": {k: ("report" if k == "keep" else v) for k, v in params.items()}}
    dst = work / "q.onnx"
    try:
        rec.update(_run_child(tool, folder / "model.onnx", dst, params))
        if tool == "ort":
            rec["bits_per_weight"], rec["layers"] = file_bits_per_weight(dst)
        rec["bytes"] = sum(p.stat().st_size for p in work.iterdir() if p.name.startswith("q.onnx"))
        rec["ppl"] = ppl(dst)
    except Exception as e:  # one failed row must not lose the others
        rec["error"] = str(e)[:300]
    for p in work.iterdir():
        if p.name.startswith("q.onnx"):
            p.unlink()
    return rec


def _record(data: dict, args, rec: dict) -> None:
    data["rows"].append(rec)
    Path(args.json_path).write_text(json.dumps(data, indent=1))
    text = f"{rec['ppl']:.2f}" if "ppl" in rec else f"FAILED {rec.get('error')}"
    print(f"{rec['model']} b{rec['block']} {rec['row']}: {text} ({rec.get('bits_per_weight', '')} bpw)", file=sys.stderr)


def markdown(data: dict) -> str:
    lines = ["# int4 quality on real float weights, on and off the 4-bit grid", "",
             f"`python bench/quantize_quality.py` ({data.get('date', '')}, {data.get('cores', '')} cores; rows as "
             "measured, `--resume` continues a run). WikiText-2 perplexity (windows of 512 from the test text's start; "
             "Gemma: BOS + 511 tokens per window), onnxruntime CPU default session. The lm_head stays float in every "
             "row; **bpw** = bits per weight over the same quantized layers (codes, scales, zero points and sw-onnx's "
             "float side paths). *gap closed* = (best onnxruntime RTN - row) / (best onnxruntime RTN - fp32) at that "
             "block size. Lower perplexity is better.", ""]
    rows = data["rows"]
    for name in MODELS:
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            continue
        fp32 = next((r["ppl"] for r in mine if r["row"] == "fp32"), float("nan"))
        windows = next((r["windows"] for r in mine), "")
        lines += [f"## {name} ({MODELS[name]}), {windows} windows, fp32 {fp32:.2f}", ""]
        blocks = sorted({r["block"] for r in mine if r["block"]})
        lines += ["| row | " + " | ".join(f"b{b}: ppl | bpw | gap closed" for b in blocks) + " |",
                  "|---|" + "---|---|---|" * len(blocks)]
        for row in ROWS:
            cells = []
            for b in blocks:
                r = next((x for x in mine if x["block"] == b and x["row"] == row), None)
                best = min((x["ppl"] for x in mine if x["block"] == b and x["row"] in ("ort-rtn-sym", "ort-rtn-asym")
                            and "ppl" in x), default=float("nan"))
                if r is None:
                    cells.append(" | | ")
                elif "error" in r and "alone costs" in r["error"]:
                    cells.append("n/a | | ")  # below what int4 at this block costs everywhere
                elif "error" in r:
                    cells.append(f"failed: {r['error'][:80]} | | ")
                else:
                    gap = (best - r["ppl"]) / (best - fp32) if best == best and best != fp32 else float("nan")
                    cells.append(f"{r['ppl']:.2f} | {r.get('bits_per_weight', float('nan')):.3f} | {gap:+.0%}")
            lines.append(f"| {LABELS[row]} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _checks(rows)
    sized = [r for r in rows if r["row"] in SIZE_ROWS]
    if sized:
        lines += ["## Whole outputs as shipped (lm_head and embeddings included)", "",
                  "| model | output | ppl | MB | MiB | bits per weight (linear layers) | with embeddings |", "|---|---|---|---|---|---|---|"]
        for r in sized:
            if "error" in r:
                lines.append(f"| {r['model']} | {LABELS[r['row']]} | failed: {r['error'][:80]} | | | | |")
            else:
                label = LABELS[r["row"]] + (f" ({r['note']})" if r.get("note") else "")
                lines.append(f"| {r['model']} | {label} | {r['ppl']:.2f} | {r['bytes'] / 1e6:.1f} | {r['bytes'] / 2**20:.1f} | "
                             f"{r.get('bits_per_weight', float('nan')):.3f} | {r.get('bits_per_weight_with_embeddings') or float('nan'):.3f} |")
        lines.append("")
    lines += ["Notes:", "",
              "- n/a: a `--bits-per-weight` below what int4 at that block costs everywhere (5.14 at b32 with fp32 "
              "scales and the side paths) is refused as a usage error.",
              "- The k_quant_mixed-style rule (`--allocation kquant`): llama.cpp's use_more_bits as onnxruntime-genai's "
              "k_quant_mixed applies it (q/k/v and down_proj of layers i < n/8, i >= 7n/8, (i - n/8) % 3 == 2 at "
              "8 bits; the lm_head too, float here), taken in that order while the budget lasts.",
              "- onnxruntime HQQ and k_quant write MatMulNBits directly (QOperator); HQQ's zero points are floats.", ""]
    return "\n".join(lines)


def _cells(rows: list[dict]):
    """Per model and block with an fp32, an onnxruntime RTN and a default row: (model, block, get, best RTN
    row, default row, closed) where `get(row)` is that cell's measured row (or None) and `closed(r)` the share
    of the gap from the best RTN to fp32 that `r` closes."""
    def get(model, block, row):
        return next((x for x in rows if (x["model"], x["block"], x["row"]) == (model, block, row) and "ppl" in x), None)

    for name in MODELS:
        fp32 = get(name, 0, "fp32")
        for block in sorted({r["block"] for r in rows if r["model"] == name and r["block"]}):
            ort = [x for x in (get(name, block, "ort-rtn-sym"), get(name, block, "ort-rtn-asym")) if x]
            default = get(name, block, "sw-default")
            if not ort or default is None or fp32 is None:
                continue
            best = min(ort, key=lambda x: x["ppl"])
            yield (name, block, lambda row, n=name, b=block: get(n, b, row), best, default,
                   lambda r, best=best, fp32=fp32: (best["ppl"] - r["ppl"]) / (best["ppl"] - fp32["ppl"]))


def _checks(rows: list[dict]) -> list[str]:
    """Issue 13's criteria, read off the rows: the default against the best onnxruntime RTN (gap to fp32
    closed), and the budgets against the k_quant_mixed-style rule at the same bits."""
    out = ["## Checks", "", "| model | block | best onnxruntime RTN (bpw) | sw-onnx default (bpw) | gap closed | "
           "`--bits-per-weight 4.85` vs the rule within 4.85 | budget = the whole rule's vs the rule |",
           "|---|---|---|---|---|---|---|"]
    for name, block, get, best, default, closed in _cells(rows):
        pairs = []
        for ours, theirs in (("sw-bpw-4.85", "kquant-bpw-4.85"), ("sw-bpw-rule", "kquant-rule")):
            a, b = get(ours), get(theirs)
            pairs.append(f"{a['ppl']:.2f} vs {b['ppl']:.2f} ({a['bits_per_weight']:.3f} / {b['bits_per_weight']:.3f} bpw)"
                         if a and b else "")
        out.append(f"| {name} | {block} | {best['ppl']:.2f} ({best['bits_per_weight']:.3f}) | {default['ppl']:.2f} "
                   f"({default['bits_per_weight']:.3f}) | {closed(default):+.0%} | {pairs[0]} | {pairs[1]} |")
    return out + [""]


def summary(rows: list[dict]) -> str:
    """The README's table: per model and block, fp32, the best onnxruntime RTN, the default, the gap it closes,
    and the 4.85-bit budget against the k_quant_mixed-style rule at the same bits."""
    fp32 = {r["model"]: r["ppl"] for r in rows if r["row"] == "fp32" and "ppl" in r}
    lines = ["| model | block | onnxruntime RTN, best (bpw) | sw-onnx default (bpw) | gap to fp32 closed | "
             "`--bits-per-weight 4.85` / rule at 4.85 |", "|---|---|---|---|---|---|"]
    for name, block, get, best, default, closed in _cells(rows):
        ours, rule = get("sw-bpw-4.85"), get("kquant-bpw-4.85")
        refused = any((x["model"], x["block"], x["row"]) == (name, block, "sw-bpw-4.85") and "alone costs" in x.get("error", "")
                      for x in rows)
        budget = (f"**{ours['ppl']:.2f}** ({closed(ours):.0%}) / {rule['ppl']:.2f} ({closed(rule):.0%})" if ours and rule
                  else "n/a (int4 alone costs more)" if refused else "not measured")
        lines.append(f"| {name} (fp32 {fp32[name]:.2f}) | {block} | {best['ppl']:.2f} ({best['bits_per_weight']:.3f}) | "
                     f"**{default['ppl']:.2f}** ({default['bits_per_weight']:.3f}) | {closed(default):.0%} | {budget} |")
    return "\n".join(lines)


def merge(target: Path, sources: list[Path]) -> None:
    """Rows of `sources` added to `target` by (model, block, row): a measured row replaces a failed one."""
    data = json.loads(target.read_text()) if target.is_file() else {"rows": []}
    rows = {(r["model"], r["block"], r["row"]): r for r in data["rows"]}
    for source in sources:
        other = json.loads(source.read_text())
        for r in other["rows"]:
            key = (r["model"], r["block"], r["row"])
            if key not in rows or ("error" in rows[key] and "error" not in r):
                rows[key] = r
        data.update(date=other.get("date", data.get("date")), cores=other.get("cores", data.get("cores")))
    data["rows"] = list(rows.values())
    target.write_text(json.dumps(data, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--windows", type=int, default=None, help="default: 16 for SmolLM2, 8 for Gemma-3")
    parser.add_argument("--only", nargs="*", choices=ROWS, default=None, help="only these rows (`--only` alone: none)")
    parser.add_argument("--size", nargs="*", choices=SIZE_ROWS, default=None,
                        help="also whole outputs as shipped (lm_head, embeddings): size and perplexity")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --json and skip them")
    parser.add_argument("--retry-failed", action="store_true", help="with --resume: measure failed rows again")
    parser.add_argument("--from-json", action="store_true", help="only rewrite --markdown from --json")
    parser.add_argument("--summary", action="store_true", help="print only the README's summary table from --json")
    parser.add_argument("--merge", nargs="+", default=(), metavar="JSON",
                        help="first merge the rows of these files (runs made in parallel, each with its own --json) into --json")
    parser.add_argument("--markdown", default="docs/quantize_quality.md")
    parser.add_argument("--json", dest="json_path", default="docs/quantize_quality.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.merge:
        merge(Path(args.json_path), [Path(p) for p in args.merge])
    if args.summary:
        print(summary(json.loads(Path(args.json_path).read_text())["rows"]))
        return
    if not args.from_json:
        measure(args)
    text = markdown(json.loads(Path(args.json_path).read_text()))
    Path(args.markdown).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
