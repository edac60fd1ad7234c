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
    """Whether ``module`` is a BatchNorm layer (any subclass of torch's ``_BatchNorm``: 1-d to 3-d, synchronized)."""
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


# Every normalization layer with (optional) affine parameters: BatchNorm*/SyncBatchNorm and InstanceNorm*
# (``_NormBase``), LayerNorm, GroupNorm, RMSNorm; LocalResponseNorm / CrossMapLRN2d have none but are listed.
NORM_TYPES = tuple(t for t in (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None),
    nn.LocalResponseNorm, nn.CrossMapLRN2d) if t is not None)
PARAM_SELECTIONS = ("all", "no-bn", "no-norm")
_SELECTION_WORDS = {
    "all": "all trainable",
    "no-bn": "all trainable outside normalization layers (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm)",
}
_SELECTION_WORDS["no-norm"] = _SELECTION_WORDS["no-bn"]


def is_normalization(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer (``NORM_TYPES``): its parameters are left out by ``"no-bn"``."""
    return isinstance(module, NORM_TYPES)


def named_parameters(model: nn.Module, which: str = "all") -> list[tuple[str, nn.Parameter]]:
    """The parameters a measurement perturbs, each tensor ONCE, in ``model.named_parameters()`` order.

    ``which``: ``"all"`` (every trainable parameter, normalization affine included, as Keskar's x), or
    ``"no-bn"`` / its alias ``"no-norm"`` (everything but the parameters of normalization layers:
    BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm; :data:`NORM_TYPES`). Frozen tensors
    (``requires_grad=False``) are never measured. A tensor reachable under several names (tied weights,
    e.g. ``dec.weight = emb.weight``, or a module registered twice) appears once, under the name
    ``model.named_parameters()`` gives it (the first); :func:`tied_parameters` lists the others.
    """
    if which not in PARAM_SELECTIONS:
        raise ValueError(f"params must be one of {PARAM_SELECTIONS}, not {which!r}")
    skip: set[int] = set()
    if which != "all":  # a tensor used by any normalization layer is left out
        for _, module in model.named_modules(remove_duplicate=False):
            if is_normalization(module):
                skip.update(id(p) for p in module.parameters(recurse=False))
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in skip]


def tied_parameters(model: nn.Module) -> list[tuple[str, str]]:
    """``(alias, name)`` for every parameter name that refers to a tensor already listed under ``name``."""
    first = {id(p): n for n, p in model.named_parameters()}
    return [(n, first[id(p)]) for n, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != n]


def describe_params(model: nn.Module, which: str = "all") -> str:
    """What :func:`named_parameters` selects, in words with its counts, for protocols, e.g.
    ``"all trainable: 4 of 6 tensors, 63 of 99 entries; 2 frozen tensors left out"`` (+ the tied names)."""
    chosen, every = named_parameters(model, which), list(model.named_parameters())
    text = (f"{_SELECTION_WORDS[which]}: {len(chosen)} of {len(every)} tensors, "
            f"{sum(p.numel() for _, p in chosen)} of {sum(p.numel() for _, p in every)} entries")
    frozen = sum(not p.requires_grad for _, p in every)
    if frozen:
        text += f"; {frozen} frozen tensor{'s' * (frozen > 1)} (requires_grad=False) left out"
    ties = tied_parameters(model)
    if ties:
        text += "; tied tensors measured once: " + ", ".join(f"{a} = {n}" for a, n in ties)
    return text


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
    """Euclidean distance between two models' parameters (``model_b`` may be a state dict).

        ||theta_a - theta_b||_2 = sqrt(sum_i (theta_a,i - theta_b,i)^2),    summed in float64

    Over :func:`named_parameters` ``(model_a, which)``: trainable tensors, a tied tensor counted once
    (a state dict holds it under every name; the first name is read).

    Args:
        model_a: the first model; its parameter names select the tensors compared.
        model_b: the second model, or a state dict holding the same names.
        which: ``"all"`` trainable parameters, or ``"no-bn"`` (none of a normalization layer's).

    Returns:
        The distance as a float.

    Cost:
        One read of both parameter sets; no data pass.
    """
    pa = dict(named_parameters(model_a, which))
    pb = dict(model_b.named_parameters()) if isinstance(model_b, nn.Module) else model_b
    total = 0.0  # float64 sums of squares, added in parameter order (wherever the tensors live)
    for name, p in pa.items():
        total += float((p.detach().double() - pb[name].detach().to(p.device).double()).pow(2).sum())
    return float(torch.tensor(total, dtype=torch.float64).sqrt())
