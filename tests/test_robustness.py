"""Unattended use on models sw-onnx has never seen: bad input ends in one clear line and a documented exit code,
inputs stay byte-identical, nothing is read outside the model's folder, nothing partial is ever published, and
the same input and options give the same bytes.

The CLI cases run as subprocesses (`run_cli`), two at a time, once per module (`ran`); each case is then its
own test. Exit codes: 1 model, 2 usage, 3 verification, 4 output not writable (see `sw_onnx.errors`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sample_models import build_sample_model

# ----------------------------------------------------------------------------------------------
# Inputs


def _copy_sample(samples: Path, variant: str, d: Path) -> Path:
    for f in (samples / variant).iterdir():
        shutil.copy(f, d / f.name)
    return d / "model.onnx"


def _edit(path: Path, fn) -> Path:
    model = onnx.load(str(path), load_external_data=False)
    fn(model)
    onnx.save(model, str(path))
    return path


def _set_locations(location: str):
    def fn(model):
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
    return fn


def _set_opset(version: int):
    def fn(model):
        model.opset_import[0].version = version
    return fn


def _nan_weight(model) -> None:
    for init in model.graph.initializer:
        if len(init.dims) == 2 and init.dims[0] == 192:  # a down_proj
            array = numpy_helper.to_array(init).copy()
            array[3, 5] = np.nan
            init.CopyFrom(numpy_helper.from_array(array, init.name))
            return


def _no_linear(d: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(d / "model.onnx"))
    return d / "model.onnx"


def _qlinear(d: Path) -> Path:
    w = numpy_helper.from_array(np.arange(12, dtype=np.uint8).reshape(4, 3), "W")
    consts = [numpy_helper.from_array(np.array(v, dtype=t), n) for n, v, t in
              [("xs", 0.1, np.float32), ("xz", 0, np.uint8), ("ws", 0.2, np.float32), ("wz", 0, np.uint8),
               ("ys", 0.3, np.float32), ("yz", 0, np.uint8)]]
    graph = helper.make_graph(
        [helper.make_node("QLinearMatMul", ["x", "xs", "xz", "W", "ws", "wz", "ys", "yz"], ["y"], name="qmm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [2, 3])], [w, *consts],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(d / "model.onnx"))
    return d / "model.onnx"


def make_bf16_variant(src: Path, dst: Path) -> Path:
    """The optimum sample with every MatMul weight stored as bfloat16 behind a Cast to float32."""
    model = onnx.load(str(src))
    weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    casts = []
    for init in model.graph.initializer:
        if init.name in weights and len(init.dims) == 2:
            array = numpy_helper.to_array(init).astype(ml_dtypes.bfloat16)
            name = init.name
            init.CopyFrom(helper.make_tensor(f"{name}.bf16", TensorProto.BFLOAT16, array.shape,
                                             array.view(np.uint16).tobytes(), raw=True))
            casts.append(helper.make_node("Cast", [f"{name}.bf16"], [name], to=TensorProto.FLOAT, name=f"{name}/Cast"))
    nodes = casts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dst


def _quantized(samples: Path, d: Path, fmt: str) -> Path:
    from sw_onnx.quantize import QuantizeConfig, quantize_model

    out = d / "model.onnx"
    quantize_model(samples / "optimum" / "model.onnx", out, QuantizeConfig(keep="none", verify=False, format=fmt))
    return out


def _fifo_outside(root: Path, name: str) -> Path:
    """A FIFO outside every model folder: opening it to read would block, so a read shows up as a hang."""
    secrets = root / "secrets"
    secrets.mkdir(exist_ok=True)
    fifo = secrets / name
    os.mkfifo(fifo)
    return fifo


# Each case: id -> (build(d, out, samples, root) -> argv, exit code, text the error line must contain).
# `d` holds the inputs (checked byte-identical afterwards, no file added), `out` is where outputs may go.
CASES = {
    "detect-missing-path": (lambda d, o, s, r: ["detect", d / "nope.onnx"], 1, "no such file"),
    "detect-folder-without-model": (
        lambda d, o, s, r: ((d / "notes.txt").write_text("no model here"), ["detect", d])[1], 1, "no .onnx file"),
    "detect-empty-file": (lambda d, o, s, r: ((d / "m.onnx").write_bytes(b""), ["detect", d / "m.onnx"])[1], 1, "empty file"),
    "detect-truncated": (
        lambda d, o, s, r: ((d / "m.onnx").write_bytes((s / "optimum/model.onnx").read_bytes()[:40_000]),
                            ["detect", d / "m.onnx"])[1], 1, "not a readable ONNX model"),
    "detect-corrupted": (
        lambda d, o, s, r: ((d / "m.onnx").write_bytes(b"\xff" * 16 + (s / "optimum/model.onnx").read_bytes()[16:]),
                            ["detect", d / "m.onnx"])[1], 1, "not a readable ONNX model"),
    "detect-gguf": (
        lambda d, o, s, r: ((d / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(200)), ["detect", d / "m.gguf"])[1],
        1, "GGUF"),
    "detect-png": (
        lambda d, o, s, r: ((d / "m.onnx").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
                            ["detect", d / "m.onnx"])[1], 1, "PNG image"),
    "detect-text": (
        lambda d, o, s, r: ((d / "m.onnx").write_text("hello, I am text\n" * 20), ["detect", d / "m.onnx"])[1],
        1, "text file"),
    "detect-no-linear-layer": (lambda d, o, s, r: ["detect", _no_linear(d)], 1, "no linear layer"),
    "detect-external-data-missing": (
        lambda d, o, s, r: (_copy_sample(s, "external", d), (d / "model.onnx.data").unlink(), ["detect", d])[2],
        1, "is missing"),
    "quantize-external-data-missing": (
        lambda d, o, s, r: (_copy_sample(s, "external", d), (d / "model.onnx.data").unlink(),
                            ["quantize", d / "model.onnx", "-o", o / "q.onnx"])[2], 1, "is missing"),
    "detect-external-data-short": (
        lambda d, o, s, r: (_copy_sample(s, "external", d),
                            (d / "model.onnx.data").write_bytes((d / "model.onnx.data").read_bytes()[:500_000]),
                            ["detect", d])[2], 1, "is shorter"),
    "detect-external-absolute-path": (
        lambda d, o, s, r: ["detect", _edit(_copy_sample(s, "external", d),
                                            _set_locations(str(_fifo_outside(r, "absolute"))))],
        1, "absolute path"),
    "detect-external-dotdot": (
        lambda d, o, s, r: (_fifo_outside(r, "dotdot"),
                            ["detect", _edit(_copy_sample(s, "external", d), _set_locations("../../secrets/dotdot"))])[1],
        1, "outside the model's folder"),
    "quantize-external-dotdot": (
        lambda d, o, s, r: (_fifo_outside(r, "dotdot2"),
                            ["quantize", _edit(_copy_sample(s, "external", d), _set_locations("../../secrets/dotdot2")),
                             "-o", o / "q.onnx"])[1], 1, "outside the model's folder"),
    "detect-external-symlink-out": (
        lambda d, o, s, r: (os.symlink(_fifo_outside(r, "symlinked"), d / "link.data"),
                            ["detect", _edit(_copy_sample(s, "external", d), _set_locations("link.data"))])[1],
        1, "symlink"),
    "detect-already-quantized-qdq": (lambda d, o, s, r: ["detect", _quantized(s, d, "qdq")], 1, "already quantized"),
    "quantize-already-quantized-qdq": (
        lambda d, o, s, r: ["quantize", _quantized(s, d, "qdq"), "-o", o / "q.onnx"], 1, "already quantized"),
    "detect-already-quantized-nbits": (lambda d, o, s, r: ["detect", _quantized(s, d, "nbits")], 1, "already quantized"),
    "quantize-already-quantized-nbits": (
        lambda d, o, s, r: ["quantize", _quantized(s, d, "nbits"), "-o", o / "q.onnx", "--keep", "none"],
        1, "already quantized"),
    "detect-already-quantized-qlinear": (lambda d, o, s, r: ["detect", _qlinear(d)], 1, "already quantized"),
    "detect-opset-6": (
        lambda d, o, s, r: ["detect", _edit(_copy_sample(s, "optimum", d), _set_opset(6))], 1, "unsupported opset 6"),
    "detect-opset-99": (
        lambda d, o, s, r: ["detect", _edit(_copy_sample(s, "optimum", d), _set_opset(99))], 1, "unsupported opset 99"),
    "quantize-opset-99": (
        lambda d, o, s, r: ["quantize", _edit(_copy_sample(s, "optimum", d), _set_opset(99)), "-o", o / "q.onnx"],
        1, "unsupported opset 99"),
    "detect-nan-weight": (lambda d, o, s, r: ["detect", _edit(_copy_sample(s, "optimum", d), _nan_weight)], 1, "NaN or infinite"),
    "quantize-nan-weight-keep-auto": (
        lambda d, o, s, r: ["quantize", _edit(_copy_sample(s, "optimum", d), _nan_weight), "-o", o / "q.onnx"], 1, "NaN or infinite"),
    "quantize-nan-weight": (
        lambda d, o, s, r: ["quantize", _edit(_copy_sample(s, "optimum", d), _nan_weight), "-o", o / "q.onnx", "--keep", "none"],
        1, "NaN or infinite"),
    "quantize-bits-3": (
        lambda d, o, s, r: ["quantize", _copy_sample(s, "optimum", d), "-o", o / "q.onnx", "--bits", "3"], 2, "use 4 or 8"),
    "quantize-block-size-24": (
        lambda d, o, s, r: ["quantize", _copy_sample(s, "optimum", d), "-o", o / "q.onnx", "--block-size", "24"],
        2, "power of two"),
    "quantize-unknown-format": (
        lambda d, o, s, r: ["quantize", _copy_sample(s, "optimum", d), "-o", o / "q.onnx", "--format", "gguf"],
        2, "--format gguf: use one of"),
    "quantize-bits-not-a-number": (
        lambda d, o, s, r: ["quantize", _copy_sample(s, "optimum", d), "--bits", "four"], 2, "Invalid value for '--bits'"),
    "quantize-output-is-input": (
        lambda d, o, s, r: ["quantize", _copy_sample(s, "optimum", d), "-o", d / "model.onnx"], 2, "would overwrite the input"),
    "quantize-output-exists": (
        lambda d, o, s, r: ((o / "q.onnx").write_bytes(b"previous output"),
                            ["quantize", _copy_sample(s, "optimum", d), "-o", o / "q.onnx"])[1],
        2, "already exists (hint: pass --force"),
    "quantize-output-folder-is-a-file": (
        lambda d, o, s, r: ((o / "file").write_text("x"),
                            ["quantize", _copy_sample(s, "optimum", d), "-o", o / "file" / "q.onnx"])[1],
        2, "is not a folder"),
    "detect-json-folder-is-a-file": (
        lambda d, o, s, r: ((o / "file").write_text("x"),
                            ["detect", _copy_sample(s, "optimum", d), "--json", o / "file" / "r.json"])[1],
        2, "is not a folder"),
    "quantize-keep-report-for-another-model": (
        lambda d, o, s, r: ((d / "report.json").write_text(json.dumps(
            {"schema": "sw-onnx/detect", "schema_version": 1,
             "super_weights": [{"initializer": "model.layers.7.mlp.down_proj.weight", "index": [3, 5], "value": 2.5}]})),
            ["quantize", _copy_sample(s, "optimum", d), "-o", o / "q.onnx", "--keep", d / "report.json"])[1],
        2, "report is probably for another model"),
}

# Runs that must succeed: id -> build(d, out, samples, root) -> (argv, cwd or None).
SUCCESS = {
    "detect-bf16": lambda d, o, s, r: (
        ["detect", make_bf16_variant(s / "optimum/model.onnx", d / "model.onnx"), "--json", o / "r.json"], None),
    "quantize-bf16-qdq": lambda d, o, s, r: (
        ["quantize", make_bf16_variant(s / "optimum/model.onnx", d / "model.onnx"), "-o", o / "q.onnx"], None),
    "quantize-block-larger-than-k": lambda d, o, s, r: (
        ["quantize", _copy_sample(s, "optimum", d), "-o", o / "q.onnx", "--block-size", "256", "--keep", "none"], None),
}
# Determinism: the same command twice, from two folders, with relative paths (so the JSON's paths match too).
for _run in ("a", "b"):
    SUCCESS[f"quantize-deterministic-{_run}"] = lambda d, o, s, r: (
        ["quantize", "../../inputs/quantize-deterministic/model.onnx", "-o", "q.onnx", "--json", "q.json"], o)
    SUCCESS[f"detect-deterministic-{_run}"] = lambda d, o, s, r: (
        ["detect", "../../inputs/detect-deterministic/model.onnx", "--json", "r.json"], o)


def _snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256 (or the symlink's target)} of everything under `folder`."""
    found = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            found[rel] = f"-> {os.readlink(p)}"
        elif p.is_file():
            found[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def ran(tmp_path_factory, run_cli):
    """Build every case's inputs, run all CLI commands (two at a time), return what each did."""
    root = tmp_path_factory.mktemp("robustness")
    samples = root / "samples"
    for variant in ("optimum", "external"):
        build_sample_model(variant, samples)
    for name in ("quantize-deterministic", "detect-deterministic"):
        (root / "inputs" / name).mkdir(parents=True)
        _copy_sample(samples, "external", root / "inputs" / name)
    jobs = {}
    for case_id, spec in {**CASES, **SUCCESS}.items():
        d, out = root / "inputs" / case_id, root / "outputs" / case_id
        d.mkdir(parents=True, exist_ok=True)
        out.mkdir(parents=True)
        build = spec[0] if isinstance(spec, tuple) else spec
        result = build(d, out, samples, root)
        argv, cwd = result if case_id in SUCCESS else (result, None)
        jobs[case_id] = (argv, cwd, d, out)
    before = {case_id: (_snapshot(d), _snapshot(out)) for case_id, (_, _, d, out) in jobs.items()}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case_id: pool.submit(run_cli, *argv, cwd=cwd, timeout=120) for case_id, (argv, cwd, _, _) in jobs.items()}
        procs = {case_id: f.result() for case_id, f in futures.items()}
    return {case_id: {"proc": procs[case_id], "inputs": jobs[case_id][2], "outputs": jobs[case_id][3],
                      "before": before[case_id][0], "outputs_before": before[case_id][1],
                      "after": _snapshot(jobs[case_id][2]), "outputs_after": _snapshot(jobs[case_id][3])}
            for case_id in jobs}


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input_is_one_clear_line_and_a_documented_exit_code(ran, case_id):
    r = ran[case_id]
    proc, (_, code, expected) = r["proc"], CASES[case_id]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert lines, "nothing on stderr"
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr  # exactly one error line, and it is the last
    assert expected in errors[0], errors[0]
    assert proc.returncode == code, (proc.returncode, errors[0])
    assert "internal error" not in errors[0]
    # The input is byte-identical and nothing was added beside it; no output appeared (or the old one stayed).
    assert r["after"] == r["before"]
    assert r["outputs_after"] == r["outputs_before"]


@pytest.mark.parametrize("case_id", [c for c in SUCCESS if "deterministic" not in c])
def test_supported_variants_succeed(ran, case_id):
    r = ran[case_id]
    assert r["proc"].returncode == 0, r["proc"].stderr
    assert r["after"] == r["before"]


def test_bf16_weights_detect_the_planted_super_weights(ran, tmp_path):
    truth = build_sample_model("optimum", tmp_path).super_weights
    report = json.loads((ran["detect-bf16"]["outputs"] / "r.json").read_text())
    found = {(sw["initializer"], tuple(sw["index"])) for sw in report["super_weights"]}
    assert found == {(f"{sw.initializer}.bf16", tuple(sw.index)) for sw in truth}


def test_bf16_weights_quantize_and_verify(ran):
    stdout = ran["quantize-bf16-qdq"]["proc"].stdout
    assert "verified: checker ok, 29 MatMulNBits / 29 quantized" in stdout, stdout
    assert "2 super weight(s) kept out" in stdout


def test_a_block_larger_than_k_is_one_block_per_column(ran):
    stdout = ran["quantize-block-larger-than-k"]["proc"].stdout
    assert "int4 b256" in stdout and "verified: checker ok, 29 MatMulNBits / 29 quantized" in stdout, stdout


@pytest.mark.parametrize("command, files", [("quantize", ("q.onnx", "q.onnx.data", "q.json")), ("detect", ("r.json",))])
def test_same_input_and_options_give_identical_bytes(ran, command, files):
    a, b = ran[f"{command}-deterministic-a"], ran[f"{command}-deterministic-b"]
    assert a["proc"].returncode == 0 and b["proc"].returncode == 0, a["proc"].stderr + b["proc"].stderr
    for name in files:
        assert (a["outputs"] / name).read_bytes() == (b["outputs"] / name).read_bytes(), name
    report = json.loads((a["outputs"] / files[-1]).read_text())
    assert report["seconds"] is None  # timings only with --timings


# ----------------------------------------------------------------------------------------------
# Writing failures, simulated in-process (the tests run as root, which ignores permissions).


@pytest.fixture(scope="module")
def external_sample(tmp_path_factory):
    return build_sample_model("external", tmp_path_factory.mktemp("ext")).path


def _main(argv, capsys) -> tuple[int, str]:
    from sw_onnx.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("error:") and sum(l.startswith("error:") for l in lines) == 1
    return lines[-1]


def test_disk_full_while_writing_leaves_no_partial_output_and_the_previous_file(external_sample, tmp_path, monkeypatch, capsys):
    import onnx_ir

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "q.onnx"
    out.write_bytes(b"previous model")
    (out_dir / "q.onnx.data").write_bytes(b"previous weights")
    real_save = onnx_ir.save

    def save_until_the_disk_is_full(model, path, **kwargs):
        real_save(model, path, **kwargs)  # the real bytes, then half of them "did not fit"
        for written in Path(path).parent.iterdir():
            with open(written, "r+b") as f:
                f.truncate(written.stat().st_size // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(onnx_ir, "save", save_until_the_disk_is_full)
    before = _snapshot(external_sample.parent)
    code, err = _main(["quantize", external_sample, "-o", out, "--force", "--keep", "none", "--no-verify"], capsys)
    line = _one_error_line(err)
    assert code == 4 and "No space left on device" in line and "free disk space" in line, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["q.onnx", "q.onnx.data"]  # no temporary left
    assert out.read_bytes() == b"previous model" and (out_dir / "q.onnx.data").read_bytes() == b"previous weights"
    assert _snapshot(external_sample.parent) == before


def test_disk_full_while_writing_the_json_report(external_sample, tmp_path, monkeypatch, capsys):
    report = tmp_path / "r.json"
    report.write_text("previous report")
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(real_fdopen(fd, *a, **k)))
    code, err = _main(["detect", external_sample, "--json", report], capsys)
    assert code == 4 and "No space left on device" in _one_error_line(err)
    assert report.read_text() == "previous report" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_permission_denied_when_publishing_restores_the_previous_output(external_sample, tmp_path, monkeypatch, capsys):
    """The weights file is renamed into place, then the .onnx rename fails: both previous files come back."""
    out = tmp_path / "q.onnx"
    out.write_bytes(b"previous model")
    (tmp_path / "q.onnx.data").write_bytes(b"previous weights")
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == out:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    code, err = _main(["quantize", external_sample, "-o", out, "--force", "--keep", "none", "--no-verify"], capsys)
    line = _one_error_line(err)
    assert code == 4 and "Permission denied" in line and "writable folder" in line, err
    assert out.read_bytes() == b"previous model" and (tmp_path / "q.onnx.data").read_bytes() == b"previous weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx", "q.onnx.data"]


def test_unwritable_output_folder(external_sample, tmp_path, monkeypatch, capsys):
    """As root nothing is read-only, so the folder refuses new files by a patched mkdtemp/mkstemp."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    code, err = _main(["quantize", external_sample, "-o", tmp_path / "q.onnx", "--keep", "none", "--no-verify"], capsys)
    assert code == 4 and "Permission denied" in _one_error_line(err), err
    assert list(tmp_path.iterdir()) == []


def test_external_data_is_validated_before_anything_reads_it(external_sample, tmp_path, monkeypatch):
    """load_model maps no file of a refused model, and validates a good one without reading its weights."""
    import mmap

    from sw_onnx.errors import UnsafeModelError
    from sw_onnx.io import load_model

    mapped = []
    real_mmap = mmap.mmap
    monkeypatch.setattr(mmap, "mmap", lambda *a, **k: mapped.append(a) or real_mmap(*a, **k))
    model = load_model(external_sample)
    assert mapped == []  # weights stay unread until used
    d = tmp_path / "m"
    d.mkdir()
    (tmp_path / "outside.data").write_bytes((external_sample.parent / "model.onnx.data").read_bytes())
    os.symlink(tmp_path / "outside.data", d / "model.onnx.data")
    shutil.copy(external_sample, d / "model.onnx")
    with pytest.raises(UnsafeModelError, match="symlink"):
        load_model(d / "model.onnx")
    assert mapped == []
    assert len(list(model.graph.initializers)) > 0


def test_hard_linked_external_data_is_refused(external_sample, tmp_path):
    from sw_onnx.errors import UnsafeModelError
    from sw_onnx.io import load_model

    (tmp_path / "own").mkdir()
    shutil.copy(external_sample.parent / "model.onnx.data", tmp_path / "own" / "model.onnx.data")
    shutil.copy(external_sample, tmp_path / "model.onnx")
    os.link(tmp_path / "own" / "model.onnx.data", tmp_path / "model.onnx.data")
    with pytest.raises(UnsafeModelError, match="hard links"):
        load_model(tmp_path / "model.onnx")


def test_a_fifo_is_not_opened_as_a_model(tmp_path, run_cli):
    os.mkfifo(tmp_path / "model.onnx")
    proc = run_cli("detect", tmp_path / "model.onnx", timeout=60)
    assert proc.returncode == 1 and "not a regular file" in proc.stderr.strip().splitlines()[-1]


if sys.platform != "linux":  # FIFOs, hard links and /proc are what these tests use
    pytestmark = pytest.mark.skip("Linux only")


def test_streamed_weights_give_the_same_outputs(external_sample, tmp_path, monkeypatch):
    """create_session(stream_weights=True) feeds the weights from sw-onnx's memory maps and drops their pages
    during the run (what keeps detect's RSS at its working set on large models): same logits."""
    import sw_onnx.io as swio
    from sample_models import make_feeds
    from sw_onnx.io import StreamingSession, create_session, load_model

    monkeypatch.setattr(swio.session, "_STREAM_MIN_BYTES", 0)  # the sample's weights are small
    plain = create_session(load_model(external_sample))
    streamed = create_session(load_model(external_sample), stream_weights=True)
    assert isinstance(streamed, StreamingSession) and len(streamed._weights) > 10
    feeds = make_feeds(build_sample_model("external", tmp_path))
    for _ in range(2):
        np.testing.assert_array_equal(streamed.run(["logits"], feeds)[0], plain.run(["logits"], feeds)[0])
