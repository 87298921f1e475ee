"""User mistakes end in one clear line and a non-zero exit, never a traceback; inputs are left untouched."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper


def _no_linear_model(path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64), "GGUF"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4), "not a readable ONNX model"),
        (lambda p: p.write_text("hello, I am text\n" * 20), "not a readable ONNX model"),
        (_no_linear_model, "no linear layer"),
    ],
    ids=["missing", "empty", "gguf", "png", "text", "no-linear"],
)
def test_detect_bad_model_is_one_clear_line(tmp_path, run_cli, make, expected):
    path = tmp_path / "model.onnx"
    make(path)
    before = path.read_bytes() if path.exists() else None
    proc = run_cli("detect", str(path))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], proc.stderr
    assert (path.read_bytes() if path.exists() else None) == before


def test_folder_without_model(tmp_path, run_cli):
    proc = run_cli("detect", str(tmp_path))
    assert proc.returncode == 1 and "no .onnx file" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_option_is_a_usage_error(tmp_path, run_cli):
    proc = run_cli("detect", str(tmp_path), "--max-iterations", "0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    proc = run_cli("detect", str(tmp_path), "--provider", "tpu")
    assert proc.returncode == 2 and "unknown" in proc.stderr
