"""Full-dataset loss and accuracy on an explicit protocol.

A full-dataset quantity is the batch-size weighted mean over every example: the sum of per-batch mean
losses times batch sizes, divided by the number of examples. Never a mean of batch means, never one batch.

BatchNorm at evaluation is one of:

* ``"eval"``: the module's own eval behaviour. Running statistics when the model tracks them; batch
  statistics when it was built with ``track_running_stats=False`` (the official Keras code's ``mode=2``).
* ``"batch"``: statistics of each evaluation batch, whatever the model tracks (results then depend on
  ``batch_size``, which the protocol records).
* ``"recompute"``: running statistics recomputed as an exact average over ``bn_data`` (default: the data
  evaluated), then eval mode. Right for points the model never trained at (interpolations, perturbations).

Dropout is always off. The model comes back exactly as it was (:func:`params.preserved`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .params import is_batchnorm, preserved

BN_MODES = ("eval", "batch", "recompute")

Data = "tuple[torch.Tensor, torch.Tensor] | Iterable[tuple[torch.Tensor, torch.Tensor]]"
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Metrics:
    loss: float
    accuracy: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def batches(data, batch_size: int = 1000) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches from a tensor pair (sliced in order) or pass an iterable through."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        x, y = data
        if len(x) != len(y):
            raise ValueError(f"inputs have {len(x)} rows but targets have {len(y)}")
        for start in range(0, len(y), batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
    elif hasattr(data, "x") and hasattr(data, "y"):  # a TensorData
        yield from batches((data.x, data.y), batch_size)
    else:
        yield from data


def model_bn_semantics(model: nn.Module) -> str:
    """What "eval" BatchNorm means for this model, in words, for protocols."""
    bns = [m for m in model.modules() if is_batchnorm(m)]
    if not bns:
        return "none"
    tracked = {m.track_running_stats for m in bns}
    if tracked == {True}:
        return "running"
    if tracked == {False}:
        return "batch"
    return "mixed"


def describe_bn(model: nn.Module, bn: str, batch_size: int) -> str:
    """The BN protocol in words, e.g. 'running statistics' or 'batch statistics (eval batch 1000)'."""
    semantics = model_bn_semantics(model)
    if semantics == "none":
        return "no BatchNorm"
    if bn == "recompute":
        return "running statistics recomputed on the evaluation data"
    if bn == "batch" or semantics == "batch":
        return f"batch statistics (eval batch {batch_size})"
    return "running statistics" if semantics == "running" else "mixed running/batch statistics"


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, data, batch_size: int = 1000) -> None:
    """Replace every tracking BN layer's running statistics by the exact average over ``data``.

    Runs BN layers alone in train mode (dropout stays off) with cumulative averaging. Changes the
    model's buffers on purpose: call it inside :func:`params.preserved` to keep the original.
    """
    bns = [m for m in model.modules() if is_batchnorm(m) and m.track_running_stats]
    if not bns:
        return
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over batches
        m.train()
    for x, _ in batches(data, batch_size):
        model(x)
    model.eval()


def set_bn_mode(model: nn.Module, bn: str) -> None:
    """Put ``model`` in eval mode, then BN layers in train mode for ``bn == "batch"``.

    Use inside :func:`params.preserved`: batch mode updates running statistics as a side effect.
    """
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, not {bn!r}")
    model.eval()
    if bn == "batch":
        for m in model.modules():
            if is_batchnorm(m):
                m.train()


def mean_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data,
    loss_fn: LossFn | None = None,
    batch_size: int = 1000,
    bn: str = "eval",
    bn_data=None,
) -> Metrics:
    """Batch-weighted mean loss and accuracy of ``model`` over all of ``data``.

    ``loss_fn(outputs, targets)`` must return the mean over the batch (default: cross-entropy).
    Accuracy is top-1 for class-index targets, ``nan`` when targets are not class indices.
    """
    loss_fn = loss_fn or mean_cross_entropy
    with preserved(model):
        if bn == "recompute":
            recompute_bn_statistics(model, data if bn_data is None else bn_data, batch_size)
            set_bn_mode(model, "eval")
        else:
            set_bn_mode(model, bn)
        total_loss = torch.zeros((), dtype=torch.float64)
        correct, n = 0, 0
        classify = True
        for x, y in batches(data, batch_size):
            out = model(x)
            total_loss += loss_fn(out, y).double() * len(y)
            if classify and out.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
                correct += int((out.argmax(dim=1) == y).sum())
            else:
                classify = False
            n += len(y)
    if n == 0:
        raise ValueError("no data to evaluate")
    return Metrics(loss=float(total_loss / n), accuracy=correct / n if classify else float("nan"), n=n)
