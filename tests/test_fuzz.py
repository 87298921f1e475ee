"""Bounded fuzzing of the model loader (mutated model files either load or raise a clean `SwOnnxError`), and a
property test of the quantization kernels where tests/test_kernels.py's leaves gaps.

Mutants of two small models (an inline decoder and the `.onnx` of an external-data one, whose external-data
references then point at mangled locations, offsets and lengths) are made by byte flips, truncations,
insertions, deletions and overwrites with interesting values, from a fixed seed. For each, `load_model` and
then what every command does next (linear layers, each weight's bytes, the residual streams) must succeed
or raise `SwOnnxError`: no other exception type, no hang (a per-mutant alarm).

    SW_ONNX_FUZZ_ITERATIONS=20000 python -m pytest -q tests/test_fuzz.py   # longer run (default 200)
    SW_ONNX_FUZZ_SEED=7 ...                                                # another sequence
"""

from __future__ import annotations

import os
import random
import signal
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from sw_onnx.errors import SwOnnxError

ITERATIONS = int(os.environ.get("SW_ONNX_FUZZ_ITERATIONS", "200"))
SEED = int(os.environ.get("SW_ONNX_FUZZ_SEED", "0"))
PER_MUTANT_SECONDS = 10
_INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff" * 8, b"\x00" * 8, b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
                b"../", b"/etc/passwd", b"\x01", b"\x08\x63"]


def _tiny_decoder(path: Path, *, external: bool) -> Path:
    """Embedding, two linear layers with a residual add, an lm_head: every part the loader looks at, small."""
    rng = np.random.default_rng(0)
    h, v = 8, 16
    inits = [numpy_helper.from_array(rng.standard_normal((v, h)).astype(np.float32), "embed"),
             numpy_helper.from_array(rng.standard_normal((h, h)).astype(np.float32), "layers.0.up.weight"),
             numpy_helper.from_array(rng.standard_normal((h, h)).astype(np.float32), "layers.0.down.weight"),
             numpy_helper.from_array(rng.standard_normal((h, v)).astype(np.float32), "lm_head.weight")]
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["x0"], name="/embed/Gather"),
             helper.make_node("MatMul", ["x0", "layers.0.up.weight"], ["u"], name="/layers.0/up/MatMul"),
             helper.make_node("Relu", ["u"], ["r"], name="/layers.0/act"),
             helper.make_node("MatMul", ["r", "layers.0.down.weight"], ["d"], name="/layers.0/down/MatMul"),
             helper.make_node("Add", ["x0", "d"], ["x1"], name="/layers.0/Add"),
             helper.make_node("MatMul", ["x1", "lm_head.weight"], ["logits"], name="/lm_head/MatMul")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", v])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if external:
        onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        if not b:
            break
        kind = rng.randrange(6)
        i = rng.randrange(len(b))
        if kind == 0:  # flip bits
            b[i] ^= 1 << rng.randrange(8)
        elif kind == 1:  # random byte
            b[i] = rng.randrange(256)
        elif kind == 2:  # truncate
            del b[rng.randrange(len(b)):]
        elif kind == 3:  # insert
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        elif kind == 4:  # delete a span
            del b[i:i + rng.randrange(1, 32)]
        else:  # overwrite with an interesting value (varint extremes, path pieces)
            value = rng.choice(_INTERESTING)
            b[i:i + len(value)] = value
    return bytes(b)


def _exercise(path: Path) -> None:
    """What the commands do after loading, short of running onnxruntime."""
    from sw_onnx.discover import find_linear_layers, find_residual_chain, require_float_model
    from sw_onnx.io import load_model

    model = load_model(path)
    require_float_model(model)
    layers, _ = find_linear_layers(model)
    for layer in layers:
        find_residual_chain(layer)
        layer.weight.effective_weight()


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


@pytest.mark.parametrize("external, lazy", [(False, False), (False, True), (True, False)],
                         ids=["inline", "inline-mapped", "external-data"])
def test_mutated_models_load_or_fail_cleanly(tmp_path, monkeypatch, external, lazy):
    """"inline-mapped": inline weights mapped from the file as the loader does for large models
    (`sw_onnx.wire.inline_as_external`), forced here for a small one."""
    if lazy:
        import sw_onnx.io

        monkeypatch.setattr(sw_onnx.io.load, "_LAZY_INLINE_MIN_FILE_BYTES", 0)
        monkeypatch.setattr(sw_onnx.io.load, "_LAZY_INLINE_MIN_TENSOR_BYTES", 0)
    seed_dir = tmp_path / "seed"
    seed_dir.mkdir()
    original = _tiny_decoder(seed_dir / "model.onnx", external=external)
    _exercise(original)  # the unmutated model loads
    if lazy:
        from sw_onnx.io import load_model, stores_weights_externally

        mapped = load_model(original)
        assert all(type(v.const_value).__name__ == "_MappedInline" for v in mapped.graph.initializers.values())
        assert not stores_weights_externally(mapped)
    data = original.read_bytes()
    work = tmp_path / "work"
    work.mkdir()
    if external:
        shutil.copy(seed_dir / "model.onnx.data", work / "model.onnx.data")
        (tmp_path / "outside.data").write_bytes((seed_dir / "model.onnx.data").read_bytes())
    rng = random.Random(SEED * 2 + external + 1000 * lazy)
    outcomes = {"loaded": 0, "refused": 0}
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for i in range(ITERATIONS):
            mutant = _mutate(data, rng)
            target = work / "model.onnx"
            target.write_bytes(mutant)
            signal.alarm(PER_MUTANT_SECONDS)
            try:
                _exercise(target)
                outcomes["loaded"] += 1
            except SwOnnxError:
                outcomes["refused"] += 1
            except _Hang:
                pytest.fail(f"mutant {i} (seed {SEED}) hung for {PER_MUTANT_SECONDS} s; kept at {_keep(target, i)}")
            except Exception as e:  # noqa: BLE001 - the point of the test
                pytest.fail(f"mutant {i} (seed {SEED}) raised {type(e).__name__}: {e}; kept at {_keep(target, i)}")
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcomes["loaded"] + outcomes["refused"] == ITERATIONS
    assert outcomes["refused"] > 0  # the mutations do reach the checks


def _keep(target: Path, i: int) -> Path:
    kept = target.with_name(f"failing_mutant_{i}.onnx")
    shutil.copy(target, kept)
    return kept


# ----------------------------------------------------------------------------------------------
# Kernels: what tests/test_kernels.py's property test leaves out (clip modes, K below 16, blocks above K).

@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(
    k=st.integers(1, 200),
    n=st.integers(1, 12),
    bits=st.sampled_from([4, 8]),
    block_size=st.sampled_from([16, 32, 64, 128, 256, 1024]),
    symmetric=st.booleans(),
    clip=st.sampled_from(["none", "zscore", "mse"]),
    seed=st.integers(0, 2**32 - 1),
    magnitude=st.sampled_from([1e-30, 1e-6, 1.0, 1e4, 1e15]),  # zscore squares overflow float32 past ~1e19
    with_keep_out=st.booleans(),
)
def test_property_any_clip_shape_and_block(k, n, bits, block_size, symmetric, clip, seed, magnitude, with_keep_out):
    from sw_onnx.kernels import dequantize_blockwise, pack_int4_low_first, quantize_blockwise, to_matmulnbits, \
        unpack_int4_low_first

    rng = np.random.default_rng(seed)
    w = (rng.standard_t(df=3, size=(k, n)) * magnitude).astype(np.float32)
    keep = None
    if with_keep_out:
        keep = np.zeros(w.shape, bool)
        keep[rng.integers(0, k, 2), rng.integers(0, n, 2)] = True
    qw = quantize_blockwise(w, bits=bits, block_size=block_size, symmetric=symmetric, clip=clip, keep_out=keep)
    half = 1 << (bits - 1)
    qmin, qmax = (-half, half - 1) if symmetric else (0, (1 << bits) - 1)
    assert qw.q.shape == (k, n) and qw.scale.shape == (-(-k // block_size), n)
    assert qw.q.min() >= qmin and qw.q.max() <= qmax and np.isfinite(qw.scale).all()
    deq = dequantize_blockwise(qw)
    assert np.isfinite(deq).all()
    # In-range elements are within half a step; saturated (clipped) ones are not bounded by it.
    scale = np.repeat(qw.scale, qw.block_size, axis=0)[:k].astype(np.float64)
    zp = 0 if qw.zero_point is None else np.repeat(qw.zero_point, qw.block_size, axis=0)[:k].astype(np.float64)
    safe = np.where(scale == 0, 1.0, scale)
    code = np.rint(w / safe) + zp
    inside = (code >= qmin) & (code <= qmax) & (keep is None or ~keep)
    err = np.abs(w.astype(np.float64) - deq)
    assert not (inside & (err > np.abs(scale) / 2 + 1e-5 * (np.abs(w) + np.abs(scale)))).any()
    if keep is not None:
        assert np.all(deq[keep] == 0)
    if bits == 4:
        packed = pack_int4_low_first(qw.q)
        np.testing.assert_array_equal(unpack_int4_low_first(packed, qw.q.size, signed=symmetric), qw.q.ravel())
        b, scales, _ = to_matmulnbits(qw)
        assert b.shape == (n, -(-k // block_size), block_size // 2) and scales.shape == (n, -(-k // block_size))
