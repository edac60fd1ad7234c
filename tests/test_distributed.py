"""Data-parallel training on 2 processes (gloo, one machine) against one process on the same batches.

One spawn of two workers trains every case (and a small study) and saves what it got; the tests
compare that with single-process runs made here. float64 keeps round-off far below the tolerance.
"""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from batchgap.config import TrainConfig, load_study
from batchgap.data.base import TensorData
from batchgap.errors import UserError
from batchgap.models import init_model
from batchgap.remedies import ghost_bn
from batchgap.train import read_history, train

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORLD, BATCH = 2, 16
CASES = {  # name -> (TrainConfig arguments, augment?, ghost BN of this size installed before training)
    "ghost": ({"epochs": 3, "lr": 1e-2}, False, None),
    "sync": ({"epochs": 3, "lr": 1e-2, "bn_sync": True}, False, None),
    "augment": ({"epochs": 2, "lr": 1e-2}, True, None),
    "sgd-sync": ({"epochs": 2, "lr": 0.1, "optimizer": "sgd", "bn_sync": True}, False, None),
    "ghost-4": ({"epochs": 2, "lr": 1e-2}, False, 4),
}
STUDY = ["train.epochs=1", "data.train_subset=400", "data.test_subset=200", "seeds=[0]",
         "measure.interpolation_points=3", "measure.sharpness_eps=[]", "measure.adaptive_rho=0.0",
         "measure.hessian_top_k=0", "measure.hessian_trace_probes=0",
         "measure.curve_directions=0", "measure.surface_points=0", "measure.norms=false", "measure.average_sigma=0",
         "measure.average_sigma_relative=0", "measure.pac_bayes_delta=0", "measure.density_vectors=0"]


def toy(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64) * 2 + 1
    y = (x[:, 0] + 0.5 * x[:, 1] > 1).long() + (x[:, 2] > 2).long()
    return TensorData(x, y)


def net():
    return init_model("mlp", (6,), 3, 0, width=16, depth=2).double()


def noise(x, gen):
    return x + 0.1 * torch.randn(x.shape, generator=gen, dtype=x.dtype)


def fit(model, name, run_dir=None, epochs=None):
    kwargs, augment, _ = CASES[name]
    cfg = TrainConfig(**{**kwargs, **({"epochs": epochs} if epochs else {})})
    return train(model, toy(), toy(32), cfg, batch_size=BATCH, seed=3, augment=noise if augment else None,
                 run_dir=run_dir)


def _worker(rank, tmp, data_dir):
    torch.set_num_threads(1)
    tmp = Path(tmp)
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'store'}", rank=rank, world_size=WORLD)
    out = {"warnings": []}
    for name, (_, _, ghost) in CASES.items():
        model = ghost_bn(net(), ghost) if ghost else net()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = fit(model, name)
        out["warnings"] += [str(w.message) for w in caught]
        out[name] = {"state": model.state_dict(), "history": res.history, "distributed": res.distributed,
                     "bn_layer": type(model.fc1.bn).__name__}
    # a run stopped after epoch 1 and resumed by a fresh model; each rank names its own directory,
    # so the one of rank 1 proves that rank 1 never writes (nor needs to read) a file
    fit(net(), "ghost", run_dir=tmp / f"resume-rank{rank}", epochs=1)
    resumed = net()
    res = fit(resumed, "ghost", run_dir=tmp / f"resume-rank{rank}")
    out["resumed"] = {"state": resumed.state_dict(), "from": res.resumed_from_epoch}
    try:  # a study's plan refuses this with one line (tested below); train() called directly says why
        train(net(), toy(60), None, TrainConfig(epochs=1), batch_size=15, seed=0)
    except ValueError as e:
        out["odd"] = str(e)
    torch.save(out, tmp / f"rank{rank}.pt")
    # a small study, each rank given its own output directory: only rank 0's may exist afterwards
    from batchgap.studies import find_study
    from batchgap.study import run_study
    cfg = load_study(find_study("default"), STUDY)
    run_study(cfg, tmp / f"study-rank{rank}", data_dir=data_dir)
    assert not dist.is_initialized()  # the study closed the group before rank 0 measured alone


@pytest.fixture(scope="module")
def spawned(tmp_path_factory, mnist1d_dir):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp), str(mnist1d_dir)), nprocs=WORLD, join=True)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_close(a: dict, b: dict, tol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=tol), k


def test_per_worker_bn_equals_one_process_with_ghost_bn_of_the_per_worker_batch(spawned):
    _, ranks = spawned
    single = ghost_bn(net(), BATCH // WORLD)
    res = fit(single, "ghost")
    for r in ranks:  # parameters AND running statistics, on every worker
        assert_close(r["ghost"]["state"], single.state_dict())
    # the logged loss is the global batch's, and rank 0's per-epoch metrics are the single process's
    hist = ranks[0]["ghost"]["history"]
    assert [h["batch_loss"] for h in hist] == pytest.approx([h["batch_loss"] for h in res.history], abs=1e-9)
    assert [h["test_loss"] for h in hist] == pytest.approx([h["test_loss"] for h in res.history], abs=1e-9)
    assert ranks[0]["ghost"]["distributed"]["bn"] == "BN statistics per worker (ghost batch = per-worker batch 8)"
    # and it is not plain BN on the global batch: the test would see a difference
    plain = net()
    fit(plain, "ghost")
    assert not torch.allclose(plain.state_dict()["fc1.linear.weight"], single.state_dict()["fc1.linear.weight"],
                              atol=1e-5)


@pytest.mark.parametrize("name", ["sync", "sgd-sync"])
def test_synchronized_bn_equals_one_process_with_ordinary_bn(spawned, name):
    _, ranks = spawned
    single = net()
    kwargs, _, _ = CASES[name]
    train(single, toy(), toy(32), TrainConfig(**{**kwargs, "bn_sync": False}), batch_size=BATCH, seed=3)
    for r in ranks:
        assert_close(r[name]["state"], single.state_dict())
    assert "global batch 16" in ranks[0][name]["distributed"]["bn"]


def test_ghost_bn_layers_keep_their_ghost_size_within_each_worker(spawned):
    _, ranks = spawned
    single = ghost_bn(net(), 4)  # ghost batches of 4 in the global batch of 16: two per worker
    fit(single, "ghost-4")
    for r in ranks:
        assert_close(r["ghost-4"]["state"], single.state_dict())
    assert "per ghost batch of 4 within each worker" in ranks[0]["ghost-4"]["distributed"]["bn"]
    # after training, the workers' models have their own layers back
    assert [r["ghost-4"]["bn_layer"] for r in ranks] == ["GhostBatchNorm"] * 2
    assert [r["sync"]["bn_layer"] for r in ranks] == ["BatchNorm1d"] * 2


def test_augmentation_is_drawn_for_the_global_batch(spawned):
    _, ranks = spawned
    single = ghost_bn(net(), BATCH // WORLD)
    fit(single, "augment")
    for r in ranks:
        assert_close(r["augment"]["state"], single.state_dict())


def test_resumed_data_parallel_run_equals_an_uninterrupted_one_and_rank_1_writes_nothing(spawned):
    tmp, ranks = spawned
    for r in ranks:
        assert r["resumed"]["from"] == 1
        assert_close(r["resumed"]["state"], r["ghost"]["state"], tol=0)  # bitwise
    assert (tmp / "resume-rank0" / "model.pt").exists() and (tmp / "resume-rank0" / "state.pt").exists()
    assert [h["epoch"] for h in read_history(tmp / "resume-rank0")] == [1, 2, 3]
    assert not (tmp / "resume-rank1").exists()
    # the remaining epochs of a data-parallel checkpoint need the same number of workers
    with pytest.raises(UserError, match="begun with 2 worker"):
        fit(net(), "ghost", run_dir=tmp / "resume-rank0", epochs=4)


def test_a_global_batch_that_does_not_divide_is_refused(spawned):
    _, ranks = spawned
    assert "does not divide among 2 workers" in ranks[0]["odd"] and "\n" not in ranks[0]["odd"]


def test_a_data_parallel_study_is_written_by_rank_0_alone(spawned):
    tmp, _ = spawned
    out = tmp / "study-rank0"
    assert not (tmp / "study-rank1").exists()
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["runs"]) == 2 and len(doc["pairs"]) == 1
    for r in doc["runs"]:
        assert r["distributed"]["world_size"] == 2 and r["distributed"]["backend"] == "gloo"
        assert r["distributed"]["bn"] == (f"BN statistics per worker (ghost batch = per-worker batch "
                                          f"{r['batch_size'] // 2})")
        assert r["id"].startswith(r["regime"]) and (out / "runs" / r["id"] / "result.json").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".lock")]


def test_nproc_launches_torchrun_and_finishes_the_study(tmp_path, mnist1d_dir, monkeypatch, capsys):
    out = tmp_path / "out"
    sets = [a for s in [*STUDY, "measure.eval_batch_size=100"] for a in ("--set", s)]  # 2 test batches: 1 a worker
    env = {**os.environ, "BATCHGAP_DATA": str(mnist1d_dir), "OMP_NUM_THREADS": "1"}

    def launch(*more):
        return subprocess.run([sys.executable, "-m", "batchgap", "run", "default", "--nproc", "2", "--out", str(out),
                               "--no-report", *sets, *more], capture_output=True, text=True, env=env, timeout=300)

    proc = launch()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(out / "results.json")]  # printed by rank 0 alone
    assert "Warning" not in proc.stderr  # torchrun's launch and DDP once warned (runpy's RuntimeWarning, FutureWarning)
    doc = json.loads((out / "results.json").read_text())
    assert [r["distributed"]["world_size"] for r in doc["runs"]] == [2, 2]
    assert [r["geometry"]["noise_scale"]["world_size"] for r in doc["runs"]] == [2, 2]  # measured on both workers
    # changed measure settings: the runs are measured again on both workers, not trained again, not by rank 0 alone
    again = launch("--set", "measure.norms=true")
    assert again.returncode == 0 and "measured again on 2 workers" in again.stderr, again.stderr
    assert "global batch" not in again.stderr
    for a, b in zip(doc["runs"], json.loads((out / "results.json").read_text())["runs"]):
        assert (a["id"], a["wall_time_s"], a["history"]) == (b["id"], b["wall_time_s"], b["history"])  # not trained
        assert b["geometry"]["norms"]["world_size"] == 2 and b["geometry"]["norms"]["backend"] == "gloo"
    assert doc["command"].startswith("torchrun --nproc_per_node=2 -m batchgap run default --out")
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".lock")]
    # the run ids hold the number of workers: a single-process run of the same study makes new runs
    plan = json.loads((out / "plan.json").read_text())
    assert plan["world_size"] == 2 and [r["id"] for r in plan["runs"]] == [r["id"] for r in doc["runs"]]
    # ... so a single-process run into that directory is refused (one study per directory, issue 19)
    from batchgap.cli import main
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    assert main(["run", "default", "--out", str(out), "--no-report", *sets]) == 2
    assert "trained on 2 data-parallel worker(s) there, 1 now" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--nproc", "2", "--jobs", "2"], "--jobs and --nproc"),
    (["--nproc", "0"], "--nproc: must be at least 1"),
    (["--nproc", "3"], "does not divide among 3 workers"),
    (["--nproc", "16", "--set", "regimes.SB.batch_size=16"], "per-worker BatchNorm needs at least 2"),
])
def test_bad_nproc_is_one_line_before_anything_is_launched(argv, needle, tmp_path, mnist1d_dir, monkeypatch, capsys):
    from batchgap.cli import main

    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("launched torchrun"))
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("launched torchrun"))  # launch() uses it
    sets = [a for s in STUDY for a in ("--set", s)]
    assert main(["run", "default", "--out", str(tmp_path / "out"), *sets, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
    assert not (tmp_path / "out").exists()


def test_data_parallel_training_warns_nothing(spawned):
    """torch 2.13's DDP warns that broadcast_buffers is deprecated: a user of --nproc saw it twice per run."""
    _, outs = spawned
    assert all(not out["warnings"] for out in outs), outs[0]["warnings"]
