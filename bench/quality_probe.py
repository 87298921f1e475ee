"""Quick quality probes behind docs/quantize_defaults.md: quantize with the API (settings as JSON, module
constants overridable per run with "_hooks"), then WikiText-2 perplexity (BOS + 511 per window for models that
need their BOS), one JSON line per run appended to --log.

Usage: python bench/quality_probe.py MODEL_DIR [--windows 16] [--log FILE] [--tag T] CONFIG...
  CONFIG: "fp32", or a JSON object of QuantizeConfig fields, e.g.
  '{"block_size": 128, "lm_head_bits": 0, "keep": "report.json", "error_weight": "x2",
    "_hooks": {"sw_onnx.plan.IMPORTANCE_SKIP_FIRST": false}}'
"""
import json, sys, time, os, argparse, tempfile, shutil
from pathlib import Path
sys.path.insert(0, os.environ.get("SWQ", str(Path(__file__).resolve().parents[1])))
import numpy as np

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--log", default="quality_probe.jsonl")
    ap.add_argument("--tag", default="")
    ap.add_argument("configs", nargs="+", help="JSON dicts of QuantizeConfig fields; 'fp32' for the float model")
    a = ap.parse_args()
    from sw_onnx.evaluate import load_tokenizer, wikitext_token_ids, default_wikitext_path, perplexity
    from sw_onnx.quantize import QuantizeConfig, quantize_model
    folder = Path(a.model)
    src = folder / "model.onnx"
    ids = wikitext_token_ids(load_tokenizer(folder), default_wikitext_path())
    from sw_onnx.inputs import bos_convention
    bos, add_bos = bos_convention(folder)
    bos = bos if add_bos else None
    work = Path(tempfile.mkdtemp(prefix="sw-onnx-probe-"))
    saved = []
    for c in a.configs:
        rec = {"model": folder.name, "windows": a.windows, "tag": a.tag, "config": c, "date": time.strftime("%H:%M")}
        t0 = time.perf_counter()
        try:
            if c == "fp32":
                path = src
            else:
                params = json.loads(c)
                hooks = params.pop("_hooks", {})
                for k, v in hooks.items():
                    mod, attr = k.rsplit(".", 1)
                    import importlib; importlib.import_module(mod)
                    saved.append((sys.modules[mod], attr, getattr(sys.modules[mod], attr)))
                    setattr(sys.modules[mod], attr, v)
                path = work / "q.onnx"
                s = quantize_model(src, path, QuantizeConfig(**{"verify": False, "force": True, **params}))
                t = s.totals()
                rec.update(bpw=t["bits_per_weight"], quantized=t["quantized"], bytes=s.output_bytes,
                           qseconds=round(time.perf_counter() - t0, 1))
            rec["ppl"] = perplexity(path, ids, context=512, max_windows=a.windows, bos=bos).perplexity
        except Exception as e:
            import traceback; traceback.print_exc()
            rec["error"] = repr(e)[:300]
        for mod, attr, value in reversed(saved):  # hooks apply to their own config only
            setattr(mod, attr, value)
        saved.clear()
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(rec), flush=True)
        with open(a.log, "a") as f:
            f.write(json.dumps(rec) + "\n")
        for p in work.iterdir():
            p.unlink()
    shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    main()
