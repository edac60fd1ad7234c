"""Flat views of a model's parameters, and save/restore of parameters AND buffers.

Every measurement in :mod:`batchgap.landscape` perturbs a model in place and must hand it back
exactly as it found it: parameter values, buffer values (BatchNorm running statistics and counters),
``requires_grad`` flags, and each module's train/eval flag. :func:`preserved` does that, also when
the body raises.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, _BN_TYPES)


def snapshot(model: nn.Module) -> dict:
    """A deep copy of everything :func:`restore` puts back."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "bn_momentum": {n: m.momentum for n, m in model.named_modules() if is_batchnorm(m)},
        "bn_track": {n: m.track_running_stats for n, m in model.named_modules() if is_batchnorm(m)},
    }


@torch.no_grad()
def restore(model: nn.Module, snap: dict) -> None:
    """Put back parameters, buffers, flags, BN momenta and ``track_running_stats`` bit for bit."""
    for n, p in model.named_parameters():
        p.copy_(snap["params"][n])
        p.requires_grad_(snap["requires_grad"][n])
    for n, b in model.named_buffers():
        b.copy_(snap["buffers"][n])
    for n, m in model.named_modules():
        m.training = snap["training"][n]
        if n in snap["bn_momentum"]:
            m.momentum = snap["bn_momentum"][n]
        if n in snap.get("bn_track", {}):
            m.track_running_stats = snap["bn_track"][n]


@contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """``with preserved(model): ...`` leaves ``model`` bit-for-bit as it was, even on error."""
    snap = snapshot(model)
    try:
        yield model
    finally:
        restore(model, snap)


def named_parameters(model: nn.Module, which: str = "all") -> list[tuple[str, nn.Parameter]]:
    """The parameters a measurement perturbs.

    ``which``: ``"all"`` (every trainable parameter, BN affine included, as Keskar's x), or
    ``"no-bn"`` (everything but BatchNorm weight and bias).
    """
    if which not in ("all", "no-bn"):
        raise ValueError(f"which must be 'all' or 'no-bn', not {which!r}")
    out = []
    for mname, module in model.named_modules():
        if which == "no-bn" and is_batchnorm(module):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                out.append((f"{mname}.{pname}" if mname else pname, p))
    return out


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One detached 1-D copy of ``tensors`` laid end to end."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


@torch.no_grad()
def set_flat(tensors: Sequence[torch.Tensor], vector: torch.Tensor) -> None:
    """Write ``vector`` back into ``tensors`` in the order :func:`flat` read them."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(vector[offset : offset + n].view_as(t))
        offset += n
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, parameters have {offset}")


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split ``vector`` into views shaped like ``like``.

    One ``torch.split``, not a slice per tensor: the gradient of a slice is a zero tensor the size of
    the whole vector with the slice filled in, so with a slice per tensor the backward pass wrote and
    added one full-size vector per parameter tensor (on VGG-16, 30 x 15M entries: 5x the cost of the
    network's own backward pass); the gradient of a split is one concatenation.
    """
    return [p.view(t.shape) for p, t in zip(torch.split(vector, [t.numel() for t in like]), like)]


def distance(model_a: nn.Module, model_b: nn.Module | dict, which: str = "all") -> float:
    """Euclidean distance between two models' parameters (``model_b`` may be a state dict)."""
    pa = dict(named_parameters(model_a, which))
    pb = dict(model_b.named_parameters()) if isinstance(model_b, nn.Module) else model_b
    total = 0.0  # float64 sums of squares, added in parameter order (wherever the tensors live)
    for name, p in pa.items():
        total += float((p.detach().double() - pb[name].detach().to(p.device).double()).pow(2).sum())
    return float(torch.tensor(total, dtype=torch.float64).sqrt())
