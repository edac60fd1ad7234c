"""Large-batch remedies: SAM/ASAM, conservative (proximal) training, FGSM, ghost BN, batch schedules.

Each step function is checked against an independent computation (analytic gradients of a linear
least-squares model, or a manual loop over torch.func), against the plain step where it must reduce
to it, and for what it does to BatchNorm running statistics.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from batchgap.config import TrainConfig
from batchgap.data.base import TensorData
from batchgap.errors import UserError
from batchgap.landscape.params import is_batchnorm
from batchgap.models import bn_mode, init_model
from batchgap.remedies import (
    STEPS,
    GhostBatchNorm,
    fgsm_examples,
    fgsm_step,
    frozen_bn_stats,
    geometric_schedule,
    ghost_bn,
    ghost_chunk_sizes,
    make_step,
    proximal_step,
    sam_step,
    switch_schedule,
)
from batchgap.train import sgd_step, train


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small ops are faster on one thread on a loaded machine, and one thread keeps sums deterministic."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def mse(out, t):
    return ((out.squeeze(1) - t) ** 2).mean()


def least_squares(seed=0, n=8, d=3):
    """A float64 linear model y = Xw + b and its data, for analytic gradients."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    t = torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
        model.bias.copy_(torch.randn(1, generator=g, dtype=torch.float64))
    return model, X, t


def ls_grad(X, t, w, b):
    """Analytic gradient of mean((Xw + b - t)^2) in (w, b)."""
    r = X @ w + b - t
    return 2 * X.T @ r / len(t), (2 * r.mean()).reshape(1)


def bn_net(seed=0, d=4, classes=3, width=6):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, classes))


def batch(seed=1, n=12, d=4, classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def bn_buffers(model):
    return {n: b.clone() for n, b in model.named_buffers()}


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of every gradient it steps with."""

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.seen = []

    def step(self, closure=None):
        self.seen.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def toy_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return TensorData(x, y)


# ----------------------------------------------------------------------------------------------
# SAM / ASAM
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_and_asam_match_the_hand_computed_update(adaptive):
    model, X, t = least_squares()
    w0, b0 = model.weight.detach().clone().reshape(-1), model.bias.detach().clone()
    rho, eta = 0.3, 0.01
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = sam_step(rho=rho, adaptive=adaptive, eta=eta)(model, opt, X, t, mse)

    gw, gb = ls_grad(X, t, w0, b0)
    g = torch.cat([gw, gb])
    w = torch.cat([w0, b0])
    if adaptive:
        T = w.abs() + eta
        e = rho * T**2 * g / torch.linalg.vector_norm(T * g)
    else:
        e = rho * g / torch.linalg.vector_norm(g)
    g2w, g2b = ls_grad(X, t, w0 + e[:3], b0 + e[3:])
    torch.testing.assert_close(model.weight.detach().reshape(-1), w0 - g2w, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.bias.detach(), b0 - g2b, rtol=0, atol=1e-12)
    # the loss returned is the one at w, the step starts from w, not from w + e
    torch.testing.assert_close(loss, mse(X @ w0.unsqueeze(1) + b0, t), rtol=0, atol=1e-12)
    assert not torch.allclose(model.weight.detach().reshape(-1), w0 + e[:3] - g2w)
    assert not torch.allclose(g2w, gw)  # the perturbation mattered


def test_sam_leaves_the_weights_at_w_when_the_optimizer_does_nothing():
    model, X, t = least_squares()
    before = params_of(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sam_step(rho=0.5)(model, opt, X, t, mse)
    assert_same_tensors(params_of(model), before)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_with_rho_zero_is_the_plain_step_exactly(adaptive):
    a = bn_net()
    b = copy.deepcopy(a)
    oa = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    ob = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    step = sam_step(rho=0.0, adaptive=adaptive)
    for seed in (1, 2):
        x, y = batch(seed)
        la = step(a, oa, x, y, F.cross_entropy)
        lb = sgd_step(b, ob, x, y, F.cross_entropy)
        assert torch.equal(la, lb)
    assert_same_tensors(params_of(a), params_of(b))
    assert_same_tensors(bn_buffers(a), bn_buffers(b))


def test_sam_second_pass_does_not_update_bn_running_statistics():
    model = bn_net()
    reference = copy.deepcopy(model)
    x, y = batch()
    reference.train()
    reference(x)  # one plain forward: what the running statistics must look like
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sam_step(rho=0.5)(model, opt, x, y, F.cross_entropy)
    bn, ref = model[1], reference[1]
    assert torch.equal(bn.running_mean, ref.running_mean)
    assert torch.equal(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == 1


def test_sam_zero_gradient_is_a_plain_step():
    model, X, _ = least_squares()
    t = (X @ model.weight.detach().reshape(-1) + model.bias.detach()).clone()  # a perfect fit: g = 0
    before = params_of(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = sam_step(rho=0.1)(model, opt, X, t, mse)
    assert float(loss) == 0.0
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Conservative training (proximal step)
# ----------------------------------------------------------------------------------------------


def test_proximal_step_gradients_follow_the_formula_with_the_anchor_at_the_step_start():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (10,))
    lr, lam, inner = 0.05, 0.7, 3
    start = params_of(model)
    opt = RecordingSGD(model.parameters(), lr=lr)
    step = proximal_step(lam=lam, inner_steps=inner)
    losses = [step(model, opt, x, y, F.cross_entropy) for _ in range(2)]  # two batches: two anchors

    names = list(start)
    p = dict(start)
    expected_grads, expected_losses = [], []
    for _ in range(2):
        anchor = dict(p)  # x_k: the weights at the start of this step
        for j in range(inner):
            leaves = {n: v.clone().requires_grad_(True) for n, v in p.items()}
            loss = F.cross_entropy(functional_call(model, leaves, (x,)), y)
            grads = torch.autograd.grad(loss, [leaves[n] for n in names])
            g = [gi + lam * (p[n] - anchor[n]) for gi, n in zip(grads, names)]
            expected_grads.append(g)
            if j == 0:
                expected_losses.append(loss.detach())
            p = {n: p[n] - lr * gi for gi, n in zip(g, names)}

    assert len(opt.seen) == 2 * inner
    for seen, want in zip(opt.seen, expected_grads):
        for s, w in zip(seen, want):
            torch.testing.assert_close(s, w, rtol=0, atol=1e-12)
    for n, v in params_of(model).items():
        torch.testing.assert_close(v, p[n], rtol=0, atol=1e-12)
    for got, want in zip(losses, expected_losses):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # the pull mattered: later inner gradients differ from the bare loss gradient
    assert not torch.allclose(opt.seen[2][0], expected_grads[2][0] - lam * (p[names[0]] - start[names[0]]))


def test_proximal_with_lambda_zero_and_one_inner_step_is_the_plain_step_exactly():
    a = bn_net()
    b = copy.deepcopy(a)
    oa, ob = torch.optim.Adam(a.parameters(), lr=1e-2), torch.optim.Adam(b.parameters(), lr=1e-2)
    step = proximal_step(lam=0.0, inner_steps=1)
    for seed in (1, 2):
        x, y = batch(seed)
        assert torch.equal(step(a, oa, x, y, F.cross_entropy), sgd_step(b, ob, x, y, F.cross_entropy))
    assert_same_tensors(params_of(a), params_of(b))
    assert_same_tensors(bn_buffers(a), bn_buffers(b))


def test_proximal_inner_passes_count_the_batch_once_in_bn_statistics():
    model = bn_net()
    reference = copy.deepcopy(model).train()
    x, y = batch()
    reference(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    proximal_step(lam=1e-3, inner_steps=3)(model, opt, x, y, F.cross_entropy)
    assert torch.equal(model[1].running_mean, reference[1].running_mean)
    assert torch.equal(model[1].running_var, reference[1].running_var)
    assert int(model[1].num_batches_tracked) == 1
    assert opt.state[model[0].weight]["step"] == 3  # three optimizer iterations per batch


# ----------------------------------------------------------------------------------------------
# FGSM adversarial training
# ----------------------------------------------------------------------------------------------


def linear_classifier(seed=0, d=4, classes=3):
    torch.manual_seed(seed)
    model = nn.Linear(d, classes)
    with torch.no_grad():
        model.weight[:, 2] = 0.0  # feature 2 does not matter: its input gradient is exactly zero
    return model


def test_fgsm_moves_every_input_by_exactly_eps_where_the_gradient_is_nonzero():
    model = linear_classifier()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-8, 8, (16, 4), generator=g).float() / 8  # dyadic values: x + eps - x is exact
    y = torch.randint(0, 3, (16,), generator=g)
    eps = 0.25
    x_adv = fgsm_examples(model, x, y, eps)
    d = x_adv - x
    x_in = x.clone().requires_grad_(True)
    (grad_x,) = torch.autograd.grad(F.cross_entropy(model(x_in), y), x_in)
    assert (grad_x[:, [0, 1, 3]] != 0).all()
    assert (d[:, [0, 1, 3]].abs() == eps).all()
    assert torch.equal(d.sign(), grad_x.sign())
    assert (d[:, 2] == 0).all()
    assert model.weight.grad is None  # parameter gradients untouched


def test_fgsm_examples_raise_the_loss_of_a_linear_model():
    model = linear_classifier()
    x, y = batch(seed=4, n=32)
    for eps in (1e-3, 1e-2):
        x_adv = fgsm_examples(model, x, y, eps)
        with torch.no_grad():
            assert float(F.cross_entropy(model(x_adv), y)) > float(F.cross_entropy(model(x), y))


def test_fgsm_clamp_keeps_inputs_in_range():
    model = linear_classifier()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(16, 4, generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    x_adv = fgsm_examples(model, x, y, 0.3, clamp=(0.0, 1.0))
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    torch.testing.assert_close(x_adv, (fgsm_examples(model, x, y, 0.3)).clamp(0, 1), rtol=0, atol=0)
    assert (x_adv != x).any()


def test_fgsm_step_trains_on_the_stated_mixture():
    model = bn_net()
    manual = copy.deepcopy(model)
    x, y = batch()
    eps, mix = 0.1, 0.3
    x_adv = fgsm_examples(manual, x, y, eps)
    params = list(manual.parameters())
    g_clean = torch.autograd.grad(F.cross_entropy(manual(x), y), params)
    g_adv = torch.autograd.grad(F.cross_entropy(manual(x_adv), y), params)
    opt = RecordingSGD(model.parameters(), lr=0.1)
    loss = fgsm_step(eps, mix=mix)(model, opt, x, y, F.cross_entropy)
    for got, gc, ga in zip(opt.seen[0], g_clean, g_adv):
        torch.testing.assert_close(got, mix * gc + (1 - mix) * ga, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(opt.seen[0][0], g_clean[0])  # the adversarial term mattered
    reference = copy.deepcopy(bn_net()).train()
    torch.testing.assert_close(loss, F.cross_entropy(reference(x), y), rtol=0, atol=0)  # the clean loss


def test_fgsm_with_eps_zero_gives_the_plain_gradient_and_mix_one_is_the_plain_step():
    x, y = batch()
    a, b = bn_net(), bn_net()
    oa, ob = RecordingSGD(a.parameters(), lr=0.1), RecordingSGD(b.parameters(), lr=0.1)
    fgsm_step(0.0)(a, oa, x, y, F.cross_entropy)
    sgd_step(b, ob, x, y, F.cross_entropy)
    for ga, gb in zip(oa.seen[0], ob.seen[0]):
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-8)
    c, d = bn_net(), bn_net()
    oc, od = torch.optim.SGD(c.parameters(), lr=0.1), torch.optim.SGD(d.parameters(), lr=0.1)
    fgsm_step(0.5, mix=1.0)(c, oc, x, y, F.cross_entropy)
    sgd_step(d, od, x, y, F.cross_entropy)
    assert_same_tensors(params_of(c), params_of(d))


def test_fgsm_adversarial_pass_does_not_update_bn_running_statistics():
    model = bn_net()
    reference = copy.deepcopy(model).train()
    x, y = batch()
    reference(x)
    before = bn_buffers(model)
    fgsm_examples(model, x, y, 0.2)
    assert_same_tensors(bn_buffers(model), before)
    fgsm_step(0.2)(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, F.cross_entropy)
    assert torch.equal(model[1].running_mean, reference[1].running_mean)
    assert torch.equal(model[1].running_var, reference[1].running_var)
    assert int(model[1].num_batches_tracked) == 1


def test_frozen_bn_stats_does_not_touch_buffers_a_pending_graph_needs():
    model = bn_net().train()
    x, y = batch()
    pending = F.cross_entropy(model(x), y)
    versions = [b._version for b in model.buffers()]
    with frozen_bn_stats(model):
        model(x + 1)
    assert [b._version for b in model.buffers()] == versions
    assert model[1].track_running_stats
    pending.backward()  # would fail had the buffers been written and put back


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_frozen_bn_stats_does_not_change_what_the_model_computes(mode):
    model = bn_net()
    model(batch(seed=7)[0])  # running statistics away from their initial values
    model.train(mode == "train")
    x = batch()[0]
    with frozen_bn_stats(model):
        frozen = model(x)
    assert torch.equal(frozen, copy.deepcopy(model)(x))


class StubbornBN(nn.BatchNorm1d):
    """A BatchNorm that updates its running statistics whatever track_running_stats says."""

    def forward(self, x):
        self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, 0.1, self.eps)


def test_frozen_bn_stats_puts_back_buffers_of_layers_that_ignore_the_flag():
    model = nn.Sequential(nn.Linear(4, 3), StubbornBN(3))
    before = bn_buffers(model)
    with frozen_bn_stats(model):
        model(batch()[0])
    assert_same_tensors(bn_buffers(model), before)


def test_frozen_bn_stats_restores_even_on_error():
    model = bn_net().train()
    before = bn_buffers(model)
    with pytest.raises(RuntimeError):
        with frozen_bn_stats(model):
            model(batch()[0])
            raise RuntimeError("boom")
    assert_same_tensors(bn_buffers(model), before)


# ----------------------------------------------------------------------------------------------
# Ghost batch normalization
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, ghost, sizes",
    [(10, 4, [4, 4, 2]), (9, 4, [4, 5]), (8, 4, [4, 4]), (3, 8, [3]), (4, 4, [4]), (5, 4, [5]), (13, 2, [2] * 5 + [3])],
)
def test_ghost_chunk_sizes(n, ghost, sizes):
    assert ghost_chunk_sizes(n, ghost) == sizes


def plain_bn(shape_dims, c, momentum=0.1, track=True):
    cls = nn.BatchNorm2d if shape_dims == 4 else nn.BatchNorm1d
    return cls(c, momentum=momentum, track_running_stats=track)


def ghost_pair(shape, ghost, momentum=0.1, track=True, seed=0):
    torch.manual_seed(seed)
    c = shape[1]
    ghost_layer = GhostBatchNorm(c, ghost, momentum=momentum, track_running_stats=track)
    with torch.no_grad():
        ghost_layer.weight.uniform_(0.5, 2.0)
        ghost_layer.bias.uniform_(-1.0, 1.0)
    plain = plain_bn(len(shape), c, momentum, track)
    plain.load_state_dict(ghost_layer.state_dict())
    return ghost_layer, plain, torch.randn(*shape) * 3 + 1


@pytest.mark.parametrize("shape", [(10, 3), (10, 3, 5), (10, 3, 4, 4), (9, 3)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_bn_is_plain_bn_on_each_chunk_in_turn(shape, momentum):
    ghost_layer, plain, x = ghost_pair(shape, 4, momentum)
    out = ghost_layer.train()(x)
    plain.train()
    start = 0
    sizes = ghost_chunk_sizes(shape[0], 4)
    for size in sizes:
        chunk = x[start : start + size]
        torch.testing.assert_close(out[start : start + size], plain(chunk), rtol=0, atol=1e-6)
        start += size
    torch.testing.assert_close(ghost_layer.running_mean, plain.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(ghost_layer.running_var, plain.running_var, rtol=0, atol=1e-6)
    assert int(ghost_layer.num_batches_tracked) == int(plain.num_batches_tracked) == len(sizes)
    # and not the statistics of the whole batch
    whole = plain_bn(len(shape), shape[1], momentum)
    whole.load_state_dict(ghost_pair(shape, 4, momentum)[0].state_dict())
    assert not torch.allclose(out, whole.train()(x), atol=1e-3)


def test_ghost_bn_with_ghost_size_at_least_the_batch_is_plain_bn_exactly():
    ghost_layer, plain, x = ghost_pair((8, 3, 2, 2), 8)
    assert torch.equal(ghost_layer.train()(x), plain.train()(x))
    assert_same_tensors(dict(ghost_layer.named_buffers()), dict(plain.named_buffers()))
    x.requires_grad_(True)
    ghost_layer(x).square().sum().backward()
    assert ghost_layer.weight.grad is not None and x.grad is not None


def test_ghost_bn_eval_mode_uses_running_statistics_or_chunks_without_them():
    ghost_layer, plain, x = ghost_pair((10, 3), 4)
    with torch.no_grad():
        for layer in (ghost_layer, plain):
            layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
            layer.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
    assert torch.equal(ghost_layer.eval()(x), plain.eval()(x))
    assert int(ghost_layer.num_batches_tracked) == 0

    batch_mode, plain_batch, x = ghost_pair((10, 3), 4, track=False)
    out_eval = batch_mode.eval()(x)
    assert torch.equal(out_eval, batch_mode.train()(x))  # same function in both modes
    torch.testing.assert_close(out_eval[:4], plain_batch.train()(x[:4]), rtol=0, atol=1e-6)


def test_ghost_bn_batch_of_one_fails_as_plain_bn_does():
    ghost_layer = GhostBatchNorm(3, 4).train()
    with pytest.raises(ValueError):
        ghost_layer(torch.randn(1, 3))
    with pytest.raises(ValueError):
        ghost_layer(torch.randn(2, 3, 2, 2, 2))


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


@pytest.mark.parametrize("make", [conv_net, lambda: init_model("mlp", (6,), 3, 0, width=8, depth=2)])
def test_ghost_bn_swaps_every_bn_layer_keeping_tensors_and_checkpoints(make):
    model = make()
    x = torch.randn(10, 2, 5, 5) if isinstance(model[0], nn.Conv2d) else torch.randn(10, 6)
    original = copy.deepcopy(model)
    n_bn = sum(is_batchnorm(m) for m in model.modules())
    param_ids = [id(p) for p in model.parameters()]
    state_before = model.state_dict()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    assert ghost_bn(model, 4) is model
    ghosts = [m for m in model.modules() if isinstance(m, GhostBatchNorm)]
    assert len(ghosts) == n_bn > 0
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in model.modules())
    assert [id(p) for p in model.parameters()] == param_ids  # the optimizer still holds them
    state_after = model.state_dict()
    assert list(state_after) == list(state_before)
    for k in state_before:
        assert state_after[k].data_ptr() == state_before[k].data_ptr()
    assert bn_mode(model) == bn_mode(original)
    model.eval(), original.eval()
    assert torch.equal(model(x), original(x))
    # checkpoints load either way
    original.load_state_dict(model.state_dict())
    model.load_state_dict(original.state_dict())
    # train mode now normalizes per ghost batch, and the optimizer steps the shared parameters
    model.train(), original.train()
    out = model(x)
    assert not torch.allclose(out, original(x), atol=1e-4)
    gamma = ghosts[0].weight.detach().clone()
    opt.zero_grad()
    F.cross_entropy(out, torch.zeros(10, dtype=torch.long)).backward()
    opt.step()
    assert not torch.equal(ghosts[0].weight, gamma)
    ghost_bn(model, 64)  # a model already ghosted gets the new size
    assert all(m.ghost_size == 64 for m in ghosts)


def test_ghost_bn_with_large_ghost_size_trains_like_the_original():
    model = init_model("mlp", (6,), 3, 0, width=8, depth=2)
    original = copy.deepcopy(model)
    ghost_bn(model, 64)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    oa, ob = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(original.parameters(), lr=0.1)
    assert torch.equal(sgd_step(model, oa, x, y, F.cross_entropy), sgd_step(original, ob, x, y, F.cross_entropy))
    assert_same_tensors(model.state_dict(), original.state_dict())


def test_ghost_bn_on_a_bare_layer_and_bad_sizes():
    bn = nn.BatchNorm1d(3)
    ghost_layer = ghost_bn(bn, 4)
    assert isinstance(ghost_layer, GhostBatchNorm) and ghost_layer.weight is bn.weight
    for bad in (1, 0, 2.5, True, "8"):
        with pytest.raises(UserError, match="ghost_size"):
            ghost_bn(bn_net(), bad)


def test_sam_on_a_ghost_model_counts_each_chunk_of_the_first_pass_only():
    model = ghost_bn(bn_net(), 4)
    x, y = batch(n=12)
    sam_step(rho=0.5)(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, F.cross_entropy)
    assert int(model[1].num_batches_tracked) == 3


# ----------------------------------------------------------------------------------------------
# Dynamic batch size schedules
# ----------------------------------------------------------------------------------------------


def test_switch_schedule():
    s = switch_schedule(256, 5000, 3)
    assert [s(e) for e in range(6)] == [256, 256, 256, 5000, 5000, 5000]
    assert [switch_schedule(32, 512, 0)(e) for e in range(2)] == [512, 512]
    assert s.protocol() == {"schedule": "switch", "small": 256, "large": 5000, "switch_epoch": 3}


def test_geometric_schedule_values():
    assert [geometric_schedule(32, 4096, 7)(e) for e in range(9)] == [32, 64, 128, 256, 512, 1024, 2048, 4096, 4096]
    assert [geometric_schedule(256, 5000, 1)(e) for e in range(3)] == [256, 5000, 5000]
    assert [geometric_schedule(100, 400, 2)(e) for e in range(3)] == [100, 200, 400]
    assert [geometric_schedule(64, 64, 3)(e) for e in range(4)] == [64] * 4
    assert [geometric_schedule(400, 100, 2)(e) for e in range(3)] == [400, 200, 100]


@settings(max_examples=60, deadline=None)
@given(small=st.integers(1, 10_000), large=st.integers(1, 10_000), epochs=st.integers(1, 40))
def test_geometric_schedule_properties(small, large, epochs):
    s = geometric_schedule(small, large, epochs)
    values = [s(e) for e in range(epochs + 3)]
    assert all(isinstance(v, int) for v in values)
    assert values[0] == small and values[epochs:] == [large] * 3
    assert all(min(small, large) <= v <= max(small, large) for v in values)
    step = 1 if large >= small else -1
    assert all(step * (b - a) >= 0 for a, b in zip(values, values[1:]))


def test_schedule_bad_arguments():
    with pytest.raises(UserError, match="small"):
        switch_schedule(0, 10, 2)
    with pytest.raises(UserError, match="epochs"):
        geometric_schedule(2, 10, 0)
    with pytest.raises(UserError, match="switch_epoch"):
        switch_schedule(2, 10, -1)
    with pytest.raises(ValueError, match="epoch"):
        geometric_schedule(2, 10, 3)(-1)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def test_registry_names_and_defaults():
    assert set(STEPS) == {"plain", "sam", "asam", "proximal", "fgsm"}
    assert make_step("plain") is sgd_step
    assert make_step("sam") == sam_step(rho=0.05)
    asam = make_step("asam")
    assert asam.adaptive and asam.rho == 0.5 and asam.eta == 0.01
    assert make_step("proximal") == proximal_step(lam=1e-3, inner_steps=3)
    assert make_step("fgsm", eps=0.1, clamp=[0, 1]).clamp == (0.0, 1.0)


def test_registry_errors_name_the_problem():
    with pytest.raises(UserError, match=r'remedy: unknown value .sma. \(did you mean "sam"\?\)'):
        make_step("sma")
    with pytest.raises(UserError, match=r"remedy sam: unknown option 'roh' \(did you mean \"rho\"\?\)"):
        make_step("sam", roh=0.1)
    with pytest.raises(UserError, match="remedy plain: unknown option 'rho'"):
        make_step("plain", rho=0.1)
    with pytest.raises(UserError, match="missing option 'eps'"):
        make_step("fgsm")
    for name, bad, option in [("sam", {"rho": -1}, "rho"), ("asam", {"eta": float("nan")}, "eta"),
                              ("fgsm", {"eps": -0.1}, "eps"), ("fgsm", {"eps": 0.1, "mix": 1.5}, "mix"),
                              ("proximal", {"inner_steps": 0}, "inner_steps"), ("proximal", {"lam": "big"}, "lam"),
                              ("fgsm", {"eps": 0.1, "clamp": (1, 0)}, "clamp"),
                              ("sam", {"adaptive": "yes"}, "adaptive")]:
        with pytest.raises(UserError, match=f"^remedy {name}: option {option} "):
            make_step(name, **bad)


# ----------------------------------------------------------------------------------------------
# Integration with the training loop
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options",
    [("plain", {}), ("sam", {}), ("asam", {}), ("proximal", {}), ("fgsm", {"eps": 0.05})],
)
@pytest.mark.parametrize("ghost", [False, True])
def test_each_step_trains_a_bn_model(name, options, ghost):
    data = toy_data()
    model = init_model("mlp", (6,), 3, 0, width=16, depth=2)
    if ghost:
        ghost_bn(model, 8)
    step = make_step(name, **options)
    result = train(model, data, None, TrainConfig(epochs=4, lr=1e-2), batch_size=16, step=step)
    losses = [row["train_loss"] for row in result.history]
    assert result.diverged_epoch is None and result.steps == 4 * 6
    assert losses[-1] < 0.8 * losses[0]
    for buffer_name, buffer in model.named_buffers():
        assert torch.isfinite(buffer.float()).all(), buffer_name
    expected_tracked = result.steps * (2 if ghost else 1)
    assert all(int(m.num_batches_tracked) == expected_tracked for m in model.modules() if is_batchnorm(m))
