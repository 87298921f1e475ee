"""The compiled search and refit (sw_onnx.kernels_jit) against the numpy kernels they replace: the same codes,
scales and zero points, bit for bit, on weights chosen to reach every branch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import sw_onnx.kernels as kernels
import sw_onnx.kernels_jit as kernels_jit
from sw_onnx.kernels import dequantize_blockwise, quantize_blockwise


def _awkward_weight(k: int, n: int, seed: int) -> np.ndarray:
    """Heavy-tailed weights with the cases the kernels branch on: an all-zero block, a constant block, a block of
    subnormals (its scale underflows to 0), a column of exact rounding ties, a column 100x the others, an
    outlier."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(df=4, size=(k, n)).astype(np.float32) * np.float32(0.02)
    w[:16, 0] = 0.0
    if n > 1:
        w[:16, 1] = np.float32(0.5)
    if n > 2:
        w[16:32, 2] = np.float32(1e-44) * rng.integers(-3, 4, 16)
    if n > 4:  # min 0, max 15/16 and halves between: codes of exact ties, which rint sends to the even one
        w[:, 3] = np.resize(np.array([0, 15, *np.arange(15) + 0.5], np.float32) / 16, k)
    w[:, -1] *= np.float32(100)
    w[rng.integers(0, k), rng.integers(0, n)] *= np.float32(40)
    return w


def _both(w: np.ndarray, **kwargs):
    """The weight quantized by the compiled kernels and by numpy alone."""
    compiled = quantize_blockwise(w, **kwargs)
    kernels.COMPILED = False
    try:
        reference = quantize_blockwise(w, **kwargs)
    finally:
        kernels.COMPILED = True
    return compiled, reference


def _assert_same(a, b) -> None:
    np.testing.assert_array_equal(a.q, b.q)
    np.testing.assert_array_equal(a.scale, b.scale)
    if b.zero_point is None:
        assert a.zero_point is None
    else:
        np.testing.assert_array_equal(a.zero_point, b.zero_point)


@pytest.mark.parametrize(("bits", "symmetric"), [(4, False), (4, True), (8, False), (8, True)])
@pytest.mark.parametrize(("k", "n", "block_size"), [(256, 300, 32), (200, 7, 64), (64, 2, 16), (96, 513, 128)])
@pytest.mark.parametrize("refit", [0, 2])
@pytest.mark.parametrize("with_importance", [False, True])
def test_compiled_search_and_refit_match_numpy(bits, symmetric, k, n, block_size, refit, with_importance):
    """Ragged K (200 in blocks of 64), a block above K (96 in 128), N across the 256-column tiles (300, 513) and
    below them, kept-out weights, importance spanning e^+-4 (a zero for a padded-looking row)."""
    w = _awkward_weight(k, n, seed=k + n + bits)
    rng = np.random.default_rng(n)
    importance = np.exp(rng.standard_normal(k) * 2) if with_importance else None
    if importance is not None:
        importance[3] = 0.0
    keep = [(5, 0), (k - 1, n - 1)]
    compiled, reference = _both(w, bits=bits, block_size=block_size, symmetric=symmetric, clip="mse",
                                weighting="none", importance=importance, keep_out=keep, refit=refit)
    _assert_same(compiled, reference)
    assert np.all(dequantize_blockwise(compiled)[5, 0] == 0)  # kept out: the code of exactly 0


@pytest.mark.parametrize("grid", [1, 9])
@pytest.mark.parametrize("seed", range(4))
def test_compiled_kernels_match_numpy_on_random_layers(grid, seed):
    rng = np.random.default_rng(seed)
    k, n = int(rng.integers(32, 400)), int(rng.integers(2, 700))
    w = (rng.standard_normal((k, n)) * rng.choice([1e-3, 0.02, 3.0])).astype(np.float32)
    kwargs = dict(bits=4, block_size=int(rng.choice([16, 32, 64])), clip="mse", weighting="none", mse_grid=grid,
                  importance=rng.random(k) ** 3, refit=int(rng.integers(0, 3)))
    _assert_same(*_both(w, **kwargs))


def test_one_column_differs_only_in_the_sums_order():
    """A one-column weight is the one shape where numpy sums a block's rows in another order (its reduction runs
    along contiguous memory): the codes agree, the refit's scales to float32 rounding."""
    w = _awkward_weight(256, 1, seed=3)
    compiled, reference = _both(w, bits=4, block_size=32, clip="mse", weighting="none",
                                importance=np.linspace(0.1, 1, 256), refit=2)
    np.testing.assert_array_equal(compiled.q, reference.q)
    np.testing.assert_allclose(compiled.scale, reference.scale, rtol=1e-5)


def test_default_search_runs_compiled_and_other_weightings_do_not(monkeypatch):
    calls = []
    search = kernels_jit.search
    monkeypatch.setattr(kernels_jit, "search", lambda *args: calls.append(1) or search(*args))
    w = _awkward_weight(64, 8, seed=0)
    quantize_blockwise(w, bits=4, block_size=32, clip="mse", weighting="none", importance=np.ones(64), refit=2)
    assert calls
    calls.clear()
    quantize_blockwise(w, bits=4, block_size=32, clip="mse", weighting="w2", importance=np.ones(64), refit=2)
    quantize_blockwise(w, bits=4, block_size=32, clip="none")
    assert not calls


def test_mapped_and_copied_weights_share_one_compiled_version():
    """A weight mapped from its file is read-only, a padded or kept-out copy is not; numba would compile and load
    a version for each, so the blocks are always handed over read-only."""
    w = _awkward_weight(64, 8, seed=1)
    read_only = w.copy()
    read_only.flags.writeable = False
    for weight, keep in ((w, None), (read_only, None), (read_only, [(0, 0)])):
        quantize_blockwise(weight, bits=4, block_size=32, clip="mse", weighting="none", keep_out=keep, refit=2)
    for kernel in (kernels_jit.search, kernels_jit.refit):
        assert kernel.signatures and not any(signature[0].mutable for signature in kernel.signatures)


def test_a_transposed_view_quantizes_as_its_contiguous_copy():
    """A Gemm's transB weight arrives as a transposed view. numpy's sums over such a view run in another order
    (last-bit differences in the refit's scales), the compiled kernels' do not: the result is numpy's on the
    contiguous copy."""
    rng = np.random.default_rng(4)
    view = np.ascontiguousarray(_awkward_weight(256, 160, seed=4).T).T
    kwargs = dict(bits=4, block_size=32, clip="mse", weighting="none", importance=rng.random(256), refit=2)
    from_view = quantize_blockwise(view, **kwargs)
    compiled, reference = _both(np.ascontiguousarray(view), **kwargs)
    _assert_same(from_view, compiled)
    _assert_same(compiled, reference)


_NUMBA_START = """
import sys
from sw_onnx import _process
{setup}
import numpy as np
from sw_onnx.kernels import quantize_blockwise
quantize_blockwise(np.ones((64, 4), np.float32), clip="mse", weighting="none", block_size=32)
import numba.np.arraymath
print(numba.np.arraymath._HAVE_BLAS, "scipy.linalg" in sys.modules)
import scipy.linalg.cython_blas  # importable again
"""


@pytest.mark.parametrize(("setup", "expected"), [("", "True True"),
                                                 ("_process.configure_command_line_process()", "False False")])
def test_the_command_line_skips_numbas_blas_probe(setup, expected):
    """numba's numpy support imports scipy.linalg when it loads, to find BLAS (0.2-0.3 s); the kernels use none. In
    sw-onnx's own process it is not imported; in a host process numba is left as it is."""
    pytest.importorskip("scipy.linalg")  # the probe costs something only where scipy is installed
    done = subprocess.run([sys.executable, "-c", _NUMBA_START.format(setup=setup)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == expected.split()


def test_without_numba_the_numpy_search_runs_with_the_same_result():
    code = ("import sys\nsys.modules['numba'] = None  # as if not installed\n"
            "import numpy as np\nfrom sw_onnx import kernels\n"
            "w = np.sin(np.arange(64 * 48, dtype=np.float32)).reshape(64, 48)\n"
            "qw = kernels.quantize_blockwise(w, block_size=32, clip='mse', weighting='none', refit=2)\n"
            "print(kernels._compiled_kernels() is None, qw.q.tobytes().hex(), qw.scale.tobytes().hex())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    fallback, codes, scales = done.stdout.split()
    w = np.sin(np.arange(64 * 48, dtype=np.float32)).reshape(64, 48)
    compiled = quantize_blockwise(w, block_size=32, clip="mse", weighting="none", refit=2)
    assert fallback == "True"
    assert (codes, scales) == (compiled.q.tobytes().hex(), compiled.scale.tobytes().hex())
