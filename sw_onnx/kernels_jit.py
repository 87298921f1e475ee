"""The ``clip="mse"`` search and refit of `sw_onnx.kernels`, for the plain squared error (weighted by input
importance or not: the default), as loops compiled by numba.

The numpy kernels pass over a chunk once per operation and candidate, about a hundred times per weight, with
the GIL taken back between operations. Here a tile of `TILE` columns of one block row stays in cache through
all the candidates and refit rounds, and no GIL is held, so a layer's parts run on every CPU. The arithmetic is
the numpy kernels', operation for operation and in the same order (float32 sums over a block's rows in order,
the refit's error in float64), so the codes and scales are the same bit for bit (tests/test_kernels_jit.py).
Where numpy's own order depends on memory layout (a transposed view, as a Gemm's transB weight arrives; a
one-column weight), these loops give its result for the contiguous [K, N] weight. `sw_onnx.kernels` stays the
reference and the path of the other error weights.

Compiled on first use and cached beside this file (numba's ``cache=True``), about 2 s once per install.
"""

from __future__ import annotations

import numba
import numpy as np

TILE = 256
"""Columns of one block row per tile: 32 rows x 256 x 4 bytes = 32 KiB of weights, in L1/L2 across candidates."""

_JIT = dict(nogil=True, cache=True, error_model="numpy", boundscheck=False)


@numba.njit(**_JIT)
def search(x, scale1, inv, shift, cmin, cmax, factors, inv_factors, importance, best_family, best_factor):
    """Best (family, factor) per block: `sw_onnx.kernels._search_chunk`'s candidates and error.

    x: float32 [R, B, N] blocks; scale1, inv, shift: float32 [F, R, N], each family's unshrunk scale, its inverse
    and its code shift; cmin, cmax: float32 [F] code range; factors, inv_factors: float32 [J]; importance:
    float32 [R, B] error weight per row of a block row (ones for none).
    Writes best_family int8 [R, N] and best_factor int16 [R, N]; ties keep the earlier candidate.
    """
    nr, nb, n = x.shape
    acc = np.empty(TILE, np.float32)
    best = np.empty(TILE, np.float32)
    for r in range(nr):
        for j0 in range(0, n, TILE):
            w = min(n, j0 + TILE) - j0
            best[:w] = np.inf
            for f in range(inv.shape[0]):
                lo = cmin[f]
                hi = cmax[f]
                inv_r = inv[f, r, j0:j0 + w]
                shift_r = shift[f, r, j0:j0 + w]
                scale1_r = scale1[f, r, j0:j0 + w]
                for fi in range(inv_factors.shape[0]):
                    g = inv_factors[fi]
                    acc[:w] = 0
                    for b in range(nb):
                        wb = importance[r, b]
                        x_r = x[r, b, j0:j0 + w]
                        for j in range(w):
                            t = x_r[j] * inv_r[j] * g + shift_r[j]
                            c = np.rint(t)
                            c = lo if c < lo else c
                            c = hi if c > hi else c
                            d = t - c
                            acc[j] += d * d * wb
                    for j in range(w):
                        candidate = scale1_r[j] * factors[fi]
                        e = acc[j] * (candidate * candidate)
                        if e < best[j]:
                            best[j] = e
                            best_family[r, j0 + j] = f
                            best_factor[r, j0 + j] = fi


@numba.njit(inline="always", **_JIT)
def _codes_and_sums(x, r, j0, w, scale, z, importance, qmin, qmax, q, num, den):
    """`kernels._round_codes` of one tile less the zero point into q [B, TILE], and per block the sums of
    importance * q * x (num) and importance * q^2 (den)."""
    num[:w] = 0
    den[:w] = 0
    for b in range(x.shape[1]):
        wb = importance[r, b]
        x_r = x[r, b, j0:j0 + w]
        for j in range(w):
            s = scale[j]
            c = x_r[j] / (s if s != 0 else np.float32(1))
            c = np.rint(c)
            if s == 0:  # an underflowed scale: the zero point
                c = np.float32(0)
            c += z[j]
            c = qmin if c < qmin else c
            c = qmax if c > qmax else c
            c -= z[j]
            q[b, j] = c
            num[j] += c * x_r[j] * wb
            den[j] += c * c * wb


@numba.njit(**_JIT)
def refit(x, scale, zero_point, importance, qmin, qmax, iterations, scale_out, codes_out):
    """`sw_onnx.kernels._refit_chunk`: `iterations` rounds of least-squares scale per block, each kept where
    the weighted error falls; 0 rounds gives the codes of `scale` as they are.

    x: float32 [R, B, N]; scale, zero_point: float32 [R, N] (zero points 0 when symmetric); importance: float32
    [R, B]; qmin, qmax: float32. Writes scale_out float32 [R, N] and codes_out [R, B, N] (any integer or float
    dtype holding the codes).
    """
    nr, nb, n = x.shape
    energy = np.empty(TILE, np.float32)
    num = np.empty(TILE, np.float32)
    den = np.empty(TILE, np.float32)
    num_fit = np.empty(TILE, np.float32)
    den_fit = np.empty(TILE, np.float32)
    cur = np.empty(TILE, np.float32)
    fit = np.empty(TILE, np.float32)
    z = np.empty(TILE, np.float32)
    best = np.empty(TILE, np.float64)
    q = np.empty((nb, TILE), np.float32)
    q_fit = np.empty((nb, TILE), np.float32)
    for r in range(nr):
        for j0 in range(0, n, TILE):
            w = min(n, j0 + TILE) - j0
            cur[:w] = scale[r, j0:j0 + w]
            z[:w] = zero_point[r, j0:j0 + w]
            _codes_and_sums(x, r, j0, w, cur, z, importance, qmin, qmax, q, num, den)
            if iterations > 0:
                # error E - 2 s num + s^2 den, in float64 (E and s num nearly cancel)
                energy[:w] = 0
                for b in range(nb):
                    wb = importance[r, b]
                    x_r = x[r, b, j0:j0 + w]
                    for j in range(w):
                        energy[j] += x_r[j] * x_r[j] * wb
                for j in range(w):
                    s = np.float64(cur[j])
                    best[j] = np.float64(energy[j]) - 2 * s * np.float64(num[j]) + s * s * np.float64(den[j])
            for _ in range(iterations):
                for j in range(w):
                    d = np.float64(den[j])
                    fit[j] = np.float32(np.float64(num[j]) / d) if d > 0 else cur[j]
                _codes_and_sums(x, r, j0, w, fit, z, importance, qmin, qmax, q_fit, num_fit, den_fit)
                for j in range(w):
                    s = np.float64(fit[j])
                    e = np.float64(energy[j]) - 2 * s * np.float64(num_fit[j]) + s * s * np.float64(den_fit[j])
                    if e < best[j]:
                        best[j] = e
                        cur[j] = fit[j]
                        num[j] = num_fit[j]
                        den[j] = den_fit[j]
                        for b in range(nb):
                            q[b, j] = q_fit[b, j]
            for j in range(w):
                scale_out[r, j0 + j] = cur[j]
            for b in range(nb):
                for j in range(w):
                    codes_out[r, b, j0 + j] = q[b, j] + z[j]
