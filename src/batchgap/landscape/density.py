"""The Hessian's spectral density by stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019).

H is the Hessian of the full-data loss over all of ``data`` with respect to the measured parameters
(``params``), at the model's parameters, exactly as in :mod:`hessian` (:class:`functional.FullDataLoss`,
inside :func:`functional.session`: BN protocol ``bn``, dropout off; the model is restored bit for bit).
With H = sum_i lambda_i u_i u_i^T on N parameters, the spectral density is
phi(t) = (1/N) sum_i delta(t - lambda_i). For a unit vector v, v^T f(H) v = sum_i (v . u_i)^2 f(lambda_i),
and m Lanczos steps from v give the m-point Gauss quadrature of that sum: the Ritz values theta_k
(eigenvalues of the tridiagonal T) as nodes, tau_k = (first component of T's k-th unit eigenvector)^2
as weights (sum_k tau_k = 1). For v uniformly spread over eigenvectors in expectation (E N (v . u_i)^2 = 1),
averaging over n_v start vectors estimates phi. Here:

* start vectors: Rademacher (+-1 entries, the same probes as :func:`trace.hessian_trace` with
  ``method="hutchinson"`` and the same ``seed``) from ``torch.Generator().manual_seed(seed)``, normalized;
  ``steps`` Lanczos steps each (capped at N), full reorthogonalization (twice) within each chain, all chains
  in one block (:func:`hessian.lanczos_block`: each step one HVP call on the block of running chains);
* the smoothed density on a grid:
  phi(t) = (1/n_v) sum_v sum_k tau_{v,k} g_s(t - theta_{v,k}), g_s the N(0, s^2) density,
  s = ``kernel_width`` * (lambda_max - lambda_min) (``sigma``; when that spread is 0, ``kernel_width``
  times max(|lambda_max|, |lambda_min|), or times 1 when that is 0 too), on ``grid_points`` points from
  lambda_min - 5 s to lambda_max + 5 s. It integrates to 1 up to the Gaussian tails cut off
  (< 6e-7) and the trapezoid error (negligible at the default 201 points);
* lambda_max, lambda_min: the largest and smallest Ritz values over all chains. The extreme Ritz values
  converge first, but they are estimates from inside the spectrum (Ritz values lie in [lambda_min(H),
  lambda_max(H)]) whose accuracy grows with ``steps``. lambda_min < 0 means negative curvature: the point is
  not a minimum;
  ``min_max_ratio`` = |lambda_min| / lambda_max (nan when lambda_max <= 0);
* ``negative_weight``: the spectral mass the density resolves below 0, mean over chains of sum_k tau_k
  over theta_k < -s (more than one kernel std below 0): an estimate of the fraction of eigenvalues
  clearly below 0, weighted by the probes. Not "below 0" itself: a short chain represents the bulk of
  near-zero eigenvalues by a few Ritz nodes of large weight, and a node at -1e-4 lambda_max would count
  its whole weight (measured: 0.64 of the mass for a default-study LB model whose lambda_min is
  -1.5e-4 lambda_max);
* ``trace``: N * mean_v sum_k tau_k theta_k = N * mean_v v^T H v (= mean_v z^T H z for the unnormalized
  Rademacher z: Hutchinson's estimate), with ``trace_stderr`` the standard error over the chains
  (sample std, ddof 1, / sqrt(n_v)) and the Student-t interval ``trace_ci_low``, ``trace_ci_high`` at
  ``trace_confidence`` (n_v - 1 degrees of freedom). A trace is given only with its interval: with one
  start vector every trace field is None and ``trace_reason`` says why. The density's mean times N is
  the trace. :func:`density_and_trace` gives, from the same chains, a better trace for a few more HVPs:
  Hutchinson on the complement of the first chain's Krylov space (:mod:`trace`).

A chain whose Krylov space becomes invariant (beta <= 1e-10 of its largest coefficient) stops early;
its quadrature is then exact, and ``ritz_values`` / ``ritz_weights`` (n_v, m) are padded with nan / 0.

Cost: ``hvps`` = n_vectors * steps Hessian-vector products (fewer only on such breakdowns), in ``steps``
calls of :meth:`FullDataLoss.hvp` on blocks of n_vectors vectors (the forward pass and gradient graph of each
data batch shared by the block). Memory: the Lanczos bases, n_v * (steps + 1) * N float64, plus one gradient
graph per data batch. Timings and the comparison with PyHessian: docs/measures.md, "Spectral density: cost".
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .functional import FullDataLoss, measured_protocol, session
from .hessian import HVP_METHOD, lanczos_block, rademacher
from .montecarlo import interval
from .objective import as_objective
from .protocol import Measured, frozen_array, jsonable
from .trace import TraceResult, shared_estimate, shared_trace

BREAKDOWN = 1e-10  # a chain stops when beta <= BREAKDOWN x its largest |alpha|, beta: invariant subspace
TAILS = 5.0  # the grid extends this many kernel stds beyond the extreme Ritz values


@dataclass(frozen=True)
class DensityResult(Measured):
    """What :func:`hessian_density` returns: the smoothed spectral density, its Ritz values and weights, protocol."""

    params_measured: str  # params in words with the counts: trainable of all tensors and entries, tied names
    grid: np.ndarray  # (grid_points,)
    density: np.ndarray  # (grid_points,) phi on the grid, integrates to 1
    ritz_values: np.ndarray  # (n_vectors, m) theta_{v,k}, ascending per chain; nan-padded after a breakdown
    ritz_weights: np.ndarray  # (n_vectors, m) tau_{v,k}, each row sums to 1; 0-padded
    lambda_min: float
    lambda_max: float
    min_max_ratio: float  # |lambda_min| / lambda_max, nan when lambda_max <= 0
    negative_weight: float  # spectral mass below -sigma (resolved negative curvature)
    trace: float | None  # N * mean_v v^T H v (Hutchinson, Rademacher); None when n_vectors == 1 (no interval)
    trace_stderr: float | None  # over the chains; None when n_vectors == 1
    trace_ci_low: float | None  # Student-t interval, n_vectors - 1 degrees of freedom
    trace_ci_high: float | None
    trace_confidence: float
    trace_interval: str  # how the interval is made, or why there is none
    n_vectors: int
    steps: int  # Lanczos steps per chain (capped at N)
    kernel_width: float  # relative to lambda_max - lambda_min
    sigma: float  # the absolute kernel std s
    hvps: int
    seed: int
    method: str

    def as_dict(self) -> dict:
        return jsonable(self)


def ritz(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature of one chain: the eigenvalues of T (ascending) and the squared first components
    of its unit eigenvectors. ``beta`` as :class:`hessian.LanczosChains` gives it (last entry unused)."""
    b = beta[: len(alpha) - 1]
    T = np.diag(alpha) + np.diag(b, 1) + np.diag(b, -1)
    theta, S = np.linalg.eigh(T)
    return theta, S[0] ** 2


def smoothed_density(values: np.ndarray, weights: np.ndarray, kernel_width: float, grid_points: int
                     ) -> tuple[np.ndarray, np.ndarray, float]:
    """``(grid, phi, sigma)`` for Ritz values and weights (n_v, m), nan values ignored (module docstring)."""
    ok = np.isfinite(values)
    theta, tau = values[ok], weights[ok] / len(values)
    lo, hi = float(theta.min()), float(theta.max())
    spread = hi - lo
    if spread <= 0:
        spread = max(abs(hi), abs(lo)) or 1.0
    sigma = kernel_width * spread
    grid = np.linspace(lo - TAILS * sigma, hi + TAILS * sigma, grid_points)
    z = (grid[:, None] - theta[None, :]) / sigma
    phi = (np.exp(-0.5 * z * z) * tau[None, :]).sum(1) / (sigma * np.sqrt(2 * np.pi))
    return grid, phi, sigma


def hessian_density(
    model: nn.Module, data, n_vectors: int = 4, steps: int = 30, loss_fn=None, batch_size: int = 1000,
    bn: str = "eval", params: str = "all", seed: int = 0, grid_points: int = 201,
    kernel_width: float = 0.01, bn_data=None, confidence: float = 0.95, objective=None,
) -> DensityResult:
    """The Hessian's spectral density, extreme eigenvalues, negative mass and trace (module docstring).

    Formula: phi(t) = (1/n_v) sum_v sum_k tau_{v,k} g_s(t - theta_{v,k}) over the Ritz values theta and
    Gauss weights tau of ``steps`` Lanczos steps from each of n_v normalized Rademacher start vectors;
    trace = N mean_v sum_k tau_{v,k} theta_{v,k} with its Student-t interval over the start vectors.

    Args:
        model: the network; restored bit for bit.
        data: the examples of the loss (normally the training set).
        n_vectors: start vectors n_v (>= 1; the trace and its interval need >= 2).
        steps: Lanczos steps per vector (>= 2, capped at the number of parameters N).
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean; None for cross-entropy on logits.
        batch_size: examples per evaluation batch (memory only).
        bn: the BatchNorm protocol: ``"eval"``, ``"batch"`` or ``"recompute"`` (once, at the model's parameters).
        params: the measured parameters: ``"all"`` trainable, or ``"no-bn"``.
        bn_data: the data ``"recompute"`` recomputes the BatchNorm statistics on; None for ``data``.
        objective: how a batch becomes a loss (:mod:`objective`): an Objective, a ready name or a callable
            ``objective(model, batch) -> (loss_sum, weight)``; None for ``(inputs, targets)`` pairs and ``loss_fn``.
        seed: seeds the start vectors (the probes of ``hessian_trace(method="hutchinson")`` with this seed).
        grid_points: points of the density's grid.
        kernel_width: the Gaussian kernel's std relative to lambda_max - lambda_min.
        confidence: of the trace's interval.

    Returns:
        :class:`DensityResult`: grid and density, Ritz values and weights, lambda_min, lambda_max, the
        negative mass, the trace with its interval (None for one start vector), the HVP count and protocol.

    Cost: ``n_vectors * steps`` HVPs (each ~4.8 loss-and-gradient passes over ``data``) in ``steps`` block
    calls sharing each batch's forward pass; memory n_v (steps + 1) N float64 for the Lanczos bases.
    """
    _check(n_vectors, steps, grid_points, kernel_width, confidence)
    gen = torch.Generator().manual_seed(seed)
    obj = as_objective(objective, loss_fn)
    with session(model, bn, data, bn_data, batch_size, obj):
        F = FullDataLoss(model, data, None, batch_size, params, objective=obj)
        chains = lanczos_block(F.hvp, rademacher(n_vectors, F.num_params, gen, F.x0.device), steps,
                               breakdown=BREAKDOWN)
        proto = measured_protocol(model, F, bn, bn_data, batch_size, params)
    return _density(chains, F.num_params, n_vectors, steps, grid_points, kernel_width, confidence, seed, proto)


def density_and_trace(
    model: nn.Module, data, n_vectors: int = 4, steps: int = 20, trace_probes: int = 10, loss_fn=None,
    batch_size: int = 1000, bn: str = "eval", params: str = "all", seed: int = 0, grid_points: int = 201,
    kernel_width: float = 0.01, bn_data=None, confidence: float = 0.95, objective=None,
) -> tuple[DensityResult, TraceResult]:
    """The spectral density and tr(H) from the same HVPs: ``hessian_density(...)``'s result (the same numbers, the
    same seed) and a :class:`trace.TraceResult` that reuses its chains (issue 27: SLQ and the trace share HVPs).

    The trace: Hutchinson on the complement of chain 0's Krylov basis Q (``steps`` Lanczos vectors), tr(Q H Q^T)
    = the sum of chain 0's alphas exactly, and as residual probes the other n_v - 1 start vectors (their
    z^T P H P z from the chains' first steps, :func:`trace.krylov_residuals`, no HVP) plus ``trace_probes`` more
    Rademacher probes (``trace_probes`` HVPs in one block call, drawn after the start vectors from the same
    generator); the Student-t interval of those n_v - 1 + ``trace_probes`` residual values, conditional on Q.
    Against ``hessian_trace(n_probes=trace_probes)`` beside the density, the same HVPs buy a ``steps``-dimensional
    deflation instead of a ``trace_probes / 2``-dimensional one and n_v - 1 more probes.

    Args:
        model: the network; restored bit for bit.
        data: the examples of the loss (normally the training set).
        n_vectors: start vectors n_v (>= 2: chain 0 gives the basis, the others residual probes).
        steps: Lanczos steps per vector (>= 2, capped at the number of parameters N): the basis dimension.
        trace_probes: residual probes drawn for the trace beyond the start vectors (>= 0, with
            n_vectors - 1 + trace_probes >= 2 for the interval): its added HVPs.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean; None for cross-entropy on logits.
        batch_size: examples per evaluation batch (memory only).
        bn: the BatchNorm protocol: ``"eval"``, ``"batch"`` or ``"recompute"`` (once, at the model's parameters).
        params: the measured parameters: ``"all"`` trainable, or ``"no-bn"``.
        seed: seeds the start vectors and then the trace's probes (one generator).
        grid_points: points of the density's grid.
        kernel_width: the Gaussian kernel's std relative to lambda_max - lambda_min.
        bn_data: the data ``"recompute"`` recomputes the BatchNorm statistics on; None for ``data``.
        confidence: of both intervals (the density's trace and the shared trace).
        objective: how a batch becomes a loss (:mod:`objective`); None for ``(inputs, targets)`` pairs and ``loss_fn``.

    Returns:
        ``(DensityResult, TraceResult)``: the density as :func:`hessian_density` gives it with the same arguments,
        and the trace (``hvps`` = ``trace_probes``, the HVPs it added; ``deflated`` = the basis dimension).

    Cost: ``n_vectors * steps + trace_probes`` HVPs; memory as :func:`hessian_density` plus the probes.
    """
    _check(n_vectors, steps, grid_points, kernel_width, confidence)
    if not isinstance(n_vectors, (int, np.integer)) or n_vectors < 2:
        raise ValueError(f"n_vectors must be an integer >= 2 for a shared trace, got {n_vectors!r}")
    if not isinstance(trace_probes, (int, np.integer)) or trace_probes < 0 or n_vectors - 1 + trace_probes < 2:
        raise ValueError(f"trace_probes must be an integer >= 0 with n_vectors - 1 + trace_probes >= 2, "
                         f"got {trace_probes!r} with n_vectors={n_vectors}")
    gen = torch.Generator().manual_seed(seed)
    obj = as_objective(objective, loss_fn)
    with session(model, bn, data, bn_data, batch_size, obj):
        F = FullDataLoss(model, data, None, batch_size, params, objective=obj)
        N = F.num_params
        chains, exact, free, drawn, k = shared_estimate(F.hvp, N, F.x0.device, n_vectors, steps, trace_probes, gen)
        proto = measured_protocol(model, F, bn, bn_data, batch_size, params)
    density = _density(chains, N, n_vectors, steps, grid_points, kernel_width, confidence, seed, proto)
    trace = shared_trace(exact, free, drawn, k, confidence, seed, density.hvps, proto)
    return density, trace


def _check(n_vectors, steps, grid_points, kernel_width, confidence) -> None:
    if not (isinstance(confidence, float) and 0 < confidence < 1):
        raise ValueError(f"confidence must be a float in (0, 1), got {confidence!r}")
    if not isinstance(n_vectors, (int, np.integer)) or n_vectors < 1:
        raise ValueError(f"n_vectors must be an integer >= 1, got {n_vectors!r}")
    if not isinstance(steps, (int, np.integer)) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2, got {steps!r}")
    if not isinstance(grid_points, (int, np.integer)) or grid_points < 2:
        raise ValueError(f"grid_points must be an integer >= 2, got {grid_points!r}")
    if not (np.isfinite(kernel_width) and kernel_width > 0):
        raise ValueError(f"kernel_width must be positive and finite, got {kernel_width!r}")


def _density(chains, N: int, n_vectors: int, steps: int, grid_points: int, kernel_width: float, confidence: float,
             seed: int, proto: dict) -> DensityResult:
    """The :class:`DensityResult` of the chains (module docstring)."""
    steps = min(steps, N)
    quad = [ritz(a, b) for a, b in zip(chains.alphas, chains.betas)]
    m = max(len(t) for t, _ in quad)
    values = np.full((n_vectors, m), np.nan)
    weights = np.zeros((n_vectors, m))
    for i, (t, w) in enumerate(quad):
        values[i, : len(t)], weights[i, : len(w)] = t, w
    grid, phi, sigma = smoothed_density(values, weights, kernel_width, grid_points)
    lam_min, lam_max = float(np.nanmin(values)), float(np.nanmax(values))
    below = np.where(np.nan_to_num(values, nan=np.inf) < -sigma, weights, 0.0)
    per_chain = N * np.array([float(w @ t) for t, w in quad])
    trace = stderr = low = high = None
    if n_vectors > 1:
        trace, stderr, low, high = interval(per_chain, confidence, antithetic=False)
        how = f"Student-t over the {n_vectors} start vectors' N v^T H v ({n_vectors - 1} degrees of freedom)"
    else:
        how = "none: one start vector gives no interval, so no trace (n_vectors >= 2 for one)"
    return DensityResult(
        grid=frozen_array(grid), density=frozen_array(phi), ritz_values=frozen_array(values),
        ritz_weights=frozen_array(weights), lambda_min=lam_min, lambda_max=lam_max,
        min_max_ratio=abs(lam_min) / lam_max if lam_max > 0 else float("nan"),
        negative_weight=float(below.sum(1).mean()), trace=trace, trace_stderr=stderr, trace_ci_low=low,
        trace_ci_high=high, trace_confidence=float(confidence), trace_interval=how,
        n_vectors=n_vectors, steps=steps, kernel_width=float(kernel_width), sigma=sigma, hvps=chains.hvps,
        seed=seed,
        method=(f"stochastic Lanczos quadrature: {n_vectors} normalized Rademacher start vector"
                f"{'s' * (n_vectors != 1)}, {steps} steps each, full reorthogonalization, one block HVP per step; "
                f"Gaussian kernel std "
                f"{kernel_width:g} x (lambda_max - lambda_min); {HVP_METHOD}"),
        **proto,
    )
