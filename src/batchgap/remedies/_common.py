"""Small helpers shared by the step functions."""
from __future__ import annotations

import math

import torch

from ..errors import UserError


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters ``optimizer`` updates, in its order, each once, trainable ones only."""
    seen, out = set(), []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def check_number(remedy: str, option: str, value: object, *, low: float = 0.0, high: float | None = None,
                 low_open: bool = False) -> float:
    """``value`` as a float in [low, high] (or (low, high] with ``low_open``), else a one-line UserError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        lo = f"> {low}" if low_open else f">= {low}"
        bound = f"{lo}" if high is None else f"{lo} and <= {high}"
        raise UserError(f"remedy {remedy}: option {option} must be a finite number {bound}, got {value!r}")
    return float(value)


def check_int(remedy: str, option: str, value: object, *, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"remedy {remedy}: option {option} must be an int >= {low}, got {value!r}")
    return value
