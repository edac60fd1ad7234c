"""1-D loss curves and 2-D loss surfaces around a trained model along given directions.

    curve:    L(theta* + alpha d)                 for alpha in alphas          -> shape (len(alphas),)
    surface:  L(theta* + alpha d1 + beta d2)      for alpha, beta in the grid  -> shape (len(alphas), len(betas))

Every point is built fresh from the centre theta* (no accumulated drift), over all trainable
parameters, each tensor once (a tied tensor is one block of the direction; ``params_measured`` in the
result says which, with the counts); a symmetric grid must contain 0 (:func:`protocol.as_grid`), and alpha = beta = 0 is
theta* exactly. Loss and accuracy are full-data, batch-weighted (as :func:`evaluate.evaluate`).

BatchNorm (``bn``), recorded in the result:

* ``"eval"`` (default): the centre's running statistics at every point (or batch statistics for
  ``track_running_stats=False`` models);
* ``"batch"``: each evaluation batch's statistics;
* ``"recompute"``: running statistics recomputed exactly at every point on ``bn_data`` (default
  ``data``; :func:`evaluate.recompute_bn_statistics`: one pass per BN layer, per point).

Cost: one forward pass over ``data`` per point (plus the recomputation's passes for "recompute").

Two evaluation methods, equal to float rounding (tested):

* batch-outer (``fast=True``, used for "eval" and "batch"): each data batch is read once and every
  point is evaluated on it with ``torch.func.functional_call`` (no parameter is written), one point
  at a time (``chunk=1``) or ``torch.func.vmap`` over ``chunk`` stacked parameter vectors.
  ``chunk=None`` picks 1 on the CPU and 16 on an accelerator. What batch-outer saves is reading the
  data: one pass over ``data`` for all points (measured timings: docs/measures.md, "Notes by module").
* point-outer (``fast=False``, and always for "recompute", whose statistics differ per point): one
  :func:`evaluate.evaluate` per point, the straightforward reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .evaluate import BN_MODES, describe_bn, evaluate
from .functional import FullDataLoss, objective_fields, session
from .objective import as_objective
from .params import describe_params, flat, named_parameters, preserved, set_flat
from .protocol import as_grid, data_size_name, frozen_array, jsonable


@dataclass(frozen=True)
class CurveResult:
    """What :func:`loss_curve` returns: loss and accuracy per alpha, the norms and the protocol."""

    alphas: np.ndarray
    loss: np.ndarray  # (len(alphas),)
    accuracy: np.ndarray
    n: int
    direction: str
    direction_norm: float
    center_norm: float
    bn: str
    bn_description: str
    bn_data: str
    batch_size: int
    method: str
    loss_fn: str
    params_measured: str  # the perturbed parameters in words: trainable of all tensors, tied names
    objective: str  # the batch form and where the loss comes from (objective.Objective.kind)
    unit: str  # what n counts: examples, or tokens for a language model
    world_size: int = 1  # processes that shared the data (ranks.py)
    backend: str | None = None

    def as_dict(self) -> dict:
        return jsonable(self)


@dataclass(frozen=True)
class SurfaceResult:
    """What :func:`loss_surface` returns: loss and accuracy on the alphas x betas grid, and the protocol."""

    alphas: np.ndarray
    betas: np.ndarray
    loss: np.ndarray  # (len(alphas), len(betas))
    accuracy: np.ndarray
    n: int
    directions: tuple[str, str]
    direction_norms: tuple[float, float]
    center_norm: float
    bn: str
    bn_description: str
    bn_data: str
    batch_size: int
    method: str
    loss_fn: str
    params_measured: str
    objective: str
    unit: str
    world_size: int = 1
    backend: str | None = None

    def as_dict(self) -> dict:
        return jsonable(self)


def flat_direction(model: nn.Module, direction) -> torch.Tensor:
    """A direction as one flat vector over ``named_parameters(model, "all")``.

    Accepts a dict ``{name: tensor}`` (missing names are 0), a list/tuple aligned with those
    parameters, or a flat tensor of the right length.
    """
    named = named_parameters(model, "all")
    if torch.is_tensor(direction):
        total = sum(p.numel() for _, p in named)
        if direction.numel() != total:
            raise ValueError(f"direction has {direction.numel()} entries, parameters have {total}")
        return direction.detach().reshape(-1).to(dtype=named[0][1].dtype, device=named[0][1].device)
    if isinstance(direction, dict):
        unknown = set(direction) - {n for n, _ in named}
        if unknown:
            raise ValueError(f"direction names not among the model's trainable parameters: {sorted(unknown)[:3]}")
        parts = [direction.get(n, torch.zeros_like(p)) for n, p in named]
    else:
        parts = list(direction)
        if len(parts) != len(named):
            raise ValueError(f"direction has {len(parts)} tensors, the model {len(named)} trainable parameters")
    for (n, p), t in zip(named, parts):
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"direction for {n} has shape {tuple(t.shape)}, parameter {tuple(p.shape)}")
    return torch.cat([t.detach().to(dtype=p.dtype, device=p.device).reshape(-1) for (_, p), t in zip(named, parts)])


def _grid_values(model, directions, coeffs, data, obj, batch_size, bn, bn_data, fast, chunk):
    """Loss and accuracy at theta* + coeffs[i] @ D for every row of ``coeffs`` (P, k)."""
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, not {bn!r}")
    params = [p for _, p in named_parameters(model, "all")]
    x0 = flat(params)
    D = torch.stack(directions)
    C = torch.as_tensor(coeffs, dtype=x0.dtype, device=x0.device)

    def point(rows: torch.Tensor) -> torch.Tensor:
        return x0 + rows @ D

    if fast and bn != "recompute":
        with session(model, bn, objective=obj):
            F = FullDataLoss(model, data, None, batch_size, "all", objective=obj)
            if chunk is None:
                chunk = 1 if x0.device.type == "cpu" else 16
            loss, acc, _ = F.values_at_rows(point, C, chunk)
            n = F.n
        how = "one point at a time" if chunk == 1 else f"vmap over {chunk} points"
        return loss.numpy(), acc.numpy(), n, f"each data batch read once, all points evaluated on it ({how})"
    losses, accs = [], []
    with preserved(model):
        for row in C:
            set_flat(params, point(row[None])[0])
            m = evaluate(model, data, None, batch_size, bn=bn, bn_data=bn_data, objective=obj)
            losses.append(m.loss)
            accs.append(m.accuracy)
    return np.array(losses), np.array(accs), m.n, "one evaluate() per point"


def _common(model, data, obj, batch_size, bn, bn_data, method):
    return dict(
        bn=bn,
        bn_description=describe_bn(model, bn, batch_size),
        bn_data=("not used" if bn != "recompute"
                 else "the evaluated data" if bn_data is None else f"caller's bn_data ({data_size_name(bn_data)})"),
        batch_size=batch_size,
        method=method,
        params_measured=describe_params(model, "all"),
        **objective_fields(obj),
    )


def loss_curve(model: nn.Module, direction, data, alphas=None, loss_fn=None, batch_size: int = 1000,
               bn: str = "eval", bn_data=None, fast: bool = True, chunk: int | None = None,
               objective=None) -> CurveResult:
    """The loss and accuracy along one direction from the trained parameters theta*.

        L(theta* + alpha d)    for alpha in alphas,    L the full-data, batch-weighted mean loss

    Every point is set fresh from theta*; alpha = 0 is theta* exactly. The model is restored bit for bit.

    Args:
        model: the trained model (its parameters are theta*).
        direction: d over the trainable parameters: a dict ``{name: tensor}`` (missing names 0, e.g. a
            :func:`filter_normalized_direction`), a list aligned with them, or a flat tensor.
        data: the data the loss is taken over: a tensor pair, a TensorData, a map-style dataset or an iterable
            of batches.
        alphas: the grid, which must contain 0 when symmetric; None for 21 points in [-1, 1].
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean; None for cross-entropy on logits.
        batch_size: examples per evaluation batch (memory only).
        bn: the BatchNorm protocol: ``"eval"`` (the centre's statistics), ``"batch"`` or ``"recompute"`` (at
            every point).
        bn_data: the data ``"recompute"`` recomputes the BatchNorm statistics on; None for ``data``.
        fast: evaluate batch-outer (each data batch read once for all points); ``"recompute"`` is always
            point-outer. Equal values to float rounding.
        chunk: batch-outer only: points per ``torch.func.vmap`` call; None for 1 on the CPU, 16 on an
            accelerator.
        objective: how a batch becomes a loss (:mod:`objective`): an Objective, a ready name or a callable
            ``objective(model, batch) -> (loss_sum, weight)``; None for ``(inputs, targets)`` pairs and ``loss_fn``.

    Returns:
        A :class:`CurveResult`: ``alphas``, ``loss`` and ``accuracy`` (each of shape ``(len(alphas),)``),
        ``direction_norm``, ``center_norm`` and the protocol (BN mode, data size, method, parameters).

    Cost:
        One forward pass over ``data`` per point (batch-outer: one read of the data for all points), plus, for
        ``"recompute"``, about (L + 1) / 2 forward passes over ``bn_data`` per point (L BatchNorm layers).
    """
    alphas = as_grid(np.linspace(-1.0, 1.0, 21) if alphas is None else alphas, "alphas")
    d = flat_direction(model, direction)
    obj = as_objective(objective, loss_fn)
    loss, acc, n, method = _grid_values(model, [d], alphas[:, None], data, obj, batch_size, bn, bn_data,
                                        fast, chunk)
    return CurveResult(
        alphas=frozen_array(alphas), loss=frozen_array(loss), accuracy=frozen_array(acc), n=n,
        direction=getattr(direction, "protocol", "caller's direction"),
        direction_norm=float(d.double().norm()),
        center_norm=float(flat([p for _, p in named_parameters(model, "all")]).double().norm()),
        **_common(model, data, obj, batch_size, bn, bn_data, method),
    )


def loss_surface(model: nn.Module, d1, d2, data, alphas=None, betas=None, loss_fn=None, batch_size: int = 1000,
                 bn: str = "eval", bn_data=None, fast: bool = True, chunk: int | None = None,
                 objective=None) -> SurfaceResult:
    """The loss and accuracy on a plane through the trained parameters theta*.

        L(theta* + alpha d1 + beta d2)    for alpha in alphas, beta in betas

    ``loss[i, j]`` is at ``(alphas[i], betas[j])``; the grids may differ in length. Every point is set fresh
    from theta*; the model is restored bit for bit.

    Args:
        model: the trained model (its parameters are theta*).
        d1: the first direction (the forms :func:`loss_curve` takes).
        d2: the second direction.
        data: the data the loss is taken over: a tensor pair, a TensorData, a map-style dataset or an iterable
            of batches.
        alphas: the grid along d1; None for 11 points in [-1, 1].
        betas: the grid along d2; None for 11 points in [-1, 1].
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean; None for cross-entropy on logits.
        batch_size: examples per evaluation batch (memory only).
        bn: the BatchNorm protocol: ``"eval"`` (the centre's statistics), ``"batch"`` or ``"recompute"`` (at
            every point).
        bn_data: the data ``"recompute"`` recomputes the BatchNorm statistics on; None for ``data``.
        fast: evaluate batch-outer (each data batch read once for all points); ``"recompute"`` is always
            point-outer. Equal values to float rounding.
        chunk: batch-outer only: points per ``torch.func.vmap`` call; None for 1 on the CPU, 16 on an
            accelerator.
        objective: how a batch becomes a loss (:mod:`objective`): an Objective, a ready name or a callable
            ``objective(model, batch) -> (loss_sum, weight)``; None for ``(inputs, targets)`` pairs and ``loss_fn``.

    Returns:
        A :class:`SurfaceResult`: ``alphas``, ``betas``, ``loss`` and ``accuracy`` (each of shape
        ``(len(alphas), len(betas))``), the directions' norms, ``center_norm`` and the protocol.

    Cost:
        One forward pass over ``data`` per grid point (``len(alphas) * len(betas)``; batch-outer: one read of
        the data for all points), plus, for ``"recompute"``, about (L + 1) / 2 passes over ``bn_data`` per point.
    """
    alphas = as_grid(np.linspace(-1.0, 1.0, 11) if alphas is None else alphas, "alphas")
    betas = as_grid(np.linspace(-1.0, 1.0, 11) if betas is None else betas, "betas")
    f1, f2 = flat_direction(model, d1), flat_direction(model, d2)
    A, B = np.meshgrid(alphas, betas, indexing="ij")
    coeffs = np.stack([A.reshape(-1), B.reshape(-1)], axis=1)
    obj = as_objective(objective, loss_fn)
    loss, acc, n, method = _grid_values(model, [f1, f2], coeffs, data, obj, batch_size, bn, bn_data,
                                        fast, chunk)
    shape = (len(alphas), len(betas))
    return SurfaceResult(
        alphas=frozen_array(alphas), betas=frozen_array(betas),
        loss=frozen_array(loss.reshape(shape)), accuracy=frozen_array(acc.reshape(shape)), n=n,
        directions=(getattr(d1, "protocol", "caller's direction"), getattr(d2, "protocol", "caller's direction")),
        direction_norms=(float(f1.double().norm()), float(f2.double().norm())),
        center_norm=float(flat([p for _, p in named_parameters(model, "all")]).double().norm()),
        **_common(model, data, obj, batch_size, bn, bn_data, method),
    )
