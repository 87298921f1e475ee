"""Tests of sw_onnx.measure and its CLI commands (eval, compare, generate, ablate) on the sample models."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from sample_models import build_sample_model
from sw_onnx.errors import UsageError
from sw_onnx.api import ablate_model, detect_coordinates
from sw_onnx.coordinates import read_detect_report
from sw_onnx.measure import compare_models, evaluate_model, generate, windows_for


def coordinates_from_report(path):
    return read_detect_report(path).coordinates

VOCAB = 256


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    return {v: build_sample_model(v, root) for v in ("optimum", "kvcache", "gemm")}


@pytest.fixture(scope="module")
def token_stream():
    rng = np.random.default_rng(7)
    ids = rng.integers(3, VOCAB, size=3 * 24 + 5).astype(np.int64)
    ids[::24] = 1  # every window of 24 starts with BOS, where the planted super activation sits
    return ids


@pytest.fixture(scope="module")
def pruned(samples, tmp_path_factory):
    """The optimum sample with its two planted super weights zeroed."""
    sm = samples["optimum"]
    out = tmp_path_factory.mktemp("pruned") / "model.onnx"
    ablate_model(sm.path, out, [(sw.initializer, sw.index) for sw in sm.super_weights], 0.0)
    return out


def _planted(sm):
    return [(sw.initializer, tuple(sw.index)) for sw in sm.super_weights]


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _byte_tokenizer(path: Path) -> Path:
    """A byte-level tokenizer.json with ids 0..255 (fits the sample models' vocabulary of 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))
    return path


# ----------------------------------------------------------------------------------------- perplexity


def _reference_nll(model_path: Path, ids: np.ndarray, context: int, windows: int) -> float:
    """Independent reference: one ORT run per window with hand-made feeds, log-softmax in numpy."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    total, count = 0.0, 0
    for w in range(windows):
        window = ids[w * context:(w + 1) * context]
        if "tokens" in names:
            feeds = {"tokens": window}
        else:
            feeds = {"input_ids": window[None], "attention_mask": np.ones((1, context), np.int64),
                     "position_ids": np.arange(context, dtype=np.int64)[None]}
            for i in session.get_inputs():
                if i.name.startswith("past_key_values"):
                    feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        logits = session.run(["logits"], feeds)[0].reshape(context, -1).astype(np.float64)
        log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1, keepdims=True)) - logits.max(1, keepdims=True)
        for t in range(context - 1):
            total -= log_probs[t, window[t + 1]]
            count += 1
    return total / count


@pytest.mark.parametrize("variant", ["optimum", "kvcache", "gemm"])
def test_perplexity_matches_numpy_reference(samples, token_stream, variant):
    path = samples[variant].path
    result = evaluate_model(path, token_stream, context=24)
    assert (result.windows, result.context, result.tokens) == (3, 24, 3 * 23)
    ref = _reference_nll(path, token_stream, 24, 3)
    assert result.nll_mean == pytest.approx(ref, rel=1e-9, abs=1e-9)
    assert result.perplexity == pytest.approx(np.exp(ref), rel=1e-9)


def test_max_tokens_and_short_text():
    assert windows_for(1000, 512) == (512, 1)
    assert windows_for(1000, 100, 350) == (100, 3)
    assert windows_for(30, 512) == (30, 1)  # a text shorter than one window: one window of all of it
    with pytest.raises(UsageError):
        windows_for(1, 512)


# ----------------------------------------------------------------------------------------- compare


def test_compare_self_is_zero(samples, token_stream):
    path = samples["optimum"].path
    r = compare_models(path, path, token_stream, context=24)
    assert r.mean_kl < 1e-9 and r.max_kl < 1e-9
    assert r.max_abs_logit_diff == 0.0
    assert r.top1_agreement == 1.0
    assert r.reference_perplexity == pytest.approx(r.candidate_perplexity, rel=1e-12)
    # the perplexity from compare's own logits is eval's
    assert r.reference_perplexity == pytest.approx(evaluate_model(path, token_stream, context=24).perplexity, rel=1e-9)


def test_compare_kvcache_same_weights(samples, token_stream):
    r = compare_models(samples["optimum"].path, samples["kvcache"].path, token_stream, context=24)
    assert r.mean_kl < 1e-9 and r.top1_agreement == 1.0


def test_compare_after_ablation_is_positive(samples, pruned, token_stream):
    r = compare_models(samples["optimum"].path, pruned, token_stream, context=24)
    assert r.mean_kl > 1e-3
    assert r.max_abs_logit_diff > 0.1
    assert r.candidate_perplexity != r.reference_perplexity


def test_cli_compare_gate(samples, pruned, run_cli, tmp_path):
    ref = str(samples["optimum"].path)
    report = tmp_path / "compare.json"
    failed = run_cli("compare", ref, str(pruned), "--fail-above-kl", "1e-6", "--json", str(report))
    assert failed.returncode == 3, failed.stderr
    assert "above --fail-above-kl" in failed.stderr and "Traceback" not in failed.stderr
    data = json.loads(report.read_text())
    assert data["schema"] == "sw-onnx/compare" and data["passed"] is False and data["mean_kl"] > 1e-6
    assert data["input"]["source"] == "default ids (no tokenizer)"
    passed = run_cli("compare", ref, str(pruned), "--fail-above-kl", "1e6")
    assert passed.returncode == 0, passed.stderr
    assert "mean KL" in passed.stdout and "passed" in passed.stdout


# ----------------------------------------------------------------------------------------- generate


def test_generate_same_tokens_with_and_without_kv_cache(samples):
    prompt = [1, 5, 9, 33, 100, 7]
    plain = generate(samples["optimum"].path, prompt, max_new_tokens=12)
    cached = generate(samples["kvcache"].path, prompt, max_new_tokens=12)
    recomputed = generate(samples["kvcache"].path, prompt, max_new_tokens=12, use_cache=False)
    assert not plain.used_kv_cache and cached.used_kv_cache and not recomputed.used_kv_cache
    assert len(plain.new_ids) == 12 and plain.stop_reason == "max_new_tokens"
    assert cached.new_ids == plain.new_ids == recomputed.new_ids
    assert cached.ids == prompt + plain.new_ids
    # a graph without batch axis or mask (tokens [seq]) generates too
    assert len(generate(samples["gemm"].path, prompt, max_new_tokens=3).new_ids) == 3


def test_generate_stops_at_eos(samples):
    prompt = [1, 5, 9]
    first = generate(samples["kvcache"].path, prompt, max_new_tokens=4).new_ids[0]
    stopped = generate(samples["kvcache"].path, prompt, max_new_tokens=4, eos_token_id=[first])
    assert stopped.new_ids == [first] and stopped.stop_reason == "eos"


def test_cli_eval_and_generate_with_tokenizer(samples, run_cli, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(samples["kvcache"].path.parent, folder)
    _byte_tokenizer(folder / "tokenizer.json")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4, encoding="utf-8")
    out = tmp_path / "eval.json"
    res = run_cli("eval", str(folder), "--text", str(text), "--context", "32", "--json", str(out))
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert data["schema"] == "sw-onnx/eval" and data["windows"] == 180 // 32 and data["tokens"] == 5 * 31
    from tokenizers import Tokenizer

    expected_ids = np.asarray(Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text.read_text()).ids)
    assert len(expected_ids) == 180  # one token per byte
    assert data["perplexity"] == pytest.approx(evaluate_model(folder, expected_ids, context=32).perplexity, rel=1e-9)

    gen = run_cli("generate", str(folder), "--prompt", "Summer is", "--max-new-tokens", "5")
    assert gen.returncode == 0, gen.stderr
    assert "Summer is" in gen.stdout and "with KV cache" in gen.stderr


# ----------------------------------------------------------------------------------------- ablate


def _initializers(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("scale", [0.0, 2.5])
def test_ablate_changes_exactly_the_coordinates(samples, tmp_path, scale):
    sm = samples["optimum"]
    before_hash = _sha256(sm.path)
    coords = _planted(sm)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    result = ablate_model(sm.path, out, coords, scale)
    assert _sha256(sm.path) == before_hash  # the input is untouched
    a, b = _initializers(sm.path), _initializers(out)
    assert a.keys() == b.keys()
    changed = set()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
        for index in np.argwhere(np.atleast_1d(a[name] != b[name])):
            changed.add((name, tuple(int(i) for i in index)))
    assert changed == set(coords)
    for name, index in coords:
        assert b[name][index] == np.float32(a[name][index] * scale)
        assert b[name][index] != a[name][index]
    assert [w["before"] for w in result.weights] == [float(a[n][i]) for n, i in coords]
    assert "config.json" in result.copied and (out.parent / "config.json").is_file()


def test_ablate_refuses_bad_outputs_and_coordinates(samples, tmp_path):
    sm = samples["optimum"]
    coords = _planted(sm)
    with pytest.raises(UsageError, match="input model"):
        ablate_model(sm.path, sm.path, coords)
    existing = tmp_path / "exists.onnx"
    existing.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="exists"):
        ablate_model(sm.path, existing, coords)
    assert existing.read_bytes() == b"keep me"
    ablate_model(sm.path, existing, coords, force=True)
    assert _initializers(existing).keys() == _initializers(sm.path).keys()
    with pytest.raises(UsageError, match="does not match"):
        ablate_model(sm.path, tmp_path / "a.onnx", [("no_such_weight", (0, 0))])
    with pytest.raises(UsageError, match="outside"):
        ablate_model(sm.path, tmp_path / "b.onnx", [(coords[0][0], (10_000, 0))])
    with pytest.raises(UsageError, match="no weight"):
        ablate_model(sm.path, tmp_path / "c.onnx", [])
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "sw-onnx/quantize", "super_weights": []}))
    with pytest.raises(UsageError, match="not a sw-onnx detect report"):
        coordinates_from_report(bad)


def test_cli_ablate_with_detect_report(samples, run_cli, tmp_path):
    from sw_onnx.detect import DetectConfig, detect
    from sw_onnx.io import load_model
    from sw_onnx.report import detect_report

    sm = samples["optimum"]
    ids = np.asarray([1, 5, 9, 33, 100, 7], dtype=np.int64)
    config = DetectConfig()
    found = detect(load_model(sm.path), ids, config)
    report = tmp_path / "report.json"
    report.write_text(json.dumps(detect_report(found, model_path=sm.path, config=config, prompt=None,
                                               tokenizer=None, source="test")))
    assert set(coordinates_from_report(report)) == set(_planted(sm))
    out = tmp_path / "pruned.onnx"
    res = run_cli("ablate", str(sm.path), "-o", str(out), "--keep", str(report))
    assert res.returncode == 0, res.stderr
    assert "scaled 2 weight(s)" in res.stdout
    b = _initializers(out)
    for name, index in _planted(sm):
        assert b[name][index] == 0.0
    again = run_cli("ablate", str(sm.path), "-o", str(out), "--keep", str(report))
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr


def test_detect_coordinates_find_the_planted_pair(samples):

    assert set(detect_coordinates(samples["optimum"].path)) == set(_planted(samples["optimum"]))


def test_eval_and_compare_on_a_quantized_model(samples, token_stream, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = samples["optimum"].path
    q = tmp_path / "model.int8.onnx"
    quantize_dynamic(str(src), str(q), weight_type=QuantType.QInt8)
    fp32 = evaluate_model(src, token_stream, context=24)
    int8 = evaluate_model(q, token_stream, context=24)
    assert np.isfinite(int8.perplexity) and int8.perplexity != fp32.perplexity
    r = compare_models(src, q, token_stream, context=24)
    assert 0 < r.mean_kl < 0.5 and r.candidate_perplexity == pytest.approx(int8.perplexity, rel=1e-9)
