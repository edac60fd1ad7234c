"""Device selection. This machine has no GPU: the CUDA paths are checked for their refusals here."""
import pytest
import torch

from batchgap import devices
from batchgap.cli import main
from batchgap.data.base import Dataset, TensorData
from batchgap.errors import UserError

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without a GPU")


def test_cpu_and_auto_without_a_gpu(monkeypatch):
    monkeypatch.delenv("BATCHGAP_DEVICE", raising=False)
    assert devices.resolve("cpu") == torch.device("cpu")
    expected = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    assert devices.resolve("auto") == devices.resolve(None) == expected
    monkeypatch.setenv("BATCHGAP_DEVICE", "cpu")
    assert devices.resolve(None) == torch.device("cpu")
    assert devices.describe(torch.device("cpu")) == "cpu"


@no_gpu
@pytest.mark.parametrize("spec, message", [
    ("cuda", "sees no CUDA GPU; use --device cpu"),
    ("cuda:1", "sees no CUDA GPU"),
    ("gpu", "unknown device 'gpu'; expected auto, cpu, cuda or cuda:N"),
    ("meta", "'meta' is not supported"),
])
def test_devices_that_cannot_be_used_here_are_refused_in_one_line(spec, message):
    with pytest.raises(UserError, match=message):
        devices.resolve(spec)


@no_gpu
def test_run_with_a_missing_gpu_stops_before_touching_the_output(tmp_path, capsys, mnist1d_dir, monkeypatch):
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    out = tmp_path / "out"
    assert main(["run", "default", "--quick", "--out", str(out), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("batchgap: error: --device cuda:") and not out.exists()


def test_place_moves_both_sets_and_keeps_a_dataset_already_there():
    ds = Dataset("t", TensorData(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)),
                 TensorData(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)), 2, (2,), {"a": 1})
    assert devices.place(ds, torch.device("cpu")) is ds
    moved = devices.place(ds, torch.device("meta"))
    assert moved.train.x.device.type == moved.test.y.device.type == "meta"
    assert (moved.name, moved.num_classes, moved.input_shape, moved.info) == ("t", 2, (2,), {"a": 1})
    assert devices.of(moved) == torch.device("meta") and devices.of(ds) == torch.device("cpu")


def _conv_net(seed=0):
    from batchgap.models import init_model
    return init_model("simplevgg", (3, 8, 8), 4, seed, width=4)


def test_conv_models_go_channels_last_on_the_cpu_with_their_values_and_their_function():
    plain = _conv_net()
    fast = devices.fast_layout(_conv_net())
    assert devices.fast_layout(fast) is fast  # in place, idempotent
    w = [p for p in fast.parameters() if p.dim() == 4]
    assert w and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in w)
    for (k, a), b in zip(plain.state_dict().items(), fast.state_dict().values()):
        assert torch.equal(a, b), k
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    plain.eval(), fast.eval()
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), plain(x), rtol=1e-5, atol=1e-6)
    from batchgap.models import init_model
    mlp = init_model("mlp", (6,), 3, 0, width=8, depth=1)
    assert devices.fast_layout(mlp) is mlp and all(p.is_contiguous() for p in mlp.parameters())


def test_training_a_conv_net_channels_last_follows_the_plain_layout(monkeypatch):
    """train() converts conv nets (the fast path); the trajectory is the plain layout's to float rounding."""
    from batchgap.config import TrainConfig
    from batchgap.train import train
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 8, 8, generator=g)
    data = TensorData(x, (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long())
    # Adam would turn rounding in near-zero gradients into full steps
    cfg = TrainConfig(epochs=3, lr=0.05, optimizer="sgd")
    fast = _conv_net()
    seen, real = [], devices.fast_layout
    monkeypatch.setattr(devices, "fast_layout", lambda m: seen.append(real(m)) or m)
    train(fast, data, None, cfg, 16, seed=0, progress=False)
    assert seen == [fast]  # it trained channels_last, and hands the model back as it came in (issue 19)
    assert all(p.is_contiguous() for p in fast.parameters())
    nhwc = _conv_net().to(memory_format=torch.channels_last)
    train(nhwc, data, None, TrainConfig(epochs=1), 16, seed=0, progress=False)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in nhwc.parameters() if p.dim() == 4)
    monkeypatch.setattr(devices, "fast_layout", lambda m: m)
    plain = _conv_net()
    train(plain, data, None, cfg, 16, seed=0, progress=False)
    assert all(p.is_contiguous() for p in plain.parameters())
    moved = max((p - q).abs().max().item() for p, q in zip(fast.parameters(), plain.parameters()))
    travelled = max((p - q).abs().max().item() for p, q in zip(fast.parameters(), _conv_net().parameters()))
    assert moved < 1e-4 < travelled, (moved, travelled)
