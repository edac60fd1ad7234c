import json

import numpy as np
import pytest
import torch
from torch import nn

from batchgap.landscape import hessian_trace
from batchgap.landscape.density import hessian_density
from batchgap.landscape.functional import FullDataLoss, session
from batchgap.landscape.hessian import lanczos_block

from test_landscape_common import assert_same_state, full_state, mlp, toy_data, train_briefly
from test_landscape_hessian import dense_hessian


@pytest.fixture(scope="module")
def tiny():
    """Tanh MLP with BN (running statistics), 93 parameters, float64, with its exact Hessian."""
    data = toy_data(n=45, d=4, seed=21)
    model = train_briefly(mlp(d=4, hidden=(5, 5), seed=21, act=nn.Tanh), data, steps=30, seed=21)
    return model, data, dense_hessian(model, data, batch_size=16)


class Point(nn.Module):
    """out = theta broadcast over the batch, so 0.5 (out - c)^T D (out - c) has Hessian D at any theta."""

    def __init__(self, n):
        super().__init__()
        self.theta = nn.Parameter(torch.linspace(-1, 1, n, dtype=torch.float64))

    def forward(self, x):
        return self.theta.expand(len(x), -1)


def quadratic(diag, c):
    def loss_fn(out, y):
        return 0.5 * ((out - c) ** 2 * diag).sum(1).mean()
    return loss_fn


def test_density_integrates_to_one_and_its_mean_is_the_trace(tiny):
    model, data, H = tiny
    N, exact = H.shape[0], float(torch.trace(H))
    r = hessian_density(model, data, n_vectors=20, steps=25, batch_size=16, seed=1)
    assert np.trapezoid(r.density, r.grid) == pytest.approx(1.0, abs=1e-3)
    assert N * np.trapezoid(r.grid * r.density, r.grid) == pytest.approx(r.trace, rel=1e-3)
    assert r.trace_stderr > 0 and abs(r.trace - exact) < 4 * r.trace_stderr
    np.testing.assert_allclose(r.ritz_weights.sum(1), 1.0, rtol=1e-12)
    # the trace is Hutchinson over the same seeded Rademacher probes
    h = hessian_trace(model, data, n_probes=20, method="hutchinson", batch_size=16, seed=1)
    assert r.trace == pytest.approx(h.value, rel=1e-9) and r.trace_stderr == pytest.approx(h.stderr, rel=1e-7)
    assert r.grid[0] == pytest.approx(r.lambda_min - 5 * r.sigma) and len(r.grid) == 201
    assert r.sigma == pytest.approx(0.01 * (r.lambda_max - r.lambda_min))


def test_extreme_ritz_values_match_eigvalsh(tiny):
    model, data, H = tiny
    exact = torch.linalg.eigvalsh(H).numpy()
    scale = np.abs(exact).max()
    r = hessian_density(model, data, n_vectors=2, steps=30, batch_size=16)
    assert abs(r.lambda_max - exact[-1]) <= 0.01 * scale and abs(r.lambda_min - exact[0]) <= 0.01 * scale
    assert exact[0] - 1e-9 <= r.lambda_min and r.lambda_max <= exact[-1] + 1e-9  # Ritz values interlace
    assert exact[0] < 0 and r.lambda_min < 0 and r.min_max_ratio == pytest.approx(-r.lambda_min / r.lambda_max)
    few = hessian_density(model, data, n_vectors=2, steps=3, batch_size=16)
    assert abs(few.lambda_min - exact[0]) > 0.01 * scale  # the oracle can fail: 3 steps are not enough


def test_known_spectrum_is_reproduced_exactly_with_n_steps():
    N = 12
    diag = torch.tensor([-3.0, -1.5, -0.25, 0.5, 1, 2, 3.5, 5, 7, 9, 12, 20], dtype=torch.float64)
    model = Point(N)
    data = (torch.zeros(7, 1, dtype=torch.float64), torch.zeros(7))
    loss_fn = quadratic(diag, torch.ones(N, dtype=torch.float64))
    r = hessian_density(model, data, n_vectors=3, steps=N, loss_fn=loss_fn, seed=4)
    for row, w in zip(r.ritz_values, r.ritz_weights):
        np.testing.assert_allclose(row, np.sort(diag.numpy()), rtol=0, atol=1e-10)
        np.testing.assert_allclose(w, 1 / N, rtol=1e-8)  # Rademacher: (v . e_i)^2 = 1/N on every eigenvector
    assert r.negative_weight == pytest.approx(3 / N, rel=1e-10)
    assert r.lambda_min == pytest.approx(-3.0, abs=1e-10) and r.lambda_max == pytest.approx(20.0, abs=1e-10)
    assert r.trace == pytest.approx(float(diag.sum()), rel=1e-12)  # Rademacher on a diagonal H: exact
    assert r.steps == N and r.hvps == 3 * N and r.loss_fn == "loss_fn"
    capped = hessian_density(model, data, n_vectors=2, steps=50, loss_fn=loss_fn)
    assert capped.steps == N and capped.ritz_values.shape == (2, N)


def test_negative_weight_with_n_steps_is_the_probes_mass_on_the_negative_eigenvectors(tiny):
    model, data, H = tiny
    N = H.shape[0]
    ev, U = torch.linalg.eigh(H)
    r = hessian_density(model, data, n_vectors=3, steps=N, batch_size=16, seed=2)
    g = torch.Generator().manual_seed(2)
    V = (torch.randint(0, 2, (3, N), generator=g, dtype=torch.int8).double() * 2 - 1) / N ** 0.5
    expected = float((((V @ U) ** 2)[:, ev < -r.sigma]).sum(1).mean())
    assert r.negative_weight == pytest.approx(expected, rel=1e-8)
    # 6 eigenvalues are 0 to rounding (BN's scale invariances): one Ritz value, so the chains stop early
    assert r.ritz_values.shape[1] < N and r.hvps == 3 * r.ritz_values.shape[1]


def test_an_invariant_krylov_space_stops_the_chain_and_pads():
    N = 10  # 3 distinct eigenvalues: every chain's Krylov space has dimension 3
    diag = torch.tensor([-1.0] * 2 + [2.0] * 5 + [4.0] * 3, dtype=torch.float64)
    r = hessian_density(Point(N), (torch.zeros(3, 1, dtype=torch.float64), torch.zeros(3)), n_vectors=2,
                        steps=8, loss_fn=quadratic(diag, torch.zeros(N, dtype=torch.float64)))
    assert r.hvps == 2 * 3 and r.ritz_values.shape == (2, 3)
    np.testing.assert_allclose(r.ritz_values, [[-1, 2, 4]] * 2, atol=1e-10)
    np.testing.assert_allclose(r.ritz_weights, [[0.2, 0.5, 0.3]] * 2, atol=1e-10)
    assert r.negative_weight == pytest.approx(0.2)


def test_block_engine_equals_each_chain_alone(tiny):
    model, data, H = tiny
    V0 = torch.randn(3, H.shape[0], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with session(model, "eval"):
        F = FullDataLoss(model, data, batch_size=16)
        block = lanczos_block(F.hvp, V0, 12, keep_basis=True)
        for k in range(3):
            alone = lanczos_block(F.hvp, V0[k : k + 1], 12)
            np.testing.assert_allclose(block.alphas[k], alone.alphas[0], rtol=0, atol=1e-10)
            np.testing.assert_allclose(block.betas[k], alone.betas[0], rtol=0, atol=1e-10)
            theta_b = np.linalg.eigvalsh(block.tridiagonal(k))
            np.testing.assert_allclose(theta_b, np.linalg.eigvalsh(alone.tridiagonal(0)), rtol=0, atol=1e-10)
            Q = block.bases[k]
            torch.testing.assert_close(Q @ Q.T, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-12)
            T = Q @ H @ Q.T  # the recurrence's T is the projection of the exact Hessian on its basis
            np.testing.assert_allclose(T.numpy(), block.tridiagonal(k), rtol=0, atol=1e-10)
    assert block.hvps == 36


def test_hvp_count_is_n_vectors_times_steps_in_steps_block_calls(tiny, monkeypatch):
    model, data, _ = tiny
    calls, rows = [], []
    original = FullDataLoss.hvp

    def counting(self, vectors, *args, **kwargs):
        calls.append(1)
        rows.append(1 if vectors.dim() == 1 else len(vectors))
        return original(self, vectors, *args, **kwargs)

    monkeypatch.setattr(FullDataLoss, "hvp", counting)
    r = hessian_density(model, data, n_vectors=4, steps=9, batch_size=16)
    assert r.hvps == 4 * 9 == sum(rows) and len(calls) == 9 and r.n_vectors == 4 and r.steps == 9


def test_model_restored_bn_modes_seeds_and_json(tiny):
    model, data, _ = tiny
    model.train()
    before, rng = full_state(model), torch.get_rng_state()
    results = {bn: hessian_density(model, data, n_vectors=2, steps=5, bn=bn, batch_size=16) for bn in
               ("eval", "batch", "recompute")}
    assert_same_state(model, before)
    assert torch.equal(rng, torch.get_rng_state())
    model.eval()
    assert "batch statistics" in results["batch"].bn_description
    assert "recomputed once" in results["recompute"].bn_description
    assert results["batch"].lambda_max != results["eval"].lambda_max
    d = json.loads(json.dumps(results["eval"].as_dict()))
    assert d["hvps"] == 10 and len(d["density"]) == 201 and d["num_params"] == 93 and d["n"] == 45
    assert "Rademacher" in d["method"] and d["params_measured"]
    a = hessian_density(model, data, n_vectors=2, steps=5, seed=3)
    assert a.as_dict() == hessian_density(model, data, n_vectors=2, steps=5, seed=3).as_dict()
    assert a.trace != hessian_density(model, data, n_vectors=2, steps=5, seed=4).trace
    one = hessian_density(model, data, n_vectors=1, steps=4)
    assert one.trace_stderr is None and one.ritz_values.shape == (1, 4)
    with pytest.raises(ValueError):
        a.density[0] = 1.0  # read-only


def test_a_trace_is_given_only_with_its_interval(tiny):
    """Issue 24: one start vector gave a one-probe trace with no error bar. Now the trace comes with the
    Student-t interval of Hutchinson's estimator over the start vectors (the same probes and interval as
    hessian_trace with the seed), or not at all; and the study's default density has an interval."""
    from batchgap.config import MeasureConfig

    model, data, _ = tiny
    r = hessian_density(model, data, n_vectors=6, steps=8, batch_size=16, seed=2)
    h = hessian_trace(model, data, n_probes=6, method="hutchinson", batch_size=16, seed=2)
    assert r.trace == pytest.approx(h.value, rel=1e-9)
    assert (r.trace_ci_low, r.trace_ci_high) == pytest.approx((h.ci_low, h.ci_high), rel=1e-7)
    assert r.trace_confidence == 0.95 and "Student-t" in r.trace_interval
    one = hessian_density(model, data, n_vectors=1, steps=4).as_dict()
    assert one["trace"] is None and one["trace_ci_low"] is None and "no interval" in one["trace_interval"]
    assert MeasureConfig().density_vectors >= 2
    with pytest.raises(ValueError, match="confidence"):
        hessian_density(model, data, n_vectors=2, steps=3, confidence=1.5)


def test_bad_arguments(tiny):
    model, data, _ = tiny
    for kwargs, match in [(dict(n_vectors=0), "n_vectors"), (dict(steps=1), "steps"),
                          (dict(grid_points=1), "grid_points"), (dict(kernel_width=0.0), "kernel_width"),
                          (dict(bn="train"), "bn")]:
        with pytest.raises(ValueError, match=match):
            hessian_density(model, data, **kwargs)
