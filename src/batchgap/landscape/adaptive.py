"""Adaptive worst-case sharpness (Andriushchenko et al. 2023, elementwise adaptive, l_inf).

    S_rho(w) = max_{|delta_i| <= rho |w_i|}  L(w + delta) - L(w)

over the measured parameters (``params``, default ``"all"``), L the full-data batch-weighted loss.

Solved approximately by the same solver as eps-sharpness (:func:`boxmax.maximize_in_box`: L-BFGS-B
from delta = 0 with the exact full-data gradient, ``max_iter`` iterations, at most ``max_fun``
evaluations, best value over all evaluations reported, final iterate beside it), in the normalized
coordinates u = delta / |w|, i.e. delta = |w| * u with the box |u_i| <= rho. Coordinates with
w_i = 0 cannot move.

Why normalized coordinates: under a ReLU rescaling (w1 -> c w1, w2 -> w2 / c, no BN) the function
of u is unchanged, so the solver takes the same path and the measure is invariant up to float
rounding, not merely up to solver tolerance. (Raw-coordinate L-BFGS-B would see gradients rescaled
by 1/c and c and could stop elsewhere.)

BN protocol as in :mod:`sharpness`. The model is restored bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .boxmax import SOLVER, maximize_in_box
from .functional import FullDataLoss, session
from .protocol import Measured
from .sharpness import bn_protocol, loss_fn_name


@dataclass(frozen=True)
class AdaptiveSharpnessResult(Measured):
    value: float  # max L(w + delta) - L(w) over the evaluations (best)
    value_final: float  # the same at the final iterate
    relative: float  # value / (1 + L(w)) * 100, Keskar's normalization, for comparison
    rho: float
    perturbation_set: str
    max_iter: int
    max_fun: int
    nit: int
    nfev: int
    f_x: float
    f_best: float
    f_final: float
    solver: str
    stop: str


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
) -> AdaptiveSharpnessResult:
    """S_rho(w) of the module docstring (``max_fun`` default ``ceil(1.5 * max_iter)``), with its protocol."""
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    max_fun = math.ceil(1.5 * max_iter) if max_fun is None else max_fun
    with session(model, bn, data, bn_data, batch_size):
        F = FullDataLoss(model, data, loss_fn, batch_size, params)
        scale = F.x0.abs()

        def apply(u: torch.Tensor) -> torch.Tensor:
            return scale * u.to(scale.dtype)

        r = maximize_in_box(F, apply, apply, np.full(F.num_params, rho), max_iter, max_fun)
        n = F.n
        bn_description = bn_protocol(model, bn, batch_size, bn_data)
    return AdaptiveSharpnessResult(
        value=r.f_best - r.f0, value_final=r.f_final - r.f0, relative=(r.f_best - r.f0) / (1 + r.f0) * 100,
        rho=rho, perturbation_set="|delta_i| <= rho |w_i| (elementwise adaptive, l_inf); solved in u = delta/|w|",
        max_iter=max_iter, max_fun=max_fun, nit=r.nit, nfev=r.nfev, f_x=r.f0, f_best=r.f_best,
        f_final=r.f_final, n=n, bn=bn, bn_description=bn_description, params=params,
        num_params=F.num_params, batch_size=batch_size, loss_fn=loss_fn_name(loss_fn), solver=SOLVER,
        stop=r.stop,
    )
