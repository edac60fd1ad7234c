import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from batchgap.landscape import hessian_eigenvalues, hessian_trace
from batchgap.landscape.functional import FullDataLoss, session
from batchgap.landscape.params import named_parameters

from test_landscape_common import RaiseOnCall, assert_same_state, full_state, mlp, toy_data, train_briefly


def dense_hessian(model, data, batch_size, which="all", oracle="torch.func", bn_train=False):
    """The exact Hessian of the batch-weighted full-data loss (the oracle).

    ``oracle="torch.func"``: ``torch.func.hessian``; ``"autograd"``: ``torch.autograd.functional.hessian``
    (double backward). With BatchNorm on batch statistics torch 2.13's ``torch.func.hessian`` (and
    ``jacrev(jacrev)``) disagree with double backward AND with finite differences of the gradient,
    while jvp-of-grad agrees with both; so batch-statistics cases use the autograd oracle.
    """
    named = named_parameters(model, which)
    names, shapes = [n for n, _ in named], [p.shape for _, p in named]
    sizes = [int(np.prod(s)) for s in shapes]
    x0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    x, y = data

    def loss(vec):
        params = {n: t.view(s) for n, t, s in zip(names, vec.split(sizes), shapes)}
        total = 0.0
        for start in range(0, len(y), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            total = total + nn.functional.cross_entropy(functional_call(model, params, (xb,)), yb) * len(yb)
        return total / len(y)

    model.eval()  # BN running statistics (batch statistics without tracking), dropout off
    for m in model.modules():
        if bn_train and isinstance(m, nn.BatchNorm1d):
            m.train()  # batch statistics (this oracle's forward passes update a copy's buffers)
    if oracle == "autograd":
        return torch.autograd.functional.hessian(loss, x0)
    return torch.func.hessian(loss)(x0)


@pytest.fixture(scope="module")
def tiny():
    """Tanh MLP with BN (running statistics) and dropout, 95 parameters, float64."""
    data = toy_data(n=45, d=4, seed=21)
    model = train_briefly(mlp(d=4, hidden=(5, 5), seed=21, act=nn.Tanh, dropout=0.3), data, steps=30, seed=21)
    H = dense_hessian(model, data, batch_size=16)
    return model, data, H


def test_hvp_forward_over_reverse_equals_dense_hessian_times_v(tiny):
    model, data, H = tiny
    V = torch.randn(5, H.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with session(model, "eval"):
        F = FullDataLoss(model, data, batch_size=16)
        torch.testing.assert_close(F.hvp(V, chunk=2), V @ H, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(F.hvp(V[0]), H @ V[0], rtol=1e-10, atol=1e-12)


def test_top_eigenvalues_match_eigvalsh(tiny):
    model, data, H = tiny
    exact = torch.linalg.eigvalsh(H).flip(0).numpy()
    r = hessian_eigenvalues(model, data, k=3, batch_size=16, tol=1e-10, max_hvp=95, return_eigenvectors=True)
    np.testing.assert_allclose(r.eigenvalues, exact[:3], rtol=1e-5)
    assert r.converged and np.all(r.residuals <= 1e-6 * abs(exact[0]))
    assert r.hvps == r.lanczos_steps + 3 and r.eigenvectors.shape == (3, H.shape[0])
    v = torch.tensor(r.eigenvectors[0])
    torch.testing.assert_close(H @ v, r.eigenvalues[0] * v, rtol=0, atol=1e-6 * abs(exact[0]))
    assert "eigenvectors" not in r.as_dict() and r.as_dict()["eigenvalues"] == list(r.eigenvalues)


def test_batch_statistics_bn_hvp_and_eigenvalues_match_the_double_backward_hessian():
    data = toy_data(n=40, d=4, seed=4)
    model = train_briefly(mlp(d=4, hidden=(5,), seed=4, act=nn.Tanh, track=False), data, steps=20, seed=4)
    H = dense_hessian(model, data, batch_size=20, oracle="autograd")  # batch statistics in eval mode
    r = hessian_eigenvalues(model, data, k=2, batch_size=20, tol=1e-10, max_hvp=60)
    np.testing.assert_allclose(r.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:2].numpy(), rtol=1e-5)
    assert "batch statistics (eval batch 20)" in r.bn_description
    V = torch.randn(3, H.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for bn in ("eval", "batch"):  # "batch" forces batch statistics the same way here
        with session(model, bn):
            F = FullDataLoss(model, data, batch_size=20)
            torch.testing.assert_close(F.hvp(V, chunk=3), V @ H, rtol=1e-10, atol=1e-12)


def test_batch_bn_mode_on_a_running_stats_model_matches_its_dense_hessian(tiny):
    model, data, _ = tiny
    H = dense_hessian(copy.deepcopy(model), data, batch_size=16, oracle="autograd", bn_train=True)
    r = hessian_eigenvalues(model, data, k=1, batch_size=16, bn="batch", tol=1e-10, max_hvp=95)
    assert r.eigenvalues[0] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-5)
    assert "batch statistics (eval batch 16)" in r.bn_description


def test_hutchinson_equals_the_probe_mean_and_its_interval_covers_the_trace(tiny):
    model, data, H = tiny
    exact = float(torch.trace(H))
    r = hessian_trace(model, data, n_probes=400, method="hutchinson", batch_size=16, seed=3)
    assert r.ci_low <= exact <= r.ci_high
    assert abs(r.value - exact) < 5 * r.stderr and r.hvps == 400 and r.n_probes == 400
    # the estimator is exactly the mean of z^T H z over the same seeded Rademacher probes
    g = torch.Generator().manual_seed(3)
    Z = torch.randint(0, 2, (400, H.shape[0]), generator=g, dtype=torch.int8).double() * 2 - 1
    samples = ((Z @ H) * Z).sum(1)
    assert r.value == pytest.approx(float(samples.mean()), rel=1e-10)
    assert r.stderr == pytest.approx(float(samples.std() / 20), rel=1e-8)


def test_hutch_plus_plus_is_exact_when_the_sketch_spans_the_space(tiny):
    model, data, H = tiny
    n = H.shape[0]
    exact = float(torch.trace(H))
    r = hessian_trace(model, data, n_probes=3 * n + 3, method="hutch++", batch_size=16)
    assert r.value == pytest.approx(exact, rel=1e-8)
    assert r.stderr < 1e-8 * abs(exact) + 1e-10
    small = hessian_trace(model, data, n_probes=60, method="hutch++", batch_size=16, seed=1)
    assert small.ci_low - 1e-9 <= small.value <= small.ci_high + 1e-9 and small.hvps == 60


def test_seeds_reproduce_and_differ(tiny):
    model, data, _ = tiny
    a = hessian_trace(model, data, n_probes=10, seed=5)
    assert a == hessian_trace(model, data, n_probes=10, seed=5)
    assert a.value != hessian_trace(model, data, n_probes=10, seed=6).value
    e = hessian_eigenvalues(model, data, k=1, max_hvp=5, tol=1e-12)
    assert np.array_equal(e.eigenvalues, hessian_eigenvalues(model, data, k=1, max_hvp=5, tol=1e-12).eigenvalues)
    assert not e.converged and e.lanczos_steps == 5


def test_model_restored_also_on_error_and_rng_untouched(tiny):
    model, data, _ = tiny
    model.train()
    before, rng = full_state(model), torch.get_rng_state()
    hessian_eigenvalues(model, data, k=2, bn="batch", max_hvp=10)
    hessian_trace(model, data, n_probes=6, method="hutch++", bn="recompute")
    for fn in (hessian_eigenvalues, hessian_trace):
        with pytest.raises(RuntimeError, match="boom"):
            fn(model, data, loss_fn=RaiseOnCall(3), batch_size=16)
    assert_same_state(model, before)
    assert torch.equal(rng, torch.get_rng_state())
    model.eval()


def test_bad_arguments(tiny):
    model, data, _ = tiny
    with pytest.raises(ValueError, match="method"):
        hessian_trace(model, data, method="xtrace++")
    with pytest.raises(ValueError, match="n_probes"):
        hessian_trace(model, data, n_probes=1)
    with pytest.raises(ValueError, match="k"):
        hessian_eigenvalues(model, data, k=0)
