"""Inline weights mapped from the .onnx file (`sw_onnx.wire.inline_as_external`) and written tensor by tensor
(`sw_onnx.wire.write_model`): against protobuf's own parse and serialization of the same files."""

from __future__ import annotations

import io
import mmap
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import sw_onnx.io
from sample_models.build import build_sample_model
from sw_onnx.io import load_model, save_model, stores_weights_externally
from sw_onnx.quantize import QuantizeConfig, quantize_model
from sw_onnx.wire import inline_as_external, write_model


@pytest.fixture
def mapped_inline(monkeypatch):
    """Make the loader map the inline weights of any model, however small (real models: >= 8 MiB)."""
    monkeypatch.setattr(sw_onnx.io.load, "_LAZY_INLINE_MIN_FILE_BYTES", 0)
    monkeypatch.setattr(sw_onnx.io.load, "_LAZY_INLINE_MIN_TENSOR_BYTES", 64)


def _model_with_mixed_tensors(path) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w_big"),
        numpy_helper.from_array(rng.standard_normal((3,)).astype(np.float32), "w_small"),
        numpy_helper.from_array(rng.standard_normal((40, 32)).astype(np.float16), "w_half"),
        numpy_helper.from_array(np.arange(100, dtype=np.int64), "ids_table"),
        helper.make_tensor("typed_floats", TensorProto.FLOAT, [30], rng.standard_normal(30).tolist()),  # float_data
    ]
    inits[0].doc_string = "kept"
    nodes = [helper.make_node("MatMul", ["x", "w_big"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["s", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["s", 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    model.metadata_props.add(key="k", value="v")
    onnx.save(model, str(path))
    return model


def test_inline_as_external_references_the_exact_bytes(tmp_path):
    path = tmp_path / "m.onnx"
    original = _model_with_mixed_tensors(path)
    skeleton = onnx.ModelProto.FromString(inline_as_external(path, min_bytes=64))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        turned = {}
        for ours, theirs in zip(skeleton.graph.initializer, original.graph.initializer, strict=True):
            if ours.data_location == TensorProto.EXTERNAL:
                ref = {e.key: e.value for e in ours.external_data}
                assert ref["location"] == "m.onnx"
                start, length = int(ref["offset"]), int(ref["length"])
                assert data[start:start + length] == theirs.raw_data
                ours.ClearField("data_location")
                del ours.external_data[:]
                ours.raw_data = data[start:start + length]
                turned[ours.name] = length
            assert ours == theirs  # name, dims, type, doc_string: untouched
    # Only raw_data of at least min_bytes: not the 12-byte one, not the float_data one.
    assert set(turned) == {"w_big", "w_half", "ids_table"}
    assert skeleton == original


def test_inline_as_external_declines_what_it_does_not_handle(tmp_path):
    path = tmp_path / "m.onnx"
    _model_with_mixed_tensors(path)
    assert inline_as_external(path, min_bytes=1 << 30) is None  # nothing large enough
    data = path.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    assert inline_as_external(tmp_path / "cut.onnx") is None  # truncated frame
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert inline_as_external(tmp_path / "empty.onnx") is None
    # A second graph field (protobuf merges them): left to protobuf.
    model = onnx.load(str(path))
    extra = onnx.ModelProto(graph=onnx.GraphProto(name="g2"))
    (tmp_path / "two.onnx").write_bytes(model.SerializeToString() + extra.SerializeToString())
    assert inline_as_external(tmp_path / "two.onnx", min_bytes=64) is None


def test_loader_maps_inline_weights_and_reads_the_same_values(tmp_path, mapped_inline):
    path = tmp_path / "m.onnx"
    original = _model_with_mixed_tensors(path)
    model = load_model(path)
    kinds = {name: type(v.const_value).__name__ for name, v in model.graph.initializers.items()}
    assert kinds["w_big"] == kinds["w_half"] == "_MappedInline" and kinds["w_small"] != "_MappedInline"
    assert not stores_weights_externally(model)
    for tensor in original.graph.initializer:
        np.testing.assert_array_equal(model.graph.initializers[tensor.name].const_value.numpy(),
                                      numpy_helper.to_array(tensor))


def test_loader_does_not_map_a_symlinked_or_hard_linked_model(tmp_path, mapped_inline):
    target = tmp_path / "real.onnx"
    _model_with_mixed_tensors(target)
    (tmp_path / "link.onnx").symlink_to(target)
    model = load_model(tmp_path / "link.onnx")
    assert not any(type(v.const_value).__name__ == "_MappedInline" for v in model.graph.initializers.values())
    os.link(target, tmp_path / "hard.onnx")
    model = load_model(tmp_path / "hard.onnx")
    assert not any(type(v.const_value).__name__ == "_MappedInline" for v in model.graph.initializers.values())


def test_save_inline_streams_tensors_and_matches_protobuf(tmp_path, mapped_inline):
    path = tmp_path / "m.onnx"
    original = _model_with_mixed_tensors(path)
    out = save_model(load_model(path), tmp_path / "copy.onnx")
    assert not (tmp_path / "copy.onnx.data").exists()  # inline in, inline out
    copy = onnx.load(str(out))
    onnx.checker.check_model(copy)
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in copy.graph.initializer} == \
        {t.name: numpy_helper.to_array(t).tobytes() for t in original.graph.initializer}
    assert next(t for t in copy.graph.initializer if t.name == "w_big").doc_string == "kept"
    assert dict((p.key, p.value) for p in copy.metadata_props) == {"k": "v"}


def test_write_model_refuses_a_tensor_of_the_wrong_length():
    header = TensorProto(name="t", dims=[4], data_type=TensorProto.FLOAT).SerializeToString()
    skeleton = onnx.ModelProto(ir_version=8, graph=onnx.GraphProto(name="g")).SerializeToString()
    buffer = io.BytesIO()
    write_model(buffer, skeleton, [(header, 16)], [np.arange(4, dtype=np.float32).tobytes()])
    model = onnx.ModelProto.FromString(buffer.getvalue())
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), np.arange(4, dtype=np.float32))
    with pytest.raises(ValueError, match="announced"):
        write_model(io.BytesIO(), skeleton, [(header, 16)], [b"\0" * 12])


@pytest.mark.parametrize("variant", ["optimum", "gemm"])
def test_quantize_output_is_the_same_with_mapped_inline_weights(tmp_path, monkeypatch, variant):
    """The whole pipeline (detection, calibration, quantization, verification, writing) on a model read the
    ordinary way and with its inline weights mapped: byte-identical outputs."""
    sample = build_sample_model(variant, tmp_path)
    config = QuantizeConfig(force=True)
    quantize_model(sample.path, tmp_path / "plain.onnx", config)
    monkeypatch.setattr(sw_onnx.io.load, "_LAZY_INLINE_MIN_FILE_BYTES", 0)
    monkeypatch.setattr(sw_onnx.io.load, "_LAZY_INLINE_MIN_TENSOR_BYTES", 64)
    assert any(type(v.const_value).__name__ == "_MappedInline" for v in load_model(sample.path).graph.initializers.values())
    summary = quantize_model(sample.path, tmp_path / "mapped.onnx", config)
    assert summary.verification["passed"] and not summary.external_data
    assert summary.input_bytes == sample.path.stat().st_size  # the .onnx counted once
    assert (tmp_path / "plain.onnx").read_bytes() == (tmp_path / "mapped.onnx").read_bytes()
