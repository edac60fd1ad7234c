import numpy as np
import pytest
import torch
from torch import nn

from batchgap.landscape import evaluate, filter_normalized_direction, loss_curve, loss_surface

from test_landscape_common import RaiseOnCall, assert_same_state, full_state, mlp, toy_data, train_briefly


@pytest.fixture(scope="module")
def trained():
    data = toy_data(n=60, seed=3)
    return train_briefly(mlp(seed=3, dropout=0.3), data, seed=3), data


# -- filter normalization --------------------------------------------------------------------------

def test_every_row_and_channel_has_its_weights_norm_and_1d_parameters_are_zero():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * 3 * 3, 5), nn.ConvTranspose1d(1, 3, 2)).double()
    d = filter_normalized_direction(model, seed=1)
    assert list(d) == [n for n, _ in model.named_parameters()]
    w = dict(model.named_parameters())
    conv, lin, convt = d["0.weight"], d["4.weight"], d["5.weight"]
    torch.testing.assert_close(conv.flatten(1).norm(dim=1), w["0.weight"].detach().flatten(1).norm(dim=1))
    torch.testing.assert_close(lin.norm(dim=1), w["4.weight"].detach().norm(dim=1))  # per row, not per layer
    torch.testing.assert_close(convt.transpose(0, 1).flatten(1).norm(dim=1),
                               w["5.weight"].detach().transpose(0, 1).flatten(1).norm(dim=1))
    for name in ("0.bias", "1.weight", "1.bias", "4.bias", "5.bias"):
        assert torch.count_nonzero(d[name]) == 0


def test_filter_policy_for_1d_parameters_and_no_bn_selection():
    model = mlp()
    d = filter_normalized_direction(model, bias_bn="filter", seed=4)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            torch.testing.assert_close(d[name].abs(), p.detach().abs())
    d = filter_normalized_direction(model, params="no-bn", bias_bn="filter", seed=4)
    assert torch.count_nonzero(d["1.weight"]) == 0 and torch.count_nonzero(d["0.bias"]) > 0
    with pytest.raises(ValueError, match="bias_bn"):
        filter_normalized_direction(model, bias_bn="weights")


def test_direction_seeds_and_global_rng():
    model = mlp()
    rng = torch.get_rng_state()
    a = filter_normalized_direction(model, seed=5)
    b = filter_normalized_direction(model, generator=torch.Generator().manual_seed(5))
    c = filter_normalized_direction(model, seed=6)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])
    assert torch.equal(rng, torch.get_rng_state())
    assert "seeded 5" in a.protocol and "caller's" in b.protocol


@pytest.mark.parametrize("bias_bn", ["zero", "filter"])
def test_relu_rescaling_leaves_filter_normalized_curve_unchanged(bias_bn):
    data = toy_data(n=50, seed=2)
    model = train_briefly(mlp(bn=False, hidden=(7, 6)), data)
    scaled = mlp(bn=False, hidden=(7, 6))
    c = 3.7
    with torch.no_grad():
        for (n, p), q in zip(scaled.named_parameters(), model.parameters()):
            p.copy_(q * (c if n.startswith("0.") else 1 / c if n == "2.weight" else 1.0))
    alphas = np.linspace(-1, 1, 9)
    a = loss_curve(model, filter_normalized_direction(model, seed=9, bias_bn=bias_bn), data, alphas)
    b = loss_curve(scaled, filter_normalized_direction(scaled, seed=9, bias_bn=bias_bn), data, alphas)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-10)
    np.testing.assert_array_equal(a.accuracy, b.accuracy)
    assert np.ptp(a.loss) > 1e-2  # the curve is not flat, so the check has teeth


# -- curves and surfaces ---------------------------------------------------------------------------

@pytest.mark.parametrize("bn", ["eval", "batch", "recompute"])
def test_curve_centre_is_evaluate_and_fast_equals_loop(trained, bn):
    model, data = trained
    d = filter_normalized_direction(model, seed=1)
    alphas = np.linspace(-1, 1, 7)
    slow = loss_curve(model, d, data, alphas, batch_size=16, bn=bn, fast=False)
    assert slow.method.startswith("one evaluate")
    for chunk, words in ((None, "one point at a time"), (3, "vmap over 3 points")):
        fast = loss_curve(model, d, data, alphas, batch_size=16, bn=bn, chunk=chunk)
        assert words in fast.method if bn != "recompute" else fast.method == slow.method
        np.testing.assert_allclose(fast.loss, slow.loss, rtol=1e-12, atol=0)
        np.testing.assert_array_equal(fast.accuracy, slow.accuracy)
    centre = evaluate(model, data, batch_size=16, bn=bn)
    assert slow.loss[3] == centre.loss and slow.accuracy[3] == centre.accuracy
    assert fast.loss[3] == pytest.approx(centre.loss, rel=1e-13)
    assert fast.n == len(data[1]) and fast.bn == bn


def test_curve_points_are_fresh_from_the_centre(trained):
    model, data = trained
    d = filter_normalized_direction(model, seed=2)
    at_half = loss_curve(model, d, data, [0.5], fast=False).loss[0]
    moved = mlp(seed=3, dropout=0.3)
    moved.load_state_dict(model.state_dict())
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p.add_(0.5 * d[n])
    assert at_half == evaluate(moved, data).loss
    # the same point in a longer grid, visited after other points, gives the same number
    grid = loss_curve(model, d, data, [-1.0, 1.0, 0.5, 0.0], fast=False).loss
    assert grid[2] == at_half


def test_surface_non_square_shape_beta0_column_is_the_curve_and_fast_equals_loop(trained):
    model, data = trained
    d1, d2 = filter_normalized_direction(model, seed=1), filter_normalized_direction(model, seed=2)
    alphas, betas = np.linspace(-1, 1, 5), np.array([-0.5, 0.0, 0.5, 1.0])
    s = loss_surface(model, d1, d2, data, alphas, betas, batch_size=16, chunk=3)
    assert s.loss.shape == (5, 4) and s.accuracy.shape == (5, 4)
    curve = loss_curve(model, d1, data, alphas, batch_size=16)
    np.testing.assert_allclose(s.loss[:, 1], curve.loss, rtol=1e-13)
    along_d2 = loss_curve(model, d2, data, betas, batch_size=16)
    np.testing.assert_allclose(s.loss[2, :], along_d2.loss, rtol=1e-13)
    slow = loss_surface(model, d1, d2, data, alphas, betas, batch_size=16, fast=False)
    np.testing.assert_allclose(s.loss, slow.loss, rtol=1e-12)
    assert isinstance(s.as_dict()["loss"][0], list) and len(s.as_dict()["betas"]) == 4


def test_direction_forms_and_bad_input(trained):
    model, data = trained
    d = filter_normalized_direction(model, seed=1)
    as_list = [d[n] for n, _ in model.named_parameters()]
    as_flat = torch.cat([t.reshape(-1) for t in as_list])
    a = loss_curve(model, d, data, [0.0, 0.3]).loss
    np.testing.assert_array_equal(a, loss_curve(model, as_list, data, [0.0, 0.3]).loss)
    np.testing.assert_array_equal(a, loss_curve(model, as_flat, data, [0.0, 0.3]).loss)
    with pytest.raises(ValueError, match="contain 0"):
        loss_curve(model, d, data, np.linspace(-1, 1, 10))
    with pytest.raises(ValueError, match="not among"):
        loss_curve(model, {"nope": torch.zeros(1)}, data, [0.0])
    with pytest.raises(ValueError, match="bn"):
        loss_curve(model, d, data, [0.0], bn="train")


@pytest.mark.parametrize("fast", [True, False])
def test_model_restored_also_on_error_and_rng_untouched(trained, fast):
    model, data = trained
    d = filter_normalized_direction(model, seed=1)
    before, rng = full_state(model), torch.get_rng_state()
    loss_surface(model, d, d, data, [-1, 0, 1], [0, 1], bn="batch", fast=fast)
    loss_curve(model, d, data, [-1, 0, 1], bn="recompute", fast=fast)
    with pytest.raises(RuntimeError, match="boom"):
        loss_curve(model, d, data, [-1, 0, 1], loss_fn=RaiseOnCall(3), batch_size=16, fast=fast)
    assert_same_state(model, before)
    assert torch.equal(rng, torch.get_rng_state())


def test_fast_path_reads_a_one_shot_stream_of_batches_once(trained):
    model, data = trained
    d = filter_normalized_direction(model, seed=1)
    x, y = data
    stream = ((x[s : s + 16], y[s : s + 16]) for s in range(0, len(y), 16))  # a generator: one pass only
    from_stream = loss_curve(model, d, stream, [-0.5, 0.0, 0.5])
    np.testing.assert_allclose(from_stream.loss, loss_curve(model, d, data, [-0.5, 0.0, 0.5], batch_size=16).loss,
                               rtol=1e-13)
    assert from_stream.n == len(y)
