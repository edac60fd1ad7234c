"""The BN-folded view (landscape/fold.py) and the kept HVP graphs (FullDataLoss.hvp): the same numbers as
the model itself, whose own forward and autograd are the oracle (a dense Hessian on a tiny net)."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

from batchgap.landscape.fold import FoldedAway, FoldedLayer, folded_view
from batchgap.landscape.functional import FullDataLoss, session


def _randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(m.num_features, generator=g))
                m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model


def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, eps=0.1), nn.ReLU(), nn.Linear(6, 6, bias=False),
                        nn.BatchNorm1d(6, affine=False), nn.Tanh(), nn.Linear(6, 3))
    conv = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(4, 3, 3, stride=2), nn.BatchNorm2d(3)), nn.Flatten(), nn.Linear(27, 3))
    conv1d = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.BatchNorm1d(3), nn.ReLU(), nn.Flatten(), nn.Linear(15, 3))
    return [
        (_randomize_bn(mlp).double().eval(), torch.randn(16, 5, dtype=torch.float64)),
        (_randomize_bn(conv).double().eval(), torch.randn(8, 2, 7, 7, dtype=torch.float64)),
        (_randomize_bn(conv1d).double().eval(), torch.randn(8, 2, 5, dtype=torch.float64)),
    ]


def _dense_hessian(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(v):
        parts = dict(zip(names, [t.reshape(s) for t, s in zip(torch.split(v, [s.numel() for s in shapes]), shapes)]))
        return nn.functional.cross_entropy(functional_call(model, parts, (x,)), y)

    return torch.autograd.functional.hessian(loss, x0)


@pytest.mark.parametrize("case", range(3))
def test_the_folded_loss_gradient_and_hvp_equal_the_models_own(case):
    model, x = _models()[case]
    y = torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(case))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    H = _dense_hessian(model, x, y)
    with session(model, "eval"):
        F = FullDataLoss(model, (x, y), batch_size=5)
        plain = FullDataLoss(model, (x, y), batch_size=5, fold=False)
        assert F.view is not None and plain.view is None
        assert sum(isinstance(m, FoldedAway) for m in F.view.modules()) == {0: 2, 1: 2, 2: 1}[case]
        assert torch.allclose(F.forward(F.x0, x), model(x), rtol=1e-12, atol=1e-12)
        (v1, g1), (v2, g2) = F.value_and_grad(F.x0), plain.value_and_grad(plain.x0)
        assert v1 == pytest.approx(v2, rel=1e-12) and torch.allclose(g1, g2, rtol=1e-10, atol=1e-12)
        V = torch.randn(3, F.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        assert torch.allclose(F.hvp(V), (H @ V.T).T, rtol=1e-9, atol=1e-11)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_what_is_not_folded():
    model, x = _models()[0]
    with session(model, "batch"):  # batch statistics: nothing is an affine map
        assert folded_view(model) is None
    model.train()
    assert folded_view(model) is None
    model.eval()
    model[1].track_running_stats = False  # batch statistics in eval mode too
    view = folded_view(model)
    assert not isinstance(view[0], FoldedLayer) and isinstance(view[3], FoldedLayer)
    model[1].track_running_stats = True

    class Ghost(nn.BatchNorm1d):  # a subclass may normalize otherwise
        pass

    sub = nn.Sequential(nn.Linear(5, 6), Ghost(6), nn.ReLU()).eval()
    assert folded_view(sub) is None
    hooked = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)).eval()
    hooked[0].register_forward_hook(lambda m, i, o: None)  # the hook must see the layer's own output
    assert folded_view(hooked) is None
    shared = nn.Linear(5, 6)
    twice = nn.Sequential(nn.Sequential(shared, nn.BatchNorm1d(6)),
                          nn.Sequential(nn.Linear(6, 5), nn.ReLU(), shared)).eval()
    assert folded_view(twice) is None  # the layer is used elsewhere without the BN


def test_the_view_shares_the_models_tensors_and_leaves_it_alone():
    model, x = _models()[1]
    view = folded_view(model)
    assert dict(view.named_parameters()).keys() == dict(model.named_parameters()).keys()
    assert all(a is b for a, b in zip(view.parameters(), model.parameters()))
    assert all(a is b for a, b in zip(view.buffers(), model.buffers()))
    assert not any(isinstance(m, (FoldedLayer, FoldedAway)) for m in model.modules())
    with torch.no_grad():
        model[1].running_var.mul_(2)  # statistics updated in place (as bn="recompute" does) reach the view
    assert torch.allclose(view(x), model(x), rtol=1e-12, atol=1e-12)


def test_kept_graphs_give_the_same_hvps_and_respect_the_budget():
    model, x = _models()[0]
    y = torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(0))
    V = torch.randn(3, sum(p.numel() for p in model.parameters()), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    with session(model, "eval"):
        fresh = FullDataLoss(model, (x, y), batch_size=5, graph_budget=0)
        kept = FullDataLoss(model, (x, y), batch_size=5)
        tiny = FullDataLoss(model, (x, y), batch_size=5, graph_budget=200)  # over budget after a batch
        block = fresh.hvp(V)
        assert fresh._graphs is None
        first = kept.hvp(V[0])
        assert isinstance(kept._graphs, list) and len(kept._graphs) == 4 and kept.graph_bytes > 0
        assert torch.equal(first, block[0])
        assert torch.equal(torch.stack([first, kept.hvp(V[1]), kept.hvp(V[2])]), block)
        assert torch.equal(kept.hvp(V), block)  # the kept graphs survive every call
        assert torch.equal(tiny.hvp(V), block) and tiny._graphs is False
        elsewhere = kept.x0 + 0.1
        assert not torch.equal(kept.hvp(V[0], at=elsewhere), block[0])
        assert torch.equal(kept.hvp(V[0], at=elsewhere), fresh.hvp(V[0], at=elsewhere))


def test_a_sequential_inside_a_custom_forward_is_not_folded():
    class Custom(nn.Module):  # calls the Sequential's children one by one, with an op between them
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))

        def forward(self, x):
            return self.block[1](self.block[0](x) * 2)

    model = _randomize_bn(Custom()).double().eval()
    assert folded_view(model) is None
    x = torch.randn(4, 5, dtype=torch.float64)
    F = FullDataLoss(model, (x, torch.zeros(4, dtype=torch.long)))
    assert torch.equal(F.forward(F.x0, x), model(x))


def test_kept_graphs_are_freed_with_the_loss():
    """The graphs kept for hvp die with their FullDataLoss: sizing them with a saved_tensors_hooks pack hook
    that returned the tensors made each graph a reference cycle (120 tensors left here after 3 losses; about
    50 MiB per Hessian measurement of the default MLP)."""
    import gc

    def live():
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter))

    model, x = _models()[0]
    y = torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(0))
    with session(model, "eval"):
        before = live()
        for _ in range(3):
            F = FullDataLoss(model, (x, y), batch_size=5)
            F.hvp(torch.ones(F.num_params, dtype=torch.float64))
            assert isinstance(F._graphs, list) and F.graph_bytes > 0
            del F
        assert live() == before
