"""Stacked training of several seeds equals the sequential runs, seed by seed, files included."""
import json

import pytest
import torch

from batchgap.config import TrainConfig
from batchgap.data import make_augment
from batchgap.data.base import TensorData
from batchgap.models import init_model
from batchgap.stacked import stackable, train_stacked
from batchgap.train import read_history, train

SEEDS = [0, 3, 7]
TOL = 1e-5


def toy_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return TensorData(x, y)


def mlp(seed, **kw):
    return init_model("mlp", (6,), 3, seed, width=16, depth=2, **kw)


def assert_same_model(a, b, tol=TOL):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if sa[k].is_floating_point():
            torch.testing.assert_close(sa[k], sb[k], atol=tol, rtol=tol, msg=k)
        else:
            assert torch.equal(sa[k], sb[k]), k  # num_batches_tracked


def assert_same_history(ha, hb, tol=TOL):
    assert len(ha) == len(hb)
    for ra, rb in zip(ha, hb):
        assert ra.keys() == rb.keys()
        for key in ra:
            if key != "time_s":
                assert ra[key] == pytest.approx(rb[key], rel=tol, abs=tol), key


@pytest.mark.parametrize("cfg", [
    TrainConfig(epochs=3),
    TrainConfig(epochs=2, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3, warmup_epochs=1.0),
], ids=["adam", "sgd-momentum-warmup"])
def test_stacked_equals_sequential_per_seed(cfg):
    data, test = toy_data(), toy_data(40, seed=1)
    seq = [mlp(s) for s in SEEDS]
    seq_res = [train(m, data, test, cfg, 16, seed=s) for m, s in zip(seq, SEEDS)]
    stk = [mlp(s) for s in SEEDS]
    stk_res = train_stacked(stk, data, test, cfg, 16, SEEDS)
    for a, b, ra, rb in zip(seq, stk, seq_res, stk_res):
        assert_same_model(a, b)  # parameters and BN running statistics
        assert_same_history(ra.history, rb.history)
        assert (ra.steps, ra.epochs_done, ra.lr) == (rb.steps, rb.epochs_done, rb.lr)


def test_stacked_conv_net_with_augmentation_equals_sequential():
    # convolutions run under vmap (equal to rounding, not bitwise); without BatchNorm no flat bias
    # direction turns that rounding into Adam steps, so 1e-5 holds
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(24, 3, 8, 8, generator=g), torch.randint(0, 4, (24,), generator=g))
    build = lambda s: init_model("simplevgg", (3, 8, 8), 4, s, bn="none", width=2, convs=1)  # noqa: E731
    aug = make_augment("crop-flip")
    cfg = TrainConfig(epochs=2)
    seq = [build(s) for s in SEEDS[:2]]
    for m, s in zip(seq, SEEDS[:2]):
        train(m, data, None, cfg, 8, seed=s, augment=aug)
    stk = [build(s) for s in SEEDS[:2]]
    train_stacked(stk, data, None, cfg, 8, SEEDS[:2], augment=aug)
    for a, b in zip(seq, stk):
        assert_same_model(a, b)


def test_files_match_sequential_and_a_stacked_checkpoint_resumes_one_run_at_a_time(tmp_path):
    data = toy_data()
    full = TrainConfig(epochs=4)
    seq = [mlp(s) for s in SEEDS]
    for m, s in zip(seq, SEEDS):
        train(m, data, data, full, 16, seed=s, run_dir=tmp_path / f"seq{s}")
    # a stacked group stopped after 2 of 4 epochs (as if killed), then each run resumed by train()
    part = [mlp(s) for s in SEEDS]
    dirs = [tmp_path / f"stk{s}" for s in SEEDS]
    train_stacked(part, data, data, TrainConfig(epochs=2), 16, SEEDS, run_dirs=dirs)
    for s, d in zip(SEEDS, dirs):
        resumed = mlp(s)  # rebuilt from x0, as a fresh process would
        res = train(resumed, data, data, full, 16, seed=s, run_dir=d)
        assert res.resumed_from_epoch == 2
        ref = seq[SEEDS.index(s)]
        assert_same_model(ref, resumed)
        assert_same_history(read_history(tmp_path / f"seq{s}"), read_history(d))
        saved = torch.load(d / "model.pt", weights_only=True)
        assert all(torch.equal(saved[k], v) for k, v in resumed.state_dict().items())


def test_a_stacked_group_resumes_stacked(tmp_path):
    data = toy_data()
    dirs = [tmp_path / f"r{s}" for s in SEEDS]
    ref = [mlp(s) for s in SEEDS]
    train_stacked(ref, data, None, TrainConfig(epochs=3), 16, SEEDS)
    part = [mlp(s) for s in SEEDS]
    train_stacked(part, data, None, TrainConfig(epochs=1), 16, SEEDS, run_dirs=dirs, keep_epochs=(0, 1))
    for s, d in zip(SEEDS, dirs):
        kept = torch.load(d / "iterates" / "epoch-0.pt", weights_only=True)
        assert all(torch.equal(kept[k], v) for k, v in mlp(s).state_dict().items())
        assert (d / "iterates" / "epoch-1.pt").exists()
    resumed = [mlp(s) for s in SEEDS]
    res = train_stacked(resumed, data, None, TrainConfig(epochs=3), 16, SEEDS, run_dirs=dirs)
    assert [r.resumed_from_epoch for r in res] == [1, 1, 1]
    for a, b in zip(ref, resumed):
        assert_same_model(a, b, tol=0)
    assert [h["epoch"] for h in read_history(dirs[0])] == [1, 2, 3]
    # a finished checkpoint is taken as it is, by train() too
    again = mlp(SEEDS[0])
    r = train(again, data, None, TrainConfig(epochs=3), 16, seed=SEEDS[0], run_dir=dirs[0])
    assert r.epochs_done == 3 and r.steps == res[0].steps
    assert_same_model(again, resumed[0], tol=0)


def test_checkpoints_at_different_epochs_are_refused(tmp_path):
    data = toy_data()
    train(mlp(0), data, None, TrainConfig(epochs=1), 16, seed=0, run_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="different epochs"):
        train_stacked([mlp(0), mlp(1)], data, None, TrainConfig(epochs=2), 16, [0, 1],
                      run_dirs=[tmp_path / "a", tmp_path / "b"])


def test_a_diverging_seed_stops_alone():
    data = toy_data()
    cfg = TrainConfig(epochs=4, lr=1e3, optimizer="sgd", momentum=0.0)
    build = lambda s: init_model("mlp", (6,), 3, s, bn="none", width=16, depth=2)  # noqa: E731
    seq = [build(s) for s in SEEDS]
    seq_res = [train(m, data, data, cfg, 16, seed=s) for m, s in zip(seq, SEEDS)]
    assert any(r.diverged_epoch for r in seq_res)
    stk = [build(s) for s in SEEDS]
    stk_res = train_stacked(stk, data, data, cfg, 16, SEEDS)
    for ra, rb in zip(seq_res, stk_res):
        assert (ra.diverged_epoch, ra.epochs_done, ra.steps) == (rb.diverged_epoch, rb.epochs_done, rb.steps)
        assert json.dumps([h["epoch"] for h in ra.history]) == json.dumps([h["epoch"] for h in rb.history])


def test_what_cannot_be_stacked():
    assert stackable(mlp(0)) is None
    assert "dropout" in stackable(init_model("C1", (3, 8, 8), 10, 0))
    assert "parameters" in stackable(mlp(0), max_params=10)
    with pytest.raises(ValueError, match="dropout"):
        train_stacked([init_model("C1", (3, 8, 8), 10, s) for s in (0, 1)], TensorData(torch.zeros(4, 3, 8, 8), torch.zeros(4).long()),
                      None, TrainConfig(epochs=1), 2, [0, 1])
    with pytest.raises(ValueError, match="architecture"):
        train_stacked([mlp(0), init_model("mlp", (6,), 3, 1, width=8, depth=2)], toy_data(), None,
                      TrainConfig(epochs=1), 16, [0, 1])
