"""Which layers' inputs carry a super activation, for the MatMulNBits ``accuracy_level`` of ``--format nbits``.

At accuracy_level 4 onnxruntime quantizes activations to int8 per K-block with ``scale = max|a| / 127``:
inputs far below a block's largest one lose their precision. From one instrumented pass on the prompt (each
layer's per-channel max |input| over tokens and its input row at its peak token), a layer whose largest
channel (or largest entry of that row) is `ratio` times the median gets 1 (fp32 activations), as does a layer
holding a kept super weight (its input is the spike); every other layer 4. On SmolLM2-135M this flags 20 of
210 layers: the down_proj layers with input spikes and the last layers' gate/up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from sw_onnx.discover import LinearLayer

__all__ = ["accuracy_levels"]


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
