"""What the fake-quantization probes share: building each arm's copy of a model (weights replaced by their
dequantized values) and its WikiText-2 perplexity, one arm at a time in a temporary folder."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def evaluate_arms(folder: Path, arms: Sequence[tuple[dict, Callable[[Path], dict]]], *, windows: int,
                  bos: int | None = None, json_path: str | None = None) -> list[dict]:
    """For each (label, build) in `arms`: `build(dst)` writes the arm's model to `dst` and returns facts about
    it; the row is label + perplexity (the project's protocol, `windows` windows of 512) + seconds + facts.
    Rows are printed as they come and written to `json_path` at the end."""
    from sw_onnx.evaluate import default_wikitext_path, load_tokenizer, perplexity, wikitext_token_ids

    ids = wikitext_token_ids(load_tokenizer(folder), default_wikitext_path())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, build) in enumerate(arms):
            started = time.perf_counter()
            dst = Path(tmp) / f"arm{i}.onnx"
            info = build(dst)
            ppl = perplexity(dst, ids, context=512, max_windows=windows, bos=bos).perplexity
            rows.append({**label, "ppl": ppl, "seconds": time.perf_counter() - started, **info})
            print(json.dumps(rows[-1]), flush=True)
            for p in Path(tmp).iterdir():
                p.unlink()
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))
    return rows
