"""onnxruntime-genai's own int4 vs sw-onnx on the builder's fp32 folder: perplexity, size, decode latency.

Rows, all SmolLM2-135M-Instruct from the same fp32 weights (``sample_models/export_smollm2_genai.py``):

(a) the onnxruntime-genai 0.15.2 model builder's int4 (``python -m onnxruntime_genai.models.builder ... -p int4
    -e cpu``): its default RTN (symmetric, blocks of 32, accuracy_level 4, lm_head int4 and the tied embedding
    int4 through GatherBlockQuantized), the default with the lm_head at 8 bits
    (``--extra_options matmul_mixed_precision=last_matmul:int8``: the 0.15.2 builder writes a graph that does not
    load, reported as failed), RTN with the lm_head at 8 bits (``algo_config=rtn_last``), ``algo_config=k_quant``
    and ``algo_config=k_quant_mixed`` (lm_head, embedding and the qkv/down projections of 14 layers at 8 bits);
(b) the builder's fp32 folder + ``sw-onnx quantize`` with the same block size and lm_head bits
    (``--block-size 32 --lm-head-bits 4``), the same plus the embedding at 4 bits like the builder's
    (``--embedding-bits 4``: GatherBlockQuantized sharing the tied lm_head's weight), with no options (lm_head
    8-bit, embedding float), and with ``--embedding-bits 8`` (lm_head and embedding 8-bit, as ``rtn_last``);
(c) the builder's fp32 folder.

Columns:
- WikiText-2 perplexity: ``sw-onnx eval DIR --max-tokens 512*WINDOWS`` (windows of 512, the same windows for
  every row), run one row after another, each in its own process;
- size on disk: model.onnx + model.onnx.data;
- decode ms/token, plain onnxruntime: one process holds one InferenceSession per model (created once; 2 intra-op
  threads, ``session.intra_op.allow_spinning`` = "0", sequential), a 128-token prefill of fixed random ids, then
  DECODE greedy steps with the KV cache (input_ids [1,1], attention_mask [1, past+1] int64,
  past_key_values.%d.key/value [1, kv_heads, past, head_size] fed from the previous step's present.%d.key/value;
  names, head size and kv heads from genai_config.json); one warm-up pass, then ROUNDS rounds, the models in a
  rotated order each round; per model the median over rounds of the per-round median step; ratios are the median
  of the per-round ratios;
- decode ms/token with onnxruntime-genai (``og.Model(folder)`` + ``og.Generator``, greedy, same prompt, the
  folder's genai_config.json unchanged: onnxruntime's default threads, 2 here, spinning on): each model in its
  own process (so no idle session competes), rotated order, same rounds; in each process a warm-up, then 3
  generations of DECODE tokens, the median ``generate_next_token`` time; per model the median over rounds.
  (Setting intra_op_num_threads 2 through ``og.Config.overlay`` made every step about 2x slower, in multiples
  of about 4 ms, on this VM: not used.)
- rows (b*): diagnostics, (b) without the kept-out side paths (``--keep none --no-sa-keep-out``), and also without
  zero points (``--symmetric``), to show where (b)'s decode time goes.

The builder variants other than the cached ``-p fp32`` / ``-p int4`` folders are built once into
``$SW_ONNX_CACHE/genai-builder-bench/`` (default ``~/.cache/sw-onnx``), as are the sw-onnx outputs. A variant
that fails to build is reported with its error (the failure is cached too) and the other rows go on; ``--rebuild``
redoes the sw-onnx outputs and retries failed builder variants.

Usage: python bench/genai_builder.py [--windows 16] [--rounds 11] [--decode 32] [--markdown FILE] [--json FILE]
                                     [--rows NAME ...] [--no-og] [--no-latency] [--reuse-ppl] [--rebuild]
                                     [--from-json]
Takes about 25 minutes here (each row's perplexity 1-1.5 min, the latency columns about 10 min).
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from _proc import run_measured, write_outputs  # noqa: E402

CONTEXT = 512
BENCH_FOLDER = "genai-builder-bench"


@dataclass(frozen=True)
class Row:
    name: str
    group: str  # "a", "b" or "c" of the issue
    label: str
    kind: str  # "cached" (export_smollm2_genai), "builder", "sw"
    precision: str = "int4"
    extra: tuple[str, ...] = ()  # the builder's --extra_options
    sw_args: tuple[str, ...] = ()  # sw-onnx quantize options
    lm_head: str = ""


ROWS = (
    Row("fp32", "c", "builder fp32 (`-p fp32`)", "cached", "fp32", lm_head="fp32"),
    Row("rtn", "a", "builder int4, default RTN (`-p int4`)", "cached", lm_head="int4 b32"),
    Row("rtn_lm8_default", "a", "builder int4, default RTN, lm_head int8 (`matmul_mixed_precision=last_matmul:int8`)",
        "builder", extra=("matmul_mixed_precision=last_matmul:int8",), lm_head="int8 b32"),
    Row("rtn_lm8", "a", "builder int4, RTN, lm_head int8 (`algo_config=rtn_last`)", "builder",
        extra=("algo_config=rtn_last",), lm_head="int8 b32"),
    Row("k_quant", "a", "builder int4, k_quant (`algo_config=k_quant`)", "builder", extra=("algo_config=k_quant",),
        lm_head="int4 b32"),
    Row("k_quant_mixed", "a", "builder int4, k_quant_mixed (`algo_config=k_quant_mixed`: lm_head and the qkv and "
        "down projections of 14 of the 30 layers int8)", "builder", extra=("algo_config=k_quant_mixed",),
        lm_head="int8 b32"),
    Row("sw_lm4", "b", "builder fp32 + `sw-onnx quantize --block-size 32 --lm-head-bits 4`", "sw",
        sw_args=("--block-size", "32", "--lm-head-bits", "4"), lm_head="int4 b32"),
    Row("sw_lm4_emb4", "b", "builder fp32 + `sw-onnx quantize --block-size 32 --lm-head-bits 4 --embedding-bits 4`",
        "sw", sw_args=("--block-size", "32", "--lm-head-bits", "4", "--embedding-bits", "4"), lm_head="int4 b32"),
    Row("sw_default", "b", "builder fp32 + `sw-onnx quantize` (defaults)", "sw", lm_head="int8 b32"),
    Row("sw_default_emb8", "b", "builder fp32 + `sw-onnx quantize --embedding-bits 8`", "sw",
        sw_args=("--embedding-bits", "8"), lm_head="int8 b32"),
    # diagnostics: where (b)'s decode time goes (the kept-out side paths, the zero points)
    Row("sw_lm4_nokeep", "b*", "builder fp32 + `sw-onnx quantize --block-size 32 --lm-head-bits 4 --keep none "
        "--no-sa-keep-out` (no side paths)", "sw",
        sw_args=("--block-size", "32", "--lm-head-bits", "4", "--keep", "none", "--no-sa-keep-out"),
        lm_head="int4 b32"),
    Row("sw_lm4_sym_nokeep", "b*", "builder fp32 + `sw-onnx quantize --block-size 32 --lm-head-bits 4 --symmetric "
        "--keep none --no-sa-keep-out` (no side paths, no zero points)", "sw",
        sw_args=("--block-size", "32", "--lm-head-bits", "4", "--symmetric", "--keep", "none", "--no-sa-keep-out"),
        lm_head="int4 b32"),
)


def _log(msg: str) -> None:
    print(f"[genai_builder] {msg}", file=sys.stderr, flush=True)


def _size(folder: Path) -> int:
    return sum((folder / f).stat().st_size for f in ("model.onnx", "model.onnx.data") if (folder / f).is_file())


def _bench_root() -> Path:
    from sample_models.export_smollm2 import cache_root

    return cache_root() / BENCH_FOLDER


# ------------------------------------------------------------------------------------------ building


def _hf_folder(quiet: bool = False) -> Path:
    """The fp32 Hugging Face folder the builder reads (same weights as export_smollm2_genai), built once."""
    from sample_models.export_smollm2 import _file_lock, _quiet_libraries, build_hf_folder, fetch_gguf

    hf = _bench_root() / "hf"
    if (hf / ".complete").is_file():
        return hf
    hf.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(hf.parent / ".hf.lock"):
        if (hf / ".complete").is_file():
            return hf
        shutil.rmtree(hf, ignore_errors=True)
        with _quiet_libraries(quiet):
            model, _tok, _meta = build_hf_folder(fetch_gguf(quiet), hf, quiet)
        del model
        (hf / ".complete").write_text("{}\n")
    return hf


def _builder_variant(row: Row, rebuild: bool = False) -> tuple[Path, dict]:
    """Run the builder with `row.extra` (cached); returns (folder, build record)."""
    from sample_models.export_smollm2_genai import MARKER

    out = _bench_root() / f"smollm2-135m-genai-{row.precision}-{row.name}"
    failed = out.parent / f"{out.name}.failed"
    if (out / MARKER).is_file():
        return out, json.loads((out / MARKER).read_text())
    if failed.is_file() and not rebuild:  # a known failure of this builder version: not rerun every time
        raise RuntimeError(failed.read_text().strip() + " (cached; --rebuild retries)")
    failed.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _run_builder_variant(row, out)
    except Exception as e:
        failed.write_text(str(e)[:1500] + "\n")
        raise


def _run_builder_variant(row: Row, out: Path) -> tuple[Path, dict]:
    from sample_models.export_smollm2_genai import BUILDER_FILES, MARKER, _genai_greedy, _genai_version

    hf = _hf_folder()
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", "OUT", "-p",
           row.precision, "-e", "cpu", "-c", "CACHE"]
    if row.extra:
        cmd += ["--extra_options", *row.extra]
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        tmp = Path(tmp)
        argv = [str(tmp / "onnx") if a == "OUT" else str(tmp / "cache") if a == "CACHE" else a for a in cmd]
        _log(f"building {row.name}: onnxruntime-genai {_genai_version()} builder {' '.join(cmd[3:])}")
        log = tmp / "builder.log"
        t0 = time.perf_counter()
        with open(log, "wb") as fh:
            proc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1"))
        seconds = time.perf_counter() - t0
        if proc.returncode != 0 or not (tmp / "onnx" / "model.onnx").is_file():
            tail = log.read_text(errors="replace").strip().splitlines()[-6:]
            raise RuntimeError(f"builder exited {proc.returncode}: " + " | ".join(tail).replace(str(tmp), "<tmp>"))
        onnx_dir = tmp / "onnx"
        import numpy as np
        from tokenizers import Tokenizer

        ids = np.asarray([Tokenizer.from_file(str(onnx_dir / "tokenizer.json")).encode("Summer is hot. Winter is").ids],
                         dtype=np.int64)
        try:
            seq, _ = _genai_greedy(onnx_dir, ids, 8)
        except Exception as e:  # the builder wrote a folder that onnxruntime-genai cannot load
            msg = f"onnxruntime-genai cannot run the builder's output: {e}".replace(str(tmp), "<tmp>")
            raise RuntimeError(msg) from None
        record = {"command": ["python" if a == sys.executable else a for a in cmd], "seconds": round(seconds, 1),
                  "genai_greedy_ids": seq, "files": sorted(p.name for p in onnx_dir.iterdir()),
                  "unknown_files": sorted(p.name for p in onnx_dir.iterdir() if p.name not in BUILDER_FILES)}
        (onnx_dir / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(onnx_dir, out)
    return out, record


def _sw_commit() -> str:
    """The sw-onnx checkout's commit (short), "+dirty" when sw_onnx/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "sw_onnx"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _sw_variant(row: Row, fp32: Path, rebuild: bool) -> tuple[Path, dict]:
    out = _bench_root() / f"smollm2-135m-genai-sw-{row.name}"
    summary = _bench_root() / f"smollm2-135m-genai-sw-{row.name}.summary.json"
    if out.is_dir() and summary.is_file() and not rebuild:
        data = json.loads(summary.read_text())
        _check_embeddings(row, data)
        return out, data.get("_bench", {})
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "sw_onnx.cli", "quantize", str(fp32), "-o", str(out), *row.sw_args,
           "--json", str(summary)]
    _log(f"quantizing {row.name}: sw-onnx quantize {' '.join(row.sw_args)}")
    commit = _sw_commit()
    res = run_measured(cmd, cwd=ROOT)
    record = {"command": ["sw-onnx", "quantize", "FP32_FOLDER", "-o", "OUT_FOLDER", *row.sw_args],
              "seconds": round(res["seconds"], 1), "peak_rss_mb": round(res["peak_rss_mb"]),
              "sw_onnx_commit": commit if commit == _sw_commit() else f"{commit}..{_sw_commit()}"}
    data = json.loads(summary.read_text())
    noise = {"force", "verify", "providers", "format", "calib_text", "exclude", "min_top1_agreement"}
    record["config"] = {k: v for k, v in data.get("config", {}).items() if k not in noise}
    data["_bench"] = record
    summary.write_text(json.dumps(data, indent=2) + "\n")
    _check_embeddings(row, data)
    return out, record


def _check_embeddings(row: Row, summary: dict) -> None:
    """A row that asks for a quantized embedding is not measured when sw-onnx quantized none (it would only
    repeat the row without the option)."""
    if "--embedding-bits" in row.sw_args and not summary.get("embeddings"):
        raise RuntimeError("`sw-onnx quantize --embedding-bits` quantized no embedding here (summary "
                           "\"embeddings\": []): the builder's Gather reads Transpose(lm_head.MatMul.weight), not "
                           "an initializer, and sw_onnx.discover.find_embeddings only takes a Gather on an "
                           "initializer; not measured")


def _fused_facts(folder: Path) -> dict:
    """MatMulNBits in onnxruntime's optimized graph (what runs): count by bits/accuracy_level/zero points."""
    import collections

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
        m = onnx.load(str(Path(tmp) / "opt.onnx"), load_external_data=False)
    kinds = collections.Counter()
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
            zp = len(n.input) > 3 and n.input[3] != ""
            kinds[f"bits={a.get('bits')} acc={a.get('accuracy_level', 0)}{' zp' if zp else ''}"] += 1
    return {"matmulnbits": dict(kinds), "nodes": len(m.graph.node)}


def _quant_facts(folder: Path) -> dict:
    """What the graph holds: MatMulNBits bits/block/accuracy_level counts, the lm_head's and embedding's ops."""
    import collections

    import onnx

    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    nbits, dq = collections.Counter(), collections.Counter()
    facts = {"lm_head": None, "embedding": None}
    types = {t.name: onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name if t.data_type not in (21, 22) else
             {21: "uint4", 22: "int4"}[t.data_type] for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    for n in m.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "MatMulNBits":
            nbits[f"bits={attrs.get('bits')} block={attrs.get('block_size')} acc={attrs.get('accuracy_level', 0)}"] += 1
        if n.op_type == "DequantizeLinear":
            dq[f"{types.get(n.input[0], '?')} block={attrs.get('block_size', 0)}"] += 1
        if "lm_head" in n.name and n.op_type in ("MatMul", "MatMulNBits"):
            src = producer.get(n.input[1])
            if n.op_type == "MatMulNBits":
                facts["lm_head"] = f"MatMulNBits bits={attrs.get('bits')}"
            elif src is not None and src.op_type == "DequantizeLinear":
                block = {a.name: onnx.helper.get_attribute_value(a) for a in src.attribute}.get("block_size", 0)
                facts["lm_head"] = f"DequantizeLinear {types.get(src.input[0], '?')} block={block} + MatMul"
            else:
                facts["lm_head"] = "MatMul fp32"
        if "embed_tokens" in n.name and n.op_type in ("Gather", "GatherBlockQuantized"):
            facts["embedding"] = f"{n.op_type}" + (f" bits={attrs.get('bits')}" if "bits" in attrs else "")
    ops = collections.Counter(n.op_type for n in m.graph.node)
    facts.update(matmulnbits=dict(nbits), dequantize_linear=dict(dq), matmul=ops.get("MatMul", 0),
                 nodes=len(m.graph.node), fused=_fused_facts(folder))
    return facts


# ---------------------------------------------------------------------------------------- perplexity


def _perplexity(folder: Path, windows: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eval.json"
        res = run_measured([sys.executable, "-m", "sw_onnx.cli", "eval", str(folder), "--max-tokens",
                            str(CONTEXT * windows), "--json", str(out)], cwd=ROOT)
        data = json.loads(out.read_text())
    return {"ppl": data["perplexity"], "windows": data.get("windows"), "tokens": data.get("tokens"),
            "eval_seconds": round(res["seconds"], 1)}


# ------------------------------------------------------------------------------------------ latency

ORT_CHILD = r"""
import json, statistics, sys, time, numpy as np, onnxruntime as ort
spec = json.loads(sys.argv[1])
models, prefill, decode, rounds = spec["models"], spec["prefill"], spec["decode"], spec["rounds"]
sessions = {}
for name, folder in models.items():
    cfg = json.load(open(folder + "/genai_config.json"))["model"]["decoder"]
    so = ort.SessionOptions(); so.log_severity_level = 3
    so.intra_op_num_threads = 2; so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    t = time.perf_counter()
    s = ort.InferenceSession(folder + "/" + cfg["filename"], so, providers=["CPUExecutionProvider"])
    ins, outs = cfg["inputs"], cfg["outputs"]
    n = cfg["num_hidden_layers"]
    past = [ins[k] % i for i in range(n) for k in ("past_key_names", "past_value_names")]
    present = [outs[k] % i for i in range(n) for k in ("present_key_names", "present_value_names")]
    dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}[
        {i.name: i.type for i in s.get_inputs()}[past[0]]]
    sessions[name] = dict(s=s, ids=ins["input_ids"], mask=ins["attention_mask"], logits=outs["logits"],
                          past=past, present=present, kv=(cfg["num_key_value_heads"], cfg["head_size"]),
                          dtype=dtype, load_s=time.perf_counter() - t)
prompt = np.random.default_rng(0).integers(100, 10000, prefill).astype(np.int64)
def run(m, steps):
    s, (kvh, hs) = m["s"], m["kv"]
    cache = {p: np.zeros((1, kvh, 0, hs), dtype=m["dtype"]) for p in m["past"]}
    names = [m["logits"]] + m["present"]
    def step(ids, length):
        feeds = {m["ids"]: ids[None], m["mask"]: np.ones((1, length), dtype=np.int64), **cache}
        res = s.run(names, feeds)
        for p, v in zip(m["past"], res[1:]):
            cache[p] = v
        return int(np.argmax(res[0][0, -1]))
    t = time.perf_counter(); tok = step(prompt, prefill); pre = time.perf_counter() - t
    times, toks, length = [], [tok], prefill
    for _ in range(steps):
        length += 1
        t = time.perf_counter(); tok = step(np.array([tok], dtype=np.int64), length)
        times.append(time.perf_counter() - t)
        toks.append(tok)
    return pre, times, toks
names = list(models)
for name in names:  # warm-up
    run(sessions[name], 4)
per_round = {name: [] for name in names}; prefill_s = {name: [] for name in names}; tokens = {}
for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
        pre, times, toks = run(sessions[name], decode)
        per_round[name].append(statistics.median(times)); prefill_s[name].append(pre); tokens[name] = toks
print(json.dumps({"per_round_decode_s": per_round, "per_round_prefill_s": prefill_s, "tokens": tokens,
                  "load_s": {n: sessions[n]["load_s"] for n in names}}))
"""

OG_CHILD = r"""
import json, statistics, sys, time, numpy as np, onnxruntime, onnxruntime_genai as og
folder, prefill, decode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = og.Model(folder)  # the folder's genai_config.json as written: onnxruntime's default threads
prompt = np.random.default_rng(0).integers(100, 10000, prefill).astype(np.int32)
def once(steps):
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=prefill + steps + 1, min_length=prefill + steps + 1)
    gen = og.Generator(model, params)
    t = time.perf_counter(); gen.append_tokens(prompt[None]); pre = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter(); gen.generate_next_token(); times.append(time.perf_counter() - t)
    return pre, times, [int(x) for x in gen.get_sequence(0)[prefill:]]
once(4)
steps, pres = [], []
for _ in range(3):
    pre, times, toks = once(decode)
    steps += times; pres.append(pre)
print(json.dumps({"decode_s": statistics.median(steps), "prefill_s": statistics.median(pres), "tokens": toks}))
"""


def _ort_latency(folders: dict[str, Path], args) -> dict:
    spec = {"models": {k: str(v) for k, v in folders.items()}, "prefill": args.prefill, "decode": args.decode,
            "rounds": args.rounds}
    res = run_measured([sys.executable, "-c", ORT_CHILD, json.dumps(spec)], cwd=ROOT)
    return json.loads(res["stdout"].strip().splitlines()[-1])


def _og_latency(folders: dict[str, Path], args) -> dict:
    names = list(folders)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    tokens, errors = {}, {}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name in errors:
                continue
            try:
                res = run_measured([sys.executable, "-c", OG_CHILD, str(folders[name]), str(args.prefill),
                                    str(args.decode)], cwd=ROOT)
            except RuntimeError as e:
                errors[name] = str(e)[-300:]
                _log(f"og.Generator {name}: FAILED {errors[name]}")
                continue
            out = json.loads(res["stdout"].strip().splitlines()[-1])
            per_round[name].append(out["decode_s"])
            tokens[name] = out["tokens"]
    return {"per_round_decode_s": per_round, "tokens": tokens, "errors": errors}


def _ratio(per_round: dict[str, list[float]], num: str, den: str) -> float | None:
    a, b = per_round.get(num) or [], per_round.get(den) or []
    if not a or len(a) != len(b):
        return None
    return statistics.median(x / y for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------ markdown


def _f(x, fmt="{:.2f}", none="-"):
    return none if x is None else fmt.format(x)


def _markdown(data: dict) -> str:
    rows = data["rows"]
    args = data["settings"]
    by = {r["name"]: r for r in rows}
    fp32_ppl = by.get("fp32", {}).get("ppl")
    lines = [
        "# onnxruntime-genai's builder int4 vs sw-onnx on the builder's fp32 folder (SmolLM2-135M)",
        "",
        f"Measured {data['date']} on this 2-core machine (shared with other jobs), onnxruntime "
        f"{data['versions']['onnxruntime']}, onnxruntime-genai {data['versions']['onnxruntime-genai']} (its builder), "
        f"sw-onnx {data['versions']['sw-onnx']}. "
        f"Written by `{data['command']}` in {data['seconds'] / 60:.0f} min.",
        "",
        f"Perplexity: WikiText-2 test, `sw-onnx eval DIR --max-tokens {args['windows'] * CONTEXT}` = "
        f"{args['windows']} windows of {CONTEXT}, the same windows for every row. Decode: ms per token with the "
        f"KV cache after a {args['prefill']}-token prefill, median of {args['rounds']} rounds (each round's median "
        f"of {args['decode']} steps); plain onnxruntime: every session in one process, created once, 2 intra-op "
        "threads, spinning off, models in rotated order; og.Generator (greedy, same prompt, the folder's "
        "genai_config.json as is: onnxruntime's default 2 threads, spinning on): each model in its own process, "
        "rotated order, per process the median step over 3 generations. Ratios (vs (a) RTN) are medians of the "
        "per-round ratios. Size: model.onnx + model.onnx.data. Rows (b*) are diagnostics for the decode cost.",
        "",
        "| group | model | lm_head | embedding | WikiText-2 ppl | vs fp32 | size MB | decode ms/token (onnxruntime) "
        "| vs (a) RTN | decode ms/token (og.Generator) | vs (a) RTN |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| ({r['group']}) | {r['label']} | | | failed (see notes) | | | | | | |")
            continue
        rel = (r["ppl"] / fp32_ppl - 1) * 100 if r.get("ppl") and fp32_ppl else None
        lines.append(
            f"| ({r['group']}) | {r['label']} | {r['lm_head_graph']} | {r['embedding_graph']} | "
            f"{_f(r.get('ppl'))} | {_f(rel, '{:+.1f}%')} | {r['bytes'] / 1e6:.1f} | {_f(r.get('decode_ms'))} | "
            f"{_f(r.get('decode_vs_rtn'), '{:.3f}x')} | {_f(r.get('og_decode_ms'))} | "
            f"{_f(r.get('og_decode_vs_rtn'), '{:.3f}x')} |")
    lines += ["", "## What the issue asks", ""]
    for line in data["verdicts"]:
        lines.append(f"- {line}")
    lines += ["", "## Commands", "", "```bash"]
    for r in rows:
        if r.get("command"):
            lines.append(f"# ({r['group']}) {r['name']}")
            lines.append(r["command"])
    lines += [f"sw-onnx eval DIR --max-tokens {args['windows'] * CONTEXT}    # every row", "```", "",
              "## Graphs", ""]
    for r in rows:
        if not r.get("error"):
            lines.append(f"- {r['name']}: MatMulNBits {r['facts']['matmulnbits'] or 'none'}, "
                         f"DequantizeLinear {r['facts']['dequantize_linear'] or 'none'}, "
                         f"MatMul {r['facts']['matmul']}, "
                         f"embedding {r['facts']['embedding']}, lm_head {r['facts']['lm_head']}, "
                         f"{r['facts']['nodes']} nodes; fused: MatMulNBits {r['facts']['fused']['matmulnbits']}, "
                         f"{r['facts']['fused']['nodes']} nodes"
                         + (f"; built in {r['build_seconds']} s" if r.get("build_seconds") is not None else "")
                         + (f"; sw-onnx {r['sw_onnx_commit']}, {r['sw_config']}" if r.get("sw_onnx_commit") else ""))
    lines += ["", "## Notes", ""]
    lines += [f"- {n}" for n in _notes(rows, data.get("ort_latency"), data.get("og_latency"))]
    return "\n".join(lines)


def _spread(lat: dict | None) -> tuple[float, float]:
    vals = [max(v) / min(v) for v in (lat or {}).get("per_round_decode_s", {}).values() if v]
    return (min(vals), max(vals)) if vals else (float("nan"), float("nan"))


def _notes(rows: list[dict], ort: dict | None = None, og: dict | None = None) -> list[str]:
    notes = [
        "Embedding: the builder's quantized folders reuse the quantized lm_head weight for the tied embedding "
        "(GatherBlockQuantized, 4 or 8 bits like the lm_head). sw-onnx leaves it float by default (49152 x 576 "
        "floats = 113 MB of the folder, about half of it); `--embedding-bits 4|8` is meant to do what the builder "
        "does (see the rows that ask for it).",
        "(b) keeps sw-onnx's other defaults (each row's quantize config is listed under Graphs): asymmetric with a "
        "zero point per block, a range search weighted by --error-weight, super weights and super-activation "
        "channels kept out on side paths. The builder's default RTN is symmetric "
        "(no zero points); k_quant writes zero points. sw-onnx writes standard DequantizeLinear + MatMul, which "
        "onnxruntime fuses into MatMulNBits at session load (\"fused\" under Graphs: the optimized graph).",
        "k_quant_mixed is not at equal bits: 29 of its 151 MatMulNBits (lm_head included) and the embedding are "
        "8-bit, 113.6 MB vs 86.5 MB for the RTN folder.",
        "The onnxruntime column is the one to judge decode by: all sessions live in one process and take turns "
        "within each round, so the machine's load (other jobs share these 2 cores) hits every model alike. The "
        "og.Generator column measures each model in its own process at a different moment, with spinning "
        "threads: when other jobs run it moves by 10-50% from round to round (seen in earlier runs), so read it "
        "as a check that the folders run in onnxruntime-genai at about the same speed.",
    ]
    spread = {name: max(v) / min(v) for name, v in (og or {}).get("per_round_decode_s", {}).items() if v}
    if spread:
        notes.append("Round-to-round spread (slowest / fastest round) in this run, og.Generator: "
                     f"{min(spread.values()):.2f}-{max(spread.values()):.2f}x; onnxruntime: "
                     + "{:.2f}-{:.2f}x.".format(*_spread(ort)))
    same = [r["name"] for r in rows if r.get("greedy_tokens_og") and r.get("greedy_tokens_ort")
            and r["greedy_tokens_og"] == r["greedy_tokens_ort"][:len(r["greedy_tokens_og"])]]
    differ = [r["name"] for r in rows if r.get("greedy_tokens_og") and r["name"] not in same]
    if same or differ:
        notes.append(f"Greedy tokens of og.Generator and of the onnxruntime loop on the same prompt: equal for "
                     f"{', '.join(same) or 'no row'}" + (f"; different for {', '.join(differ)}" if differ else "")
                     + " (JSON: greedy_tokens_ort / greedy_tokens_og).")
    commits = sorted({r["sw_onnx_commit"] for r in rows if r.get("sw_onnx_commit")})
    if commits:
        notes.append(f"sw-onnx checkout that wrote the (b) rows: {', '.join(commits)}"
                     + (" (the checkout changed during the run: compare those rows with care)" if len(commits) > 1
                        else "") + ".")
    for r in rows:
        if r.get("error"):
            extra = ""
            if r["name"] == "rtn_lm8_default":
                extra = (" A bug of the 0.15.2 builder: with the default method and the embedding tied to the "
                         "lm_head, the GatherBlockQuantized embedding refers to the RTN name of the int8 lm_head "
                         "weight, which the default (MLAS) quantizer does not write; `algo_config=rtn_last` "
                         "(row rtn_lm8) is the working way to an int8 lm_head.")
            notes.append(f"{r['name']} failed: {r['error']}{extra}")
        if r.get("og_error"):
            notes.append(f"og.Generator failed on {r['name']}: {r['og_error']}")
    return notes


def _met(ratio: float | None, limit: float = 1.05) -> str:
    return "not measured" if ratio is None else "met" if ratio <= limit else "NOT met"


def _verdicts(rows: list[dict], ort: dict | None, og: dict | None) -> list[str]:
    by = {r["name"]: r for r in rows if not r.get("error")}
    out = []
    pr = (ort or {}).get("per_round_decode_s", {})

    def ppl_line(b, a):
        if b in by and a in by and by[b].get("ppl") and by[a].get("ppl"):
            pb, pa = by[b]["ppl"], by[a]["ppl"]
            return f"{pb:.2f} vs {pa:.2f} ({(pb / pa - 1) * 100:+.1f}%): {'beats' if pb < pa else 'does NOT beat'} it"
        return "not measured"

    out.append(f"Perplexity, (b) `--lm-head-bits 4` vs (a) RTN at block 32, lm_head int4: {ppl_line('sw_lm4', 'rtn')}.")
    out.append("Perplexity, (b) `--lm-head-bits 4 --embedding-bits 4` vs (a) RTN (lm_head and embedding int4 in both): "
               f"{ppl_line('sw_lm4_emb4', 'rtn')}.")
    for k in ("k_quant", "k_quant_mixed"):
        out.append(f"Perplexity, (b) `--lm-head-bits 4` vs (a) {k}: {ppl_line('sw_lm4', k)}.")
    out.append("Perplexity, (b) default (lm_head 8-bit) vs (a) RTN with lm_head int8: "
               f"{ppl_line('sw_default', 'rtn_lm8')}.")
    r = _ratio(pr, "sw_lm4", "rtn")
    out.append(f"Decode (onnxruntime), (b) `--lm-head-bits 4` / (a) RTN, equal block 32 and lm_head int4: "
               f"{_f(r, '{:.3f}x')} (asked: within 1.05x): {_met(r)}.")
    r = _ratio(pr, "sw_lm4_emb4", "rtn")
    out.append(f"Decode (onnxruntime), (b) `--lm-head-bits 4 --embedding-bits 4` / (a) RTN: {_f(r, '{:.3f}x')} "
               f"(asked: within 1.05x): {_met(r)}.")
    out.append("Perplexity, (b) `--embedding-bits 8` (lm_head and embedding 8-bit) vs (a) RTN with lm_head int8: "
               f"{ppl_line('sw_default_emb8', 'rtn_lm8')}; vs k_quant_mixed: "
               f"{ppl_line('sw_default_emb8', 'k_quant_mixed')}.")
    r2 = _ratio(pr, "sw_default", "rtn")
    r3 = _ratio(pr, "sw_default", "rtn_lm8")
    out.append(f"Decode (onnxruntime), (b) default / (a) RTN: {_f(r2, '{:.3f}x')}; "
               f"(b) default / (a) RTN with lm_head int8: {_f(r3, '{:.3f}x')}; (b) `--embedding-bits 8` / (a) RTN "
               f"with lm_head int8: {_f(_ratio(pr, 'sw_default_emb8', 'rtn_lm8'), '{:.3f}x')}.")
    d1, d2 = _ratio(pr, "sw_lm4_nokeep", "rtn"), _ratio(pr, "sw_lm4_sym_nokeep", "rtn")
    d3 = _ratio(pr, "sw_lm4", "sw_lm4_nokeep")
    if d1 is not None or d2 is not None:
        out.append(f"Decode (onnxruntime), diagnostics: (b) without side paths / (a) RTN {_f(d1, '{:.3f}x')}; "
                   f"without side paths and zero points / (a) RTN {_f(d2, '{:.3f}x')}; (b) / (b) without side paths "
                   f"{_f(d3, '{:.3f}x')}.")
        out.append(f"Perplexity, diagnostics vs (a) RTN: without side paths {ppl_line('sw_lm4_nokeep', 'rtn')}; "
                   f"without side paths and zero points {ppl_line('sw_lm4_sym_nokeep', 'rtn')}.")
    if og:
        opr = og.get("per_round_decode_s", {})
        out.append("Decode (og.Generator), (b) `--lm-head-bits 4` / (a) RTN: "
                   f"{_f(_ratio(opr, 'sw_lm4', 'rtn'), '{:.3f}x')}; "
                   f"(b) default / (a) RTN: {_f(_ratio(opr, 'sw_default', 'rtn'), '{:.3f}x')}.")
    return out


# ---------------------------------------------------------------------------------------------- main


def _versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("onnxruntime", "onnxruntime-genai", "sw-onnx")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16, help="WikiText-2 windows of 512 (default 16)")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--rows", nargs="+", choices=[r.name for r in ROWS], help="only these rows")
    parser.add_argument("--no-og", action="store_true", help="skip the og.Generator latency column")
    parser.add_argument("--no-latency", action="store_true", help="skip both latency columns")
    parser.add_argument("--reuse-ppl", action="store_true",
                        help="take perplexities from --json where the row's folder size is unchanged")
    parser.add_argument("--rebuild", action="store_true",
                        help="redo the sw-onnx quantizations and retry builder variants that failed")
    parser.add_argument("--from-json", action="store_true",
                        help="only rewrite --markdown from --json (graph facts recomputed where missing)")
    parser.add_argument("--markdown")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    started = time.time()

    from sample_models.export_smollm2_genai import export_smollm2_genai

    if args.from_json:
        data = json.loads(Path(args.json_path).read_text())
        for rec in data["rows"]:
            if not rec.get("error") and "fused" not in rec["facts"]:
                rec["facts"] = _quant_facts(Path(rec["folder"]))
        data["verdicts"] = _verdicts(data["rows"], data["ort_latency"], data["og_latency"])
        write_outputs(_markdown(data), data, args.markdown, args.json_path)
        return

    previous = {}
    if args.reuse_ppl and args.json_path and Path(args.json_path).is_file():
        old = json.loads(Path(args.json_path).read_text())
        if old.get("settings", {}).get("windows") == args.windows:
            previous = {r["name"]: r for r in old["rows"] if r.get("ppl") is not None}

    fp32 = export_smollm2_genai(precision="fp32", quiet=True)
    rows, folders = [], {}
    for row in ROWS:
        if args.rows and row.name not in args.rows:
            continue
        rec = {"name": row.name, "group": row.group, "label": row.label, "lm_head": row.lm_head}
        try:
            if row.kind == "cached":
                folder = fp32 if row.precision == "fp32" else export_smollm2_genai(precision=row.precision, quiet=True)
                build = json.loads((folder / ".complete").read_text())
                rec["command"] = (f"python -m onnxruntime_genai.models.builder -i HF_FOLDER -o {folder.name} "
                                  f"-p {row.precision} -e cpu   # python sample_models/export_smollm2_genai.py"
                                  + ("" if row.precision == "fp32" else f" --precision {row.precision}"))
                rec["build_seconds"] = build.get("build_seconds")
            elif row.kind == "builder":
                folder, build = _builder_variant(row, args.rebuild)
                rec["command"] = (f"python -m onnxruntime_genai.models.builder -i HF_FOLDER -o {folder.name} "
                                  f"-p {row.precision} -e cpu --extra_options {' '.join(row.extra)}")
                rec["build_seconds"] = build.get("seconds")
            else:
                folder, build = _sw_variant(row, fp32, args.rebuild)
                rec["command"] = f"sw-onnx quantize {fp32.name} -o {folder.name} {' '.join(row.sw_args)}".rstrip()
                rec["build_seconds"] = build.get("seconds")
                rec["quantize_peak_rss_mb"] = build.get("peak_rss_mb")
                rec["sw_onnx_commit"] = build.get("sw_onnx_commit")
                rec["sw_config"] = build.get("config")
            rec["folder"] = str(folder)
            rec["bytes"] = _size(folder)
            rec["facts"] = _quant_facts(folder)
            rec["lm_head_graph"] = rec["facts"]["lm_head"]
            rec["embedding_graph"] = rec["facts"]["embedding"]
            old = previous.get(row.name)
            if old and old.get("bytes") == rec["bytes"]:
                rec.update({k: old[k] for k in ("ppl", "windows", "tokens", "eval_seconds") if k in old})
                _log(f"{row.name}: perplexity {rec['ppl']:.2f} (reused)")
            else:
                rec.update(_perplexity(folder, args.windows))
                _log(f"{row.name}: perplexity {rec['ppl']:.2f} ({rec['eval_seconds']} s), {rec['bytes'] / 1e6:.1f} MB")
            folders[row.name] = folder
        except Exception as e:  # one failed variant must not lose the others
            rec["error"] = str(e)[:600]
            _log(f"{row.name}: FAILED {rec['error']}")
        rows.append(rec)

    ort_lat = og_lat = None
    if not args.no_latency and folders:
        _log(f"decode latency, onnxruntime: {len(folders)} sessions, {args.rounds} rounds")
        ort_lat = _ort_latency(folders, args)
        if not args.no_og:
            _log("decode latency, og.Generator")
            og_lat = _og_latency(folders, args)
        ref = ort_lat["per_round_decode_s"]
        for rec in rows:
            n = rec["name"]
            if n in ref:
                rec["decode_ms"] = statistics.median(ref[n]) * 1e3
                rec["prefill_ms"] = statistics.median(ort_lat["per_round_prefill_s"][n]) * 1e3
                rec["decode_vs_rtn"] = _ratio(ref, n, "rtn")
                rec["decode_vs_fp32"] = _ratio(ref, n, "fp32")
                rec["greedy_tokens_ort"] = ort_lat["tokens"][n]
            if og_lat and og_lat["per_round_decode_s"].get(n):
                rec["og_decode_ms"] = statistics.median(og_lat["per_round_decode_s"][n]) * 1e3
                rec["og_decode_vs_rtn"] = _ratio(og_lat["per_round_decode_s"], n, "rtn")
                rec["greedy_tokens_og"] = og_lat["tokens"].get(n)
            if og_lat and n in og_lat["errors"]:
                rec["og_error"] = og_lat["errors"][n]
    data = {"date": time.strftime("%Y-%m-%d"), "settings": {k: getattr(args, k) for k in
                                                            ("windows", "rounds", "prefill", "decode")},
            "versions": _versions(), "rows": rows, "ort_latency": ort_lat, "og_latency": og_lat,
            "verdicts": _verdicts(rows, ort_lat, og_lat),
            "seconds": round(time.time() - started),
            "command": " ".join(["python", "bench/genai_builder.py", *sys.argv[1:]])}
    write_outputs(_markdown(data), data, args.markdown, args.json_path)


if __name__ == "__main__":
    main()
