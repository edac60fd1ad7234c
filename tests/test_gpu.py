"""The GPU path (issue 27): every landscape measure on CUDA against the same measure on the CPU, training on
CUDA, ``--device cuda``, a torchrun NCCL run. Marked ``gpu`` and skipped without a CUDA device
(``scripts/gpu-check.sh`` runs them with ``pytest -m gpu``); the last two tests (the script's syntax and its
CPU path) run everywhere.

The CPU-GPU comparisons run in float64: the random draws of every measure come from CPU generators (moved to
the device), so the two devices compute the same numbers and differ only in the order of float reductions
(~1e-15 relative per pass). TF32 never applies to float64, and the solvers' paths stay together at that
rounding; the tolerance RTOL = 1e-6 leaves them 9 orders of magnitude. The float32 conv-net training checks
only that it runs, stays finite and stays on the device: cuDNN's float32 kernels (TF32 by default) round
differently from the CPU's.
"""
import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from batchgap.data.base import TensorData
from batchgap.models import init_model

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (scripts/gpu-check.sh)")
RTOL, ATOL = 1e-6, 1e-9
STUDY = ["train.epochs=1", "data.train_subset=400", "data.test_subset=200", "seeds=[0]",
         "measure.interpolation_points=3", "measure.sharpness_eps=[1e-3]", "measure.sharpness_max_iter=3",
         "measure.adaptive_rho=0.0", "measure.hessian_top_k=1", "measure.hessian_trace_probes=2",
         "measure.curve_directions=1", "measure.surface_points=0", "measure.norms=false", "measure.average_sigma=0",
         "measure.average_sigma_relative=0", "measure.pac_bayes_delta=0", "measure.density_vectors=0"]


def toy(n=64, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64) * 2 + 1
    y = (x[:, 0] + 0.5 * x[:, 1] > 1).long() + (x[:, 2] > 2).long()
    return TensorData(x, y).to(device)


def images(n=16, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return TensorData(torch.rand(n, 3, 16, 16, generator=g, dtype=torch.float64),
                      torch.randint(0, 10, (n,), generator=g)).to(device)


def mlp(seed=0):
    """A tiny trained-looking MLP with BatchNorm (running statistics set by a few train-mode passes)."""
    m = init_model("mlp", (6,), 3, seed, width=16, depth=2).double()
    with torch.no_grad():
        m.train()
        for _ in range(3):
            m(toy().x)
    return m.eval()


def conv(seed=0):
    return init_model("simplevgg", (3, 16, 16), 10, seed, width=4, convs=1).double().eval()


def numbers(value, path="") -> dict:
    """Every number in a measure's result, by path: dataclass fields, dict keys, sequences, arrays and tensors
    flattened to float64 arrays; strings (protocol words, device names) left out."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(numbers(v, f"{path}.{k}"))
        return out
    if torch.is_tensor(value):
        return {path: value.detach().cpu().double().numpy().reshape(-1)}
    if isinstance(value, (bool, int, float, np.ndarray, np.number)):
        return {path: np.asarray(value, dtype=np.float64).reshape(-1)}
    if isinstance(value, (list, tuple)) and value and all(not isinstance(v, str) for v in value):
        try:
            return {path: np.asarray(value, dtype=np.float64).reshape(-1)}
        except (TypeError, ValueError):
            out = {}
            for i, v in enumerate(value):
                out.update(numbers(v, f"{path}[{i}]"))
            return out
    return {}


def differences(a, b) -> list[str]:
    """The paths where two results' numbers differ beyond RTOL/ATOL (NaN equal to NaN), or do not match up."""
    na, nb = numbers(a), numbers(b)
    bad = [f"{p}: only in one" for p in set(na) ^ set(nb)]
    for p in sorted(set(na) & set(nb)):
        if na[p].shape != nb[p].shape or not np.allclose(na[p], nb[p], rtol=RTOL, atol=ATOL, equal_nan=True):
            bad.append(f"{p}: {na[p][:4]} against {nb[p][:4]}")
    return bad


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def mlp_measures():
    """name -> measure(model, data, model_b, device), every landscape measure of the public API."""
    import batchgap as bg

    def direction(m, seed):
        return bg.filter_normalized_direction(m, seed=seed)

    return {
        "evaluate": lambda m, d, b, dev: bg.evaluate(m, d, batch_size=24),
        "evaluate-recompute": lambda m, d, b, dev: bg.evaluate(m, d, batch_size=24, bn="recompute"),
        "eps_sharpness": lambda m, d, b, dev: bg.eps_sharpness(m, d, eps=1e-3, max_iter=5, batch_size=24),
        "eps_sharpness-subspace": lambda m, d, b, dev: bg.eps_sharpness(m, d, eps=1e-3, subspace_dim=4, max_iter=5),
        "adaptive_sharpness": lambda m, d, b, dev: bg.adaptive_sharpness(m, d, rho=1e-3, max_iter=4, batch_size=24),
        "average_sharpness": lambda m, d, b, dev: bg.average_sharpness(m, d, sigma=0.01, n_samples=8, batch_size=24),
        "pac_bayes_flatness": lambda m, d, b, dev: bg.pac_bayes_flatness(m, d, n_samples=8, batch_size=24),
        "worst_case_flatness": lambda m, d, b, dev: bg.worst_case_flatness(m, d, max_iter=3, batch_size=24),
        "hessian_eigenvalues": lambda m, d, b, dev: bg.hessian_eigenvalues(m, d, k=2, tol=1e-8, max_hvp=60,
                                                                           batch_size=24),
        "hessian_trace": lambda m, d, b, dev: bg.hessian_trace(m, d, n_probes=6, batch_size=24),
        "hessian_trace-hutch++": lambda m, d, b, dev: bg.hessian_trace(m, d, n_probes=9, method="hutch++"),
        "hessian_density": lambda m, d, b, dev: bg.hessian_density(m, d, n_vectors=2, steps=8, batch_size=24),
        "norm_measures": lambda m, d, b, dev: bg.norm_measures(m, d, batch_size=24),
        "gradient_noise_scale": lambda m, d, b, dev: bg.gradient_noise_scale(m, d, small=8, n_batches=10, n_boot=50),
        "exact_gradient_noise_scale": lambda m, d, b, dev: bg.exact_gradient_noise_scale(m, d, batch_size=24),
        "filter_normalized_direction": lambda m, d, b, dev: dict(direction(m, 3)),
        "loss_curve": lambda m, d, b, dev: bg.loss_curve(m, direction(m, 1), d, alphas=np.linspace(-1, 1, 5)),
        "loss_surface": lambda m, d, b, dev: bg.loss_surface(m, direction(m, 1), direction(m, 2), d,
                                                             alphas=np.linspace(-1, 1, 3), betas=np.linspace(-1, 1, 3)),
        "interpolate": lambda m, d, b, dev: bg.interpolate(m, b, d, alphas=np.linspace(0, 1, 5)),
        "distance": lambda m, d, b, dev: bg.distance(m, b),
    }


MLP_MEASURES = sorted(mlp_measures())


def on_both_devices(measure, make_model, data, device="cuda"):
    """(the CPU result, the result on ``device``, whether the model there came back bit for bit and there)."""
    cpu_a, cpu_b = make_model(0), make_model(1)
    gpu_a, gpu_b = copy.deepcopy(cpu_a).to(device), copy.deepcopy(cpu_b).to(device)
    before = state(gpu_a)
    on_cpu = measure(cpu_a, data("cpu"), cpu_b, "cpu")
    on_gpu = measure(gpu_a, data(device), gpu_b, device)
    after = state(gpu_a)
    restored = all(torch.equal(before[k], after[k]) for k in before)
    return on_cpu, on_gpu, restored and all(p.device.type == torch.device(device).type for p in gpu_a.parameters())


@pytest.mark.parametrize("name", MLP_MEASURES)
@pytest.mark.gpu
@needs_cuda
def test_every_measure_on_cuda_gives_the_cpu_value(name):
    on_cpu, on_gpu, restored = on_both_devices(mlp_measures()[name], mlp, lambda dev: toy(device=dev))
    assert numbers(on_cpu), "the comparison found no numbers"
    assert differences(on_cpu, on_gpu) == []
    assert restored


@pytest.mark.parametrize("name", ["evaluate", "eps_sharpness", "hessian_eigenvalues", "hessian_trace", "loss_curve",
                                  "average_sharpness"])
@pytest.mark.gpu
@needs_cuda
def test_measures_of_a_conv_net_on_cuda_give_the_cpu_value(name):
    on_cpu, on_gpu, restored = on_both_devices(mlp_measures()[name], conv, lambda dev: images(device=dev))
    assert differences(on_cpu, on_gpu) == []
    assert restored


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.05), ("adam", 1e-2)])
def test_training_on_cuda_follows_the_cpu_run(optimizer, lr):
    from batchgap.config import TrainConfig
    from batchgap.train import train

    cfg = TrainConfig(epochs=3, optimizer=optimizer, lr=lr, eval_every=1)
    a = init_model("mlp", (6,), 3, 0, width=16, depth=2).double()
    b = copy.deepcopy(a).cuda()
    ra = train(a, toy(), toy(32), cfg, batch_size=16, seed=2, progress=False)
    rb = train(b, toy(device="cuda"), toy(32, "cuda"), cfg, batch_size=16, seed=2, progress=False)
    assert all(p.device.type == "cuda" for p in b.parameters())
    sa, sb = state(a), state(b)
    for k in sa:
        assert torch.allclose(sa[k], sb[k].cpu(), rtol=RTOL, atol=ATOL), k
    keys = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")
    pick = lambda history: [{k: h[k] for k in keys} for h in history]  # noqa: E731
    assert differences(pick(ra.history), pick(rb.history)) == []


@pytest.mark.gpu
@needs_cuda
def test_a_conv_net_with_dropout_and_augmentation_trains_on_cuda():
    from batchgap.config import TrainConfig
    from batchgap.data import make_augment
    from batchgap.train import train

    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.rand(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)).to("cuda")
    model = init_model("C1", (3, 32, 32), 10, 0, bn="batch").cuda()
    result = train(model, data, data, TrainConfig(epochs=2), 16, seed=0, augment=make_augment("crop-flip"),
                   progress=False)
    assert result.epochs_done == 2 and result.diverged_epoch is None
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
    assert all(p.device.type == "cuda" for p in model.parameters())


@pytest.mark.gpu
@needs_cuda
def test_run_with_device_cuda_trains_and_measures_on_the_gpu(tmp_path, mnist1d_dir, monkeypatch, capsys):
    from batchgap.cli import main

    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    out = tmp_path / "out"
    sets = [a for s in STUDY for a in ("--set", s)]
    assert main(["run", "default", "--out", str(out), "--device", "cuda", "--jobs", "1", *sets]) == 0
    doc = json.loads((out / "results.json").read_text())
    name = torch.cuda.get_device_name(0)
    assert doc["environment"]["device"] == f"cuda:0 ({name})"
    assert len(doc["runs"]) == 2 and (out / "report.md").exists()
    # a GPU that is not there: one line, exit code 2, nothing written
    capsys.readouterr()
    missing = f"cuda:{torch.cuda.device_count()}"
    assert main(["run", "default", "--out", str(tmp_path / "none"), "--device", missing, *sets]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--device {missing}" in err and not (tmp_path / "none").exists()


@pytest.mark.gpu
@needs_cuda
def test_torchrun_with_nccl_trains_the_study_on_the_gpus(tmp_path, mnist1d_dir):
    """Two ranks on two GPUs when the machine has them (NCCL, each worker on GPU LOCAL_RANK), else one rank:
    torchrun's launch path, where a world of one makes no process group (batchgap.distributed.init_from_env)."""
    world = min(2, torch.cuda.device_count())
    out = tmp_path / "out"
    sets = [a for s in STUDY for a in ("--set", s)]
    env = {**os.environ, "BATCHGAP_DATA": str(mnist1d_dir), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={world}", "-m", "batchgap", "run", "default", "--out", str(out),
                           "--device", "cuda", "--jobs", "1", "--no-report", *sets],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["command"].startswith(f"torchrun --nproc_per_node={world} -m batchgap run default")
    assert doc["environment"]["device"].startswith("cuda:0 (")
    if world > 1:
        assert [(r["distributed"]["world_size"], r["distributed"]["backend"]) for r in doc["runs"]] == [(2, "nccl")] * 2


# ------------------------------------------------------------------------------------------ everywhere
SCRIPT = ROOT / "scripts" / "gpu-check.sh"


def test_gpu_check_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gpu_check_without_cuda_runs_its_cpu_smoke_path_and_exits_cleanly(tmp_path):
    """No CUDA (hidden with CUDA_VISIBLE_DEVICES=''): the timing table at tiny sizes on the CPU, the GPU steps it
    would have run listed, one clear line, exit 0; this interpreter and this tree (no install)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "GPU_CHECK_PYTHON": sys.executable,
           "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "GPU_CHECK_OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("gpu-check: no CUDA device") for line in lines), proc.stdout
    table = [line for line in lines if line.startswith("| ")]
    assert table[0] == "| what | time | protocol |" and len(table) == 5, proc.stdout
    assert any("images/s" in line and "SB (batch 8)" in line for line in table)
    assert any("one eps-sharpness solve" in line and "loss+grad passes" in line for line in table)
    would = [line for line in lines if line.startswith("gpu-check: would run:")]
    assert len(would) == 4 and would[-1].endswith("gpu_times.py --device cuda")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
