"""Conservative training (Keskar et al. 2017, appendix E.2): a proximal step on each mini-batch.

Each step approximately solves::

    x_{k+1} = argmin_x  (1/|B_k|) sum_{i in B_k} f_i(x) + (lambda/2) ||x - x_k||^2

with ``inner_steps`` iterations of the run's own optimizer (the paper: 3 ADAM iterations,
lambda = 1e-3). Inner iteration j (x^0 = x_k) takes the optimizer step with the gradient::

    grad f_B(x^j) + lambda (x^j - x_k)

Every choice, stated:

- The anchor x_k is the weights at the start of the step, copied before the first inner iteration;
  ||.|| is the l2 norm over every parameter the optimizer updates (BN affine included).
- All inner iterations use the same mini-batch B_k. The proximal term is added to the gradient, not
  to the loss, so the optimizer's own weight decay (if any) still acts as in a plain step.
- Each inner iteration is one ``optimizer.step()``: ADAM's moments and step count advance
  ``inner_steps`` times per batch, and the learning rate is the one :func:`~batchgap.train.train` set
  for this batch. With ``lambda = 0`` and ``inner_steps = 1`` the step is exactly the plain step.
- BatchNorm: every inner pass normalizes with the batch's statistics (train mode), but only the first
  updates the running statistics, so each batch is counted once, as in a plain step.
- Returned: the mini-batch loss at x_k (first inner iteration, without the proximal term), so the
  training-loss history compares with the plain step's.

Cost: ``inner_steps`` forward and backward passes per step.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ._bn import frozen_bn_stats
from ._common import check_int, check_number, optimizer_params

__all__ = ["ProximalStep", "proximal_step"]


@dataclass(frozen=True)
class ProximalStep:
    """A conservative-training step function for :func:`~batchgap.train.train`."""

    lam: float = 1e-3
    inner_steps: int = 3
    name: ClassVar[str] = "proximal"

    def __call__(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 loss_fn) -> torch.Tensor:
        params = optimizer_params(optimizer)
        with torch.no_grad():
            anchor = [p.detach().clone() for p in params]
        first_loss = None
        for j in range(self.inner_steps):
            with frozen_bn_stats(model) if j > 0 else nullcontext():
                loss = loss_fn(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            if self.lam != 0:
                with torch.no_grad():
                    for p, a in zip(params, anchor):
                        # a parameter without a gradient (unused by the forward) is skipped by the
                        # optimizer, never leaves x_k, and so needs no pull back to it
                        if p.grad is not None:
                            p.grad.add_(p - a, alpha=self.lam)
            optimizer.step()
            if first_loss is None:
                first_loss = loss.detach()
        return first_loss

    def protocol(self) -> dict:
        return {"remedy": "proximal", "lambda": self.lam, "inner_steps": self.inner_steps,
                "anchor": "weights at the start of the step",
                "bn": "first inner pass only updates running statistics",
                "loss": "mini-batch loss at the anchor, without the proximal term"}


def proximal_step(lam: float = 1e-3, inner_steps: int = 3) -> ProximalStep:
    """Conservative training (Keskar et al. 2017, appendix E.2): ``inner_steps`` optimizer iterations on
    ``f_B(x) + (lam/2) ||x - x_k||^2`` per batch. Returns a step function for :func:`~batchgap.train.train`."""
    return ProximalStep(lam=check_number("proximal", "lam", lam),
                        inner_steps=check_int("proximal", "inner_steps", inner_steps))
