"""PAC-Bayes flatness with Jiang et al.'s error target (the training-accuracy drop) against oracles: a linear
classifier whose expected accuracy under Gaussian weight noise is a sum of normal CDFs, a brute-force loop over
the same draws (common random numbers), and the issue's case of a fitted MLP against a copy with its last layer
x4 (the same predictions), which the two targets rank in opposite orders."""
import copy
import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats
from torch import nn

from batchgap.landscape.flatness import pac_bayes_flatness

from test_landscape_common import mlp, toy_data, train_briefly


@pytest.fixture(scope="module")
def linear():
    """Two classes, logits W x without bias: example i's margin under noise U is m_i + (U_y - U_o) . x_i."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    W = torch.tensor([[1.0, -0.5, 0.3], [-0.8, 0.6, 0.1]], dtype=torch.float64)
    y = (x @ W.T).argmax(1)
    y[:4] = 1 - y[:4]  # four examples misclassified: noise can also make them right
    model = nn.Linear(3, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(W)
    return model, (x, y)


def expected_drop(model, data, sigma, magnitude_aware):
    """acc(w) - E_u[acc(w + u)] in closed form: margin_i + noise ~ N(m_i, s_i^2), P(right) = Phi(m_i / s_i)."""
    W = model.weight.detach()
    x, y = data
    m = (x * (W[y] - W[1 - y])).sum(1)
    if magnitude_aware:  # u_cj ~ N(0, sigma^2 W_cj^2)
        s = sigma * torch.sqrt((x**2 * (W[y] ** 2 + W[1 - y] ** 2)).sum(1))
    else:  # u_cj ~ N(0, sigma^2)
        s = sigma * math.sqrt(2) * x.norm(dim=1)
    return float((m > 0).double().mean()) - float(stats.norm.cdf((m / s).numpy()).mean())


def brute_force_drops(model, data, sigma, magnitude_aware, n_samples, seed):
    """acc(w) - acc(w + u_j) for each documented draw z_j (antithetic: z = randn(M / 2, N), rows z_1, -z_1, ...),
    by perturbing a copy of the module and counting."""
    x, y = data
    Z = torch.randn((n_samples // 2, model.weight.numel()), generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    Z = torch.stack([Z, -Z], 1).reshape(n_samples, -1)
    W = model.weight.detach()
    base = float((model(x).argmax(1) == y).double().mean())
    out = []
    for z in Z:
        net = copy.deepcopy(model)
        u = sigma * z.reshape(W.shape) * (W.abs() if magnitude_aware else 1.0)
        with torch.no_grad():
            net.weight.add_(u)
        out.append(base - float((net(x).argmax(1) == y).double().mean()))
    return np.array(out)


@pytest.mark.parametrize("magnitude_aware", [False, True])
def test_error_target_is_where_the_expected_accuracy_drop_reaches_delta(linear, magnitude_aware):
    model, data = linear
    M = 400
    r = pac_bayes_flatness(model, data, delta=0.1, magnitude_aware=magnitude_aware, n_samples=M, seed=5, rtol=0.01,
                           target="error", chunk=50)
    assert r.bracketed and r.target == "error" and "accuracy" in r.bound
    assert r.accuracy_x == pytest.approx(36 / 40)
    # common random numbers: the estimate at each reported sigma is the brute-force mean over the same draws
    drops = brute_force_drops(model, data, r.sigma, magnitude_aware, M, 5)
    np.testing.assert_allclose(r.samples, drops, atol=1e-12)
    assert r.g == pytest.approx(drops.mean(), abs=1e-12) and r.g <= 0.1
    assert brute_force_drops(model, data, r.sigma_hi, magnitude_aware, M, 5).mean() > 0.1
    assert r.sigma_hi / r.sigma <= 1.01 and r.value == pytest.approx(1 / r.sigma**2)
    # the oracle: the sigma where the exact expected drop is 0.1, within the Monte Carlo error of 400 draws
    exact = optimize.brentq(lambda s: expected_drop(model, data, s, magnitude_aware) - 0.1, 1e-3, 50.0)
    assert abs(expected_drop(model, data, r.sigma, magnitude_aware) - 0.1) <= 4 * r.stderr + 0.005
    assert r.sigma == pytest.approx(exact, rel=0.15)


def test_the_targets_rank_a_fitted_mlp_and_its_last_layer_x4_copy_in_opposite_orders():
    """The issue's case: x4 on the last layer keeps every prediction (so the accuracy at w), makes the loss
    surface steeper (loss target: sharper) and the last layer's noise relatively smaller (error target: flatter)."""
    data = toy_data(n=96, d=5, classes=3, seed=2)
    model = train_briefly(mlp(d=5, hidden=(16,), classes=3, bn=False, seed=2), data, steps=300, lr=0.2, batch=32)
    scaled = copy.deepcopy(model)
    last = [m for m in scaled.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(4.0), last.bias.mul_(4.0)
    x, y = data
    assert torch.equal(model(x).argmax(1), scaled(x).argmax(1))
    kw = dict(delta=0.1, n_samples=32, seed=0, rtol=0.02)
    loss = [pac_bayes_flatness(m, data, target="loss", **kw) for m in (model, scaled)]
    error = [pac_bayes_flatness(m, data, target="error", **kw) for m in (model, scaled)]
    assert error[0].accuracy_x == error[1].accuracy_x > 0.9
    assert all(r.bracketed for r in loss + error)
    assert loss[1].value > 1.1 * loss[0].value  # loss target: the x4 copy is sharper
    assert error[1].value < error[0].value / 1.1  # error target: it is flatter


def test_target_is_checked_and_the_error_target_needs_class_logits(linear):
    model, data = linear
    with pytest.raises(ValueError, match="target must be one of 'loss', 'error'"):
        pac_bayes_flatness(model, data, target="accuracy")
    reg = nn.Linear(3, 1).double()
    with pytest.raises(ValueError, match="target='error' needs"):
        pac_bayes_flatness(reg, (data[0], data[0][:, 0]), target="error",
                           loss_fn=lambda o, t: ((o[:, 0] - t) ** 2).mean())
