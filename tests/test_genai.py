"""onnxruntime-genai folders: the config is checked like any untrusted input, and the contrib-op sample model
(SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization, GroupQueryAttention, packed qkv) is detected
and quantized into a folder that onnxruntime (and onnxruntime-genai, when installed) runs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import onnx
import pytest

from sample_models import build_sample_model
from sw_onnx.errors import ModelLoadError
from sw_onnx.genai import read_config


@pytest.fixture(scope="module")
def genai_sample(tmp_path_factory):
    return build_sample_model("genai", tmp_path_factory.mktemp("genai"))


def _copy(sample, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(sample.path.parent, folder)
    return folder


def _edit_config(folder: Path, edit) -> None:
    path = folder / "genai_config.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_config_reads_the_decoder_and_cache_shape(genai_sample):
    config = read_config(genai_sample.path.parent / "genai_config.json")
    assert config.filename == genai_sample.path
    assert (config.head_size, config.num_key_value_heads, config.num_hidden_layers) == (16, 4, 4)
    assert config.past_patterns == ("past_key_values.%d.key", "past_key_values.%d.value")
    assert config.eos_token_ids == [2] and config.bos_token_id == 1


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["model"]["decoder"].update(filename="../model.onnx"), "outside the model's folder"),
    (lambda d: d["model"]["decoder"].update(filename="/etc/passwd"), "outside the model's folder"),
    (lambda d: d["model"]["decoder"].update(filename="nope.onnx"), "no such file"),
    (lambda d: d["model"]["decoder"].pop("head_size"), "missing model.decoder.head_size"),
    (lambda d: d["model"]["decoder"].update(head_size="16"), "head_size is str, expected int"),
    (lambda d: d["model"]["decoder"].update(num_key_value_heads=0), "expected a positive integer"),
    (lambda d: d["model"].pop("decoder"), "missing model.decoder"),
    (lambda d: d["model"]["decoder"].update(inputs=["input_ids"]), "must map names to strings"),
    (lambda d: d["model"].update(eos_token_id="two"), "expected a token id"),
])
def test_a_bad_config_is_one_clear_error(genai_sample, tmp_path, edit, message):
    folder = _copy(genai_sample, tmp_path)
    _edit_config(folder, edit)
    with pytest.raises(ModelLoadError, match=message):
        read_config(folder / "genai_config.json")


def test_a_symlinked_decoder_outside_the_folder_is_refused(genai_sample, tmp_path):
    folder = _copy(genai_sample, tmp_path)
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(folder / "model.onnx", outside)
    os.symlink(outside, folder / "linked.onnx")
    _edit_config(folder, lambda d: d["model"]["decoder"].update(filename="linked.onnx"))
    with pytest.raises(ModelLoadError, match="resolves outside"):
        read_config(folder / "genai_config.json")


def test_not_json_is_one_clear_error(genai_sample, tmp_path):
    folder = _copy(genai_sample, tmp_path)
    (folder / "genai_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not readable JSON"):
        read_config(folder / "genai_config.json")


@pytest.mark.parametrize("command", ["detect", "quantize", "eval", "generate"])
def test_cli_reports_a_bad_config_in_one_line_with_exit_1(genai_sample, tmp_path, run_cli, command):
    folder = _copy(genai_sample, tmp_path)
    _edit_config(folder, lambda d: d["model"]["decoder"].update(filename="../x.onnx"))
    args = {"eval": ["--max-tokens", "64"], "generate": ["--prompt", "hi", "--max-new-tokens", "2"]}.get(command, [])
    result = run_cli(command, folder, *args)
    assert result.returncode == 1, result.stderr
    assert "outside the model's folder" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Detect and quantize through the contrib ops


def _truth(sample) -> list[dict]:
    return json.loads((sample.path.parent / "ground_truth.json").read_text())["super_weights"]


def test_detect_finds_the_planted_super_weight_through_contrib_ops(genai_sample, run_cli, tmp_path):
    report = tmp_path / "r.json"
    result = run_cli("detect", genai_sample.path.parent, "--json", report)
    assert result.returncode == 0, result.stderr
    found = json.loads(report.read_text())
    expected = _truth(genai_sample)
    got = [{k: sw[k] for k in ("node", "initializer", "row", "col", "index")} for sw in found["super_weights"]]
    assert got == [{k: sw[k] for k in ("node", "initializer", "row", "col", "index")} for sw in expected]
    assert found["super_weights"][0]["value"] == pytest.approx(expected[0]["value"], rel=1e-6)
    # The residual stream runs through SkipSimplifiedLayerNormalization's sum output: origin and persistence.
    assert [a["channel"] for a in found["super_activations"]] == [genai_sample.super_activation_channel]
    assert found["super_activations"][0]["carried_fraction"] >= 0.5


def test_quantize_writes_a_complete_genai_folder_that_runs(genai_sample, tmp_path, run_cli):
    src = _copy(genai_sample, tmp_path)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    summary_path = tmp_path / "summary.json"
    result = run_cli("quantize", src, "--json", summary_path)  # the bare command: a sibling folder
    assert result.returncode == 0, result.stderr
    out = tmp_path / "model-uint4-b32"
    summary = json.loads(summary_path.read_text())
    assert summary["output"]["path"] == str(out)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # the input is untouched
    assert {"model.onnx", "model.onnx.data", "genai_config.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "model.onnx"
    v, t = summary["verification"], summary["totals"]
    assert t["quantized"] == t["linear_layers"] == 21  # 4 x (qkv, o, gate, up, down) + lm_head
    assert v["matmulnbits"] == v["expected_fused"] == 21 and v["dequantize_linear"] == 0 and not v["not_fused"]
    assert v["checker"].startswith("skipped: uses onnxruntime ops")
    kept = [k for layer in summary["layers"] for k in layer["kept"]]
    assert [k["index"] for k in kept] == [sw["index"] for sw in _truth(genai_sample)]
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        assert "not installed" in v["genai"]["error"]
    else:
        assert v["genai"]["ran"] and len(v["genai"]["new_tokens"]) == 8
    from sw_onnx.inputs import build_feeds
    from sw_onnx.io import open_session

    session = open_session(out)  # the folder's config sizes the symbolic KV-cache axes
    logits = session.run(["logits"], build_feeds(session, [1, 5, 9]))[0]
    assert logits.shape == (1, 3, 256)
    again = run_cli("quantize", src)
    assert again.returncode == 2 and "already exists" in again.stderr  # nothing replaced by surprise


def test_quantize_refuses_to_write_into_the_input_folder(genai_sample, tmp_path, run_cli):
    src = _copy(genai_sample, tmp_path)
    result = run_cli("quantize", src, "-o", src / "q")
    assert result.returncode == 2 and "input folder" in result.stderr


def test_loader_still_refuses_an_op_nothing_knows(genai_sample, tmp_path, run_cli):
    src = _copy(genai_sample, tmp_path)
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "SkipSimplifiedLayerNormalization")
    node.op_type = "SkipSimplifiedLayerNormalizationX"
    onnx.save(model, str(src / "model.onnx"))
    result = run_cli("detect", src)
    assert result.returncode == 1
    assert "SkipSimplifiedLayerNormalizationX" in result.stderr and "nor does the installed onnxruntime" in result.stderr


# ---------------------------------------------------------------------------------------------
# A merged decoder: both decoders in the branches of one If, sharing their weights


@pytest.fixture(scope="module")
def merged_sample(tmp_path_factory):
    return build_sample_model("merged", tmp_path_factory.mktemp("merged"))


def test_detect_sees_inside_the_if(merged_sample, run_cli, tmp_path):
    report = tmp_path / "r.json"
    result = run_cli("detect", merged_sample.path, "--json", report)
    assert result.returncode == 0, result.stderr
    got = sorted((sw["initializer"], tuple(sw["index"])) for sw in json.loads(report.read_text())["super_weights"])
    assert got == sorted((sw["initializer"], tuple(sw["index"])) for sw in _truth(merged_sample))


def test_quantize_each_shared_weight_once_in_both_branches(merged_sample, tmp_path, run_cli):
    out, summary_path = tmp_path / "q.onnx", tmp_path / "s.json"
    result = run_cli("quantize", merged_sample.path, "-o", out, "--json", summary_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(summary_path.read_text())
    layers = [layer for layer in summary["layers"] if layer["action"] == "quantized"]
    assert len(layers) == 58 and len({layer["initializer"] for layer in layers}) == 29  # 2 branches x 29
    model = onnx.load(str(out))
    names = [t.name for t in model.graph.initializer]
    packed = [n for n in names if n.endswith("/B")]
    assert len(packed) == 29  # one quantized copy per shared float weight
    assert not {layer["initializer"] for layer in layers} & set(names)  # the float weights are gone
    v = summary["verification"]
    assert v["passed"] and v["matmulnbits"] == 58 and not v["not_fused"]
