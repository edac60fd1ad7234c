"""Flatness under random and worst-case perturbations: average sharpness, PAC-Bayes flatness, worst-case
flatness (Jiang et al. 2019, "Fantastic generalization measures"; docs/measures.md, "Flatness", has the full
analysis: the noise families and their invariance, the draw, the search, the differences from Jiang's code).

L is the full-data, batch-weighted mean loss of :class:`functional.FullDataLoss` (default mean
cross-entropy), acc the training accuracy, both functions of the flat vector w of the measured parameters
(``params``). Noise: u = sigma z (plain) or u = sigma |w| z (magnitude-aware, invariant to a ReLU
rescaling), z_1..z_M ~ N(0, I) the rows of ONE seeded draw, used at every sigma (common random numbers):
by default antithetic pairs z_j, -z_j with the interval over the pair means (:mod:`montecarlo`, which cancels
the first-order term g . u), or ``antithetic=False`` M independent rows (:data:`montecarlo.DRAW`).

* :func:`average_sharpness`: (1/M) sum_j L(w + u_j) - L(w), with its Student-t interval.
* :func:`pac_bayes_flatness`: 1 / sigma^2 for the largest sigma with g(sigma) <= delta; g the mean loss
  rise (``target="loss"``, batchgap's variant) or the mean training-accuracy drop (``target="error"``,
  Jiang et al.'s pacbayes.flatness, eq. 53, and pacbayes.mag.flatness, eq. 61); the bracket search of
  :func:`bracket.crossing`; no value (and a reason) when g does not cross delta inside ``sigma_range``.
* :func:`worst_case_flatness`: 1 / alpha^2 for the largest box |u_i| <= alpha (or alpha |w_i|) whose
  maximum loss rise (:func:`boxmax.maximize_in_box`, a lower bound: alpha is an upper estimate) is <= delta.

Each perturbed point costs one forward pass over the data (the M points at one sigma in one read of it,
:meth:`functional.FullDataLoss.values_at_rows`); float64 accumulation. One BN protocol for the whole
measurement (:func:`functional.session`; "recompute" once at w). Dropout off; the model is restored bit for
bit, also on error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .bracket import crossing, is_monotone
from .boxmax import SOLVER, START, BoxMax, default_max_fun, maximize_in_box
from .functional import FullDataLoss, measured_protocol, session
from .montecarlo import check_draws, draws_words, interval, normal_draws
from .objective import as_objective
from .protocol import Measured

SEARCH = ("start sigma (default the geometric mean of the range), steps toward the crossing predicted by the power "
          "law g ~ sigma^2 (at most 4x) until the estimate crosses delta, then log-log interpolation safeguarded by "
          "bisection in log sigma until hi/lo <= 1 + rtol; reported: lo, the largest tried at or below delta; a "
          "non-finite estimate counts as above delta")


def _noise_words(magnitude_aware: bool) -> str:
    if magnitude_aware:
        return "u = sigma |w| z, u_i ~ N(0, sigma^2 w_i^2), z ~ N(0, I); coordinates with w_i = 0 fixed"
    return "u = sigma z, u ~ N(0, sigma^2 I), z ~ N(0, I)"


@dataclass(frozen=True)
class AverageSharpnessResult(Measured):
    """What :func:`average_sharpness` returns: the Monte Carlo estimate, its interval, the samples, the protocol."""

    value: float  # (1/M) sum_j L(w + u_j) - L(w), the Monte Carlo estimate of E_u[L(w + u)] - L(w)
    params_measured: str
    stderr: float  # std(samples or, antithetic, pair means, ddof=1) / sqrt(their count)
    ci_low: float  # Student-t interval, M - 1 (antithetic: M / 2 - 1) degrees of freedom
    ci_high: float
    confidence: float
    relative: float  # value / (1 + L(w)) * 100, Keskar's scale
    sigma: float
    magnitude_aware: bool
    n_samples: int
    f_x: float  # L(w)
    samples: tuple  # L(w + u_j) - L(w), in draw order
    seed: int
    noise: str  # the noise in words
    method: str
    antithetic: bool = False  # draws in pairs z, -z (samples in pair order), interval over pair means


@dataclass(frozen=True)
class PacBayesResult(Measured):
    """What :func:`pac_bayes_flatness` returns: 1 / sigma^2 or why not, the sigma search's record, the protocol."""

    value: float | None  # 1 / sigma^2; None when not bracketed
    params_measured: str
    sigma: float | None  # the largest sigma tried with g(sigma) <= delta (None when not bracketed)
    sigma_hi: float | None  # the smallest sigma tried with g(sigma) > delta; sigma_hi / sigma <= 1 + rtol
    bracketed: bool
    reason: str | None  # why there is no value (None when bracketed)
    delta: float
    magnitude_aware: bool
    target: str  # "loss": g bounds the loss rise; "error": the training-accuracy drop (Jiang et al.'s)
    bound: str  # the bound in words (TARGETS[target])
    g: float | None  # g(sigma): the mean rise (loss) or drop (accuracy) over the M draws at the reported sigma
    stderr: float | None  # its Monte Carlo standard error
    ci_low: float | None  # Student-t interval of E_u[L(w + u)] - L(w) at the reported sigma
    ci_high: float | None
    confidence: float
    samples: tuple | None  # L(w + u_j) - L(w), or acc(w) - acc(w + u_j), at the reported sigma, in draw order
    f_x: float  # L(w)
    accuracy_x: float | None  # acc(w), the training accuracy (error target; None for the loss target)
    n_samples: int
    seed: int
    rtol: float
    sigma_range: tuple
    sigma_start: float
    sigmas: tuple  # every sigma tried, in order
    g_values: tuple  # g at each of them
    monotone: bool  # g nondecreasing over the sigmas tried, in increasing sigma
    sigmas_tried: int
    points_evaluated: int  # M per sigma tried, + 1 for L(w); each one forward pass over the data
    data_passes: int  # passes reading the data: one per sigma tried + 1 for L(w) (BN recompute not counted)
    noise: str
    search: str
    method: str
    antithetic: bool = False  # draws in pairs z, -z, interval over pair means


@dataclass(frozen=True)
class WorstCaseFlatnessResult(Measured):
    """What :func:`worst_case_flatness` returns: 1 / alpha^2 or why not, the alpha search's record, the protocol."""

    value: float | None  # 1 / alpha^2; None when not bracketed
    params_measured: str
    alpha: float | None  # the largest alpha tried whose box maximum rose by <= delta (an upper estimate)
    alpha_hi: float | None  # the smallest alpha tried whose box maximum rose by > delta
    bracketed: bool
    reason: str | None
    delta: float
    magnitude_aware: bool
    rise: float | None  # the box maximum's rise max L(w + u) - L(w) (best evaluation) at the reported alpha
    f_x: float
    rtol: float
    alpha_range: tuple
    alpha_start: float
    alphas: tuple  # every alpha tried, in order
    rises: tuple  # the maximum's rise at each
    capped_flags: tuple  # whether the evaluation cap ended each solve
    monotone: bool  # rises nondecreasing over the alphas tried, in increasing alpha
    solves: int
    capped_solves: int
    capped_at_alpha: bool | None  # the solve at the reported alpha was capped
    max_iter: int
    max_fun: int
    nit: int  # L-BFGS-B iterations over all solves
    nfev: int  # full-data function+gradient evaluations over all solves (each one forward + backward pass)
    perturbation_set: str
    solver: str
    start: str
    search: str


def _check(name: str, x) -> None:
    try:
        ok = not isinstance(x, bool) and math.isfinite(float(x)) and float(x) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}")


def _check_common(n_samples: int, confidence: float, chunk: int, antithetic: bool) -> None:
    check_draws(n_samples, antithetic)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be None or an int >= 1, got {chunk!r}")


def _check_range(name: str, bounds, rtol: float) -> tuple[float, float]:
    lo, hi = (float(b) for b in bounds)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise ValueError(f"{name} must be (low, high) with 0 < low < high, got {bounds!r}")
    _check("rtol", rtol)
    return lo, hi


def _chunk(chunk: int | None, F: FullDataLoss) -> int:
    """``None``: one point at a time on the CPU (vmap over points measured 1.3-1.7x slower there on the
    default MLP), 16 points per vmap on an accelerator, as :mod:`curves` does."""
    return chunk if chunk is not None else (1 if F.x0.device.type == "cpu" else 16)


def _rises(F: FullDataLoss, Z: torch.Tensor, scale: torch.Tensor | None, sigma: float, base: float,
           chunk: int, target: str = "loss") -> np.ndarray:
    """Per row z_j of Z, at w + sigma s z_j (s = 1, or ``scale`` = |w|), float64: the loss rise
    L(w + u_j) - L(w) (``target`` "loss", ``base`` = L(w)) or the training-accuracy drop
    acc(w) - acc(w + u_j) (``target`` "error", ``base`` = acc(w))."""
    step = sigma if scale is None else sigma * scale

    def point(rows: torch.Tensor) -> torch.Tensor:
        return F.x0 + step * rows

    loss, accuracy, _ = F.values_at_rows(point, Z, chunk)
    return base - accuracy.numpy() if target == "error" else loss.numpy() - base


def _accuracy_at_w(F: FullDataLoss) -> float:
    """Training accuracy at w (one pass); ValueError where the outputs are not classification logits."""
    _, accuracy, classify = F.values_at_rows(lambda rows: F.x0 + 0.0 * rows, F.x0[None], 1)
    if not classify:
        raise ValueError("target='error' needs (batch, classes) logits with class-index targets (an accuracy); "
                         "use target='loss' for this model")
    return float(accuracy[0])


def average_sharpness(
    model: nn.Module, data, sigma: float = 0.01, magnitude_aware: bool = False, n_samples: int = 16, seed: int = 0,
    loss_fn=None, batch_size: int = 1000, bn: str = "eval", params: str = "all", confidence: float = 0.95,
    chunk: int | None = None, bn_data=None, objective=None, antithetic: bool = True,
) -> AverageSharpnessResult:
    """Average sharpness E_u[L(w + u)] - L(w) by Monte Carlo, with its Student-t interval.

    Formula: (1/M) sum_j L(w + u_j) - L(w), u_j = sigma z_j (or sigma |w| z_j, ``magnitude_aware``), z_j ~ N(0, I)
    the M = ``n_samples`` rows of one seeded draw, by default M / 2 antithetic pairs (z_j, -z_j), whose pair
    means cancel the first-order term g . u; stderr = std(ddof=1) / sqrt(count) over the pair means (or the M
    draws, ``antithetic=False``). (Neyshabur et al. 2017's expected sharpness; not one of Jiang et al. 2019's.)

    Args:
        model: the network; restored bit for bit.
        data: the examples (normally the training set).
        sigma: the noise scale (absolute, or relative to |w_i| when ``magnitude_aware``).
        magnitude_aware: u_i ~ N(0, sigma^2 w_i^2) instead of N(0, sigma^2).
        n_samples: draws M (>= 2; antithetic: even and >= 4).
        seed: seeds the draws.
        antithetic: draw in pairs u, -u (default) or M independent draws.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean; None for cross-entropy on logits.
        batch_size: examples per evaluation batch (memory only).
        bn: the BatchNorm protocol: ``"eval"``, ``"batch"`` or ``"recompute"`` (once, at the model's parameters).
        params: the measured parameters: ``"all"`` trainable, or ``"no-bn"``.
        bn_data: the data ``"recompute"`` recomputes the BatchNorm statistics on; None for ``data``.
        objective: how a batch becomes a loss (:mod:`objective`): an Objective, a ready name or a callable
            ``objective(model, batch) -> (loss_sum, weight)``; None for ``(inputs, targets)`` pairs and ``loss_fn``.
        confidence: of the interval.
        chunk: points per vmap (None: 1 on the CPU, 16 on an accelerator).

    Returns:
        :class:`AverageSharpnessResult`: value, stderr, interval, ``relative`` = value / (1 + L(w)) * 100, the
        per-draw rises and the protocol.

    Cost: ``n_samples + 1`` forward passes over the data, in two reads of it; memory M x N for the draws."""
    _check("sigma", sigma)
    _check_common(n_samples, confidence, chunk, antithetic)
    obj = as_objective(objective, loss_fn)
    with session(model, bn, data, bn_data, batch_size, obj):
        F = FullDataLoss(model, data, None, batch_size, params, objective=obj)
        f_x = F.value(F.x0)
        Z = normal_draws(n_samples, F.num_params, seed, F.x0.dtype, F.x0.device, antithetic)
        chunk = _chunk(chunk, F)
        samples = _rises(F, Z, F.x0.abs() if magnitude_aware else None, sigma, f_x, chunk, "loss")
        proto = measured_protocol(model, F, bn, bn_data, batch_size, params)
    mean, stderr, low, high = interval(samples, confidence, antithetic)
    how = "one point at a time" if chunk == 1 else f"vmap over {chunk} points"
    return AverageSharpnessResult(
        value=mean, stderr=stderr, ci_low=low, ci_high=high, confidence=confidence,
        relative=mean / (1 + f_x) * 100, sigma=float(sigma), magnitude_aware=bool(magnitude_aware),
        n_samples=n_samples, f_x=f_x, samples=tuple(float(s) for s in samples), seed=seed,
        noise=_noise_words(magnitude_aware),
        method=f"{draws_words(n_samples, antithetic)}; each data batch read once for all points ({how}); float64",
        antithetic=antithetic, **proto,
    )


TARGETS = {
    "loss": "E_u[L(w + u)] - L(w) <= delta: the rise of the training loss (a variant of Jiang et al.'s measure)",
    "error": ("E_u[acc(w) - acc(w + u)] <= delta: the drop of the training accuracy (Jiang et al. 2019's "
              "pacbayes.flatness, eq. 53, and pacbayes.mag.flatness, eq. 61)"),
}


def pac_bayes_flatness(
    model: nn.Module, data, delta: float = 0.1, magnitude_aware: bool = False, n_samples: int = 16, seed: int = 0,
    rtol: float = 0.01, sigma_range: tuple = (1e-5, 10.0), loss_fn=None, batch_size: int = 1000, bn: str = "eval",
    params: str = "all", confidence: float = 0.95, chunk: int | None = None, bn_data=None,
    sigma_start: float | None = None, target: str = "loss", objective=None, antithetic: bool = True,
) -> PacBayesResult:
    """PAC-Bayes flatness 1 / sigma^2 for the largest sigma whose expected rise stays within delta.

    Formula: with u = sigma z (or u = sigma |w| z, ``magnitude_aware``), z ~ N(0, I), the rise is
    g(sigma) = E_u[L(w + u)] - L(w) for ``target="loss"`` and g(sigma) = E_u[acc(w) - acc(w + u)] (the
    drop of the training accuracy, in [0, 1]) for ``target="error"``, Jiang et al.'s choice with delta
    = 0.1; value = 1 / sigma^2 for the largest sigma with g(sigma) <= delta (larger = sharper). E_u is
    estimated by the mean over ``n_samples`` draws z_j, the SAME draws at every sigma (common random
    numbers: the estimate is a deterministic function of sigma and its search converges).

    Args:
        model: the network; restored bit for bit.
        data: the examples (normally the training set), any form :func:`evaluate.batches` accepts.
        delta: the bound on g (Jiang et al.: 0.1 of accuracy).
        magnitude_aware: u_i ~ N(0, sigma^2 w_i^2) instead of N(0, sigma^2) (no epsilon floor: exactly
            invariant to a ReLU rescaling).
        n_samples: the Monte Carlo draws M (>= 2, for the interval; antithetic: even and >= 4).
        seed: seeds the draws (``torch.Generator``).
        antithetic: draw in pairs u, -u (default; interval over pair means) or M independent draws.
        rtol: the search stops when sigma_hi / sigma <= 1 + rtol.
        sigma_range: the (low, high) sigmas searched.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean; None for cross-entropy on logits.
        batch_size: examples per evaluation batch (memory only).
        bn: the BatchNorm protocol: ``"eval"``, ``"batch"`` or ``"recompute"`` (once, at the model's parameters).
        params: the measured parameters: ``"all"`` trainable, or ``"no-bn"``.
        bn_data: the data ``"recompute"`` recomputes the BatchNorm statistics on; None for ``data``.
        objective: how a batch becomes a loss (:mod:`objective`): an Objective, a ready name or a callable
            ``objective(model, batch) -> (loss_sum, weight)``; None for ``(inputs, targets)`` pairs and ``loss_fn``.
        confidence: of the Student-t interval of g at the reported sigma.
        chunk: points per vmap (None: 1 on the CPU, 16 on an accelerator).
        sigma_start: the search's first sigma (default the geometric mean of ``sigma_range``).
        target: "loss" or "error" (needs classification logits with class-index targets).

    Returns:
        :class:`PacBayesResult`: ``value`` = 1 / sigma^2 (None with a ``reason`` when g does not cross delta
        inside ``sigma_range``), sigma, the bracket, g with its interval and per-draw samples, every sigma
        tried, ``target`` and the protocol.

    Cost: ``n_samples`` forward passes over ``data`` per sigma tried (``sigmas_tried``, typically 4 to 12),
    in one read of the data per sigma, + 1 pass for L(w) (and 1 for acc(w) with the error target); memory
    ``n_samples x N`` for the draws.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(repr(t) for t in TARGETS)}, got {target!r}")
    _check("delta", delta)
    _check_common(n_samples, confidence, chunk, antithetic)
    bounds = _check_range("sigma_range", sigma_range, rtol)
    start = math.sqrt(bounds[0] * bounds[1]) if sigma_start is None else float(sigma_start)
    _check("sigma_start", start)
    found: dict[float, np.ndarray] = {}
    obj = as_objective(objective, loss_fn)
    with session(model, bn, data, bn_data, batch_size, obj):
        F = FullDataLoss(model, data, None, batch_size, params, objective=obj)
        f_x = F.value(F.x0)
        acc_x = _accuracy_at_w(F) if target == "error" else None
        Z = normal_draws(n_samples, F.num_params, seed, F.x0.dtype, F.x0.device, antithetic)
        chunk = _chunk(chunk, F)
        scale = F.x0.abs() if magnitude_aware else None
        base = f_x if target == "loss" else acc_x

        def estimate(s: float) -> float:
            found[s] = _rises(F, Z, scale, s, base, chunk, target)
            return float(found[s].mean())

        lo, hi, trace, reason = crossing(estimate, start, bounds, delta, rtol, "sigma")
        proto = measured_protocol(model, F, bn, bn_data, batch_size, params)
    if lo is None:
        g = stderr = low = high = samples = None
    else:
        g, stderr, low, high = interval(found[lo], confidence, antithetic)
        samples = tuple(float(s) for s in found[lo])
    how = "one point at a time" if chunk == 1 else f"vmap over {chunk} points"
    return PacBayesResult(
        value=None if lo is None else 1.0 / lo**2, sigma=lo, sigma_hi=hi, bracketed=lo is not None, reason=reason,
        delta=float(delta), magnitude_aware=bool(magnitude_aware), target=target, bound=TARGETS[target], g=g,
        stderr=stderr, ci_low=low, ci_high=high, confidence=confidence, samples=samples, f_x=f_x, accuracy_x=acc_x,
        n_samples=n_samples, seed=seed, rtol=float(rtol), sigma_range=bounds, sigma_start=start,
        sigmas=tuple(s for s, _ in trace), g_values=tuple(v for _, v in trace), monotone=is_monotone(trace),
        sigmas_tried=len(trace), points_evaluated=n_samples * len(trace) + 1 + (target == "error"),
        data_passes=len(trace) + 1 + (target == "error"), noise=_noise_words(magnitude_aware), search=SEARCH,
        method=(f"common random numbers, the same draws at every sigma: {draws_words(n_samples, antithetic)}, at the "
                f"reported sigma; each data batch read once per sigma ({how}); float64 accumulation"),
        antithetic=antithetic, **proto,
    )


def worst_case_flatness(
    model: nn.Module, data, delta: float = 0.1, magnitude_aware: bool = False, max_iter: int = 5, rtol: float = 0.05,
    alpha_range: tuple = (1e-6, 1.0), loss_fn=None, batch_size: int = 1000, bn: str = "eval", params: str = "all",
    max_fun: int | None = None, bn_data=None, alpha_start: float | None = None, objective=None,
) -> WorstCaseFlatnessResult:
    """Worst-case flatness 1 / alpha^2 for the largest alpha whose box maximum rises by at most delta.

    Formula: alpha* = max { alpha : max_{|u_i| <= alpha s_i} L(w + u) - L(w) <= delta }, s_i = 1 (or |w_i|,
    ``magnitude_aware``), each inner maximum by :func:`boxmax.maximize_in_box` (a lower bound, so alpha is an
    upper estimate); value = 1 / alpha^2. The loss-target variant of Jiang et al. 2019's sharpness.flatness
    (and sharpness.mag.flatness, without its noise floor).

    Args:
        model: the network; restored bit for bit.
        data: the examples (normally the training set).
        delta: the bound on the maximum's loss rise.
        magnitude_aware: the box |u_i| <= alpha |w_i| instead of |u_i| <= alpha.
        max_iter: L-BFGS-B iterations per box maximization.
        rtol: the search stops when alpha_hi / alpha <= 1 + rtol.
        alpha_range: the (low, high) alphas searched.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean; None for cross-entropy on logits.
        batch_size: examples per evaluation batch (memory only).
        bn: the BatchNorm protocol: ``"eval"``, ``"batch"`` or ``"recompute"`` (once, at the model's parameters).
        params: the measured parameters: ``"all"`` trainable, or ``"no-bn"``.
        bn_data: the data ``"recompute"`` recomputes the BatchNorm statistics on; None for ``data``.
        objective: how a batch becomes a loss (:mod:`objective`): an Objective, a ready name or a callable
            ``objective(model, batch) -> (loss_sum, weight)``; None for ``(inputs, targets)`` pairs and ``loss_fn``.
        max_fun: full-data evaluations per maximization (default ``1 + 4 * max_iter``).
        alpha_start: the search's first alpha (default the geometric mean of ``alpha_range``).

    Returns:
        :class:`WorstCaseFlatnessResult`: value (None with a ``reason`` when not bracketed), alpha, the
        bracket, each alpha's rise and whether its solve was capped, solver counts and the protocol.

    Cost: per alpha tried one box maximization, at most ``max_fun`` full-data forward+backward passes
    (typically 6 to 10 alphas)."""
    _check("delta", delta)
    bounds = _check_range("alpha_range", alpha_range, rtol)
    start = math.sqrt(bounds[0] * bounds[1]) if alpha_start is None else float(alpha_start)
    _check("alpha_start", start)
    max_fun = default_max_fun(max_iter) if max_fun is None else max_fun
    if max_iter < 1 or max_fun < 1:
        raise ValueError(f"max_iter and max_fun must be >= 1, got {max_iter}, {max_fun}")
    solved: dict[float, BoxMax] = {}
    obj = as_objective(objective, loss_fn)
    with session(model, bn, data, bn_data, batch_size, obj):
        F = FullDataLoss(model, data, None, batch_size, params, objective=obj)
        if magnitude_aware:
            scale = F.x0.abs()

            def apply(u: torch.Tensor) -> torch.Tensor:
                return scale * u.to(scale.dtype)
            apply_t = apply
        else:
            def apply(u: torch.Tensor) -> torch.Tensor:
                return u
            apply_t = apply

        def estimate(a: float) -> float:
            solved[a] = maximize_in_box(F, apply, apply_t, np.full(F.num_params, a), max_iter, max_fun)
            return solved[a].f_best - solved[a].f0

        lo, hi, trace, reason = crossing(estimate, start, bounds, delta, rtol, "alpha")
        proto = measured_protocol(model, F, bn, bn_data, batch_size, params)
    runs = [solved[a] for a, _ in trace]
    where = ("|u_i| <= alpha |w_i| (elementwise, l_inf); solved in u = delta / |w|" if magnitude_aware
             else "|u_i| <= alpha (l_inf box)")
    return WorstCaseFlatnessResult(
        value=None if lo is None else 1.0 / lo**2, alpha=lo, alpha_hi=hi, bracketed=lo is not None, reason=reason,
        delta=float(delta), magnitude_aware=bool(magnitude_aware),
        rise=None if lo is None else solved[lo].f_best - solved[lo].f0,
        f_x=runs[0].f0, rtol=float(rtol), alpha_range=bounds, alpha_start=start,
        alphas=tuple(a for a, _ in trace), rises=tuple(v for _, v in trace), capped_flags=tuple(r.capped for r in runs),
        monotone=is_monotone(trace), solves=len(runs), capped_solves=sum(r.capped for r in runs),
        capped_at_alpha=None if lo is None else solved[lo].capped, max_iter=max_iter, max_fun=max_fun,
        nit=sum(r.nit for r in runs), nfev=sum(r.nfev for r in runs), perturbation_set=where, solver=SOLVER,
        start=START, search=SEARCH.replace("sigma", "alpha"), **proto,
    )
