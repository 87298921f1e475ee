"""onnxruntime-genai folders: the config is checked like any untrusted input, and the contrib-op sample model
(SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization, GroupQueryAttention, packed qkv) is detected
and quantized into a folder that onnxruntime (and onnxruntime-genai, when installed) runs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
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
