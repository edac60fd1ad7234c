import math

import numpy as np
import pytest
import torch

from batchgap.landscape import evaluate, interpolate
from batchgap.landscape.interpolation import path_coefficients

from test_landscape_common import RaiseOnCall, assert_same_state, full_state, mlp, toy_data, train_briefly


@pytest.fixture(scope="module")
def pair():
    data = toy_data(n=80, seed=1)
    a = train_briefly(mlp(seed=1), data, seed=1)
    b = train_briefly(mlp(seed=2), data, steps=40, seed=2)
    return a, b, data, toy_data(n=30, seed=7)


@pytest.mark.parametrize("path", ["linear", "curvilinear"])
def test_endpoints_equal_each_models_evaluate_exactly(pair, path):
    a, b, train, test = pair
    res = interpolate(a, b, {"train": train, "test": test}, [0.0, 0.5, 1.0], path=path, bn="eval",
                      batch_size=32)
    for name, d in (("train", train), ("test", test)):
        ea, eb = evaluate(a, d, batch_size=32), evaluate(b, d, batch_size=32)
        assert res.curves[name].loss[0] == ea.loss and res.curves[name].accuracy[0] == ea.accuracy
        assert res.curves[name].loss[2] == eb.loss and res.curves[name].accuracy[2] == eb.accuracy
        assert res.curves[name].n == len(d[1])


def test_interior_point_equals_evaluate_of_the_mixed_model(pair):
    a, b, train, _ = pair
    alpha = -0.75
    res = interpolate(a, b, train, [alpha, 0.0], bn="recompute")
    mixed = mlp(seed=1)
    with torch.no_grad():
        for (n, p), pa, pb in zip(mixed.named_parameters(), a.parameters(), b.parameters()):
            p.copy_(alpha * pb + (1 - alpha) * pa)
    expected = evaluate(mixed, train, bn="recompute")
    assert res.loss[0] == pytest.approx(expected.loss, rel=1e-12)
    assert res.accuracy[0] == expected.accuracy


def test_curvilinear_coefficients_exact_at_integers_and_match_formula():
    assert path_coefficients(0.0, "curvilinear") == (1.0, 0.0)
    assert path_coefficients(1.0, "curvilinear") == (0.0, 1.0)
    assert path_coefficients(2.0, "curvilinear") == (-1.0, 0.0)
    assert path_coefficients(-1.0, "curvilinear") == (0.0, -1.0)
    ca, cb = path_coefficients(0.3, "curvilinear")
    assert ca == pytest.approx(math.cos(0.15 * math.pi)) and cb == pytest.approx(math.sin(0.15 * math.pi))
    assert path_coefficients(0.3, "linear") == (0.7, 0.3)


def test_default_bn_is_recompute_on_train_for_running_stats_and_recorded(pair):
    a, b, train, test = pair
    res = interpolate(a, b, {"train": train, "test": test})
    assert res.bn == "recompute" and res.bn_data.startswith("train")
    assert res.loss_fn == "mean cross-entropy"
    assert res.alphas.shape == (25,) and res.alphas[0] == -1.0 and res.alphas[-1] == 2.0
    assert res.curves["test"].loss.shape == (25,)
    # recompute on train also for the test curve: alpha = 0 equals evaluate(a, test, recompute on train)
    e = evaluate(a, test, bn="recompute", bn_data=train)
    assert res.curves["test"].loss[8] == e.loss  # alphas[8] == 0.0
    d = res.as_dict()
    assert isinstance(d["curves"]["test"]["loss"], list) and d["bn"] == "recompute"
    with pytest.raises(AttributeError):
        res.loss  # several sets


def test_default_bn_is_eval_without_running_stats():
    data = toy_data(n=40)
    a = train_briefly(mlp(track=False), data)
    b = train_briefly(mlp(track=False, seed=3), data, seed=3)
    res = interpolate(a, b, data, [0.0, 1.0])
    assert res.bn == "eval" and "batch statistics" in res.bn_description
    assert res.loss[0] == evaluate(a, data).loss and res.loss[1] == evaluate(b, data).loss


def test_models_restored_and_global_rng_untouched(pair):
    a, b, train, test = pair
    sa, sb, rng = full_state(a), full_state(b), torch.get_rng_state()
    interpolate(a, b, {"train": train, "test": test}, [-1.0, 0.0, 0.5, 2.0])
    with pytest.raises(RuntimeError, match="boom"):
        interpolate(a, b, train, [-1.0, 0.0, 0.5], loss_fn=RaiseOnCall(3), batch_size=16)
    assert_same_state(a, sa)
    assert_same_state(b, sb)
    assert torch.equal(rng, torch.get_rng_state())


def test_bad_arguments(pair):
    a, b, train, _ = pair
    with pytest.raises(ValueError, match="path"):
        interpolate(a, b, train, [0.0], path="spline")
    with pytest.raises(ValueError, match="contain 0"):
        interpolate(a, b, train, np.linspace(-1, 1, 4))
    with pytest.raises(ValueError, match="differ"):
        interpolate(a, mlp(hidden=(7,)), train, [0.0])
    with pytest.raises(ValueError, match="bn_data"):
        interpolate(a, b, {"x": train, "y": train}, [0.0])
