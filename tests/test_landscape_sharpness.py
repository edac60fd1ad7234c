import itertools

import numpy as np
import pytest
import torch
from torch import nn

from batchgap.landscape import adaptive_sharpness, eps_sharpness, evaluate

from test_landscape_common import RaiseOnCall, assert_same_state, full_state, mlp, toy_data, train_briefly


def linear_classifier(seed=0):
    """Mean cross-entropy of a bias-free linear model is convex in its 4 parameters."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(2, 2, bias=False).double()


def brute_force_max(model, data, half_width):
    """max of the (convex) loss over the box: the best of its 2^n vertices."""
    w = model.weight
    x = w.detach().clone()
    best = -np.inf
    with torch.no_grad():
        for signs in itertools.product((-1.0, 1.0), repeat=x.numel()):
            w.copy_(x + torch.tensor(signs, dtype=x.dtype).view_as(x) * half_width.view_as(x))
            best = max(best, nn.functional.cross_entropy(model(data[0]), data[1]).item())
        w.copy_(x)
    return best


@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_convex_model_reaches_the_best_vertex_and_never_exceeds_it(eps):
    data = toy_data(n=40, d=2, classes=2, seed=5)
    model = linear_classifier()
    x = model.weight.detach().reshape(-1)
    f_max = brute_force_max(model, data, eps * (x.abs() + 1))
    f_x = evaluate(model, data).loss
    r = eps_sharpness(model, data, eps=eps, max_iter=50, max_fun=100)
    assert r.f_x == pytest.approx(f_x, rel=1e-14)
    assert r.f_best <= f_max + 1e-12
    assert r.f_best == pytest.approx(f_max, rel=1e-10)
    assert r.value == pytest.approx((f_max - f_x) / (1 + f_x) * 100, rel=1e-8)


class Quadratic(nn.Module):
    """f(theta) = sum_i s_i h_i / 2 (theta_i - c_i)^2 + 1 via a 'model' that outputs theta."""

    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(torch.as_tensor(theta, dtype=torch.float64))

    def forward(self, x):
        return self.theta.expand(len(x), -1)


H = torch.tensor([2.0, 0.5, 3.0, 1.0], dtype=torch.float64)
S = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)  # two convex, two concave coordinates
C = torch.tensor([0.3, -0.2, 0.1, 0.95], dtype=torch.float64)


def quadratic_loss(out, y):
    return (S * H / 2 * (out - C) ** 2).sum(dim=1).mean() + 1.0


def test_quadratic_matches_the_closed_form_box_max():
    x = torch.tensor([0.5, -0.6, 0.08, 0.0], dtype=torch.float64)
    model, data = Quadratic(x), (torch.zeros(6, 1), torch.zeros(6))
    eps = 0.1
    r_box = eps * (x.abs() + 1)
    # convex coordinates: the endpoint farthest from c; concave ones: c clamped into the box
    far = (x - C).abs() + r_box
    near = torch.clamp(C - x, -r_box, r_box) + x - C
    best = torch.where(S > 0, far, near)
    f_max = float((S * H / 2 * best**2).sum() + 1.0)
    f_x = float((S * H / 2 * (x - C) ** 2).sum() + 1.0)
    r = eps_sharpness(model, data, eps=eps, max_iter=100, max_fun=200, loss_fn=quadratic_loss)
    assert r.f_x == pytest.approx(f_x, rel=1e-14)
    assert r.f_best == pytest.approx(f_max, rel=1e-9, abs=1e-12)
    assert r.value == pytest.approx((f_max - f_x) / (1 + f_x) * 100, rel=1e-7)


@pytest.fixture(scope="module")
def bn_model():
    data = toy_data(n=50, seed=11)
    return train_briefly(mlp(seed=11, dropout=0.25), data, steps=60, seed=11), data


def test_subspace_with_identity_equals_full_space(bn_model):
    model, data = bn_model
    n = sum(p.numel() for p in model.parameters())
    full = eps_sharpness(model, data, eps=5e-3)
    ident = eps_sharpness(model, data, eps=5e-3, A=torch.eye(n, dtype=torch.float64))
    assert ident.space.startswith("explicit A") and full.space == "full"
    assert ident.value == pytest.approx(full.value, rel=1e-9)
    assert ident.nfev == full.nfev and ident.nit == full.nit


def test_phi_vanishes_with_eps_and_is_monotone_on_a_convex_model():
    data = toy_data(n=40, d=2, classes=2, seed=6)
    model = linear_classifier(seed=1)
    values = [eps_sharpness(model, data, eps=e, max_iter=50, max_fun=100).value
              for e in (1e-7, 1e-5, 1e-3, 1e-2, 1e-1)]
    assert 0 <= values[0] < 1e-4
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_best_value_bookkeeping_and_budget(bn_model):
    model, data = bn_model
    for eps, max_iter in ((1e-3, 10), (5e-2, 10), (5e-2, 3)):
        r = eps_sharpness(model, data, eps=eps, max_iter=max_iter)
        assert r.value >= r.value_final and r.f_best >= r.f_final >= r.f_x
        assert r.nfev <= r.max_fun == int(np.ceil(1.5 * max_iter)) and r.nit <= max_iter
    r = eps_sharpness(model, data, eps=5e-2, max_iter=50, max_fun=4)
    assert r.nfev == 4 and "hard cap" in r.stop


@pytest.mark.parametrize("bn", ["eval", "batch", "recompute"])
def test_f_x_uses_the_stated_bn_protocol(bn_model, bn):
    model, data = bn_model
    r = eps_sharpness(model, data, batch_size=16, bn=bn, max_iter=2)
    assert r.f_x == pytest.approx(evaluate(model, data, batch_size=16, bn=bn).loss, rel=1e-13)
    assert r.bn == bn and r.n == 50 and r.num_params == sum(p.numel() for p in model.parameters())


def test_seeds_and_as_dict(bn_model):
    model, data = bn_model
    a = eps_sharpness(model, data, subspace_dim=5, seed=1, eps=1e-2)
    b = eps_sharpness(model, data, subspace_dim=5, seed=1, eps=1e-2)
    c = eps_sharpness(model, data, subspace_dim=5, seed=2, eps=1e-2)
    assert a == b
    assert a.value != c.value
    assert a.space == "random subspace p=5, A ~ N(0,1) i.i.d." and a.subspace_dim == 5
    d = a.as_dict()
    assert d["value"] == a.value and d["nfev"] == a.nfev and d["params"] == "all"
    no_bn = eps_sharpness(model, data, params="no-bn", max_iter=2)
    assert no_bn.num_params == a.num_params - 24  # two BN layers of 6 features, weight and bias


def test_model_restored_also_on_error_and_rng_untouched(bn_model):
    model, data = bn_model
    before, rng = full_state(model), torch.get_rng_state()
    eps_sharpness(model, data, subspace_dim=4, bn="batch")
    eps_sharpness(model, data, bn="recompute")
    adaptive_sharpness(model, data)
    for fn in (eps_sharpness, adaptive_sharpness):
        with pytest.raises(RuntimeError, match="boom"):
            fn(model, data, loss_fn=RaiseOnCall(3), batch_size=16)
    assert_same_state(model, before)
    assert torch.equal(rng, torch.get_rng_state())


def test_bad_arguments(bn_model):
    model, data = bn_model
    with pytest.raises(ValueError, match="eps"):
        eps_sharpness(model, data, eps=0)
    with pytest.raises(ValueError, match="subspace_dim"):
        eps_sharpness(model, data, subspace_dim=0)
    with pytest.raises(ValueError, match="A must be"):
        eps_sharpness(model, data, A=torch.eye(3))
    with pytest.raises(ValueError, match="bn"):
        eps_sharpness(model, data, bn="train")


# -- adaptive sharpness ------------------------------------------------------------------------------

def test_adaptive_matches_brute_force_on_a_convex_model():
    data = toy_data(n=40, d=2, classes=2, seed=5)
    model = linear_classifier()
    rho = 0.2
    f_max = brute_force_max(model, data, rho * model.weight.detach().abs())
    r = adaptive_sharpness(model, data, rho=rho, max_iter=50, max_fun=100)
    assert r.f_best <= f_max + 1e-12
    assert r.value == pytest.approx(f_max - r.f_x, rel=1e-9)


def test_adaptive_is_invariant_to_relu_rescaling_and_raw_eps_sharpness_is_not():
    data = toy_data(n=50, seed=2)
    model = train_briefly(mlp(bn=False, hidden=(7, 6)), data, steps=40)
    scaled = mlp(bn=False, hidden=(7, 6))
    c = 5.0
    with torch.no_grad():
        for (n, p), q in zip(scaled.named_parameters(), model.parameters()):
            p.copy_(q * (c if n.startswith("0.") else 1 / c if n == "2.weight" else 1.0))
    assert evaluate(scaled, data).loss == pytest.approx(evaluate(model, data).loss, rel=1e-12)
    a = adaptive_sharpness(model, data, rho=0.05)
    b = adaptive_sharpness(scaled, data, rho=0.05)
    assert a.value > 1e-4
    assert b.value == pytest.approx(a.value, rel=1e-8)
    raw_a = eps_sharpness(model, data, eps=0.05).value
    raw_b = eps_sharpness(scaled, data, eps=0.05).value
    assert abs(raw_a - raw_b) > 0.05 * raw_a


def test_pseudo_inverse_by_normal_equations_equals_least_squares_and_falls_back_when_ill_conditioned():
    from batchgap.landscape.sharpness import _pseudo_inverse_times

    g = torch.Generator().manual_seed(0)
    A = torch.randn(5000, 20, generator=g)
    x = torch.randn(5000, generator=g)
    ref = torch.linalg.lstsq(A.double(), x.double()[:, None]).solution[:, 0]
    torch.testing.assert_close(_pseudo_inverse_times(A, x, block=777), ref, rtol=1e-10, atol=1e-12)
    # two nearly parallel columns: cond(A^T A) ~ 1e12, the normal equations would lose ~half the digits
    B = A.double().clone()
    B[:, 1] = B[:, 0] + 1e-6 * B[:, 1]
    z = _pseudo_inverse_times(B, x.double())
    ref = torch.linalg.lstsq(B, x.double()[:, None], driver="gelsy").solution[:, 0]
    # z itself is ill-determined (its first two entries cancel); its projection B z is not
    torch.testing.assert_close(B @ z, B @ ref, rtol=1e-7, atol=1e-7)
    assert float((B.T @ (B @ z - x.double())).norm()) < 1e-6 * float((B.T @ x.double()).norm())


def test_the_direct_l_bfgs_b_driver_is_the_one_in_use_and_reproduces_minimize(bn_model, monkeypatch):
    """The fast driver (scipy's loop over its compiled setulb, bounds built as arrays) gives exactly what
    scipy.optimize.minimize gives, on the full space, a subspace, and under the hard evaluation cap."""
    from batchgap.landscape import boxmax

    assert boxmax.direct_driver_ok()  # on the SciPy CI installs, so the fast path is what runs
    model, data = bn_model
    calls = []
    direct = boxmax._lbfgsb_direct
    monkeypatch.setattr(boxmax, "_lbfgsb_direct", lambda *a, **k: calls.append(1) or direct(*a, **k))
    kinds = [dict(max_iter=6), dict(max_iter=10, max_fun=4), dict(max_iter=5, subspace_dim=3)]
    fast = [eps_sharpness(model, data, eps=1e-2, seed=1, **k) for k in kinds]
    assert len(calls) == 3
    monkeypatch.setattr(boxmax, "_solve", lambda objective, h, it, fun, cb: boxmax._scipy(objective, h, it, fun, cb))
    slow = [eps_sharpness(model, data, eps=1e-2, seed=1, **k) for k in kinds]
    assert len(calls) == 3
    for a, b in zip(fast, slow):
        assert (a.value, a.value_final, a.nit, a.nfev, a.f_best, a.f_final, a.stop) == \
               (b.value, b.value_final, b.nit, b.nfev, b.f_best, b.f_final, b.stop)
    assert fast[1].nfev == 4 and "hard cap" in fast[1].stop and fast[0].nit == 6


@pytest.mark.parametrize("differs", ["raises", "other iterates"])
def test_the_direct_driver_steps_aside_when_scipy_differs(monkeypatch, differs):
    from batchgap.landscape import boxmax

    direct = boxmax._lbfgsb_direct

    def other_scipy(objective, h, max_iter, max_fun, callback):
        if differs == "raises":  # a private interface with another signature
            raise TypeError("setulb() takes 16 positional arguments")
        return direct(objective, h, max_iter, max_fun, callback, maxcor=5)  # same stop, other points

    boxmax.direct_driver_ok.cache_clear()
    monkeypatch.setattr(boxmax, "_lbfgsb_direct", other_scipy)
    try:
        assert not boxmax.direct_driver_ok()
        objective, h = boxmax._check_problem()
        msg = boxmax._solve(objective, h, 3, 10, lambda intermediate_result: None)  # minimize runs instead
        assert "ITERATIONS REACHED LIMIT" in msg
    finally:
        boxmax.direct_driver_ok.cache_clear()
