"""The algebra of McCandlish et al.'s two-batch estimator of B_simple (see :mod:`noise`), on plain numbers.

A batch of B examples is B/g distinct units of g examples out of n/g, drawn without replacement, so

    E|G_B|^2 = |G|^2 + c(B) tr(Sigma),    c(B) = (n - B) / (B (n - g))

(McCandlish et al.: 1/B, for B << n; c(n) = 0). Two batch sizes give the two unknowns. Elementwise on tensors
(the bootstrap) as on floats; no model, no data.
"""
from __future__ import annotations

import math

import torch


def finite_population_factor(batch: int, n: int, unit: int = 1) -> float:
    """c(B) = (n - B) / (B (n - g)): E|G_B|^2 = |G|^2 + c(B) tr(Sigma), B/g of n/g units of g, no replacement."""
    if n < 2 * unit:
        raise ValueError(f"need at least 2 units of {unit} examples, got n={n}")
    if not unit <= batch <= n or batch % unit:
        raise ValueError(f"batch size must be a multiple of {unit} in [{unit}, {n}], got {batch}")
    return (n - batch) / (batch * (n - unit))


def expected_batch_sq_norm(grad_norm_sq: float, trace_sigma: float, batch: int, n: int, unit: int = 1) -> float:
    """E|G_B|^2 = |G|^2 + tr(Sigma) (n - B) / (B (n - g)), batches of B/g distinct units of g out of n/g."""
    return grad_norm_sq + finite_population_factor(batch, n, unit) * trace_sigma


def two_batch_estimate(sq_small, sq_big, small: int, big: int, n: int, unit: int = 1):
    """``(|G|^2_est, tr(Sigma)_est)`` from the mean squared batch-gradient norms at ``small`` < ``big``: solves
    m = |G|^2 + c(B) tr(Sigma) at the two sizes; elementwise on tensors (the bootstrap) as on floats."""
    c_s, c_b = finite_population_factor(small, n, unit), finite_population_factor(big, n, unit)
    if not c_s > c_b:
        raise ValueError(f"need small < big, got small={small}, big={big}")
    trace = (sq_small - sq_big) / (c_s - c_b)
    return (c_s * sq_big - c_b * sq_small) / (c_s - c_b), trace


def b_simple_stderr(sq_small: float, se_small: float, sq_big: float, se_big: float,
                    small: int, big: int, n: int, unit: int = 1) -> float:
    """Delta-method standard error of B_simple = (m_s - m_b) / D, D = c_s m_b - c_b m_s: dB/dm_s = (c_s - c_b)
    m_b / D^2, dB/dm_b = -(c_s - c_b) m_s / D^2, so (c_s - c_b) sqrt(m_b^2 se_s^2 + m_s^2 se_b^2) / D^2."""
    c_s, c_b = finite_population_factor(small, n, unit), finite_population_factor(big, n, unit)
    d = c_s * sq_big - c_b * sq_small
    return (c_s - c_b) * math.hypot(sq_big * se_small, sq_small * se_big) / (d * d) if d else math.inf


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    """The mean of ``values`` and its standard error (sample std, ddof 1, / sqrt(k)); 0 for one value."""
    k = len(values)
    return (float(values.mean()), float(values.std(correction=1)) / math.sqrt(k)) if k > 1 else (float(values[0]), 0.0)


def bootstrap_interval(small_values: torch.Tensor, big_values: torch.Tensor, small: int, big: int, n: int,
                        unit: int, n_boot: int, confidence: float, gen: torch.Generator) -> tuple[float, float, int]:
    """Percentile interval of B_simple over ``n_boot`` resamples (with replacement) of each size's batch values,
    and how many resamples had an estimate <= 0: |G|^2 <= 0 counts as B_simple = inf, tr(Sigma) <= 0 as 0."""
    def resampled_means(values: torch.Tensor) -> torch.Tensor:
        if len(values) == 1:  # the exact full gradient: no sampling error to resample
            return values.expand(n_boot)
        means = torch.empty(n_boot, dtype=torch.float64)
        step = max(1, 2**20 // len(values))  # bounded memory for the index matrix
        for s in range(0, n_boot, step):
            m = min(step, n_boot - s)
            means[s : s + m] = values[torch.randint(len(values), (m, len(values)), generator=gen)].mean(1)
        return means

    g2, trace = two_batch_estimate(resampled_means(small_values), resampled_means(big_values), small, big, n, unit)
    b = torch.where(g2 > 0, trace.clamp(min=0) / g2, torch.full_like(g2, math.inf))
    inf = bool(torch.isinf(b).any())  # no interpolating towards inf (nan): the order statistics outside, wider
    low = torch.quantile(b, (1 - confidence) / 2, interpolation="lower" if inf else "linear")
    high = torch.quantile(b, (1 + confidence) / 2, interpolation="higher" if inf else "linear")
    return float(low), float(high), int(((g2 <= 0) | (trace <= 0)).sum())
