"""Gaussian draws for the Monte Carlo flatness measures, plain or antithetic, and their Student-t interval.

Antithetic (the default of :func:`flatness.average_sharpness` and :func:`flatness.pac_bayes_flatness`): the
M draws are M / 2 pairs (z_j, -z_j), rows 2j and 2j + 1, z_j the rows of one seeded N(0, I) draw. Each pair's
mean (L(w + u_j) + L(w - u_j)) / 2 - L(w) = u_j^T H u_j / 2 + O(|u|^4) has no first-order term g . u_j: off a
minimum, where g . u dominates the plain draws' variance (its variance sigma^2 |g|^2 against the curvature
term's sigma^4 tr(H^2) / 2), the pair means are far less spread. The pair means are i.i.d. with the same
expectation as a single draw, so the estimate is their mean and the interval the Student-t interval over the
M / 2 pair means (M / 2 - 1 degrees of freedom), never over the 2 correlated halves of a pair.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import stats

DRAW = ("Z = torch.randn(M, N, generator=torch.Generator().manual_seed(seed), dtype=parameter dtype) on the CPU, "
        "row j = z_j")
ANTITHETIC = ("antithetic pairs: z = torch.randn(M / 2, N, generator=torch.Generator().manual_seed(seed), "
              "dtype=parameter dtype) on the CPU, rows 2j and 2j + 1 = z_j and -z_j")


def check_draws(n_samples, antithetic: bool) -> None:
    """ValueError unless ``n_samples`` gives an interval: >= 2 draws, or an even number >= 4 in pairs."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
        raise ValueError(f"n_samples must be an int >= 2 (an interval needs two draws), got {n_samples!r}")
    if not isinstance(antithetic, bool):
        raise TypeError(f"antithetic must be True or False, got {antithetic!r}")
    if antithetic and (n_samples < 4 or n_samples % 2):
        raise ValueError(f"antithetic draws come in pairs and an interval needs two pairs: n_samples must be even "
                         f"and >= 4, got {n_samples} (or antithetic=False)")


def normal_draws(n_samples: int, N: int, seed: int, dtype, device, antithetic: bool) -> torch.Tensor:
    """``(n_samples, N)`` N(0, I) rows from ``seed``: independent, or the pairs z_j, -z_j (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    if antithetic:
        Z = torch.randn((n_samples // 2, N), generator=gen, dtype=dtype)
        Z = torch.stack([Z, -Z], dim=1).reshape(n_samples, N)
    else:
        Z = torch.randn((n_samples, N), generator=gen, dtype=dtype)
    return Z.to(device)


def interval(samples: np.ndarray, confidence: float, antithetic: bool) -> tuple[float, float, float, float]:
    """``(mean, stderr, low, high)``: the Student-t interval over the samples, or over the pair means."""
    x = np.asarray(samples, dtype=np.float64)
    if antithetic:
        x = x.reshape(-1, 2).mean(axis=1)
    m = len(x)
    mean = float(x.mean())
    stderr = float(x.std(ddof=1) / np.sqrt(m))
    half = float(stats.t.ppf((1 + confidence) / 2, m - 1)) * stderr
    return mean, stderr, mean - half, mean + half


def draws_words(n_samples: int, antithetic: bool) -> str:
    """The draw and its interval, in words, for a result's ``method``."""
    if antithetic:
        return (f"Monte Carlo over {n_samples // 2} {ANTITHETIC}; Student-t interval over the {n_samples // 2} pair "
                f"means")
    return f"Monte Carlo over {n_samples} draws, {DRAW}; Student-t interval over the draws"
