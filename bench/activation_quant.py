"""Super-activation-aware activation quantization on SmolLM2-135M: quality and decode latency.

Rows (each model written by `sw-onnx quantize`, the command shown in the table):

- fp32;
- W8A8 naive (``--bits 8 --activations int8 --no-sa-keep-out``) and handled (``--bits 8 --activations int8``),
  activation ranges calibrated on the detection prompt (data-free), and handled with ``--calib-text``;
- int4 (defaults: sym b32, clip mse, super weights kept out) at onnxruntime's default accuracy_level 4 without
  and with the super-activation channel keep-out, at accuracy_level 1 (session option
  ``session.qdq_matmulnbits_accuracy_level``), the keep-out at level 1, and ``--format nbits`` (per-node
  accuracy_level 1 on layers whose input holds a super activation).

Quality: WikiText-2 perplexity by the project protocol (first ``--windows`` windows of 512 tokens, no BOS,
mean next-token NLL) on the export without KV cache, top-1 agreement with fp32 over the same positions, and
greedy decoding (``--new-tokens`` tokens from each of four prompts, KV-cache export): tokens identical to
fp32's. Latency (int4 rows, fp32 and W8A8 for reference): KV-cache export, each model in its own process,
prefill ``--prefill`` tokens then ``--decode``
one-token steps, ``--repeat`` times, median step time; ``--rounds`` rounds interleaved across the models, the fastest
round per model (the machine may be shared); one run.

Usage: python bench/activation_quant.py [--windows 8] [--markdown docs/activation_quant_table.md] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import write_outputs  # noqa: E402

PROMPTS = (
    "Apple Inc. is a worldwide tech company.",
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
)

# name -> (quantize arguments or None for fp32, session accuracy_level or None, latency row)
VARIANTS = {
    "fp32": (None, None, True),
    "W8A8 naive": (["--bits", "8", "--activations", "int8", "--no-sa-keep-out"], None, True),
    "W8A8 handled": (["--bits", "8", "--activations", "int8"], None, True),
    "W8A8 handled, --calib-text": (["--bits", "8", "--activations", "int8", "--calib-text", "{calib}"], None, False),
    "int4 level 4, no keep-out": (["--no-sa-keep-out"], 4, True),
    "int4 level 4, keep-out (default)": ([], 4, True),
    "int4 level 1, no keep-out": (["--no-sa-keep-out"], 1, True),
    "int4 level 1, keep-out": ([], 1, True),
    "int4 --format nbits (per-node level)": (["--format", "nbits", "--no-sa-keep-out"], None, True),
}

CHILD = r"""
import json, sys, time, numpy as np, onnxruntime as ort
path, level, prefill, decode, repeat, threads = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
o = ort.SessionOptions(); o.log_severity_level = 3
if threads:
    o.intra_op_num_threads = threads
if level != "-":
    o.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", level)
s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
inputs = {i.name: i for i in s.get_inputs()}
outs = [o.name for o in s.get_outputs()]
pasts = [n for n in inputs if n.startswith("past_key_values")]
presents = [n.replace("past_key_values", "present") for n in pasts]
def run(ids, past, past_len):
    t = len(ids)
    feeds = {"input_ids": np.array([ids], dtype=np.int64),
             "attention_mask": np.ones((1, past_len + t), dtype=np.int64),
             "position_ids": np.arange(past_len, past_len + t, dtype=np.int64)[None]}
    feeds.update({n: past[n] for n in pasts})
    res = dict(zip(outs, s.run(outs, feeds)))
    return res["logits"][0, -1], {p: res[q] for p, q in zip(pasts, presents)}
prompt = np.random.default_rng(0).integers(100, 10000, prefill).tolist()
empty = {}
for n in pasts:
    shp = [1 if not isinstance(d, int) else d for d in inputs[n].shape]; shp[2] = 0
    empty[n] = np.zeros(shp, dtype=np.float32)
prefills, steps = [], []
for _ in range(repeat):  # the first repetition warms the session up; medians over all
    t = time.perf_counter(); logits, past = run(prompt, empty, 0); prefills.append(time.perf_counter() - t)
    tok, length = int(np.argmax(logits)), prefill
    for _ in range(decode):
        t = time.perf_counter(); logits, past = run([tok], past, length); steps.append(time.perf_counter() - t)
        tok = int(np.argmax(logits)); length += 1
print(json.dumps({"prefill_s": float(np.median(prefills)), "decode_s": float(np.median(steps)),
                  "decode_min_s": float(np.min(steps))}))
"""


def _session(path: Path, level: int | None):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.log_severity_level = 3
    if level is not None:
        o.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def _quality(session, ids: np.ndarray, windows: int, reference_argmax: np.ndarray | None):
    """Perplexity by the sw_onnx.evaluate protocol, and the argmax at every position (for top-1 agreement)."""
    from sw_onnx.inputs import build_feeds

    nll, argmax = 0.0, []
    for w in range(windows):
        window = ids[w * 512:(w + 1) * 512]
        logits = session.run(["logits"], build_feeds(session, window[None, :]))[0][0].astype(np.float64)
        m = logits.max(-1)
        lse = np.log(np.exp(logits - m[:, None]).sum(-1)) + m
        nll += float((lse[:-1] - logits[np.arange(511), window[1:]]).sum())
        argmax.append(logits.argmax(-1))
    argmax = np.concatenate(argmax)
    agree = 1.0 if reference_argmax is None else float(np.mean(argmax == reference_argmax))
    return float(np.exp(nll / (windows * 511))), argmax, agree


def _greedy(session, prompts: list[np.ndarray], new_tokens: int) -> list[list[int]]:
    from sw_onnx.measure import generate

    return [generate(session, p, max_new_tokens=new_tokens, use_cache=True).new_ids for p in prompts]


def _quantize(src: Path, dst: Path, args: list[str]) -> str:
    command = [sys.executable, "-m", "sw_onnx.cli", "quantize", str(src), "-o", str(dst), "--force", *args]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return " ".join(["sw-onnx quantize MODEL", *args]).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2, help="prefill + decode runs per process (medians over all)")
    parser.add_argument("--rounds", type=int, default=6, help="latency rounds, interleaved across the models")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for latency (0: its default)")
    parser.add_argument("--only", action="append", help="run only these variants (repeatable)")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--reuse", help="take the quality columns from this --json of an earlier run (latency only)")
    parser.add_argument("--keep-models", help="write the models here and keep them")
    parser.add_argument("--markdown")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    from tokenizers import Tokenizer

    from sample_models.export_smollm2 import export_smollm2
    from sw_onnx.evaluate import default_wikitext_path
    from sw_onnx.measure import text_token_ids

    plain = Path(export_smollm2(quiet=True)) / "model.onnx"
    kv = Path(export_smollm2(with_past=True, quiet=True)) / "model.onnx"
    ids, _ = text_token_ids(plain.parent)
    tok = Tokenizer.from_file(str(plain.parent / "tokenizer.json"))
    prompts = [np.asarray(tok.encode(p, add_special_tokens=False).ids, np.int64) for p in PROMPTS]
    work = Path(args.keep_models) if args.keep_models else Path(tempfile.mkdtemp(prefix="sw-onnx-aq-"))
    work.mkdir(parents=True, exist_ok=True)
    # --calib-text: the last 12,000 characters of the test file, far from the evaluated windows at its start.
    calib = work / "calib.txt"
    calib.write_text(default_wikitext_path().read_text(encoding="utf-8")[-12000:], encoding="utf-8")

    rows: dict[str, dict] = {}
    timed_paths: dict[str, tuple[Path, int | None] | None] = {}
    ref_argmax, ref_greedy = None, None
    try:
        for name, (qargs, level, timed) in VARIANTS.items():
            if args.only and name not in args.only and name != "fp32":
                continue
            t0 = time.perf_counter()
            if qargs is None:
                paths, command = (plain, kv), "(the export)"
            else:
                qargs = [a.replace("{calib}", str(calib)) for a in qargs]
                stem = "".join(ch if ch.isalnum() else "_" for ch in " ".join(qargs)) or "default"
                paths = (work / f"{stem}.onnx", work / f"{stem}.kv.onnx")
                for src, dst in zip((plain, kv), paths):
                    if not dst.exists():
                        command = _quantize(src, dst, qargs)
                command = " ".join(["sw-onnx quantize MODEL", *[a if a != str(calib) else "CALIB.txt" for a in qargs]])
            if args.reuse:
                rows[name] = {k: v for k, v in json.loads(Path(args.reuse).read_text())[name].items()
                              if not k.startswith(("decode", "prefill", "rounds"))}
                timed_paths[name] = (paths[1], level) if timed else None
                continue
            ppl, argmax, agree = _quality(_session(paths[0], level), ids, args.windows, ref_argmax)
            greedy = _greedy(_session(paths[1], level), prompts, args.new_tokens)
            if ref_argmax is None:
                ref_argmax, ref_greedy = argmax, greedy
            same = [sum(a == b for a, b in zip(g, r)) for g, r in zip(greedy, ref_greedy)]
            prefix = [next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), len(r)) for g, r in zip(greedy, ref_greedy)]
            row = {"command": command, "accuracy_level": level, "perplexity": ppl, "top1_agreement": agree,
                   "greedy_same_tokens": int(sum(same)), "greedy_tokens": int(sum(len(r) for r in ref_greedy)),
                   "greedy_common_prefix": prefix, "greedy_text": [tok.decode(g) for g in greedy],
                   "bytes": sum(p.stat().st_size for p in paths[1].parent.glob(paths[1].name + "*"))}
            rows[name] = row
            timed_paths[name] = (paths[1], level) if timed else None
            print(f"{name}: ppl {ppl:.2f}, top-1 {agree:.1%}, greedy {sum(same)}/{row['greedy_tokens']} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        # Latency: rounds interleaved across the models (each run in its own process), so that load from
        # other processes on a shared machine spreads over all of them; per model the fastest round counts.
        for r in range(0 if args.no_latency else args.rounds):
            for name, target in timed_paths.items():
                if target is None:
                    continue
                out = subprocess.run([sys.executable, "-c", CHILD, str(target[0]), str(target[1]) if target[1] else "-",
                                      str(args.prefill), str(args.decode), str(args.repeat), str(args.threads)],
                                     capture_output=True, text=True, check=True).stdout
                result = json.loads(out.strip().splitlines()[-1])
                rows[name].setdefault("rounds", []).append(result)
                best = min(rows[name]["rounds"], key=lambda x: x["decode_s"])
                rows[name].update(decode_s=best["decode_s"], prefill_s=best["prefill_s"],
                                  decode_min_s=min(x["decode_min_s"] for x in rows[name]["rounds"]))
                print(f"round {r + 1}: {name}: decode {result['decode_s'] * 1000:.1f} ms (fastest step "
                      f"{result['decode_min_s'] * 1000:.1f})", file=sys.stderr, flush=True)
    finally:
        if not args.keep_models:
            shutil.rmtree(work, ignore_errors=True)

    base = rows["fp32"]
    lines = [
        f"SmolLM2-135M-Instruct, onnxruntime CPU, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. Perplexity: WikiText-2 test, "
        f"first {args.windows} windows of 512 tokens ({args.windows * 511:,} predictions); top-1: agreement with fp32 there; "
        f"greedy: tokens identical to fp32 in {len(PROMPTS)} x {args.new_tokens} greedy tokens (KV cache), in parentheses the mean "
        f"number of tokens before the first difference. Decode: prefill "
        f"{args.prefill} tokens, then {args.decode} one-token steps with the KV cache, {args.repeat} times per process, "
        f"{args.threads or 'default'} onnxruntime thread(s), median "
        f"step of the fastest round, and the fastest single step; {args.rounds} rounds interleaved across the models (the 2-core "
        f"machine is shared); "
        f"one run of this benchmark.",
        "",
        "| model | command | level | ppl | vs fp32 | top-1 | greedy same (prefix) | decode ms/token | vs fp32 | fastest step ms | vs fp32 | size MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        decode = f"{r['decode_s'] * 1000:.1f}" if "decode_s" in r else ""
        ratio = f"{r['decode_s'] / base['decode_s']:.2f}x" if "decode_s" in r and "decode_s" in base else ""
        fastest = f"{r['decode_min_s'] * 1000:.1f}" if "decode_min_s" in r else ""
        ratio_min = f"{r['decode_min_s'] / base['decode_min_s']:.2f}x" if "decode_min_s" in r and "decode_min_s" in base else ""
        level = str(r["accuracy_level"]) if r["accuracy_level"] else ""
        lines.append(f"| {name} | `{r['command']}` | {level} | {r['perplexity']:.2f} | {r['perplexity'] / base['perplexity'] - 1:+.1%} | "
                     f"{r['top1_agreement']:.1%} | {r['greedy_same_tokens']}/{r['greedy_tokens']} ({np.mean(r['greedy_common_prefix']):.1f}) | {decode} | {ratio} | {fastest} | {ratio_min} | "
                     f"{r['bytes'] / 1e6:.0f} |")
    write_outputs("\n".join(lines), rows, args.markdown, args.json_path)


if __name__ == "__main__":
    main()
