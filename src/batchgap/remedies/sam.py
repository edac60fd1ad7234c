"""Sharpness-aware minimization: SAM (Foret et al. 2021) and adaptive SAM, ASAM (Kwon et al. 2021).

With g = grad f_B(w) the mini-batch gradient at the current weights w, one step is::

    SAM:   e = rho * g / ||g||
    ASAM:  e = rho * T^2 g / ||T g||,   T = |w| + eta  (elementwise; eta = 0.01 as in Kwon et al.)
    then   g_sam = grad f_B(w + e),  w <- optimizer step from w with gradient g_sam

where ||.|| is ONE l2 norm over all the parameters the optimizer updates, laid end to end (not a
norm per layer), and f_B is the same mini-batch at both points. Every choice, stated:

- Parameters: those in the optimizer's parameter groups with ``requires_grad``, BatchNorm affine
  parameters and biases included, each perturbed like the rest. ASAM's T = |w| + eta applies to every
  one of them; Kwon et al.'s code uses T = 1 for parameters whose name lacks "weight" (biases, but
  also BN's ``bias``), which this version does not single out. A parameter that got no gradient
  (unused in the forward pass) is not perturbed.
- A zero gradient (||g|| = 0, or ||T g|| = 0) gives e = 0: the step is then the plain step. No small
  constant is added to the denominator (Foret's code adds 1e-12), so e is exactly the formula.
- The weights are put back by copying a saved copy of w (not by subtracting e), so the optimizer
  steps from w bit for bit; momentum, Adam moments and weight decay act as in a plain step, on g_sam.
- BatchNorm: both passes run in the model's current mode (train mode in :func:`~batchgap.train.train`),
  so each normalizes with its own batch statistics; the second pass does NOT update running statistics
  (:func:`~batchgap.remedies.frozen_bn_stats`): after a step they are exactly those of one plain
  forward on the batch, and ``num_batches_tracked`` advanced by one.
- Dropout draws fresh masks in the second pass (from the global RNG, as any forward pass).
- Returned: the mini-batch loss at w (first pass), detached, as :func:`~batchgap.step.sgd_step`.

Cost: two forward and two backward passes per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import UserError
from ._bn import frozen_bn_stats
from ._common import check_number, optimizer_params

__all__ = ["SAMStep", "asam_step", "sam_perturbation", "sam_step"]


@torch.no_grad()
def sam_perturbation(
    params: list[torch.Tensor], rho: float, adaptive: bool = False, eta: float = 0.01
) -> list[torch.Tensor | None]:
    """The perturbation e for each parameter from its current ``.grad`` (None where there is none).

    SAM: ``rho g / ||g||``; ASAM: ``rho T^2 g / ||T g||`` with ``T = |w| + eta``; norms global l2.
    """
    grads = [p.grad for p in params]
    scaled = [None if g is None else (g * (p.abs() + eta) if adaptive else g) for p, g in zip(params, grads)]
    present = [s for s in scaled if s is not None]
    if not present:
        return [None] * len(params)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in present]))
    if norm == 0:
        return [None if g is None else torch.zeros_like(g) for g in grads]
    out = []
    for p, s in zip(params, scaled):
        if s is None:
            out.append(None)
        else:
            # adaptive: T^2 g / ||T g|| = T (T g) / ||T g||
            out.append(rho * ((p.abs() + eta) * s if adaptive else s) / norm)
    return out


@dataclass(frozen=True)
class SAMStep:
    """A SAM / ASAM step function for :func:`~batchgap.train.train` (see the module docstring)."""

    rho: float = 0.05
    adaptive: bool = False
    eta: float = 0.01
    name: ClassVar[str] = "sam"

    def __call__(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 loss_fn) -> torch.Tensor:
        params = optimizer_params(optimizer)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        perturbation = sam_perturbation(params, self.rho, self.adaptive, self.eta)
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            for p, e in zip(params, perturbation):
                if e is not None:
                    p.add_(e)
        try:
            with frozen_bn_stats(model):
                perturbed_loss = loss_fn(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                perturbed_loss.backward()
        finally:
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
        optimizer.step()
        return loss.detach()

    def protocol(self) -> dict:
        return {"remedy": "asam" if self.adaptive else "sam", "rho": self.rho,
                **({"eta": self.eta} if self.adaptive else {}),
                "norm": "global l2 over the optimizer's parameters",
                "bn": "second pass does not update running statistics", "loss": "at w"}


def sam_step(rho: float = 0.05, adaptive: bool = False, eta: float = 0.01) -> SAMStep:
    """SAM (Foret et al. 2021, rho 0.05) or, with ``adaptive=True``, ASAM (Kwon et al. 2021).

    ``e = rho g/||g||`` (SAM) or ``rho T^2 g/||T g||``, ``T = |w| + eta`` (ASAM); the optimizer steps
    from w with the gradient at ``w + e``. Returns a step function ``step(model, optimizer, x, y, loss_fn)``.
    """
    if not isinstance(adaptive, bool):
        raise UserError(f"remedy sam: option adaptive must be true or false, got {adaptive!r}")
    name = "asam" if adaptive else "sam"
    return SAMStep(rho=check_number(name, "rho", rho), adaptive=adaptive, eta=check_number(name, "eta", eta))


def asam_step(rho: float = 0.5, eta: float = 0.01) -> SAMStep:
    """ASAM (Kwon et al. 2021): :func:`sam_step` with ``adaptive=True``.

    Defaults rho 0.5 and eta 0.01, those of Kwon et al.'s official code and CIFAR-10 runs (ASAM's
    perturbation is scaled by T ~ |w|, so its radius is larger than SAM's 0.05).
    """
    return sam_step(rho=rho, adaptive=True, eta=eta)
