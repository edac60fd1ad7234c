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
    assert sorted(p.name for p in (tmp_path / "a" / "iterates").iterdir()) == ["epoch-0.pt", "epoch-2.pt"]
    e0 = torch.load(tmp_path / "a" / "iterates" / "epoch-0.pt", weights_only=True)
    assert all(torch.equal(e0[k], start[k]) for k in start)
    two = model()
    train(two, data, None, TrainConfig(epochs=2), batch_size=16, seed=2)
    e2 = torch.load(tmp_path / "a" / "iterates" / "epoch-2.pt", weights_only=True)
    assert all(torch.equal(e2[k], v) for k, v in two.state_dict().items())
