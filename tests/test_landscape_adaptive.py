"""Adaptive sharpness, n- and m-sharpness (Andriushchenko et al. 2023), against brute force on a model whose
loss is convex in the perturbation: a bias-free linear classifier, so each maximum over the box
|delta_i| <= rho |w_i| is at one of its 16 vertices."""
import itertools

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from batchgap.data import TensorData
from batchgap.landscape import adaptive_sharpness

from test_landscape_common import assert_same_state, full_state, toy_data


def linear_classifier(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(2, 2, bias=False).double()


def vertex_sharpness(model, X, Y, rho):
    """max over the 16 vertices delta = +-rho |w| of CE(w + delta) - CE(w) on (X, Y), written out by hand."""
    w = model.weight.detach()
    f = lambda W: nn.functional.cross_entropy(X @ W.T, Y).item()  # noqa: E731
    corners = (torch.tensor(s, dtype=w.dtype).view_as(w) for s in itertools.product((-1.0, 1.0), repeat=w.numel()))
    return max(f(w + s * rho * w.abs()) for s in corners) - f(w)


DATA = toy_data(n=50, d=2, classes=2, seed=5)


class Pairs(Dataset):
    """A map-style dataset of (input, target) pairs, read through torch.utils.data.Subset."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@pytest.mark.parametrize("rho", [0.05, 0.2])
def test_m_sharpness_is_the_mean_of_the_batch_vertex_maxima(rho):
    """m = 8 over n_points = 45 of 50 examples: 5 disjoint batches of 8 (a remainder of 5 left out), the points
    torch.randperm(50) from Generator().manual_seed(3); the value is the mean of the 5 brute-force maxima."""
    model = linear_classifier()
    X, Y = DATA
    idx = torch.randperm(50, generator=torch.Generator().manual_seed(3))[:40]
    maxima = [vertex_sharpness(model, X[b], Y[b], rho) for b in idx.view(5, 8)]
    r = adaptive_sharpness(model, DATA, rho=rho, m=8, n_points=45, seed=3)
    assert r.variant == "m-sharpness" and r.m == 8 and r.n_batches == 5 and r.n == 40 and r.seed == 3
    assert r.batch_values == pytest.approx(maxima, rel=1e-9, abs=1e-15)
    assert r.value == pytest.approx(sum(maxima) / 5, rel=1e-9)
    assert all(v <= mx + 1e-12 for v, mx in zip(r.batch_values, maxima))
    assert "5 disjoint batches of m = 8" in r.sampling and "40 of the 50" in r.sampling and "seed 3" in r.sampling
    assert "remainder of 5" in r.sampling
    # each batch's max is at least its share of the max over their union: m-sharpness >= n-sharpness on those points
    union = vertex_sharpness(model, X[idx], Y[idx], rho)
    assert r.value >= union - 1e-12
    n_sharp = adaptive_sharpness(model, (X[idx], Y[idx]), rho=rho)
    assert n_sharp.value == pytest.approx(union, rel=1e-9) and r.value > n_sharp.value


def test_n_sharpness_is_one_maximum_over_all_the_data_and_says_so():
    model = linear_classifier()
    r = adaptive_sharpness(model, DATA, rho=0.2)
    assert r.value == pytest.approx(vertex_sharpness(model, *DATA, 0.2), rel=1e-9)
    assert r.variant == "n-sharpness" and r.m is None and r.n_batches == 1 and r.n == 50 and r.seed is None
    assert r.sampling == "all 50 examples of the data, one maximum"
    d = r.as_dict()
    assert d["value"] == r.value and d["variant"] == "n-sharpness" and d["batch_values"] == [r.value]


def test_m_sharpness_points_follow_the_seed_and_every_data_form_gives_the_same_batches():
    model = linear_classifier()
    before, rng = full_state(model), torch.get_rng_state()
    a = adaptive_sharpness(model, DATA, rho=0.2, m=10, n_points=30, seed=1)
    forms = [TensorData(*DATA), TensorDataset(*DATA), list(DATA), Pairs(*DATA)]
    assert all(adaptive_sharpness(model, d, rho=0.2, m=10, n_points=30, seed=1) == a for d in forms)
    b = adaptive_sharpness(model, DATA, rho=0.2, m=10, n_points=30, seed=2)
    assert b.value != a.value
    big = adaptive_sharpness(model, DATA, rho=0.2, m=10, n_points=1024, seed=1)  # more points than examples: all 50
    assert big.n == 50 and big.n_batches == 5 and "50 of the 50" in big.sampling and "remainder" not in big.sampling
    assert_same_state(model, before)
    assert torch.equal(rng, torch.get_rng_state())  # the draw has its own generator


def test_m_sharpness_refuses_what_it_cannot_draw():
    model = linear_classifier()
    with pytest.raises(ValueError, match="m = 64 is larger than the 50 points"):
        adaptive_sharpness(model, DATA, m=64)
    with pytest.raises(ValueError, match="iterable of batches"):
        adaptive_sharpness(model, [DATA, DATA, DATA], m=8)
    with pytest.raises(ValueError, match="positive"):
        adaptive_sharpness(model, DATA, m=0)


def test_the_report_names_the_variant_it_shows():
    from batchgap.report.geometry import hessian_table, reading

    from test_landscape_sharpness import report_of

    model = linear_classifier()
    full = "full training set (50 examples)"
    n_sharp = {"data": full, "sharpness": [], "adaptive_sharpness": adaptive_sharpness(model, DATA, rho=0.2).as_dict()}
    text = "\n".join(hessian_table(report_of({"SB": n_sharp, "LB": n_sharp}))
                     + reading(report_of({"SB": n_sharp, "LB": n_sharp})))
    assert "| adaptive sharpness (n-sharpness, full training set) |" in text
    assert "adaptive sharpness (n-sharpness, full training set), is not decisive: LB/SB = 2×" in text
    assert "one max L(w + δ) − L(w) over the whole data" in text
    sub = dict(n_sharp, data="training subset of 40 examples (seed 10000)")
    assert "adaptive sharpness (n-sharpness, training subset of 40 examples (seed 10000))" in "\n".join(
        hessian_table(report_of({"SB": sub, "LB": sub})))
    m_sharp = dict(n_sharp,
                   adaptive_sharpness=adaptive_sharpness(model, DATA, rho=0.2, m=8, n_points=40, seed=4).as_dict())
    capped = dict(n_sharp, adaptive_sharpness=adaptive_sharpness(model, DATA, rho=0.2, m=8, n_points=40, seed=4,
                                                                 max_fun=2).as_dict())
    text = "\n".join(hessian_table(report_of({"SB": m_sharp, "LB": capped})))
    assert "| adaptive sharpness (m-sharpness, m = 8 over 40 points) |" in text
    assert "5 disjoint batches of m = 8: 40 of the 50 examples" in text and "seed 4" in text
    assert "the evaluation cap, not the 10 iterations, ended the adaptive sharpness solve in 1 of 2 runs" in text
