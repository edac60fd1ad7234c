"""Measures on models and data beyond a plain MLP on a tensor pair: tied weights, frozen tensors, other
normalization layers, a model returning a tuple, map-style datasets.

Oracles: a hand-written forward pass of the tied model as a function of its DEDUPLICATED flat parameter
vector (each unique tensor written into both places it is used), differentiated by ``torch.func``; a
hand computation of the distance; the same data given as tensors.
"""
import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import grad, hessian, vmap
from torch.utils.data import Dataset, TensorDataset

import batchgap
from batchgap.landscape import (
    adaptive_sharpness, distance, eps_sharpness, evaluate, exact_gradient_noise_scale, filter_normalized_direction,
    gradient_noise_scale, hessian_eigenvalues, hessian_trace, interpolate, loss_curve, loss_surface,
)
from batchgap.landscape.functional import FullDataLoss, session
from batchgap.landscape.params import describe_params, named_parameters

from test_landscape_common import assert_same_state, full_state, mlp, toy_data, train_briefly


class Tied(nn.Module):
    """Embedding 5 x 3 whose weight is also the decoder's (``dec.weight = emb.weight``)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.mix = nn.Linear(3, 3)
        self.dec = nn.Linear(3, 5)
        self.dec.weight = self.emb.weight

    def forward(self, tokens):
        return self.dec(torch.tanh(self.mix(self.emb(tokens))))


def tied_model(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Tied().double().eval()


def tokens(n=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5, (n,), generator=g), torch.randint(0, 5, (n,), generator=g)


SIZES = [15, 9, 3, 5]  # emb.weight (= dec.weight), mix.weight, mix.bias, dec.bias: 32 unique entries


def oracle_loss(vec, x, y):
    """The tied model's mean cross-entropy, by hand, from its deduplicated flat vector."""
    W, Wm, bm, bd = vec.split(SIZES)
    W, Wm = W.view(5, 3), Wm.view(3, 3)
    logits = torch.tanh(W[x] @ Wm.T + bm) @ W.T + bd  # W read as the embedding AND as the decoder
    return nn.functional.cross_entropy(logits, y)


def flat_unique(model):
    return torch.cat([model.emb.weight.detach().reshape(-1), model.mix.weight.detach().reshape(-1),
                      model.mix.bias.detach().reshape(-1), model.dec.bias.detach().reshape(-1)])


# -- tied weights --------------------------------------------------------------------------------------

def test_tied_model_hessian_eigenvalues_and_trace_match_the_deduplicated_oracle():
    model, (x, y) = tied_model(), tokens()
    x0 = flat_unique(model)
    H = hessian(oracle_loss)(x0, x, y)
    assert H.shape == (32, 32)
    exact = torch.linalg.eigvalsh(H).flip(0)
    before = full_state(model)
    r = hessian_eigenvalues(model, (x, y), k=3, batch_size=5, tol=1e-10, max_hvp=32)
    np.testing.assert_allclose(r.eigenvalues, exact[:3].numpy(), rtol=1e-7)
    assert r.num_params == 32 and "tied tensors measured once: dec.weight = emb.weight" in r.params_measured
    t = hessian_trace(model, (x, y), n_probes=96, method="hutch++", batch_size=5)  # sketch spans R^32: exact
    assert t.value == pytest.approx(float(torch.trace(H)), rel=1e-8) and t.num_params == 32
    assert_same_state(model, before)
    assert model.dec.weight is model.emb.weight
    with session(model, "eval"):
        F = FullDataLoss(model, (x, y), batch_size=5)
        assert F.names == ["emb.weight", "mix.weight", "mix.bias", "dec.bias"]
        value, g = F.value_and_grad(F.x0)
        assert value == pytest.approx(float(oracle_loss(x0, x, y)), rel=1e-12)
        torch.testing.assert_close(g, grad(oracle_loss)(x0, x, y), rtol=1e-10, atol=1e-12)


def test_tied_model_every_measure_runs_and_restores_the_model_bit_for_bit():
    model, (x, y) = tied_model(), tokens()
    data, x0 = (x, y), flat_unique(model)
    before = full_state(model)
    f0 = float(oracle_loss(x0, x, y))
    assert evaluate(model, data, batch_size=5).loss == pytest.approx(f0, rel=1e-12)
    assert eps_sharpness(model, data, max_iter=2, batch_size=5).f_x == pytest.approx(f0, rel=1e-12)
    assert adaptive_sharpness(model, data, max_iter=2, batch_size=5).f_x == pytest.approx(f0, rel=1e-12)
    d = filter_normalized_direction(model, bias_bn="filter", seed=1)
    assert list(d) == ["emb.weight", "mix.weight", "mix.bias", "dec.bias"]
    dvec = torch.cat([d[n].reshape(-1) for n in d])
    for fast in (True, False):
        c = loss_curve(model, d, data, [-0.5, 0.0, 0.5], batch_size=5, fast=fast)
        np.testing.assert_allclose(c.loss, [float(oracle_loss(x0 + a * dvec, x, y)) for a in (-0.5, 0.0, 0.5)],
                                   rtol=1e-12)
        assert "tied tensors measured once: dec.weight = emb.weight" in c.params_measured
    s = loss_surface(model, d, d, data, [0.0, 0.5], [0.0, 0.5], batch_size=5)
    assert s.loss[1, 1] == pytest.approx(float(oracle_loss(x0 + dvec, x, y)), rel=1e-12)
    other = tied_model(seed=1)
    path = interpolate(model, other, data, [0.0, 0.5, 1.0], batch_size=5)
    mid = 0.5 * x0 + 0.5 * flat_unique(other)
    assert path.loss[1] == pytest.approx(float(oracle_loss(mid, x, y)), rel=1e-12)
    assert "4 tensors, 32 entries; tied tensors interpolated once: dec.weight = emb.weight" in path.params_interpolated
    # the noise scales (noise.py): the exact one against per-example gradients of the oracle
    per_example = vmap(grad(lambda v, xi, yi: oracle_loss(v, xi[None], yi[None])), in_dims=(None, 0, 0))(x0, x, y)
    G = per_example.mean(0)
    expected = float(((per_example**2).sum(1).mean() - G @ G) / (G @ G))
    assert exact_gradient_noise_scale(model, data, batch_size=5).b_simple == pytest.approx(expected, rel=1e-8)
    assert gradient_noise_scale(model, data, small=2, n_batches=4, n_boot=10, batch_size=5).num_params == 32
    assert_same_state(model, before)
    assert model.dec.weight is model.emb.weight


def test_distance_counts_a_tied_tensor_once():
    a = tied_model()
    b = copy.deepcopy(a)  # deepcopy keeps the tie
    assert b.dec.weight is b.emb.weight
    delta = torch.arange(15, dtype=torch.float64).view(5, 3) / 50
    with torch.no_grad():
        b.emb.weight.add_(delta)
        b.mix.bias.sub_(0.25)
    by_hand = float(torch.sqrt((delta**2).sum() + 3 * 0.25**2))
    assert distance(a, b) == pytest.approx(by_hand, rel=1e-12)
    assert distance(a, b.state_dict()) == pytest.approx(by_hand, rel=1e-12)  # a state dict holds both names


# -- which parameters are measured, and the protocol saying so ----------------------------------------------

def test_frozen_tensors_are_left_out_and_the_protocol_says_trainable_with_the_counts():
    data = toy_data(n=30)
    model = mlp(bn=False)  # 0.weight 0.bias 2.weight 2.bias 4.weight 4.bias: 30 + 6 + 36 + 6 + 18 + 3
    for p in model[0].parameters():
        p.requires_grad_(False)
    r = hessian_eigenvalues(model, data, k=1, max_hvp=5)
    assert r.params == "all" and r.num_params == 63
    assert "all trainable: 4 of 6 tensors, 63 of 99 entries" in r.params_measured
    t = hessian_trace(model, data, n_probes=4)
    assert t.params == "all" and t.params_measured == r.params_measured
    assert "2 frozen" in describe_params(model, "all")


@pytest.mark.parametrize("which", ["no-bn", "no-norm"])
def test_no_bn_leaves_out_every_normalization_layer(which):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(4, 6), nn.LayerNorm(6), nn.Unflatten(1, (3, 2)), nn.GroupNorm(1, 3),
            nn.InstanceNorm1d(3, affine=True), nn.LocalResponseNorm(2), nn.BatchNorm1d(3), nn.Flatten(),
            nn.Linear(6, 3)).double()
    assert [n for n, _ in named_parameters(model, which)] == ["0.weight", "0.bias", "8.weight", "8.bias"]
    text = describe_params(model, which)
    assert "normalization" in text and "LayerNorm" in text and "GroupNorm" in text
    r = hessian_eigenvalues(model, toy_data(n=20, d=4), k=1, max_hvp=3, params=which)
    assert r.num_params == 24 + 6 + 18 + 3 and r.params == which


def test_a_model_returning_a_tuple_gets_one_clear_line():
    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp(bn=False)

        def forward(self, x):
            return self.net(x), x

    model, data = TwoOutputs(), toy_data(n=20)
    for call in (lambda: evaluate(model, data), lambda: hessian_eigenvalues(model, data, max_hvp=2),
                 lambda: eps_sharpness(model, data, max_iter=1)):
        with pytest.raises(ValueError, match=r"must return logits.*tensor of shape \(batch, classes\).*loss_fn"):
            call()
    first = lambda out, y: nn.functional.cross_entropy(out[0], y)  # noqa: E731
    assert evaluate(model, data, loss_fn=first).loss == pytest.approx(evaluate(model.net, data).loss, rel=1e-14)


# -- data forms ---------------------------------------------------------------------------------------

class Pairs(Dataset):
    """A custom map-style data set: one (input, class index as a Python int) pair per item."""

    def __init__(self, inputs, targets):
        self.inputs, self.targets = inputs, targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.inputs[i], int(self.targets[i])


@pytest.fixture(scope="module")
def bn_model():
    data = toy_data(n=45, seed=5)
    return train_briefly(mlp(seed=5), data, seed=5), data


@pytest.mark.parametrize("form", ["TensorDataset", "custom"])
def test_map_style_datasets_give_the_numbers_of_the_same_tensors(bn_model, form):
    model, (x, y) = bn_model
    ds = TensorDataset(x, y) if form == "TensorDataset" else Pairs(x, y)
    for bn in ("eval", "recompute"):
        a, b = evaluate(model, ds, batch_size=16, bn=bn), evaluate(model, (x, y), batch_size=16, bn=bn)
        assert (a.loss, a.accuracy, a.n) == (pytest.approx(b.loss, rel=1e-14), b.accuracy, 45)
    s1, s2 = (eps_sharpness(model, d, max_iter=2, batch_size=16) for d in (ds, (x, y)))
    assert s1.value == pytest.approx(s2.value, rel=1e-10) and s1.n == 45
    h1, h2 = (hessian_eigenvalues(model, d, k=1, max_hvp=8, batch_size=16) for d in (ds, (x, y)))
    np.testing.assert_allclose(h1.eigenvalues, h2.eigenvalues, rtol=1e-12)


def test_root_exports_the_noise_scales_and_distance():
    for name in ("gradient_noise_scale", "exact_gradient_noise_scale", "distance"):
        assert name in batchgap.__all__ and getattr(batchgap, name) is getattr(batchgap.landscape, name)
