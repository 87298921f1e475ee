"""Per-layer facts measured on the prompt: which layers' inputs carry a super activation (the MatMulNBits
``accuracy_level`` of ``--format nbits``), and how much each layer's int4 rounding moves the logits (the bit
allocation's sensitivity, `layer_sensitivity`).

accuracy_level:
At accuracy_level 4 onnxruntime quantizes activations to int8 per K-block with ``scale = max|a| / 127``:
inputs far below a block's largest one lose their precision. From one instrumented pass on the prompt (each
layer's per-channel max |input| over tokens and its input row at its peak token), a layer whose largest
channel (or largest entry of that row) is `ratio` times the median gets 1 (fp32 activations), as does a layer
holding a kept super weight (its input is the spike); every other layer 4. On SmolLM2-135M this flags 20 of
210 layers: the down_proj layers with input spikes and the last layers' gate/up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from sw_onnx.discover import LinearLayer

__all__ = ["accuracy_levels", "layer_sensitivity"]


def accuracy_levels(layers: Sequence[LinearLayer], in_max: Mapping[int, np.ndarray], in_row: Mapping[int, np.ndarray],
                    *, ratio: float, kept_nodes: Iterable[str] = ()) -> dict[str, int]:
    """``{node name: accuracy_level}`` (1 or 4) from per-layer input statistics keyed by layer position."""
    kept = set(kept_nodes)
    tiny = float(np.finfo(np.float32).tiny)
    levels = {}
    for layer in layers:
        channel_max = in_max[layer.position]
        row = np.abs(in_row[layer.position])
        peak = max(float(channel_max.max()) / max(float(np.median(channel_max)), tiny),
                   float(row.max()) / max(float(np.median(row)), tiny))
        levels[layer.name] = 1 if peak >= ratio or layer.name in kept else 4
    return levels


def layer_sensitivity(model, layers: Sequence[LinearLayer], token_ids: np.ndarray,
                      replacement: Callable[[LinearLayer], np.ndarray | None], *,
                      providers: Sequence[str] | None = None) -> dict[str, float]:
    """``{node: KL}``: the mean over the prompt's tokens of KL(p || p_l), p the model's next-token
    distribution and p_l the same with layer l's effective weight replaced by ``replacement(layer)`` (its
    int4 rounding), one layer at a time: how much that layer's quantization error reaches the output.

    Args:
        model: a loaded model (a clone: its weights become graph inputs, its outputs the logits only).
        replacement: the effective ``[K, N]`` weight to try, or None to skip the layer (e.g. a weight other
            nodes read too, which a replacement would change as well).
    """
    from sw_onnx.inputs import build_feeds, logits_output_name
    from sw_onnx.io import create_session, ort_value

    names = {v.name for v in model.graph.inputs}
    for layer in layers:
        if layer.weight.initializer.name not in names:
            model.graph.inputs.append(layer.weight.initializer)
            names.add(layer.weight.initializer.name)
    session = create_session(model, providers=list(providers) if providers else None)
    out = logits_output_name(session)
    feeds = build_feeds(session, token_ids)
    reference = _log_softmax(session.run([out], feeds)[0])
    result = {}
    for layer in layers:
        w = replacement(layer)
        if w is None:
            continue
        override = {layer.weight.initializer.name: ort_value(layer.weight.to_initializer_layout(w))}
        logp = _log_softmax(session.run([out], {**feeds, **override})[0])
        result[layer.name] = float((np.exp(reference) * (reference - logp)).sum(axis=-1).mean())
    return result


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
