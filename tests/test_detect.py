"""detect on the sample models: every planted super weight is found exactly, nothing in the clean model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from sample_models import VARIANTS, build_sample_model
from sw_onnx.detect import detect
from sw_onnx.discover import find_linear_layers, find_residual_chain
from sw_onnx.inputs import prompt_token_ids
from sw_onnx.io import create_session, load_model
from sw_onnx.analyze.instrument import InstrumentLinearStatsPass, stat_output_name


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    return {v: build_sample_model(v, root) for v in VARIANTS}


def _detect(sample):
    ids, _ = prompt_token_ids(sample.path)
    return detect(load_model(sample.path), ids)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "clean"])
def test_every_planted_super_weight_is_found_exactly(samples, variant):
    sample = samples[variant]
    result = _detect(sample)
    found = {(s.node, s.initializer, s.row, s.col, tuple(s.index)): s for s in result.super_weights}
    expected = {(p.node, p.initializer, p.row, p.col, tuple(p.index)): p for p in sample.super_weights}
    assert set(found) == set(expected)
    for key, planted in expected.items():
        sw = found[key]
        assert sw.value == pytest.approx(planted.value, rel=1e-6)
        assert sw.layer == planted.layer
        assert sw.output_spike["token"] == 0 and sw.output_spike["channel"] == planted.row
        assert sw.input_spike["channel"] == planted.col
        # zeroing the group removes the spike (the next pass measured it)
        assert sw.effect["reduction"] > 10
    shares = sorted(s.share for s in result.super_weights)
    assert sum(shares) > 0.9
    activations = result.super_activations
    assert [(a.node, a.channel, a.token) for a in activations] == [
        (sample.super_weights[0].node, sample.super_activation_channel, 0)
    ]
    assert abs(activations[0].value) > 100


def test_clean_model_has_no_super_weight(samples):
    result = _detect(samples["clean"])
    assert result.super_weights == [] and result.super_activations == []
    assert result.iterations == 1


def test_detect_iterates_until_no_new_spike(samples):
    result = _detect(samples["optimum"])
    assert result.iterations == 2  # one pass finds both weights sharing a row, the next confirms
    assert {s.iteration for s in result.super_weights} == {0}


def test_linear_layer_discovery_records_orientation(samples):
    layers, skipped = find_linear_layers(load_model(samples["gemm"].path))
    assert len(layers) == 4 * 7 + 1
    # attention's activation x activation products are MatMuls too, and are skipped with the reason
    assert len(skipped) == 4 * 2 and all("not a constant" in s.reason for s in skipped)
    ffn = [l for l in layers if l.node.op_type == "Gemm"]
    attention = [l for l in layers if l.node.op_type == "MatMul" and l.weight.steps]
    assert ffn and all(l.weight.layout == "NK" for l in ffn)
    assert attention and all(l.weight.steps[0][0] == "Transpose" and l.weight.layout == "NK" for l in attention)
    down = next(l for l in layers if l.name == "blk.1.ffn_down")
    assert (down.k, down.n, down.layer) == (192, 64, 1)
    fp16_layers, _ = find_linear_layers(load_model(samples["fp16"].path))
    assert all(l.weight.steps and l.weight.steps[0][0] == "Cast" and l.weight.layout == "KN" for l in fp16_layers)


def test_effective_weight_index_round_trip(samples):
    """The initializer index we report holds exactly the effective W[k, n] the layer multiplies by."""
    for variant in ("optimum", "gemm", "fp16"):
        for layer in find_linear_layers(load_model(samples[variant].path))[0][:6]:
            w = layer.weight.effective_weight()
            raw = layer.weight.initializer.const_value.numpy()
            rng = np.random.default_rng(0)
            k, n = rng.integers(0, layer.k, 20), rng.integers(0, layer.n, 20)
            index = layer.weight.effective_to_initializer_index(k, n)
            np.testing.assert_array_equal(raw[index].astype(np.float32), w[k, n])


def test_instrumented_statistics_match_numpy(samples):
    """The in-graph reductions equal numpy's on the exposed activations."""
    sample = samples["optimum"]
    model = load_model(sample.path)
    layers, _ = find_linear_layers(model)
    target = layers[13]
    # expose the raw input/output of one layer in a second copy, to compute the reference
    reference_model = load_model(sample.path)
    ref_layer = find_linear_layers(reference_model)[0][13]
    for v in (ref_layer.input, ref_layer.output):
        reference_model.graph.outputs.append(v)
    ids, _ = prompt_token_ids(sample.path)
    from sw_onnx.inputs import build_feeds

    ref_session = create_session(reference_model)
    x, y = ref_session.run([ref_layer.input.name, ref_layer.output.name], build_feeds(ref_session, ids))
    x, y = x.reshape(-1, target.k), y.reshape(-1, target.n)

    before, chain = find_residual_chain(target)
    InstrumentLinearStatsPass(layers, [before, *chain])(model)
    result = InstrumentLinearStatsPass(layers, [before, *chain])(model)
    assert not result.modified  # idempotent
    session = create_session(model)
    names = [stat_output_name(k, 13) for k in ("in_max", "in_argmax", "out_max", "out_argmax", "peak_token", "in_peak_row")]
    in_max, in_arg, out_max, out_arg, peak, row = session.run(names, build_feeds(session, ids))
    np.testing.assert_allclose(in_max, np.abs(x).max(0), rtol=1e-6)
    np.testing.assert_array_equal(in_arg, np.abs(x).argmax(0))
    np.testing.assert_allclose(out_max, np.abs(y).max(0), rtol=1e-6)
    np.testing.assert_array_equal(out_arg, np.abs(y).argmax(0))
    assert int(peak[0]) == int(np.unravel_index(np.abs(y).argmax(), y.shape)[0])
    np.testing.assert_allclose(row[0], x[int(peak[0])], rtol=1e-6)
    onnx.checker.check_model(ir.to_proto(model))


def test_residual_chain_follows_the_stream(samples):
    layers, _ = find_linear_layers(load_model(samples["optimum"].path))
    down1 = next(l for l in layers if l.name == "/model/layers.1/mlp/down_proj/MatMul")
    before, chain = find_residual_chain(down1)
    assert before is not None and len(chain) == 5  # layer 1's MLP add, then 2 adds in each of layers 2 and 3
    lm_head = layers[-1]
    assert find_residual_chain(lm_head) == (None, [])


def test_detect_does_not_touch_the_input_file(samples, tmp_path):
    sample = samples["external"]
    files = sorted(sample.path.parent.iterdir())
    before = {p.name: p.read_bytes() for p in files}
    _detect(sample)
    assert {p.name: p.read_bytes() for p in sorted(sample.path.parent.iterdir())} == before


def test_json_report_schema(samples, tmp_path, run_cli):
    report_path = tmp_path / "report.json"
    plot_path = tmp_path / "spikes.png"
    proc = run_cli("detect", str(samples["gemm"].path), "--json", str(report_path), "--plot", str(plot_path))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert report["schema"] == "sw-onnx/detect" and report["schema_version"] == 1
    (sw,) = report["super_weights"]
    planted = samples["gemm"].super_weights[0]
    assert {k: sw[k] for k in ("node", "initializer", "layer", "row", "col", "index")} == {
        "node": planted.node, "initializer": planted.initializer, "layer": planted.layer,
        "row": planted.row, "col": planted.col, "index": list(planted.index),
    }
    assert sw["value"] == pytest.approx(planted.value)
    (sa,) = report["super_activations"]
    assert (sa["node"], sa["channel"], sa["token"]) == (planted.node, planted.row, 0)
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Super weights (1)" in proc.stdout and "blk.1.ffn_down" in proc.stdout


def test_clean_model_cli_says_none_found(samples, run_cli):
    proc = run_cli("detect", str(samples["clean"].path.parent))
    assert proc.returncode == 0
    assert "No super weight found." in proc.stdout
