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
        assert r.nfev <= r.max_fun == 1 + 4 * max_iter and r.nit <= max_iter
        assert r.capped == (r.nit < max_iter and "hard cap" in r.stop or "EXCEEDS LIMIT" in r.stop)
    r = eps_sharpness(model, data, eps=5e-2, max_iter=50, max_fun=4)
    assert r.nfev == 4 and "hard cap" in r.stop and r.capped and r.nit < 50


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
    steps = eps_sharpness(model, data, eps=1e-2, seed=1, max_iter=10).corner_steps
    # the cap: 1 + steps evaluations before L-BFGS-B, then 3 more, so it stops inside the first L-BFGS-B run
    kinds = [dict(max_iter=6), dict(max_iter=10, max_fun=4 + steps), dict(max_iter=5, subspace_dim=3)]
    calls.clear()
    fast = [eps_sharpness(model, data, eps=1e-2, seed=1, **k) for k in kinds]
    n_runs = len(calls)
    assert n_runs >= 3  # every solve ran L-BFGS-B, some twice (from the best corner, then from y = 0)
    monkeypatch.setattr(boxmax, "_solve",
                        lambda objective, h, it, fun, cb, x0=None: boxmax._scipy(objective, h, it, fun, cb, x0=x0))
    slow = [eps_sharpness(model, data, eps=1e-2, seed=1, **k) for k in kinds]
    assert len(calls) == n_runs
    for a, b in zip(fast, slow):
        assert (a.value, a.value_final, a.nit, a.nfev, a.f_best, a.f_final, a.stop) == \
               (b.value, b.value_final, b.nit, b.nfev, b.f_best, b.f_final, b.stop)
    assert fast[1].nfev == 4 + steps and "hard cap" in fast[1].stop and fast[1].capped and fast[1].nit < 10
    assert fast[0].nit == 6 and fast[0].first_run_start == "best corner"


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
        msg = boxmax._solve(objective, h, 3, 10, lambda intermediate_result: None, x0=h)  # minimize runs instead
        assert "ITERATIONS REACHED LIMIT" in msg
    finally:
        boxmax.direct_driver_ok.cache_clear()


# -- random subspace: the scale of A's columns ---------------------------------------------------------

def softmax_classifier(seed=3):
    """A bias-free 4 -> 3 linear softmax classifier: mean cross-entropy is convex in its 12 weights, so
    f(x + A y) is convex in y and its max over a box is at one of the box's vertices."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(4, 3, bias=False).double()


def vertex_max(model, data, A, half):
    """max over all 2^p vertices y = +-half of the mean cross-entropy at weights x + A y."""
    X, Y = data
    x = model.weight.detach().reshape(-1)
    V = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=len(half))), dtype=torch.float64) * half
    W = (x + V @ A.T).reshape(-1, *model.weight.shape)
    return max(nn.functional.cross_entropy(X @ w.T, Y).item() for w in W)


def pinv_times_x(model, A):
    """(A+ x) by numpy's SVD pseudo-inverse, independent of the library's normal equations."""
    return torch.from_numpy(np.linalg.pinv(A.numpy()) @ model.weight.detach().reshape(-1).numpy())


def unequal_columns():
    """A 12 x 6 matrix, neither identity nor orthonormal: column norms from ~0.5 to ~30, columns 0 and 1 at
    ~40 degrees."""
    A = torch.randn(12, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    A = A * torch.tensor([0.2, 0.5, 1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    A[:, 1] += 0.8 * A[:, 0]
    return A


@pytest.mark.parametrize("eps", [1e-3, 2e-3])
def test_subspace_phi_is_the_brute_force_vertex_max_for_explicit_and_random_A(eps):
    """phi with an explicit non-orthonormal A of unequal column norms and with both random column scales equals
    the best of the 64 vertices of its box eps(|(A+ x)_i| + 1) (A+ by numpy's SVD), at the default budget. The
    random A is rebuilt from the documented protocol: torch.randn(n, p) from Generator().manual_seed(seed), and
    for "unit" each column divided by its norm. Small eps: a convex maximization can have other KKT vertices,
    where any local solver may stop (the "normal" draw at eps = 3e-3 stops at one 5e-7 relative below the best)."""
    data = toy_data(n=40, d=4, classes=3, seed=7)
    model = softmax_classifier()
    f_x = nn.functional.cross_entropy(data[0] @ model.weight.detach().T, data[1]).item()
    G = torch.randn(12, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cases = [(unequal_columns(), dict(A=unequal_columns()), None),
             (G, dict(subspace_dim=6, seed=5), "normal"),
             (G / G.norm(dim=0), dict(subspace_dim=6, seed=5, subspace_columns="unit"), "unit")]
    for A, kwargs, columns in cases:
        f_max = vertex_max(model, data, A, eps * (pinv_times_x(model, A).abs() + 1))
        r = eps_sharpness(model, data, eps=eps, **kwargs)
        assert r.f_x == pytest.approx(f_x, rel=1e-13)
        assert r.f_best <= f_max + 1e-12
        assert r.f_best == pytest.approx(f_max, rel=1e-10)
        assert r.value == pytest.approx((f_max - f_x) / (1 + f_x) * 100, rel=1e-8)
        assert r.subspace_columns == columns and r.subspace_dim == 6
        assert r.column_norm == pytest.approx(float(A.norm(dim=0).mean()), rel=1e-12)
    assert "unit norm" in r.space


@pytest.mark.parametrize("c", [0.1, 10.0])
def test_scaling_A_by_c_changes_phi_as_the_plus_one_predicts(c):
    """A -> cA: (cA)+ x = (A+ x)/c, so the box for cA is eps(|(A+ x)_i|/c + 1); seen from A (y' = c y) it is
    eps(|(A+ x)_i| + c): the "+ 1" becomes "+ c" and phi is not invariant to the columns' scale. The prediction,
    brute-forced over its vertices, is what eps_sharpness returns for cA; and "unit" columns (the same draw
    scaled column by column) give the brute-force max of their own box, not the "normal" value."""
    data = toy_data(n=40, d=4, classes=3, seed=7)
    model = softmax_classifier()
    A, eps = unequal_columns(), 2e-3
    z = pinv_times_x(model, A)
    predicted = vertex_max(model, data, c * A, eps * (z.abs() / c + 1))
    assert predicted == pytest.approx(vertex_max(model, data, A, eps * (z.abs() + c)), rel=1e-13)  # the same box
    base, scaled = eps_sharpness(model, data, eps=eps, A=A), eps_sharpness(model, data, eps=eps, A=c * A)
    assert scaled.f_best == pytest.approx(predicted, rel=1e-10)
    # about linear in the box width at this eps: phi(cA) / phi(A) is near (mean |z| + c) / (mean |z| + 1), far from 1
    ratio = scaled.value / base.value
    assert (ratio > 5) if c > 1 else (ratio < 0.3)
    G = torch.randn(12, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    unit, normal = (eps_sharpness(model, data, eps=eps, subspace_dim=6, seed=5, subspace_columns=k)
                    for k in ("unit", "normal"))
    D = G / G.norm(dim=0)
    assert unit.f_best == pytest.approx(vertex_max(model, data, D, eps * (pinv_times_x(model, D).abs() + 1)), rel=1e-10)
    assert normal.value > 2 * unit.value  # column norms ~ sqrt(12): the normal draw moves the weights further


def test_subspace_columns_choices_are_checked_and_match_the_config():
    from batchgap.config import MeasureConfig
    from batchgap.landscape.sharpness import SUBSPACE_COLUMNS
    import dataclasses

    field = next(f for f in dataclasses.fields(MeasureConfig) if f.name == "sharpness_subspace_columns")
    assert field.metadata["choices"] == SUBSPACE_COLUMNS and field.default == "normal"
    data = toy_data(n=10, d=4, classes=3)
    with pytest.raises(ValueError, match="subspace_columns"):
        eps_sharpness(softmax_classifier(), data, subspace_dim=2, subspace_columns="orthonormal")


# -- what the report says about them -----------------------------------------------------------------

def report_of(geometries: dict, paper=None):
    """A Results holding one run per regime with the given geometry dicts (real measurement outputs), the
    summaries and ratios the report reads, for the report's geometry sections alone."""
    from types import SimpleNamespace

    from batchgap.results import Comparison, Ratio, RegimeSummary, Results, SharpnessStat, Stat

    stat = lambda v: Stat(v, 0.0, 1)  # noqa: E731
    summary, runs = [], []
    for name, geo in geometries.items():
        runs.append(SimpleNamespace(geometry=geo, regime=name, ok=True, eval_protocol=None))
        summary.append(RegimeSummary(
            name=name, batch_size=1, lr=1e-3, runs=1, diverged=0, train_accuracy=stat(1.0), test_accuracy=stat(1.0),
            train_loss=stat(0.1), test_loss=stat(0.1), distance_from_init=stat(1.0), wall_time_s=stat(1.0),
            sharpness=[SharpnessStat(e["eps"], e["subspace_dim"], stat(e["value"])) for e in geo["sharpness"]],
            adaptive_sharpness=stat(geo["adaptive_sharpness"]["value"]) if "adaptive_sharpness" in geo else None))
    sb, lb = list(geometries)
    ratios = [Ratio("sharpness", 3.0, e["eps"], e["subspace_dim"]) for e in geometries[sb]["sharpness"]]
    if "adaptive_sharpness" in geometries[sb]:
        ratios.append(Ratio("adaptive_sharpness", 2.0))
    return Results(study={"paper": paper or {}}, data={}, environment={}, command=None, runs=runs, pairs=[],
                   summary=summary, comparison=Comparison(sb, lb, large_over_small=ratios), wall_time_s=0.0)


def test_table_4_text_names_the_column_scale_and_says_only_ratios_compare_and_flags_capped_solves():
    from batchgap.report.geometry import sharpness_table

    data, model = toy_data(n=40, d=4, classes=3, seed=7), softmax_classifier()
    entries = [eps_sharpness(model, data, eps=1e-3).as_dict(),
               eps_sharpness(model, data, eps=1e-3, subspace_dim=6, seed=1, subspace_columns="unit").as_dict(),
               eps_sharpness(model, data, eps=5e-4, subspace_dim=6, seed=1, subspace_columns="unit").as_dict()]
    capped = [dict(e) for e in entries]
    capped[0] = eps_sharpness(model, data, eps=1e-3, max_fun=2).as_dict()
    assert capped[0]["capped"]
    paper = {"network": "F1", "sharpness": [{"eps": 0.001, "sb": "1.23", "lb": "205.14"},
                                            {"eps": 0.001, "subspace_dim": 6, "sb": "0.11", "lb": "9.22"}]}
    text = "\n".join(sharpness_table(report_of({"SB": {"data": "full training set (40 examples)", "sharpness": entries},
                                                "LB": {"data": "full training set (40 examples)", "sharpness": capped}},
                                               paper)))
    assert ("levels depend on the scale of A's columns (here A: N(0,1) i.i.d. columns scaled to unit norm, "
            "mean column norm 1" in text)
    assert "which the paper does not give: only the LB/SB ratios" in text and "not their levels" in text
    assert "| ε-sharpness, subspace-6 ε = 0.0005 |" in text
    assert text.count("not reported") == 2  # the paper has no random-subspace row at eps = 5e-4
    assert "The evaluation cap, not the 10 iterations, ended 1 of 6 ε-sharpness solves" in text
    assert "sign-of-gradient corner" in text  # the solver's start, stated with the numbers
    full_only = "\n".join(sharpness_table(report_of({"SB": {"data": "x", "sharpness": entries[:1]},
                                                     "LB": {"data": "x", "sharpness": entries[:1]}})))
    assert "scale of A's columns" not in full_only and "evaluation cap" not in full_only
