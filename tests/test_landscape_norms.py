import copy
import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from batchgap.landscape.norms import norm_measures
from batchgap.landscape.params import named_parameters

from test_landscape_common import assert_same_state, full_state, mlp, toy_data, train_briefly


def gaussian_(model, seed=0, scale=0.7):
    """Overwrite every parameter with N(0, scale^2) entries (no symmetric init), without the global RNG."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def brute_force_path_norm(layers):
    """sqrt of the sum over every input -> output path of the product of squared weights, biases as paths
    from a constant unit entering at their layer. ``layers``: [(W (out, in) numpy, b (out,) or None)]."""
    widths = [layers[0][0].shape[1]] + [W.shape[0] for W, _ in layers]
    total = 0.0
    for units in itertools.product(*(range(w) for w in widths)):  # paths from an input unit
        prod = 1.0
        for k, (W, _) in enumerate(layers):
            prod *= W[units[k + 1], units[k]] ** 2
        total += prod
    for layer, (_, b) in enumerate(layers):  # paths from the bias unit of each layer
        if b is None:
            continue
        for units in itertools.product(*(range(w) for w in widths[layer + 1 :])):
            prod = b[units[0]] ** 2
            for k, (W, _) in enumerate(layers[layer + 1 :]):
                prod *= W[units[k + 1], units[k]] ** 2
            total += prod
    return math.sqrt(total)


def per_example_fisher_rao(model, data, loss_fn, which="all", bn_train=False, batch_size=None):
    """sqrt(mean_i <w, grad l_i>^2) by autograd, one backward per example (the oracle)."""
    model = copy.deepcopy(model).eval()
    if bn_train:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.train()
    w = [p for _, p in named_parameters(model, which)]
    x, y = data
    sq = []
    if bn_train:  # per-example losses of each batch's batch-statistics forward
        for s in range(0, len(y), batch_size):
            losses = nn.functional.cross_entropy(model(x[s : s + batch_size]), y[s : s + batch_size], reduction="none")
            for loss in losses:
                g = torch.autograd.grad(loss, w, retain_graph=True)
                sq.append(float(sum((gi * wi.detach()).sum() for gi, wi in zip(g, w))) ** 2)
    else:
        for i in range(len(y)):
            g = torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), w)
            sq.append(float(sum((gi * wi.detach()).sum() for gi, wi in zip(g, w))) ** 2)
    return math.sqrt(np.mean(sq))


def mse_one_hot(out, y):
    return nn.functional.mse_loss(out, nn.functional.one_hot(y, out.shape[1]).to(out.dtype))


def custom_ce(out, y):
    return -torch.log_softmax(out, 1).gather(1, y[:, None]).mean()


def list_indexed_ce(out, y):  # .tolist() cannot run under vmap: the loop fallback
    rows = y.tolist()
    return -torch.log_softmax(out, 1)[range(len(rows)), rows].mean()


@pytest.mark.parametrize("bias,act,dropout", [(True, nn.ReLU, 0.0), (False, nn.ReLU, 0.0), (True, nn.LeakyReLU, 0.3)])
def test_path_norm_matches_the_brute_force_sum_over_paths(bias, act, dropout):
    model = gaussian_(mlp(d=3, hidden=(4, 3), classes=2, bn=False, bias=bias, act=act, dropout=dropout), seed=1)
    model.append(nn.Flatten()).append(nn.Identity())
    linears = [m for m in model if isinstance(m, nn.Linear)]
    layers = [(m.weight.detach().numpy(), None if m.bias is None else m.bias.detach().numpy()) for m in linears]
    data = toy_data(n=10, d=3, classes=2, seed=1)
    r = norm_measures(model, data)
    assert r.path_norm_reason is None
    assert r.path_norm == pytest.approx(brute_force_path_norm(layers), rel=1e-12)


def test_path_norm_of_a_conv_net_matches_the_brute_force_sum_over_its_paths():
    model = gaussian_(nn.Sequential(nn.Conv1d(1, 2, 2), nn.ReLU(), nn.Flatten(), nn.Linear(6, 2)).double(), seed=2)
    conv = model[0]
    # the conv as a dense (6, 4) matrix: unit (channel c, position t) <- input position t + k with weight w[c, 0, k]
    A = np.zeros((6, 4))
    for c, t, k in itertools.product(range(2), range(3), range(2)):
        A[c * 3 + t, t + k] = float(conv.weight.detach()[c, 0, k])
    b1 = np.repeat(conv.bias.detach().numpy(), 3)
    layers = [(A, b1), (model[3].weight.detach().numpy(), model[3].bias.detach().numpy())]
    x = torch.randn(8, 1, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = norm_measures(model, (x, torch.arange(8) % 2))
    assert r.path_norm == pytest.approx(brute_force_path_norm(layers), rel=1e-12)
    pooled = nn.Sequential(nn.Conv1d(1, 2, 2), nn.ReLU(), nn.MaxPool1d(3), nn.Flatten(), nn.Linear(2, 2)).double()
    r = norm_measures(pooled, (x, torch.arange(8) % 2))
    assert r.path_norm is None and "MaxPool1d" in r.path_norm_reason


class Custom(nn.Module):
    """A ReLU layer in fact, but through a forward the type check cannot read."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return torch.relu(self.fc(x))


@pytest.mark.parametrize("model,word", [
    (mlp(d=3, hidden=(4,), classes=2), "BatchNorm1d"),
    (mlp(d=3, hidden=(4,), classes=2, bn=False, act=nn.Tanh), "Tanh"),
    (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 2)).double(), "LayerNorm"),
    (nn.Sequential(Custom(), nn.Linear(3, 2)).double(), "Custom"),
])
def test_path_norm_is_none_with_a_reason_outside_relu_linear_networks(model, word):
    r = norm_measures(model, toy_data(n=12, d=3, classes=2))
    assert r.path_norm is None and word in r.path_norm_reason
    assert r.fisher_rao_norm > 0 and r.margin is not None  # the other measures are still there


def test_layer_norms_match_torch_and_numpy_conv_weights_as_reshaped_matrices():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 2, groups=2, bias=False),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6, 3)).double()
    x = torch.randn(10, 2, 6, 6, dtype=torch.float64)
    r = norm_measures(model, (x, torch.arange(10) % 3))
    assert r.layers == ("0.weight", "3.weight", "7.weight")
    assert r.other_parameters == ("0.bias", "1.weight", "1.bias", "7.bias")
    assert "reshaped" in r.conv_norm and "not the convolution operator" in r.conv_norm
    assert r.path_norm is None and "BatchNorm2d" in r.path_norm_reason
    weights = [model[0].weight, model[3].weight, model[7].weight]
    assert weights[1].shape == (6, 2, 2, 2)  # grouped conv: (out, in/groups, kh, kw) -> (6, 8)
    spec = [np.linalg.norm(w.detach().numpy().reshape(w.shape[0], -1), 2) for w in weights]
    frob = [float(torch.linalg.norm(w.detach())) for w in weights]
    np.testing.assert_allclose(r.spectral, spec, rtol=1e-12)
    assert r.spectral[2] == pytest.approx(float(torch.linalg.matrix_norm(model[7].weight.detach(), ord=2)), rel=1e-12)
    np.testing.assert_allclose(r.frobenius, frob, rtol=1e-12)
    assert r.log_prod_spectral == pytest.approx(math.log(np.prod(spec)), rel=1e-12)
    assert r.log_prod_frobenius == pytest.approx(math.log(np.prod(frob)), rel=1e-12)
    assert r.params_norm == pytest.approx(sum(f * f for f in frob), rel=1e-12)
    every = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert r.param_norm_all == pytest.approx(float(every.norm()))
    assert r.spectral_margin == pytest.approx(r.margin / np.prod(spec), rel=1e-12)
    assert json.loads(json.dumps(r.as_dict()))["layers"] == list(r.layers)


@pytest.fixture(scope="module")
def bn_model():
    data = toy_data(n=30, d=4, classes=3, seed=5)
    return train_briefly(mlp(d=4, hidden=(5, 4), seed=5), data, steps=20, seed=5), data


@pytest.mark.parametrize("loss_fn,method", [(None, "cross_entropy(reduction='none')"), (mse_one_hot, "vmap"),
                                            (custom_ce, "vmap"), (list_indexed_ce, "loop")])
def test_fisher_rao_matches_a_per_example_autograd_loop(bn_model, loss_fn, method):
    model, data = bn_model
    oracle_loss = loss_fn or nn.functional.cross_entropy
    for which in ("all", "no-bn"):
        r = norm_measures(model, data, loss_fn=loss_fn, batch_size=7, params=which)
        assert method in r.fisher_rao_method and "jvp" in r.fisher_rao_method
        assert r.fisher_rao_norm == pytest.approx(per_example_fisher_rao(model, data, oracle_loss, which), rel=1e-10)
    assert r.num_params == sum(p.numel() for _, p in named_parameters(model, "no-bn"))


def test_fisher_rao_on_batch_statistics_is_the_jvp_of_the_batch_forwards_per_example_losses(bn_model):
    model, data = bn_model
    r = norm_measures(model, data, batch_size=10, bn="batch")
    oracle = per_example_fisher_rao(model, data, None, bn_train=True, batch_size=10)
    assert r.fisher_rao_norm == pytest.approx(oracle, rel=1e-10)
    assert "batch statistics (eval batch 10)" in r.bn_description


def test_margin_percentile_matches_a_hand_computation(bn_model):
    model, data = bn_model
    x, y = data
    with torch.no_grad():
        logits = copy.deepcopy(model).eval()(x).numpy()
    margins = np.array([logits[i, y[i]] - max(logits[i, j] for j in range(3) if j != y[i]) for i in range(len(y))])
    s = np.sort(margins)
    for p in (10.0, 37.5, 0.0, 100.0):
        r = norm_measures(model, data, batch_size=8, percentile=p)
        rank = p / 100 * (len(s) - 1)
        lo, frac = int(math.floor(rank)), rank - math.floor(rank)
        hand = s[lo] + frac * (s[min(lo + 1, len(s) - 1)] - s[lo])
        assert r.margin == pytest.approx(hand, rel=1e-10, abs=1e-12)
        assert r.margin == pytest.approx(float(np.percentile(margins, p)), rel=1e-10, abs=1e-12)
        assert r.margin_fraction_negative == pytest.approx(float(np.mean(margins < 0)))
        assert r.n == 30 and r.percentile == p
    spec = [np.linalg.norm(m.weight.detach().numpy(), 2) for m in model if isinstance(m, nn.Linear)]
    assert r.spectral_margin == pytest.approx(r.margin / np.prod(spec), rel=1e-10)
    if r.margin > 0:
        assert r.log_spectral_margin == pytest.approx(math.log(r.margin) - math.log(np.prod(spec)), rel=1e-10)
    with pytest.raises(ValueError, match="percentile"):
        norm_measures(model, data, percentile=101)


def test_margin_is_none_for_regression_outputs(bn_model):
    model, (x, _) = bn_model
    target = torch.randn(len(x), 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = norm_measures(model, (x, target), loss_fn=nn.functional.mse_loss)
    assert r.margin is None and r.spectral_margin is None and r.log_spectral_margin is None
    assert "class-index targets" in r.margin_reason
    oracle = per_example_fisher_rao(model, (x, target), nn.functional.mse_loss)
    assert r.fisher_rao_norm == pytest.approx(oracle, rel=1e-10)


def test_param_norm_counts_a_tied_tensor_once():
    model = gaussian_(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3)).double(), seed=3)
    model[2].weight = model[0].weight
    r = norm_measures(model, toy_data(n=6, d=3, classes=3))
    W, b0, b2 = model[0].weight.detach(), model[0].bias.detach(), model[2].bias.detach()
    assert r.param_norm_all == pytest.approx(math.sqrt(float((W**2).sum() + (b0**2).sum() + (b2**2).sum())), rel=1e-12)
    assert r.num_params == 15 and "2.weight = 0.weight" in r.params_measured
    assert r.layers == ("0.weight", "2.weight")  # applied twice: two layers


@pytest.mark.parametrize("bn", ["eval", "recompute", "batch"])
def test_norm_measures_leave_the_model_unchanged(bn_model, bn):
    model, data = bn_model
    model = copy.deepcopy(model)
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = full_state(model)
    norm_measures(model, data, batch_size=8, bn=bn)
    norm_measures(model, data, batch_size=8, bn=bn, loss_fn=list_indexed_ce, params="no-bn")
    assert_same_state(model, before)


def test_relu_rescaling_keeps_path_norm_margin_and_fisher_rao_but_not_the_frobenius_sum():
    """Not every measure is reparameterization-invariant: node-wise ReLU rescaling moves the sums of norms."""
    model = gaussian_(mlp(d=3, hidden=(4, 3), classes=2, bn=False), seed=4)
    data = toy_data(n=20, d=3, classes=2, seed=4)
    c = 3.0
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled[0].weight.mul_(c), scaled[0].bias.mul_(c), scaled[2].weight.div_(c)
    torch.testing.assert_close(scaled(data[0]), model(data[0]), rtol=1e-12, atol=1e-12)
    a, b = norm_measures(model, data), norm_measures(scaled, data)
    for key in ("path_norm", "margin", "fisher_rao_norm", "log_prod_frobenius", "log_prod_spectral"):
        assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-9), key
    assert abs(b.params_norm - a.params_norm) > 0.5 * a.params_norm
    assert abs(b.param_norm_all - a.param_norm_all) > 0.1 * a.param_norm_all


def jiang_reference(norms):
    """d * (prod_i n_i^2)^(1/d), written as the formula reads (the oracle; fine for small d)."""
    d = len(norms)
    return d * float(np.prod(np.square(norms))) ** (1.0 / d)


def test_jiang_sum_forms_equal_the_reference_formula_and_survive_a_relu_rescaling():
    """Jiang et al.'s sum.of.spec / sum.of.fro are d (prod ||W_i||^2)^(1/d) (eqs. 35 and 39 are their logs), and so
    unchanged by (3 W1, 3 b1, W2 / 3); the plain sums of squared norms, which batchgap used to present under
    these names, move. Jiang's params.norm (eq. 42) is the sum of squared Frobenius norms of the weights only."""
    model = gaussian_(mlp(d=3, hidden=(4, 3), classes=2, bn=False), seed=5)
    data = toy_data(n=20, d=3, classes=2, seed=5)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled[0].weight.mul_(3.0), scaled[0].bias.mul_(3.0), scaled[2].weight.div_(3.0)
    a, b = norm_measures(model, data), norm_measures(scaled, data)
    weights = [m.weight.detach().double() for m in model if isinstance(m, nn.Linear)]
    spec = [float(torch.linalg.matrix_norm(w, 2)) for w in weights]
    frob = [float(torch.linalg.matrix_norm(w, "fro")) for w in weights]
    assert a.sum_of_spec == pytest.approx(jiang_reference(spec), rel=1e-12)
    assert a.sum_of_fro == pytest.approx(jiang_reference(frob), rel=1e-12)
    assert a.log_prod_of_spec == pytest.approx(math.log(np.prod(np.square(spec))), rel=1e-12)
    assert a.log_prod_of_fro == pytest.approx(math.log(np.prod(np.square(frob))), rel=1e-12)
    assert a.params_norm == pytest.approx(sum(float((w**2).sum()) for w in weights), rel=1e-12)
    biases = sum(float((m.bias.detach() ** 2).sum()) for m in model if isinstance(m, nn.Linear))
    assert a.param_norm_all == pytest.approx(math.sqrt(a.params_norm + biases), rel=1e-12)
    for key in ("sum_of_spec", "sum_of_fro", "log_prod_of_spec", "log_prod_of_fro"):
        assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-9), key
    plain_spec, plain_fro = sum(s * s for s in spec), sum(f * f for f in frob)
    assert plain_spec >= a.sum_of_spec  # AM-GM: the plain sum is at least as large
    scaled_w = [m.weight.detach().double() for m in scaled if isinstance(m, nn.Linear)]
    assert sum(float(torch.linalg.matrix_norm(w, 2)) ** 2 for w in scaled_w) > 2 * plain_spec  # the plain sum moves
    assert b.params_norm > 2 * plain_fro
    defs = a.definitions
    assert "eq. 42" in defs["params_norm"] and "not Jiang" in defs["param_norm_all"]
    assert "sum.of.spec" in defs["sum_of_spec"] and "eq. 35" in defs["sum_of_spec"]


def test_jiang_sum_form_has_no_overflow_for_deep_nets():
    from batchgap.landscape.norms import jiang_sum_form

    assert jiang_sum_form([10.0] * 400) == pytest.approx(400 * 100.0, rel=1e-12)  # prod 10^800 overflows a float
    assert jiang_sum_form([2.0, 0.0]) == 0.0
