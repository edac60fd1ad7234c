"""Recomputed BatchNorm statistics are the exact mean and unbiased variance over the whole data set.

Oracle: torch.mean / torch.var (unbiased) over every row of the layer's actual inputs, computed here in
float64 from the layers' own forward passes (for a second BN layer, from the first one normalized by hand
with its exact statistics), whatever the batch size, the batch order or the modules' registration order.
"""
import pytest
import torch
from torch import nn

from batchgap.landscape import evaluate, recompute_bn_statistics

from test_landscape_common import assert_same_state, full_state


def _model(kind: str, seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "1d":
            model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
        else:
            model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(3 * 4 * 4, 2))
    return model.eval()


def _data(kind: str, case: str, g: torch.Generator):
    shape = (3,) if kind == "1d" else (2, 4, 4)
    if case == "tail":  # 1050 rows, batches of 1000: a 50-row tail shifted far from the rest
        x = torch.randn(1050, *shape, generator=g)
        x[1000:] += 4.0
        return x, 1000
    x = torch.randn(1000, *shape, generator=g)  # sorted, equal batches: each batch sees one slice of x
    order = x.reshape(len(x), -1)[:, 0].argsort()
    return x[order] * 2.0 + 0.5, 100


def _reference(h: torch.Tensor):
    dims = [d for d in range(h.dim()) if d != 1]  # all but the channel: N (and H, W)
    h = h.double()
    return h.mean(dims), h.var(dims, unbiased=True)


def _close(actual, expected, rel=1e-5):
    torch.testing.assert_close(actual.double(), expected, rtol=rel, atol=rel * float(expected.abs().max()))


@pytest.mark.parametrize("case", ["tail", "sorted"])
@pytest.mark.parametrize("kind", ["1d", "2d"])
def test_statistics_are_the_exact_mean_and_unbiased_variance_over_all_rows(kind, case):
    g = torch.Generator().manual_seed(1)
    model = _model(kind)
    x, batch = _data(kind, case, g)
    y = torch.randint(0, 2, (len(x),), generator=g)
    with torch.no_grad():
        mean, var = _reference(model[0](x))  # the BN layer's actual inputs
    recompute_bn_statistics(model, (x, y), batch_size=batch)
    bn = model[1]
    _close(bn.running_mean, mean)
    _close(bn.running_var, var)
    assert int(bn.num_batches_tracked) == -(-len(x) // batch)  # the batches the statistics came from
    assert not model.training and not bn.training


class TwoBN(nn.Module):
    """Two BN layers registered in the opposite order of their use: bn2 acts on what bn1 normalized."""

    def __init__(self):
        super().__init__()
        self.bn2 = nn.BatchNorm1d(4)
        self.lin2 = nn.Linear(5, 4)
        self.bn1 = nn.BatchNorm1d(5)
        self.lin1 = nn.Linear(3, 5)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.relu(self.bn2(self.lin2(torch.relu(self.bn1(self.lin1(x)))))))


def test_two_bn_layers_the_second_on_inputs_normalized_with_the_first_layers_exact_statistics():
    g = torch.Generator().manual_seed(2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = TwoBN().double().eval()
    with torch.no_grad():  # non-trivial affine parameters, so the second layer's inputs depend on them
        for bn in (model.bn1, model.bn2):
            bn.weight.copy_(torch.rand(bn.num_features, generator=g, dtype=torch.float64) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g, dtype=torch.float64))
    x = torch.randn(1050, 3, generator=g, dtype=torch.float64)
    x[1000:] += 3.0
    y = torch.randint(0, 2, (1050,), generator=g)
    with torch.no_grad():  # by hand: layer 1's exact statistics, then layer 2's inputs normalized with them
        h1 = model.lin1(x)
        m1, v1 = h1.mean(0), h1.var(0, unbiased=True)
        a1 = torch.relu((h1 - m1) / torch.sqrt(v1 + model.bn1.eps) * model.bn1.weight + model.bn1.bias)
        h2 = model.lin2(a1)
        m2, v2 = h2.mean(0), h2.var(0, unbiased=True)
        a2 = torch.relu((h2 - m2) / torch.sqrt(v2 + model.bn2.eps) * model.bn2.weight + model.bn2.bias)
        loss = nn.functional.cross_entropy(model.out(a2), y).item()
    before = full_state(model)
    assert evaluate(model, (x, y), batch_size=1000, bn="recompute").loss == pytest.approx(loss, rel=1e-10)
    assert_same_state(model, before)  # evaluate recomputed on a copy of the state, then put it back
    recompute_bn_statistics(model, (x, y), batch_size=1000)
    _close(model.bn1.running_mean, m1, 1e-10)
    _close(model.bn1.running_var, v1, 1e-10)
    _close(model.bn2.running_mean, m2, 1e-10)
    _close(model.bn2.running_var, v2, 1e-10)


def test_one_shot_stream_with_two_bn_layers_is_refused_with_a_clear_message():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TwoBN().eval()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(20, 3, generator=g), torch.randint(0, 2, (20,), generator=g)
    stream = ((x[s : s + 8], y[s : s + 8]) for s in range(0, 20, 8))
    with pytest.raises(ValueError, match="once per BatchNorm layer"):
        recompute_bn_statistics(model, stream, batch_size=8)
