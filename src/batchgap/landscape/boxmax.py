"""Maximize the full-data loss over a box around the centre by L-BFGS-B (shared by the sharpness measures).

    maximize  f(x + A y)  over  -h <= y <= h,  from y = 0,

as ``scipy.optimize.minimize(-f, jac=-A^T grad f, method="L-BFGS-B")`` with the exact full-data
gradient (:class:`functional.FullDataLoss`). ``A`` is given as two maps, ``apply(y) = A y`` and
``apply_t(g) = A^T g``, so the identity, a diagonal and a dense n x p matrix share one solver.

Stopping: ``maxiter`` iterations (``options={"maxiter": max_iter}``); ``ftol = gtol = 0`` so that
only the iteration and evaluation budgets (or a KKT point / failed line search) end the run, as a
fixed number of iterations is the protocol; and a HARD cap of ``max_fun`` function+gradient
evaluations, enforced inside the objective (scipy's own ``maxfun`` is only checked between
iterations and can be overrun by a line search). Each evaluation is one full-data forward and
backward pass.

Speed: ``minimize`` spends about 6 microseconds of Python per coordinate and call on the bounds
(``Bounds`` to a list of pairs and back, then a loop filling the bound types): 0.8 s per call at the
default MLP's 146k parameters and about 10 s at C1's 1.7M, more than the full-data passes themselves.
:func:`_lbfgsb_direct` runs the same L-BFGS-B loop as scipy's ``_minimize_lbfgsb`` over its compiled
``setulb``, with the bounds built as arrays. It is used only after it has reproduced ``minimize`` bit
for bit on a small problem in this process (:func:`direct_driver_ok`); on a SciPy whose private
interface differs, ``minimize`` runs as before.

Reported: the BEST f over all evaluations (a running max inside the objective). An inexact solver's
line search may try points better than the iterate it finally accepts, and any evaluated point is
a feasible point of the box, so the best one is a valid (larger) lower bound on the true max. The
final iterate's f is reported beside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import functools

import numpy as np
import torch
from scipy.optimize import Bounds, minimize

from .functional import FullDataLoss


@dataclass(frozen=True)
class BoxMax:
    f0: float  # f(x), the first evaluation (y = 0)
    f_best: float  # max f over every evaluation
    f_final: float  # f at the last accepted iterate (f0 when no iteration completed)
    y_best: np.ndarray
    nit: int
    nfev: int
    stop: str


class _Budget(Exception):
    pass


def maximize_in_box(F: FullDataLoss, apply: Callable[[torch.Tensor], torch.Tensor],
                    apply_t: Callable[[torch.Tensor], torch.Tensor], half_width: np.ndarray,
                    max_iter: int, max_fun: int) -> BoxMax:
    """Run the solver described in the module docstring; ``half_width`` is h (float64, length p)."""
    if max_iter < 1 or max_fun < 1:
        raise ValueError(f"max_iter and max_fun must be >= 1, got {max_iter}, {max_fun}")
    h = np.asarray(half_width, dtype=np.float64)
    state = {"nfev": 0, "best": -np.inf, "y_best": np.zeros_like(h), "f0": None, "nit": 0, "final": None}

    def objective(y: np.ndarray):
        if state["nfev"] >= max_fun:
            raise _Budget
        yt = torch.from_numpy(np.array(y, dtype=np.float64)).to(device=F.x0.device)
        f, g = F.value_and_grad(F.x0 + apply(yt).to(F.x0.dtype))
        state["nfev"] += 1
        if state["f0"] is None:
            state["f0"] = f
        if f > state["best"]:
            state["best"], state["y_best"] = f, np.array(y, dtype=np.float64)
        return -f, -apply_t(g).double().cpu().numpy()

    def callback(intermediate_result):
        state["nit"] += 1
        state["final"] = -float(intermediate_result.fun)

    try:
        stop = _solve(objective, h, max_iter, max_fun, callback)
    except _Budget:
        stop = f"STOP: hard cap of {max_fun} function+gradient evaluations reached inside an iteration"
    return BoxMax(
        f0=state["f0"], f_best=state["best"],
        f_final=state["f0"] if state["final"] is None else state["final"],
        y_best=state["y_best"], nit=state["nit"], nfev=state["nfev"], stop=stop,
    )


def _scipy(objective, h: np.ndarray, max_iter: int, max_fun: int, callback, **options) -> str:
    res = minimize(objective, np.zeros_like(h), jac=True, method="L-BFGS-B", bounds=Bounds(-h, h), callback=callback,
                   options={"maxiter": max_iter, "maxfun": max_fun, "ftol": 0.0, "gtol": 0.0, **options})
    return str(res.message)


def _lbfgsb_direct(objective, h: np.ndarray, max_iter: int, max_fun: int, callback, maxcor: int = 10,
                   maxls: int = 20) -> str:
    """scipy's ``_minimize_lbfgsb`` loop (SciPy >= 1.15: the C ``setulb``) for ``-h <= y <= h`` from y = 0,
    with ftol = gtol = 0; the same calls in the same order, with scipy's memoization of the last point
    (a request for f at the point just evaluated is answered from the cache). Returns the stop message."""
    from scipy.optimize import _lbfgsb
    from scipy.optimize._lbfgsb_py import status_messages, task_messages

    n, m = len(h), maxcor
    low, high = np.array(-h, dtype=np.float64), np.array(h, dtype=np.float64)
    nbd = np.full(n, 2, dtype=np.int32)  # both bounds finite: every coordinate of the box
    x = np.zeros(n, dtype=np.float64)
    f, g = np.array(0.0, dtype=np.float64), np.zeros(n, dtype=np.float64)
    wa = np.zeros(2 * m * n + 5 * n + 11 * m * m + 8 * m, dtype=np.float64)
    iwa = np.zeros(3 * n, dtype=np.int32)
    task, ln_task = np.zeros(2, dtype=np.int32), np.zeros(2, dtype=np.int32)
    lsave, isave, dsave = np.zeros(4, dtype=np.int32), np.zeros(44, dtype=np.int32), np.zeros(29, dtype=np.float64)
    memo_x, memo, nfev, nit = None, None, 0, 0
    while True:
        g = g.astype(np.float64)
        _lbfgsb.setulb(m, x, low, high, nbd, f, g, 0.0, 0.0, wa, iwa, task, lsave, isave, dsave, maxls, ln_task)
        if task[0] == 3:  # f and g wanted at x
            if memo_x is None or not np.array_equal(x, memo_x):
                memo_x = np.array(x, dtype=np.float64)
                fx, gx = objective(np.copy(x))
                memo, nfev = (fx, np.atleast_1d(gx)), nfev + 1
            f, g = memo
        elif task[0] == 1:  # a new iteration
            nit += 1
            callback(_Iterate(x=x, fun=f))
            if nit >= max_iter:
                task[0], task[1] = 5, 504
            elif nfev > max_fun:
                task[0], task[1] = 5, 502
        else:
            break
    return status_messages[task[0]] + ": " + task_messages[task[1]]


@dataclass(frozen=True)
class _Iterate:
    x: np.ndarray
    fun: float


def _check_problem():
    """A small smooth nonconvex problem on a box: 8 iterations reach the iteration limit, and a budget of 12
    evaluations stops inside the 9th iteration (both of scipy's stop rules are exercised)."""
    rng = np.random.default_rng(0)
    A, c, h = rng.standard_normal((20, 12)), rng.standard_normal(20), rng.uniform(0.2, 3.0, 12)

    def objective(y):
        r = A @ y - c
        return float(np.logaddexp(r, -r).sum() - np.sin(3 * y).sum()), A.T @ np.tanh(r) - 3 * np.cos(3 * y)
    return objective, h


def _trace(solve, max_iter: int, max_fun: int) -> tuple:
    """Everything a solver did on the check problem: the stop message, every evaluated point, every iterate."""
    objective, h = _check_problem()
    seen, iterates = [], []

    def recorded(y):
        seen.append(np.array(y))
        return objective(y)

    def callback(intermediate_result):  # the parameter name scipy needs to pass the iterate with its f
        iterates.append((np.array(intermediate_result.x), float(intermediate_result.fun)))
    return solve(recorded, h, max_iter, max_fun, callback), seen, iterates


@functools.cache
def direct_driver_ok() -> bool:
    """Whether :func:`_lbfgsb_direct` reproduces ``minimize`` exactly on this SciPy: the same stop, the
    same points evaluated and the same iterates, bit for bit, under each stop rule (checked once)."""
    def same(a, b) -> bool:
        return (a[0] == b[0] and len(a[1]) == len(b[1]) and all(np.array_equal(p, q) for p, q in zip(a[1], b[1]))
                and len(a[2]) == len(b[2]) and all(np.array_equal(p[0], q[0]) and p[1] == q[1] for p, q in zip(a[2], b[2])))
    try:
        return all(same(_trace(_scipy, it, fun), _trace(_lbfgsb_direct, it, fun)) for it, fun in ((8, 30), (50, 12)))
    except Exception:  # another private interface: minimize it is
        return False


def _solve(objective, h, max_iter, max_fun, callback) -> str:
    solve = _lbfgsb_direct if np.all(np.isfinite(h)) and direct_driver_ok() else _scipy
    return solve(objective, h, max_iter, max_fun, callback)


SOLVER = ("scipy L-BFGS-B from y = 0 on -f with the exact full-data gradient; ftol = gtol = 0; "
          "hard cap on function+gradient evaluations; reported value uses the best f over all evaluations")
