"""Check a quantized model before it is published: ONNX checker, onnxruntime fusion, logits vs the original.

`verify_quantized` runs, in order:

1. ``onnx.checker.check_model`` on the *path* (works past 2 GB, external data included).
2. An onnxruntime CPU session at ``ORT_ENABLE_EXTENDED`` (the level where ``DequantizeLinear -> MatMul``
   becomes ``com.microsoft::MatMulNBits``) with ``optimized_model_filepath`` set to a temporary file; the
   optimized graph is read back (without its weights) and every quantized layer must be a MatMulNBits there.
   Layers that did not fuse are named with what their DequantizeLinear feeds instead.
3. Logits of the quantized model and of the original on a short data-free input (the caller's token ids,
   normally `sw_onnx.inputs.prompt_token_ids`): max |diff|, top-1 agreement over positions.

Failures are collected in `VerifyResult.failures`; the caller decides what to do with them (`quantize_model`
raises `VerificationError` and publishes nothing).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

__all__ = ["VerifyResult", "fusion_report", "verify_quantized"]

OPTIMIZATION_LEVEL = "ORT_ENABLE_EXTENDED"


@dataclass
class VerifyResult:
    """Outcome of `verify_quantized`.

    Attributes:
        checker: ``"ok"`` or the checker's first line of complaint.
        optimization_level: the onnxruntime level of the fusion check.
        matmulnbits: MatMulNBits nodes in onnxruntime's optimized graph.
        dequantize_linear: DequantizeLinear nodes left in it (each runs on every call: slow).
        expected_fused: quantized layers that had to become MatMulNBits.
        not_fused: ``{"node", "reason"}`` for each quantized layer that did not.
        logits: ``{"output", "tokens", "max_abs_diff", "max_abs_reference", "mean_abs_diff",
            "top1_agreement", "finite"}``, or {} when the model could not run.
        seconds: wall time.
        failures: what makes the check fail (empty: passed).
    """

    checker: str = "not run"
    optimization_level: str = OPTIMIZATION_LEVEL
    matmulnbits: int = 0
    dequantize_linear: int = 0
    expected_fused: int = 0
    not_fused: list[dict] = field(default_factory=list)
    logits: dict = field(default_factory=dict)
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def verify_quantized(
    path: str | os.PathLike,
    reference: str | os.PathLike,
    quantized_nodes: Sequence[str],
    token_ids: np.ndarray | Sequence[int],
    *,
    providers: Sequence[str] | None = None,
    min_top1_agreement: float | None = None,
    reference_logits: tuple[str, np.ndarray] | None = None,
    input_dims: dict[str, dict[int, int]] | None = None,
    prepack: bool = False,
) -> VerifyResult:
    """Verify the quantized model at `path` against the original at `reference`.

    Args:
        path: the quantized .onnx file (external data beside it).
        reference: the original .onnx file.
        quantized_nodes: names of the nodes that multiply by quantized weights (MatMul for QDQ, which
            onnxruntime turns into a MatMulNBits of the same name, or MatMulNBits written directly).
        token_ids: int ``[seq]`` for the logits comparison.
        providers: onnxruntime providers for the logits run (the fusion check is on CPU).
        min_top1_agreement: fail when the share of positions whose argmax matches is below this.
        reference_logits: (output name, the original's logits on `token_ids`) when already computed (e.g.
            by detection's first pass): the original is then not run again.
        input_dims: the original's KV-cache axis sizes that its graph leaves symbolic
            (`sw_onnx.inputs.cache_dim_hints`), for feeding the quantized copy.
        prepack: let onnxruntime pre-pack the quantized weights (`prepack_for_verification`).

    Returns:
        The result; ``result.failures`` is empty when everything passed.
    """
    started = time.perf_counter()
    result = VerifyResult(expected_fused=len(quantized_nodes))
    try:
        result.checker = _check(path)
        if result.checker != "ok" and not result.checker.startswith("skipped"):
            result.failures.append(f"onnx checker: {result.checker}")
            return result
        try:
            out_name, reference = reference_logits or _reference_logits(reference, token_ids, providers)
        except Exception as e:
            result.failures.append(f"the original model does not run in onnxruntime: {_first_line(e)}")
            return result
        try:
            logits = _run_quantized(path, out_name, token_ids, quantized_nodes, result, providers, input_dims, prepack)
        except Exception as e:
            result.failures.append(f"the quantized model does not load or run in onnxruntime: {_first_line(e)}")
            return result
        _judge(result, out_name, logits, reference, min_top1_agreement)
        return result
    finally:
        result.seconds = time.perf_counter() - started


def _reference_logits(reference, token_ids, providers) -> tuple[str, np.ndarray]:
    """The original's logits on `token_ids` (when detection did not already give them)."""
    from sw_onnx.inputs import build_feeds, logits_output_name
    from sw_onnx.io import load_model, open_session

    # The original's weights are fed from memory maps whose pages are dropped as the run goes, so its run
    # does not hold the whole fp32 model (bench/large_model.py: 2.4 GB -> 0.4 GB peak RSS).
    session = open_session(load_model(reference), providers, stream_weights=True)
    out_name = logits_output_name(session)
    return out_name, session.run([out_name], build_feeds(session, token_ids))[0]


def _run_quantized(path, out_name: str, token_ids, quantized_nodes, result: VerifyResult, providers,
                   input_dims, prepack: bool = False) -> np.ndarray:
    """Load the written file as a user would (fusion counted from onnxruntime's optimized graph) and run it."""
    from sw_onnx.inputs import build_feeds

    # Beside the file under test (quantize's temporary folder in the output's folder), not in /tmp: sw-onnx
    # writes only where it was told to, and a full disk there is the output's disk.
    with tempfile.TemporaryDirectory(prefix=".sw-onnx-verify-", dir=Path(path).parent) as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session = _session(path, ["CPUExecutionProvider"], optimized=optimized, input_dims=input_dims, prepack=prepack)
        counts, result.not_fused = fusion_report(optimized, quantized_nodes)
        result.matmulnbits = counts.get("MatMulNBits", 0)
        result.dequantize_linear = counts.get("DequantizeLinear", 0)
        if providers and list(providers) != ["CPUExecutionProvider"]:
            del session
            session = _session(path, providers, input_dims=input_dims, prepack=prepack)
        return session.run([out_name], build_feeds(session, token_ids))[0]


def _judge(result: VerifyResult, out_name: str, logits: np.ndarray, reference: np.ndarray,
           min_top1_agreement: float | None) -> None:
    not_fused = result.not_fused
    if not_fused:
        names = ", ".join(f"{d['node']} ({d['reason']})" for d in not_fused[:5])
        more = f" and {len(not_fused) - 5} more" if len(not_fused) > 5 else ""
        result.failures.append(f"{len(not_fused)} quantized layer(s) not fused into MatMulNBits: {names}{more}")
    result.logits = _compare_logits(out_name, logits, reference)
    if not result.logits["finite"]:
        result.failures.append("the quantized model's logits hold NaN or infinite values")
    elif min_top1_agreement is not None and result.logits["top1_agreement"] < min_top1_agreement:
        result.failures.append(
            f"top-1 agreement with the original {result.logits['top1_agreement']:.0%} is below {min_top1_agreement:.0%}"
        )


def _check(path) -> str:
    """``"ok"``, the onnx checker's complaint, or ``"skipped: ..."`` for a model with ops that only
    onnxruntime defines (onnxruntime-genai's graphs): the checker does not know them, onnxruntime runs them."""
    try:
        onnx.checker.check_model(str(path))
        return "ok"
    except Exception as e:  # ValidationError, or a protobuf error for a broken file
        message = _first_line(e)
    from sw_onnx.opschema import onnxruntime_only_ops

    try:
        only_ort = onnxruntime_only_ops(_all_nodes(onnx.load(str(path), load_external_data=False).graph))
    except Exception:  # the file does not even parse: the checker's message says why
        only_ort = []
    if only_ort and "No Op registered" in message:
        return f"skipped: uses onnxruntime ops the onnx checker does not know ({', '.join(only_ort[:4])})"
    return message


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes and those of every subgraph (If/Loop bodies)."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                nodes.extend(_all_nodes(sub))
    return nodes


def fusion_report(optimized_path: str | os.PathLike, quantized_nodes: Sequence[str]) -> tuple[dict[str, int], list[dict]]:
    """Op counts of an onnxruntime-optimized graph, and the quantized nodes that are not MatMulNBits there.

    onnxruntime names a fused node after the MatMul it replaces (``name`` or ``name/<fusion>``).

    Returns:
        (``{op_type: count}``, ``[{"node", "reason"}]``).
    """
    model = onnx.load(str(optimized_path), load_external_data=False)
    nodes = _all_nodes(model.graph)
    counts: dict[str, int] = {}
    for node in nodes:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    fused = {n.name for n in nodes if n.op_type == "MatMulNBits"}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    by_name: dict[str, onnx.NodeProto] = {}
    for node in nodes:
        by_name.setdefault(node.name, node)
    missing = []
    for name in quantized_nodes:
        if name in fused or any(f.startswith(name + "/") for f in fused):
            continue
        missing.append({"node": name, "reason": _why_not_fused(name, nodes, consumers, by_name)})
    return counts, missing


def _why_not_fused(name: str, nodes, consumers, by_name) -> str:
    """What onnxruntime made of a quantized MatMul that did not become MatMulNBits."""
    for node in nodes:
        if node.op_type != "DequantizeLinear":
            continue
        users = [u for o in node.output for u in consumers.get(o, [])]
        if not any(u.name == name or u.name.startswith(name + "/") for u in users):
            continue
        kinds = {u.op_type for u in users}
        if len(users) > 1:
            return f"its DequantizeLinear has {len(users)} consumers (must be one)"
        if "Gemm" in kinds:
            return "MatMul + Add became a Gemm first (2-D activations), which does not fuse"
        if "FusedMatMul" in kinds:
            return "fused into FusedMatMul first (a Transpose or scaling around it)"
        if "MatMul" in kinds:
            return ("DequantizeLinear -> MatMul left as is: check block_size (power of two >= 16) with axis 0, "
                    "or axis 1 per-channel, rank-2 weight, unshared constant initializers, no Relu/Clip after it")
        return f"its DequantizeLinear feeds {', '.join(sorted(kinds))}"
    node = by_name.get(name)
    if node is not None:
        return f"still a {node.op_type} without a DequantizeLinear input"
    return "not found in the optimized graph"


def _compare_logits(name: str, logits: np.ndarray, reference: np.ndarray) -> dict:
    q = np.asarray(logits, dtype=np.float32).reshape(-1, logits.shape[-1])
    r = np.asarray(reference, dtype=np.float32).reshape(-1, reference.shape[-1])
    finite = bool(np.isfinite(q).all())
    diff = np.abs(q - r) if finite else np.full(1, np.inf)
    return {
        "output": name,
        "tokens": int(r.shape[0]),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_reference": float(np.abs(r).max()),
        "top1_agreement": float((q.argmax(-1) == r.argmax(-1)).mean()) if finite else 0.0,
        "finite": finite,
    }


def prepack_for_verification(quantized_bytes: int, largest_layer_weights: int) -> bool:
    """Whether verification's session pre-packs the quantized weights: whichever costs less memory. Without
    pre-packing, onnxruntime dequantizes each MatMulNBits weight to float32 for the run (a transient the size
    of the largest layer's float weight, 4 bytes a weight); with it, a packed copy of every quantized weight
    stays beside the loaded one (about `quantized_bytes` more), and the run is faster (SmolLM2: 0.03 instead of
    0.3 s, a peak 40 MB lower; bench/large_model.py's decoder would hold 0.4 GB more for its 262 MB lm_head)."""
    return quantized_bytes < 4 * largest_layer_weights


def _session(path, providers, *, optimized: Path | None = None, input_dims=None, prepack: bool = False):
    """A session for the file at `path` as verification runs it, for one short run (`prepack`: see
    `prepack_for_verification`); with `optimized`, at `OPTIMIZATION_LEVEL`, writing the optimized graph there."""
    from sw_onnx.io import open_session

    level = OPTIMIZATION_LEVEL if optimized is not None else True
    session = open_session(path, providers, prepack=prepack, optimize=level, optimized_path=optimized,
                           optimized_weights=False)  # `fusion_report` reads its graph only
    if input_dims:  # the original's KV-cache sizes (`sw_onnx.inputs.cache_dim_hints`) hold for its quantized copy
        session.sw_onnx_input_dims = input_dims
    return session


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
