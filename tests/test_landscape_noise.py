"""Gradient noise scale: exact oracles on tiny float64 models.

Oracles: per-example gradients from a loop of ``torch.autograd.grad``; E|G_B|^2 by enumerating every
size-B subset; the Monte-Carlo estimator against those exact values within a few standard errors.
"""
from __future__ import annotations

import copy
import itertools
import json
import math

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
    with pytest.raises(ValueError, match='bn="batch" couples the examples'):
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


def test_batch_mode_uses_each_sampled_batch_statistics():
    """bn="batch": the k batches drawn as documented (randperm(n)[:B] from the seeded generator)."""
    model, data = tiny(n=16)
    x, y = data
    r = gradient_noise_scale(model, data, small=4, big=8, n_batches=5, seed=3, bn="batch")
    gen = torch.Generator().manual_seed(3)
    coupled = copy.deepcopy(model).eval()
    coupled[1].train()
    coupled[1].track_running_stats = False
    means = []
    for size in (4, 8):
        batches = [torch.randperm(16, generator=gen)[:size] for _ in range(5)]
        means.append(sum(float(flat_grad(coupled, x[b], y[b]).pow(2).sum()) for b in batches) / 5)
    assert rel(r.sq_norm_small, means[0]) < 1e-12 and rel(r.sq_norm_big, means[1]) < 1e-12
    assert r.bn_description.startswith("batch statistics of each sampled batch")


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
