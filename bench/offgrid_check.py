"""Check the off-grid copies (sample_models/offgrid.py): same function, weights off the GGUF grid.

For each model (SmolLM2-135M, and Gemma-3-270M when ``python sample_models/export_gemma3.py`` has run):

- build time of the off-grid copy (cached after the first run: ``--rebuild`` to time a build into a temp folder);
- max |logit difference| original vs off-grid on the first ``--tokens`` WikiText-2 tokens (onnxruntime, fp32);
- per projection type, over all layers: asymmetric min-max RTN error at int4 blocks of 32 along K
  (``grid_error``: ~0 on a dequantized Q4_1) and the distinct values per block of 32 (``grid_levels``: <= 16
  on any dequantized 4-bit GGUF block, Q4_K included);
- WikiText-2 perplexity of both over ``--windows`` windows of 512 by sw_onnx.evaluate's protocol (no BOS),
  and with ``--bos`` also BOS + 511 tokens per window (Gemma needs its BOS: findings.md's 23.46).

Prints a markdown table; ``--json PATH`` writes every figure. ``python bench/offgrid_check.py [--models smollm2
gemma3] [--windows 8] [--bos]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sample_models.offgrid import (  # noqa: E402
    _text_ids,
    compare_logits,
    grid_error,
    grid_levels,
    make_offgrid,
)


def _source(name: str) -> Path | None:
    if name == "smollm2":
        from sample_models.export_smollm2 import export_smollm2

        return export_smollm2(quiet=True)
    from sample_models.export_gemma3 import default_out_dir, is_complete

    return default_out_dir() if is_complete(default_out_dir()) else None


def _grid_table(src: Path, og: Path) -> dict:
    import onnx
    import onnx.numpy_helper as nh

    a, b = onnx.load(str(src / "model.onnx")), onnx.load(str(og / "model.onnx"))
    ia = {t.name: t for t in a.graph.initializer}
    ib = {t.name: t for t in b.graph.initializer}
    rows = defaultdict(lambda: defaultdict(list))
    for n in a.graph.node:
        if n.op_type != "MatMul" or n.input[1] not in ia or len(ia[n.input[1]].dims) != 2:
            continue
        kind = n.name.split("/")[-2] if n.name.count("/") >= 2 else n.name
        if ia[n.input[1]].dims[1] > 100_000:
            kind = "lm_head"
        wa, wb = nh.to_array(ia[n.input[1]]), nh.to_array(ib[n.input[1]])
        for tag, w in (("orig", wa), ("offgrid", wb)):
            med, _mx, share = grid_levels(w)
            rows[kind][f"{tag}_rtn"].append(grid_error(w))
            rows[kind][f"{tag}_levels"].append(med)
            rows[kind][f"{tag}_le16"].append(share)
    return {k: {m: [float(np.min(v)), float(np.median(v)), float(np.max(v))] for m, v in d.items()} | {"layers": len(d["orig_rtn"])}
            for k, d in rows.items()}


def _ppl_bos(model: Path, ids: np.ndarray, bos: int, windows: int) -> float:
    """BOS + 511 tokens per window, 511 predictions each (the first from BOS alone)."""
    import onnxruntime as ort

    from sample_models.export_smollm2 import _feeds

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    total, count = 0.0, 0
    for k in range(windows):
        w = np.asarray([[bos, *ids[k * 511:(k + 1) * 511]]], dtype=np.int64)
        logits = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, _feeds(sess, w, None, 0))))["logits"]
        x = logits[0].astype(np.float64)
        x -= x.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(x).sum(axis=-1))
        total += float(np.sum(lse[:-1] - x[np.arange(511), w[0, 1:]]))
        count += 511
    return float(np.exp(total / count))


def check(name: str, args) -> dict | None:
    from sw_onnx.evaluate import default_wikitext_path, load_tokenizer, perplexity, wikitext_token_ids

    src = _source(name)
    if src is None:
        print(f"{name}: not exported, skipped (python sample_models/export_gemma3.py)", file=sys.stderr)
        return None
    out: dict = {"model": name, "source": str(src)}
    t0 = time.perf_counter()
    if args.rebuild:
        with tempfile.TemporaryDirectory(dir=src.parent, prefix=".offgrid-bench-") as tmp:
            make_offgrid(src, seed=args.seed, out_dir=Path(tmp) / "og", quiet=True)
            out["build_seconds"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
    og = make_offgrid(src, seed=args.seed, quiet=True)
    out.setdefault("build_seconds", None)
    out["offgrid"] = str(og)
    marker = json.loads((og / ".complete").read_text())
    out["cached_build_seconds"] = marker["seconds"]["total"]
    out["counts"] = marker["counts"]
    out["logits"] = compare_logits(src / "model.onnx", og / "model.onnx", _text_ids(src, args.tokens, 0))
    out["grid"] = _grid_table(src, og)
    ids = wikitext_token_ids(load_tokenizer(src), default_wikitext_path())
    for tag, folder in (("orig", src), ("offgrid", og)):
        r = perplexity(folder / "model.onnx", ids, context=512, max_windows=args.windows)
        out[f"ppl_{tag}"] = r.perplexity
        out[f"nll_{tag}"] = r.nll_mean
        if args.bos:
            bos = json.loads((src / "config.json").read_text()).get("bos_token_id")
            out[f"ppl_bos_{tag}"] = _ppl_bos(folder / "model.onnx", ids, int(bos), args.windows)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "gemma3"], choices=["smollm2", "gemma3"])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bos", action="store_true", help="also BOS + 511 tokens per window")
    ap.add_argument("--rebuild", action="store_true", help="time a fresh build (into a temporary folder)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    results = [r for r in (check(m, args) for m in args.models) if r is not None]
    for r in results:
        lg = r["logits"]
        print(f"\n### {r['model']} (seed {args.seed})\n")
        print(f"logits: max |diff| {lg['max_abs_diff']:.3g}, mean {lg['mean_abs_diff']:.2g} over {lg['tokens']} tokens "
              f"(range {lg['logit_range'][0]:.1f}..{lg['logit_range'][1]:.1f}), argmax agreement {lg['argmax_agreement']:.4f}")
        ppl = f"perplexity ({args.windows} x 512, no BOS): original {r['ppl_orig']:.4f}, off-grid {r['ppl_offgrid']:.4f} " \
              f"(mean NLL {r['nll_orig']:.6f} / {r['nll_offgrid']:.6f})"
        if "ppl_bos_orig" in r:
            ppl += f"; BOS + 511: {r['ppl_bos_orig']:.4f} / {r['ppl_bos_offgrid']:.4f}"
        print(ppl)
        print(f"build: {r['build_seconds'] or r['cached_build_seconds']} s; {r['counts']}\n")
        print("| projection | layers | int4 b32 min-max RTN error, original (min / median / max) | off-grid | "
              "distinct values per block of 32, original (median of layers) | off-grid | blocks with <= 16, original | off-grid |")
        print("|---|---|---|---|---|---|---|---|")
        for kind, g in r["grid"].items():
            def f(v):
                return " / ".join(f"{x:.3g}" for x in v)
            print(f"| {kind} | {g['layers']} | {f(g['orig_rtn'])} | {f(g['offgrid_rtn'])} | {g['orig_levels'][1]:.0f} | "
                  f"{g['offgrid_levels'][1]:.0f} | {g['orig_le16'][1]:.0%} | {g['offgrid_le16'][1]:.0%} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
