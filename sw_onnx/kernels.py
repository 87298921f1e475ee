"""Blockwise int4/int8 weight quantization kernels in numpy, laid out for ONNX and ONNX Runtime (the default
``clip="mse"`` search and refit also compiled, in `sw_onnx.kernels_jit`, with the same results).

Layout: a MatMul weight is float32 ``w[K, N]`` and blocks run along K (axis 0), as in ONNX
``DequantizeLinear(axis=0, block_size=B)``, which ONNX Runtime fuses into ``com.microsoft::MatMulNBits``.
K need not be a multiple of B: the last block is shorter and the scale has ``ceil(K / B)`` rows.
Every kernel is vectorised over all blocks: the weight is viewed as ``[nblocks, B, N]`` with the ragged
tail zero-filled (zero never moves a range that always includes 0, and it is masked out of statistics).
The numpy ``clip="mse"`` search runs on chunks of `_SEARCH_CHUNK` elements on `SEARCH_THREADS` threads and skips,
per block, the candidates a lower bound already rules out; the result does not depend on either. (The compiled
search of the default error weight works on a layer's parts as they come, on tiles of its own.)

Formats (``q`` codes, ``scale`` float32, ``zero_point`` uint8), matching ONNX Runtime's own RTN
quantizer (``quantize_matmul_4bits``/``quantize_matmul_8bits``, used by ``MatMulNBitsQuantizer``):

- symmetric, b bits: ``scale = m / -2**(b-1)`` where ``m`` is the block's element of largest magnitude,
  *with its sign*, so that element maps to the code ``-2**(b-1)`` and the full range
  ``[-2**(b-1), 2**(b-1) - 1]`` is used. ``scale`` is negative when ``m`` is positive.
- asymmetric, b bits: min-max over the block with the range forced to include 0,
  ``scale = (rmax - rmin) / (2**b - 1)``, ``zero_point = rint(-rmin / scale)`` in ``[0, 2**b - 1]``.
  (``clip="mse"`` may instead pick the symmetric range for a block: same codes, positive scale.)
- codes: ``q = clip(rint(w / scale) + zero_point)``, rounding half to even as ONNX ``QuantizeLinear``;
  dequantized value ``(q - zero_point) * scale`` as ONNX ``DequantizeLinear``.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "DEFAULT_MSE_GRID",
    "DEFAULT_ZSCORE",
    "QuantizedWeight",
    "dequantize_blockwise",
    "pack_int4_low_first",
    "pack_nibbles_along_rows",
    "quantize_blockwise",
    "quantize_gptq",
    "quantize_rows_blockwise",
    "to_matmulnbits",
    "unsigned_codes",
    "unpack_int4_low_first",
    "usable_cpus",
]

DEFAULT_ZSCORE = 12.0
"""Default z of ``clip="zscore"``: clamp ``|w|`` at ``mean(|w|) + z * std(|w|)`` per block."""

DEFAULT_MSE_GRID = 9
"""Default number of shrink factors tried by ``clip="mse"`` per range family: ``linspace(1.0, 0.8, 9)``,
step 0.025."""

MSE_MIN_FACTOR = 0.8
"""Smallest shrink factor of ``clip="mse"``. With the w^2-weighted error, a grid down to 0.5 never chose a
factor below 0.85 on SmolLM2-135M at blocks of 32, 128 or 1024 (both range families), so the search stops at
0.8: same choices, less than half the work."""

SEARCH_THREADS: int | None = 1
"""Threads of the numpy ``clip="mse"`` search (None: the CPUs this process may use, at most 8). Default 1: on the
2-core machine of the measurements two threads were slower (SmolLM2-135M, b32: 2.8 s vs 1.9 s, CPU time up
40%): the numpy loops here are memory-bound and short, and the threads mostly contend."""

_PART_SIZE = 1 << 20
"""Elements (padded to whole blocks) of the part of a weight `quantize_blockwise` works on at once: 4 MiB per
float32 temporary (SmolLM2's layers but the lm_head fit in one; its lm_head quantize peaked ~30 MB lower
than with 16 MiB parts, in the same time)."""
_TRANSPOSE_TILE = 1 << 16
"""Elements per tile of `unsigned_codes`'s transpose (64 KiB of codes: source and target rows stay in cache)."""
_SEARCH_CHUNK = 1 << 20
"""Elements per chunk of the numpy ``clip="mse"`` search and refit (4 MiB per float32 work array; a part of `_PART_SIZE`
is one chunk). Alone on one thread 256 Ki was fastest (the work arrays stay in cache), but with the save's
threads fewer, larger numpy calls hold the GIL less often: the bare quantize from a report without verification,
SmolLM2 6.50 -> 6.13 s and the 2.67 GB decoder 17.4 -> 16.5 s (medians of 4 and 2 alternating runs), for ~6% more
CPU; the same bytes."""

COMPILED = True
"""Run the default search and refit (plain squared error, with or without input importance) as the compiled loops of
`sw_onnx.kernels_jit`: the same codes and scales as numpy's on a [K, N] weight, four times less CPU. False: numpy
alone (the reference, used by the tests that compare the two)."""

_PRUNE = True
"""Skip the blocks a candidate cannot improve (off only to test that skipping changes nothing)."""

_COMPACT_BELOW = 0.3
"""The search gathers the blocks a candidate can still improve when they are fewer than this share."""

try:  # the clip ufunc itself: np.clip's Python wrapper costs more than the work on a chunk
    from numpy._core.umath import clip as _clip
except ImportError:  # pragma: no cover - numpy < 2
    try:
        from numpy.core.umath import clip as _clip
    except ImportError:
        _clip = np.clip

ClipMode = Literal["none", "zscore", "mse"]
Weighting = Literal["w2", "rms", "none"]

_CLIP_MODES = ("none", "zscore", "mse")
_WEIGHTINGS = ("w2", "rms", "none")


@dataclass
class QuantizedWeight:
    """A blockwise-quantized MatMul weight ``w[K, N]``, blocks of ``block_size`` rows along K.

    Dequantized value: ``(q - zero_point) * scale`` with scale/zero point row ``k // block_size``.

    Attributes:
        q: codes [K, N]. int8 when ``symmetric`` (int4: [-8, 7]; int8: [-128, 127]), uint8 when not
            (int4: [0, 15]; int8: [0, 255]), i.e. the signedness of the ONNX type the codes go into
            (INT4/INT8 vs UINT4/UINT8). Kept-out weights hold the code that dequantizes to exactly 0.
        scale: float32 [ceil(K / block_size), N]. May be negative when symmetric (see module doc);
            0 for a block whose quantized elements are all zero.
        zero_point: uint8 [ceil(K / block_size), N] in the code range, or None when symmetric.
        bits: 4 or 8.
        block_size: rows per block; K for per-channel quantization. May exceed K (one short block).
        symmetric: whether the codes are signed with an implicit zero point of 0.
    """

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    bits: int
    block_size: int
    symmetric: bool

    @property
    def shape(self) -> tuple[int, int]:
        """The weight's shape ``(K, N)``."""
        return self.q.shape  # type: ignore[return-value]

    @property
    def nblocks(self) -> int:
        """Blocks per column, ``ceil(K / block_size)``."""
        return self.scale.shape[0]


def quantize_blockwise(
    w: np.ndarray,
    *,
    bits: int = 4,
    block_size: int | None = 128,
    symmetric: bool = False,
    clip: ClipMode = "none",
    zscore: float | None = None,
    weighting: Weighting | None = None,
    mse_grid: int | None = None,
    keep_out: np.ndarray | list[tuple[int, int]] | None = None,
    importance: np.ndarray | None = None,
    refit: int = 0,
) -> QuantizedWeight:
    """Quantize a float32 weight ``w[K, N]`` in blocks of ``block_size`` rows along K.

    Args:
        w: float [K, N], finite; converted to float32.
        bits: 4 or 8.
        block_size: rows per block (>= 1); None means per-channel (block_size = K). The last block is
            shorter when K is not a multiple; a block size above K gives one (short) block per column,
            the same quantization as per-channel, kept as given so that a power of two >= K still
            suits MatMulNBits.
        symmetric: signed codes with the full range and scale ``m / -2**(bits-1)`` (``m`` the signed
            element of largest magnitude, ties to the negative one), as ONNX Runtime's RTN. For int8
            this is ``m / -128`` rather than ``absmax / 127``: same as ORT's 8-bit MatMulNBits
            quantizer, one more code, and the largest weight stays exact. Otherwise unsigned codes with a
            uint8 zero point per block: min-max (range forced to include 0), or with ``clip="mse"`` the
            better of that range and the symmetric one (then stored with a positive scale and zero point
            ``2**(bits-1)`` or ``2**(bits-1) - 1``): the asymmetric format holds both.
        clip: how each block's range is chosen before rounding.
            ``"none"``: the plain range (round-to-nearest, as ORT).
            ``"zscore"``: clamp ``|w|`` at ``mean(|w|) + zscore * std(|w|)`` of the block (paper Eq. 2,
            population std) for the range; weights beyond it saturate at the end codes.
            ``"mse"``: per block, the candidate range that minimises the reconstruction error
            ``sum(weight * (w - deq)**2)``: the plain range shrunk by each factor of
            ``linspace(1, MSE_MIN_FACTOR, mse_grid)``, for the min-max range and (asymmetric only) also
            for the symmetric range. Ties keep the earlier candidate (min-max, then larger factors), so
            plain round-to-nearest is chosen unless another is strictly better. Exact search over these
            candidates, in float32 (near-ties within ~1e-5 of the error may go either way).
        zscore: z for ``clip="zscore"`` (default ``DEFAULT_ZSCORE``); only allowed with that mode.
        weighting: error weight for ``clip="mse"``: ``"rms"`` (``sqrt(2 mean(w**2) + w**2)`` over the block,
            as llama.cpp's k-quants weight an imatrix), ``"w2"`` (``w**2``, protects large weights;
            default) or ``"none"`` (plain squared error); only allowed with that mode.
        mse_grid: number of shrink factors for ``clip="mse"`` (>= 1, default ``DEFAULT_MSE_GRID``);
            only allowed with that mode.
        importance: float [K] >= 0, for ``clip="mse"`` only: each row's error is further weighted by the
            importance of its input channel (E[x_k^2], as llama.cpp's imatrix), so the search minimises
            ``sum(importance_k * weight * (w - deq)**2)``, the expected squared output error when the inputs
            are uncorrelated. None: all 1.
        refit: for ``clip="mse"``: after the search, this many rounds of least-squares refitting of each
            block's scale to its codes (``s = sum(c w q) / sum(c q^2)`` with the search's error weights c,
            codes re-rounded), each kept only where it lowers the block's weighted error (as llama.cpp's
            make_qkx quantizers do): the scale between the grid's steps. 0: the search's candidate as is.
        keep_out: weights kept out of the quantizer: a bool mask [K, N] or (k, n) coordinates
            (sequence of pairs or int array [M, 2]). They are left out of their block's range,
            statistics and error, and get the code that dequantizes to exactly 0 (the zero point, or 0
            when symmetric); the caller adds their exact values back on a side path.

    Returns:
        The codes, scales and zero points; see `QuantizedWeight`.

    Raises:
        ValueError: on a bad argument, a non-2-D or non-finite ``w``, or keep-out coordinates out of
            bounds.

    Example:
        >>> w = np.array([[1.0], [-0.5], [0.25], [0.0]], dtype=np.float32)
        >>> qw = quantize_blockwise(w, bits=4, block_size=4, symmetric=True)
        >>> qw.scale.tolist(), qw.q.ravel().tolist()
        ([[-0.125]], [-8, 4, -2, 0])
        >>> dequantize_blockwise(qw).ravel().tolist()
        [1.0, -0.5, 0.25, -0.0]
    """
    w = _check_weight(w)
    k, n = w.shape
    bs = _effective_block_size(block_size, k)
    qmin, qmax = _code_range(bits, symmetric)
    z, weight_mode, grid = _check_clip_options(clip, zscore, weighting, mse_grid)
    if refit and clip != "mse":
        raise ValueError("refit is only used with clip='mse'")
    excluded = _keep_out_mask(keep_out, w.shape)
    imp_blocks = _importance_blocks(importance, k, bs, clip)

    nblocks = -(-k // bs)
    q = np.empty((k, n), np.int8 if symmetric else np.uint8)
    scale = np.empty((nblocks, n), np.float32)
    zero_point = None if symmetric else np.empty((nblocks, n), np.uint8)

    def quantize_part(part: tuple[slice, slice]) -> None:
        br, sl = part  # whole blocks (rows of blocks) x columns
        rows = slice(br.start * bs, min(k, br.stop * bs))
        kept_out = None if excluded is None else excluded[rows, sl]
        blocks, valid = _to_blocks(w[rows, sl], bs, kept_out)
        imp = None if imp_blocks is None else imp_blocks[br]
        with np.errstate(invalid="ignore", over="ignore"):  # a non-finite weight is refused just below
            range_blocks = _clamp_zscore(blocks, valid, z) if clip == "zscore" else blocks
            lo = range_blocks.min(axis=1, keepdims=True)
            hi = range_blocks.max(axis=1, keepdims=True)
        del range_blocks, valid
        # A NaN or infinity anywhere reaches its block's min or max (the z-score clamp too); kept-out weights
        # were zeroed in the blocks and are checked on their own.
        _check_finite(lo, hi, None if kept_out is None else w[rows, sl][kept_out])
        codes = None
        jit = _compiled_kernels() if clip == "mse" and weight_mode == "none" else None
        if jit is not None:
            s, zp, codes = _search_refit_compiled(jit, blocks, lo, hi, bits, symmetric, grid, imp, refit, q.dtype)
        elif clip == "mse":
            s, zp = _search_mse(blocks, lo, hi, bits, symmetric, weight_mode, grid, imp)
            if refit:
                s, codes = _refit_scales(blocks, s, zp, qmin, qmax, weight_mode, imp, refit)
        else:
            s, zp = _scale_zero_point(lo, hi, bits, symmetric)
        if codes is None:
            codes = _round_codes(blocks, s, zp, qmin, qmax)
        q[rows, sl] = codes.reshape(-1, codes.shape[2])[:rows.stop - rows.start]
        scale[br, sl] = s[:, 0, :]
        if zero_point is not None:
            zero_point[br, sl] = zp[:, 0, :]

    # Blocks are independent: the weight goes in parts of whole blocks, so that the float32 temporaries stay at
    # a part's size instead of several copies of the whole weight, and the parts run on `usable_cpus` threads
    # (each writes its own blocks). A part is whole rows of blocks (contiguous) unless one row of blocks is over
    # `_PART_SIZE` (an lm_head): then columns of one row of blocks.
    block_rows = max(1, _PART_SIZE // (bs * n))
    cols = n if bs * n <= _PART_SIZE else max(1, _PART_SIZE // bs)
    parts = [(slice(b, min(b + block_rows, nblocks)), slice(c, c + cols))
             for b in range(0, nblocks, block_rows) for c in range(0, n, cols)]
    _run_all("columns", quantize_part, parts, usable_cpus())
    return QuantizedWeight(q=q, scale=scale, zero_point=zero_point, bits=bits, block_size=bs, symmetric=symmetric)


GPTQ_DAMPING = 0.01
"""GPTQ's damping: ``damping * mean(diag(H))`` is added to the Hessian's diagonal before inverting it."""


def quantize_gptq(w: np.ndarray, hessian: np.ndarray, *, bits: int = 4, block_size: int = 128,
                  symmetric: bool = False, damping: float | None = None, keep_out=None, **search) -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022): quantize the rows of ``w[K, N]`` (input channels) in order, each block's
    scale and zero point chosen on the weights as updated so far (`quantize_blockwise` with `search`'s
    options on that block), and push each row's rounding error onto the rows not yet quantized through the
    inverse Hessian ``H = X^T X`` (float [K, K]), minimising ``||X (W - Q)||^2`` instead of ``||W - Q||^2``.

    A channel with ``H[k, k] == 0`` never carries input: its row is quantized as is and receives nothing.
    `keep_out` weights are exact (their value returns on a side path): they add no error.
    """
    w = _check_weight(w)
    k, n = w.shape
    h = np.array(hessian, dtype=np.float64)
    if h.shape != (k, k) or not np.isfinite(h).all():
        raise ValueError(f"hessian must be a finite [{k}, {k}] matrix, got shape {h.shape}")
    dead = np.diag(h) <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    mean_diag = float(np.mean(np.diag(h)[~dead])) if (~dead).any() else 1.0
    h[np.diag_indices(k)] += (GPTQ_DAMPING if damping is None else damping) * mean_diag
    u = np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)  # upper factor of H^-1
    excluded = _keep_out_mask(keep_out, w.shape)
    work = np.array(w, dtype=np.float32)
    qmin, qmax = _code_range(bits, symmetric)
    bs = _effective_block_size(block_size, k)
    nblocks = -(-k // bs)
    q = np.empty((k, n), np.int8 if symmetric else np.uint8)
    scale = np.empty((nblocks, n), np.float32)
    zero_point = None if symmetric else np.empty((nblocks, n), np.uint8)
    importance = search.pop("importance", None)
    for b in range(nblocks):
        r0, r1 = b * bs, min((b + 1) * bs, k)
        rows = slice(r0, r1)
        imp = None if importance is None else np.asarray(importance)[rows]
        block = quantize_blockwise(work[rows], bits=bits, block_size=r1 - r0, symmetric=symmetric, importance=imp,
                                   keep_out=None if excluded is None else excluded[rows], **search)
        scale[b], s = block.scale[0], block.scale[0]
        z = np.float32(0) if zero_point is None else block.zero_point[0].astype(np.float32)
        if zero_point is not None:
            zero_point[b] = block.zero_point[0]
        errors = np.empty((r1 - r0, n), np.float32)
        safe = np.where(s != 0, s, np.float32(1))
        for i in range(r0, r1):
            codes = np.clip(np.rint(work[i] / safe) + z, qmin, qmax)
            codes[s == 0] = z if np.ndim(z) == 0 else z[s == 0]
            deq = (codes - z) * s
            if excluded is not None:
                codes[excluded[i]] = z if np.ndim(z) == 0 else z[excluded[i]]
                deq[excluded[i]] = work[i][excluded[i]]
            q[i] = codes
            e = (work[i] - deq) / u[i, i]
            work[i + 1:r1] -= np.outer(u[i, i + 1:r1], e)
            errors[i - r0] = e
        work[r1:] -= u[r0:r1, r1:].T @ errors
    return QuantizedWeight(q=q, scale=scale, zero_point=zero_point, bits=bits, block_size=bs, symmetric=symmetric)


def dequantize_blockwise(qw: QuantizedWeight) -> np.ndarray:
    """Dequantize to float32 [K, N]: ``(q - zero_point) * scale``, as ONNX ``DequantizeLinear``.

    Args:
        qw: the quantized weight.

    Returns:
        float32 [K, N]. Kept-out weights and all-zero blocks come back as exactly 0 (possibly -0.0).

    Example:
        >>> qw = quantize_blockwise(np.array([[-4.0], [1.0], [11.0]], np.float32), block_size=None)
        >>> qw.scale.tolist(), qw.zero_point.tolist(), qw.q.ravel().tolist()
        ([[1.0]], [[4]], [0, 5, 15])
        >>> dequantize_blockwise(qw).ravel().tolist()
        [-4.0, 1.0, 11.0]
    """
    k = qw.q.shape[0]
    x = qw.q.astype(np.float32)
    if qw.zero_point is not None:
        x -= np.repeat(qw.zero_point, qw.block_size, axis=0)[:k].astype(np.float32)
    x *= np.repeat(np.asarray(qw.scale, np.float32), qw.block_size, axis=0)[:k]
    return x


def pack_int4_low_first(q: np.ndarray) -> np.ndarray:
    """Pack int4 or uint4 codes two per byte, first element in the low nibble.

    Byte-for-byte what ``onnx.numpy_helper.from_array(arr.astype(ml_dtypes.int4)).raw_data`` (or
    ``uint4``) writes: the array is flattened in C order, an odd count leaves the last high nibble 0.

    Args:
        q: integer array of any shape with values in [-8, 7] (int4) or [0, 15] (uint4).

    Returns:
        uint8 [ceil(q.size / 2)].

    Raises:
        ValueError: if ``q`` is not an integer array or holds a value outside [-8, 15].

    Example:
        >>> pack_int4_low_first(np.array([1, -8, 7], np.int8)).tolist()
        [129, 7]
    """
    flat = np.asarray(q).reshape(-1)
    if not np.issubdtype(flat.dtype, np.integer):
        raise ValueError(f"int4 codes must be an integer array, got {flat.dtype}")
    if flat.size and (int(flat.min()) < -8 or int(flat.max()) > 15):
        raise ValueError("int4 codes must lie in [-8, 7] (int4) or [0, 15] (uint4)")
    nibbles = flat.astype(np.uint8) & np.uint8(0x0F)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << np.uint8(4))


def unpack_int4_low_first(packed: np.ndarray, count: int, signed: bool) -> np.ndarray:
    """Unpack ``count`` int4 or uint4 codes stored two per byte, low nibble first.

    Args:
        packed: uint8 bytes (any shape; flattened in C order).
        count: number of codes to return, at most ``2 * packed.size``.
        signed: sign-extend to int8 [-8, 7]; otherwise return uint8 [0, 15].

    Returns:
        int8 or uint8 [count].

    Raises:
        ValueError: if ``count`` is negative or larger than the bytes hold.

    Example:
        >>> unpack_int4_low_first(np.array([129, 7], np.uint8), 3, signed=True).tolist()
        [1, -8, 7]
    """
    data = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if count < 0 or count > 2 * data.size:
        raise ValueError(f"cannot unpack {count} int4 codes from {data.size} bytes")
    nibbles = np.empty(2 * data.size, dtype=np.uint8)
    nibbles[0::2] = data & np.uint8(0x0F)
    nibbles[1::2] = data >> np.uint8(4)
    nibbles = nibbles[:count]
    if signed:
        return (nibbles.astype(np.int8) ^ np.int8(8)) - np.int8(8)
    return nibbles


def to_matmulnbits(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Lay a quantized weight out as the inputs of ``com.microsoft::MatMulNBits``.

    Set the node's attributes to ``K, N = qw.shape``, ``bits=qw.bits``, ``block_size=qw.block_size``.
    The bytes equal ONNX Runtime's own ``quantize_matmul_{4,8}bits`` output for the same codes,
    padding included: a ragged last block is padded with code 0 and an odd number of 4-bit zero
    points with the nibble 8 (ORT never reads either). The one exception: for an odd K with 4 bits,
    ORT leaves unspecified data in the unused high nibble of each column's last byte; we write 0.

    Args:
        qw: the quantized weight; ``block_size`` must be a power of two >= 16 (MatMulNBits' rule).

    Returns:
        ``(B, scales, zero_points)``:
        B: uint8 [N, nblocks, block_size * bits / 8], N-major, codes along K, 4-bit codes two per byte
        low nibble first. Codes are unsigned: symmetric codes are stored offset by ``2**(bits-1)``
        (8 or 128), which is MatMulNBits' default zero point when none is given.
        scales: float32 [N, nblocks] (ORT also accepts the flat [N * nblocks]).
        zero_points: None when symmetric; otherwise uint8 [N, ceil(nblocks / 2)] for 4 bits (two per
        byte, low nibble first along the blocks) or [N, nblocks] for 8 bits.

    Raises:
        ValueError: if the block size is not a power of two >= 16 or ``bits`` is not 4 or 8. For a
            per-channel weight whose K is not a power of two, quantize with ``block_size`` set to the
            next power of two >= K instead: same codes and scales, one padded block.

    Example:
        >>> qw = quantize_blockwise(np.ones((32, 2), np.float32), block_size=16, symmetric=True)
        >>> [a.shape for a in to_matmulnbits(qw)[:2]]
        [(2, 2, 8), (2, 2)]
    """
    k, n = qw.q.shape
    bs, bits = qw.block_size, qw.bits
    if bits not in (4, 8):
        raise ValueError(f"MatMulNBits layout is implemented for 4 and 8 bits, got {bits}")
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"MatMulNBits needs block_size a power of two >= 16, got {bs}")
    nblocks = -(-k // bs)

    codes = unsigned_codes(qw)
    if nblocks * bs != k:
        codes = np.concatenate([codes, np.zeros((n, nblocks * bs - k), np.uint8)], axis=1)
    codes = codes.reshape(n, nblocks, bs)
    if bits == 4:
        codes = pack_nibbles_along_rows(codes)
    scales = np.ascontiguousarray(np.asarray(qw.scale, np.float32).T)

    if qw.zero_point is None:
        return codes, scales, None
    zp = np.ascontiguousarray(qw.zero_point.T.astype(np.uint8))
    return codes, scales, pack_nibbles_along_rows(zp, pad=8) if bits == 4 else zp


def unsigned_codes(qw: QuantizedWeight) -> np.ndarray:
    """The codes as uint8 [N, K] (each output column's codes along K): symmetric codes offset by
    ``2**(bits-1)``, the zero point MatMulNBits and GatherBlockQuantized assume when none is given."""
    k, n = qw.q.shape
    out = np.empty((n, k), np.uint8)
    step = max(1, _TRANSPOSE_TILE // max(k, 1))
    for c in range(0, n, step):  # in cache-sized tiles: a whole-matrix transpose was 3-6x slower (lm_heads)
        out[c:c + step] = qw.q[:, c:c + step].T.view(np.uint8)
    if qw.symmetric:
        out += np.uint8(1 << (qw.bits - 1))  # wraps: int8 -8..-1 are 248..255 as uint8, +8 -> 0..7
    return out


def quantize_rows_blockwise(
    table: np.ndarray, *, bits: int = 8, block_size: int = 32, symmetric: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Round-to-nearest of a table ``[V, H]`` in blocks of `block_size` along H (each row's own blocks), the
    layout of ``GatherBlockQuantized``: the same codes, scales and zero points as `quantize_blockwise` of its
    transpose followed by `unsigned_codes`, without transposing (a 32000x2048 table: 2.4 s -> 0.3 s).

    Returns:
        unsigned codes uint8 ``[V, H]`` (symmetric ones offset by ``2**(bits-1)``), float32 scales
        ``[V, ceil(H / B)]`` and uint8 zero points of that shape (None when `symmetric`).
    """
    table = np.asarray(table)
    _check_weight(table[:1])  # shape and dtype; rows are converted to float32 a chunk at a time
    v, h = table.shape
    bs = _effective_block_size(block_size, h)
    qmin, qmax = _code_range(bits, symmetric)
    nblocks = -(-h // bs)
    codes = np.empty((v, h), np.uint8)
    scale = np.empty((v, nblocks), np.float32)
    zero_point = None if symmetric else np.empty((v, nblocks), np.uint8)
    offset = np.float32(1 << (bits - 1)) if symmetric else np.float32(0)

    def quantize_rows(sl: slice) -> None:
        w = np.ascontiguousarray(table[sl], dtype=np.float32)
        x = w if nblocks * bs == h else np.pad(w, ((0, 0), (0, nblocks * bs - h)))  # zeros: as `_to_blocks`
        blocks = x.reshape(-1, nblocks, bs)
        lo, hi = blocks.min(axis=2, keepdims=True), blocks.max(axis=2, keepdims=True)
        _check_finite(lo, hi)  # a NaN or infinity reaches its block's min or max
        s, zp = _scale_zero_point(lo, hi, bits, symmetric)
        q = _round_codes(blocks, s, zp, qmin, qmax)
        q += offset
        codes[sl] = q.reshape(len(w), -1)[:, :h]
        scale[sl] = s[..., 0]
        if zero_point is not None:
            zero_point[sl] = zp[..., 0]

    rows = max(1, _PART_SIZE // (nblocks * bs))
    _run_all("columns", quantize_rows, [slice(r, r + rows) for r in range(0, v, rows)], usable_cpus())
    return codes, scale, zero_point


def pack_nibbles_along_rows(codes: np.ndarray, pad: int = 0) -> np.ndarray:
    """4-bit values [..., C] two per byte along the last axis, low nibble first; an odd C ends with `pad`
    (8: a zero point's neutral value)."""
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.full((*codes.shape[:-1], 1), pad, np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << np.uint8(4))).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Private helpers. Block arrays are [nblocks, B, N]; per-block arrays are [nblocks, 1, N].


def _check_weight(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"weight must be a non-empty 2-D array [K, N], got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"weight must be floating point, got {w.dtype}")
    return w.astype(np.float32, copy=False)  # finiteness: checked slice by slice in quantize_blockwise


def _check_finite(*arrays: np.ndarray | None) -> None:
    if not all(np.isfinite(a).all() for a in arrays if a is not None):
        raise ValueError("weight holds NaN or infinite values")


def _effective_block_size(block_size: int | None, k: int) -> int:
    if block_size is None:
        return k
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}")
    return int(block_size)


def _code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if symmetric:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _check_clip_options(
    clip: str, zscore: float | None, weighting: str | None, mse_grid: int | None
) -> tuple[float, str, int]:
    if clip not in _CLIP_MODES:
        raise ValueError(f"clip must be one of {_CLIP_MODES}, got {clip!r}")
    if zscore is not None and clip != "zscore":
        raise ValueError("zscore is only used with clip='zscore'")
    if (weighting is not None or mse_grid is not None) and clip != "mse":
        raise ValueError("weighting and mse_grid are only used with clip='mse'")
    z = DEFAULT_ZSCORE if zscore is None else float(zscore)
    if not np.isfinite(z) or z < 0:
        raise ValueError(f"zscore must be a finite number >= 0, got {zscore!r}")
    weight_mode = "w2" if weighting is None else weighting
    if weight_mode not in _WEIGHTINGS:
        raise ValueError(f"weighting must be one of {_WEIGHTINGS}, got {weighting!r}")
    grid = DEFAULT_MSE_GRID if mse_grid is None else mse_grid
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1:
        raise ValueError(f"mse_grid must be a positive integer, got {mse_grid!r}")
    return z, weight_mode, int(grid)


def _importance_blocks(importance: np.ndarray | None, k: int, bs: int, clip: str) -> np.ndarray | None:
    """The importance as float32 [nblocks, B, 1] (ragged tail 0), or None."""
    if importance is None:
        return None
    if clip != "mse":
        raise ValueError("importance is only used with clip='mse'")
    imp = np.asarray(importance, dtype=np.float64).reshape(-1)
    if imp.shape != (k,) or not np.isfinite(imp).all() or (imp < 0).any():
        raise ValueError(f"importance must be {k} finite values >= 0, got shape {imp.shape}")
    nblocks = -(-k // bs)
    out = np.zeros(nblocks * bs, np.float32)
    top = float(imp.max())
    out[:k] = imp / top if top > 0 else 1.0  # scale-free: only the ratios matter
    return out.reshape(nblocks, bs, 1)


def _keep_out_mask(
    keep_out: np.ndarray | list[tuple[int, int]] | None, shape: tuple[int, int]
) -> np.ndarray | None:
    """Normalise ``keep_out`` to a bool mask [K, N], or None when nothing is kept out."""
    if keep_out is None:
        return None
    arr = np.asarray(keep_out)
    if arr.dtype == np.bool_:
        if arr.shape != shape:
            raise ValueError(f"keep_out mask must have the weight's shape {shape}, got {arr.shape}")
        return arr if arr.any() else None
    if arr.size == 0:
        return None
    if not np.issubdtype(arr.dtype, np.integer) or arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError("keep_out must be a bool mask [K, N] or integer (k, n) coordinates [M, 2]")
    rows, cols = arr[:, 0], arr[:, 1]
    if rows.min() < 0 or cols.min() < 0 or rows.max() >= shape[0] or cols.max() >= shape[1]:
        raise ValueError(f"keep_out coordinates out of bounds for a weight of shape {shape}")
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    return mask


def _to_blocks(w: np.ndarray, bs: int, excluded: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """View ``w`` as blocks [nblocks, bs, N], zero-filling the ragged tail and excluded weights.

    Returns the blocks and a bool mask of the real, not-excluded elements (None when all are).
    """
    k, n = w.shape
    nblocks = -(-k // bs)
    pad = nblocks * bs - k
    if pad == 0 and excluded is None:
        return w.reshape(nblocks, bs, n), None
    x = np.zeros((nblocks * bs, n), dtype=np.float32)
    x[:k] = w
    valid = np.zeros((nblocks * bs, n), dtype=bool)
    valid[:k] = True
    if excluded is not None:
        x[:k][excluded] = 0.0
        valid[:k][excluded] = False
    return x.reshape(nblocks, bs, n), valid.reshape(nblocks, bs, n)


def _clamp_zscore(blocks: np.ndarray, valid: np.ndarray | None, z: float) -> np.ndarray:
    """Clamp each block to ``+-(mean(|w|) + z * std(|w|))`` over its valid elements (paper Eq. 2)."""
    mag = np.abs(blocks)
    if valid is None:
        mean = mag.mean(axis=1, keepdims=True)
        std = mag.std(axis=1, keepdims=True)
    else:
        count = np.maximum(valid.sum(axis=1, keepdims=True), 1).astype(np.float32)
        mean = mag.sum(axis=1, keepdims=True) / count
        dev = np.where(valid, mag - mean, np.float32(0))
        std = np.sqrt((dev * dev).sum(axis=1, keepdims=True) / count)
    limit = (mean + np.float32(z) * std).astype(np.float32)
    return np.clip(blocks, -limit, limit)


def _scale_zero_point(
    lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-block scale (float32) and zero point (float32 holding integers, or None) from min/max."""
    if symmetric:
        signed_absmax = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        return (signed_absmax / np.float32(-(1 << (bits - 1)))).astype(np.float32), None
    qmax = np.float32((1 << bits) - 1)
    rmin = np.minimum(lo, np.float32(0))
    rmax = np.maximum(hi, np.float32(0))
    scale = ((rmax - rmin) / qmax).astype(np.float32)
    nonzero = scale != 0
    safe = np.where(nonzero, scale, np.float32(1))
    zp = np.where(nonzero, np.clip(np.rint(-rmin / safe), 0, qmax), np.float32(0)).astype(np.float32)
    return scale, zp


def _round_codes(
    blocks: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, qmin: int, qmax: int
) -> np.ndarray:
    """``clip(rint(x / scale) + zp, qmin, qmax)`` as float32; a zero scale gives the zero point."""
    safe = np.where(scale != 0, scale, np.float32(1))
    codes = np.divide(blocks, safe, dtype=np.float32)
    np.rint(codes, out=codes)
    if not scale.all():  # underflowed scales: keep tiny weights at the zero point
        codes[np.broadcast_to(scale == 0, codes.shape)] = 0.0
    if zp is not None:
        codes += zp
    return _clip(codes, np.float32(qmin), np.float32(qmax), out=codes)


def _error_weight(x: np.ndarray, mode: str, axis: int) -> np.ndarray | None:
    """The per-element error weight of `mode` for blocks laid along `axis` (None: uniform)."""
    if mode == "w2":
        return np.square(x)
    if mode == "rms":
        sigma2 = np.float32(2) * np.mean(np.square(x), axis=axis, keepdims=True)
        return np.sqrt(sigma2 + np.square(x))
    return None


def _refit_scales(blocks: np.ndarray, s: np.ndarray, zp: np.ndarray | None, qmin: int, qmax: int, weighted: str,
                  importance: np.ndarray | None, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """``refit``: per block, the least-squares scale for its codes, kept where the weighted error
    (codes re-rounded with it) falls. Zero-filled elements (tail, kept-out) map to the zero point and add
    nothing. Works on chunks of whole block rows (`_SEARCH_CHUNK`). Returns the new scales [nblocks, 1, N] and their
    codes (`_round_codes` of them, float32 [nblocks, B, N])."""
    nb, bs, n = blocks.shape
    out = np.empty_like(s)
    codes = np.empty(blocks.shape, np.float32)
    # Chunks of whole block rows: contiguous, and each row as long as the slice (chunks of columns were
    # strided runs of 32 floats on a K=8192 layer: the refit took 48 instead of 30 ns per weight there).
    rows = max(1, _SEARCH_CHUNK // (bs * n))
    for r0 in range(0, nb, rows):
        sl = slice(r0, r0 + rows)
        out[sl], codes[sl] = _refit_chunk(blocks[sl], s[sl], None if zp is None else zp[sl], qmin, qmax, weighted,
                                          None if importance is None else importance[sl], iterations)
    return out, codes


def _importance_sums(importance: np.ndarray):
    """``f(x) = sum over each block of importance * x`` ([rows, B, N] -> [rows, 1, N]) for importance [rows, B,
    1]: one weight per row of a block-row, summed by einsum without weighting every element first (numpy's own
    loops, in the same order as multiplying and summing: the same float32 sums, in less time)."""
    rows = np.ascontiguousarray(importance[:, :, 0], dtype=np.float32)
    return lambda x: np.einsum("rbn,rb->rn", x, rows)[:, None, :]


def _block_sums(blocks: np.ndarray, weighted: str, importance: np.ndarray | None):
    """``f(x) = sum over each block of c * x`` ([rows, B, N] -> [rows, 1, N]) for the error weights c of
    `weighted` and `importance`."""
    c = _error_weight(blocks, weighted, 1)
    if c is None and importance is not None:
        return _importance_sums(importance)
    if importance is not None:
        c = importance * c
    if c is None:
        return lambda x: x.sum(axis=1, keepdims=True)
    return lambda x: np.multiply(c, x).sum(axis=1, keepdims=True)


def _refit_chunk(blocks, s, zp, qmin, qmax, weighted, importance, iterations) -> tuple[np.ndarray, np.ndarray]:
    # The weighted error of scale s with codes q (zero point taken off) expands to E - 2 s sum(c w q) +
    # s^2 sum(c q^2): the two sums are also the least-squares fit's numerator and denominator, so each
    # candidate scale costs one rounding and two block sums (in float64 from here: E and s num nearly cancel).
    block_sum = _block_sums(blocks, weighted, importance)
    z = np.float32(0) if zp is None else zp
    energy = block_sum(np.square(blocks)).astype(np.float64)

    def codes_and_sums(scale: np.ndarray):
        q = _round_codes(blocks, scale, zp, qmin, qmax)
        q -= z
        return q, block_sum(q * blocks).astype(np.float64), block_sum(q * q).astype(np.float64)

    def error(scale, num, den):
        scale = scale.astype(np.float64)
        return energy - 2 * scale * num + scale * scale * den

    q, num, den = codes_and_sums(s)
    best = error(s, num, den)
    for _ in range(iterations):
        fit = np.where(den > 0, num / np.where(den > 0, den, 1), s).astype(np.float32)
        q_fit, num_fit, den_fit = codes_and_sums(fit)
        err = error(fit, num_fit, den_fit)
        better = err < best
        s = np.where(better, fit, s)
        best = np.where(better, err, best)
        num = np.where(better, num_fit, num)
        den = np.where(better, den_fit, den)
        q = np.where(better, q_fit, q)
    q += z  # back to codes: exact, small integers in float32
    return s, q


def mse_factors(grid: int = DEFAULT_MSE_GRID) -> np.ndarray:
    """The shrink factors ``clip="mse"`` tries: ``linspace(1, MSE_MIN_FACTOR, grid)`` as float32."""
    return np.linspace(1.0, MSE_MIN_FACTOR, grid, dtype=np.float32)


_EXECUTORS: dict[tuple[str, int], ThreadPoolExecutor] = {}


def _executor(threads: int, job: str) -> ThreadPoolExecutor:
    """A thread pool kept for the process (starting threads for every layer costs more than its search),
    one per `job`: a part's search never waits on its own pool."""
    if (job, threads) not in _EXECUTORS:
        _EXECUTORS[job, threads] = ThreadPoolExecutor(threads, thread_name_prefix=f"sw-onnx-{job}")
    return _EXECUTORS[job, threads]


def _run_all(job: str, fn, items: list, threads: int) -> None:
    """``fn(item)`` for every item, on `job`'s pool of up to `threads` threads (inline for one)."""
    threads = min(threads, len(items))
    if threads > 1:
        list(_executor(threads, job).map(fn, items))
    else:
        for item in items:
            fn(item)


def usable_cpus(limit: int = 8) -> int:
    """The CPUs this process may run on (its affinity), at most `limit`: the thread count of a pool."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, limit))


def _search_threads() -> int:
    return max(1, int(SEARCH_THREADS)) if SEARCH_THREADS is not None else usable_cpus()


def _search_mse(
    blocks: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    bits: int,
    symmetric: bool,
    weighting: str,
    grid: int,
    importance: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-block scale and zero point of ``clip="mse"`` (see `quantize_blockwise`).

    Candidates per block: for each family (asymmetric min-max, then symmetric; only symmetric when
    `symmetric`) and each factor of `mse_factors`, the family's range shrunk by the factor. The candidate of
    least (weighted) squared error wins; ties keep the earlier one, so min-max RTN unless another is
    strictly better. Zero-filled elements (ragged tail, kept-out weights) reconstruct exactly and add nothing.

    The errors are computed in float32 on chunks of `_SEARCH_CHUNK` elements, in the units of a
    family's unshrunk scale ``s1`` (``v = w / s1``, codes ``c = clip(rint(v / f))``, error
    ``(s1 f)^2 * sum(a^2 (v / f - c)^2)`` with ``a = |w|`` or 1), on `SEARCH_THREADS` threads.
    Returns float32 [nblocks, 1, N] scale and zero point (None when `symmetric`).
    """
    nb, bs, n = blocks.shape
    factors = mse_factors(grid)
    families = ("sym",) if symmetric else ("asym", "sym")
    best_family = np.zeros((nb, 1, n), dtype=np.int8)
    best_factor = np.zeros((nb, 1, n), dtype=np.int16)

    cols = min(n, max(16, _SEARCH_CHUNK // bs))
    rows = max(1, _SEARCH_CHUNK // (bs * cols))
    chunks = [(r, c) for r in range(0, nb, rows) for c in range(0, n, cols)]

    def run(chunk: tuple[int, int]) -> None:
        r, c = chunk
        sl = (slice(r, r + rows), slice(None), slice(c, c + cols))
        imp = None if importance is None else importance[sl[0]]  # [rows, B, 1]
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):  # per thread
            fam, idx = _search_chunk(blocks[sl], lo[sl], hi[sl], bits, families, weighting, factors, imp)
        best_family[sl] = fam
        best_factor[sl] = idx

    _run_all("mse", run, chunks, _search_threads())
    return _winner_scale_zero_point(lo, hi, bits, symmetric, factors, best_family, best_factor)


def _winner_scale_zero_point(lo, hi, bits, symmetric, factors, best_family, best_factor):
    """The scale and zero point [nblocks, 1, N] of each block's winning (family, factor) of the search (families
    asymmetric then symmetric, or symmetric alone)."""
    f = factors[best_factor]
    scale, zp = _scale_zero_point(lo * f, hi * f, bits, symmetric)
    if symmetric:
        return scale, None
    # Symmetric-family winners in the asymmetric format: the same 2**bits levels with a positive scale,
    # zero point 2**(b-1) when the largest-magnitude element is negative (it maps to code 0), else
    # 2**(b-1) - 1 (it maps to the top code).
    sym_scale, _ = _scale_zero_point(lo * f, hi * f, bits, True)
    half = np.float32(1 << (bits - 1))
    sym_zp = np.where(sym_scale < 0, half - 1, half).astype(np.float32)
    is_sym = best_family == 1  # the families were ("asym", "sym")
    scale = np.where(is_sym, np.abs(sym_scale), scale)
    zp = np.where(is_sym & (sym_scale != 0), sym_zp, zp)
    return scale, zp


_JIT_MODULE = None
_JIT_LOCK = threading.Lock()  # a layer's parts ask for the kernels at once


def _compiled_kernels():
    """`sw_onnx.kernels_jit` (imported on first use: numba's start costs 0.2-0.5 s), or None when `COMPILED` is off
    or the module cannot be had (then numpy alone: the same results, four times slower)."""
    global _JIT_MODULE
    if not COMPILED:
        return None
    with _JIT_LOCK:
        if _JIT_MODULE is None:
            try:
                from sw_onnx._process import skip_numba_blas_probe

                skip_numba_blas_probe()
                from sw_onnx import kernels_jit
            except (ImportError, RuntimeError):
                # numba is a dependency: a platform without its wheels, or (RuntimeError) no writable folder for
                # its cache, beside the package or in the user's cache
                kernels_jit = False
            _JIT_MODULE = kernels_jit
    return _JIT_MODULE or None


def _read_only(x: np.ndarray) -> np.ndarray:
    """`x`, or a read-only view of it: numba compiles (and caches) one version per writability, and a weight
    mapped from its file is read-only, a padded copy not; one version is loaded instead of two."""
    if x.flags.writeable:
        x = x.view()
        x.flags.writeable = False
    return x


def _search_refit_compiled(jit, blocks, lo, hi, bits, symmetric, grid, importance, refit, code_dtype):
    """`_search_mse` then `_refit_scales` (or `_round_codes` without refit) for the plain squared error, by the
    compiled loops of `sw_onnx.kernels_jit` on the whole part: scale, zero point [nblocks, 1, N] and codes
    [nblocks, B, N] of `code_dtype`."""
    nb, bs, n = blocks.shape
    x = _read_only(np.ascontiguousarray(blocks, dtype=np.float32))
    imp = np.ones((nb, bs), np.float32) if importance is None else np.ascontiguousarray(importance[:, :, 0])
    factors = mse_factors(grid)
    names = ("sym",) if symmetric else ("asym", "sym")
    scale1, shift, code_min, code_max = zip(*(_family_scale(f, lo.reshape(-1), hi.reshape(-1), bits) for f in names))
    inv = np.stack([_inverse(s1).reshape(nb, n) for s1 in scale1])
    scale1 = np.stack([s1.reshape(nb, n) for s1 in scale1])
    shift = np.stack([np.zeros((nb, n), np.float32) if sh is None else sh.reshape(nb, n) for sh in shift])
    code_min, code_max = np.array(code_min, np.float32), np.array(code_max, np.float32)
    best_family = np.zeros((nb, n), np.int8)
    best_factor = np.zeros((nb, n), np.int16)
    jit.search(x, scale1, inv, shift, code_min, code_max, factors, np.float32(1) / factors, imp, best_family,
               best_factor)
    s, zp = _winner_scale_zero_point(lo, hi, bits, symmetric, factors, best_family.reshape(nb, 1, n),
                                     best_factor.reshape(nb, 1, n))
    qmin, qmax = _code_range(bits, symmetric)
    new_scale = np.empty((nb, n), np.float32)
    codes = np.empty(blocks.shape, code_dtype)
    zero = np.zeros((nb, n), np.float32) if zp is None else zp.reshape(nb, n)
    jit.refit(x, s.reshape(nb, n), zero, imp, np.float32(qmin), np.float32(qmax), refit, new_scale, codes)
    return new_scale.reshape(nb, 1, n), zp, codes


def _family_scale(family: str, lo: np.ndarray, hi: np.ndarray, bits: int):
    """A range family's unshrunk scale per block, its code shift (asymmetric) and its code range."""
    half = 1 << (bits - 1)
    if family == "sym":
        signed_absmax = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        return (signed_absmax / np.float32(-half)).astype(np.float32), None, np.float32(-half), np.float32(half - 1)
    qmax = np.float32((1 << bits) - 1)
    rmin = np.minimum(lo, np.float32(0))
    s1 = ((np.maximum(hi, np.float32(0)) - rmin) / qmax).astype(np.float32)
    safe = np.where(s1 != 0, s1, np.float32(1))
    shift = np.where(s1 != 0, np.clip(np.rint(-rmin / safe), 0, qmax), np.float32(0)).astype(np.float32)
    return s1, shift, np.float32(0), qmax


def _inverse(s1: np.ndarray) -> np.ndarray:
    inv = np.zeros(s1.size, dtype=np.float32)
    np.divide(np.float32(1), s1, out=inv, where=s1 != 0)
    return inv


def _candidate_error(v, weight, shift, inv_factor, cmin, cmax, t, c, row_sums=None) -> np.ndarray:
    """Per block (column), sum(weight * (v / f - clip(rint(v / f)))^2) in units of the family's scale: the
    search's error of one candidate, written into the work arrays `t` and `c`. `row_sums`, when given, does
    the weighted sum of the squared residuals instead (`weight` is then None)."""
    np.multiply(v, inv_factor, out=t)
    if shift is not None:
        t += shift  # codes in [0, 2**b - 1]; the residual t - c is unchanged by the shift
    np.rint(t, out=c)
    _clip(c, cmin, cmax, out=c)
    t -= c
    t *= t
    if row_sums is not None:
        return row_sums(t)
    if weight is not None:
        t *= weight
    return np.add.reduce(t, axis=0)


def _search_chunk(
    blocks: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    bits: int,
    families: tuple[str, ...],
    weighted: str,
    factors: np.ndarray,
    importance: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Best (family index, factor index) per block of one chunk [rows, B, cols]: int8, int16 [rows, 1, cols].

    With input importance alone as the error weight (one weight per row of a block-row), the chunk stays as it
    is and each candidate's weighted sums over the blocks are one einsum with the rows' importance
    (`_importance_sums`). Otherwise the chunk is
    laid out as [B, rows * cols] (one column per block), so sums over a block run along contiguous rows and the
    blocks still in play can be gathered: without importance a candidate is evaluated only for the blocks
    where it can still win. The exact error of the block's two end elements (its min and max, which shrinking
    clips first) is a lower bound of the block's error, and a block whose bound already reaches its best error
    so far is skipped for that candidate (it could only tie or lose, and ties keep the earlier candidate).
    Skipped blocks never change the result. With importance the bound is not computed: the end elements' rows
    rarely weigh much, and on SmolLM2 it pruned nothing worth its cost.
    """
    rows, bs, cols = blocks.shape
    lo = lo.reshape(-1)
    hi = hi.reshape(-1)
    nblk = lo.size
    row_sums = end_weight = weight = None
    if importance is not None and weighted == "none":
        x = np.ascontiguousarray(blocks, dtype=np.float32)
        per_block = (rows, 1, cols)  # how a per-block array broadcasts against x
        block_sums = _importance_sums(importance)

        def row_sums(t: np.ndarray) -> np.ndarray:  # per block, in the order of lo and hi
            return block_sums(t).reshape(-1)
    else:
        x = np.ascontiguousarray(blocks.transpose(1, 0, 2), dtype=np.float32).reshape(bs, rows * cols)
        per_block = (nblk,)
        weight = _error_weight(x, weighted, 0)
        end_weight = _end_weights(x, weight) if _PRUNE and importance is None else None
        if importance is not None:  # [rows, B, 1] -> [B, rows * cols], the layout of x
            imp = np.repeat(np.ascontiguousarray(importance[:, :, 0].T, dtype=np.float32), cols, axis=1)
            weight = imp if weight is None else weight * imp
    t = np.empty_like(x)
    c = np.empty_like(x)
    best_family = np.zeros(nblk, dtype=np.int8)
    best_factor = np.zeros(nblk, dtype=np.int16)
    inv_factors = np.float32(1) / factors
    best_err = np.full(nblk, np.inf, dtype=np.float32)
    for fi, family in enumerate(families):
        s1, shift, cmin, cmax = _family_scale(family, lo, hi, bits)
        inv = _inverse(s1)
        v = x * inv.reshape(per_block)
        scale2 = np.square(s1[None] * factors[:, None])
        bound = None if end_weight is None else _end_bounds(lo, hi, inv, shift, cmin, cmax, inv_factors, scale2, end_weight)
        for j in range(len(factors)):
            live = None if bound is None else bound[j] < best_err
            count = nblk if live is None else int(np.count_nonzero(live))
            if count == 0:
                continue
            if count < nblk * _COMPACT_BELOW:  # only with a bound, so never with `row_sums`
                idx = np.flatnonzero(live)
                vv, ww = v.take(idx, axis=1), None if weight is None else weight.take(idx, axis=1)
                tt, cc = t[:, :count], c[:, :count]
                sh = None if shift is None else shift[idx]
            else:
                idx, vv, ww, tt, cc = None, v, weight, t, c
                sh = None if shift is None else shift.reshape(per_block)
            err = _candidate_error(vv, ww, sh, inv_factors[j], cmin, cmax, tt, cc, row_sums)
            if idx is None:
                err *= scale2[j]
                better = err < best_err
                np.copyto(best_err, err, where=better)
            else:
                err *= scale2[j, idx]
                better_sub = err < best_err[idx]
                better = idx[better_sub]
                best_err[better] = err[better_sub]
            best_family[better] = fi
            best_factor[better] = j
    return best_family.reshape(rows, 1, cols), best_factor.reshape(rows, 1, cols)


def _end_weights(x: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
    """The error weights [2, nblk] of each block's min and max element (x laid out [B, nblk])."""
    if weight is None:
        return np.ones((2, x.shape[1]), np.float32)
    cols = np.arange(x.shape[1])
    return np.stack([weight[x.argmin(axis=0), cols], weight[x.argmax(axis=0), cols]])


def _end_bounds(lo, hi, inv, shift, cmin, cmax, inv_factors, scale2, end_weight) -> np.ndarray:
    """Lower bounds [nfactors, nblk] of each candidate's block error: the exact errors of the block's two end
    elements, with the same arithmetic as `_candidate_error`, less a margin for float32 sums rounding under it."""
    te = (np.stack([lo, hi]) * inv)[None] * inv_factors[:, None, None]
    if shift is not None:
        te += shift
    re = te - _clip(np.rint(te), cmin, cmax)
    distinct = (lo != hi).astype(np.float32)
    bound = (re[:, 0] ** 2 * end_weight[0] + distinct * re[:, 1] ** 2 * end_weight[1]) * scale2
    return bound * np.float32(1 - 1e-5)
