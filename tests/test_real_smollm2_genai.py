"""The onnxruntime-genai build of the real SmolLM2-135M-Instruct (sample_models/export_smollm2_genai.py).

Same fp32 weights as the optimum export (sample_models/export_smollm2.py): the builder's graph (contrib ops,
GroupQueryAttention, packed qkv) must give the optimum graph's logits, and onnxruntime_genai must generate
greedily the same tokens. Built once and cached in ~/.cache/sw-onnx.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest

pytest.importorskip("transformers", reason="needs the export extra: pip install -e '.[export]'")
og = pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai (the export extra)")

from sample_models.export_smollm2 import _ort_greedy, export_smollm2  # noqa: E402
from sample_models.export_smollm2_genai import _genai_feeds, _genai_greedy, export_smollm2_genai  # noqa: E402

pytestmark = pytest.mark.real
PROMPT = "Apple Inc. is a worldwide tech company."
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def folders():
    return export_smollm2_genai(quiet=True), export_smollm2(quiet=True)


def _session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_genai_folder_layout(folders):
    genai, _ = folders
    import onnx

    marker = json.loads((genai / ".complete").read_text())
    assert marker["precision"] == "fp32" and marker["add_bos_token"] is False
    assert marker["sanity"]["greedy_matches_torch"] and marker["sanity"]["logits_max_abs_diff_vs_torch"] < 1e-2
    cfg = json.loads((genai / "genai_config.json").read_text())["model"]
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    dec = cfg["decoder"]
    assert dec["filename"] == "model.onnx" and dec["head_size"] == 64 and dec["num_key_value_heads"] == 3
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert json.loads((genai / "tokenizer_config.json").read_text())["add_bos_token"] is False
    model = onnx.load(str(genai / "model.onnx"), load_external_data=False)
    ops = collections.Counter((n.domain or "", n.op_type) for n in model.graph.node)
    assert ops[("com.microsoft", "GroupQueryAttention")] == 30
    assert ops[("com.microsoft", "SkipSimplifiedLayerNormalization")] == 60
    assert ops[("", "SimplifiedLayerNormalization")] == 1
    assert ops[("", "MatMul")] == 30 * 5 + 1  # packed qkv, o_proj, gate, up, down per layer; lm_head
    assert [i.name for i in model.graph.input][:3] == ["input_ids", "attention_mask", "past_key_values.0.key"]


def test_genai_logits_match_the_optimum_export(folders):
    genai, optimum = folders
    from tokenizers import Tokenizer

    ids = np.asarray([[1, *Tokenizer.from_file(str(optimum / "tokenizer.json")).encode(PROMPT).ids]], dtype=np.int64)
    dec = json.loads((genai / "genai_config.json").read_text())["model"]["decoder"]
    sg = _session(genai / "model.onnx")
    lg = sg.run(["logits"], _genai_feeds(sg, ids, dec))[0]
    del sg
    so = _session(optimum / "model.onnx")
    lo = so.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids),
                             "position_ids": np.arange(ids.shape[1])[None]})[0]
    assert lg.shape == lo.shape == (1, ids.shape[1], 49152)
    assert float(np.abs(lg - lo).max()) < 1e-3
    seq = _ort_greedy(so, ids, NEW_TOKENS, eos_id=2)
    og_seq, _ = _genai_greedy(genai, ids, NEW_TOKENS)
    assert og_seq[: len(seq)] == seq


def test_refuses_bad_precision_and_foreign_folders(tmp_path):
    with pytest.raises(ValueError, match="precision"):
        export_smollm2_genai(tmp_path / "x", precision="fp16", quiet=True)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="did not write"):
        export_smollm2_genai(tmp_path / "busy", quiet=True)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# sw-onnx on the builder's graph, against the same weights exported by optimum


@pytest.fixture(scope="module")
def quantized(folders, tmp_path_factory):
    """The default `sw-onnx quantize` of both graphs (each in its own folder, tokenizer files beside)."""
    import shutil

    from sw_onnx.quantize import quantize_model

    genai, optimum = folders
    root = tmp_path_factory.mktemp("quantized")
    genai_out = root / "genai"
    genai_summary = quantize_model(genai, genai_out)
    (root / "optimum").mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(optimum / name, root / "optimum" / name)
    optimum_summary = quantize_model(optimum / "model.onnx", root / "optimum" / "model.onnx")
    return genai_out, genai_summary, root / "optimum", optimum_summary


def test_detect_finds_the_same_layer_11_super_weights_as_on_the_optimum_export(folders):
    from sw_onnx.api import detect_model

    genai, optimum = folders
    found = {}
    for name, folder in (("genai", genai), ("optimum", optimum)):
        result, _ = detect_model(folder)
        found[name] = {(sw.layer, sw.row, sw.col) for sw in result.super_weights}
    assert {(11, 507, 1229), (11, 507, 1487)} <= found["genai"]
    assert found["genai"] == found["optimum"]  # the earlier, weaker ones too (same weights, same rule)


def test_quantized_folder_runs_in_onnxruntime_genai_and_matches_the_optimum_quantization(quantized):
    from sw_onnx.evaluate import text_token_ids
    from sw_onnx.measure import evaluate_model

    genai_out, genai_summary, optimum_out, optimum_summary = quantized
    v = genai_summary.verification
    assert v["matmulnbits"] == v["expected_fused"] == 151 and not v["not_fused"]
    assert v["genai"]["ran"] and len(v["genai"]["new_tokens"]) == 8  # one greedy generation through og
    # The builder's tied table (Gather(Transpose(lm_head weight))) is the default int8 GatherBlockQuantized
    # sharing the lm_head's codes, so og runs that op too, in both runs here.
    (table,) = genai_summary.embeddings
    assert table.transposed and table.shared_with == "/lm_head/MatMul"
    decoder = onnx.load(str(genai_out / "model.onnx"), load_external_data=False)
    assert [n.op_type for n in decoder.graph.node].count("GatherBlockQuantized") == 1
    assert not any(n.op_type == "Transpose" and n.name == "/model/embed_tokens/Transpose" for n in decoder.graph.node)
    model = og.Model(str(genai_out))
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    prompt = tokenizer.encode("Summer is hot. Winter is")
    params.set_search_options(do_sample=False, max_length=len(prompt) + 12)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    text = tokenizer.decode(generator.get_sequence(0)[len(prompt):])
    assert len(text.split()) >= 3, text  # words, not an empty or broken sequence
    # Same quantization, same windows: the two graphs' perplexities agree within 1% (measured: 34.83 vs
    # 34.86 on 8 windows).
    ids, _ = text_token_ids(genai_out)
    ppl = {name: evaluate_model(folder, ids, max_tokens=2048).perplexity
           for name, folder in (("genai", genai_out), ("optimum", optimum_out))}
    assert abs(ppl["genai"] / ppl["optimum"] - 1) < 0.01, ppl
