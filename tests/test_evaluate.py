"""Tests of sw_onnx.evaluate: perplexity protocol against an independent numpy reference, on tiny graphs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sw_onnx.errors import UsageError
from sw_onnx.evaluate import (
    WIKITEXT_CONTEXT,
    PerplexityResult,
    default_wikitext_path,
    encode_text,
    load_tokenizer,
    perplexity,
    wikitext_token_ids,
)

VOCAB = 37
MAX_POS = 64


def _lookup_model(path: Path, table: np.ndarray, pos_table: np.ndarray | None = None, *,
                  out_name: str = "logits", extra_inputs: bool = True) -> Path:
    """logits[b, t] = table[ids[b, t]] (+ pos_table[position_ids[b, t]]): a fixed function of the feeds."""
    vocab = table.shape[1]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", "seq", vocab])
    inits = [numpy_helper.from_array(table.astype(np.float32), "table")]
    inputs = [ids]
    if pos_table is None:
        nodes = [helper.make_node("Gather", ["table", "input_ids"], [out_name], axis=0)]
    else:
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]))
        inits.append(numpy_helper.from_array(pos_table.astype(np.float32), "pos_table"))
        nodes = [
            helper.make_node("Gather", ["table", "input_ids"], ["tok"], axis=0),
            helper.make_node("Gather", ["pos_table", "position_ids"], ["pos"], axis=0),
            helper.make_node("Add", ["tok", "pos"], [out_name]),
        ]
    if extra_inputs:  # present but unused, as in real exports: build_feeds must fill them
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]))
    graph = helper.make_graph(nodes, "lookup", inputs, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _reference_nll(table, pos_table, ids, context, max_windows=None):
    """Straightforward per-token reference: -log softmax, window by window, positions restart at 0."""
    n = len(ids) // context
    if max_windows is not None:
        n = min(n, max_windows)
    nlls = []
    for w in range(n):
        win = ids[w * context : (w + 1) * context]
        for i in range(context - 1):
            row = table[win[i]].astype(np.float64)
            if pos_table is not None:
                row = row + pos_table[i].astype(np.float32).astype(np.float64)
            row = row.astype(np.float32).astype(np.float64)  # the graph adds in float32
            nlls.append(np.logaddexp.reduce(row) - row[win[i + 1]])
    return float(np.mean(nlls)), len(nlls), n


@pytest.fixture(scope="module")
def tables():
    rng = np.random.default_rng(0)
    table = rng.normal(0, 2.0, (VOCAB, VOCAB)).astype(np.float32)
    pos_table = rng.normal(0, 1.0, (MAX_POS, VOCAB)).astype(np.float32)
    return table, pos_table


@pytest.fixture(scope="module")
def pos_model(tmp_path_factory, tables):
    return _lookup_model(tmp_path_factory.mktemp("m") / "model.onnx", *tables)


@pytest.mark.parametrize("context,n_tokens,max_windows", [(8, 8 * 5, None), (8, 8 * 5 + 7, None),
                                                          (16, 100, 2), (2, 9, None), (16, 40, 10)])
def test_matches_numpy_reference(pos_model, tables, context, n_tokens, max_windows):
    ids = np.random.default_rng(n_tokens).integers(0, VOCAB, n_tokens)
    res = perplexity(pos_model, ids, context=context, max_windows=max_windows)
    ref_nll, ref_tokens, ref_windows = _reference_nll(*tables, ids, context, max_windows)
    assert isinstance(res, PerplexityResult)
    assert res.windows == ref_windows == min(n_tokens // context, max_windows or 10**9)
    assert res.tokens == ref_tokens == ref_windows * (context - 1)
    assert res.nll_mean == pytest.approx(ref_nll, rel=1e-9, abs=1e-9)
    assert res.perplexity == pytest.approx(math.exp(ref_nll), rel=1e-9)
    assert res.seconds >= 0


def test_protocol_counts_like_findings(tmp_path):
    """32 windows of 512 predict 16,352 tokens; an incomplete last window is dropped."""
    table = np.zeros((VOCAB, VOCAB), np.float32)  # uniform prediction: ppl == vocab exactly
    model = _lookup_model(tmp_path / "u.onnx", table, extra_inputs=False)
    ids = np.arange(32 * WIKITEXT_CONTEXT + 300) % VOCAB
    res = perplexity(model, ids)
    assert (res.windows, res.tokens) == (32, 16_352)
    assert res.perplexity == pytest.approx(VOCAB, rel=1e-12)
    res8 = perplexity(model, ids, max_windows=8)
    assert (res8.windows, res8.tokens) == (8, 8 * 511)


def test_windows_are_independent(pos_model, tables):
    """Each window restarts its positions: evaluating a window alone gives the same NLL."""
    ids = np.random.default_rng(5).integers(0, VOCAB, 48)
    both = perplexity(pos_model, ids, context=16)
    parts = [perplexity(pos_model, ids[i * 16 : (i + 1) * 16], context=16) for i in range(3)]
    assert both.nll_mean == pytest.approx(np.mean([p.nll_mean for p in parts]), rel=1e-12)
    # and it is not what a single long window (positions 0..47) would give
    assert both.nll_mean != pytest.approx(perplexity(pos_model, ids, context=48).nll_mean, rel=1e-6)


def test_stable_with_huge_logits(tmp_path):
    """Logits of magnitude 1e4 overflow a naive exp; the float64 stable log-softmax copes."""
    rng = np.random.default_rng(1)
    table = (rng.normal(0, 1, (VOCAB, VOCAB)) * 1e4).astype(np.float32)
    model = _lookup_model(tmp_path / "big.onnx", table)
    ids = rng.integers(0, VOCAB, 30)
    res = perplexity(model, ids, context=10)
    ref, _, _ = _reference_nll(table, None, ids, 10)
    assert np.isfinite(res.nll_mean)
    assert res.nll_mean == pytest.approx(ref, rel=1e-9)


def test_accepts_session_folder_and_2d_ids(pos_model, tables):
    ids = np.random.default_rng(2).integers(0, VOCAB, 33)
    a = perplexity(pos_model, ids, context=8)
    b = perplexity(ort.InferenceSession(str(pos_model), providers=["CPUExecutionProvider"]), ids, context=8)
    c = perplexity(pos_model.parent, ids[None, :].astype(np.int32), context=8)  # folder holding model.onnx
    from sw_onnx.io import load_model

    d = perplexity(load_model(pos_model), ids, context=8)  # in-memory onnx_ir model
    assert a.nll_mean == b.nll_mean == c.nll_mean == d.nll_mean


def test_progress_and_other_output_name(tmp_path, tables):
    model = _lookup_model(tmp_path / "model.onnx", tables[0], out_name="scores", extra_inputs=False)
    calls = []
    res = perplexity(model, np.arange(40) % VOCAB, context=8, max_windows=3, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    ref, _, _ = _reference_nll(tables[0], None, np.arange(40) % VOCAB, 8, 3)
    assert res.nll_mean == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("ids,kwargs", [
    (np.arange(7), {"context": 8}),                 # not one window
    (np.arange(16), {"context": 1}),
    (np.arange(16), {"context": 8, "max_windows": 0}),
    (np.zeros((2, 8), np.int64), {"context": 8}),   # 2-D with batch > 1
    (np.linspace(0, 1, 16), {"context": 8}),        # not integers
    (np.full(16, VOCAB), {"context": 8}),           # outside the vocabulary
])
def test_bad_arguments(pos_model, ids, kwargs):
    with pytest.raises(UsageError):
        perplexity(pos_model, ids, **kwargs)


# ----------------------------------------------------------------------------------------- tokenizer


def _word_tokenizer(folder: Path, *, bos_post_processor: bool = False) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "the": 2, "cat": 3, "sat": 4, ".": 5, "=": 6, "on": 7, "mat": 8}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens(["<s>"])
    if bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def test_load_tokenizer_beside_model_or_given(tmp_path):
    _word_tokenizer(tmp_path / "m")
    (tmp_path / "m" / "model.onnx").write_bytes(b"")
    assert load_tokenizer(tmp_path / "m").encode("the cat").ids == [2, 3]
    assert load_tokenizer(tmp_path / "m" / "model.onnx").encode("the cat").ids == [2, 3]
    other = _word_tokenizer(tmp_path / "t")
    assert load_tokenizer(tmp_path / "nowhere", other).encode("cat").ids == [3]
    assert load_tokenizer(tmp_path / "nowhere", other.parent).encode("cat").ids == [3]
    with pytest.raises(UsageError):
        load_tokenizer(tmp_path / "empty_dir_that_does_not_exist")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(UsageError):
        load_tokenizer(tmp_path / "bad")


def test_encode_text_bos(tmp_path):
    plain = load_tokenizer(tmp_path, _word_tokenizer(tmp_path / "a"))
    with_bos = load_tokenizer(tmp_path, _word_tokenizer(tmp_path / "b", bos_post_processor=True))
    for tok in (plain, with_bos):
        ids = encode_text(tok, "the cat sat.", add_bos=False)
        assert ids.dtype == np.int64 and ids.tolist() == [2, 3, 4, 5]
        assert encode_text(tok, "the cat", add_bos=True, bos_id=1).tolist() == [1, 2, 3]
        assert encode_text(tok, "<s> the cat", add_bos=True, bos_id=1).tolist() == [1, 2, 3]  # not doubled
    assert encode_text(with_bos, "cat", add_bos=True).tolist() == [1, 3]  # BOS found from the post-processor
    with pytest.raises(UsageError):
        encode_text(plain, "cat", add_bos=True)


def test_wikitext_token_ids_file_as_is_without_bos(tmp_path):
    tok = load_tokenizer(tmp_path, _word_tokenizer(tmp_path / "b", bos_post_processor=True))
    tok.enable_truncation(3)
    text = " = the cat = \n the cat sat on the mat . \n\n the mat .\n"
    (tmp_path / "wiki.txt").write_text(text, encoding="utf-8")
    ids = wikitext_token_ids(tok, tmp_path / "wiki.txt")
    assert ids.tolist() == [6, 2, 3, 6, 2, 3, 4, 7, 2, 8, 5, 2, 8, 5]  # no BOS, no truncation
    assert tok.truncation["max_length"] == 3  # the caller's setting is restored


def test_default_wikitext_path(monkeypatch, tmp_path):
    f = tmp_path / "w.txt"
    f.write_text("x")
    monkeypatch.setenv("SW_ONNX_WIKITEXT", str(f))
    assert default_wikitext_path() == f
    monkeypatch.setenv("SW_ONNX_WIKITEXT", str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="SW_ONNX_WIKITEXT"):
        default_wikitext_path()
    monkeypatch.delenv("SW_ONNX_WIKITEXT")
    try:
        p = default_wikitext_path()
    except FileNotFoundError as e:
        assert "SW_ONNX_WIKITEXT" in str(e)
    else:
        assert p.name == "wikitext2_test.txt" and p.is_file()


def test_packaged_wikitext_is_found_without_shared_or_env(monkeypatch, tmp_path):
    """The WikiText-2 test text ships in the package (sw_onnx/data, CC BY-SA 3.0 notice beside it): with no
    $SW_ONNX_WIKITEXT and no shared/ folder anywhere it looks, the packaged copy is returned."""
    import sw_onnx.evaluate as ev

    monkeypatch.delenv("SW_ONNX_WIKITEXT", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./shared/data here
    real_is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda self: "shared" not in self.parts and real_is_file(self))
    p = ev.default_wikitext_path()
    assert "shared" not in p.parts and p.name == "wikitext2_test.txt"
    assert p.parent == Path(ev.__file__).resolve().parent / "data"
    text = p.read_text(encoding="utf-8")
    assert text.startswith(" \n = Robert Boulter = \n") and len(text) > 1_000_000
    notice = (p.parent / "LICENSE-wikitext.txt").read_text(encoding="utf-8")
    assert "CC BY-SA 3.0" in notice and "Merity" in notice and "Wikipedia" in notice


def test_bos_windows_are_bos_then_context_minus_one_tokens(pos_model, tables):
    """perplexity(bos=B) equals the plain protocol on the stream with B inserted before every context - 1
    tokens (the first prediction of each window is from BOS alone)."""
    context, bos = 8, 3
    ids = np.random.default_rng(5).integers(0, VOCAB, 7 * 6 + 4)
    res = perplexity(pos_model, ids, context=context, bos=bos)
    stream = np.concatenate([np.concatenate([[bos], ids[w * 7:(w + 1) * 7]]) for w in range(len(ids) // 7)])
    ref_nll, ref_tokens, ref_windows = _reference_nll(*tables, stream, context)
    assert res.windows == ref_windows == 6 and res.tokens == ref_tokens
    assert res.nll_mean == pytest.approx(ref_nll, rel=1e-9)
