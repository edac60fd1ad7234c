"""Dynamic batch size: Keskar et al. 2017's proposed, untested remedy ("dynamic sampling").

Use small batches in the first epochs, where they steer the iterate toward a wide basin, then move to
a large batch, gradually or abruptly. A schedule is a pure function ``epoch -> batch size``, epochs
counted from 0 (the index of the epoch about to run, as in :func:`~batchgap.train.train`'s loop). Each
is a small frozen dataclass, so its repr and :meth:`protocol` record exactly what ran.

- :func:`switch_schedule` (abrupt): ``small`` for epochs ``< switch_epoch``, ``large`` from then on.
- :func:`geometric_schedule` (gradual): ``round(small * (large / small) ** (epoch / epochs))`` for
  ``0 <= epoch <= epochs``, ``large`` after: a constant growth factor per epoch, exactly ``small`` at
  epoch 0 and exactly ``large`` from epoch ``epochs`` on, monotone (rounding a monotone sequence keeps
  it monotone; values are also clipped to [small, large]). E.g. 32 -> 4096 over 7 epochs doubles each epoch.

Both also accept ``small > large`` (a shrinking schedule, for ablations); "monotone" then means non-increasing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import UserError

__all__ = ["GeometricSchedule", "SwitchSchedule", "geometric_schedule", "switch_schedule"]


def _int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"batch schedule: {name} must be an int >= {low}, got {value!r}")
    return value


def _epoch(epoch: object) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    return epoch


@dataclass(frozen=True)
class SwitchSchedule:
    small: int
    large: int
    switch_epoch: int

    def __call__(self, epoch: int) -> int:
        return self.small if _epoch(epoch) < self.switch_epoch else self.large

    def protocol(self) -> dict:
        return {"schedule": "switch", **asdict(self)}


@dataclass(frozen=True)
class GeometricSchedule:
    small: int
    large: int
    epochs: int

    def __call__(self, epoch: int) -> int:
        epoch = _epoch(epoch)
        if epoch == 0:
            return self.small
        if epoch >= self.epochs:
            return self.large
        value = round(self.small * (self.large / self.small) ** (epoch / self.epochs))
        low, high = sorted((self.small, self.large))
        return min(max(value, low), high)

    def protocol(self) -> dict:
        return {"schedule": "geometric", **asdict(self)}


def switch_schedule(small: int, large: int, switch_epoch: int) -> SwitchSchedule:
    """Abrupt: batch size ``small`` for epochs ``0 .. switch_epoch - 1``, then ``large``."""
    return SwitchSchedule(_int("small", small, 1), _int("large", large, 1), _int("switch_epoch", switch_epoch, 0))


def geometric_schedule(small: int, large: int, epochs: int) -> GeometricSchedule:
    """Gradual: geometric growth from ``small`` (epoch 0) to ``large`` (epoch ``epochs`` and after),
    rounded to ints, monotone, exact endpoints."""
    return GeometricSchedule(_int("small", small, 1), _int("large", large, 1), _int("epochs", epochs, 1))
