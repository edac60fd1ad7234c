"""Gradient noise scale: exact oracles on tiny float64 models.

Oracles: per-example gradients from a loop of ``torch.autograd.grad``; E|G_B|^2 by enumerating every
size-B subset; the Monte-Carlo estimator against those exact values within a few standard errors.
"""
from __future__ import annotations

import copy
import itertools
import json
import math

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from batchgap.landscape import NoiseScaleResult, exact_gradient_noise_scale, gradient_noise_scale
from batchgap.landscape.functional import FullDataLoss, session
from batchgap.landscape.noise import (
    _batch_sq_norms,
    expected_batch_sq_norm,
    finite_population_factor,
    two_batch_estimate,
)
from batchgap.landscape.params import named_parameters

from test_landscape_common import RaiseOnCall, assert_same_state, full_state, mlp, toy_data, train_briefly


def tiny(n=40, seed=0, bn=True):
    """39 parameters (3 -> 4 -> BN -> ReLU -> 3) in float64, trained a little so BN has real running statistics."""
    data = toy_data(n=n, d=3, seed=seed)
    model = train_briefly(mlp(d=3, hidden=(4,), seed=seed, bn=bn), toy_data(n=64, d=3, seed=seed + 10), steps=10)
    return model, data


def flat_grad(model, x, y, which="all"):
    """The gradient of the mean cross-entropy over (x, y), model in eval mode: the brute-force oracle."""
    params = [p for _, p in named_parameters(model, which)]
    loss = nn.functional.cross_entropy(model(x), y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def per_example_grads(model, data, which="all"):
    x, y = data
    model = copy.deepcopy(model).eval()
    return torch.stack([flat_grad(model, x[i : i + 1], y[i : i + 1], which) for i in range(len(y))])


def exact_moments(model, data, which="all"):
    """(|G|^2, tr Sigma) with Sigma the population covariance, from the brute-force per-example loop."""
    g = per_example_grads(model, data, which)
    G = g.mean(0)
    return float(G @ G), float(((g - G) ** 2).sum(1).mean())


def enumerated_sq_norm(model, data, size):
    """E|G_B|^2 exactly: the mean over EVERY subset of ``size`` distinct examples."""
    x, y = data
    model = copy.deepcopy(model).eval()
    norms = [float(flat_grad(model, x[list(s)], y[list(s)]).pow(2).sum())
             for s in itertools.combinations(range(len(y)), size)]
    return sum(norms) / len(norms), len(norms)


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


# --- (a) exact per-example gradients ----------------------------------------------------------------


@pytest.mark.parametrize("which", ["all", "no-bn"])
def test_exact_matches_a_loop_over_examples(which):
    model, data = tiny(n=20)
    g2, trace = exact_moments(model, data, which)
    g = per_example_grads(model, data, which)
    # chunks of 3 inside data batches of 7: chunks never cross a batch, the last ones are short
    r = exact_gradient_noise_scale(model, data, params=which, batch_size=7, chunk=3)
    assert rel(r.grad_norm_sq, g2) < 1e-10 and rel(r.trace_sigma, trace) < 1e-10
    assert rel(r.b_simple, trace / g2) < 1e-10
    assert rel(r.sq_norm_small, float(g.pow(2).sum(1).mean())) < 1e-10  # B = 1: mean |g_i|^2
    assert r.sq_norm_big == r.grad_norm_sq and (r.small, r.big, r.n, r.n_batches_small) == (1, 20, 20, 20)
    assert r.num_params == g.shape[1] == (39 if which == "all" else 31)
    assert r.b_simple_stderr == 0 and r.ci_low == r.ci_high == r.b_simple and r.seed is None
    assert "exact per-example gradients" in r.method and r.bn_description == "running statistics"


def test_exact_reads_an_iterable_of_batches_and_a_model_without_bn():
    model, (x, y) = tiny(n=20, bn=False)
    g2, trace = exact_moments(model, (x, y))
    r = exact_gradient_noise_scale(model, [(x[:13], y[:13]), (x[13:], y[13:])], chunk=5)
    assert rel(r.grad_norm_sq, g2) < 1e-10 and rel(r.trace_sigma, trace) < 1e-10 and r.n == 20
    assert r.bn_description == "no BatchNorm"


def test_exact_is_the_two_batch_formula_at_sizes_one_and_n():
    model, data = tiny(n=20)
    r = exact_gradient_noise_scale(model, data)
    g2, trace = two_batch_estimate(r.sq_norm_small, r.sq_norm_big, 1, 20, 20)
    assert rel(g2, r.grad_norm_sq) < 1e-12 and rel(trace, r.trace_sigma) < 1e-12


def test_exact_refuses_batch_statistics_and_non_mean_losses():
    model, data = tiny(n=10)
    with pytest.raises(ValueError, match='bn="batch" couples the examples.*ghost_batch'):
        exact_gradient_noise_scale(model, data, bn="batch")
    untracked = mlp(d=3, hidden=(4,), track=False)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        exact_gradient_noise_scale(untracked, data)
    with pytest.raises(ValueError, match="loss_fn must return the batch mean of per-example losses"):
        exact_gradient_noise_scale(model, data, loss_fn=lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum"))
    exact_gradient_noise_scale(mlp(d=3, hidden=(4,), bn=False), data, bn="batch")  # nothing to couple


# --- (b) the estimator's expectation, by enumerating every subset -------------------------------


def test_expected_batch_norm_is_exact_over_all_subsets_and_the_estimator_inverts_it():
    model, data = tiny(n=8)
    g2, trace = exact_moments(model, data)
    e2, count2 = enumerated_sq_norm(model, data, 2)
    e4, count4 = enumerated_sq_norm(model, data, 4)
    assert (count2, count4) == (28, 70)
    # sampling without replacement: E|G_B|^2 = |G|^2 + tr(Sigma)/B * (n - B)/(n - 1)
    assert rel(e2, g2 + trace / 2 * 6 / 7) < 1e-12 and rel(e4, g2 + trace / 4 * 4 / 7) < 1e-12
    assert rel(e2, expected_batch_sq_norm(g2, trace, 2, 8)) < 1e-12
    assert rel(e2, g2 + trace / 2) > 1e-2  # the uncorrected 1/B is measurably wrong here
    for (small, m_s), (big, m_b) in [((2, e2), (4, e4)), ((2, e2), (8, g2)), ((4, e4), (8, g2))]:
        est_g2, est_trace = two_batch_estimate(m_s, m_b, small, big, 8)
        assert rel(est_g2, g2) < 1e-11 and rel(est_trace, trace) < 1e-11
    assert finite_population_factor(1, 8) == 1 and finite_population_factor(8, 8) == 0


def test_batch_gradients_match_autograd_on_every_subset():
    model, data = tiny(n=8)
    x, y = data
    subsets = torch.tensor(list(itertools.combinations(range(8), 2)))
    oracle = [float(flat_grad(copy.deepcopy(model).eval(), x[s], y[s]).pow(2).sum()) for s in subsets]
    with session(model, "eval"):
        F = FullDataLoss(model, data)
        for chunk in (1, 6, 1000):  # one batch per call, 3 per vmapped call, all 28 in one call
            got = _batch_sq_norms(F, x, y, subsets, chunk)
            assert max(rel(float(a), b) for a, b in zip(got, oracle)) < 1e-12


def coupled_copy(model):
    """A copy whose BN layers normalize with the statistics of the batch they see (the brute-force oracle)."""
    coupled = copy.deepcopy(model).eval()
    for m in coupled.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            m.track_running_stats = False
    return coupled


def untracked_copy(model):
    """A copy built as with track_running_stats=False: no running statistics, batch statistics even in eval mode."""
    untracked = copy.deepcopy(model).eval()
    for m in untracked.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return untracked


def documented_partition(seed, n, g):
    """The ghost batches as the module docstring states them: randperm(n), the generator's first draw, cut in g."""
    gen = torch.Generator().manual_seed(seed)
    return gen, torch.randperm(n, generator=gen)[: n // g * g].reshape(-1, g)


def ghost_grads(model, data, units):
    """h_j for each ghost batch: a loop of autograd, each ghost batch normalized by its own statistics."""
    x, y = data
    coupled = coupled_copy(model)
    return torch.stack([flat_grad(coupled, x[u], y[u]) for u in units])


def ghost_moments(model, data, units):
    """(|G|^2, tr Sigma) with Sigma = g x the population covariance of the ghost-batch gradients."""
    h = ghost_grads(model, data, units)
    G = h.mean(0)
    return float(G @ G), units.shape[1] * float(((h - G) ** 2).sum(1).mean())


def test_batch_statistics_are_measured_over_the_ghost_batches_of_a_seeded_partition():
    """bn="batch": units are ghost batches of g = small, drawn as documented; every number against autograd."""
    model, data = tiny(n=18)
    x, y = data
    r = gradient_noise_scale(model, data, small=4, big=8, n_batches=5, seed=3, bn="batch")
    gen, units = documented_partition(3, 18, 4)  # 4 ghost batches of 4, 2 examples left out
    h = ghost_grads(model, data, units)
    means = []
    for k in (1, 2):  # B = 4 is one ghost batch, B = 8 two distinct ones; G_B the mean of theirs
        picks = [torch.randperm(4, generator=gen)[:k] for _ in range(5)]
        means.append(sum(float(h[p].mean(0).pow(2).sum()) for p in picks) / 5)
    assert rel(r.sq_norm_small, means[0]) < 1e-12 and rel(r.sq_norm_big, means[1]) < 1e-12
    assert (r.n, r.ghost_batch, r.small, r.big, r.grad_path) == (16, 4, 4, 8, "vmap")
    assert "ghost batch of 4" in r.bn_description and "2 examples left out" in r.bn_description
    assert "(n - B) / (B (n - 4))" in r.sampling
    full = gradient_noise_scale(model, data, small=4, n_batches=5, seed=3, bn="batch")
    assert rel(full.sq_norm_big, float(h.mean(0).pow(2).sum())) < 1e-12 and full.n_batches_big == 1
    # a model built with track_running_stats=False uses batch statistics in eval mode: the same protocol
    same = gradient_noise_scale(untracked_copy(model), data, small=4, big=8, n_batches=5, seed=3)
    assert rel(same.sq_norm_small, r.sq_norm_small) < 1e-12 and same.ghost_batch == 4


def test_ghost_batch_expectation_is_exact_over_every_subset_of_ghost_batches():
    """E|G_B|^2 = |G|^2 + tr(Sigma) (n - B) / (B (n - g)) with B = k g: by enumerating every k-subset."""
    model, data = tiny(n=26)
    _, units = documented_partition(0, 26, 3)  # 8 ghost batches of 3, n = 24
    h = ghost_grads(model, data, units)
    G = h.mean(0)
    g2, trace = float(G @ G), 3 * float(((h - G) ** 2).sum(1).mean())
    for k, count in ((2, 28), (4, 70)):
        subsets = list(itertools.combinations(range(8), k))
        assert len(subsets) == count
        e = sum(float(h[list(s)].mean(0).pow(2).sum()) for s in subsets) / count
        assert rel(e, g2 + trace * (24 - 3 * k) / (3 * k * (24 - 3))) < 1e-12
        assert rel(e, expected_batch_sq_norm(g2, trace, 3 * k, 24, unit=3)) < 1e-12
        est_g2, est_trace = two_batch_estimate(e, g2, 3 * k, 24, 24, unit=3)
        assert rel(est_g2, g2) < 1e-10 and rel(est_trace, trace) < 1e-10
    assert finite_population_factor(3, 24, unit=3) == pytest.approx(1 / 3) and finite_population_factor(24, 24, 3) == 0


def test_exact_over_ghost_batches_equals_a_loop_of_autograd():
    model, data = tiny(n=18)
    _, units = documented_partition(5, 18, 4)
    g2, trace = ghost_moments(model, data, units)
    for m, bn in ((model, "batch"), (untracked_copy(model), "eval")):
        r = exact_gradient_noise_scale(m, data, bn=bn, ghost_batch=4, seed=5, chunk=8)  # 2 ghost batches a call
        assert rel(r.grad_norm_sq, g2) < 1e-10 and rel(r.trace_sigma, trace) < 1e-10
        assert rel(r.b_simple, trace / g2) < 1e-10 and (r.n, r.small, r.n_batches_small, r.seed) == (16, 4, 4, 5)
        assert "exact ghost-batch gradients" in r.method and r.ghost_batch == 4


# --- (c) Monte Carlo against the exact values -------------------------------------------------------


def test_monte_carlo_converges_to_the_exact_values():
    model, data = tiny(n=40)
    g2, trace = exact_moments(model, data)
    exact_b = trace / g2
    r = gradient_noise_scale(model, data, small=4, big=None, n_batches=3000, seed=1)
    assert rel(r.grad_norm_sq, g2) < 1e-10 and r.n_batches_big == 1 and r.sq_norm_big_stderr == 0
    assert abs(r.sq_norm_small - expected_batch_sq_norm(g2, trace, 4, 40)) < 4 * r.sq_norm_small_stderr
    assert abs(r.trace_sigma - trace) < 4 * r.sq_norm_small_stderr / finite_population_factor(4, 40)
    assert abs(r.b_simple - exact_b) < 4 * r.b_simple_stderr and r.b_simple_stderr < 0.1 * exact_b
    assert r.ci_low < exact_b < r.ci_high
    s = gradient_noise_scale(model, data, small=2, big=24, n_batches=3000, seed=2)
    assert abs(s.sq_norm_small - expected_batch_sq_norm(g2, trace, 2, 40)) < 4 * s.sq_norm_small_stderr
    # at 24 of 40 the correction (n - B)/(n - 1) = 0.41: without it the mean would be off by many errors
    assert abs(s.sq_norm_big - expected_batch_sq_norm(g2, trace, 24, 40)) < 4 * s.sq_norm_big_stderr
    assert abs(s.b_simple - exact_b) < 4 * s.b_simple_stderr


def test_delta_method_stderr_is_the_propagated_error_of_the_two_means():
    model, data = tiny(n=40)
    r = gradient_noise_scale(model, data, small=2, big=10, n_batches=50, seed=0)

    def b(m_s, m_b):
        g2, trace = two_batch_estimate(m_s, m_b, 2, 10, 40)
        return trace / g2

    h_s, h_b = 1e-6 * r.sq_norm_small, 1e-6 * r.sq_norm_big
    d_s = (b(r.sq_norm_small + h_s, r.sq_norm_big) - b(r.sq_norm_small - h_s, r.sq_norm_big)) / (2 * h_s)
    d_b = (b(r.sq_norm_small, r.sq_norm_big + h_b) - b(r.sq_norm_small, r.sq_norm_big - h_b)) / (2 * h_b)
    expected = math.hypot(d_s * r.sq_norm_small_stderr, d_b * r.sq_norm_big_stderr)
    assert rel(r.b_simple_stderr, expected) < 1e-5
    assert rel(r.b_simple, b(r.sq_norm_small, r.sq_norm_big)) < 1e-12


# --- (d) the model comes back bit for bit ----------------------------------------------------------


@pytest.mark.parametrize("fn", [exact_gradient_noise_scale,
                                lambda m, d, **kw: gradient_noise_scale(m, d, small=4, big=8, n_batches=5, **kw)])
def test_model_is_restored_also_on_error(fn):
    model, data = tiny(n=16)
    model.train()  # the measurement switches to eval; "recompute" rewrites the running statistics
    model[0].weight.requires_grad_(False)
    before = full_state(model)
    fn(model, data, bn="recompute")
    assert_same_state(model, before)
    with pytest.raises(RuntimeError, match="boom"):
        fn(model, data, bn="recompute", loss_fn=RaiseOnCall(when=2))
    assert_same_state(model, before)


# --- (e) determinism --------------------------------------------------------------------------------


def test_same_seed_same_numbers_and_the_global_rng_is_untouched():
    model, data = tiny(n=24)
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    a = gradient_noise_scale(model, data, small=3, big=12, n_batches=20, seed=7)
    assert torch.equal(rng, torch.get_rng_state())
    torch.manual_seed(6)  # the global RNG plays no part
    b = gradient_noise_scale(model, data, small=3, big=12, n_batches=20, seed=7)
    assert a == b and a.as_dict() == b.as_dict()
    c = gradient_noise_scale(model, data, small=3, big=12, n_batches=20, seed=8)
    assert c.sq_norm_small != a.sq_norm_small and c.ci_low != a.ci_low


# --- protocol and input checks ---------------------------------------------------------------------


def test_result_carries_its_protocol_and_is_json():
    model, data = tiny(n=24)
    r = gradient_noise_scale(model, data, small=3, n_batches=10, seed=2, params="no-bn", batch_size=5)
    assert isinstance(r, NoiseScaleResult)
    d = json.loads(json.dumps(r.as_dict()))
    assert d["small"] == 3 and d["big"] == 24 and d["n"] == 24 and d["seed"] == 2 and d["params"] == "no-bn"
    assert d["n_batches_small"] == 10 and d["n_batches_big"] == 1 and d["num_params"] == 31
    assert d["bn"] == "eval" and d["bn_description"] == "running statistics" and d["batch_size"] == 5
    assert d["loss_fn"] == "mean cross-entropy" and "(n - B) / (B (n - 1))" in d["sampling"]
    assert "delta method" in d["interval"] and "bootstrap" in d["interval"]
    assert "exact full-data gradient" in d["method"] and d["confidence"] == 0.95
    assert d["ci_low"] <= d["b_simple"] <= d["ci_high"]
    assert d["reason"] is None and d["ghost_batch"] is None and d["grad_path"] == "vmap"


@pytest.mark.parametrize("kwargs, message", [
    (dict(small=8, big=8), "small < big"),
    (dict(small=0), "small < big"),
    (dict(small=4, big=30), "big <= n = 24"),
    (dict(small=24), "small < big"),
    (dict(small=2, n_batches=1), "n_batches must be >= 2"),
    (dict(small=2, confidence=1.0), "confidence"),
])
def test_bad_arguments_are_refused(kwargs, message):
    model, data = tiny(n=24)
    with pytest.raises(ValueError, match=message):
        gradient_noise_scale(model, data, **kwargs)


def test_estimator_needs_indexable_data():
    model, (x, y) = tiny(n=24)
    with pytest.raises(ValueError, match="tensor pair"):
        gradient_noise_scale(model, [(x[:12], y[:12]), (x[12:], y[12:])], small=2)


# --- issue 18: one quantity across batch-size pairs, never a number that is not one, RNNs ------------


def consistency_problem():
    """An MLP with BN (5 -> 16 -> BN -> ReLU -> 3, float64), trained a little, on 1024 examples."""
    data = toy_data(n=1024, d=5, seed=4)
    model = train_briefly(mlp(d=5, hidden=(16,), seed=4), toy_data(n=256, d=5, seed=14), steps=30)
    return model, data


def large_batch_problem():
    """The same MLP with 32 hidden units trained by full-batch gradient descent, BN normalizing all 1024
    examples together: a large-batch solution, where the gradient of the batch-statistics loss is small."""
    data = toy_data(n=1024, d=5, seed=4)
    model = mlp(d=5, hidden=(32,), seed=4)
    params = list(model.parameters())
    model.train()
    for _ in range(300):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(data[0]), data[1]), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(0.5 * g)
    return model.eval(), data


PAIRS = [(32, None), (32, 512), (64, None), (128, None)]


def assert_consistent(small, big, r, exact):
    """The pair's interval holds the exact value, and its estimate is within 4 of its standard errors."""
    assert r.ci_low <= exact <= r.ci_high, (small, big, r.b_simple, r.ci_low, r.ci_high, exact)
    assert abs(r.b_simple - exact) < 4 * r.b_simple_stderr, (small, big, r.b_simple, r.b_simple_stderr, exact)


def test_running_statistics_estimates_agree_across_batch_size_pairs_and_hold_the_exact_value():
    model, data = consistency_problem()
    g2, trace = exact_moments(model, data)  # a loop of autograd over the 1024 examples
    exact = trace / g2
    r = exact_gradient_noise_scale(model, data)
    assert rel(r.grad_norm_sq, g2) < 1e-10 and rel(r.trace_sigma, trace) < 1e-10
    for small, big in PAIRS:
        r = gradient_noise_scale(model, data, small=small, big=big, n_batches=400, seed=1, confidence=0.99)
        assert_consistent(small, big, r, exact)


def test_batch_statistics_estimates_agree_across_batch_size_pairs_at_one_ghost_batch_size():
    """Batch statistics on a large-batch solution. The old protocol (each sampled batch its own statistics, the
    full gradient those of eval batches of 1024: two losses) gave 8.9e4, 8.5e4, 7.9e4 for (32, 64, 128 against
    the full gradient) and -1.3e4 for (32, 512), the truth 6.5e3. One ghost batch size g makes every pair one
    quantity, whose exact value (a loop of autograd over the 32 ghost batches of the partition) they hold."""
    model, data = large_batch_problem()
    _, units = documented_partition(1, 1024, 32)
    g2, trace = ghost_moments(model, data, units)
    exact = trace / g2
    for small, big in PAIRS:  # ghost_batch defaults to small: 32 for the first two
        r = gradient_noise_scale(model, data, small=small, big=big, n_batches=400, seed=1, confidence=0.99,
                                 bn="batch", batch_size=1024, **({} if small == 32 else {"ghost_batch": 32}))
        assert_consistent(small, big, r, exact)
        assert r.ghost_batch == 32 and r.b_simple > 0
    r = exact_gradient_noise_scale(model, data, bn="batch", ghost_batch=32, seed=1)
    assert rel(r.grad_norm_sq, g2) < 1e-10 and rel(r.trace_sigma, trace) < 1e-10
    # the study's measurement: batches of 32 against the full gradient, the run's seed
    from batchgap.config import MeasureConfig
    from batchgap.data.base import TensorData
    from batchgap.measure import noise_scale

    mcfg = MeasureConfig(bn="batch", noise_scale_batches=400, eval_batch_size=1024)
    d = noise_scale(model, TensorData(*data), mcfg, seed=1)
    assert d["ghost_batch"] == 32 and d["small"] == 32 and d["ci_low"] <= exact <= d["ci_high"]


def zero_gradient_problem(n=16, identical=False):
    """A bias-free linear softmax model at W = 0 on integer data: every gradient is exact in float64.

    Pairs (x, y), (-x, y): G = 0 exactly. ``identical``: every example the same, so Sigma = 0 exactly.
    """
    g = torch.Generator().manual_seed(0)
    half = torch.randint(-3, 4, (n // 2, 3), generator=g).double()
    labels = torch.randint(0, 2, (n // 2,), generator=g)
    x, y = torch.cat([half, -half]), torch.cat([labels, labels])
    if identical:
        x, y = torch.ones(n, 3, dtype=torch.float64), torch.zeros(n, dtype=torch.long)
    model = nn.Linear(3, 2, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    return model, (x, y)


def test_a_nonpositive_estimate_is_reported_never_returned_as_a_number():
    model, data = zero_gradient_problem()
    assert float(flat_grad(model, *data).pow(2).sum()) == 0  # G = 0 exactly (the oracle)
    r = gradient_noise_scale(model, data, small=2, n_batches=10, seed=0)  # B_big = n: |G|^2 = 0 exactly
    assert r.grad_norm_sq == 0 and r.trace_sigma > 0
    assert r.b_simple is None and r.b_simple_stderr is None and "|G|^2 estimate came out <= 0" in r.reason
    e = exact_gradient_noise_scale(model, data)
    assert e.b_simple is None and "|G|^2" in e.reason and json.loads(json.dumps(e.as_dict()))["b_simple"] is None
    # two sampled sizes: |G|^2_est is a difference of noisy means, negative about half the time at G = 0
    signs = []
    for seed in range(8):
        s = gradient_noise_scale(model, data, small=2, big=8, n_batches=5, seed=seed)
        signs.append(s.grad_norm_sq > 0)
        assert (s.b_simple is None) == (s.grad_norm_sq <= 0 or s.trace_sigma <= 0)
        assert s.b_simple is None or s.b_simple > 0
        assert s.b_simple is not None or "resamples had |G|^2_est <= 0" in s.interval
    assert not all(signs) and any(signs)
    # Sigma = 0 exactly: every batch gradient the same, tr(Sigma)_est = 0
    model, data = zero_gradient_problem(identical=True)
    t = gradient_noise_scale(model, data, small=2, big=8, n_batches=5, seed=0)
    assert t.trace_sigma == 0 and t.grad_norm_sq > 0 and t.b_simple is None and "tr(Sigma) estimate" in t.reason


class LastState(nn.Module):
    """An RNN classifier: the recurrent layer, then a linear head on the last time step's output."""

    def __init__(self, cell, dtype=torch.float64, seed=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.rnn, self.head = cell(4, 8, batch_first=True), nn.Linear(8, 3)
        self.to(dtype)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def sequences(n=40, length=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, length, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def test_a_gru_falls_back_to_a_loop_and_equals_enumeration():
    model, data = LastState(nn.GRU), sequences()
    x, y = data
    g2, trace = exact_moments(model, data)
    r = exact_gradient_noise_scale(model, data, chunk=16)
    assert rel(r.grad_norm_sq, g2) < 1e-10 and rel(r.trace_sigma, trace) < 1e-10 and r.n == 40
    assert r.grad_path.startswith("loop over examples: vmap could not trace the model")
    s = gradient_noise_scale(model, data, small=4, big=8, n_batches=6, seed=2)
    gen = torch.Generator().manual_seed(2)  # the documented draws: randperm(n)[:B] per batch
    for size, got in ((4, s.sq_norm_small), (8, s.sq_norm_big)):
        picks = [torch.randperm(40, generator=gen)[:size] for _ in range(6)]
        assert rel(got, sum(float(flat_grad(model, x[p], y[p]).pow(2).sum()) for p in picks) / 6) < 1e-12
    assert s.grad_path.startswith("loop over batches: vmap could not trace the model")
    full = gradient_noise_scale(model, data, small=4, n_batches=6, seed=2)
    assert rel(full.sq_norm_big, g2) < 1e-10 and rel(full.sq_norm_small, s.sq_norm_small) < 1e-12


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # torch's vmap fallback for the LSTM
def test_the_loop_path_equals_the_vmapped_path_on_an_lstm_and_on_ghost_batches():
    model, data = LastState(nn.LSTM, dtype=torch.float32), sequences(dtype=torch.float32)  # vmap traces it
    fields = ("grad_norm_sq", "trace_sigma", "b_simple", "sq_norm_small", "sq_norm_big", "ci_low", "ci_high")
    cases = [(exact_gradient_noise_scale, dict(chunk=16), 1e-6),
             (gradient_noise_scale, dict(small=4, big=16, n_batches=20, seed=1), 1e-6)]
    ghost_model, ghost_data = tiny(n=18)
    cases += [(exact_gradient_noise_scale, dict(bn="batch", ghost_batch=4, chunk=8), 1e-12),
              (gradient_noise_scale, dict(small=4, big=8, n_batches=5, seed=3, bn="batch"), 1e-12)]
    for i, (fn, kw, tol) in enumerate(cases):
        m, d = (model, data) if i < 2 else (ghost_model, ghost_data)
        vmapped, looped = fn(m, d, **kw), fn(m, d, _vmap=False, **kw)
        assert vmapped.grad_path.split(";")[0] == "vmap" and looped.grad_path.startswith("loop over")
        assert "forced" in looped.grad_path
        if fn is exact_gradient_noise_scale and i < 2:  # an LSTM: no closed form, the vmap path says why
            assert vmapped.grad_path == "vmap; no per-example closed form: LSTM 'rnn' holds measured parameters"
        for f in fields:
            assert getattr(looped, f) == pytest.approx(getattr(vmapped, f), rel=tol), (fn.__name__, f)


def test_the_report_and_the_summary_carry_ghost_batches_and_a_missing_estimate():
    from batchgap.report.geometry import hessian_table, reading
    from batchgap.results import Comparison, Ratio, RegimeSummary, Stat
    from batchgap.stats import _geometry, mean_std

    model, data = tiny(n=40)
    ghost = gradient_noise_scale(model, data, small=4, n_batches=20, seed=0, bn="batch").as_dict()
    none = gradient_noise_scale(*zero_gradient_problem(), small=2, n_batches=5, seed=0).as_dict()
    assert _geometry([SimpleNamespace(geometry={"noise_scale": none}),
                      SimpleNamespace(geometry={"noise_scale": ghost})])["noise_scale"] == mean_std([ghost["b_simple"]])

    def results(sb_noise, lb_noise):
        one = Stat(1.0, 0.0, 1)
        rows = [RegimeSummary(name, batch, 0.1, 1, 0, one, one, one, one, one, one,
                              noise_scale=mean_std([v["b_simple"]]))
                for name, batch, v in (("SB", 4, sb_noise), ("LB", 20, lb_noise))]
        runs = [SimpleNamespace(regime=name, geometry={"data": "all", "noise_scale": v}, eval_protocol=None, train=None)
                for name, v in (("SB", sb_noise), ("LB", lb_noise))]
        comp = Comparison("SB", "LB", large_over_small=[Ratio("noise_scale", None)])
        return SimpleNamespace(runs=runs, summary=rows, comparison=comp, study={}, data={},
                               regime=lambda name: next(r for r in rows if r.name == name))

    res = results(ghost, ghost)
    assert "ghost batches of 4" in " ".join(hessian_table(res))
    text = " ".join(reading(res))
    assert f"B_simple ≈ {ghost['b_simple']:.0f}" in text and "ghost batches of 4" in text
    res = results(none, ghost)
    assert "B_simple not estimated on 1 run(s)" in " ".join(hessian_table(res))
    text = " ".join(reading(res))
    assert "B_simple ≈" not in text and "at the SB solutions" in text and "|G|^2 estimate came out <= 0" in text


def test_a_tensor_dataset_gives_the_numbers_of_its_tensors():
    """issue 18: any (x, y) TensorDataset, as the other measures take it."""
    model, (x, y) = tiny()
    a = gradient_noise_scale(model, (x, y), small=8, big=None, n_batches=6, seed=1)
    b = gradient_noise_scale(model, torch.utils.data.TensorDataset(x, y), small=8, big=None, n_batches=6, seed=1)
    assert a.b_simple == b.b_simple and a.sq_norm_small == b.sq_norm_small


# --- issue 16: per-example squared norms in closed form, one forward and backward pass --------------

CLOSED = "per-example norms (Linear/BN closed form)"


def assert_equals_enumeration(r, model, data, which="all", tol=1e-10):
    """B_simple, |G|^2 and tr(Sigma) against the loop of autograd over every example (float64)."""
    g2, trace = exact_moments(model, data, which)
    g = per_example_grads(model, data, which)
    assert rel(r.grad_norm_sq, g2) < tol and rel(r.trace_sigma, trace) < tol and rel(r.b_simple, trace / g2) < tol
    assert rel(r.sq_norm_small, float(g.pow(2).sum(1).mean())) < tol and r.n == len(data[1])


@pytest.mark.parametrize("which", ["all", "no-bn", "frozen"])
def test_closed_form_equals_enumeration_on_an_mlp_with_batchnorm(which):
    """Linear + BatchNorm1d (eval, running statistics) + ReLU, twice; batches of 7 (the last one short).
    "frozen": all, with the first weight and the second BN's bias frozen (a layer's other tensor measured)."""
    model = train_briefly(mlp(d=3, hidden=(5, 4), seed=1), toy_data(n=64, d=3, seed=11), steps=10)
    data = toy_data(n=30, d=3, seed=1)
    size = {"all": 77, "no-bn": 59, "frozen": 58}[which]
    if which == "frozen":
        model[0].weight.requires_grad_(False)
        model[4].bias.requires_grad_(False)
        which = "all"
    r = exact_gradient_noise_scale(model, data, params=which, batch_size=7)
    assert r.grad_path == CLOSED and "closed form" in r.method and "exact per-example gradients" in r.method
    assert r.num_params == size
    assert_equals_enumeration(r, model, data, which)
    vm = exact_gradient_noise_scale(model, data, params=which, batch_size=7, _fast=False)
    assert vm.grad_path == "vmap; per-example closed form off (forced)"
    for f in ("grad_norm_sq", "trace_sigma", "b_simple", "sq_norm_small"):
        assert rel(getattr(r, f), getattr(vm, f)) < 1e-10, f


class Tokens(nn.Module):
    """Linear on (B, *T, F) inputs, then BatchNorm1d over (B, C, T) (positions summed), a linear head."""

    def __init__(self, f, h, t, classes=3, seed=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed, self.bn, self.head = nn.Linear(f, h), nn.BatchNorm1d(h), nn.Linear(h * t, classes)
            self.bn.running_mean.normal_(0, 0.3)
            self.bn.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(self.bn.weight, 1.0, 0.3)
            nn.init.normal_(self.bn.bias, 0.0, 0.3)
        self.double().eval()

    def forward(self, x):
        h = self.embed(x).flatten(1, -2)  # (B, T, H), T the product of the middle dims
        return self.head(torch.relu(self.bn(h.transpose(1, 2))).flatten(1))


@pytest.mark.parametrize("shape, hidden", [((3,), 4), ((2,), 8), ((2, 2), 3)], ids=["direct", "gram", "4-d"])
def test_closed_form_equals_enumeration_on_a_linear_layer_over_positions(shape, hidden):
    """(B, T, F) inputs: T (F_in + F_out) >= F_in F_out sums the (F_out, F_in) matrices (direct), else Gram
    matrices; a (B, 2, 2, F) input flattens its middle dims."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(24, *shape, 5, generator=g, dtype=torch.float64)
    data = (x, torch.randint(0, 3, (24,), generator=g))
    model = Tokens(5, hidden, math.prod(shape))
    r = exact_gradient_noise_scale(model, data, batch_size=10)
    assert r.grad_path == CLOSED
    assert_equals_enumeration(r, model, data)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.b.weight = self.a.weight
        self.double()

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            self.a = nn.Linear(3, 3).double()

    def forward(self, x):
        return self.a(torch.tanh(self.a(x)))


class Outside(nn.Module):
    """``a.weight`` also used outside a's call: the hooks see only a's call, the self-check catches it."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4)
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.double()

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) + 0.5 * nn.functional.linear(x, self.a.weight)


def conv_model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        return nn.Sequential(nn.Unflatten(1, (1, 3)), nn.Conv1d(1, 2, 2), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4, 3)).double()


@pytest.mark.parametrize("build, why", [
    (conv_model, "Conv1d '1' holds measured parameters"),
    (Tied, "parameter 'a.weight' is tied or shared (2 places)"),
    (Twice, "Linear 'a' is called 2 times in one forward"),
    (Outside, "the closed form disagreed with autograd on the first 4 examples"),
])
def test_models_outside_the_closed_form_fall_back_to_vmap_with_the_same_numbers(build, why):
    model, data = build(), toy_data(n=20, d=3, seed=6)
    r = exact_gradient_noise_scale(model, data, batch_size=8)
    assert r.grad_path.startswith("vmap; no per-example closed form: " + why), r.grad_path
    assert "torch.func.grad per unit" in r.method
    assert_equals_enumeration(r, model, data)
    assert not any(m._forward_hooks for m in model.modules())


def test_the_closed_form_leaves_no_hooks_and_keeps_the_model_also_on_error():
    model, data = tiny(n=16)
    before = full_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        exact_gradient_noise_scale(model, data, loss_fn=RaiseOnCall(when=1))  # in the pass
    with pytest.raises(ValueError, match="batch mean of per-example losses"):  # in the self-check
        exact_gradient_noise_scale(model, data, loss_fn=lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum"))
    assert_same_state(model, before)
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_the_study_measures_the_exact_noise_scale_where_per_example_gradients_exist():
    from batchgap.config import MeasureConfig
    from batchgap.data.base import TensorData
    from batchgap.measure import noise_scale

    model, data = tiny(n=40)
    d = noise_scale(model, TensorData(*data), MeasureConfig(noise_scale_batches=5, eval_batch_size=16), seed=3)
    e = exact_gradient_noise_scale(model, data, batch_size=16).as_dict()
    assert d == e and d["grad_path"] == CLOSED and d["interval"].startswith("none: exact")
    assert_equals_enumeration(SimpleNamespace(**d), model, data)
    assert d["seed"] is None and d["ci_low"] == d["ci_high"] == d["b_simple"] and d["confidence"] == 1.0
    r = noise_scale(model, TensorData(*data), MeasureConfig(noise_scale_batches=5, bn="recompute"), seed=3)
    assert r["grad_path"] == CLOSED and r["bn"] == "recompute"
    s = noise_scale(model, TensorData(*data), MeasureConfig(noise_scale_batches=5, bn="batch"), seed=3)
    assert s["ghost_batch"] == 20 and s["n_batches_small"] == 5 and "random batches" in s["method"]  # sampled
    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(2 * (data[0].shape[1] - 2), 3)).double()
    c = noise_scale(conv, TensorData(data[0][:, None], data[1]), MeasureConfig(noise_scale_batches=5), seed=3)
    assert c["n_batches_small"] == 5 and "random batches" in c["method"]  # no closed form: sampled, not enumerated
