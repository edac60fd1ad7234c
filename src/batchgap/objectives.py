"""A study's objective: how its batches become a loss, for training, evaluation and every measure.

A study file's ``[objective]`` table names it::

    [objective]
    name = "huggingface-causal-lm"     # a ready one: cross-entropy (the default), huggingface,
                                       #   huggingface-causal-lm, tuple (batchgap.landscape.objective.READY)
    # name = "my_objectives.py:token_loss"   # or the user's MODULE:CALLABLE: an Objective, or
    # unit = "token"                         #   fn(model, batch) -> (loss_sum, weight) | per-unit losses

The default (``cross-entropy`` on ``(inputs, targets)`` pairs) is no objective at all for the study machinery:
training, evaluation and the measures take today's path, bit for bit, and the run ids and ``study.json`` do not
mention it. Any other objective is passed as ``objective=`` to :func:`batchgap.train.train` (its loss and
evaluation) and to every measure (:mod:`batchgap.measure`); it is part of each run's id (its name, and for the
user's code the sha256 of its source file).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import plugins
from .errors import UserError, closest
from .landscape.objective import READY, FunctionObjective, Objective, as_objective

DEFAULT = "cross-entropy"


@dataclass
class ObjectiveConfig:
    """The study's objective: a study file's ``[objective]`` table."""

    name: str = field(default=DEFAULT, metadata={"doc": f"a ready objective ({', '.join(READY)}) or MODULE:CALLABLE"})
    unit: str = field(default="", metadata={"doc": "MODULE:CALLABLE functions: what one unit of weight counts "
                                                   "(example, token, ...); '' = unit"})


def check(o: ObjectiveConfig, where: str = "objective") -> None:
    """A ready name or a ``MODULE:CALLABLE`` (resolved when the study is checked); ``unit`` only for the latter."""
    if o.name not in READY and not plugins.is_spec(o.name):
        raise UserError(f"{where}.name: unknown objective {o.name!r}{closest(o.name, READY)}; ready: "
                        f"{', '.join(READY)}, or MODULE:CALLABLE / FILE.py:CALLABLE of your own")
    if o.unit and not plugins.is_spec(o.name):
        raise UserError(f"{where}.unit: only for an objective of your own (MODULE:CALLABLE); {o.name!r} "
                        "has its own unit")


def is_default(o: ObjectiveConfig) -> bool:
    """Whether ``o`` is today's cross-entropy on pairs (then the study machinery passes no objective)."""
    return o.name == DEFAULT and not o.unit


def make(o: ObjectiveConfig, root) -> Objective | None:
    """The :class:`Objective` the study's runs use, or None for the default (today's code path)."""
    if is_default(o):
        return None
    if o.name in READY:
        return as_objective(o.name)
    fn, _ = plugins.resolve(o.name, root, "objective.name")
    if isinstance(fn, Objective):
        return fn
    if isinstance(fn, type):
        raise UserError(f"objective.name: {o.name} is a class; name an Objective instance or a function "
                        "fn(model, batch) -> (loss_sum, weight)")
    return FunctionObjective(fn, unit=o.unit or "unit")


def identity(o: ObjectiveConfig, root) -> dict | None:
    """What a run's id records of the objective: nothing for the default, the name (and unit), and for the
    user's code its source file's sha256."""
    if is_default(o):
        return None
    out = {"name": o.name, "unit": o.unit}
    if plugins.is_spec(o.name):
        out["source"] = plugins.resolve(o.name, root, "objective.name")[1]
    return out
