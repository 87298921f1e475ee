"""Peak memory of `sw-onnx detect` and `sw-onnx quantize` on a synthetic decoder whose fp32 weights pass 2 GB.

    python bench/large_model.py                    # build (~2.7 GB in /tmp), measure, delete
    python bench/large_model.py --layers 12        # ~3.8 GB
    python bench/large_model.py --dir D --keep     # keep the model in D (reused by a later --dir D run)

The model is Llama-shaped (embedding, N layers of RMSNorm + 16-head causal attention + gated MLP, residual adds,
final norm, lm_head -> logits; defaults hidden 2048, intermediate 8192, 8 layers, vocab 32000: 671 M fp32
parameters, 2.68 GB) and written layer by layer: each weight is generated, appended to `model.onnx.data` at a
4096-aligned offset and dropped, and the graph's initializers only reference it (external data). Building it
never holds more than one weight in memory.

Each command runs as a subprocess. Peak RSS is the kernel's own accounting (`ru_maxrss` of the child from
`wait4`, what `/usr/bin/time -v` prints as "Maximum resident set size"); a 20 ms psutil poll of
/proc/PID/status splits it into anonymous memory (heap: copies, arenas, the kernels' work) and file-backed
pages (the memory-mapped weights, which the kernel can drop and re-read under memory pressure, so they do
not need RAM of their own).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ALIGN = 4096


class _Writer:
    """Appends weights to one external-data file and returns initializers that reference them."""

    def __init__(self, data_path: Path, seed: int):
        self.data_path = data_path
        self.file = open(data_path, "wb")
        self.rng = np.random.default_rng(seed)
        self.initializers: list[TensorProto] = []
        self.bytes = 0

    def random(self, name: str, shape: tuple[int, ...], std: float) -> str:
        array = self.rng.standard_normal(shape, dtype=np.float32)
        array *= np.float32(std)
        return self.add(name, array)

    def add(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array, dtype=np.float32)
        offset = self.file.tell()
        pad = (-offset) % ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            offset += pad
        self.file.write(array.tobytes())
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        self.bytes += array.nbytes
        return name

    def close(self) -> None:
        self.file.close()


def build(out_dir: Path, *, hidden: int, intermediate: int, layers: int, vocab: int, heads: int, seed: int = 0) -> Path:
    """Write `out_dir/model.onnx` + `model.onnx.data`; returns the .onnx path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    w = _Writer(out_dir / "model.onnx.data", seed)
    nodes: list[onnx.NodeProto] = []
    head_dim = hidden // heads
    counter = [0]

    def op(op_type, inputs, name, **attrs):
        counter[0] += 1
        out = f"{name}_output_{counter[0]}"
        nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def const(name, array):
        tensor = helper.make_tensor(name, TensorProto.INT64 if array.dtype == np.int64 else TensorProto.FLOAT,
                                    array.shape, array.ravel().tolist())
        w.initializers.append(tensor)
        return name

    eps = const("eps", np.array(1e-5, np.float32))
    shape_heads = const("shape_heads", np.array([0, 0, heads, head_dim], np.int64))
    shape_merge = const("shape_merge", np.array([0, 0, hidden], np.int64))
    scale = const("attn_scale", np.array(1.0 / np.sqrt(head_dim), np.float32))
    neg = const("neg_inf", np.array(-1e4, np.float32))
    one = const("one", np.array(1.0, np.float32))

    def rmsnorm(x, name):
        weight = w.add(f"{name}.weight", np.ones(hidden, np.float32))
        sq = op("Mul", [x, x], f"/{name}/Pow")
        mean = op("ReduceMean", [sq], f"/{name}/ReduceMean", axes=[-1], keepdims=1)
        inv = op("Sqrt", [op("Add", [mean, eps], f"/{name}/Add")], f"/{name}/Sqrt")
        return op("Mul", [op("Div", [x, inv], f"/{name}/Div"), weight], f"/{name}/Mul")

    def linear(x, name, in_f, out_f):
        weight = w.random(f"{name}.weight", (in_f, out_f), 1.0 / np.sqrt(in_f))  # ONNX MatMul layout [in, out]
        return op("MatMul", [x, weight], f"/{name}/MatMul")

    embed = w.random("model.embed_tokens.weight", (vocab, hidden), 1.0)
    x = op("Gather", [embed, "input_ids"], "/model/embed_tokens/Gather")
    # Causal mask [seq, seq]: 0 on and below the diagonal, -1e4 above.
    seq_shape = op("Shape", ["input_ids"], "/model/mask/Shape", start=1, end=2)
    square = op("Concat", [seq_shape, seq_shape], "/model/mask/Concat", axis=0)
    ones = op("ConstantOfShape", [square], "/model/mask/ConstantOfShape",
              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]))
    lower = op("Trilu", [ones], "/model/mask/Trilu", upper=0)
    mask = op("Mul", [op("Sub", [one, lower], "/model/mask/Sub"), neg], "/model/mask/Mul")
    for i in range(layers):
        p = f"model.layers.{i}"
        h = rmsnorm(x, f"{p}.input_layernorm")
        q, k, v = (linear(h, f"{p}.self_attn.{n}_proj", hidden, hidden) for n in "qkv")

        def split(t, n):
            return op("Transpose", [op("Reshape", [t, shape_heads], f"/{p}/self_attn/{n}/Reshape")],
                      f"/{p}/self_attn/{n}/Transpose", perm=[0, 2, 1, 3])

        q, k, v = split(q, "q"), split(k, "k"), split(v, "v")
        kt = op("Transpose", [k], f"/{p}/self_attn/k/TransposeT", perm=[0, 1, 3, 2])
        scores = op("Mul", [op("MatMul", [q, kt], f"/{p}/self_attn/QK"), scale], f"/{p}/self_attn/Scale")
        probs = op("Softmax", [op("Add", [scores, mask], f"/{p}/self_attn/Mask")], f"/{p}/self_attn/Softmax", axis=-1)
        ctx = op("Transpose", [op("MatMul", [probs, v], f"/{p}/self_attn/PV")], f"/{p}/self_attn/ctx/Transpose",
                 perm=[0, 2, 1, 3])
        ctx = op("Reshape", [ctx, shape_merge], f"/{p}/self_attn/ctx/Reshape")
        x = op("Add", [x, linear(ctx, f"{p}.self_attn.o_proj", hidden, hidden)], f"/{p}/Add")
        h = rmsnorm(x, f"{p}.post_attention_layernorm")
        gate = linear(h, f"{p}.mlp.gate_proj", hidden, intermediate)
        up = linear(h, f"{p}.mlp.up_proj", hidden, intermediate)
        act = op("Mul", [op("Mul", [gate, op("Sigmoid", [gate], f"/{p}/mlp/Sigmoid")], f"/{p}/mlp/SiLU"), up],
                 f"/{p}/mlp/Mul")
        x = op("Add", [x, linear(act, f"{p}.mlp.down_proj", intermediate, hidden)], f"/{p}/Add_1")
    h = rmsnorm(x, "model.norm")
    logits = linear(h, "lm_head", hidden, vocab)
    nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/lm_head/Identity"))
    w.close()
    graph = helper.make_graph(
        nodes, "sw_onnx_large_decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab])],
        w.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="sw-onnx bench")
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _status_kb(pid: int) -> dict[str, int]:
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    fields[key] = int(rest.split()[0])
    except OSError:
        pass
    return fields


def measure(command: list[str], log: Path) -> dict:
    """Run `command`; its peak RSS (kernel accounting) and the peak anonymous / file-backed parts (polled)."""
    import psutil

    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    done = threading.Event()

    def poll():
        while not done.is_set():
            pids = [proc.pid]
            try:
                pids += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            except psutil.Error:
                pass
            totals: dict[str, int] = {}
            for pid in pids:
                for key, kb in _status_kb(pid).items():
                    totals[key] = totals.get(key, 0) + kb
            for key in peaks:
                peaks[key] = max(peaks[key], totals.get(key, 0))
            done.wait(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "command": " ".join(command),
        "exit_code": proc.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "peak_anon_mb": round(peaks["RssAnon"] / 1024, 1),
        "peak_file_backed_mb": round(peaks["RssFile"] / 1024, 1),
        "log": str(log),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/sw-onnx-large"), help="where the model is built")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--keep", action="store_true", help="keep the model (and outputs) afterwards")
    ap.add_argument("--only", choices=("detect", "quantize"), action="append", help="run only these commands")
    ap.add_argument("--quantize-args", default="", help="extra arguments for sw-onnx quantize, e.g. '--no-verify'")
    args = ap.parse_args(argv)

    path = args.dir / "model.onnx"
    data = args.dir / "model.onnx.data"
    built_here = False
    if path.exists() and data.exists():
        print(f"reusing {path}")
    else:
        free = shutil.disk_usage(args.dir.parent if not args.dir.exists() else args.dir).free
        need = 4 * (args.vocab * args.hidden * 2 + args.layers * (4 * args.hidden**2 + 3 * args.hidden * args.intermediate))
        if free < 2.5 * need:  # the model, the quantized copy and onnxruntime's optimized copy in verify
            print(f"not enough disk: {free / 1e9:.1f} GB free, about {2.5 * need / 1e9:.1f} GB needed", file=sys.stderr)
            return 1
        t0 = time.perf_counter()
        build(args.dir, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, vocab=args.vocab,
              heads=args.heads)
        built_here = True
        print(f"built {path} in {time.perf_counter() - t0:.0f} s")
    weights = data.stat().st_size
    print(f"weights: {weights / 1e9:.2f} GB ({weights / 2**20:,.0f} MiB) fp32, external data")

    cli = [sys.executable, "-m", "sw_onnx.cli"]
    results = {"weights_bytes": weights, "model": str(path), "runs": {}}
    commands = {
        "detect": cli + ["detect", str(path), "--json", str(args.dir / "detect.json")],
        "quantize": cli + ["quantize", str(path), "-o", str(args.dir / "model.int4.onnx"), "--force",
                           "--json", str(args.dir / "quantize.json"), *args.quantize_args.split()],
    }
    ok = True
    for name, command in commands.items():
        if args.only and name not in args.only:
            continue
        r = measure(command, args.dir / f"{name}.log")
        results["runs"][name] = r
        ok &= r["exit_code"] == 0
        print(f"{name:9s} exit {r['exit_code']}  {r['seconds']:7.1f} s  peak RSS {r['peak_rss_mb']:8,.0f} MB  "
              f"(anonymous {r['peak_anon_mb']:,.0f} MB, file-backed mapped weights {r['peak_file_backed_mb']:,.0f} MB)")
        if r["exit_code"] != 0:
            print(Path(r["log"]).read_text()[-2000:], file=sys.stderr)
    targets = {"quantize": 1024, "detect": weights / 2**20}
    for name, limit in targets.items():
        if name in results["runs"]:
            r = results["runs"][name]
            print(f"target {name}: peak RSS {r['peak_rss_mb']:,.0f} MB vs {limit:,.0f} MB: "
                  f"{'met' if r['peak_rss_mb'] < limit else 'MISSED'}; anonymous {r['peak_anon_mb']:,.0f} MB: "
                  f"{'met' if r['peak_anon_mb'] < limit else 'MISSED'}")
    print(json.dumps(results, indent=2))
    if not args.keep:
        if built_here:
            shutil.rmtree(args.dir, ignore_errors=True)
        else:
            for leftover in ("model.int4.onnx", "model.int4.onnx.data", "detect.json", "quantize.json"):
                (args.dir / leftover).unlink(missing_ok=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
