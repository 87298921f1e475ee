"""sample_models/export_gemma3.py: the tokenizer rebuilt from a GGUF vocabulary is SentencePiece BPE.

The builder is checked against SentencePiece itself (a model proto rebuilt from the same vocabulary) on a small
synthetic vocabulary (always), and on the real Gemma-3 export when it is cached (``real``; run
``python sample_models/export_gemma3.py`` first, a few minutes).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sentencepiece", reason="needs the export extra: pip install -e '.[export]'")

from sample_models.export_gemma3 import (  # noqa: E402
    COMMON_WORDS,
    build_tokenizer,
    default_out_dir,
    is_complete,
    sentencepiece_reference,
)

SAMPLES = ["the cat and the hat", " the then", "thethe  and\n\nhat", "héllo ☃ x", "", " ", "a  b   c", "tan ant"]


def _synthetic_vocab() -> dict:
    control = ["<pad>", "<eos>", "<bos>", "<unk>"]
    user = ["\n", "\n\n", "  ", "   "]  # llama.cpp writes user-defined spaces as spaces
    byte = [f"<0x{i:02X}>" for i in range(256)]
    normal = ["▁", "t", "h", "e", "a", "n", "d", "c", "o", "▁t", "he", "▁the", "an", "▁a", "nd", "▁and", "at",
              "▁c", "▁cat", "▁h", "▁hat", "the", "en", "▁then", "x", "l", "b", "▁b"]
    tokens = control + user + byte + normal
    types = [3] * 4 + [4] * len(user) + [6] * 256 + [1] * len(normal)
    scores = [-1000.0] * 4 + [-1000.0] * len(user) + [0.0] * 256 + [-float(i) for i in range(len(normal))]
    meta = {"model": "llama", "bos_token_id": 2, "eos_token_id": 1, "unk_token_id": 3, "pad_token_id": 0,
            "add_bos_token": True, "add_eos_token": False, "add_space_prefix": False}
    return {"tokens": tokens, "scores": scores, "types": types, "meta": meta}


def test_rebuilt_tokenizer_equals_sentencepiece_on_a_synthetic_vocabulary(tmp_path):
    vocab = _synthetic_vocab()
    tok = build_tokenizer(vocab)
    sp = sentencepiece_reference(vocab, tmp_path / "ref.model")
    for text in SAMPLES:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), text
    assert tok.encode("the cat").ids[0] == 2  # the GGUF's add_bos_token
    assert tok.encode(" the cat", add_special_tokens=False).tokens == ["▁the", "▁cat"]
    assert tok.decode(tok.encode("héllo  the\n\ncat").ids, skip_special_tokens=True) == "héllo  the\n\ncat"


def test_merges_follow_the_piece_scores(tmp_path):
    vocab = _synthetic_vocab()
    i_the, i_then = vocab["tokens"].index("▁the"), vocab["tokens"].index("▁then")
    assert i_the < i_then  # "▁the" outranks "▁then": "▁then" must still be reached when "▁the" + "n" cannot merge
    tok = build_tokenizer(vocab)
    assert tok.encode(" then", add_special_tokens=False).tokens == ["▁then"]
    # a vocabulary whose normal scores are not decreasing with the id is refused (merges would be misranked)
    bad = dict(vocab, scores=list(vocab["scores"]))
    bad["scores"][-1] = 5.0
    with pytest.raises(RuntimeError, match="not decreasing"):
        build_tokenizer(bad)


@pytest.mark.real
def test_cached_gemma3_export_tokenizer_and_marker():
    folder = default_out_dir()
    if not is_complete(folder):
        pytest.skip("Gemma-3 not exported: python sample_models/export_gemma3.py (a few minutes)")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for word in COMMON_WORDS:
        assert len(tok.encode(word, add_special_tokens=False).ids) == 1, word
    assert tok.encode("Hello").ids[0] == 2  # <bos>, as the GGUF's add_bos_token says
    config = json.loads((folder / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 1, 0)
    assert config["add_bos_token"] is True
    marker = json.loads((folder / ".complete").read_text())
    assert marker["tokenizer"]["sentencepiece_mismatches"] == 0
    assert marker["sanity"]["logits_max_abs_diff"] < 1e-3
    # WikiText-2 window 1: 29.84 without BOS, 14.76 with BOS + 511 tokens (findings.md's 8-window 23.46 protocol)
    assert 20 < marker["sanity"]["wikitext_window1_ppl"] < 40
    assert 10 < marker["sanity"].get("wikitext_window1_ppl_bos", 15) < 20
