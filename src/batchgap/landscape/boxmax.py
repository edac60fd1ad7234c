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

Reported: the BEST f over all evaluations (a running max inside the objective). An inexact solver's
line search may try points better than the iterate it finally accepts, and any evaluated point is
a feasible point of the box, so the best one is a valid (larger) lower bound on the true max. The
final iterate's f is reported beside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
        res = minimize(objective, np.zeros_like(h), jac=True, method="L-BFGS-B", bounds=Bounds(-h, h),
                       callback=callback,
                       options={"maxiter": max_iter, "maxfun": max_fun, "ftol": 0.0, "gtol": 0.0})
        stop = str(res.message)
    except _Budget:
        stop = f"STOP: hard cap of {max_fun} function+gradient evaluations reached inside an iteration"
    return BoxMax(
        f0=state["f0"], f_best=state["best"],
        f_final=state["f0"] if state["final"] is None else state["final"],
        y_best=state["y_best"], nit=state["nit"], nfev=state["nfev"], stop=stop,
    )


SOLVER = ("scipy L-BFGS-B from y = 0 on -f with the exact full-data gradient; ftol = gtol = 0; "
          "hard cap on function+gradient evaluations; reported value uses the best f over all evaluations")
