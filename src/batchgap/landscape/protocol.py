"""Small shared pieces for result objects: the protocol fields, read-only arrays, JSON conversion, data and
grid checks."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class Measured:
    """What every full-data measure states beside its numbers: how many units (``n``; examples by default),
    the BatchNorm mode and its meaning, which parameters, the evaluation batch size, the loss, the objective
    (the batch form and where the loss comes from), its weighting unit, and how attention was differentiated
    twice where it was (``attention``; None otherwise), and how many processes shared the data and over which
backend (``world_size``, ``backend``: :mod:`ranks`; they change rounding only). Results extend it; ``as_dict``
is JSON."""

    n: int
    bn: str
    bn_description: str
    params: str
    num_params: int
    batch_size: int
    loss_fn: str
    objective: str = dataclasses.field(kw_only=True)
    unit: str = dataclasses.field(kw_only=True)
    attention: str | None = dataclasses.field(default=None, kw_only=True)
    world_size: int = dataclasses.field(default=1, kw_only=True)  # processes that shared the data (ranks.py)
    backend: str | None = dataclasses.field(default=None, kw_only=True)  # their torch.distributed backend

    def as_dict(self) -> dict:
        return jsonable(self)


def frozen_array(values, dtype=np.float64) -> np.ndarray:
    """A read-only numpy copy, so a frozen result cannot be changed through its arrays."""
    arr = np.array(values, dtype=dtype, copy=True)
    arr.setflags(write=False)
    return arr


def jsonable(obj: Any) -> Any:
    """Plain JSON types from dataclasses, numpy arrays/scalars, tuples and mappings (NaN stays float nan)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def as_grid(values, name: str) -> np.ndarray:
    """A 1-D float64 grid, checked: non-empty, finite, and containing 0 when it is symmetric about 0.

    A symmetric grid without 0 (e.g. ``linspace(-1, 1, 20)``) misses the centre, the one point
    every landscape plot is read against; that is refused rather than silently plotted.
    """
    grid = np.asarray(values, dtype=np.float64).reshape(-1)
    if grid.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(grid)):
        raise ValueError(f"{name} has non-finite values")
    lo, hi = float(grid.min()), float(grid.max())
    if lo < 0 < hi and math.isclose(lo, -hi, rel_tol=1e-9) and not np.any(grid == 0.0):
        raise ValueError(
            f"{name} is symmetric about 0 but does not contain 0 (use an odd number of points)"
        )
    return grid


def data_size_name(data) -> str:
    """A short description of a data argument for protocols."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and hasattr(data[0], "shape"):
        return f"tensor pair, n={len(data[1])}"
    if hasattr(data, "x") and hasattr(data, "y"):
        return f"TensorData, n={len(data.y)}"
    return "iterable of batches"
