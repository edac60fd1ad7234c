"""The critical-batch study (issue 28): its fit and noise scale against exact oracles, and the study end to end."""
import math

import numpy as np
import pytest
import torch

from batchgap.experiments.critical_fit import (
    b_noise_estimate, best_steps, bootstrap_fit, fit_pareto, fit_table, pareto_steps,
)

B = np.array([16, 32, 64, 128, 256, 512, 1024, 2000], dtype=float)


@pytest.mark.parametrize("s_min, b_crit", [(150.0, 300.0), (40.0, 25.0), (1000.0, 3000.0)])
def test_the_fit_recovers_s_min_e_min_and_b_crit_from_steps_made_by_the_formula(s_min, b_crit):
    steps = pareto_steps(B, s_min, b_crit)
    E = B * steps
    assert np.allclose((steps / s_min - 1) * (E / (s_min * b_crit) - 1), 1.0)  # the trade-off itself
    fit = fit_pareto(B, steps)
    assert fit["s_min"] == pytest.approx(s_min, rel=1e-7) and fit["b_crit"] == pytest.approx(b_crit, rel=1e-7)
    assert fit["e_min"] == pytest.approx(s_min * b_crit, rel=1e-7) and fit["rms_log_residual"] < 1e-9


def noisy_table(s_min, b_crit, seeds, sigma, rng, lrs=3):
    """Steps per (seed, batch, lr): the formula times seeded log-normal noise at the best lr, worse at the others,
    and one lr that never reaches the target at the largest batch."""
    base = pareto_steps(B, s_min, b_crit)
    table = np.empty((seeds, len(B), lrs))
    for j in range(lrs):
        table[:, :, j] = base * (1 + 0.5 * j) * np.exp(sigma * rng.standard_normal((seeds, len(B))))
    table[0, -1, 1] = np.inf
    return table


def test_best_steps_keeps_the_learning_rate_with_the_fewest_mean_steps_over_seeds():
    table = np.array([[[10.0, 8.0, np.inf]], [[10.0, 12.0, 1.0]]])  # one batch size, three lrs, two seeds
    steps, best = best_steps(table)
    assert best.tolist() == [0] and steps.tolist() == [10.0]  # lr 2 missed in one seed; lr 1's mean is 10 too late
    assert best_steps(np.full((2, 1, 2), np.inf))[1].tolist() == [-1]


def test_the_bootstrap_interval_over_seeds_covers_the_true_values_under_noise():
    """Steps with 10% log-normal noise per seed: the 95% intervals hold the true S_min, E_min, B_crit in most
    of 20 independent studies (a 95% interval misses about 1 in 20; 8 seeds make the bootstrap a bit narrow)."""
    rng = np.random.default_rng(0)
    s_min, b_crit = 150.0, 300.0
    hits, width = [], []
    for _ in range(20):
        table = noisy_table(s_min, b_crit, 8, 0.1, rng)
        point = fit_table(B, table)
        assert point["lr_index"][:-1] == [0] * (len(B) - 1)
        ci = bootstrap_fit(B, table, resamples=200, seed=1)
        truth = {"s_min": s_min, "e_min": s_min * b_crit, "b_crit": b_crit}
        hits.append(all(ci[k][0] <= v <= ci[k][1] for k, v in truth.items()))
        assert all(ci[k][0] <= point[k] <= ci[k][1] for k in truth)
        width.append(ci["b_crit"][1] / ci["b_crit"][0])
    assert sum(hits) >= 15, hits
    assert np.median(width) < 2.0  # the interval is informative, not everything


def quadratic(n=12, p=5, seed=0):
    """Per-example losses l_i(x) = (x - c_i)^T A_i (x - c_i) / 2 with symmetric (indefinite) A_i: g_i = A_i (x -
    c_i), and the mean loss's Hessian is H = mean A_i, the same at every x."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, p, p, generator=g, dtype=torch.float64)
    A = (A + A.transpose(1, 2)) / 2 + 3 * torch.eye(p, dtype=torch.float64)
    c = torch.randn(n, p, generator=g, dtype=torch.float64)
    x = torch.randn(p, generator=g, dtype=torch.float64)
    grads = torch.einsum("ipq,iq->ip", A, x - c)
    return A.mean(0), grads


def dense_b_noise(H, grads):
    G = grads.mean(0)
    D = grads - G
    sigma = D.T @ D / len(grads)  # population covariance
    return float(torch.trace(H @ sigma) / (G @ H @ G))


def test_b_noise_with_every_example_equals_the_dense_formula_on_a_quadratic():
    H, grads = quadratic()
    out = b_noise_estimate(grads.mean(0), lambda idx: grads[idx], lambda V: V @ H, len(grads), probes=100, chunk=5)
    assert out["exact"] and out["probes"] == 12 and out["ci_low"] == out["ci_high"] == out["b_noise"]
    assert out["b_noise"] == pytest.approx(dense_b_noise(H, grads), rel=1e-12)
    G = grads.mean(0)
    assert out["g_h_g"] == pytest.approx(float(G @ H @ G), rel=1e-12)


def test_b_noise_from_sampled_probes_is_unbiased_and_its_interval_covers():
    """m = 10 of n = 40 examples: over 200 seeds the mean estimate is the dense value and the 95% interval
    (finite-population corrected) covers it at about its nominal rate."""
    H, grads = quadratic(n=40, p=6, seed=3)
    truth = dense_b_noise(H, grads)
    runs = [b_noise_estimate(grads.mean(0), lambda idx: grads[idx], lambda V: V @ H, 40, probes=10, seed=s)
            for s in range(200)]
    est = np.array([r["b_noise"] for r in runs])
    assert abs(est.mean() - truth) < 3 * est.std() / math.sqrt(len(est))
    cover = np.mean([r["ci_low"] <= truth <= r["ci_high"] for r in runs])
    assert 0.88 <= cover <= 0.99, cover
    assert not runs[0]["exact"] and runs[0]["ci_low"] < runs[0]["b_noise"] < runs[0]["ci_high"]


def test_b_noise_is_undefined_where_the_loss_curves_down_along_g():
    H, grads = quadratic()
    out = b_noise_estimate(grads.mean(0), lambda idx: grads[idx], lambda V: -(V @ H.abs()) - V, 12, probes=12)
    assert out["b_noise"] is None and "G^T H G" in out["reason"]


def test_the_fit_refuses_too_few_points():
    with pytest.raises(ValueError, match="2 distinct"):
        fit_pareto([16, 16], [10, 11])
    assert fit_table(B[:2], np.ones((2, 2, 1))) is None

