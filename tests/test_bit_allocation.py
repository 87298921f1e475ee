"""Bits per weight budgets (`--bits-per-weight`, `--allocation`), input importance from detection, and
embedding tables as GatherBlockQuantized: mechanisms checked against ground truth on the sample models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from sample_models import build_sample_model, make_feeds
from sw_onnx.config import QuantizeConfig
from sw_onnx.errors import UsageError
from sw_onnx.kernels import dequantize_blockwise, quantize_blockwise
from sw_onnx.plan import LayerPlan, kquant_layers, layer_bits
from sw_onnx.quantize import quantize_model


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return build_sample_model("optimum", tmp_path_factory.mktemp("alloc"))


def _tie(sample, tmp_path_factory, name: str, *, through_head: bool):
    """The sample decoder with its embedding table and lm_head weight made one initializer, read through a
    Transpose: the table's (``MatMul(x, Transpose(table))``, as optimum exports SmolLM2) or, `through_head`,
    the lm_head's (``Gather(Transpose(W_lm_head), ids)``, as onnxruntime-genai's builder writes it)."""
    model = onnx.load(str(sample.path))
    inits = {t.name: t for t in model.graph.initializer}
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
                  and len(inits[n.input[0]].dims) == 2)
    head = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits][-1]
    assert tuple(inits[head.input[1]].dims) == tuple(inits[gather.input[0]].dims)[::-1]
    kept, reader, slot = (head.input[1], gather, "tied_table") if through_head else (gather.input[0], head, "tied_lm_head_weight")
    model.graph.initializer.remove(inits[reader.input[0 if through_head else 1]])
    transpose = helper.make_node("Transpose", [kept], [slot], perm=[1, 0], name=f"{name}/Transpose")
    reader.input[0 if through_head else 1] = slot
    nodes = list(model.graph.node)
    model.graph.ClearField("node")
    model.graph.node.extend([transpose] + nodes)
    out = tmp_path_factory.mktemp(name) / "model.onnx"
    onnx.save(model, str(out))
    for extra in sample.path.parent.glob("*.json"):
        (out.parent / extra.name).write_text(extra.read_text())
    return out


@pytest.fixture(scope="module")
def tied(sample, tmp_path_factory):
    return _tie(sample, tmp_path_factory, "tied", through_head=False)


@pytest.fixture(scope="module")
def builder_tied(sample, tmp_path_factory):
    return _tie(sample, tmp_path_factory, "embed", through_head=True)


def _quantize(path, tmp_path, **options):
    out = tmp_path / "q.onnx"
    return quantize_model(path, out, QuantizeConfig(force=True, **options)), out


# ---------------------------------------------------------------------------------------------
# Budget


@pytest.mark.parametrize("extra,block,allocation", [(0.3, 32, "damage"), (1.0, 32, "damage"), (0.2, 16, "damage"),
                                                    (0.6, 16, "damage"), (0.3, 32, "kquant"), (1.0, 16, "kquant")])
def test_budget_is_respected_and_nothing_else_fits(sample, tmp_path, extra, block, allocation):
    """Ground truth: the written bits (layer_bits = the tensors, tests/test_quantize.py) over the quantized
    weights stay within the budget, and (damage) no single remaining upgrade would still fit in it."""
    floor = _quantize(sample.path, tmp_path, block_size=block, lm_head_bits=0)[0].totals()["bits_per_weight"]
    budget = floor + extra
    summary, _ = _quantize(sample.path, tmp_path, bits_per_weight=budget, block_size=block, allocation=allocation,
                           lm_head_bits=0)
    t = summary.totals()
    total = sum(t["bit_count"].values())
    assert total <= budget * t["weights"] + 1e-6
    assert t["bits_per_weight"] > floor  # something was raised
    if allocation == "damage":
        spare = budget * t["weights"] - total
        for p in summary.quantized:
            if p.bits == 4:
                from dataclasses import replace

                upgrade = sum(layer_bits(replace(p, bits=8)).values()) - sum(layer_bits(p).values())
                assert upgrade > spare or p.block_size > 32, p.node


def test_budget_below_the_int4_floor_is_a_usage_error(sample, tmp_path):
    with pytest.raises(UsageError, match="alone costs"):
        _quantize(sample.path, tmp_path, bits_per_weight=4.5, block_size=32)


def test_kquant_rule_is_llama_cpps_use_more_bits():
    plans = [LayerPlan(node=f"/model/layers.{i}/{part}/MatMul", op_type="MatMul", initializer=f"w{i}{part}",
                       position=7 * i + j, layer=i, k=64, n=64)
             for i in range(30) for j, part in enumerate(("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj",
                                                          "self_attn/o_proj", "mlp/gate_proj", "mlp/up_proj",
                                                          "mlp/down_proj"))]
    plans.append(LayerPlan(node="/lm_head/MatMul", op_type="MatMul", initializer="head", position=999, layer=None,
                           k=64, n=64, is_lm_head=True))
    chosen = kquant_layers(plans)
    assert chosen[0].is_lm_head
    layers = sorted({p.layer for p in chosen[1:]})
    assert layers == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29]  # onnxruntime-genai's k_quant_mixed, n=30
    assert {p.node.split("/")[-2] for p in chosen[1:]} == {"q_proj", "k_proj", "v_proj", "down_proj"}


def test_kquant_alone_raises_the_whole_rule(sample, tmp_path):
    summary, _ = _quantize(sample.path, tmp_path, allocation="kquant")
    raised = {p.node for p in summary.quantized if p.bits == 8}
    assert raised == {p.node for p in kquant_layers(summary.layers)}


def test_damage_allocation_takes_the_most_damage_saved_per_bit_first(sample, tmp_path, monkeypatch):
    """With made-up damages (one layer's int4 damage 1000x the others'), a budget for one int8 layer raises
    exactly that layer; with a budget for all, every layer."""
    import sw_onnx.plan as plan_module

    real = plan_module._options
    target = "/model/layers.1/mlp/up_proj/MatMul"
    monkeypatch.setattr(plan_module, "ALLOCATION_DAMAGE", "relative")

    def options(p, layer, importance):
        out = real(p, layer, importance)
        for o in out:
            o.relative = (1000.0 if p.node == target else 1.0) * (1.0 if o.bits == 4 else 0.01)
        return out

    monkeypatch.setattr(plan_module, "_options", options)
    base, _ = _quantize(sample.path, tmp_path, lm_head_bits=0, block_size=32)
    t = base.totals()
    p = next(p for p in base.quantized if p.node == target)
    from dataclasses import replace

    upgrade = sum(layer_bits(replace(p, bits=8)).values()) - sum(layer_bits(p).values())
    one = (sum(t["bit_count"].values()) + upgrade) / t["weights"]
    summary, _ = _quantize(sample.path, tmp_path, lm_head_bits=0, block_size=32, bits_per_weight=one + 1e-9)
    assert [q.node for q in summary.quantized if q.bits == 8] == [target]
    every, _ = _quantize(sample.path, tmp_path, lm_head_bits=0, block_size=32, bits_per_weight=16.0)
    assert all(q.bits == 8 for q in every.quantized)


def test_damage_estimate_is_the_importance_weighted_rounding_error(sample):
    """`_options`' damage = sum_k E[x_k^2] * sum_n (w - q(w))^2 (round to nearest) over the importance-weighted
    squared weights, for each option, recomputed here in numpy."""
    from sw_onnx.analyze.input_stats import calibrate_linear_inputs, importance_from_stats
    from sw_onnx.discover import find_linear_layers
    from sw_onnx.io import load_model
    from sw_onnx.plan import IMPORTANCE_SKIP_FIRST, _options, build_quant_plan

    model = load_model(sample.path)
    ids = np.array([1, 17, 42, 7, 99, 64, 23, 5], np.int64)
    importance = importance_from_stats(calibrate_linear_inputs(str(sample.path), [ids]))
    plan = build_quant_plan(model, QuantizeConfig(block_size=64, sa_keep_out=False))
    layer = find_linear_layers(model)[0][3]
    p = plan.by_node()[layer.name]
    imp = importance[layer.input.name].mean_sq(skip_first=IMPORTANCE_SKIP_FIRST)
    w = layer.weight.effective_weight()
    signal = float(imp @ (w.astype(np.float64) ** 2).sum(axis=1))
    got = {(o.bits, o.block_size): o.relative for o in _options(p, layer, importance)}
    assert set(got) == {(4, 64), (4, 32), (8, 64)}
    for (bits, block), damage in got.items():
        err = (w - dequantize_blockwise(quantize_blockwise(w, bits=bits, block_size=block))).astype(np.float64) ** 2
        assert damage == pytest.approx(float(imp @ err.sum(axis=1)) / signal, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Importance: measured by detection, carried by the report


def test_detect_report_carries_input_importance_and_quantize_uses_it(sample, tmp_path, run_cli):
    report = tmp_path / "r.json"
    assert run_cli("detect", sample.path, "--json", report).returncode == 0
    data = json.loads(report.read_text())
    entries = data["input_importance"]
    assert entries and all(len(e["sum_sq"]) == e["k"] and e["tokens"] == len(data["input"]["token_ids"]) for e in entries)
    auto, _ = _quantize(sample.path, tmp_path, error_weight="x2")
    from_report, _ = _quantize(sample.path, tmp_path, error_weight="x2", keep=str(report))
    assert [p.reason for p in auto.layers] == [p.reason for p in from_report.layers]
    searched = [p for p in auto.quantized if p.clip == "mse"]  # the int8 lm_head is round-to-nearest
    assert searched and all("error weight x2" in p.reason and "uniform" not in p.reason for p in searched)


def test_importance_is_the_mean_square_of_the_layer_input(sample):
    """The probe's E[x^2] per channel equals numpy's on the exposed input of a layer."""
    from sw_onnx.analyze.input_stats import calibrate_linear_inputs, importance_from_stats

    ids = np.array([1, 17, 42, 7, 99, 64, 23, 5], np.int64)
    stats = calibrate_linear_inputs(str(sample.path), [ids])
    importance = importance_from_stats(stats)
    name = next(iter(importance))
    model = onnx.load(str(sample.path))
    model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = make_feeds(sample, ids)
    x = session.run([name], feeds)[0].reshape(-1, importance[name].k).astype(np.float64)
    np.testing.assert_allclose(importance[name].mean_sq(), (x ** 2).mean(axis=0), rtol=1e-4)
    np.testing.assert_allclose(importance[name].mean_sq(skip_first=True), (x[1:] ** 2).mean(axis=0), rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Embeddings


def _gathered(path: Path, ids: np.ndarray) -> tuple[np.ndarray, str]:
    """The output of the model's first GatherBlockQuantized (exposed as a graph output) on `ids`."""
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    model.graph.output.append(helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feeds = {"input_ids": ids[None, :]}
    if "attention_mask" in names:
        feeds["attention_mask"] = np.ones_like(ids)[None, :]
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(len(ids), dtype=np.int64)[None, :]
    return session.run([node.output[0]], feeds)[0][0], node.input[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gather_block_quantized_equals_the_numpy_dequantized_gather(sample, tmp_path, bits, symmetric):
    model = onnx.load(str(sample.path))
    table = next(numpy_helper.to_array(t) for t in model.graph.initializer
                 if any(n.op_type == "Gather" and n.input[0] == t.name for n in model.graph.node) and len(t.dims) == 2)
    summary, out = _quantize(sample.path, tmp_path, embedding_bits=bits, symmetric=symmetric)
    (e,) = summary.embeddings
    assert e.shared_with is None and e.bits == bits
    ids = np.array([0, 3, 7, 1, 5], np.int64)
    got, _ = _gathered(out, ids)
    reference = dequantize_blockwise(quantize_blockwise(table.T.copy(), bits=bits, block_size=e.block_size,
                                                        symmetric=symmetric)).T
    np.testing.assert_array_equal(got, reference[ids])
    t = summary.totals()
    assert t["embedding_weights"] == table.size and t["embedding_bits"] == sum(e.bit_count().values())
    written = sum(int(np.prod(x.dims)) * (16 if x.data_type == onnx.TensorProto.FLOAT16 else
                                          32 if x.data_type == onnx.TensorProto.FLOAT else 8)
                  for x in onnx.load(str(out)).graph.initializer if x.name.startswith(f"{e.initializer}/sw_onnx_gbq/"))
    assert written == t["embedding_bits"]  # the count is what is written


def test_tied_table_is_shared_with_the_lm_head(tied, tmp_path):
    """A table tied to the lm_head at the same bits is written once: GatherBlockQuantized reads the lm_head's
    MatMulNBits codes, and its rows are the lm_head's dequantized weight columns."""
    summary, out = _quantize(tied, tmp_path, embedding_bits=8, lm_head_bits=8, error_weight="w2")
    (e,) = summary.embeddings
    head = next(p for p in summary.quantized if p.is_lm_head)
    assert e.shared_with == head.node and head.form == "nbits" and e.bits == head.bits
    assert summary.verification["passed"]
    model = onnx.load(str(out))
    assert not any(t.name == e.initializer for t in model.graph.initializer)  # the float table is gone
    table = numpy_helper.to_array(next(t for t in onnx.load(str(tied)).graph.initializer if t.name == e.initializer))
    ids = np.array([2, 0, 6], np.int64)
    got, data = _gathered(out, ids)
    reference = dequantize_blockwise(quantize_blockwise(table.T.copy(), bits=8, block_size=head.block_size,
                                                        clip=head.clip, refit=head.refit, mse_grid=head.mse_grid)).T
    np.testing.assert_allclose(got, reference[ids], rtol=2e-6, atol=1e-7)  # (q - z) * s: float32 order only
    t = summary.totals()
    assert t["embedding_weights"] == 0 and t["embedding_bits"] == 0  # counted once, as the lm_head
    separate, _ = _quantize(tied, tmp_path, embedding_bits=4, lm_head_bits=8)
    assert separate.embeddings[0].shared_with is None and separate.totals()["embedding_weights"] == table.size


@pytest.mark.parametrize("embedding_bits", [8, 4])
def test_table_read_through_a_transpose_of_the_lm_head_weight(builder_tied, tmp_path, embedding_bits):
    """onnxruntime-genai's tie (Gather(Transpose(W [H, V]))): at the lm_head's bits the table shares its codes,
    otherwise it gets its own; either way the float weight and the Transpose are gone and the gathered rows are
    the numpy-quantized columns of W."""
    summary, out = _quantize(builder_tied, tmp_path, embedding_bits=embedding_bits, lm_head_bits=8, error_weight="w2")
    (e,) = summary.embeddings
    head = next(p for p in summary.quantized if p.is_lm_head)
    assert e.transposed and e.initializer == head.initializer and summary.verification["passed"]
    assert (e.shared_with == head.node) == (embedding_bits == 8)
    model = onnx.load(str(out))
    assert not any(t.name == e.initializer for t in model.graph.initializer)
    assert not any(n.op_type == "Transpose" and n.name == "embed/Transpose" for n in model.graph.node)
    w = numpy_helper.to_array(next(t for t in onnx.load(str(builder_tied)).graph.initializer if t.name == e.initializer))
    assert (e.vocab, e.hidden) == (w.shape[1], w.shape[0])
    ids = np.array([2, 0, 6], np.int64)
    got, _ = _gathered(out, ids)
    if e.shared_with:
        ref = quantize_blockwise(w, bits=8, block_size=head.block_size, clip=head.clip, refit=head.refit, mse_grid=head.mse_grid)
    else:
        ref = quantize_blockwise(w.copy(), bits=embedding_bits, block_size=e.block_size)
    np.testing.assert_allclose(got, dequantize_blockwise(ref).T[ids], rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("equal", [True, False])
def test_lm_head_weight_equal_to_the_table_is_shared_as_a_tie(sample, tmp_path, equal):
    """An export that wrote a tied lm_head as its own copy of the table (Gemma-3 through optimum): equal values
    are shared like a tie (one set of codes); a copy differing in one value is not."""
    model = onnx.load(str(sample.path))
    inits = {t.name: t for t in model.graph.initializer}
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits)
    head = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits][-1]
    copy = numpy_helper.to_array(inits[gather.input[0]]).T.copy()
    if not equal:
        copy[3, 5] += np.float32(1e-3)
    inits[head.input[1]].CopyFrom(numpy_helper.from_array(copy, head.input[1]))
    path = tmp_path / "copied" / "model.onnx"
    path.parent.mkdir()
    onnx.save(model, str(path))
    for extra in sample.path.parent.glob("*.json"):
        (path.parent / extra.name).write_text(extra.read_text())
    summary, out = _quantize(path, tmp_path, embedding_bits=8, lm_head_bits=8)
    (e,) = summary.embeddings
    lm_head = next(p for p in summary.quantized if p.is_lm_head)
    assert (e.shared_with == lm_head.node) == equal and summary.verification["passed"]
    written = {t.name for t in onnx.load(str(out)).graph.initializer}
    assert gather.input[0] not in written  # the float table is gone either way
    assert (f"{e.initializer}/sw_onnx_gbq/data" in written) == (not equal)  # own codes only when not shared


def test_embedding_bits_asked_for_but_no_table_quantizable_says_why(tied, tmp_path):
    """A tied table that a float lm_head still reads stays float (quantizing it would add a table): with
    --embedding-bits given explicitly, the progress says so instead of silently doing nothing."""
    said = []
    out = tmp_path / "q.onnx"
    summary = quantize_model(tied, out, QuantizeConfig(force=True, embedding_bits=8, lm_head_bits=0), progress=said.append)
    assert not summary.embeddings
    assert any("--embedding-bits 8: no embedding table to quantize" in m for m in said), said
    default = quantize_model(tied, out, QuantizeConfig(force=True, lm_head_bits=0), progress=said.append)
    assert not default.embeddings and sum("no embedding table" in m for m in said) == 1  # the default stays quiet


# ---------------------------------------------------------------------------------------------
# Measured sensitivity


@pytest.mark.parametrize("variant", ["optimum", "gemm", "fp16"])
def test_to_initializer_layout_inverts_effective_weight(variant, tmp_path):
    from sw_onnx.discover import find_linear_layers
    from sw_onnx.io import load_model

    sample = build_sample_model(variant, tmp_path)
    for layer in find_linear_layers(load_model(sample.path))[0]:
        stored = layer.weight.initializer.const_value.numpy()
        back = layer.weight.to_initializer_layout(layer.weight.effective_weight())
        assert back.dtype == stored.dtype and back.shape == stored.shape
        np.testing.assert_array_equal(back, stored)


def test_layer_sensitivity_is_zero_for_the_same_weight_and_grows_with_the_error(sample):
    from sw_onnx.analyze.sensitivity import layer_sensitivity
    from sw_onnx.discover import find_linear_layers
    from sw_onnx.io import load_model

    model = load_model(sample.path)
    ids = np.array([1, 17, 42, 7, 99, 64, 23, 5], np.int64)

    def measure(replacement):
        clone = model.clone()
        return layer_sensitivity(clone, find_linear_layers(clone)[0][:4], ids, replacement)

    same = measure(lambda layer: layer.weight.effective_weight())
    assert len(same) == 4 and max(same.values()) < 1e-9
    rng = np.random.default_rng(0)
    noise = {}

    def noisy(scale):
        def replacement(layer):
            if layer.name not in noise:
                noise[layer.name] = rng.standard_normal((layer.k, layer.n)).astype(np.float32)
            return layer.weight.effective_weight() + scale * noise[layer.name]
        return replacement

    small, large = measure(noisy(0.01)), measure(noisy(0.1))
    assert all(0 < small[n] < large[n] for n in small)
    assert measure(lambda layer: None) == {}


def test_measured_damage_scales_each_layers_kl_by_its_options_error():
    """Measured damage: option damage = the layer's KL at int4 x (option error / int4 error); a layer without
    a measurement gets the median KL per unit of relative error."""
    import sw_onnx.plan as plan_module
    from sw_onnx.plan import _Option, _set_damage

    options = {"a": [_Option(4, 128, 10, damage=2.0, relative=0.1), _Option(8, 128, 50, damage=0.01, relative=0.0005)],
               "b": [_Option(4, 128, 10, damage=8.0, relative=0.2), _Option(8, 128, 50, damage=0.04, relative=0.001)]}
    saved = plan_module.ALLOCATION_DAMAGE
    try:
        plan_module.ALLOCATION_DAMAGE = "measured"
        _set_damage(options, {"a": 0.5})
    finally:
        plan_module.ALLOCATION_DAMAGE = saved
    assert [o.damage for o in options["a"]] == pytest.approx([0.5, 0.5 * 0.01 / 2.0])
    assert [o.damage for o in options["b"]] == pytest.approx([5.0 * 0.2, 5.0 * 0.001])  # 0.5 / 0.1 per unit


@pytest.mark.parametrize("options,match", [
    ({"bits_per_weight": 0.5}, "bits-per-weight"), ({"bits_per_weight": 6.0, "bits": 8}, "need --bits 4"),
    ({"allocation": "greedy"}, "allocation"), ({"embedding_bits": 2}, "embedding-bits"),
    ({"error_weight": "w3"}, "error-weight"), ({"lm_head_block_size": 48}, "lm-head-block-size"),
    ({"gptq": True, "clip": "zscore"}, "gptq"),
])
def test_new_options_are_validated(options, match):
    with pytest.raises(UsageError, match=match):
        QuantizeConfig(**options).validate()


def test_a_block_that_does_not_divide_hidden_gets_its_own_ragged_table(tied, tmp_path):
    """GatherBlockQuantized takes a shorter last block; MatMulNBits pads it, so such a tied table is not
    shared but written on its own, and still equals the numpy dequantized Gather."""
    hidden = next(t for t in onnx.load(str(tied)).graph.initializer if len(t.dims) == 2 and t.dims[0] > t.dims[1]).dims[1]
    block = 128 if hidden % 128 else 256  # > hidden or not dividing it: one ragged block per row
    summary, out = _quantize(tied, tmp_path, embedding_bits=8, lm_head_block_size=block)
    (e,) = summary.embeddings
    assert e.shared_with is None and e.block_size == block
    assert summary.verification["passed"]
    table = numpy_helper.to_array(next(t for t in onnx.load(str(tied)).graph.initializer if t.name == e.initializer))
    ids = np.array([1, 4], np.int64)
    got, _ = _gathered(out, ids)
    reference = dequantize_blockwise(quantize_blockwise(table.T.copy(), bits=8, block_size=block)).T
    np.testing.assert_array_equal(got, reference[ids])
