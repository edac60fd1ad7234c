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
