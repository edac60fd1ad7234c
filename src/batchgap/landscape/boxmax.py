"""Maximize the full-data loss over a box around the centre (shared by the sharpness measures).

    maximize  f(x + A y)  over  -h <= y <= h

with the exact full-data gradient (:class:`functional.FullDataLoss`). ``A`` is given as two maps,
``apply(y) = A y`` and ``apply_t(g) = A^T g``, so the identity, a diagonal and a dense n x p matrix
share one solver. With g(y) = A^T grad f(x + A y), the gradient in y:

1. y = 0: f(x) and g(0) (one evaluation).
2. Corner steps: y <- h * sign(g(y)), the vertex that maximizes the linear model of f at y over the
   box, the first from y = 0 (the sign-of-gradient corner), repeated while f rises, at most
   ``max_iter`` steps, ending early at a fixed point (the next corner is the current point: a KKT
   vertex) or at the first step that does not raise f. For a convex f every step raises f
   (f(y') >= f(y) + g(y)^T (y' - y) >= f(y)).
3. L-BFGS-B (``scipy.optimize.minimize(-f, method="L-BFGS-B")`` semantics) from the best of those
   points, ``max_iter`` iterations; when that run ends before its iterations at a KKT point or a
   failed line search, the iterations left go to a second L-BFGS-B run from y = 0, the old protocol's
   start, so the result is never below what L-BFGS-B from y = 0 alone reaches with those iterations.

Why corner steps first: near a minimum -f has negative curvature, so L-BFGS-B from y = 0 takes steps the size
of the small gradient and ends inside the box; a corner step moves every coordinate to its bound at once.
Both stages are local. The measured numbers, and the fractions of a brute-force maximum reached:
docs/measures.md, "Notes by module".

Stopping: ``max_iter`` L-BFGS-B iterations over both runs (``ftol = gtol = 0`` so that only the
budgets, a KKT point or a failed line search end a run, as a fixed number of iterations is the
protocol), and a HARD cap of ``max_fun`` function+gradient evaluations over all stages, enforced
inside the objective (scipy's own ``maxfun`` is only checked between iterations and can be overrun
by a line search). Each evaluation is one full-data forward and backward pass. The default cap,
:func:`default_max_fun`, is ``1 + 4 * max_iter`` (41 for the paper's 10 iterations): y = 0, up to
``max_iter`` corner steps, then three evaluations per L-BFGS-B iteration on average, so that the
cap, not the iterations, ends a solve only where the line searches are unusually long.
``BoxMax.capped`` says when it did, and the measures carry it into their results and the report.

Speed: :func:`_lbfgsb_direct` runs scipy's L-BFGS-B loop over its compiled ``setulb`` with the bounds built
as arrays (``minimize`` spends seconds per call on them at a million parameters), used only after it has
reproduced ``minimize`` bit for bit in this process (:func:`direct_driver_ok`); else ``minimize`` runs.
The measured costs: docs/measures.md, "Notes by module".

Reported: the BEST f over all evaluations (a running max inside the objective). Any evaluated point
is a feasible point of the box, so the best one is a valid lower bound on the true max. The final
L-BFGS-B iterate's f is reported beside it.
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
    f_corner: float | None  # f at the sign-of-gradient corner h * sign(g(0)) (None: g(0) = 0, not evaluated)
    corner_steps: int  # corner evaluations made (stage 2)
    start: str  # where the first L-BFGS-B run started: START_ZERO or START_CORNER
    f_start: float  # f there
    f_best: float  # max f over every evaluation
    f_final: float  # f at the last accepted L-BFGS-B iterate (f_start when no iteration completed)
    y_best: np.ndarray
    nit: int  # L-BFGS-B iterations, both runs
    nfev: int  # full-data evaluations, all stages
    stop: str
    capped: bool  # the evaluation cap, not max_iter iterations or a KKT point, ended the solve


START_ZERO, START_CORNER = "y = 0", "best corner"
START = ("start: y = 0, then corner steps y <- h * sign(grad_y f) (the first is the sign-of-gradient corner) while f "
         "rises, at most max_iter; L-BFGS-B from the best point, and from y = 0 with the iterations a KKT point leaves")


def default_max_fun(max_iter: int) -> int:
    """The default evaluation cap: y = 0, up to ``max_iter`` corner steps, three per L-BFGS-B iteration."""
    return 1 + 4 * max_iter


class _Budget(Exception):
    pass


def maximize_in_box(F: FullDataLoss, apply: Callable[[torch.Tensor], torch.Tensor],
                    apply_t: Callable[[torch.Tensor], torch.Tensor], half_width: np.ndarray,
                    max_iter: int, max_fun: int) -> BoxMax:
    """Run the solver described in the module docstring; ``half_width`` is h (float64, length p)."""
    if max_iter < 1 or max_fun < 1:
        raise ValueError(f"max_iter and max_fun must be >= 1, got {max_iter}, {max_fun}")
    h = np.asarray(half_width, dtype=np.float64)
    state = {"nfev": 0, "best": -np.inf, "y_best": np.zeros_like(h), "nit": 0, "final": None}
    cap = f"STOP: hard cap of {max_fun} function+gradient evaluations reached"

    def evaluate(y: np.ndarray):
        if state["nfev"] >= max_fun:
            raise _Budget
        yt = torch.from_numpy(np.array(y, dtype=np.float64)).to(device=F.x0.device)
        f, g = F.value_and_grad(F.x0 + apply(yt).to(F.x0.dtype))
        state["nfev"] += 1
        if f > state["best"]:
            state["best"], state["y_best"] = f, np.array(y, dtype=np.float64)
        return f, apply_t(g).double().cpu().numpy()

    y0 = np.zeros_like(h)
    f0, g0 = evaluate(y0)
    y, f, g, f_corner, steps, why = y0, f0, g0, None, 0, "step limit"
    try:
        while steps < max_iter:
            corner = h * np.sign(g)
            if np.array_equal(corner, y):
                why = "fixed point"
                break
            fc, gc = evaluate(corner)
            steps += 1
            f_corner = fc if f_corner is None else f_corner
            if not fc > f:
                why = "f did not rise"
                break
            y, f, g = corner, fc, gc
    except _Budget:
        return _result(state, f0, f_corner, steps, y0, y, f, f"{cap} in the corner steps", True)
    stops = [f"corner steps: {steps} ({why})"]
    start, f_start = y, f

    def run(x0: np.ndarray, f_x0: float, g_x0: np.ndarray, iterations: int) -> str:
        cached = [x0]  # L-BFGS-B's first request is f at x0, already evaluated

        def objective(yy: np.ndarray):
            if cached[0] is not None and np.array_equal(yy, cached[0]):
                cached[0] = None
                return -f_x0, -g_x0
            cached[0] = None
            fy, gy = evaluate(yy)
            return -fy, -gy

        def callback(intermediate_result):
            state["nit"] += 1
            state["final"] = -float(intermediate_result.fun)
        return _solve(objective, h, iterations, max_fun, callback, x0=x0)

    where = "L-BFGS-B from " + ("y = 0" if start is y0 else "the best corner")
    try:
        msg = run(start, f_start, g, max_iter)
        stops.append(f"{where}: {msg}")
        capped = "EVALUATIONS EXCEEDS LIMIT" in msg and state["nit"] < max_iter
        if start is not y0 and state["nit"] < max_iter and not capped:
            where = "then L-BFGS-B from y = 0"
            msg = run(y0, f0, g0, max_iter - state["nit"])
            stops.append(f"{where}: {msg}")
            capped = "EVALUATIONS EXCEEDS LIMIT" in msg and state["nit"] < max_iter
    except _Budget:
        stops.append(f"{where}: {cap} inside an iteration")
        capped = True
    return _result(state, f0, f_corner, steps, y0, start, f_start, "; ".join(stops), capped)


def _result(state, f0, f_corner, steps, y0, start, f_start, stop, capped) -> BoxMax:
    return BoxMax(
        f0=f0, f_corner=f_corner, corner_steps=steps, start=START_ZERO if start is y0 else START_CORNER,
        f_start=f_start, f_best=state["best"], f_final=f_start if state["final"] is None else state["final"],
        y_best=state["y_best"], nit=state["nit"], nfev=state["nfev"], stop=stop, capped=capped,
    )


def _scipy(objective, h: np.ndarray, max_iter: int, max_fun: int, callback, x0=None, **options) -> str:
    x0 = np.zeros_like(h) if x0 is None else x0
    res = minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=Bounds(-h, h), callback=callback,
                   options={"maxiter": max_iter, "maxfun": max_fun, "ftol": 0.0, "gtol": 0.0, **options})
    return str(res.message)


def _lbfgsb_direct(objective, h: np.ndarray, max_iter: int, max_fun: int, callback, x0=None, maxcor: int = 10,
                   maxls: int = 20) -> str:
    """scipy's ``_minimize_lbfgsb`` loop (SciPy >= 1.15: the C ``setulb``) for ``-h <= y <= h`` from ``x0``
    (default y = 0), with ftol = gtol = 0; the same calls in the same order, with scipy's memoization of the
    last point (a request for f at the point just evaluated is answered from the cache). Returns the stop
    message."""
    from scipy.optimize import _lbfgsb
    from scipy.optimize._lbfgsb_py import status_messages, task_messages

    n, m = len(h), maxcor
    low, high = np.array(-h, dtype=np.float64), np.array(h, dtype=np.float64)
    nbd = np.full(n, 2, dtype=np.int32)  # both bounds finite: every coordinate of the box
    x = np.zeros(n, dtype=np.float64) if x0 is None else np.clip(np.array(x0, dtype=np.float64), low, high)
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


def _trace(solve, max_iter: int, max_fun: int, corner: bool = False) -> tuple:
    """Everything a solver did on the check problem, from y = 0 or (``corner``) from a vertex of the box:
    the stop message, every evaluated point, every iterate."""
    objective, h = _check_problem()
    x0 = h * np.where(np.arange(len(h)) % 3 == 0, -1.0, 1.0) if corner else None
    seen, iterates = [], []

    def recorded(y):
        seen.append(np.array(y))
        return objective(y)

    def callback(intermediate_result):  # the parameter name scipy needs to pass the iterate with its f
        iterates.append((np.array(intermediate_result.x), float(intermediate_result.fun)))
    return solve(recorded, h, max_iter, max_fun, callback, x0=x0), seen, iterates


@functools.cache
def direct_driver_ok() -> bool:
    """Whether :func:`_lbfgsb_direct` reproduces ``minimize`` exactly on this SciPy: the same stop, the
    same points evaluated and the same iterates, bit for bit, under each stop rule and from y = 0 and from
    a vertex (checked once)."""
    def same(a, b) -> bool:
        return (a[0] == b[0] and len(a[1]) == len(b[1]) and all(np.array_equal(p, q) for p, q in zip(a[1], b[1]))
                and len(a[2]) == len(b[2])
                and all(np.array_equal(p[0], q[0]) and p[1] == q[1] for p, q in zip(a[2], b[2])))
    try:
        return all(same(_trace(_scipy, it, fun, c), _trace(_lbfgsb_direct, it, fun, c))
                   for it, fun, c in ((8, 30, False), (50, 12, False), (8, 30, True)))
    except Exception:  # another private interface: minimize it is
        return False


def _solve(objective, h, max_iter, max_fun, callback, x0=None) -> str:
    solve = _lbfgsb_direct if np.all(np.isfinite(h)) and direct_driver_ok() else _scipy
    return solve(objective, h, max_iter, max_fun, callback, x0=x0)


SOLVER = ("y = 0, then corner steps y <- h * sign(grad_y f) (the first is the sign-of-gradient corner) while f rises, "
          "at most max_iter; then scipy L-BFGS-B on -f with the exact full-data gradient from the best point, and from "
          "y = 0 with the iterations a KKT point leaves; ftol = gtol = 0; hard cap on function+gradient evaluations "
          "over all stages; reported value uses the best f over all evaluations")
