"""Scale (or zero) chosen weight scalars: the paper's ablation, on initializers of any layout."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

# A weight coordinate: (initializer name, index in the initializer's own layout).
Coordinate = tuple[str, tuple[int, ...]]


def scaled_initializers(model: ir.Model, coordinates: Iterable[Coordinate], scale: float) -> dict[str, np.ndarray]:
    """Copies of the initializers that hold `coordinates`, with those scalars multiplied by `scale`.

    Only the touched tensors are read and copied; the model is not changed.

    Raises:
        KeyError: an initializer name that the model does not have.
        IndexError: an index outside its initializer.
    """
    arrays: dict[str, np.ndarray] = {}
    by_name: dict[str, list[tuple[int, ...]]] = {}
    for name, index in coordinates:
        by_name.setdefault(name, []).append(tuple(int(i) for i in index))
    for name, indices in by_name.items():
        value = model.graph.initializers.get(name)
        if value is None or value.const_value is None:
            raise KeyError(f"no initializer named {name!r}")
        array = np.array(value.const_value.numpy(), copy=True)
        rows = tuple(np.array(axis) for axis in zip(*indices))
        if len(rows) != array.ndim:
            raise IndexError(f"{name}: index rank {len(rows)} for a tensor of rank {array.ndim}")
        array[rows] = (array[rows].astype(np.float64) * scale).astype(array.dtype)
        arrays[name] = array
    return arrays


class ScaleWeightsPass(ir.passes.InPlacePass):
    """Multiply chosen weight scalars by `scale` (0 prunes them).

    Attributes:
        coordinates: (initializer name, index in its own layout) of each scalar.
        scale: the factor.
    """

    def __init__(self, coordinates: Iterable[Coordinate], scale: float = 0.0):
        super().__init__()
        self.coordinates = list(coordinates)
        self.scale = scale

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.coordinates or self.scale == 1.0:
            return ir.passes.PassResult(model, modified=False)
        for name, array in scaled_initializers(model, self.coordinates, self.scale).items():
            model.graph.initializers[name].const_value = ir.tensor(array, name=name)
        return ir.passes.PassResult(model, modified=True)
