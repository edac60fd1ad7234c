"""The seed bootstrap's intervals on tau and Psi cover the population values they are for.

A data model with a known answer: S seeds x K regimes, run (s, j) has measure x = j + u_s + e and target
y = j + v_s + f, seed effects (u_s, v_s) ~ N(0, SIGMA_SEED^2 [[1, RHO], [RHO, 1]]) shared by a seed's runs
(RHO < 0: a seed that raises the measure lowers the gap, so pairs across seeds rank differently from pairs
inside one), noise e, f ~ N(0, 1) independent. No ties, so tau-b = (C - D) / pairs, and its expectation over
studies with S seeds is exact: the within-seed and cross-seed concordances weighted by their pair counts,
each from a bivariate normal orthant probability. Psi (one axis, one set per seed) has expectation the
within-seed concordance. 200 simulated studies; an interval's coverage must lie within 3 binomial standard
deviations of 95%, and intervals known to be wrong (too narrow, or over runs as if independent) are checked to fail
that same bound.
"""
import math

import numpy as np
import pytest
from scipy.stats import multivariate_normal, norm

from batchgap.rank_bootstrap import (
    MIN_SEEDS, PSI_RESAMPLED, TAU_RESAMPLED, expanded_percentile_interval, kendall_tau_b, psi_of_counts,
    seed_pair_sums, seed_resamples, tau_b_of_counts,
)

S, K, SIGMA_SEED, RHO = 25, 6, 2.0, -0.8
REPS, NOMINAL = 200, 0.95
TOL = 3 * math.sqrt(NOMINAL * (1 - NOMINAL) / REPS)  # 0.046: 3 binomial standard deviations


def concordance(mean: float, var: float, cov: float) -> float:
    """E[sign(dx) sign(dy)] for (dx, dy) bivariate normal, both with mean ``mean`` and variance ``var``."""
    m, r = mean / math.sqrt(var), cov / var
    both = multivariate_normal([0, 0], [[1, r], [r, 1]]).cdf([m, m])  # P(dx > 0, dy > 0)
    return 1 - 4 * norm.cdf(m) + 4 * both


def population() -> tuple[float, float]:
    """(expected tau-b over all runs of a study with S seeds, expected within-seed tau)."""
    within = np.mean([concordance(i - j, 2.0, 0.0) for i in range(K) for j in range(i)])
    var, cov = 2 * SIGMA_SEED**2 + 2.0, 2 * RHO * SIGMA_SEED**2
    cross = np.mean([concordance(i - j, var, cov) for i in range(K) for j in range(K)])
    n_within, n_cross = S * K * (K - 1) / 2, S * (S - 1) / 2 * K * K
    return float((n_within * within + n_cross * cross) / (n_within + n_cross)), float(within)


def study(rng):
    u = rng.multivariate_normal([0, 0], SIGMA_SEED**2 * np.array([[1, RHO], [RHO, 1]]), S)
    regime = np.arange(K, dtype=float)
    x = regime + u[:, :1] + rng.normal(size=(S, K))
    y = regime + u[:, 1:] + rng.normal(size=(S, K))
    return x, y


@pytest.fixture(scope="module")
def simulated():
    """Per simulated study: the point tau and Psi and their bootstrap values (the same draws for both)."""
    rng = np.random.default_rng(20240607)
    out = []
    for rep in range(REPS):
        x, y = study(rng)
        seeds = np.repeat(np.arange(S), K)
        sums = seed_pair_sums(x.ravel(), y.ravel(), seeds)
        draws = seed_resamples(S, seed=rep)
        parts = {"regime": [(s, kendall_tau_b(x[s], y[s])) for s in range(S)]}
        out.append((x, y, tau_b_of_counts(sums, np.ones(S))[0], tau_b_of_counts(sums, draws),
                    psi_of_counts(parts, range(S), np.ones(S))[0][0], psi_of_counts(parts, range(S), draws)[0]))
    return out


def coverage(intervals, truth: float) -> float:
    """The share of the intervals that hold ``truth``."""
    return float(np.mean([iv.lo <= truth <= iv.hi for iv in intervals]))


def test_the_model_and_the_point_values_are_right(simulated):
    tau, within = population()
    points = np.array([t for _, _, t, _, _, _ in simulated])
    psis = np.array([p for _, _, _, _, p, _ in simulated])
    # the point values are unbiased for the population values (no ties: tau-b is linear in the pair signs)
    assert abs(points.mean() - tau) < 3 * points.std() / math.sqrt(REPS)
    assert abs(psis.mean() - within) < 3 * psis.std() / math.sqrt(REPS)
    x, y, t, _, _, _ = simulated[0]
    assert t == pytest.approx(kendall_tau_b(x.ravel(), y.ravel()), abs=1e-12)
    assert within - tau > 0.5  # pairs inside a seed and across seeds rank differently: the clustering matters


def test_tau_interval_covers_at_the_nominal_rate(simulated):
    tau, _ = population()
    ivs = [expanded_percentile_interval(boot, S, TAU_RESAMPLED) for _, _, _, boot, _, _ in simulated]
    assert all("bootstrap over the 25 seeds" in iv.method and "2000 resamples" in iv.method for iv in ivs)
    got = coverage(ivs, tau)
    assert abs(got - NOMINAL) <= TOL, got
    # the bound has teeth: the same interval at a nominal 85% (its ends moved in) fails it
    narrow = coverage([expanded_percentile_interval(b, S, "", level=0.85) for *_, b, _, _ in simulated], tau)
    assert narrow < NOMINAL - TOL, narrow


def test_tau_interval_over_runs_instead_of_seeds_fails_the_coverage_bound(simulated):
    """Resampling runs as if independent ignores that a seed's runs share its effects: too narrow."""
    tau, _ = population()
    ivs = []
    for rep, (x, y, *_) in enumerate(simulated[:50]):  # 50 studies: 150 clusters make each one costlier
        sums = seed_pair_sums(x.ravel(), y.ravel(), np.arange(S * K))  # every run its own cluster
        ivs.append(expanded_percentile_interval(tau_b_of_counts(sums, seed_resamples(S * K, 500, rep)), S * K, ""))
    got = coverage(ivs, tau)
    assert got < NOMINAL - TOL, got


def test_psi_interval_covers_at_the_nominal_rate(simulated):
    _, within = population()
    ivs = [expanded_percentile_interval(boot, S, PSI_RESAMPLED) for *_, boot in simulated]
    got = coverage(ivs, within)
    assert abs(got - NOMINAL) <= TOL, got


def test_fewer_seeds_than_the_method_needs_give_no_interval():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, MIN_SEEDS - 1):
        iv = expanded_percentile_interval(rng.normal(size=100), n, TAU_RESAMPLED)
        assert iv.lo is None and iv.hi is None
        assert iv.method.startswith(f"no interval with {n} seed") and f"at least {MIN_SEEDS}" in iv.method
    assert expanded_percentile_interval(rng.normal(size=100), MIN_SEEDS, TAU_RESAMPLED).lo is not None
