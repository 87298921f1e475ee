"""Explain how two quantized models differ: initializers (bytes), op counts, and logits on one prompt.

Usage: python bench/compare_outputs.py OLD.onnx NEW.onnx   (what golden_outputs.py's 'differ' lines need)
"""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import onnx


def main(old: str, new: str) -> int:
    from sw_onnx.inputs import build_feeds
    from sw_onnx.io import open_session

    a, b = onnx.load(old), onnx.load(new)
    ia = {t.name: t.SerializeToString() for t in a.graph.initializer}
    ib = {t.name: t.SerializeToString() for t in b.graph.initializer}
    print("initializers only in old:", sorted(set(ia) - set(ib)), "only in new:", sorted(set(ib) - set(ia)))
    print("initializers in both that differ:", [k for k in ia if k in ib and ia[k] != ib[k]])
    ca, cb = Counter(n.op_type for n in a.graph.node), Counter(n.op_type for n in b.graph.node)
    print("op counts that differ (old, new):", {k: (ca[k], cb[k]) for k in sorted(set(ca) | set(cb)) if ca[k] != cb[k]})
    ids = [1, 504, 3458, 15, 253, 2347, 1097, 30, 2, 59, 1231]
    logits = [s.run(["logits"], build_feeds(s, ids))[0] for s in (open_session(old), open_session(new))]
    print("max |logits old - new|:", float(np.abs(logits[0] - logits[1]).max()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
