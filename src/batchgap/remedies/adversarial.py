"""Adversarial training with the fast gradient sign method (Goodfellow et al. 2015), as tried by
Keskar et al. 2017 (appendix E.3; no improvement reported, no numbers given).

At the current weights w, for the mini-batch (x, y)::

    x_adv = x + eps * sign(grad_x L(w; x, y))          [clamped to ``clamp`` when given]
    train on   mix * L(w; x, y) + (1 - mix) * L(w; x_adv, y)

Goodfellow et al.'s objective with alpha = ``mix`` = 0.5. Every choice, stated:

- ``L`` is the run's loss function (the batch mean); the input gradient is that of the clean
  mini-batch loss, taken in the model's current mode (train mode in :func:`~batchgap.train.train`:
  BN uses the batch statistics, dropout is on). ``x_adv`` is a constant for the weight update (no
  gradient flows through its dependence on w). sign(0) = 0: an input entry with a zero gradient is
  left as it is; every other entry moves by exactly ``eps``.
- The clean pass is both the pass the input gradient comes from and the clean term of the loss
  (one forward for both, so two forwards per step, not three).
- The clean and adversarial examples are two separate forward passes (each normalized by BN with its
  own batch statistics), not one concatenated batch. Only the clean pass updates BN running
  statistics; the adversarial pass does not (:func:`~batchgap.remedies.frozen_bn_stats`), so after a
  step they are those of one plain forward on the batch.
- ``mix = 1`` is the plain step (the adversarial pass is skipped); ``eps = 0`` gives the plain step's
  gradient. ``clamp = (low, high)`` keeps images in their valid range (e.g. (0, 1) for pixels / 255);
  default None, no clamping.
- Returned: the clean mini-batch loss at w, so the training-loss history compares with the plain step's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ._bn import frozen_bn_stats
from ._common import check_number

__all__ = ["FGSMStep", "fgsm_examples", "fgsm_step"]


def _perturb(x: torch.Tensor, grad_x: torch.Tensor, eps: float, clamp: tuple[float, float] | None) -> torch.Tensor:
    x_adv = x.detach() + eps * grad_x.sign()
    if clamp is not None:
        x_adv = x_adv.clamp(clamp[0], clamp[1])
    return x_adv.detach()


def fgsm_examples(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    clamp: tuple[float, float] | None = None,
) -> torch.Tensor:
    """``x + eps * sign(grad_x loss_fn(model(x), y))`` at the current weights, in the model's current mode.

    Parameter gradients (``.grad``) and BatchNorm running statistics are left as they were.
    """
    x_in = x.detach().requires_grad_(True)
    with frozen_bn_stats(model):
        loss = loss_fn(model(x_in), y)
        (grad_x,) = torch.autograd.grad(loss, x_in)
    return _perturb(x, grad_x, eps, clamp)


@dataclass(frozen=True)
class FGSMStep:
    """An FGSM adversarial-training step function for :func:`~batchgap.train.train`."""

    eps: float
    mix: float = 0.5
    clamp: tuple[float, float] | None = None
    name: ClassVar[str] = "fgsm"

    def __call__(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 loss_fn) -> torch.Tensor:
        if self.mix == 1:
            clean = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            clean.backward()
            optimizer.step()
            return clean.detach()
        x_in = x.detach().requires_grad_(True)
        clean = loss_fn(model(x_in), y)
        (grad_x,) = torch.autograd.grad(clean, x_in, retain_graph=True)
        x_adv = _perturb(x, grad_x, self.eps, self.clamp)
        with frozen_bn_stats(model):
            adversarial = loss_fn(model(x_adv), y)
        total = self.mix * clean + (1 - self.mix) * adversarial
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return clean.detach()

    def protocol(self) -> dict:
        return {"remedy": "fgsm", "eps": self.eps, "mix": self.mix, "clamp": self.clamp,
                "objective": "mix * L(x) + (1 - mix) * L(x + eps sign(grad_x L(x)))",
                "bn": "adversarial pass does not update running statistics", "loss": "clean mini-batch loss"}


def fgsm_step(eps: float, mix: float = 0.5, clamp: tuple[float, float] | None = None) -> FGSMStep:
    """FGSM adversarial training (Goodfellow et al. 2015; Keskar et al. 2017 appendix E.3): train on
    ``mix * L(x) + (1 - mix) * L(x + eps sign(grad_x L(x)))``. Returns a step function for
    :func:`~batchgap.train.train`."""
    eps = check_number("fgsm", "eps", eps)
    mix = check_number("fgsm", "mix", mix, high=1.0)
    if clamp is not None:
        try:
            low, high = (float(v) for v in clamp)
        except (TypeError, ValueError):
            raise UserError(f"remedy fgsm: option clamp must be a pair [low, high], got {clamp!r}") from None
        if not low < high:
            raise UserError(f"remedy fgsm: option clamp must have low < high, got {clamp!r}")
        clamp = (low, high)
    return FGSMStep(eps=eps, mix=mix, clamp=clamp)
