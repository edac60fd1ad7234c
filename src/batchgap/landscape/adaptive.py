"""Adaptive worst-case sharpness (Andriushchenko et al. 2023, elementwise adaptive, l_inf).

    S_rho(w; B) = max_{|delta_i| <= rho |w_i|}  L_B(w + delta) - L_B(w)

over the measured parameters (``params``, default ``"all"``), L_B the batch-weighted mean loss over
the examples B. Two statistics, named in every result and in the report:

* ``m=None``: n-sharpness, ONE maximum over all n examples of ``data`` (B = the data; in a study
  the training set or its seeded geometry subset).
* ``m``: m-sharpness, Andriushchenko et al.'s statistic: ``n_points`` examples (at most all of
  ``data``) drawn by ``torch.randperm`` from ``torch.Generator().manual_seed(seed)``, cut into
  ``n_points // m`` disjoint batches of m (a remainder is left out), and the MEAN over the batches
  of each batch's own maximum, (1/K) sum_k S_rho(w; B_k). Their code: m = 128 on 1024 training
  points, each maximum by 20 steps of APGD; here each by the solver below. A mean of batch maxima
  is the statistic (a max per batch), not a batch-mean estimate of a full-data quantity; the
  batches are equal in size. Each batch's maximum is at least its share of the full-data one, so
  m-sharpness >= n-sharpness on the same points.

Each maximum is solved by :func:`boxmax.maximize_in_box` (y = 0, corner steps u <- rho sign(grad_u L)
while L rises, then L-BFGS-B from the best point, ``max_iter`` iterations, at most ``max_fun``
evaluations, default ``1 + 4 * max_iter``; the best value over all evaluations is reported, the
final iterate beside it, ``capped`` when the evaluation cap ended a solve) in the normalized
coordinates u = delta / |w|, i.e. delta = |w| * u with the box |u_i| <= rho. Coordinates with
w_i = 0 cannot move.

Why normalized coordinates: under a ReLU rescaling (w1 -> c w1, w2 -> w2 / c, no BN) the function
of u is unchanged, so the solver takes the same path and the measure is invariant up to float
rounding, not merely up to solver tolerance.

BN protocol as in :mod:`sharpness` (one protocol for all batches; ``"recompute"`` recomputes the
statistics once, on ``bn_data`` or all of ``data``). The model is restored bit for bit.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset as TorchDataset, IterableDataset, Subset, TensorDataset

from .boxmax import SOLVER, START, default_max_fun, maximize_in_box
from . import ranks
from .functional import FullDataLoss, objective_fields, session
from .objective import as_objective
from .params import describe_params
from .protocol import Measured
from .evaluate import bn_protocol

PERTURBATION_SET = "|delta_i| <= rho |w_i| (elementwise adaptive, l_inf); solved in u = delta/|w|"


@dataclass(frozen=True)
class AdaptiveSharpnessResult(Measured):
    """What :func:`adaptive_sharpness` returns: the value, each batch's maximum, the solver's record, the protocol."""

    value: float  # n-sharpness: max L(w + delta) - L(w) (best evaluation); m-sharpness: the mean of the batch maxima
    params_measured: str  # the measured parameters in words: trainable of all, frozen, tied (params.describe_params)
    value_final: float  # the same at the final iterate(s)
    relative: float  # value / (1 + L(w)) * 100, Keskar's normalization, for comparison
    rho: float
    perturbation_set: str
    variant: str  # "n-sharpness" or "m-sharpness"
    m: int | None  # batch size of m-sharpness; None for n-sharpness
    n_batches: int  # maxima taken (1 for n-sharpness)
    sampling: str  # which examples, in words (points count and seed for m-sharpness)
    seed: int | None  # the generator seed that drew the points (m-sharpness)
    batch_values: tuple  # each batch's maximum L_B(w + delta) - L_B(w)
    max_iter: int
    max_fun: int
    nit: int  # L-BFGS-B iterations, summed over the batches
    nfev: int  # full-data (full-batch) evaluations, summed over the batches
    f_x: float  # L(w) on the examples used
    f_best: float  # n-sharpness: max L; m-sharpness: the mean over the batches of each batch's max L
    f_final: float
    solver: str
    start: str
    stop: str  # each distinct stop message, with how many batches it ended
    capped: bool  # the evaluation cap ended at least one solve before its max_iter iterations
    capped_batches: int


_NOT_RANDOM_ACCESS = ("m-sharpness draws examples at random: pass a tensor pair, a TensorData or a map-style "
                      "dataset, not an iterable of batches")


def _pair(data):
    """``(inputs, targets)`` tensors of the data forms that hold them, else None."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        return data[0], data[1]
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        return data.tensors
    if (not isinstance(data, TorchDataset) and torch.is_tensor(getattr(data, "x", None))
            and torch.is_tensor(getattr(data, "y", None))):
        return data.x, data.y  # a TensorData
    return None


def _map_style(data) -> bool:
    return isinstance(data, TorchDataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__")


def _length(data) -> int:
    if (pair := _pair(data)) is not None:
        return len(pair[1])
    if _map_style(data):
        return len(data)
    raise ValueError(_NOT_RANDOM_ACCESS)


def _rows(data, idx: torch.Tensor):
    """The examples ``idx`` of ``data`` (a form :func:`_length` accepts), as data the measures read."""
    if (pair := _pair(data)) is not None:
        return pair[0][idx], pair[1][idx]
    return Subset(data, idx.tolist())


def adaptive_sharpness(
    model: nn.Module,
    data,
    rho: float = 1e-3,
    max_iter: int = 10,
    loss_fn=None,
    batch_size: int = 1000,
    bn: str = "eval",
    params: str = "all",
    max_fun: int | None = None,
    bn_data=None,
    m: int | None = None,
    n_points: int = 1024,
    seed: int = 0,
    objective=None,
) -> AdaptiveSharpnessResult:
    """Adaptive worst-case sharpness (Andriushchenko et al. 2023): n-sharpness or m-sharpness, with its protocol.

        S_rho(w; B) = max_{|delta_i| <= rho |w_i|} L_B(w + delta) - L_B(w)

    n-sharpness (``m=None``): one maximum over all of ``data``. m-sharpness: the mean over K = n_points // m
    disjoint random batches B_k of m examples of each batch's own maximum, (1/K) sum_k S_rho(w; B_k). Each
    maximum is solved in the coordinates u = delta / |w| (invariant to a ReLU rescaling) by
    :func:`boxmax.maximize_in_box`; the best value seen is a lower bound on the true maximum.

    Args:
        model: the trained model; restored bit for bit, also on error.
        data: the examples: a tensor pair, a TensorData, a map-style dataset or (n-sharpness only) an iterable
            of batches.
        rho: the box's relative half-width; must be > 0.
        max_iter: L-BFGS-B iterations per maximum (also bounds the corner steps).
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean; None for cross-entropy on logits.
        batch_size: examples per evaluation batch (memory only).
        bn: the BatchNorm protocol for all maxima: ``"eval"``, ``"batch"`` or ``"recompute"`` (once, at w).
        params: the measured parameters: ``"all"`` trainable, or ``"no-bn"``.
        max_fun: the hard cap on loss+gradient evaluations per maximum; None for ``1 + 4 * max_iter``.
        bn_data: the data ``"recompute"`` recomputes the BatchNorm statistics on; None for ``data``.
        objective: how a batch becomes a loss (:mod:`objective`): an Objective, a ready name or a callable
            ``objective(model, batch) -> (loss_sum, weight)``; None for ``(inputs, targets)`` pairs and ``loss_fn``.
        m: None for n-sharpness, else the batch size of m-sharpness (a positive int, at most the points drawn).
        n_points: m-sharpness: how many examples are drawn (at most all of ``data``; a remainder is left out).
        seed: m-sharpness: seeds the ``torch.Generator`` whose ``randperm`` draws the examples.

    Returns:
        An :class:`AdaptiveSharpnessResult`: ``value`` (n-sharpness, or the mean of the batch maxima),
        ``value_final``, ``relative`` (value / (1 + L(w)) * 100), ``batch_values``, the solver's iterations,
        evaluations and stops, ``capped``, and the protocol (variant, m, sampling, seed, BN mode, parameters).

    Cost:
        n-sharpness: at most ``max_fun`` full-data forward+backward passes (41 for ``max_iter=10``).
        m-sharpness: at most ``max_fun`` passes over each of the K batches, so about ``max_fun`` passes over
        the ``K m`` points drawn. Memory of one batch's graph plus a few float64 vectors of the parameters' size.
    """
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    max_fun = default_max_fun(max_iter) if max_fun is None else max_fun
    if m is None:
        parts, sampling, used, k = [data], None, None, 1
    else:
        total = _length(data)
        if isinstance(m, bool) or not isinstance(m, int) or m < 1 or n_points < 1:
            raise ValueError(f"m and n_points must be positive ints, got m={m!r}, n_points={n_points!r}")
        used = min(n_points, total)
        k = used // m
        if k < 1:
            raise ValueError(f"m = {m} is larger than the {used} points available "
                             f"(n_points={n_points}, data of {total})")
        idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: k * m]
        parts = [_rows(data, idx[j * m : (j + 1) * m]) for j in range(k)]
        sampling = (f"{k} disjoint batches of m = {m}: {k * m} of the {total} examples (n_points = {n_points}"
                    + (f", a remainder of {used - k * m} left out" if used > k * m else "")
                    + f") drawn by torch.randperm, seed {seed}")
    results, n_seen = [], 0
    obj = as_objective(objective, loss_fn)
    with session(model, bn, data, bn_data, batch_size, obj):
        def solve(part):
            F = FullDataLoss(model, part, None, batch_size, params, objective=obj)
            scale = F.x0.abs()

            def apply(u: torch.Tensor, scale=scale) -> torch.Tensor:
                return scale * u.to(scale.dtype)

            return maximize_in_box(F, apply, apply, np.full(F.num_params, rho), max_iter, max_fun), F.n, F.num_params

        # n-sharpness: one problem over all the data; m-sharpness: the batches, spread over the processes
        for result, n_part, num_params in ([solve(data)] if m is None else ranks.spread(solve, parts)):
            results.append(result)
            n_seen += n_part
        bn_description = bn_protocol(model, bn, batch_size, bn_data)
    if sampling is None:
        sampling = f"all {n_seen} examples of the data, one maximum"
    values = tuple(r.f_best - r.f0 for r in results)
    f_x = float(np.mean([r.f0 for r in results]))
    value = float(np.mean(values))
    stops = Counter(r.stop for r in results)
    return AdaptiveSharpnessResult(
        value=value, value_final=float(np.mean([r.f_final - r.f0 for r in results])),
        relative=value / (1 + f_x) * 100, rho=rho, perturbation_set=PERTURBATION_SET,
        variant="n-sharpness" if m is None else "m-sharpness", m=m, n_batches=k, sampling=sampling,
        seed=None if m is None else seed, batch_values=values,
        max_iter=max_iter, max_fun=max_fun, nit=sum(r.nit for r in results), nfev=sum(r.nfev for r in results),
        f_x=f_x, f_best=float(np.mean([r.f_best for r in results])),
        f_final=float(np.mean([r.f_final for r in results])), n=n_seen, bn=bn, bn_description=bn_description,
        params=params, num_params=num_params, params_measured=describe_params(model, params), batch_size=batch_size,
        **objective_fields(obj),
        solver=SOLVER, start=START,
        stop="; ".join(s if c == 1 and len(results) == 1 else f"{c} x [{s}]" for s, c in stops.items()),
        capped=any(r.capped for r in results), capped_batches=sum(r.capped for r in results),
    )
