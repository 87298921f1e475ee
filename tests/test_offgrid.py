"""sample_models/offgrid.py: the off-grid copy computes the same function, and its weights left the GGUF grid.

Real-model tests (marked ``real``) use the SmolLM2 export (exported once, cached) and its off-grid copy
(built once, cached as ``~/.cache/sw-onnx/smollm2-135m-offgrid-s0``); the Gemma-3 ones run when
``python sample_models/export_gemma3.py`` has been run (they skip otherwise: the export takes minutes).
The tiny sample decoders of sample_models/build.py cover the structural cases (Gemm, fp16 behind Cast,
external data, KV cache) in about a second.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.numpy_helper as nh
import pytest

from sample_models.offgrid import (
    PERMUTATION_FILE,
    compare_logits,
    grid_error,
    grid_levels,
    is_complete,
    make_offgrid,
)

TOLERANCE = 1e-3  # max |logit difference|: fp32 summation order only (measured ~1e-4 on SmolLM2)


def _inits(path) -> dict:
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


def _moved(perm: dict, index: int) -> int:
    return perm["old_to_new"][index]


# ------------------------------------------------------------------------------------ sample models


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    from sample_models.build import build_sample_model

    root = tmp_path_factory.mktemp("offgrid-samples")
    return {v: build_sample_model(v, root / "src") for v in ("optimum", "gemm", "fp16", "external", "kvcache")}


@pytest.mark.parametrize("variant", ["optimum", "gemm", "fp16", "external", "kvcache"])
def test_sample_models_keep_their_function_and_planted_super_weights(samples, variant, tmp_path):
    src = samples[variant].path.parent
    out = make_offgrid(src, seed=3, out_dir=tmp_path / "og", tokens=48, quiet=True)
    assert is_complete(out)
    marker = json.loads((out / ".complete").read_text())
    assert marker["verify"]["max_abs_diff"] < 1e-4 and marker["verify"]["argmax_agreement"] == 1.0
    perm = json.loads((out / PERMUTATION_FILE).read_text())
    assert perm["counts"]["mlp_groups"] == 4 and perm["counts"]["attention_pairs"] == 4
    res = perm["residual"]
    assert sorted(res["new_to_old"]) == list(range(64)) and res["new_to_old"] != list(range(64))
    # the planted super weights are where permutation.json says they moved
    truth = json.loads((src / "ground_truth.json").read_text())
    mlp = {m["layer"]: m for m in perm["mlp"]}
    old, new = _inits(src / "model.onnx"), _inits(out / "model.onnx")
    for sw in truth["super_weights"]:
        w_old = nh.to_array(old[sw["initializer"]]).astype(np.float32)
        w_new = nh.to_array(new[sw["initializer"]]).astype(np.float32)
        row, col = _moved(res, sw["row"]), _moved(mlp[sw["layer"]], sw["col"])
        # index is in the initializer's own layout: [col, row] (KN, MatMul) or [row, col] (NK, Gemm transB)
        if tuple(sw["index"]) == (sw["col"], sw["row"]):
            assert w_new[col, row] == w_old[sw["col"], sw["row"]]
        else:
            assert w_new[row, col] == w_old[sw["row"], sw["col"]]


def test_idempotent_and_seeded(samples, tmp_path):
    src = samples["optimum"].path.parent
    a = make_offgrid(src, seed=0, out_dir=tmp_path / "a", tokens=16, quiet=True)
    stamp = (a / "model.onnx").stat().st_mtime_ns
    assert make_offgrid(src, seed=0, out_dir=tmp_path / "a", tokens=16, quiet=True) == a
    assert (a / "model.onnx").stat().st_mtime_ns == stamp  # not rebuilt
    b = make_offgrid(src, seed=0, out_dir=tmp_path / "b", tokens=16, quiet=True)
    c = make_offgrid(src, seed=1, out_dir=tmp_path / "c", tokens=16, quiet=True)
    assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()
    assert (a / "model.onnx").read_bytes() != (c / "model.onnx").read_bytes()
    assert not any(p.name.startswith(".") and "tmp" in p.name for p in tmp_path.iterdir())


def test_grid_error_sees_a_q4_1_grid():
    rng = np.random.default_rng(0)
    k, n = 128, 16
    d = rng.uniform(0.01, 0.02, size=(k // 32, 1, n))
    m = rng.uniform(-0.1, 0.0, size=(k // 32, 1, n))
    q = rng.integers(0, 16, size=(k // 32, 32, n))
    q[:, 0], q[:, 1] = 0, 15  # each block spans its grid, as Q4_1's min-max rounding makes it
    w = (d * q + m).reshape(k, n).astype(np.float32)
    assert grid_error(w) < 1e-6
    assert grid_error(w[rng.permutation(k)]) > 0.02


# ------------------------------------------------------------------------------------------ SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("transformers", reason="needs the export extra: pip install -e '.[export]'")
    from sample_models.export_smollm2 import export_smollm2

    return export_smollm2(quiet=True)


@pytest.fixture(scope="module")
def smollm2_offgrid(smollm2):
    return make_offgrid(smollm2, seed=0, quiet=True)


@pytest.fixture(scope="module")
def smollm2_weights(smollm2, smollm2_offgrid):
    """(original, off-grid) initializers by name, read once."""
    return _inits(smollm2 / "model.onnx"), _inits(smollm2_offgrid / "model.onnx")


@pytest.mark.real
def test_smollm2_offgrid_logits_equal(smollm2, smollm2_offgrid):
    from sample_models.offgrid import _text_ids

    check = compare_logits(smollm2 / "model.onnx", smollm2_offgrid / "model.onnx", _text_ids(smollm2, 192, 0))
    print(f"SmolLM2 off-grid: max |logit diff| {check['max_abs_diff']:.3g} over {check['tokens']} tokens")
    assert check["max_abs_diff"] < TOLERANCE
    assert check["argmax_agreement"] == 1.0


@pytest.mark.real
def test_smollm2_offgrid_every_linear_layer_left_the_grid(smollm2, smollm2_offgrid, smollm2_weights):
    perm = json.loads((smollm2_offgrid / PERMUTATION_FILE).read_text())
    assert perm["counts"] == {"initializers_permuted": 272, "axes_permuted": 422, "linear_layers": 211,
                              "mlp_groups": 30, "attention_pairs": 30, "groups_left_alone": 0}
    old, new = smollm2_weights
    model = onnx.load(str(smollm2 / "model.onnx"), load_external_data=False)
    weights = [n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in old]
    assert len(weights) == 210  # + the lm_head, Transpose(embed_tokens)
    named = {n.input[1]: n.name for n in model.graph.node if n.op_type == "MatMul"}
    for name in weights[:7] + weights[77:84]:  # layer 0 and layer 11, every projection
        before, after = grid_error(nh.to_array(old[name])), grid_error(nh.to_array(new[name]))
        assert before < 1e-6, (name, before)  # dequantized Q4_1: exactly on an asymmetric b32 grid
        assert after > 0.05, (name, after)  # off the grid: plain int4 RTN error
        assert grid_levels(nh.to_array(old[name]))[1] <= 16  # at most 16 distinct values in every block
        median, _, on_grid = grid_levels(nh.to_array(new[name]))
        if "o_proj" in named[name]:  # rows permuted within a head of 64: each block mixes 2 GGUF blocks
            assert median >= 17 and on_grid < 0.3, (name, median, on_grid)
        else:
            assert median >= 24 and on_grid == 0, (name, median, on_grid)


@pytest.mark.real
def test_smollm2_offgrid_super_weights_move_as_permutation_json_says(smollm2_offgrid, smollm2_weights):
    # findings.md / test_real_smollm2: layer 11 down_proj, torch [507, 1229] and [507, 1487]
    perm = json.loads((smollm2_offgrid / PERMUTATION_FILE).read_text())
    mlp = {m["layer"]: m for m in perm["mlp"]}
    down = mlp[11]["down_proj"][0]
    old, new = smollm2_weights
    w_old, w_new = nh.to_array(old[down]), nh.to_array(new[down])
    for col in (1229, 1487):
        r, c = _moved(perm["residual"], 507), _moved(mlp[11], col)
        assert w_new[c, r] == w_old[col, 507] and abs(w_old[col, 507]) > 4
    assert np.array_equal(np.sort(w_new, axis=None), np.sort(w_old, axis=None))


@pytest.mark.real
def test_smollm2_offgrid_perplexity_equal(smollm2, smollm2_offgrid):
    from sw_onnx.evaluate import default_wikitext_path, load_tokenizer, perplexity, wikitext_token_ids

    ids = wikitext_token_ids(load_tokenizer(smollm2), default_wikitext_path())
    a = perplexity(smollm2 / "model.onnx", ids, context=512, max_windows=1).perplexity
    b = perplexity(smollm2_offgrid / "model.onnx", ids, context=512, max_windows=1).perplexity
    print(f"SmolLM2 ppl (1x512): original {a:.4f}, off-grid {b:.4f}")
    assert abs(b / a - 1) < 1e-4


# ------------------------------------------------------------------------------------------- Gemma-3


@pytest.fixture(scope="module")
def gemma3():
    from sample_models.export_gemma3 import default_out_dir
    from sample_models.export_gemma3 import is_complete as exported

    folder = default_out_dir()
    if not exported(folder):
        pytest.skip("Gemma-3 not exported: python sample_models/export_gemma3.py (a few minutes)")
    return folder


@pytest.mark.real
def test_gemma3_offgrid_logits_equal_and_q4k_layers_leave_the_grid(gemma3):
    from sample_models.offgrid import _text_ids

    out = make_offgrid(gemma3, seed=0, quiet=True)
    check = compare_logits(gemma3 / "model.onnx", out / "model.onnx", _text_ids(gemma3, 128, 0))
    print(f"Gemma-3 off-grid: max |logit diff| {check['max_abs_diff']:.3g} over {check['tokens']} tokens")
    assert check["max_abs_diff"] < 1e-2 and check["argmax_agreement"] == 1.0
    perm = json.loads((out / PERMUTATION_FILE).read_text())
    assert perm["counts"]["mlp_groups"] == 18 and perm["counts"]["attention_pairs"] == 18
    assert perm["counts"]["groups_left_alone"] == 0
    # every o_proj is Q4_K in the GGUF (4-bit, optimised scale and min per sub-block of 32 along K): at most
    # 16 distinct values per block of 32, which min-max RTN does not recover but a searching quantizer can
    old, new = _inits(gemma3 / "model.onnx"), _inits(out / "model.onnx")
    for pair in perm["attention"][:3]:
        o_proj = pair["o_proj"]
        assert grid_levels(nh.to_array(old[o_proj]))[1] <= 16
        median, _, on_grid = grid_levels(nh.to_array(new[o_proj]))  # head_dim 256: 8 GGUF blocks mixed
        assert median >= 24 and on_grid < 0.05, (median, on_grid)
    lm_head = [n for n in old if n != "model.embed_tokens.weight" and old[n].dims[-1] == 262144]
    for name in lm_head:  # optimum exported the tied lm_head as a transposed copy: still tied
        assert np.array_equal(nh.to_array(new[name]), nh.to_array(new["model.embed_tokens.weight"]).T)
