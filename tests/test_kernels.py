"""Tests of sw_onnx.kernels: loop references, ONNX int4 packing, ONNX Runtime's quantizer and kernels."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from sw_onnx.kernels import (
    mse_factors,
    QuantizedWeight,
    dequantize_blockwise,
    pack_int4_low_first,
    quantize_blockwise,
    quantize_rows_blockwise,
    to_matmulnbits,
    unpack_int4_low_first,
)

try:  # ONNX Runtime's own RTN quantizer (C++), used by MatMulNBitsQuantizer
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits
except ImportError:  # pragma: no cover - depends on the wheel
    quantize_matmul_4bits = quantize_matmul_8bits = None

# Error budget of a round trip, per element: |w - deq| <= |scale| / 2 + EPS_REL * (|w| + |scale|)
# for every element whose code was not saturated (float32 division and product round twice).
EPS_REL = 1e-6

BLOCK_CASES = [  # (K, block_size): multiples, block == K, per-channel, ragged, block > K
    (256, 16),
    (256, 32),
    (256, 64),
    (256, 128),
    (256, 256),
    (256, None),
    (200, 64),
    (200, None),
    (40, 64),
]
FORMATS = [(4, True), (4, False), (8, True), (8, False)]  # (bits, symmetric)


def _weight(k: int, n: int, seed: int = 0) -> np.ndarray:
    """Heavy-tailed float32 [k, n] with a few outliers, like LLM weights."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(df=4, size=(k, n)).astype(np.float32) * np.float32(0.02)
    w[rng.integers(0, k, 3), rng.integers(0, n, 3)] *= np.float32(40)
    return w


# ----------------------------------------------------------------------------------------------
# Reference implementations: explicit loops over blocks and columns, written from the definitions.


def _ref_blocks(k: int, block_size: int | None):
    bs = k if block_size is None else block_size
    return bs, [slice(start, min(start + bs, k)) for start in range(0, k, bs)]


def ref_quantize(w, bits, block_size, symmetric, keep=None, zscore=None):
    """Loop reference: returns (q int64 [K, N], scale float32 [nb, N], zp int64 [nb, N] or None)."""
    k, n = w.shape
    bs, rows = _ref_blocks(k, block_size)
    keep = np.zeros(w.shape, bool) if keep is None else keep
    q = np.zeros((k, n), np.int64)
    scale = np.zeros((len(rows), n), np.float32)
    zp = np.zeros((len(rows), n), np.int64)
    half = 1 << (bits - 1)
    qmin, qmax = (-half, half - 1) if symmetric else (0, (1 << bits) - 1)
    for b, sl in enumerate(rows):
        for j in range(n):
            col = w[sl, j]
            vals = col[~keep[sl, j]]
            if zscore is not None and vals.size:
                mag = np.abs(vals.astype(np.float64))
                limit = mag.mean() + zscore * mag.std()
                vals = np.clip(vals, -limit, limit).astype(np.float32)
            if symmetric:
                amax = np.float32(np.abs(vals).max()) if vals.size else np.float32(0)
                # the element of largest magnitude with its sign; a tie +a/-a picks -a (as ORT)
                m = -amax if np.any(vals == -amax) else amax
                s = np.float32(m) / np.float32(-half)
                z = 0
            else:
                lo = min(np.float32(vals.min()), np.float32(0)) if vals.size else np.float32(0)
                hi = max(np.float32(vals.max()), np.float32(0)) if vals.size else np.float32(0)
                s = np.float32(np.float32(hi - lo) / np.float32(qmax))
                z = 0 if s == 0 else int(np.clip(np.rint(-lo / s), 0, qmax))
            scale[b, j] = s
            zp[b, j] = z
            for i, x in enumerate(col):
                if keep[sl, j][i] or s == 0:
                    q[sl.start + i, j] = z
                else:
                    q[sl.start + i, j] = int(np.clip(np.rint(x / s) + z, qmin, qmax))
    return q, scale, (None if symmetric else zp)


def ref_dequantize(q, scale, zp, block_size):
    k, n = q.shape
    _, rows = _ref_blocks(k, block_size)
    out = np.zeros((k, n), np.float32)
    for b, sl in enumerate(rows):
        for j in range(n):
            z = 0 if zp is None else zp[b, j]
            out[sl, j] = (q[sl, j] - z).astype(np.float32) * scale[b, j]
    return out


def ref_block_errors(w, deq, block_size, weighting, row_weight=None):
    """Sum over each block of (w - deq)^2, weighted by w^2 or not, and by `row_weight` per row: float64 [nb, N]."""
    k, n = w.shape
    _, rows = _ref_blocks(k, block_size)
    row_weight = np.ones(k) if row_weight is None else np.asarray(row_weight, np.float64)
    out = np.zeros((len(rows), n))
    for b, sl in enumerate(rows):
        for j in range(n):
            x = w[sl, j].astype(np.float64)
            e = (x - deq[sl, j]) ** 2 * row_weight[sl]
            out[b, j] = np.sum(e * x * x) if weighting == "w2" else np.sum(e)
    return out


def assert_matches_reference(qw: QuantizedWeight, w, bits, block_size, symmetric, keep=None):
    q, scale, zp = ref_quantize(w, bits, block_size, symmetric, keep=keep)
    np.testing.assert_array_equal(qw.scale, scale)
    if symmetric:
        assert qw.zero_point is None
    else:
        np.testing.assert_array_equal(qw.zero_point, zp)
    np.testing.assert_array_equal(qw.q.astype(np.int64), q)
    np.testing.assert_array_equal(dequantize_blockwise(qw), ref_dequantize(q, scale, zp, block_size))


def assert_round_trip_bound(qw: QuantizedWeight, w, excluded=None):
    """|w - deq| <= |scale|/2 (+eps) for every element whose code did not saturate; returns that mask."""
    k = w.shape[0]
    scale = np.repeat(qw.scale, qw.block_size, axis=0)[:k].astype(np.float64)
    zp = 0 if qw.zero_point is None else np.repeat(qw.zero_point, qw.block_size, axis=0)[:k]
    half = 1 << (qw.bits - 1)
    qmin, qmax = (-half, half - 1) if qw.symmetric else (0, (1 << qw.bits) - 1)
    safe = np.where(scale == 0, 1.0, scale)
    unclipped_code = np.rint(w / safe) + zp
    inside = (unclipped_code >= qmin) & (unclipped_code <= qmax)
    if excluded is not None:
        inside &= ~excluded
    err = np.abs(w.astype(np.float64) - dequantize_blockwise(qw))
    bound = np.abs(scale) / 2 + EPS_REL * (np.abs(w) + np.abs(scale))
    bad = inside & (err > bound)
    assert not bad.any(), f"{bad.sum()} elements beyond |scale|/2, first at {np.argwhere(bad)[0]}"
    return inside


# ----------------------------------------------------------------------------------------------
# Round trip, scales and zero points


@pytest.mark.parametrize(("bits", "symmetric"), FORMATS)
@pytest.mark.parametrize(("k", "block_size"), BLOCK_CASES)
def test_round_trip_within_half_scale_and_equal_to_reference(k, block_size, bits, symmetric):
    w = _weight(k, 12, seed=k + bits)
    qw = quantize_blockwise(w, bits=bits, block_size=block_size, symmetric=symmetric)

    nblocks = -(-k // (k if block_size is None else block_size))
    assert qw.q.shape == (k, 12) and qw.scale.shape == (nblocks, 12) and qw.scale.dtype == np.float32
    assert qw.q.dtype == (np.int8 if symmetric else np.uint8)
    inside = assert_round_trip_bound(qw, w)
    # Only saturation of the full symmetric range (+2**(b-1) -> 2**(b-1) - 1) or an exact tie at the
    # top of the asymmetric range may leave the bound, and never by more than one step.
    err = np.abs(w - dequantize_blockwise(qw))
    k_scale = np.abs(np.repeat(qw.scale, qw.block_size, axis=0)[:k])
    assert np.all(err[~inside] <= k_scale[~inside] * (1 + EPS_REL))
    if not symmetric:
        assert inside.mean() > 0.999
    assert_matches_reference(qw, w, bits, block_size, symmetric)


@pytest.mark.parametrize(("bits", "symmetric"), FORMATS)
@pytest.mark.parametrize(("h", "block_size"), [(64, 16), (64, 32), (70, 32), (20, 64)])
def test_table_rows_quantize_as_the_reference_of_their_transpose(bits, symmetric, h, block_size, monkeypatch):
    """`quantize_rows_blockwise` (GatherBlockQuantized's layout: each row's blocks along H) equals the loop
    reference on the transposed table, codes offset to unsigned when symmetric, in every row chunking."""
    import sw_onnx.kernels as kernels

    monkeypatch.setattr(kernels, "_PART_SIZE", 7 * 64)  # several row chunks, one ragged
    table = _weight(h, 50, seed=3).T.copy()  # [V=50, H]
    table[4] = 0.0  # an all-zero row: scale 0, codes at the zero point
    codes, scale, zp = quantize_rows_blockwise(table, bits=bits, block_size=block_size, symmetric=symmetric)
    q, ref_scale, ref_zp = ref_quantize(table.T, bits, block_size, symmetric)
    offset = (1 << (bits - 1)) if symmetric else 0
    assert codes.dtype == np.uint8 and codes.shape == table.shape
    np.testing.assert_array_equal(codes.astype(np.int64), q.T + offset)
    np.testing.assert_array_equal(scale, ref_scale.T)
    if symmetric:
        assert zp is None
    else:
        np.testing.assert_array_equal(zp.astype(np.int64), ref_zp.T)
    table[7, 3] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_rows_blockwise(table, bits=bits, block_size=block_size, symmetric=symmetric)


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_uses_full_range_largest_magnitude_maps_to_most_negative_code(bits):
    w = np.zeros((32, 3), np.float32)
    w[:, 0] = np.linspace(-1.0, 2.0, 32)  # largest magnitude positive -> negative scale
    w[:, 1] = np.linspace(-2.0, 1.0, 32)  # largest magnitude negative -> positive scale
    w[:, 2] = np.linspace(-2.0, 2.0, 32)  # tie +2/-2 -> ORT takes the negative one
    qw = quantize_blockwise(w, bits=bits, block_size=32, symmetric=True)
    half = 1 << (bits - 1)
    np.testing.assert_array_equal(qw.scale[0], np.float32([2.0 / -half, 2.0 / half, 2.0 / half]))
    assert qw.q[31, 0] == -half and qw.q[0, 1] == -half and qw.q[0, 2] == -half
    assert qw.q[31, 2] == half - 1  # +2 saturates at the top code
    deq = dequantize_blockwise(qw)
    assert deq[31, 0] == 2.0 and deq[0, 1] == -2.0


@pytest.mark.parametrize(("bits", "symmetric"), FORMATS)
def test_all_zero_block_gets_scale_zero_and_dequantizes_to_zero(bits, symmetric):
    w = _weight(96, 4, seed=3)
    w[32:64, 1] = 0.0  # one block of one column
    w[:, 3] = 0.0  # a whole column
    with np.errstate(all="raise"):
        qw = quantize_blockwise(w, bits=bits, block_size=32, symmetric=symmetric)
        deq = dequantize_blockwise(qw)
    assert qw.scale[1, 1] == 0 and np.all(qw.scale[:, 3] == 0)
    assert np.all(deq[32:64, 1] == 0) and np.all(deq[:, 3] == 0)
    assert np.isfinite(deq).all()
    if not symmetric:
        assert qw.zero_point[1, 1] == 0 and np.all(qw.zero_point[:, 3] == 0)  # as ORT writes
    assert_matches_reference(qw, w, bits, 32, symmetric)


def test_rounding_is_half_to_even_as_onnx_quantizelinear():
    # Block range [-4, 11]: scale exactly 1, zero point 4; the ties go to the even integer.
    w = np.float32([-4.0, 11.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5])[:, None]
    qw = quantize_blockwise(w, bits=4, block_size=8)
    assert qw.scale[0, 0] == 1.0 and qw.zero_point[0, 0] == 4
    np.testing.assert_array_equal(qw.q[:, 0], [0, 15, 4, 6, 6, 4, 2, 2])


def test_asymmetric_range_always_includes_zero():
    w = np.concatenate([np.linspace(0.5, 2.0, 16), np.linspace(-3.0, -1.0, 16)]).astype(np.float32)[:, None]
    qw = quantize_blockwise(w, bits=4, block_size=16)
    np.testing.assert_array_equal(qw.scale[:, 0], np.float32([2.0 / 15, 3.0 / 15]))
    np.testing.assert_array_equal(qw.zero_point[:, 0], [0, 15])


# ----------------------------------------------------------------------------------------------
# Same numbers as ONNX Runtime's RTN quantizer


@pytest.mark.skipif(quantize_matmul_4bits is None, reason="onnxruntime lacks quantize_matmul_4bits")
@pytest.mark.parametrize(("bits", "symmetric"), FORMATS)
@pytest.mark.parametrize(("k", "block_size"), [(256, 16), (256, 128), (200, 64), (201, 32), (40, 64)])
def test_equals_onnxruntime_rtn_quantizer_byte_for_byte(k, block_size, bits, symmetric):
    n = 10
    w = _weight(k, n, seed=7)
    nblocks = -(-k // block_size)
    per_byte = 8 // bits
    packed = np.zeros((n, nblocks, block_size // per_byte), np.uint8)
    scales = np.zeros((n, nblocks), np.float32)
    zps = np.zeros((n, -(-nblocks // per_byte)), np.uint8)
    padded = np.pad(w, ((0, nblocks * block_size - k), (0, 0)))
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, padded, scales, zps, block_size, n, k, symmetric)

    b, s, z = to_matmulnbits(quantize_blockwise(w, bits=bits, block_size=block_size, symmetric=symmetric))
    np.testing.assert_array_equal(s, scales)
    if symmetric:
        assert z is None
    else:
        np.testing.assert_array_equal(z, zps)
    if bits == 4 and k % 2:  # ORT leaves unspecified data in the unused high nibble of the last byte
        last = ((k - 1) % block_size) // 2
        b, packed = b.copy(), packed.copy()
        b[:, -1, last] &= 0x0F
        packed[:, -1, last] &= 0x0F
    np.testing.assert_array_equal(b, packed)


# ----------------------------------------------------------------------------------------------
# Keep-out


@pytest.mark.parametrize(("bits", "symmetric"), FORMATS)
@pytest.mark.parametrize("block_size", [32, None])
def test_kept_out_weight_dequantizes_to_zero_and_leaves_the_scale_alone(bits, symmetric, block_size):
    w = _weight(128, 6, seed=11)
    k0, n0 = 40, 2
    bs = 128 if block_size is None else block_size
    block = slice(k0 // bs * bs, k0 // bs * bs + bs)
    neighbours = np.delete(w[block, n0], k0 - block.start)
    w_planted = w.copy()
    w_planted[k0, n0] = -250.0  # a super weight: would dominate its block
    w_median = w.copy()
    w_median[k0, n0] = np.median(neighbours)  # inside the range: cannot move it

    as_coords = quantize_blockwise(
        w_planted, bits=bits, block_size=block_size, symmetric=symmetric, keep_out=[(k0, n0)]
    )
    mask = np.zeros(w.shape, bool)
    mask[k0, n0] = True
    as_mask = quantize_blockwise(w_planted, bits=bits, block_size=block_size, symmetric=symmetric, keep_out=mask)
    baseline = quantize_blockwise(w_median, bits=bits, block_size=block_size, symmetric=symmetric)

    for qw in (as_coords, as_mask):
        np.testing.assert_array_equal(qw.scale, baseline.scale)
        if not symmetric:
            np.testing.assert_array_equal(qw.zero_point, baseline.zero_point)
        deq = dequantize_blockwise(qw)
        assert deq[k0, n0] == 0.0
        others = np.ones(w.shape, bool)
        others[k0, n0] = False
        np.testing.assert_array_equal(qw.q[others], baseline.q[others])
        assert_matches_reference(qw, w_planted, bits, block_size, symmetric, keep=mask)
    # Without the keep-out, the planted weight takes over its block's scale.
    plain = quantize_blockwise(w_planted, bits=bits, block_size=block_size, symmetric=symmetric)
    assert abs(plain.scale[k0 // bs, n0]) > 10 * abs(baseline.scale[k0 // bs, n0])


def test_keep_out_of_a_whole_block_column_gives_scale_zero():
    w = _weight(64, 3, seed=5)
    keep = np.zeros(w.shape, bool)
    keep[:32, 1] = True
    qw = quantize_blockwise(w, bits=4, block_size=32, keep_out=keep)
    assert qw.scale[0, 1] == 0 and np.all(dequantize_blockwise(qw)[:32, 1] == 0)
    assert_matches_reference(qw, w, 4, 32, False, keep=keep)


def test_empty_keep_out_is_a_no_op():
    w = _weight(64, 3)
    plain = quantize_blockwise(w, block_size=32)
    for empty in ([], np.zeros((0, 2), np.int64), np.zeros(w.shape, bool)):
        qw = quantize_blockwise(w, block_size=32, keep_out=empty)
        np.testing.assert_array_equal(qw.q, plain.q)
        np.testing.assert_array_equal(qw.scale, plain.scale)


# ----------------------------------------------------------------------------------------------
# Clipping


@pytest.mark.parametrize(("bits", "symmetric"), FORMATS)
def test_zscore_clamps_the_range_only_beyond_the_threshold(bits, symmetric):
    w = _weight(200, 8, seed=13)  # ragged last block too
    w[5, 0] = 3.0  # an outlier far beyond mean + 3 std of its block
    w[70, 1] = -3.0
    z = 3.0
    qw = quantize_blockwise(w, bits=bits, block_size=64, symmetric=symmetric, clip="zscore", zscore=z)
    _, ref_scale, ref_zp = ref_quantize(w, bits, 64, symmetric, zscore=z)
    np.testing.assert_allclose(qw.scale, ref_scale, rtol=1e-5)
    if not symmetric:
        assert np.abs(qw.zero_point.astype(int) - ref_zp).max() <= 1
    plain = quantize_blockwise(w, bits=bits, block_size=64, symmetric=symmetric)
    assert abs(qw.scale[0, 0]) < abs(plain.scale[0, 0]) / 2  # outlier no longer sets the range
    assert abs(qw.scale[1, 1]) < abs(plain.scale[1, 1]) / 2
    # Weights within the threshold stay within half a step; the outliers saturate.
    inside = assert_round_trip_bound(qw, w)
    assert not inside[5, 0] and not inside[70, 1]

    # A threshold above every |w|: no clamping at all, bit-identical to plain RTN.
    loose = quantize_blockwise(w, bits=bits, block_size=64, symmetric=symmetric, clip="zscore", zscore=1e6)
    np.testing.assert_array_equal(loose.scale, plain.scale)
    np.testing.assert_array_equal(loose.q, plain.q)


def test_zscore_statistics_ignore_kept_out_weights_and_padding():
    w = _weight(100, 5, seed=17)  # ragged: blocks of 32, last block has 4 rows
    keep = np.zeros(w.shape, bool)
    keep[3, 0] = keep[98, 4] = True
    w[3, 0] = 50.0
    qw = quantize_blockwise(w, bits=4, block_size=32, clip="zscore", zscore=2.0, keep_out=keep)
    _, ref_scale, _ = ref_quantize(w, 4, 32, False, keep=keep, zscore=2.0)
    np.testing.assert_allclose(qw.scale, ref_scale, rtol=1e-5)
    assert dequantize_blockwise(qw)[3, 0] == 0.0


def ref_mse_search(w, bits, block_size, symmetric, weighting="w2", keep=None, importance=None):
    """Loop reference of clip="mse": the least weighted error over every candidate (family, factor), float64.

    Candidates: for asymmetric, the min-max range (forced to include 0) and the symmetric range (signed
    element of largest magnitude -> the end code), each shrunk by every factor of `mse_factors`; for
    symmetric, the symmetric range only. Each row's error is multiplied by its `importance` (default 1).
    Returns the best error per block, float64 [nb, N].
    """
    k, n = w.shape
    _, rows = _ref_blocks(k, block_size)
    keep = np.zeros(w.shape, bool) if keep is None else keep
    importance = np.ones(k) if importance is None else np.asarray(importance, np.float64)
    half, levels = 1 << (bits - 1), (1 << bits) - 1
    best = np.full((len(rows), n), np.inf)
    for b, sl in enumerate(rows):
        for j in range(n):
            x = w[sl, j][~keep[sl, j]].astype(np.float64)
            if x.size == 0:
                best[b, j] = 0.0
                continue
            p = (x * x if weighting == "w2" else np.ones_like(x)) * importance[sl][~keep[sl, j]]
            lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
            m = x.min() if abs(x.min()) >= abs(x.max()) else x.max()
            for f in mse_factors().astype(np.float64):
                candidates = []
                if not symmetric and hi > lo:
                    s = (hi - lo) * f / levels
                    z = np.clip(np.rint(-lo / (hi - lo) * levels), 0, levels)
                    candidates.append((s, z, 0, levels))
                if m != 0:
                    candidates.append((m * f / -half, 0, -half, half - 1))
                for s, z, qmin, qmax in candidates:
                    deq = (np.clip(np.rint(x / s) + z, qmin, qmax) - z) * s
                    best[b, j] = min(best[b, j], float(np.sum(p * (x - deq) ** 2)))
            if not np.isfinite(best[b, j]):
                best[b, j] = 0.0  # an all-zero block
    return best


@pytest.mark.parametrize(("bits", "symmetric"), FORMATS)
@pytest.mark.parametrize(("k", "block_size"), [(256, 32), (256, 128), (200, 64), (96, 128), (96, None)])
@pytest.mark.parametrize("weighting", ["w2", "none"])
@pytest.mark.parametrize("with_importance", [False, True])
def test_mse_search_finds_the_reference_optimum(k, block_size, bits, symmetric, weighting, with_importance):
    """The search's pick is the reference optimum, also with input importance (its own code path when the
    importance is the only error weight: block sums by einsum in the blocks' layout)."""
    w = _weight(k, 12, seed=19)
    w[:32, 3] = 0.0  # an all-zero block
    keep = np.zeros(w.shape, bool)
    keep[5, 1] = keep[70 % k, 7] = True
    importance = np.exp(np.random.default_rng(5).standard_normal(k) * 2) if with_importance else None
    qw = quantize_blockwise(w, bits=bits, block_size=block_size, symmetric=symmetric, clip="mse",
                            weighting=weighting, keep_out=keep, importance=importance)
    got = ref_block_errors(np.where(keep, 0, w), np.where(keep, 0, dequantize_blockwise(qw)), block_size, weighting,
                           row_weight=importance)
    best = ref_mse_search(w, bits, block_size, symmetric, weighting, keep, importance)
    # float32 error sums in the kernel: near-ties may go either way, by a few 1e-5 of the error at most (a few
    # 1e-4 with importance spanning e^+-6 on top of w^2 at int8, where candidates differ least)
    np.testing.assert_array_less(got, best * (1 + (1e-3 if with_importance else 2e-4)) + 1e-30)
    assert np.all(dequantize_blockwise(qw)[keep] == 0)
    assert_round_trip_bound(qw, w, excluded=keep)
    if not symmetric:
        assert np.all(qw.scale >= 0)  # symmetric-family winners are stored with a positive scale


@pytest.mark.parametrize(("bits", "symmetric", "block_size"), [(4, False, 64), (4, True, 32), (8, False, None)])
def test_mse_search_does_not_depend_on_threads_chunking_or_pruning(monkeypatch, bits, symmetric, block_size):
    """The search skips candidates a lower bound rules out, gathers the blocks still in play, splits the
    weight into chunks and may run them on threads: none of it may change a single code."""
    import sw_onnx.kernels as kernels

    w = _weight(512, 200, seed=21)
    w[:, 7] *= 50  # columns of very different scales
    w[100:164, 3] = 0.0
    results = []
    for threads, chunk, prune, compact in ((1, 1 << 18, False, 0.0), (1, 1 << 18, True, 0.3), (2, 1 << 15, True, 0.3),
                                           (3, 1 << 10, True, 1.1), (1, 1 << 20, True, 0.0)):
        monkeypatch.setattr(kernels, "SEARCH_THREADS", threads)
        monkeypatch.setattr(kernels, "_SEARCH_CHUNK", chunk)
        monkeypatch.setattr(kernels, "_PRUNE", prune)
        monkeypatch.setattr(kernels, "_COMPACT_BELOW", compact)
        results.append(quantize_blockwise(w, bits=bits, block_size=block_size, symmetric=symmetric, clip="mse"))
    for qw in results[1:]:
        np.testing.assert_array_equal(qw.q, results[0].q)
        np.testing.assert_array_equal(qw.scale, results[0].scale)
        if not symmetric:
            np.testing.assert_array_equal(qw.zero_point, results[0].zero_point)


@pytest.mark.parametrize(("bits", "symmetric"), FORMATS)
@pytest.mark.parametrize("block_size", [32, 128])
def test_mse_search_never_loses_on_its_own_metric(bits, symmetric, block_size):
    w = _weight(256, 16, seed=19)
    rtn = quantize_blockwise(w, bits=bits, block_size=block_size, symmetric=symmetric)
    w2 = quantize_blockwise(w, bits=bits, block_size=block_size, symmetric=symmetric, clip="mse", weighting="w2")
    flat = quantize_blockwise(w, bits=bits, block_size=block_size, symmetric=symmetric, clip="mse", weighting="none")
    deq = {name: dequantize_blockwise(qw) for name, qw in [("rtn", rtn), ("w2", w2), ("flat", flat)]}
    err_w2 = {name: ref_block_errors(w, d, block_size, "w2") for name, d in deq.items()}
    err_flat = {name: ref_block_errors(w, d, block_size, "none") for name, d in deq.items()}
    slack = 2e-4  # float32 error sums in the kernel
    for other in ("rtn", "flat"):
        assert np.all(err_w2["w2"] <= err_w2[other] * (1 + slack) + 1e-30)
    for other in ("rtn", "w2"):
        assert np.all(err_flat["flat"] <= err_flat[other] * (1 + slack) + 1e-30)
    if bits == 4:  # the search does something (at 8 bits a 2.5% shrink step costs more than it saves)
        assert np.sum(err_w2["w2"]) < np.sum(err_w2["rtn"])
        assert np.sum(err_flat["flat"]) < np.sum(err_flat["rtn"])
    # Each chosen scale is a grid factor times the unshrunk scale of the symmetric range or (asymmetric
    # only) of the min-max range.
    grid = mse_factors().astype(np.float64)
    sym_rtn = np.abs(quantize_blockwise(w, bits=bits, block_size=block_size, symmetric=True).scale)
    families = [sym_rtn] if symmetric else [sym_rtn, np.abs(rtn.scale)]
    for qw in (w2, flat):
        ratio = np.stack([np.abs(qw.scale) / base for base in families])
        assert np.all(np.min(np.abs(ratio[..., None] - grid), axis=(0, -1)) < 1e-5)
    assert_round_trip_bound(w2, w)
    assert_round_trip_bound(flat, w)
    if not symmetric and bits == 4:  # the search does use both range families
        is_sym = np.isclose(np.abs(w2.scale) / sym_rtn, grid[:, None, None]).any(axis=0)
        is_sym &= np.isin(w2.zero_point, (7, 8))
        assert 0 < is_sym.mean() < 1


def test_mse_w2_protects_the_largest_weight_more_than_plain_squared_error():
    w = _weight(128, 32, seed=23)
    kwargs = dict(bits=4, block_size=128, clip="mse")
    w2 = dequantize_blockwise(quantize_blockwise(w, weighting="w2", **kwargs))
    flat = dequantize_blockwise(quantize_blockwise(w, weighting="none", **kwargs))
    top = np.argmax(np.abs(w), axis=0)
    cols = np.arange(w.shape[1])
    assert np.abs(w - w2)[top, cols].mean() < np.abs(w - flat)[top, cols].mean()


# ----------------------------------------------------------------------------------------------
# int4 packing


@pytest.mark.parametrize("shape", [(1,), (7,), (16,), (5, 3), (4, 6), (33, 2)])
@pytest.mark.parametrize("signed", [True, False])
def test_int4_packing_matches_onnx_raw_data(shape, signed):
    rng = np.random.default_rng(sum(shape))
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = rng.integers(lo, hi, size=shape).astype(np.int8 if signed else np.uint8)
    ml_type = ml_dtypes.int4 if signed else ml_dtypes.uint4
    expected = numpy_helper.from_array(codes.astype(ml_type)).raw_data
    packed = pack_int4_low_first(codes)
    assert packed.dtype == np.uint8 and packed.size == -(-codes.size // 2)
    assert packed.tobytes() == expected
    unpacked = unpack_int4_low_first(packed, codes.size, signed=signed)
    assert unpacked.dtype == (np.int8 if signed else np.uint8)
    np.testing.assert_array_equal(unpacked, codes.reshape(-1))


def test_pack_int4_rejects_out_of_range_and_float():
    with pytest.raises(ValueError):
        pack_int4_low_first(np.array([16]))
    with pytest.raises(ValueError):
        pack_int4_low_first(np.array([-9]))
    with pytest.raises(ValueError):
        pack_int4_low_first(np.array([1.0]))
    with pytest.raises(ValueError):
        unpack_int4_low_first(np.zeros(2, np.uint8), 5, signed=True)


# ----------------------------------------------------------------------------------------------
# Through ONNX Runtime: MatMulNBits and blocked DequantizeLinear


def _session(nodes, inputs, outputs, initializers):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run_matmulnbits(qw: QuantizedWeight, x: np.ndarray, arrays=None) -> np.ndarray:
    k, n = qw.shape
    b, scales, zps = to_matmulnbits(qw) if arrays is None else arrays
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales")]
    names = ["A", "B", "scales"]
    if zps is not None:
        inits.append(numpy_helper.from_array(zps, "zero_points"))
        names.append("zero_points")
    node = helper.make_node(
        "MatMulNBits", names, ["Y"], domain="com.microsoft",
        K=k, N=n, bits=qw.bits, block_size=qw.block_size, accuracy_level=1,  # fp32 compute
    )
    sess = _session(
        [node],
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
        inits,
    )
    return sess.run(None, {"A": x})[0]


@pytest.mark.parametrize(("bits", "symmetric"), FORMATS)
@pytest.mark.parametrize(("k", "block_size"), [(256, 16), (256, 32), (256, 128), (200, 32), (201, 64), (100, 128)])
def test_matmulnbits_in_onnxruntime_equals_x_times_dequantized(k, block_size, bits, symmetric):
    n = 24
    w = _weight(k, n, seed=29)
    x = np.random.default_rng(31).standard_normal((3, k)).astype(np.float32)
    qw = quantize_blockwise(w, bits=bits, block_size=block_size, symmetric=symmetric)
    expected = x @ dequantize_blockwise(qw)
    got = _run_matmulnbits(qw, x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_matmulnbits_ignores_the_padding_of_a_ragged_last_block():
    k, n = 200, 8  # last block of 64 holds 8 rows
    w = _weight(k, n, seed=37)
    x = np.random.default_rng(41).standard_normal((2, k)).astype(np.float32)
    qw = quantize_blockwise(w, bits=4, block_size=64)
    b, scales, zps = to_matmulnbits(qw)
    garbage = b.copy()
    garbage[:, -1, 4:] = 0xFF  # bytes past the 8 real rows
    np.testing.assert_array_equal(_run_matmulnbits(qw, x, (garbage, scales, zps)), _run_matmulnbits(qw, x))


def test_to_matmulnbits_layout_and_rejections():
    w = _weight(96, 5, seed=43)
    qw = quantize_blockwise(w, bits=4, block_size=32, symmetric=False)
    b, scales, zps = to_matmulnbits(qw)
    assert b.shape == (5, 3, 16) and scales.shape == (5, 3) and zps.shape == (5, 2)
    # column 1, block 2: codes along K, low nibble first, from q[64:96, 1]
    np.testing.assert_array_equal(unpack_int4_low_first(b[1, 2], 32, signed=False), qw.q[64:96, 1])
    np.testing.assert_array_equal(unpack_int4_low_first(zps[1], 3, signed=False), qw.zero_point[:, 1])
    assert zps[1, 1] >> 4 == 8  # odd block count: the unused nibble is 8, as ORT writes
    sym = quantize_blockwise(w, bits=8, block_size=32, symmetric=True)
    b8, _, none = to_matmulnbits(sym)
    assert none is None and b8.shape == (5, 3, 32)
    np.testing.assert_array_equal(b8[0, 0].astype(int) - 128, sym.q[:32, 0])  # default zero point 128
    with pytest.raises(ValueError, match="power of two"):
        to_matmulnbits(quantize_blockwise(w, block_size=None))  # per-channel, K = 96
    with pytest.raises(ValueError, match="power of two"):
        to_matmulnbits(quantize_blockwise(w, block_size=8))
    # Per-channel through a power-of-two block >= K: same quantization, MatMulNBits-ready.
    per_channel = quantize_blockwise(w, block_size=None)
    as_block = quantize_blockwise(w, block_size=128)
    np.testing.assert_array_equal(per_channel.q, as_block.q)
    np.testing.assert_array_equal(per_channel.scale, as_block.scale)
    assert to_matmulnbits(as_block)[0].shape == (5, 1, 64)


@pytest.mark.parametrize(("bits", "symmetric"), FORMATS)
@pytest.mark.parametrize(("k", "block_size"), [(256, 32), (200, 64), (40, 64)])
def test_blocked_dequantizelinear_in_onnxruntime_equals_dequantize_blockwise(k, block_size, bits, symmetric):
    n = 6
    w = _weight(k, n, seed=47)
    qw = quantize_blockwise(w, bits=bits, block_size=block_size, symmetric=symmetric)
    onnx_type = {(4, True): ml_dtypes.int4, (4, False): ml_dtypes.uint4, (8, True): np.int8, (8, False): np.uint8}
    dtype = onnx_type[(bits, symmetric)]
    inits = [numpy_helper.from_array(qw.q.astype(dtype), "q"), numpy_helper.from_array(qw.scale, "scale")]
    names = ["q", "scale"]
    if not symmetric:
        inits.append(numpy_helper.from_array(qw.zero_point.astype(dtype), "zp"))
        names.append("zp")
    node = helper.make_node("DequantizeLinear", names, ["Y"], axis=0, block_size=block_size)
    sess = _session([node], [], [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [k, n])], inits)
    np.testing.assert_array_equal(sess.run(None, {})[0], dequantize_blockwise(qw))


# ----------------------------------------------------------------------------------------------
# Argument checks


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=3),
        dict(block_size=0),
        dict(clip="percentile"),
        dict(zscore=3.0),  # without clip="zscore"
        dict(weighting="w2"),  # without clip="mse"
        dict(clip="mse", weighting="abs"),
        dict(clip="mse", mse_grid=0),
        dict(keep_out=[(64, 0)]),  # out of bounds
        dict(keep_out=np.zeros((3, 3), bool)),  # wrong mask shape
    ],
)
def test_bad_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        quantize_blockwise(_weight(64, 4), **kwargs)


def test_non_finite_or_non_2d_weight_raises_value_error():
    w = _weight(32, 2)
    w[0, 0] = np.nan
    for bad in (w, np.zeros(5, np.float32), np.zeros((0, 4), np.float32)):
        with pytest.raises(ValueError):
            quantize_blockwise(bad)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("clip", ["none", "zscore", "mse"])
@pytest.mark.parametrize("where", [(0, 0), (69, 4), (33, 2)])  # first element, the ragged tail, a kept-out weight
def test_every_non_finite_weight_is_refused_whatever_the_clip_or_keep_out(value, clip, where):
    """Finiteness is read from each block's min and max (and the kept-out weights themselves): a NaN or an
    infinity anywhere, also in a ragged last block or at a kept-out coordinate, is refused."""
    w = _weight(70, 6)
    w[where] = value
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_blockwise(w, bits=4, block_size=32, clip=clip, keep_out=[(33, 2)])


# ----------------------------------------------------------------------------------------------
# Property test


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    k=st.integers(16, 300),
    n=st.integers(1, 40),
    bits=st.sampled_from([4, 8]),
    block_size=st.sampled_from([16, 32, 64, 128, None]),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    magnitude=st.sampled_from([1e-6, 0.02, 1.0, 300.0]),
    with_keep_out=st.booleans(),
)
def test_property_round_trip_reference_and_packing(k, n, bits, block_size, symmetric, seed, magnitude, with_keep_out):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(df=3, size=(k, n)) * magnitude).astype(np.float32)
    if rng.random() < 0.3:
        w[: min(k, 16), rng.integers(0, n)] = 0.0  # an all-zero block
    keep = None
    if with_keep_out:
        keep = np.zeros(w.shape, bool)
        keep[rng.integers(0, k, 2), rng.integers(0, n, 2)] = True
    qw = quantize_blockwise(w, bits=bits, block_size=block_size, symmetric=symmetric, keep_out=keep)

    deq = dequantize_blockwise(qw)
    assert deq.dtype == np.float32 and deq.shape == (k, n) and np.isfinite(deq).all()
    assert_round_trip_bound(qw, w, excluded=keep)
    if keep is not None:
        assert np.all(deq[keep] == 0)
    assert_matches_reference(qw, w, bits, block_size, symmetric, keep=keep)

    if bits == 4:
        packed = pack_int4_low_first(qw.q)
        np.testing.assert_array_equal(unpack_int4_low_first(packed, qw.q.size, signed=symmetric), qw.q.ravel())
        if block_size is not None:
            b, _, zps = to_matmulnbits(qw)
            block = slice(0, min(block_size, k))
            column = unpack_int4_low_first(b[n - 1, 0], min(block_size, k), signed=False).astype(int)
            np.testing.assert_array_equal(column - (8 if symmetric else 0), qw.q[block, n - 1])


@pytest.mark.parametrize("clip", ["none", "zscore", "mse"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_parts_give_the_whole_matrix_result(clip, symmetric, monkeypatch):
    """Weights are quantized in parts of whole blocks (bounded temporaries): rows of blocks, or columns of one
    row of blocks when a row is too wide. Codes, scales and zero points must equal those of one pass over the
    whole matrix, keep-out and a ragged last block and part included."""
    import sw_onnx.kernels as kernels

    rng = np.random.default_rng(3)
    w = (rng.standard_t(df=3, size=(70, 53)) * 0.02).astype(np.float32)
    keep = [(5, 0), (69, 52), (33, 17)]
    whole = quantize_blockwise(w, bits=4, block_size=32, symmetric=symmetric, clip=clip, keep_out=keep)
    # 15 columns of one row of blocks per part; then 2 rows of blocks (all columns) per part, the last ragged
    for part in (32 * 15, 32 * 53 * 2):
        monkeypatch.setattr(kernels, "_PART_SIZE", part)
        sliced = quantize_blockwise(w, bits=4, block_size=32, symmetric=symmetric, clip=clip, keep_out=keep)
        np.testing.assert_array_equal(sliced.q, whole.q)
        np.testing.assert_array_equal(sliced.scale, whole.scale)
        if symmetric:
            assert sliced.zero_point is None and whole.zero_point is None
        else:
            np.testing.assert_array_equal(sliced.zero_point, whole.zero_point)
    assert sliced.q.dtype == whole.q.dtype and sliced.scale.dtype == np.float32


# ---------------------------------------------------------------------------------------------
# Input importance (activation-aware range search)


def _weighted_error(w, qw, importance, weight_squares: bool) -> float:
    e = np.square(w - dequantize_blockwise(qw), dtype=np.float64)
    if weight_squares:
        e *= np.square(w, dtype=np.float64)
    return float((importance[:, None] * e).sum())


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block_size", [32, 128])
def test_importance_lowers_the_importance_weighted_error(symmetric, block_size):
    """Ground truth: the search minimises sum(importance_k * weight * err^2), so with the importance its
    weighted error is at most the one of the search without it, and strictly lower on a skewed importance."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((256, 96)) * 0.05).astype(np.float32)
    importance = np.exp(rng.standard_normal(256) * 2)
    for weighting, squares in (("w2", True), ("none", False)):
        plain = quantize_blockwise(w, block_size=block_size, symmetric=symmetric, clip="mse", weighting=weighting)
        aware = quantize_blockwise(w, block_size=block_size, symmetric=symmetric, clip="mse", weighting=weighting,
                                   importance=importance)
        e_plain = _weighted_error(w, plain, importance, squares)
        e_aware = _weighted_error(w, aware, importance, squares)
        assert e_aware < e_plain * 0.995
        # per block too: no block got worse under its own criterion (exact search, float32 ties aside)
        nb = -(-256 // block_size)
        d_aware = np.square(w - dequantize_blockwise(aware), dtype=np.float64)
        d_plain = np.square(w - dequantize_blockwise(plain), dtype=np.float64)
        wt = importance[:, None] * (np.square(w, dtype=np.float64) if squares else 1.0)
        for b in range(nb):
            rows = slice(b * block_size, (b + 1) * block_size)
            assert ((wt * d_aware)[rows].sum(axis=0) <= (wt * d_plain)[rows].sum(axis=0) * (1 + 1e-4) + 1e-12).all()


@pytest.mark.parametrize("weighting", ["w2", "rms", "none"])
def test_uniform_importance_changes_nothing_and_pruning_stays_exact(monkeypatch, weighting):
    import sw_onnx.kernels as kernels

    rng = np.random.default_rng(2)
    w = (rng.standard_normal((200, 64)) * 0.1).astype(np.float32)
    base = quantize_blockwise(w, block_size=64, clip="mse", weighting=weighting)
    same = quantize_blockwise(w, block_size=64, clip="mse", weighting=weighting, importance=np.full(200, 3.0))
    assert np.array_equal(base.q, same.q) and np.array_equal(base.scale, same.scale)
    importance = rng.random(200) ** 4
    keep = [(3, 5), (150, 7)]
    pruned = quantize_blockwise(w, block_size=64, clip="mse", weighting=weighting, importance=importance, keep_out=keep)
    monkeypatch.setattr(kernels, "_PRUNE", False)
    full = quantize_blockwise(w, block_size=64, clip="mse", weighting=weighting, importance=importance, keep_out=keep)
    assert np.array_equal(pruned.q, full.q) and np.array_equal(pruned.scale, full.scale)


@pytest.mark.parametrize("kwargs", [
    {"clip": "none", "importance": np.ones(8)},
    {"clip": "mse", "importance": np.ones(7)},
    {"clip": "mse", "importance": -np.ones(8)},
    {"clip": "mse", "importance": np.full(8, np.nan)},
])
def test_bad_importance_raises(kwargs):
    with pytest.raises(ValueError, match="importance"):
        quantize_blockwise(np.ones((8, 4), np.float32), block_size=8, **kwargs)


# ---------------------------------------------------------------------------------------------
# GPTQ


def _calibration(k=128, tokens=1024, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * 0.2 + np.eye(k)
    x = (rng.standard_normal((tokens, k)) @ mix).astype(np.float32)
    w = (rng.standard_normal((k, 48)) * 0.05).astype(np.float32)
    return x, w


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("clip", ["none", "mse"])
def test_gptq_lowers_the_output_error_it_minimises(symmetric, clip):
    """Ground truth: GPTQ minimises ||X (W - Q)||^2 on its calibration inputs; with many more tokens than
    channels it beats plain rounding there by a wide margin, and on fresh inputs from the same distribution."""
    from sw_onnx.kernels import quantize_gptq

    x, w = _calibration()
    fresh, _ = _calibration(seed=0, tokens=2048)
    fresh = fresh[1024:]
    h = x.T.astype(np.float64) @ x
    plain = dequantize_blockwise(quantize_blockwise(w, block_size=32, symmetric=symmetric, clip=clip))
    gptq = dequantize_blockwise(quantize_gptq(w, h, block_size=32, symmetric=symmetric, clip=clip))
    for inputs in (x, fresh):
        assert np.square(inputs @ (w - gptq)).sum() < 0.8 * np.square(inputs @ (w - plain)).sum()


def test_gptq_keeps_kept_out_weights_exact_and_dead_channels_alone():
    from sw_onnx.kernels import quantize_gptq

    x, w = _calibration()
    x[:, 7] = 0.0  # a channel that never carries input
    h = x.T.astype(np.float64) @ x
    keep = [(3, 5), (100, 1)]
    qw = quantize_gptq(w, h, block_size=32, keep_out=keep)
    deq = dequantize_blockwise(qw)
    for k, n in keep:
        assert deq[k, n] == 0.0  # its code is the zero point; the exact value returns on the side path
    # channel 7 carries no input: no error is pushed into its row, which is its own rounding at the block's scale
    s, z = qw.scale[0], qw.zero_point[0].astype(np.float32)
    np.testing.assert_array_equal(qw.q[7], np.clip(np.rint(w[7] / s) + z, 0, 15).astype(np.uint8))
    with pytest.raises(ValueError, match="hessian"):
        quantize_gptq(w, h[:10, :10])


@pytest.mark.parametrize("symmetric", [False, True])
def test_scale_refit_never_raises_a_blocks_weighted_error(symmetric):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((256, 64)) * 0.05).astype(np.float32)
    importance = rng.random(256) ** 2

    def block_errors(iterations):
        qw = quantize_blockwise(w, block_size=32, symmetric=symmetric, clip="mse", importance=importance, refit=iterations)
        e = importance[:, None] * np.square(w, dtype=np.float64) * np.square(w - dequantize_blockwise(qw), dtype=np.float64)
        return e.reshape(8, 32, 64).sum(axis=1)

    before, after = block_errors(0), block_errors(3)
    assert (after <= before * (1 + 1e-5) + 1e-15).all() and after.sum() < before.sum()
