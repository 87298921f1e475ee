"""Tests of sample_models: tiny ONNX decoders with planted super weights (ground truth for sw-onnx)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from sample_models import (
    ALL_VARIANTS,
    CONTRIB_VARIANTS,
    DEFAULT_PROMPT,
    VARIANTS,
    PlantedSuperWeight,
    SampleModel,
    build_sample_model,
    make_feeds,
    run_sample_model,
)
from sample_models.build import main as build_main  # noqa: E402

PLANTED = tuple(v for v in ALL_VARIANTS if v != "clean")  # contrib variants too: these tests only run them
PAIRS = ("optimum", "kvcache", "merged")  # two super weights in one row


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, SampleModel]:
    out = tmp_path_factory.mktemp("sample_models")
    return {v: build_sample_model(v, out) for v in ALL_VARIANTS}


def _flat(a: np.ndarray) -> np.ndarray:
    """[batch?, seq, ch] -> [seq, ch] (batch of one)."""
    return a.reshape(-1, a.shape[-1])


def _all_tensor_names(sm: SampleModel) -> list[str]:
    t = sm.config["tensors"]
    names = [t["final_norm"]]
    for k in ("attn_norm", "attn_residual", "mlp_norm", "down_proj_input", "down_proj_output", "residual"):
        names += [n for n in t[k] if n is not None]  # genai: no residual output after the last layer
    return names


@pytest.fixture(scope="module")
def runs(models) -> dict[str, dict[str, np.ndarray]]:
    """One onnxruntime run per variant on DEFAULT_PROMPT, with the intermediate tensors exposed."""
    return {v: run_sample_model(sm, DEFAULT_PROMPT, extra_outputs=_all_tensor_names(sm)) for v, sm in models.items()}


def _down_io(sm: SampleModel, run: dict, layer: int) -> tuple[np.ndarray, np.ndarray]:
    t = sm.config["tensors"]
    return _flat(run[t["down_proj_input"][layer]]), _flat(run[t["down_proj_output"][layer]])


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes and those of its subgraphs (If branches), depth first."""
    out = []
    for n in graph.node:
        out.append(n)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out += _all_nodes(a.g)
    return out


def _weight_source(model: onnx.ModelProto, node_name: str) -> str:
    """Initializer feeding the node's weight input, through Cast/Transpose (also inside If branches)."""
    nodes = {n.name: n for n in _all_nodes(model.graph)}
    producer = {o: n for n in _all_nodes(model.graph) for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    name = nodes[node_name].input[1]
    while name not in inits:
        p = producer[name]
        assert p.op_type in ("Cast", "Transpose"), p.op_type
        name = p.input[0]
    return name


def _zeroed_copy(sm: SampleModel, sws: list[PlantedSuperWeight], out: Path) -> SampleModel:
    """Copy of the model with the given super weights set to 0, written to `out`."""
    model = onnx.load(str(sm.path))  # loads external data too
    inits = {i.name: i for i in model.graph.initializer}
    for sw in sws:
        t = inits[sw.initializer]
        arr = numpy_helper.to_array(t).copy()
        arr[sw.index] = 0
        t.CopyFrom(numpy_helper.from_array(arr, sw.initializer))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    onnx.save_model(model, str(path))
    return dataclasses.replace(sm, path=path)


def _median_chmax(a: np.ndarray) -> float:
    return float(np.median(np.abs(a).max(axis=0)))


# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_checker_and_onnxruntime(models, runs, variant):
    sm = models[variant]
    assert sm.path == sm.path.parent.parent / variant / "model.onnx" and sm.path.exists()
    onnx.checker.check_model(str(sm.path), full_check=True)
    logits = runs[variant]["logits"]
    want = (len(DEFAULT_PROMPT), 256) if variant == "gemm" else (1, len(DEFAULT_PROMPT), 256)
    assert logits.shape == want
    assert np.isfinite(logits).all()
    for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "vocab_size", "bos_token_id",
                "input_names"):
        assert key in sm.config
    assert sm.config["bos_token_id"] == DEFAULT_PROMPT[0] == 1
    hf = json.loads((sm.path.parent / "config.json").read_text())
    assert hf["bos_token_id"] == 1 and hf["hidden_size"] == 64 and hf["num_hidden_layers"] == 4
    gt = json.loads((sm.path.parent / "ground_truth.json").read_text())
    assert gt["super_activation_channel"] == sm.super_activation_channel
    assert [tuple(s["index"]) for s in gt["super_weights"]] == [s.index for s in sm.super_weights]


@pytest.mark.parametrize("variant", VARIANTS)
def test_graph_layout(models, variant):
    sm = models[variant]
    model = onnx.load(str(sm.path), load_external_data=False)
    nodes = {n.name: n for n in model.graph.node}
    inputs = [i.name for i in model.graph.input]
    assert inputs == sm.config["input_names"]
    inits = {i.name: i for i in model.graph.initializer}
    if variant == "gemm":
        assert inputs == ["tokens"]
        assert nodes["blk.1.ffn_down"].op_type == "Gemm"
        assert {a.name: a.i for a in nodes["blk.1.ffn_down"].attribute}["transB"] == 1
        assert list(inits["blk.1.ffn_down.weight"].dims) == [64, 192]
        assert nodes["blk.1.attn_q"].op_type == "MatMul"
        assert _weight_source(model, "blk.1.attn_q") == "blk.1.attn_q.weight"
    else:
        assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
        down = nodes["/model/layers.1/mlp/down_proj/MatMul"]
        assert down.op_type == "MatMul"
        src = _weight_source(model, down.name)
        assert list(inits[src].dims) == [192, 64]
        want = onnx.TensorProto.FLOAT16 if variant == "fp16" else onnx.TensorProto.FLOAT
        assert inits[src].data_type == want
        if variant == "fp16":
            for n in model.graph.node:
                if n.op_type == "MatMul" and n.input[1] not in inits and "self_attn/MatMul" not in n.name:
                    assert nodes.get(n.input[1].rsplit("_output_", 1)[0]).op_type == "Cast"
            assert sum(1 for i in inits.values() if i.data_type == onnx.TensorProto.FLOAT16) == 4 * 7 + 1
    if variant == "external":
        assert (sm.path.parent / "model.onnx.data").exists()
        ext = [i for i in inits.values() if i.data_location == onnx.TensorProto.EXTERNAL]
        assert ext and all(len(i.raw_data) == 0 for i in ext)
        assert all(i.data_location == onnx.TensorProto.EXTERNAL for i in inits.values()
                   if np.prod(i.dims) * 4 > 1024)
        assert sm.path.stat().st_size < 100_000
    if variant == "kvcache":
        assert "past_key_values.0.key" in inputs and "past_key_values.3.value" in inputs
        outs = [o.name for o in model.graph.output]
        assert "present.0.key" in outs and "present.3.value" in outs


@pytest.mark.parametrize("variant", PLANTED)
def test_ground_truth_points_at_the_weight(models, variant):
    sm = models[variant]
    model = onnx.load(str(sm.path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    want_n = 2 if variant in PAIRS else 1
    assert len(sm.super_weights) == want_n
    assert len({s.row for s in sm.super_weights}) == 1  # a pair shares its row
    assert sm.super_activation_channel == sm.super_weights[0].row
    for sw in sm.super_weights:
        assert sw.layer == 1
        assert _weight_source(model, sw.node) == sw.initializer
        w = inits[sw.initializer]
        assert sw.index == ((sw.row, sw.col) if variant == "gemm" else (sw.col, sw.row))
        assert w[sw.index] == sw.value
        if variant == "fp16":
            assert w.dtype == np.float16 and float(np.float16(sw.value)) == sw.value


@pytest.mark.parametrize("variant", PLANTED)
def test_super_weight_not_in_top5_magnitude(models, variant):
    sm = models[variant]
    model = onnx.load(str(sm.path))
    for sw in sm.super_weights:
        w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == sw.initializer))
        assert int((np.abs(w.astype(np.float32)) > abs(sw.value)).sum()) >= 5


@pytest.mark.parametrize("variant", PLANTED)
def test_super_activation_and_contribution(models, runs, variant):
    sm = models[variant]
    row = sm.super_activation_channel
    x, y = _down_io(sm, runs[variant], 1)
    # input spike at BOS, at every planted col
    med_x = _median_chmax(x)
    for sw in sm.super_weights:
        assert abs(x[0, sw.col]) > 20 * med_x
        assert np.abs(x[1:, sw.col]).max() < 5 * med_x  # not at other tokens
    # output spike: the largest |y| is at [0, row], hundreds of times the typical per-channel max
    t, c = np.unravel_index(np.abs(y).argmax(), y.shape)
    assert (t, c) == (0, row)
    assert abs(y[0, row]) >= 200 * _median_chmax(y)
    assert np.abs(y[1:, row]).max() < 10 * _median_chmax(y)  # other tokens: no spike
    # the planted weights explain the spike
    contribs = [x[0, sw.col] * sw.value / y[0, row] for sw in sm.super_weights]
    assert sum(contribs) > 0.8
    if len(contribs) == 2:
        assert 0.5 < contribs[0] < 0.7 and 0.3 < contribs[1] < 0.5
    # the planted coordinate is the dominant contribution to the spike (the paper's sharper locator)
    w_down = None
    model = onnx.load(str(sm.path))
    for i in model.graph.initializer:
        if i.name == sm.super_weights[0].initializer:
            w_down = numpy_helper.to_array(i).astype(np.float32)
    w_torch = w_down if variant == "gemm" else w_down.T
    assert int(np.abs(x[0] * w_torch[row]).argmax()) == sm.super_weights[0].col


@pytest.mark.parametrize("variant", PLANTED)
def test_super_activation_persists(models, runs, variant):
    sm = models[variant]
    row, t, r = sm.super_activation_channel, sm.config["tensors"], runs[variant]
    for layer in range(2, sm.config["num_layers"]):
        for key in ("attn_norm", "mlp_norm"):
            assert int(np.abs(_flat(r[t[key][layer]])[0]).argmax()) == row, (key, layer)
    assert int(np.abs(_flat(r[t["final_norm"]])[0]).argmax()) == row
    for layer in range(1, sm.config["num_layers"]):
        if t["residual"][layer] is None:  # genai: the final SkipSimplifiedLayerNormalization has no output 3
            assert variant == "genai" and layer == sm.config["num_layers"] - 1
            continue
        res = _flat(r[t["residual"][layer]])
        assert int(np.abs(res[0]).argmax()) == row
        assert abs(res[0, row]) > 30 * _median_chmax(res)


@pytest.mark.parametrize("variant", PLANTED)
def test_zeroing_super_weights_removes_spike(models, runs, variant, tmp_path):
    sm = models[variant]
    row = sm.super_activation_channel
    names = sm.config["tensors"]["down_proj_output"]
    _, y = _down_io(sm, runs[variant], 1)
    z = _zeroed_copy(sm, sm.super_weights, tmp_path / "all")
    rz = run_sample_model(z, DEFAULT_PROMPT, extra_outputs=names)
    yz = _flat(rz[names[1]])
    assert abs(yz[0, row]) * 10 < abs(y[0, row])
    assert abs(yz[0, row]) < 5 * _median_chmax(yz)  # typical size again
    d = np.abs(_flat(rz["logits"]) - _flat(runs[variant]["logits"]))
    assert d.max() > 1.0
    assert d[1:].max() > 0.1  # the other tokens' predictions change too (they attend to BOS)
    if len(sm.super_weights) > 1:  # each one of the pair carries a share: zeroing one only shrinks the spike
        for k, sw in enumerate(sm.super_weights):
            r1 = run_sample_model(_zeroed_copy(sm, [sw], tmp_path / f"one{k}"), DEFAULT_PROMPT, extra_outputs=names)
            frac = _flat(r1[names[1]])[0, row] / y[0, row]
            assert 0.25 < frac < 0.75


@pytest.mark.parametrize("variant", PLANTED)
def test_no_spike_without_bos_first(models, variant):
    sm = models[variant]
    names = sm.config["tensors"]["down_proj_output"]
    r = run_sample_model(sm, [5, 9, 33, 100, 7, 42], extra_outputs=names)
    y = _flat(r[names[1]])
    assert np.abs(y).max() < 10 * _median_chmax(y)


def test_kvcache_matches_optimum(models, runs):
    kv, opt = models["kvcache"], models["optimum"]
    assert [dataclasses.astuple(s) for s in kv.super_weights] == [dataclasses.astuple(s) for s in opt.super_weights]
    np.testing.assert_allclose(runs["kvcache"]["logits"], runs["optimum"]["logits"], rtol=1e-5, atol=1e-4)
    assert runs["kvcache"]["present.0.key"].shape == (1, 4, len(DEFAULT_PROMPT), 16)
    # incremental decoding with a non-empty past gives the same logits as the full pass
    split = 4
    r1 = run_sample_model(kv, DEFAULT_PROMPT[:split])
    past = {f"past_key_values.{i}.{k}": r1[f"present.{i}.{k}"] for i in range(4) for k in ("key", "value")}
    r2 = run_sample_model(kv, feeds=make_feeds(kv, DEFAULT_PROMPT[split:], past=past))
    assert r2["present.0.value"].shape == (1, 4, len(DEFAULT_PROMPT), 16)
    np.testing.assert_allclose(r2["logits"][0], runs["optimum"]["logits"][0, split:], rtol=1e-4, atol=1e-4)


def test_same_weights_same_logits_across_layouts(runs):
    ref = _flat(runs["gemm"]["logits"])
    for v in ("external",):
        np.testing.assert_allclose(_flat(runs[v]["logits"]), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_flat(runs["fp16"]["logits"]), ref, rtol=0.05, atol=0.05)


def test_clean_has_no_outliers(models, runs):
    sm, r = models["clean"], runs["clean"]
    assert sm.super_weights == [] and sm.super_activation_channel is None
    t = sm.config["tensors"]
    for layer in range(sm.config["num_layers"]):
        for key in ("attn_residual", "residual", "down_proj_output"):
            a = np.abs(_flat(r[t[key][layer]])).max(axis=0)
            assert a.max() < 10 * np.median(a), (key, layer)
        # silu(gate) * up of random weights has a heavy tail (about 13x at most here), but nothing like 50x+
        a = np.abs(_flat(r[t["down_proj_input"][layer]])).max(axis=0)
        assert a.max() < 20 * np.median(a), layer
    gt = json.loads((sm.path.parent / "ground_truth.json").read_text())
    assert gt["super_weights"] == [] and gt["super_activation_channel"] is None


def test_deterministic_and_cli(models, tmp_path):
    sm = build_sample_model("optimum", tmp_path / "again")
    assert sm.path.read_bytes() == models["optimum"].path.read_bytes()
    assert sm.super_weights == models["optimum"].super_weights
    other = build_sample_model("optimum", tmp_path / "seed1", seed=1)
    assert other.path.read_bytes() != sm.path.read_bytes()
    assert build_main(["--out", str(tmp_path / "cli"), "--variant", "gemm", "--variant", "external"]) == 0
    for v in ("gemm", "external"):
        for f in ("model.onnx", "ground_truth.json", "config.json"):
            assert (tmp_path / "cli" / v / f).exists()
    assert (tmp_path / "cli" / "external" / "model.onnx.data").exists()
    with pytest.raises(ValueError):
        build_sample_model("nope", tmp_path)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_other_seeds_keep_the_properties(tmp_path, seed):
    sm = build_sample_model("optimum", tmp_path, seed=seed)
    names = sm.config["tensors"]["down_proj_input"] + sm.config["tensors"]["down_proj_output"]
    r = run_sample_model(sm, DEFAULT_PROMPT, extra_outputs=names)
    x, y = _down_io(sm, r, 1)
    row = sm.super_activation_channel
    assert np.unravel_index(np.abs(y).argmax(), y.shape) == (0, row)
    assert abs(y[0, row]) >= 200 * _median_chmax(y)
    assert sum(x[0, s.col] * s.value for s in sm.super_weights) / y[0, row] > 0.8


# ---------------------------------------------------------------------------------------------------
# Contrib-op variants (CONTRIB_VARIANTS): onnxruntime-genai's builder layout and optimum's merged decoder.
# They stay out of VARIANTS (the detect / quantize tests iterate over VARIANTS; sw_onnx does not take them yet).


def test_contrib_variants_are_kept_apart():
    assert set(CONTRIB_VARIANTS) == {"genai", "merged"}
    assert not set(CONTRIB_VARIANTS) & set(VARIANTS) and ALL_VARIANTS == VARIANTS + CONTRIB_VARIANTS


@pytest.mark.parametrize("variant", CONTRIB_VARIANTS)
def test_contrib_variant_runs_in_onnxruntime(models, runs, variant):
    sm = models[variant]
    r = runs[variant]
    assert r["logits"].shape == (1, len(DEFAULT_PROMPT), 256) and np.isfinite(r["logits"]).all()
    for i in range(4):
        for kind in ("key", "value"):
            assert r[f"present.{i}.{kind}"].shape == (1, 4, len(DEFAULT_PROMPT), 16)
    gt = json.loads((sm.path.parent / "ground_truth.json").read_text())
    assert gt["variant"] == variant and gt["super_activation_channel"] == sm.super_activation_channel
    assert [tuple(s["index"]) for s in gt["super_weights"]] == [s.index for s in sm.super_weights]
    assert [s["initializer"] for s in gt["super_weights"]] == [s.initializer for s in sm.super_weights]
    assert gt["prompt"][0] == gt["bos_token_id"] == 1


def test_contrib_variants_give_the_logits_of_their_plain_twins(runs):
    """genai shares its weights with gemm (one planted weight), merged with optimum (the pair)."""
    np.testing.assert_allclose(_flat(runs["genai"]["logits"]), _flat(runs["gemm"]["logits"]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(runs["merged"]["logits"], runs["optimum"]["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(runs["merged"]["present.2.value"], runs["kvcache"]["present.2.value"], atol=1e-5)


@pytest.mark.parametrize("variant", CONTRIB_VARIANTS)
def test_contrib_incremental_decoding(models, runs, variant):
    """A prefix, then the rest with its present.* as past: the logits of the full pass."""
    sm, split = models[variant], 4
    r1 = run_sample_model(sm, DEFAULT_PROMPT[:split])
    past = {f"past_key_values.{i}.{k}": r1[f"present.{i}.{k}"] for i in range(4) for k in ("key", "value")}
    feeds = make_feeds(sm, DEFAULT_PROMPT[split:], past=past)
    if variant == "merged":
        assert feeds["use_cache_branch"].tolist() == [True]
    else:
        assert "position_ids" not in feeds and feeds["attention_mask"].shape == (1, len(DEFAULT_PROMPT))
    r2 = run_sample_model(sm, feeds=feeds)
    assert r2["present.0.key"].shape == (1, 4, len(DEFAULT_PROMPT), 16)
    np.testing.assert_allclose(r2["logits"][0], runs[variant]["logits"][0, split:], rtol=1e-4, atol=1e-4)


def test_genai_graph_is_the_builders_layout(models):
    sm = models["genai"]
    model = onnx.load(str(sm.path), load_external_data=False)
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 21), ("com.microsoft", 1)}
    ops = {}
    for n in model.graph.node:
        ops[(n.domain, n.op_type)] = ops.get((n.domain, n.op_type), 0) + 1
    assert ops[("", "SimplifiedLayerNormalization")] == 1
    assert ops[("com.microsoft", "SkipSimplifiedLayerNormalization")] == 2 * 4  # 3 + 4 in layers, 1 final
    assert ops[("com.microsoft", "GroupQueryAttention")] == 4
    assert ops[("", "MatMul")] == 4 * 5 + 1  # packed qkv, o, gate, up, down; lm_head
    assert ops[("", "Sigmoid")] == 4 and ("", "Add") not in ops and ("", "Softmax") not in ops
    inputs = [i.name for i in model.graph.input]
    assert inputs == (["input_ids", "attention_mask"] + [f"past_key_values.{i}.key" for i in range(4)]
                      + [f"past_key_values.{i}.value" for i in range(4)]) == sm.config["input_names"]
    past = model.graph.input[2].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in past] == ["batch_size", 4, "past_sequence_length", "kv_cache_dim"]
    assert [o.name for o in model.graph.output][:2] == ["logits", "present.0.key"]
    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    qkv = nodes["/model/layers.1/attn/qkv_proj/MatMul"]
    assert list(inits[qkv.input[1]].dims) == [64, 3 * 64]
    gqa = nodes["/model/layers.1/attn/GroupQueryAttention"]
    assert gqa.input[0] == qkv.output[0] and list(gqa.input[1:5]) == ["", "", "past_key_values.1.key",
                                                                      "past_key_values.1.value"]
    assert list(gqa.output[1:]) == ["present.1.key", "present.1.value"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert attrs["num_heads"] == attrs["kv_num_heads"] == 4 and attrs["do_rotary"] == 1
    assert list(inits["cos_cache"].dims) == [2048, 8]
    # the residual add lives in SkipSimplifiedLayerNormalization: output 3 of one feeds input 0 of the next
    post = nodes["/model/layers.1/post_attention_layernorm/SkipLayerNorm"]
    nxt = nodes["/model/layers.2/input_layernorm/SkipLayerNorm"]
    assert nxt.input[0] == post.output[3] and nxt.input[1] == "/model/layers.1/mlp/down_proj/MatMul/output_0"
    assert sm.config["tensors"]["residual"][1] == nxt.output[3]
    down = nodes["/model/layers.1/mlp/down_proj/MatMul"]
    assert down.input[1] == sm.super_weights[0].initializer == "model.layers.1.mlp.down_proj.MatMul.weight"
    # every initializer in model.onnx.data, as the builder writes them
    assert all(i.data_location == onnx.TensorProto.EXTERNAL for i in inits.values())
    assert (sm.path.parent / "model.onnx.data").is_file() and not (sm.path.parent / "config.json").exists()


def test_genai_config_is_valid(models):
    sm = models["genai"]
    cfg = json.loads((sm.path.parent / "genai_config.json").read_text())
    assert cfg == sm.config["genai_config"]
    m, dec = cfg["model"], cfg["model"]["decoder"]
    assert (m["bos_token_id"], m["eos_token_id"], m["pad_token_id"], m["vocab_size"]) == (1, 2, 2, 256)
    assert m["type"] == "llama" and m["context_length"] == cfg["search"]["max_length"] == 2048
    assert dec["head_size"] * dec["num_attention_heads"] == dec["hidden_size"] == 64
    assert dec["num_key_value_heads"] == 4 and dec["num_hidden_layers"] == 4
    assert (sm.path.parent / dec["filename"]) == sm.path
    model = onnx.load(str(sm.path), load_external_data=False)
    ins, outs = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    assert dec["inputs"]["input_ids"] in ins and dec["inputs"]["attention_mask"] in ins
    assert dec["outputs"]["logits"] == outs[0]
    for i in range(dec["num_hidden_layers"]):
        assert dec["inputs"]["past_key_names"] % i in ins and dec["inputs"]["past_value_names"] % i in ins
        assert dec["outputs"]["present_key_names"] % i in outs and dec["outputs"]["present_value_names"] % i in outs
    assert cfg["search"]["do_sample"] is False and cfg["search"]["past_present_share_buffer"] is True


def test_genai_runs_with_onnxruntime_genai(models):
    """onnxruntime_genai loads the folder (genai_config.json) and decodes greedily as onnxruntime does."""
    og = pytest.importorskip("onnxruntime_genai")
    sm = models["genai"]
    model = og.Model(str(sm.path.parent))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(DEFAULT_PROMPT) + 4)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray([DEFAULT_PROMPT], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    seq = [int(t) for t in gen.get_sequence(0)]
    want = list(DEFAULT_PROMPT)
    while len(want) < len(seq):
        want.append(int(run_sample_model(sm, want)["logits"][0, -1].argmax()))
    assert seq == want


def test_merged_graph_is_optimums_layout(models, runs):
    sm = models["merged"]
    model = onnx.load(str(sm.path))
    assert [n.op_type for n in model.graph.node] == ["If"] and model.graph.node[0].name == "optimum::if"
    node = model.graph.node[0]
    assert list(node.input) == ["use_cache_branch"]
    inp = {i.name: i for i in model.graph.input}
    assert inp["use_cache_branch"].type.tensor_type.elem_type == onnx.TensorProto.BOOL
    assert [i.name for i in model.graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.3.value" in inp and list(node.output) == [o.name for o in model.graph.output]
    branches = {a.name: a.g for a in node.attribute}
    assert {k: g.name for k, g in branches.items()} == {"then_branch": "with_past", "else_branch": "no_past"}
    outer = {i.name for i in model.graph.initializer}
    down = sm.super_weights[0].node
    for key, g in branches.items():
        assert len(g.input) == 0 and [o.name for o in g.output] == list(node.output)
        assert all(len(t.dims) <= 1 and (len(t.dims) == 0 or t.data_type == onnx.TensorProto.INT64)
                   for t in g.initializer)  # weights are outer-scope
        nodes = {n.name: n for n in g.node}
        assert nodes[down].input[1] == sm.super_weights[0].initializer in outer
        reads_past = any(x.startswith("past_key_values.") for n in g.node for x in n.input)
        assert reads_past == (key == "then_branch")
    # both branches agree on a prompt with an empty past
    feeds = make_feeds(sm)
    assert feeds["use_cache_branch"].tolist() == [False]
    feeds["use_cache_branch"] = np.asarray([True])
    np.testing.assert_allclose(run_sample_model(sm, feeds=feeds)["logits"], runs["merged"]["logits"], atol=1e-5)


def test_contrib_variants_deterministic_and_cli(models, tmp_path):
    for v in CONTRIB_VARIANTS:
        sm = build_sample_model(v, tmp_path / "again")
        assert sm.path.read_bytes() == models[v].path.read_bytes()
        assert sm.super_weights == models[v].super_weights
    assert (tmp_path / "again" / "genai" / "model.onnx.data").read_bytes() == \
        (models["genai"].path.parent / "model.onnx.data").read_bytes()
    assert build_main(["--out", str(tmp_path / "cli"), "--variant", "genai", "--variant", "merged"]) == 0
    assert (tmp_path / "cli" / "genai" / "genai_config.json").exists()
    assert (tmp_path / "cli" / "merged" / "config.json").exists()
