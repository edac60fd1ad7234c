"""The model registry: shapes, the paper's layer sizes, BN semantics, seeding, and bad input."""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchgap.errors import UserError
from batchgap.models import (
    BN_MODES,
    MODELS,
    ModelSpec,
    batch_norm,
    bn_mode,
    build_model,
    count_parameters,
    init_model,
    list_models,
)

BN = nn.modules.batchnorm._BatchNorm

# Each model's own data: (input shape of one example, number of classes).
DATA = {
    "F1": ((1, 28, 28), 10),
    "C1": ((3, 32, 32), 10),
    "C2": ((3, 32, 32), 10),
    "C3": ((3, 32, 32), 100),
    "C4": ((3, 32, 32), 100),
    "simplevgg": ((3, 32, 32), 10),
    "mlp": ((40,), 10),
    "cnn1d": ((40,), 10),
}


# One name per factory: C3/C4 share C1/C2's factories (asserted below), so tests of behaviour
# that only the factory decides skip them and keep the file fast.
DISTINCT = [n for i, n in enumerate(DATA) if MODELS[n].factory not in [MODELS[m].factory for m in list(DATA)[:i]]]
# The VGG-like nets are slow on a CPU: fewer examples per forward pass, and where a test is about
# behaviour rather than the data's shape, a smaller input and width.
N = {"C2": 2, "C4": 2, "simplevgg": 2}
SMALL = {"C2": ((3, 8, 8), {}), "simplevgg": ((3, 8, 8), {"width": 8})}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny forward passes on a shared 2-core machine: intra-op threads only add spin-waiting (3-5x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=8)
def _built(name, shape, k, bn="running", **options):
    """A seeded model shared by the tests that only look at it or run it forward (C2 is slow to build)."""
    return init_model(name, shape, k, seed=0, bn=bn, **options)


def _x(shape, n=4, seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _of_type(model, cls):
    return [m for m in model.modules() if isinstance(m, cls)]


def test_every_registered_model_has_test_data():
    assert set(DATA) == set(MODELS)


# ----------------------------------------------------------------------------------------------
# Every model: builds on its data, gives logits, honours bn
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, bn", [(n, bn) for n in DISTINCT for bn in BN_MODES]
                         + [(n, "running") for n in DATA if n not in DISTINCT])
def test_builds_and_gives_logits(name, bn):
    shape, k = DATA[name]
    model = _built(name, shape, k, bn=bn)
    n = N.get(name, 4)
    x = _x(shape, n)
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            out = model(x)
        assert out.shape == (n, k)
        assert torch.isfinite(out).all()
    assert isinstance(list(model.children())[-1], nn.Linear)  # logits, no softmax
    assert bn_mode(model) == bn
    if bn == "batch":
        assert not any(".bn." in n for n, _ in model.named_buffers())
    if bn == "none":
        assert not _of_type(model, BN)
    else:
        assert _of_type(model, BN)
        assert all(m.track_running_stats == (bn == "running") for m in _of_type(model, BN))


@pytest.mark.parametrize("name", DISTINCT)
def test_bn_batch_eval_output_depends_on_the_batch_and_running_does_not(name):
    """Example 0 evaluated beside example 1, then beside a very different example."""
    shape, k = DATA[name]
    shape, options = SMALL.get(name, (shape, {}))
    x, other = _x(shape, 2, seed=1), _x(shape, 1, seed=2) * 3 + 1
    outs = {}
    for bn in ("running", "batch"):
        model = init_model(name, shape, k, seed=0, bn=bn, **options).eval()
        with torch.no_grad():
            alone = model(x)[:1]
            mixed = model(torch.cat([x[:1], other]))[:1]
        outs[bn] = (alone, mixed)
    alone, mixed = outs["running"]
    assert torch.allclose(alone, mixed, atol=1e-5)
    alone, mixed = outs["batch"]
    assert (alone - mixed).abs().max() > 1e-3


@pytest.mark.parametrize("name", DISTINCT)
def test_bn_none_only_drops_the_bn_layers(name):
    """Same layer names with and without BN, minus the BN layers; parameter count drops by 2 per channel."""
    shape, k = DATA[name]
    with_bn = _built(name, shape, k, bn="running")
    without = _built(name, shape, k, bn="none")
    names = {n for n, _ in without.named_parameters()}
    assert names == {n for n, _ in with_bn.named_parameters() if ".bn." not in n}
    bn_params = sum(2 * m.num_features for m in _of_type(with_bn, BN))
    assert count_parameters(with_bn) - count_parameters(without) == bn_params > 0


def test_batch_norm_helper_and_bn_mode():
    assert isinstance(batch_norm(8, 2, "running"), nn.BatchNorm2d)
    assert isinstance(batch_norm(8, 1, "batch"), nn.BatchNorm1d)
    assert batch_norm(8, 1, "batch").running_mean is None
    assert batch_norm(8, 1, "none") is None
    assert bn_mode(nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False))) == "mixed"
    assert bn_mode(nn.Linear(2, 2)) == "none"


# ----------------------------------------------------------------------------------------------
# The paper's architectures
# ----------------------------------------------------------------------------------------------


def test_f1_layer_sizes_and_parameter_count():
    model = build_model("F1", (1, 28, 28), 10)
    linears = _of_type(model, nn.Linear)
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 512)] + [(512, 512)] * 4 + [(512, 10)]
    assert [m.num_features for m in _of_type(model, nn.BatchNorm1d)] == [512] * 5
    assert len(_of_type(model, nn.ReLU)) == 5
    by_hand = (784 * 512 + 512) + 4 * (512 * 512 + 512) + 5 * (2 * 512) + (512 * 10 + 10)
    assert count_parameters(model) == by_hand == 1_462_794


def test_f1_flattens_any_input_shape():
    model = build_model("F1", (3, 32, 32), 10).eval()
    assert _of_type(model, nn.Linear)[0].in_features == 3 * 32 * 32
    assert model(_x((3, 32, 32))).shape == (4, 10)


def _pool_outputs(model, x):
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
             for m in _of_type(model, nn.MaxPool2d)]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return shapes


@pytest.mark.parametrize("hw, after", [((32, 32), [(16, 16), (8, 8)]), ((28, 28), [(14, 14), (7, 7)]),
                                       ((31, 33), [(16, 17), (8, 9)])])
def test_c1_pooling_sizes_follow_keras_same(hw, after):
    model = build_model("C1", (3, *hw), 10)
    assert _pool_outputs(model, _x((3, *hw))) == [(64, *s) for s in after]
    h, w = after[-1]
    assert _of_type(model, nn.Linear)[0].in_features == 64 * h * w


def test_c1_layers_and_parameter_count():
    model = build_model("C1", (3, 32, 32), 10)
    convs = _of_type(model, nn.Conv2d)
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.padding) for m in convs] == [
        (3, 64, (5, 5), (2, 2)), (64, 64, (5, 5), (2, 2))]
    assert [(m.in_features, m.out_features) for m in _of_type(model, nn.Linear)] == [
        (4096, 384), (384, 192), (192, 10)]
    assert [m.p for m in _of_type(model, nn.Dropout)] == [0.5, 0.5]
    by_hand = ((3 * 25 * 64 + 64) + (64 * 25 * 64 + 64) + 2 * 128
               + (4096 * 384 + 384) + 2 * 384 + (384 * 192 + 192) + 2 * 192 + (192 * 10 + 10))
    assert count_parameters(model) == by_hand


def test_c1_pool_equals_keras_theano_zero_padded_pool_after_relu():
    """Theano's 'same' 3x3/2 pool pads one zero on each side; after a ReLU that equals MaxPool2d(3, 2, 1)."""
    x = F.relu(_x((64, 32, 32), n=2))
    theano = F.max_pool2d(F.pad(x, (1, 1, 1, 1), value=0.0), 3, 2)[..., :16, :16]
    assert torch.equal(nn.MaxPool2d(3, 2, padding=1)(x), theano)


def test_images_without_a_channel_axis_are_one_channel():
    model = build_model("C1", (28, 28), 10).eval()
    assert _of_type(model, nn.Conv2d)[0].in_channels == 1
    x = _x((28, 28))
    assert torch.equal(model(x), model(x.unsqueeze(1)))


def test_c2_is_a_vgg16_layout():
    model = _built("C2", (3, 32, 32), 10)
    convs = _of_type(model, nn.Conv2d)
    assert len(convs) == 13
    assert [m.out_channels for m in convs] == [64] * 2 + [128] * 2 + [256] * 3 + [512] * 6
    assert all(m.kernel_size == (3, 3) and m.padding == (1, 1) for m in convs)
    assert len(_of_type(model, nn.BatchNorm2d)) == 13
    assert _pool_outputs(model, _x((3, 32, 32), n=1)) == [(64, 16, 16), (128, 8, 8), (256, 4, 4),
                                                           (512, 2, 2), (512, 1, 1)]
    assert [(m.in_features, m.out_features) for m in _of_type(model, nn.Linear)] == [(512, 512), (512, 10)]
    assert not _of_type(model, nn.Dropout)


def test_c2_dropout_option_adds_the_official_dropouts():
    model = build_model("C2", (3, 32, 32), 10, dropout=True)
    assert [m.p for m in _of_type(model, nn.Dropout)] == [0.3] + [0.4] * 7 + [0.5, 0.5]
    plain = _built("C2", (3, 32, 32), 10)
    assert count_parameters(model) == count_parameters(plain)


def test_c2_takes_odd_sizes_like_keras_same():
    model = build_model("C2", (1, 28, 28), 10)
    assert [s[1:] for s in _pool_outputs(model, _x((1, 28, 28), n=1))] == [(14, 14), (7, 7), (4, 4), (2, 2), (1, 1)]


def test_c3_c4_are_c1_c2_under_the_paper_names():
    assert MODELS["C3"].factory is MODELS["C1"].factory
    assert MODELS["C4"].factory is MODELS["C2"].factory
    assert [MODELS[n].paper_name for n in ("F1", "C1", "C2", "C3", "C4")] == ["F1", "C1", "C2", "C3", "C4"]
    assert _of_type(build_model("C3", (3, 32, 32), 100), nn.Linear)[-1].out_features == 100


# ----------------------------------------------------------------------------------------------
# The seed's SimpleVGG and the MNIST-1D nets
# ----------------------------------------------------------------------------------------------


def test_simplevgg_default_and_width():
    model = build_model("simplevgg", (3, 32, 32), 10)
    convs = _of_type(model, nn.Conv2d)
    assert [m.out_channels for m in convs] == [64, 64, 128, 128, 256, 256]
    assert [(m.in_features, m.out_features) for m in _of_type(model, nn.Linear)] == [(256 * 4 * 4, 10)]
    small = build_model("simplevgg", (3, 32, 32), 10, width=16)
    assert [m.out_channels for m in _of_type(small, nn.Conv2d)] == [16, 16, 32, 32, 64, 64]
    assert _of_type(small, nn.Linear)[0].in_features == 64 * 4 * 4
    assert small.eval()(_x((3, 32, 32))).shape == (4, 10)


def test_simplevgg_seed_variant_has_the_seed_codes_size():
    model = build_model("simplevgg", (3, 32, 32), 10, convs=1, hidden=512)
    by_hand = ((3 * 9 * 64 + 64) + 128 + (64 * 9 * 128 + 128) + 256 + (128 * 9 * 256 + 256) + 512
               + (4096 * 512 + 512) + (512 * 10 + 10))
    assert count_parameters(model) == by_hand
    assert [m.p for m in _of_type(model, nn.Dropout)] == [0.5]


def test_mlp_default_is_the_default_studys_net():
    model = build_model("mlp", (40,), 10)
    assert [(m.in_features, m.out_features) for m in _of_type(model, nn.Linear)] == [
        (40, 256), (256, 256), (256, 256), (256, 10)]
    assert count_parameters(model) == (40 * 256 + 256) + 2 * (256 * 256 + 256) + 3 * 512 + (256 * 10 + 10)
    assert len(_of_type(build_model("mlp", (40,), 10, depth=0), nn.Linear)) == 1


def test_cnn1d_shapes_and_size():
    model = build_model("cnn1d", (40,), 10).eval()
    x = _x((40,))
    assert torch.equal(model(x), model(x.unsqueeze(1)))  # (N, 40) and (N, 1, 40) alike
    assert build_model("cnn1d", (1, 40), 10).eval()(x.unsqueeze(1)).shape == (4, 10)
    assert build_model("cnn1d", (2, 40), 10).eval()(_x((2, 40))).shape == (4, 10)
    assert 5_000 < count_parameters(model) < 100_000


# ----------------------------------------------------------------------------------------------
# Seeding
# ----------------------------------------------------------------------------------------------


def _equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["mlp", "C1", "cnn1d"])
def test_init_model_is_deterministic_per_seed_and_leaves_the_global_rng(name):
    shape, k = DATA[name]
    before = torch.get_rng_state()
    a = init_model(name, shape, k, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(100)  # whatever ran before must not matter
    b = init_model(name, shape, k, seed=3)
    c = init_model(name, shape, k, seed=4)
    assert _equal(a, b)
    assert not _equal(a, c)
    torch.manual_seed(3)
    assert _equal(a, build_model(name, shape, k))  # the same as seeding the global RNG yourself


def test_init_model_restores_the_rng_on_error():
    before = torch.get_rng_state()
    with pytest.raises(UserError):
        init_model("C1", (40,), 10, seed=0)
    assert torch.equal(torch.get_rng_state(), before)


# ----------------------------------------------------------------------------------------------
# Registry and bad input
# ----------------------------------------------------------------------------------------------


def test_registry_and_list_models():
    rows = list_models()
    assert [r[0] for r in rows] == list(MODELS)
    assert all(len(r) == 3 and all(isinstance(v, str) for v in r) for r in rows)
    assert dict((r[0], r[2]) for r in rows)["C4"] == "C4"
    assert dict((r[0], r[2]) for r in rows)["mlp"] == ""
    assert {s.input_kind for s in MODELS.values()} == {"vector", "image", "sequence"}
    assert MODELS["C2"].options == {"dropout": False}
    assert MODELS["mlp"].options == {"width": 256, "depth": 3}
    assert MODELS["F1"].options == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        MODELS["F1"].name = "F2"  # type: ignore[misc]
    assert all(isinstance(s, ModelSpec) and s.name == n for n, s in MODELS.items())


def _message(call):
    with pytest.raises(UserError) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_unknown_model():
    msg = _message(lambda: build_model("C5", (3, 32, 32), 10))
    assert "model" in msg and "'C5'" in msg and "simplevgg" in msg


def test_unknown_option_names_it_and_the_allowed_ones():
    msg = _message(lambda: build_model("simplevgg", (3, 32, 32), 10, widht=16))
    assert "widht" in msg and 'did you mean "width"' in msg and "convs, hidden, width" in msg
    msg = _message(lambda: build_model("F1", (784,), 10, width=16))
    assert "width" in msg and "none" in msg


def test_unknown_bn():
    msg = _message(lambda: build_model("mlp", (40,), 10, bn="batchnorm"))
    assert msg.startswith("bn:") and "'batchnorm'" in msg and "running" in msg
    with pytest.raises(UserError):
        batch_norm(4, 1, "Running")


def test_c1_on_vectors_is_a_user_error():
    msg = _message(lambda: build_model("C1", (40,), 10))
    assert "'C1'" in msg and "(40,)" in msg


@pytest.mark.parametrize("call, words", [
    (lambda: build_model("cnn1d", (3, 32, 32), 10), ["'cnn1d'", "(3, 32, 32)"]),
    (lambda: build_model("simplevgg", (3, 4, 4), 10), ["8x8"]),
    (lambda: build_model("mlp", (40,), 10, width="256"), ["width", "int"]),
    (lambda: build_model("C2", (3, 32, 32), 10, dropout=1), ["dropout", "bool"]),
    (lambda: build_model("mlp", (40,), 10, width=0), ["width", ">= 1"]),
    (lambda: build_model("mlp", (40,), 0), ["num_classes"]),
    (lambda: build_model("mlp", (0,), 10), ["input shape"]),
    (lambda: build_model("mlp", (), 10), ["input shape"]),
])
def test_other_bad_input(call, words):
    msg = _message(call)
    assert all(w in msg for w in words), msg
