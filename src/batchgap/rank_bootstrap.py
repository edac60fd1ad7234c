"""Kendall's tau-b over runs grouped by seed, and the bootstrap over seeds of tau and of Jiang et al.'s Psi.

A seed's runs share their x0 and data order, so the seeds, not the runs, are the independent units: the
bootstrap resamples seeds with replacement and a drawn seed brings all of its runs. A resample is a vector of
counts c_s (how often seed s was drawn, sum_s c_s = S); the statistic is recomputed on every resample from
per-seed sums (:func:`seed_pair_sums`), so 2000 resamples cost one (B x S) @ (S x S) product per measure.

Tau over all runs is a sum over pairs of runs: the pairs inside one seed and the pairs across two seeds.
In a resample each DRAW is a seed of its own: a draw's own pairs count once (weight c_s), pairs across
draws of two different seeds once per pair of draws (c_s c_t), and pairs across two draws of the SAME seed
are left out: they are that seed's own pairs (or a run against its own copy) posing as cross-seed pairs.
The resample that draws every seed once is the data, so it gives the point value. Why this weighting and
not another (recomputing tau-b on the concatenated copies, or the distinct-draw weights c_s (c_s - 1) used
before) is in docs/measures.md, with the coverage each gave in simulation.

The interval is the expanded percentile interval of these resamples (:func:`expanded_levels`: the plain
percentile interval is too narrow with few seeds, by sqrt((S - 1)/S) and by normal tails where a mean over S
seeds has Student-t ones), given from :data:`MIN_SEEDS` = 8 seeds on. With fewer there is none ("no interval
with S seeds"): at 95% its ends are the 0.41% and 99.59% percentiles at 7 seeds, 0.24% at 6, 0.10% at 5, set
by the few resamples that repeat the most extreme seed, i.e. by that seed's own value rather than by the
spread of the statistic (at 2 seeds the three distinct resamples are each seed alone and both). From 8 seeds
on (0.57%) they are set by many resamples; coverage measured on a model with a known answer: docs/measures.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from scipy.stats import norm
from scipy.stats import t as student_t

from .results import Interval

LEVEL = 0.95
N_BOOT = 2000
MIN_SEEDS = 8  # fewer seeds: no interval (see the module docstring)


def no_interval(n_seeds: int) -> str:
    """The method text of an interval not given for ``n_seeds`` seeds."""
    return f"no interval with {n_seeds} seed{'s' * (n_seeds != 1)}: the bootstrap over seeds needs at least {MIN_SEEDS}"


def kendall_tau_b(x, y) -> float:
    """Kendall's tau-b: (C - D) / sqrt((n0 - n1)(n0 - n2)).

    C and D are the concordant and discordant pairs, n0 = n(n - 1)/2, n1 and n2 the pairs tied in x and in y
    (as :func:`scipy.stats.kendalltau` by default).

    Args:
        x, y: equal-length sequences of numbers.

    Returns:
        tau-b as a float; NaN when either variable is constant.

    Cost: O(n^2) time and memory (n^2/2 pairs formed at once).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} values, y {len(y)}")
    iu = np.triu_indices(len(x), 1)
    dx = np.sign(x[:, None] - x[None, :])[iu]
    dy = np.sign(y[:, None] - y[None, :])[iu]
    denom = math.sqrt(float(np.sum(dx != 0)) * float(np.sum(dy != 0)))
    return float(np.sum(dx * dy) / denom) if denom > 0 else float("nan")


@dataclass(frozen=True)
class SeedPairSums:
    """The pair sums tau-b is made of, per seed and per pair of seeds.

    ``within[k, s]`` sums over the pairs of seed s's own runs, ``cross[k, s, t]`` (s != t; 0 on the
    diagonal, symmetric) over the pairs with one run in s and one in t, of k = 0: sign(dx) sign(dy),
    k = 1: [dx != 0], k = 2: [dy != 0]."""
    seeds: tuple
    within: np.ndarray  # (3, S)
    cross: np.ndarray  # (3, S, S)


def seed_pair_sums(x, y, seeds, order=None) -> SeedPairSums:
    """Per-seed and per-seed-pair sums of sign(dx) sign(dy), [dx != 0] and [dy != 0] over pairs of runs.

    Args:
        x, y: the measure and the target of each run.
        seeds: each run's seed (any hashable); runs of one seed form a cluster.
        order: the seeds of the result, in order (a seed without runs has zero sums); default: the
            distinct ``seeds``, sorted.

    Returns:
        :class:`SeedPairSums` over ``order``.

    Cost: O(n^2) for n runs, plus O(S n^2) for the sums per seed.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if not len(x) == len(y) == len(seeds):
        raise ValueError(f"x, y and seeds have {len(x)}, {len(y)} and {len(seeds)} values")
    order = tuple(sorted(set(seeds)) if order is None else order)
    if not set(seeds) <= set(order):
        raise ValueError(f"seeds {sorted(set(seeds) - set(order))} are not in order")
    member = np.zeros((len(order), len(x)))
    member[[order.index(s) for s in seeds], np.arange(len(x))] = 1.0
    dx = np.sign(x[:, None] - x[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    # each matrix counts every unordered pair twice (i, j and j, i); a run with itself adds 0 to all three
    full = np.stack([member @ m @ member.T for m in (dx * dy, dx != 0, dy != 0)])
    within = np.stack([np.diag(f) / 2 for f in full])
    cross = full - within[:, :, None] * 2 * np.eye(len(order))[None]
    return SeedPairSums(order, within, cross)


def tau_b_of_counts(sums: SeedPairSums, counts) -> np.ndarray:
    """Tau-b over the runs of resampled seeds, seed s drawn c_s times.

    With A_k = sum_s c_s within[k, s] + sum_{s<t} c_s c_t cross[k, s, t]: tau = A_0 / sqrt(A_1 A_2). Each
    draw's own pairs count once, pairs across draws of two seeds once per pair of draws; pairs across two
    draws of one seed are left out. ``counts`` of all ones gives tau-b of the data.

    Args:
        sums: from :func:`seed_pair_sums`.
        counts: (B, S) or (S,) draws of each seed in ``sums.seeds``' order.

    Returns:
        (B,) tau values (a 1-element array for a single resample); NaN where a denominator is 0.

    Cost: O(B S^2).
    """
    c = np.atleast_2d(np.asarray(counts, dtype=float))
    # the cross matrices count each pair of seeds twice (s, t and t, s)
    a = c @ sums.within.T + 0.5 * np.stack([((c @ m) * c).sum(axis=1) for m in sums.cross], axis=1)
    denom = np.sqrt(a[:, 1] * a[:, 2])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, a[:, 0] / np.where(denom > 0, denom, 1.0), np.nan)


def psi_of_counts(parts: dict, seeds, counts) -> tuple[np.ndarray, np.ndarray]:
    """Jiang et al.'s granulated Psi under resampled seeds.

    psi_i = sum_g c_{s(g)} tau_g / sum_g c_{s(g)} over the sets g of runs where only axis i varies (s(g) the
    seed of set g, tau_g its tau); Psi = the mean of psi_i over the axes with a defined psi_i.

    Args:
        parts: axis -> [(seed, tau_g), ...], the sets with a defined tau.
        seeds: the seeds in the order of ``counts``' columns.
        counts: (B, S) or (S,) draws of each seed.

    Returns:
        ((B,) Psi, (B, axes) psi_i), NaN where undefined (no drawn seed has a set varying that axis).

    Cost: O(B (S + sets) axes).
    """
    c = np.atleast_2d(np.asarray(counts, dtype=float))
    index = {s: i for i, s in enumerate(seeds)}
    per_axis = np.full((len(c), len(parts)), np.nan)
    for j, groups in enumerate(parts.values()):
        tau_sum, n_sets = np.zeros(len(index)), np.zeros(len(index))
        for s, tau in groups:
            tau_sum[index[s]] += tau
            n_sets[index[s]] += 1
        w = c @ n_sets
        with np.errstate(invalid="ignore", divide="ignore"):
            per_axis[:, j] = np.where(w > 0, (c @ tau_sum) / np.where(w > 0, w, 1.0), np.nan)
    defined = np.isfinite(per_axis)
    n_def = defined.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        psi = np.where(n_def > 0, np.where(defined, per_axis, 0.0).sum(axis=1) / np.maximum(n_def, 1), np.nan)
    return psi, per_axis


def seed_resamples(n_seeds: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """(n_boot, n_seeds) counts: each row the multiplicities of one draw of n_seeds seeds with replacement.

    Cost: O(n_boot n_seeds)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n_boot).astype(float)


def expanded_levels(n_seeds: int, level: float = LEVEL) -> tuple[float, float]:
    """The percentiles an expanded percentile interval takes (Hesterberg 2015, "What teachers should know
    about the bootstrap", The American Statistician 69(4), arXiv:1411.5279; R's resample::ExpandProbs).

    q = Phi(-sqrt(S / (S - 1)) t_{S-1, (1 + level)/2}) and 1 - q: a plain percentile interval is as wide as
    a normal interval with the bootstrap's spread, which is sqrt((S - 1)/S) of the estimate's; the
    expansion makes it as wide as the Student-t interval with S - 1 degrees of freedom. 95%: q = 0.57% at 8
    seeds, 0.86% at 10, 1.76% at 25, tending to 2.5%.

    Args:
        n_seeds: S, at least 2.
        level: the nominal coverage.

    Returns:
        (q, 1 - q) as fractions.

    Cost: O(1).
    """
    q = float(norm.cdf(-math.sqrt(n_seeds / (n_seeds - 1)) * student_t.ppf((1 + level) / 2, n_seeds - 1)))
    return q, 1 - q


def expanded_percentile_interval(values, n_seeds: int, what: str, level: float = LEVEL) -> Interval:
    """The expanded percentile interval of bootstrap values over seeds: the smallest values whose share of
    the resamples reaches q and 1 - q of :func:`expanded_levels` (NaN values, resamples where the statistic
    is undefined, left out and counted).

    Args:
        values: the statistic on each resample (from :func:`seed_resamples`' draws).
        n_seeds: the number of seeds resampled; below :data:`MIN_SEEDS` no interval is given.
        what: how the statistic was recomputed on a resample, for the method text.
        level: the nominal coverage.

    Returns:
        :class:`Interval`; ``lo``/``hi`` None with the reason in ``method`` when there is no interval.

    Cost: O(B log B).
    """
    if n_seeds < MIN_SEEDS:
        return Interval(None, None, level, no_interval(n_seeds), n_seeds)
    v = np.asarray(values, dtype=float)
    keep = v[np.isfinite(v)]
    if keep.size == 0:
        return Interval(None, None, level, "undefined in every resample: no interval", n_seeds)
    q_lo, q_hi = expanded_levels(n_seeds, level)
    lo, hi = np.quantile(keep, [q_lo, q_hi], method="inverted_cdf")
    how = (f"expanded percentile bootstrap over the {n_seeds} seeds (Hesterberg 2015: the {100 * q_lo:.2g}th and "
           f"{100 * q_hi:.4g}th percentiles, as wide as a Student-t interval with {n_seeds - 1} degrees of "
           f"freedom), {v.size} resamples of the seeds with replacement, a seed's runs drawn together: {what}")
    if keep.size < v.size:
        how += f"; {v.size - keep.size} resamples where it is undefined left out"
    return Interval(float(lo), float(hi), level, how, n_seeds)


TAU_RESAMPLED = ("tau-b recomputed over the drawn seeds' runs, each draw's own pairs once and pairs across "
                 "draws of two different seeds once per pair of draws (pairs across two draws of one seed left "
                 "out); drawing every seed once gives the point value")
PSI_RESAMPLED = "Psi recomputed with each set's tau weighted by the number of draws of its seed"
