"""The training loop: learning-rate rules, determinism, resume, divergence, files."""
import json
import math

import pytest
import torch
from torch import nn

from batchgap.config import TrainConfig
from batchgap.data.base import TensorData
from batchgap.models import init_model
from batchgap.train import lr_at, read_history, scaled_lr, train


def toy_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return TensorData(x, y)


def model(seed=0):
    return init_model("mlp", (6,), 3, seed, width=16, depth=2)


def params(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


@pytest.mark.parametrize("rule, expected", [("none", 1e-3), ("sqrt", 1e-3 * 4), ("linear", 1e-3 * 16)])
def test_lr_scaling_rules(rule, expected):
    cfg = TrainConfig(lr=1e-3, lr_rule=rule, base_batch_size=256)
    assert scaled_lr(cfg, 4096) == pytest.approx(expected)


def test_warmup_ramps_linearly_to_the_peak():
    lrs = [lr_at(s, 0.8, 4) for s in range(6)]
    assert lrs == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
    assert lr_at(0, 0.8, 0) == 0.8


def test_optimizer_sees_the_warmup_schedule(tmp_path):
    cfg = TrainConfig(epochs=2, lr=0.01, warmup_epochs=1.0, eval_every=1)
    data = toy_data()
    res = train(model(), data, None, cfg, batch_size=32, run_dir=tmp_path)
    # 3 steps per epoch; the lr logged after epoch 1 is the last warmup step's, after epoch 2 the peak
    assert res.steps_per_epoch == 3 and res.steps == 6
    assert [h["lr"] for h in res.history] == pytest.approx([0.01, 0.01])
    res2 = train(model(), data, None, TrainConfig(epochs=1, lr=0.01, warmup_epochs=2.0), batch_size=32)
    assert res2.history[0]["lr"] == pytest.approx(0.01 * 3 / 6)


def test_same_seed_same_weights_bitwise_and_global_rng_untouched():
    data = toy_data()
    cfg = TrainConfig(epochs=2)
    state = torch.get_rng_state()
    a, b = model(), model()
    train(a, data, data, cfg, batch_size=16, seed=5)
    train(b, data, data, cfg, batch_size=16, seed=5)
    assert torch.equal(params(a), params(b))
    assert torch.equal(torch.get_rng_state(), state)
    c = model()
    train(c, data, data, cfg, batch_size=16, seed=6)
    assert not torch.equal(params(a), params(c))


def test_dropout_randomness_is_seeded_too():
    data = toy_data()
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))
    a, b = net(), net()
    torch.manual_seed(123)
    train(a, data, None, TrainConfig(epochs=2), batch_size=16, seed=1)
    torch.manual_seed(999)  # a different global state before the call must not matter
    train(b, data, None, TrainConfig(epochs=2), batch_size=16, seed=1)
    assert torch.equal(params(a), params(b))


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path):
    data = toy_data()
    full = model()
    train(full, data, data, TrainConfig(epochs=4), batch_size=16, seed=3, run_dir=tmp_path / "full")
    part = model()
    train(part, data, data, TrainConfig(epochs=2), batch_size=16, seed=3, run_dir=tmp_path / "part")
    resumed = model()  # a fresh process would build the model from x0 again
    res = train(resumed, data, data, TrainConfig(epochs=4), batch_size=16, seed=3, run_dir=tmp_path / "part")
    assert res.resumed_from_epoch == 2
    assert torch.equal(params(full), params(resumed))
    assert [h["epoch"] for h in read_history(tmp_path / "part")] == [1, 2, 3, 4]
    a = [h["test_loss"] for h in read_history(tmp_path / "full")]
    b = [h["test_loss"] for h in read_history(tmp_path / "part")]
    assert a == b


def test_files_written(tmp_path):
    data = toy_data()
    m = model()
    train(m, data, data, TrainConfig(epochs=2, eval_every=2), batch_size=32, run_dir=tmp_path)
    hist = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert "test_accuracy" not in hist[0] and 0 <= hist[1]["test_accuracy"] <= 1
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    assert not list(tmp_path.glob(".*.tmp"))


def test_divergence_is_detected_and_stops_training():
    data = toy_data()
    m = init_model("mlp", (6,), 3, 0, bn="none", width=16, depth=2)  # BN would keep the loss finite
    res = train(m, data, data, TrainConfig(epochs=5, lr=1e6, optimizer="sgd", momentum=0.0), batch_size=16, seed=0)
    assert res.diverged_epoch is not None and res.diverged_epoch <= 5
    assert res.epochs_done == res.diverged_epoch
    assert not math.isfinite(res.history[-1]["batch_loss"])


def test_last_incomplete_batch_is_dropped():
    data = toy_data(n=100)
    res = train(model(), data, None, TrainConfig(epochs=1), batch_size=30)
    assert res.steps_per_epoch == 3 and res.steps == 3


def test_batch_size_larger_than_data_is_refused():
    with pytest.raises(ValueError, match="batch_size"):
        train(model(), toy_data(n=10), None, TrainConfig(epochs=1), batch_size=11)


def test_training_learns_the_toy_problem():
    data = toy_data(n=256)
    m = model()
    res = train(m, data, data, TrainConfig(epochs=15, lr=3e-3), batch_size=16)
    assert res.history[-1]["train_accuracy"] > 0.9
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]


def test_batch_schedule_changes_the_batch_size_per_epoch(tmp_path):
    from batchgap.remedies import switch_schedule

    data = toy_data(n=96)
    res = train(model(), data, None, TrainConfig(epochs=3), batch_size=switch_schedule(8, 32, 2), run_dir=tmp_path)
    assert [h["batch_size"] for h in res.history] == [8, 8, 32]
    assert res.steps == 12 + 12 + 3 and res.batch_size == 32


def test_kept_iterates_are_the_weights_after_those_epochs(tmp_path):
    data = toy_data()
    x0 = model()
    start = {k: v.clone() for k, v in x0.state_dict().items()}
    train(x0, data, None, TrainConfig(epochs=3), batch_size=16, seed=2, run_dir=tmp_path / "a", keep_epochs=(0, 2))
    assert sorted(p.name for p in (tmp_path / "a" / "iterates").glob("*.pt")) == ["epoch-0.pt", "epoch-2.pt"]
    e0 = torch.load(tmp_path / "a" / "iterates" / "epoch-0.pt", weights_only=True)
    assert all(torch.equal(e0[k], start[k]) for k in start)
    two = model()
    train(two, data, None, TrainConfig(epochs=2), batch_size=16, seed=2)
    e2 = torch.load(tmp_path / "a" / "iterates" / "epoch-2.pt", weights_only=True)
    assert all(torch.equal(e2[k], v) for k, v in two.state_dict().items())


# ------------------------------------------------------------------ the chain step (batchgap.chainstep)
def _history(res):
    return [{k: v for k, v in h.items() if k != "time_s"} for h in res.history]


def _buffers(m):
    return [b.clone() for b in m.buffers()]


def _autograd_train(monkeypatch, *args, **kwargs):
    return train(*args, **kwargs, fast_step=False)


@pytest.mark.parametrize("case", [
    dict(cfg=TrainConfig(epochs=3), bs=16, net={}),
    dict(cfg=TrainConfig(epochs=2, lr=0.01, warmup_epochs=1.5, weight_decay=1e-3), bs=13, net={}),
    dict(cfg=TrainConfig(epochs=2, optimizer="sgd", momentum=0.9, weight_decay=1e-4), bs=16, net={}),
    dict(cfg=TrainConfig(epochs=2), bs=16, net={"bn": "batch"}),
    dict(cfg=TrainConfig(epochs=2), bs=16, net={"bn": "none"}),
    dict(cfg=TrainConfig(epochs=2), bs=16, net={"depth": 0}),
    dict(cfg=TrainConfig(epochs=3), bs="schedule", net={}),
    dict(cfg=TrainConfig(epochs=2), bs=16, net={}, unfused=True),
    dict(cfg=TrainConfig(epochs=3, weight_decay=1e-3), bs=16, net={"width": 20}),  # sizes off the vector width
])
@pytest.mark.parametrize("threads", [1, 2])
def test_chain_step_is_bitwise_the_autograd_step(monkeypatch, case, threads):
    import batchgap.chainstep as chainstep_mod
    import batchgap.train as train_mod
    from batchgap.devices import num_threads
    from batchgap.remedies import switch_schedule

    if case.get("unfused"):
        monkeypatch.setattr(train_mod, "FUSED_OPTIMIZER", False)
    calls = []

    class Spy(chainstep_mod.ChainStep):
        def __call__(self, x, y):
            calls.append(len(y))
            return super().__call__(x, y)

    monkeypatch.setattr(chainstep_mod, "ChainStep", Spy)
    bs = switch_schedule(8, 32, 2) if case["bs"] == "schedule" else case["bs"]
    data = toy_data()
    with num_threads(threads):
        a = init_model("mlp", (6,), 3, 0, **{"width": 16, "depth": 2, **case["net"]})
        ra = train(a, data, data, case["cfg"], batch_size=bs, seed=4)
        b = init_model("mlp", (6,), 3, 0, **{"width": 16, "depth": 2, **case["net"]})
        steps = len(calls)
        rb = _autograd_train(monkeypatch, b, data, data, case["cfg"], batch_size=bs, seed=4)
    assert steps == ra.steps and len(calls) == steps  # every step of the first run took the chain step
    assert torch.equal(params(a), params(b))
    assert all(torch.equal(u, v) for u, v in zip(_buffers(a), _buffers(b)))  # BN running statistics, counters
    assert _history(ra) == _history(rb)
    assert ra.step_kinds == ["chainstep"] and rb.step_kinds == ["autograd"]  # each run records its step


def test_chain_step_runs_for_mlps_only():
    import torch.nn.functional as F

    from batchgap.chainstep import ChainStep
    from batchgap.train import make_optimizer

    def built(m, loss=F.cross_entropy):
        return ChainStep.build(m, make_optimizer(m, TrainConfig(), 1e-3), loss) is not None

    assert built(model())
    assert built(init_model("mlp", (6,), 3, 0, bn="none", width=8, depth=0))
    assert not built(model(), loss=lambda out, y: F.cross_entropy(out, y))
    assert not built(nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3)))
    assert not built(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)))
    assert not built(init_model("cnn1d", (40,), 10, 0, width=4))
    hooked = model()
    hooked[1].register_forward_hook(lambda *a: None)
    assert not built(hooked)
    frozen = model()
    frozen[1].linear.weight.requires_grad_(False)
    assert not built(frozen)
    shared = nn.Linear(8, 8)
    assert not built(nn.Sequential(nn.Linear(6, 8), shared, nn.ReLU(), shared, nn.Linear(8, 3)))
    assert built(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)))


def test_chain_step_hands_the_model_back_as_it_came():
    data = toy_data()
    m = model()
    train(m, data, None, TrainConfig(epochs=1), batch_size=16)
    storages = {p.untyped_storage().data_ptr() for p in m.parameters()}
    assert len(storages) == len(list(m.parameters()))  # each parameter its own storage again
    assert all(p.grad is not None and p.grad.shape == p.shape for p in m.parameters())  # the last step's


@pytest.mark.parametrize("first_fast", [True, False])
def test_resume_across_the_two_steps_equals_an_uninterrupted_run(tmp_path, monkeypatch, first_fast):
    """A checkpoint of one step kind resumed by the other: the optimizer state they write is the same."""
    data = toy_data()
    full = model()
    train(full, data, data, TrainConfig(epochs=4), batch_size=16, seed=3)
    train(model(), data, data, TrainConfig(epochs=2), batch_size=16, seed=3, run_dir=tmp_path, fast_step=first_fast)
    resumed = model()
    res = train(resumed, data, data, TrainConfig(epochs=4), batch_size=16, seed=3, run_dir=tmp_path,
                fast_step=not first_fast)
    assert res.resumed_from_epoch == 2
    assert torch.equal(params(full), params(resumed))
    kinds = ["chainstep", "autograd"]
    assert res.step_kinds == (kinds if first_fast else kinds[::-1])  # the record keeps both, in order


@pytest.mark.parametrize("version", ["2.14.0", "3.0.0+cpu", "2.1.2"])
def test_an_untested_torch_trains_with_autograd_and_says_so(monkeypatch, version):
    """On a torch its bitwise tests did not run on, the chain step is not built: autograd runs (the same
    numbers, as it is the reference) and the result records it."""
    import torch.nn.functional as F

    import batchgap.chainstep as chainstep_mod
    from batchgap.train import make_optimizer

    data = toy_data()
    fast = model()
    rf = train(fast, data, data, TrainConfig(epochs=2), batch_size=16, seed=5)
    assert rf.step_kinds == ["chainstep"]  # on the tested torch (2.13.x), the chain step
    built = []

    def refuse(self, *a):
        built.append(a)
        raise AssertionError("a chain step was built on an untested torch")

    monkeypatch.setattr(chainstep_mod.ChainStep, "__init__", refuse)
    monkeypatch.setattr(torch, "__version__", version)
    assert not chainstep_mod.tested()
    m = model()
    assert chainstep_mod.build(m, make_optimizer(m, TrainConfig(), 1e-3), F.cross_entropy) is None
    slow = model()
    rs = train(slow, data, data, TrainConfig(epochs=2), batch_size=16, seed=5)
    assert rs.step_kinds == ["autograd"] and not built
    assert torch.equal(params(fast), params(slow))


def test_the_tested_torch_versions_are_matched_on_major_and_minor():
    from batchgap.chainstep import TESTED_TORCH, tested

    assert all(tested(f"{v}.0") and tested(f"{v}.1+cpu") and tested(f"{v}.0a0+git1234") for v in TESTED_TORCH)
    assert tested("2.13.0") and tested("2.13.1+cpu")  # the release the bitwise tests ran on
    assert not tested("2.12.1") and not tested("2.130.0") and not tested("12.13.0") and not tested("nightly")


def test_chain_step_writes_the_files_the_autograd_step_writes(tmp_path, monkeypatch):
    data = toy_data()
    cfg = TrainConfig(epochs=2)
    train(model(), data, data, cfg, batch_size=16, seed=1, run_dir=tmp_path / "a", keep_epochs=(1, 2))
    _autograd_train(monkeypatch, model(), data, data, cfg, batch_size=16, seed=1, run_dir=tmp_path / "b",
                    keep_epochs=(1, 2))
    for name in ("model.pt", "iterates/epoch-1.pt", "iterates/epoch-2.pt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    sa = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    for k, v in sb["optimizer"]["state"].items():
        assert all(torch.equal(v[n], sa["optimizer"]["state"][k][n]) for n in v)
    assert all(torch.equal(v, sa["model"][k]) for k, v in sb["model"].items())


@pytest.mark.parametrize("world, rank", [(1, 0), (2, 0), (2, 1), (4, 3)])
@pytest.mark.parametrize("augmented", [False, True])
def test_batches_are_the_per_step_slices(monkeypatch, world, rank, augmented):
    """Gathered a chunk of batches at a time (a tiny chunk here), the batches of an epoch are the ones
    that indexing the data step by step gives, each worker's share of each, augmented in the same order."""
    import batchgap.train as train_mod

    monkeypatch.setattr(train_mod, "GATHER_BYTES", 300)  # a few batches per chunk
    data = toy_data(n=100)
    bs = 12
    local = bs // world
    augment = (lambda x, g: x + torch.rand(x.shape, generator=g)) if augmented else None
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    got = list(train_mod._batches(data, perm, bs, local, rank, augment, g1))
    assert len(got) == 100 // bs
    mine = slice(rank * local, (rank + 1) * local)
    for b, (x, y) in enumerate(got):
        idx = perm[b * bs : (b + 1) * bs]
        if augment is None:
            idx = idx[mine]
        ex, ey = data.x[idx], data.y[idx]
        if augment is not None:
            ex, ey = augment(ex, g2)[mine], ey[mine]
        assert torch.equal(x, ex) and torch.equal(y, ey)


@pytest.mark.parametrize("layers", [
    lambda: [nn.ReLU(), nn.BatchNorm1d(6), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)],
    lambda: [nn.Flatten(), nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8, momentum=None), nn.ReLU(),
             nn.Sequential(nn.Identity(), nn.Linear(8, 3))],
    lambda: [nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(), nn.Linear(8, 3), nn.ReLU()],
])
def test_chain_step_equals_autograd_on_other_chains(monkeypatch, layers):
    data = toy_data()

    def net():
        torch.manual_seed(0)
        return nn.Sequential(*layers())

    a, b = net(), net()
    ra = train(a, data, data, TrainConfig(epochs=2), batch_size=16, seed=2)
    rb = _autograd_train(monkeypatch, b, data, data, TrainConfig(epochs=2), batch_size=16, seed=2)
    assert torch.equal(params(a), params(b)) and all(torch.equal(u, v) for u, v in zip(_buffers(a), _buffers(b)))
    assert _history(ra) == _history(rb)
    assert ra.step_kinds == ["chainstep"] and rb.step_kinds == ["autograd"]
