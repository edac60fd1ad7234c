"""The critical-batch arithmetic: the steps/examples trade-off fit and the noise scale B_noise, on plain numbers.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", eq. 2.11 and section 2.3): the optimizer
steps S and examples E = B S that SGD at batch size B needs to reach a given training loss satisfy

    (S / S_min - 1) (E / E_min - 1) = 1,

which with E = B S is S(B) = S_min (1 + B_crit / B), E(B) = E_min (1 + B / B_crit), B_crit = E_min / S_min.
:func:`fit_pareto` fits (S_min, B_crit) to measured (B, S) pairs by least squares on log S;
:func:`best_steps` keeps, per batch size, the learning rate with the fewest mean steps over seeds (the
learning rate retuned per batch size and target, as Shallue et al. 2019 do), and :func:`bootstrap_fit`
resamples the seeds to give percentile intervals for S_min, E_min and B_crit.

:func:`b_noise_estimate` is McCandlish et al.'s B_noise = tr(H Sigma) / (G^T H G) (their eq. 2.8, before the
B_simple simplification H = I): G the full-data gradient, H the full-data Hessian, Sigma the per-example gradient
covariance (population form, as batchgap's B_simple). tr(H Sigma) = (1/n) sum_i (g_i - G)^T H (g_i - G) is
estimated from a seeded sample of examples without replacement (each term one Hessian-vector product with the
example's centred gradient as the probe), with a Student-t interval from the terms' standard error and the
finite-population correction; all n examples give the exact value and an interval of zero width. G^T H G is
exact (one HVP).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from scipy.stats import t as student_t


def pareto_steps(batch_sizes, s_min: float, b_crit: float) -> np.ndarray:
    """S(B) = S_min (1 + B_crit / B): the steps the trade-off (S/S_min - 1)(E/E_min - 1) = 1 gives at each B.

    Args:
        batch_sizes: the batch sizes B (positive).
        s_min: S_min, the steps at infinite batch size.
        b_crit: B_crit = E_min / S_min.

    Returns:
        The steps, a float array.
    """
    b = np.asarray(batch_sizes, dtype=float)
    return s_min * (1.0 + b_crit / b)


def fit_pareto(batch_sizes, steps) -> dict:
    """Fit S(B) = S_min (1 + B_crit / B) to measured steps by least squares on log S.

        minimize  sum_i (log S_i - log S_min - log(1 + B_crit / B_i))^2   over log S_min, log B_crit,

    For fixed B_crit the best log S_min is a mean, so the fit is one-dimensional in log B_crit: a grid over
    [min B e^-9, max B e^9], then Gauss-Newton on both parameters from its best point while the sum falls.
    ``bracketed`` is False when the best point is at the grid's edge (the data do not pin B_crit down: no
    saturation, or no linear regime).

    Args:
        batch_sizes: the batch sizes (at least 2 distinct, positive).
        steps: the steps to the target at each (positive).

    Returns:
        ``{"s_min", "e_min", "b_crit", "rms_log_residual", "points", "bracketed"}``; ValueError on fewer
        than 2 points or a non-positive value.

    Cost:
        400 vectorized evaluations of the curve and at most 30 Gauss-Newton steps.
    """
    b, s = np.asarray(batch_sizes, dtype=float), np.asarray(steps, dtype=float)
    if b.shape != s.shape or len(np.unique(b)) < 2:
        raise ValueError(f"fit_pareto needs at least 2 distinct batch sizes with steps, got {list(b)}, {list(s)}")
    if not (np.all(b > 0) and np.all(s > 0) and np.all(np.isfinite(s))):
        raise ValueError(f"fit_pareto: batch sizes and steps must be positive and finite, got {list(b)}, {list(s)}")
    logs = np.log(s)

    def profile(log_bc):  # the best log S_min for each log B_crit is a mean: the fit is 1-D in log B_crit
        shape = np.log1p(np.exp(np.asarray(log_bc, dtype=float))[..., None] / b)
        log_s_min = (logs - shape).mean(-1)
        return log_s_min, ((logs - shape - log_s_min[..., None]) ** 2).sum(-1)

    grid = np.linspace(np.log(b.min()) - 9, np.log(b.max()) + 9, 400)
    k = int(np.argmin(profile(grid)[1]))
    log_bc = float(grid[k])
    log_s_min, sse = profile(log_bc)
    for _ in range(30):  # Gauss-Newton from the grid's best point on (log S_min, log B_crit), while it descends
        u = np.exp(log_bc) / b
        r = logs - log_s_min - np.log1p(u)
        J = np.stack([-np.ones_like(b), -u / (1 + u)], axis=1)
        step = np.linalg.lstsq(J, -r, rcond=None)[0]
        a2, c2 = log_s_min + step[0], log_bc + step[1]
        sse2 = float(((logs - a2 - np.log1p(np.exp(c2) / b)) ** 2).sum())
        if not sse2 < sse:
            break
        log_s_min, log_bc, sse = a2, c2, sse2
    s_min, b_crit = float(np.exp(log_s_min)), float(np.exp(log_bc))
    at_edge = k in (0, len(grid) - 1)
    return {"s_min": s_min, "e_min": s_min * b_crit, "b_crit": b_crit, "rms_log_residual": float(np.sqrt(sse / len(b))),
            "points": len(b), "bracketed": not at_edge}


def best_steps(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per batch size, the learning rate with the fewest steps to the target, averaged over seeds.

    Args:
        table: steps to the target, shape (seeds, batch sizes, learning rates), ``inf`` where a run did not
            reach it (a learning rate counts only where every seed reached the target).

    Returns:
        ``(steps (batch sizes,), index of the learning rate (batch sizes,))``; steps ``inf`` and index -1 where
        no learning rate reached the target in every seed.
    """
    mean = np.asarray(table, dtype=float).mean(axis=0)  # inf where any seed missed
    best = np.where(np.isfinite(mean).any(axis=1), np.argmin(np.where(np.isfinite(mean), mean, np.inf), axis=1), -1)
    steps = np.array([mean[i, j] if j >= 0 else np.inf for i, j in enumerate(best)])
    return steps, best


def fit_table(batch_sizes, table: np.ndarray) -> dict | None:
    """:func:`best_steps`, then :func:`fit_pareto` on the batch sizes that reached the target.

    Args:
        batch_sizes: the batch sizes (the table's second axis).
        table: steps, shape (seeds, batch sizes, learning rates), ``inf`` for a miss.

    Returns:
        The fit (:func:`fit_pareto`) with ``steps`` and ``lr_index`` per batch size added, or None when fewer
        than 3 batch sizes reached the target.
    """
    steps, best = best_steps(table)
    ok = np.isfinite(steps)
    if ok.sum() < 3:
        return None
    fit = fit_pareto(np.asarray(batch_sizes, dtype=float)[ok], steps[ok])
    return {**fit, "steps": [float(v) if math.isfinite(v) else None for v in steps], "lr_index": best.tolist()}


def bootstrap_fit(batch_sizes, table: np.ndarray, resamples: int = 500, seed: int = 0,
                  confidence: float = 0.95) -> dict:
    """Percentile bootstrap over seeds of :func:`fit_table`: the seeds resampled with replacement, the best
    learning rate re-chosen and the curve refitted in each resample.

    Args:
        batch_sizes: the batch sizes.
        table: steps, shape (seeds, batch sizes, learning rates), ``inf`` for a miss.
        resamples: bootstrap resamples.
        seed: seeds the ``numpy`` generator that draws them.
        confidence: the interval's coverage.

    Returns:
        ``{"s_min": [lo, hi], "e_min": [lo, hi], "b_crit": [lo, hi], "resamples_fitted", "confidence"}``
        (None for an interval no resample could fit).

    Cost:
        ``resamples`` fits.
    """
    table = np.asarray(table, dtype=float)
    rng = np.random.default_rng(seed)
    draws = {"s_min": [], "e_min": [], "b_crit": []}
    for _ in range(resamples):
        fit = fit_table(batch_sizes, table[rng.integers(0, table.shape[0], table.shape[0])])
        if fit is not None:
            for k in draws:
                draws[k].append(fit[k])
    tail = 100 * (1 - confidence) / 2
    out = {k: [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))] if v else None
           for k, v in draws.items()}
    return {**out, "resamples_fitted": len(draws["b_crit"]), "resamples": resamples, "confidence": confidence}


def b_noise_estimate(G: torch.Tensor, per_example_grads: Callable, hvp: Callable, n: int, probes: int, seed: int = 0,
                     confidence: float = 0.95, chunk: int = 16) -> dict:
    """B_noise = tr(H Sigma) / (G^T H G) with tr(H Sigma) estimated from ``probes`` examples.

        q_i = (g_i - G)^T H (g_i - G),   tr(H Sigma) = (1/n) sum_i q_i   (population covariance),
        estimate  T = mean of q_i over m examples drawn without replacement (seeded),
        stderr    sd(q) / sqrt(m) * sqrt((n - m) / (n - 1)),   interval T -+ t_{m-1} stderr (Student t),

    and B_noise = T / G^T H G with the interval divided likewise. ``probes >= n`` enumerates every example
    (exact, zero-width interval). None with a ``reason`` when G^T H G <= 0 (B_noise is then not defined).

    Args:
        G: the full-data gradient (P,).
        per_example_grads: ``idx (k,) LongTensor -> (k, P)`` the examples' gradients.
        hvp: ``V (k, P) -> H V (k, P)``, H the full-data Hessian.
        n: the number of examples.
        probes: m, the examples sampled (capped at n).
        seed: seeds the ``torch.Generator`` that draws them.
        confidence: the interval's coverage.
        chunk: examples per call of ``per_example_grads`` and ``hvp``.

    Returns:
        ``{"b_noise", "ci_low", "ci_high", "trace_h_sigma", "trace_h_sigma_stderr", "g_h_g", "probes", "n",
        "exact", "reason"}``.

    Cost:
        ``m + 1`` Hessian-vector products and ``m`` per-example gradients.
    """
    if n < 2 or probes < 2:
        raise ValueError(f"b_noise_estimate needs n >= 2 and probes >= 2, got n={n}, probes={probes}")
    m = min(probes, n)
    idx = torch.arange(n) if m == n else torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m]
    G = G.double()
    g_h_g = float(G @ hvp(G[None]).reshape(-1).double())
    q = []
    for part in idx.split(chunk):
        D = per_example_grads(part).double() - G
        q.append((D * hvp(D).double()).sum(1))
    q = torch.cat(q)
    t = float(q.mean())
    se = 0.0 if m == n else float(q.std(unbiased=True)) / math.sqrt(m) * math.sqrt((n - m) / (n - 1))
    z = float(student_t.ppf(0.5 + confidence / 2, m - 1))
    out = {"trace_h_sigma": t, "trace_h_sigma_stderr": se, "g_h_g": g_h_g, "probes": m, "n": n, "exact": m == n,
           "confidence": confidence, "b_noise": None, "ci_low": None, "ci_high": None, "reason": None}
    if g_h_g <= 0:
        return {**out, "reason": f"G^T H G = {g_h_g:.3g} <= 0: the loss is not convex along G, B_noise undefined"}
    return {**out, "b_noise": t / g_h_g, "ci_low": (t - z * se) / g_h_g, "ci_high": (t + z * se) / g_h_g}
