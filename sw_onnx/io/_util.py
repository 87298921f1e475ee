"""Helpers shared by the modules of `sw_onnx.io`."""

from __future__ import annotations

import math


def nbytes(tensor) -> int:
    """Bytes of a tensor's data by its shape and type (packed 4-bit types rounded up)."""
    count = math.prod(int(d) for d in tensor.shape.numpy())
    return int(math.ceil(count * tensor.dtype.itemsize))


def one_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message on one line (whitespace collapsed), at most `limit` characters."""
    text = " ".join(str(e).split())
    return (text or type(e).__name__)[:limit]
