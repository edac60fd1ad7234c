"""Keskar et al.'s eps-sharpness (ICLR 2017, eq. 3-4), full space and random subspace.

    C_eps = { y in R^p : |y_i| <= eps (|(A+ x)_i| + 1) }
    phi   = (max_{y in C_eps} f(x + A y) - f(x)) / (1 + f(x)) * 100

x is the flat vector of the measured parameters (``params="all"``: every trainable parameter,
BatchNorm affine included, or ``"no-bn"``), f the full-data, batch-weighted mean loss.

* Full space (``subspace_dim=None``): A = I_n, box |y_i| <= eps (|x_i| + 1).
* Random subspace (``subspace_dim=p``): A is n x p with i.i.d. N(0, 1) entries (the paper does not
  state the distribution; this is our choice and is recorded), drawn on the CPU from
  ``torch.Generator().manual_seed(seed)``. A+ x is the least-squares solution of A z = x in float64,
  never an n x n matrix: by the normal equations (A^T A) z = A^T x, with A^T A (p x p) accumulated
  over row blocks of A so no float64 copy of A is made (for the default study's 146k x 100 A, 117 MB
  that ``lstsq`` would copy and more it would allocate), when A^T A is well conditioned (condition
  number <= 1e6, so the solution is accurate to ~1e-10 relative; a Gaussian A with n >> p has ~1);
  else by ``torch.linalg.lstsq`` (QR based, minimum-norm when A is rank deficient).
* An explicit ``A`` (n x p tensor) may be passed instead, e.g. A = I to check the subspace code.

The maximization is :func:`boxmax.maximize_in_box`: L-BFGS-B from y = 0, ``max_iter`` iterations
(the paper: 10), at most ``max_fun`` full-data loss+gradient evaluations (default
``ceil(1.5 * max_iter)``, 15 for 10 iterations), ``.value`` from the BEST f seen over all
evaluations, ``.value_final`` from the last accepted iterate. Both are lower bounds on the true
max, so phi is too.

BatchNorm (``bn``) is one protocol for the whole solve: ``"eval"`` (running statistics, or batch
statistics for ``track_running_stats=False`` models), ``"batch"`` (each evaluation batch's
statistics, no buffer updates), ``"recompute"`` (running statistics recomputed once at x on
``bn_data``, default ``data``, then fixed). Dropout is off. The model is restored bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .boxmax import SOLVER, maximize_in_box
from .evaluate import describe_bn
from .functional import FullDataLoss, session
from .protocol import Measured


@dataclass(frozen=True)
class SharpnessResult(Measured):
    value: float  # phi in percent, from the best f over all evaluations
    value_final: float  # phi from the final iterate
    eps: float
    space: str
    subspace_dim: int | None
    seed: int
    max_iter: int
    max_fun: int
    nit: int
    nfev: int
    f_x: float
    f_best: float
    f_final: float
    solver: str
    stop: str


def bn_protocol(model: nn.Module, bn: str, batch_size: int, bn_data) -> str:
    """``describe_bn`` with the once-at-the-centre meaning of "recompute" used by fixed-protocol measures."""
    if bn == "recompute" and describe_bn(model, bn, batch_size) != "no BatchNorm":
        where = "the evaluated data" if bn_data is None else "the caller's bn_data"
        return f"running statistics recomputed once at the centre on {where}, then fixed"
    return describe_bn(model, bn, batch_size)


def loss_fn_name(loss_fn) -> str:
    return "mean cross-entropy" if loss_fn is None else getattr(loss_fn, "__name__", repr(loss_fn))


NORMAL_EQUATIONS_MAX_COND = 1e6


def _pseudo_inverse_times(A: torch.Tensor, x: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """A+ x (see the module docstring): normal equations when well conditioned, else least squares."""
    p = A.shape[1]
    G = torch.zeros(p, p, dtype=torch.float64, device=A.device)
    r = torch.zeros(p, dtype=torch.float64, device=A.device)
    for s in range(0, A.shape[0], block):
        a = A[s : s + block].double()
        G += a.T @ a
        r += a.T @ x[s : s + block].double()
    eig = torch.linalg.eigvalsh(G)
    if eig[0] > 0 and eig[-1] / eig[0] <= NORMAL_EQUATIONS_MAX_COND:
        return torch.cholesky_solve(r[:, None], torch.linalg.cholesky(G))[:, 0]
    A64, x64 = A.double(), x.double()[:, None]
    driver = "gelsy" if A64.device.type == "cpu" else None
    return torch.linalg.lstsq(A64, x64, driver=driver).solution[:, 0]


def eps_sharpness(
    model: nn.Module,
    data,
    eps: float = 1e-3,
    subspace_dim: int | None = None,
    max_iter: int = 10,
    seed: int = 0,
    loss_fn=None,
    batch_size: int = 1000,
    bn: str = "eval",
    params: str = "all",
    A: torch.Tensor | None = None,
    max_fun: int | None = None,
    bn_data=None,
) -> SharpnessResult:
    """phi_{x,f}(eps, A) of the module docstring, with its protocol."""
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    max_fun = math.ceil(1.5 * max_iter) if max_fun is None else max_fun
    with session(model, bn, data, bn_data, batch_size):
        F = FullDataLoss(model, data, loss_fn, batch_size, params)
        x = F.x0
        if A is not None:
            if A.dim() != 2 or A.shape[0] != F.num_params:
                raise ValueError(f"A must be {F.num_params} x p, got {tuple(A.shape)}")
            A = A.detach().to(device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else x.dtype)
            space, p = f"explicit A ({A.shape[0]} x {A.shape[1]})", A.shape[1]
        elif subspace_dim is not None:
            if not 1 <= subspace_dim <= F.num_params:
                raise ValueError(f"subspace_dim must be in [1, {F.num_params}], got {subspace_dim}")
            gen = torch.Generator().manual_seed(seed)
            A = torch.randn((F.num_params, subspace_dim), generator=gen, dtype=x.dtype).to(x.device)
            space, p = f"random subspace p={subspace_dim}, A ~ N(0,1) i.i.d.", subspace_dim
        else:
            space, p = "full", None
        if A is None:
            center = x.double()

            def apply(y):
                return y

            def apply_t(g):
                return g
        else:
            center = _pseudo_inverse_times(A, x)

            def apply(y):
                return A @ y.to(A.dtype)

            def apply_t(g):
                return A.T @ g.to(A.dtype)

        half_width = (eps * (center.abs() + 1)).cpu().numpy()
        r = maximize_in_box(F, apply, apply_t, half_width, max_iter, max_fun)
        n = F.n
        bn_description = bn_protocol(model, bn, batch_size, bn_data)

    def phi(f: float) -> float:
        return (f - r.f0) / (1 + r.f0) * 100

    return SharpnessResult(
        value=phi(r.f_best), value_final=phi(r.f_final), eps=eps, space=space, subspace_dim=p,
        seed=seed, max_iter=max_iter, max_fun=max_fun, nit=r.nit, nfev=r.nfev,
        f_x=r.f0, f_best=r.f_best, f_final=r.f_final, n=n, bn=bn, bn_description=bn_description,
        params=params, num_params=F.num_params, batch_size=batch_size, loss_fn=loss_fn_name(loss_fn),
        solver=SOLVER, stop=r.stop,
    )
