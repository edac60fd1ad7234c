"""Large-batch remedies: the ones Keskar et al. 2017 tried (appendix E) and later ones.

Step functions, each with :func:`batchgap.train.train`'s ``step`` signature
``step(model, optimizer, x, y, loss_fn) -> detached mean loss``::

    train(model, data, None, cfg, batch_size=5000, step=make_step("sam", rho=0.05))

==============  =====================================================  ==========================
name            what                                                   from
==============  =====================================================  ==========================
``plain``       one forward, backward, optimizer step                  :func:`~batchgap.step.sgd_step`
``sam``         step with the gradient at w + rho g/||g||              Foret et al. 2021
``asam``        ... at w + rho T^2 g/||T g||, T = |w| + eta            Kwon et al. 2021
``proximal``    conservative training: inner iterations on             Keskar et al. 2017, E.2
                f_B(x) + lam/2 ||x - x_k||^2
``fgsm``        train on mix L(x) + (1 - mix) L(x + eps sign grad_x)   Goodfellow et al. 2015; Keskar E.3
==============  =====================================================  ==========================

Model and schedule remedies: :func:`ghost_bn` (Hoffer et al. 2017) swaps BatchNorm layers for
:class:`GhostBatchNorm`; :func:`switch_schedule` and :func:`geometric_schedule` are Keskar et al.'s
proposed dynamic batch sizes, as pure functions ``epoch -> batch size``.

Every extra forward pass a step makes (SAM's second pass, FGSM's adversarial pass, conservative
training's inner iterations after the first) leaves BatchNorm running statistics untouched
(:func:`frozen_bn_stats`): each batch counts once, as in the plain step. Every step returns the
mini-batch loss at the weights it started from, on the clean batch, without any added term.
"""
from __future__ import annotations

import inspect
from typing import Callable

from ..errors import UserError, closest, one_of
from ..step import Step, sgd_step
from ._bn import frozen_bn_stats
from .adversarial import FGSMStep, fgsm_examples, fgsm_step
from .conservative import ProximalStep, proximal_step
from .ghost_bn import GhostBatchNorm, ghost_bn, ghost_chunk_sizes
from .sam import SAMStep, asam_step, sam_perturbation, sam_step
from .schedules import GeometricSchedule, SwitchSchedule, geometric_schedule, switch_schedule

__all__ = [
    "FGSMStep",
    "GeometricSchedule",
    "GhostBatchNorm",
    "ProximalStep",
    "SAMStep",
    "STEPS",
    "SwitchSchedule",
    "asam_step",
    "fgsm_examples",
    "fgsm_step",
    "frozen_bn_stats",
    "geometric_schedule",
    "ghost_bn",
    "ghost_chunk_sizes",
    "make_step",
    "plain_step",
    "proximal_step",
    "sam_perturbation",
    "sam_step",
    "switch_schedule",
]


def plain_step() -> Step:
    """The plain step, :func:`batchgap.step.sgd_step` itself (no options)."""
    return sgd_step


STEPS: dict[str, Callable[..., Step]] = {
    "plain": plain_step,
    "sam": sam_step,
    "asam": asam_step,
    "proximal": proximal_step,
    "fgsm": fgsm_step,
}


def make_step(name: str, **options) -> Step:
    """The step function ``name`` of :data:`STEPS` built with ``options``.

    An unknown name, an unknown or missing option, or a bad value raises a one-line :class:`UserError`.
    """
    if name not in STEPS:
        raise one_of("remedy", name, STEPS)
    factory = STEPS[name]
    params = inspect.signature(factory).parameters
    for key in options:
        if key not in params:
            allowed = ", ".join(params) or "none"
            raise UserError(f"remedy {name}: unknown option {key!r}{closest(key, params)}; allowed: {allowed}")
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in options]
    if missing:
        raise UserError(f"remedy {name}: missing option {missing[0]!r}")
    return factory(**options)
