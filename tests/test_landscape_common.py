"""Shared helpers for the landscape tests (tiny models and data, bit-for-bit model state), and the
tests of those helpers and of params.preserved's BN flags."""
from __future__ import annotations

import torch
from torch import nn

from batchgap.landscape.params import preserved


def toy_data(n=64, d=5, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(d, classes, generator=g, dtype=dtype)
    y = (x @ w + 0.5 * torch.randn(n, classes, generator=g, dtype=dtype)).argmax(1)
    return x, y


def mlp(d=5, hidden=(6, 6), classes=3, seed=0, bn=True, track=True, dropout=0.0, act=nn.ReLU,
        dtype=torch.float64, bias=True):
    """A small MLP built without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers, width = [], d
        for h in hidden:
            layers.append(nn.Linear(width, h, bias=bias))
            if bn:
                layers.append(nn.BatchNorm1d(h, track_running_stats=track))
            layers.append(act())
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, classes, bias=bias))
        model = nn.Sequential(*layers).to(dtype)
    return model


def train_briefly(model, data, steps=20, lr=0.1, batch=16, seed=0):
    """A few SGD steps so weights move off init and BN has real running statistics; leaves eval mode."""
    x, y = data
    g = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout masks
        model.train()
        for _ in range(steps):
            idx = torch.randperm(len(y), generator=g)[:batch]
            grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[idx]), y[idx]), params)
            with torch.no_grad():
                for p, gr in zip(params, grads):
                    p.sub_(lr * gr)
    model.eval()
    return model


def full_state(model: nn.Module) -> dict:
    """Everything a measurement must not change."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "bn": {n: (m.momentum, m.track_running_stats) for n, m in model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)},
    }


def assert_same_state(model: nn.Module, before: dict) -> None:
    after = full_state(model)
    for key in ("params", "buffers"):
        assert after[key].keys() == before[key].keys()
        for n in before[key]:
            a, b = after[key][n], before[key][n]
            assert a.dtype == b.dtype and torch.equal(a, b), f"{key} {n} changed"
    for n, g in before["grads"].items():
        assert (g is None) == (after["grads"][n] is None), f"grad of {n} appeared/disappeared"
        if g is not None:
            assert torch.equal(g, after["grads"][n])
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert after["bn"] == before["bn"]


class RaiseOnCall:
    """A loss_fn that behaves like cross-entropy until its ``when``-th call, then raises."""

    def __init__(self, when=3):
        self.when, self.calls = when, 0

    def __call__(self, out, y):
        self.calls += 1
        if self.calls >= self.when:
            raise RuntimeError("boom")
        return nn.functional.cross_entropy(out, y)


def test_preserved_restores_bn_tracking_flag():
    model = mlp()
    before = full_state(model)
    try:
        with preserved(model):
            model[1].track_running_stats = False
            model[1].momentum = None
            model.train()
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert_same_state(model, before)


def test_helpers_do_not_touch_global_rng():
    rng = torch.get_rng_state()
    train_briefly(mlp(), toy_data())
    assert torch.equal(rng, torch.get_rng_state())
