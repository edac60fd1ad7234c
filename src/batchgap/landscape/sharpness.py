"""Keskar et al.'s eps-sharpness (ICLR 2017, eq. 3-4), full space and random subspace.

    C_eps = { y in R^p : |y_i| <= eps (|(A+ x)_i| + 1) }
    phi   = (max_{y in C_eps} f(x + A y) - f(x)) / (1 + f(x)) * 100

x is the flat vector of the measured parameters (``params="all"``: every trainable parameter,
BatchNorm affine included, or ``"no-bn"``), f the full-data, batch-weighted mean loss.

* Full space (``subspace_dim=None``): A = I_n, box |y_i| <= eps (|x_i| + 1).
* Random subspace (``subspace_dim=p``): A is n x p, drawn on the CPU from
  ``torch.Generator().manual_seed(seed)`` as i.i.d. N(0, 1) entries; ``subspace_columns`` says how
  its columns are scaled (the paper states neither; the choice is recorded with the value):
  ``"normal"`` (default) keeps the N(0, 1) entries, column norms about sqrt(n); ``"unit"`` divides
  each column of the same draw by its norm. The scale sets the levels of phi in a subspace (the "+ 1" of
  the box does not scale with A), so only LB/SB ratios compare with the paper, at one scale. A+ x is the
  least-squares solution of A z = x in float64, never an n x n matrix: by the normal equations when
  A^T A is well conditioned, else by ``torch.linalg.lstsq``. Why "normal" is the default (the paper's
  Table 4 / Table 3 ratios), and the memory and conditioning of A+ x: docs/measures.md, "Notes by module".
* An explicit ``A`` (n x p tensor) may be passed instead, e.g. A = I to check the subspace code.

The maximization is :func:`boxmax.maximize_in_box`: y = 0, corner steps y <- h sign(grad_y f) while
f rises, then L-BFGS-B from the best point, ``max_iter`` iterations in all (the paper: 10), at most
``max_fun`` full-data loss+gradient evaluations (default ``1 + 4 * max_iter``, 41 for 10
iterations; ``.capped`` says when the cap, not the iterations, ended the solve), ``.value`` from
the BEST f seen over all evaluations, ``.value_final`` from the last accepted iterate. Both are
lower bounds on the true max, so phi is too.

BatchNorm (``bn``) is one protocol for the whole solve: ``"eval"`` (running statistics, or batch
statistics for ``track_running_stats=False`` models), ``"batch"`` (each evaluation batch's
statistics, no buffer updates), ``"recompute"`` (running statistics recomputed once at x on
``bn_data``, default ``data``, then fixed). Dropout is off. The model is restored bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .boxmax import SOLVER, START, default_max_fun, maximize_in_box
from .evaluate import bn_protocol
from .functional import FullDataLoss, objective_fields, session
from .objective import as_objective
from .protocol import Measured


@dataclass(frozen=True)
class SharpnessResult(Measured):
    """What :func:`eps_sharpness` returns: phi, the solver's record and the protocol (fields commented below)."""

    value: float  # phi in percent, from the best f over all evaluations
    params_measured: str  # the measured parameters in words: trainable of all, frozen, tied (params.describe_params)
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
    start: str  # the solver's start rule (boxmax.START)
    first_run_start: str  # where the first L-BFGS-B run started: "y = 0" or "best corner"
    f_corner: float | None  # f at the sign-of-gradient corner (None when A^T grad f(x) = 0)
    corner_steps: int
    capped: bool  # the evaluation cap (max_fun), not max_iter iterations or a KKT point, ended the solve
    subspace_columns: str | None  # "normal" or "unit" for a random subspace; None for full space / explicit A
    column_norm: float | None  # mean Euclidean norm of A's columns (None for the full space)


NORMAL_EQUATIONS_MAX_COND = 1e6
SUBSPACE_COLUMNS = ("normal", "unit")
COLUMNS_TEXT = {"normal": "A ~ N(0,1) i.i.d.", "unit": "A: N(0,1) i.i.d. columns scaled to unit norm"}


def subspace_matrix(n: int, p: int, seed: int, columns: str = "normal", dtype=torch.float32) -> torch.Tensor:
    """The random n x p matrix of the subspace measure (module docstring), on the CPU."""
    if columns not in SUBSPACE_COLUMNS:
        raise ValueError(f"subspace_columns must be one of {SUBSPACE_COLUMNS}, not {columns!r}")
    A = torch.randn((n, p), generator=torch.Generator().manual_seed(seed), dtype=dtype)
    if columns == "unit":
        A /= column_norms(A).to(dtype)
    return A


def column_norms(A: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """Euclidean norms of A's columns in float64, accumulated over row blocks (no float64 copy of A)."""
    sq = torch.zeros(A.shape[1], dtype=torch.float64, device=A.device)
    for s in range(0, A.shape[0], block):
        sq += A[s : s + block].double().square().sum(0)
    return sq.sqrt()


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
    subspace_columns: str = "normal",
    objective=None,
) -> SharpnessResult:
    """Keskar et al.'s eps-sharpness (eq. 3-4), in the full space or a random subspace, with its protocol.

        phi_{x,f}(eps, A) = (max_{y in C_eps} f(x + A y) - f(x)) / (1 + f(x)) * 100,
        C_eps = { y : |y_i| <= eps (|(A+ x)_i| + 1) }

    x is the flat vector of the measured parameters, f the full-data, batch-weighted mean loss; the max is
    solved by :func:`boxmax.maximize_in_box` (corner steps, then L-BFGS-B) and is a lower bound on the true one.

    Args:
        model: the trained model; restored bit for bit, also on error.
        data: the data f is taken over: a tensor pair ``(inputs, targets)``, a TensorData, a map-style dataset of
            ``(input, target)`` pairs or an iterable of batches.
        eps: the box's relative half-width (the paper: 1e-3 and 5e-4); must be > 0.
        subspace_dim: None for the full space (A = I_n), else p, the columns of a random n x p matrix A.
        max_iter: L-BFGS-B iterations over the whole solve (the paper: 10); also bounds the corner steps.
        seed: seeds the ``torch.Generator`` that draws the random subspace A (on the CPU).
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean; None for cross-entropy on logits.
        batch_size: examples per evaluation batch (memory only: the result does not depend on it).
        bn: the BatchNorm protocol for the whole solve: ``"eval"``, ``"batch"`` or ``"recompute"``.
        params: the measured parameters: ``"all"`` trainable, or ``"no-bn"`` (none of a normalization layer's).
        A: an explicit n x p matrix instead of a random one (e.g. the identity, to check the subspace code).
        max_fun: the hard cap on loss+gradient evaluations; None for ``1 + 4 * max_iter``.
        bn_data: the data ``"recompute"`` recomputes the BatchNorm statistics on; None for ``data``.
        objective: how a batch becomes a loss (:mod:`objective`): an Objective, a ready name or a callable
            ``objective(model, batch) -> (loss_sum, weight)``; None for ``(inputs, targets)`` pairs and ``loss_fn``.
        subspace_columns: the scale of the random A's columns: ``"normal"`` (N(0, 1) entries) or ``"unit"``
            (each column of the same draw scaled to norm 1).

    Returns:
        A :class:`SharpnessResult`: ``value`` (phi in percent from the best f seen), ``value_final`` (from the
        last iterate), f(x), the solver's iterations, evaluations and stop reason, ``capped``, and the protocol
        (data size, BN mode, parameters, subspace and its seed).

    Cost:
        At most ``max_fun`` full-data forward+backward passes (41 for ``max_iter=10``), plus the recomputation's
        passes for ``bn="recompute"``; memory of one batch's graph. A random subspace adds the n x p matrix A (in
        the parameters' dtype) and its p x p float64 Gram matrix.
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if subspace_columns not in SUBSPACE_COLUMNS:
        raise ValueError(f"subspace_columns must be one of {SUBSPACE_COLUMNS}, not {subspace_columns!r}")
    columns = None
    max_fun = default_max_fun(max_iter) if max_fun is None else max_fun
    obj = as_objective(objective, loss_fn)
    with session(model, bn, data, bn_data, batch_size, obj):
        F = FullDataLoss(model, data, None, batch_size, params, objective=obj)
        x = F.x0
        if A is not None:
            if A.dim() != 2 or A.shape[0] != F.num_params:
                raise ValueError(f"A must be {F.num_params} x p, got {tuple(A.shape)}")
            A = A.detach().to(device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else x.dtype)
            space, p = f"explicit A ({A.shape[0]} x {A.shape[1]})", A.shape[1]
        elif subspace_dim is not None:
            if not 1 <= subspace_dim <= F.num_params:
                raise ValueError(f"subspace_dim must be in [1, {F.num_params}], got {subspace_dim}")
            A = subspace_matrix(F.num_params, subspace_dim, seed, subspace_columns, x.dtype).to(x.device)
            space, p = f"random subspace p={subspace_dim}, {COLUMNS_TEXT[subspace_columns]}", subspace_dim
            columns = subspace_columns
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

        column_norm = None if A is None else float(column_norms(A).mean())
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
        params=params, num_params=F.num_params, params_measured=F.params_measured, batch_size=batch_size,
        **objective_fields(obj),
        solver=SOLVER, stop=r.stop, start=START, first_run_start=r.start, f_corner=r.f_corner,
        corner_steps=r.corner_steps, capped=r.capped, subspace_columns=columns, column_norm=column_norm,
    )
