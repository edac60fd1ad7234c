"""The training step: the signature every remedy shares, and the plain step.

A step takes the model, its optimizer, one batch and the loss function, performs one update and returns
the batch's mean loss (detached). :func:`batchgap.train.train` calls ``step`` once per batch; remedies
that change the update (SAM, conservative training, adversarial examples; :mod:`batchgap.remedies`) are
functions of this same signature. This module depends on torch alone, so the configuration can validate
a remedy's options without importing the training loop. The plain step's faster twin for Linear/BatchNorm1d/
ReLU chains, on torch's private API, is :mod:`batchgap.chainstep`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             loss_fn: LossFn) -> torch.Tensor:
    """The plain step: one forward, one backward, one optimizer step. Returns the batch's mean loss."""
    loss = loss_fn(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


Step = Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor, LossFn], torch.Tensor]


def objective_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch, objective) -> tuple[torch.Tensor, float]:
    """The plain step through an objective (:mod:`batchgap.landscape.objective`) on a batch of any form: one
    forward, one backward of the batch's mean loss over its units, one optimizer step. Returns the mean (detached)
    and the units it averaged (its weight: examples, or tokens of a language model)."""
    out = objective(model, batch)
    optimizer.zero_grad(set_to_none=True)
    out.mean.backward()
    optimizer.step()
    return out.mean.detach(), out.weight
