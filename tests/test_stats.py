"""Statistics over seeds against independent computations (issue 19: an interval on every comparison)."""
import itertools

import numpy as np
import pytest

from batchgap.stats import mean_std, ratio_interval


def test_mean_std_is_numpys():
    v = [0.3, 0.1, 0.7, 0.4]
    s = mean_std([*v, None])
    assert (s.mean, s.std, s.n) == (pytest.approx(np.mean(v)), pytest.approx(np.std(v, ddof=1)), 4)
    assert mean_std([2.0]).std == 0.0 and mean_std([]).mean is None


def test_the_paired_bootstrap_interval_is_the_exact_bootstrap_distributions():
    """For 3 seeds the bootstrap distribution can be enumerated (27 resamples of the seed indices, each
    equally likely): the Monte Carlo interval's ends match its exact percentiles."""
    lb = {0: 40.0, 1: 55.0, 2: 90.0}
    sb = {0: 1.0, 1: 1.5, 2: 1.2}
    exact = sorted(np.mean([lb[i] for i in idx]) / np.mean([sb[i] for i in idx])
                   for idx in itertools.product(range(3), repeat=3))
    weights = np.full(len(exact), 1 / len(exact))
    cdf = np.cumsum(weights)
    lo = exact[int(np.searchsorted(cdf, 0.025))]
    hi = exact[int(np.searchsorted(cdf, 0.975))]
    got = ratio_interval(lb, sb, n_boot=200_000)
    assert got.lo == pytest.approx(lo, rel=0.02) and got.hi == pytest.approx(hi, rel=0.02)
    assert "paired" in got.method and got.n == 3


def test_pairing_follows_the_seeds_and_one_seed_has_no_interval():
    a = {0: 2.0, 1: 4.0, 2: 6.0}
    b = {0: 1.0, 1: 2.0, 2: 3.0}
    paired = ratio_interval(a, b)
    assert paired.lo == pytest.approx(2.0) and paired.hi == pytest.approx(2.0)  # every seed's ratio is 2
    unpaired = ratio_interval(a, {5: 1.0, 6: 2.0, 7: 3.0})
    assert "independently" in unpaired.method and unpaired.lo < 2.0 < unpaired.hi
    one = ratio_interval({0: 2.0}, {0: 1.0})
    assert one.lo is None and "one seed" in one.method
