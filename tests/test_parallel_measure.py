"""Data-parallel measurement: every full-data measure on 2 and 3 gloo ranks equals the one-process value.

One spawn per world size runs every measure on every rank (each rank given the SAME data and model, as a
torchrun script would) and saves what each rank got; the tests compare that with the measures run here in one
process. The data make 7 batches of 8 (the last of 2 rows), so neither 2 nor 3 ranks divide them. float64
throughout: the ranks only change the order of float additions, so the tolerance per measure is round-off,
amplified where a solver iterates on the values (L-BFGS-B, Lanczos, bisection).
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import batchgap
from batchgap.data.base import TensorData
from batchgap.landscape import ranks
from batchgap.models import init_model

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

BATCH = 8
WORLDS = (2, 3)
TOL = {  # relative tolerance per measure (float64; see the module docstring)
    "evaluate": 1e-12, "evaluate_recompute": 1e-10, "eps_sharpness": 1e-7, "eigenvalues": 1e-8, "trace": 1e-9,
    "density": 1e-7, "adaptive": 1e-7, "adaptive_m": 1e-7, "average": 1e-10, "pac_bayes": 1e-8, "worst_case": 1e-7,
    "noise": 1e-9, "noise_exact": 1e-9, "noise_exact_vmap": 1e-9, "norms": 1e-10, "curve": 1e-10,
    "curve_recompute": 1e-10, "surface": 1e-10, "interpolate": 1e-10,
}


def toy(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64) * 2 + 1
    y = (x[:, 0] + 0.5 * x[:, 1] > 1).long() + (x[:, 2] > 2).long()
    return TensorData(x, y)


def net(seed=0):
    """A tiny MLP with BatchNorm, its running statistics moved off their initial values."""
    model = init_model("mlp", (6,), 3, seed, width=8, depth=2).double()
    model.train()
    with torch.no_grad():
        model(toy(40, seed=seed + 7).x)
    return model


SKIP = {"world_size", "backend", "seconds", "wall_time_s", "time_s"}  # the processes, and clocks


def numbers(result) -> dict:
    """The numeric fields of a result (as_dict), flattened, without the protocol's rank fields and times."""
    out = {}

    def walk(key, value):
        if isinstance(value, dict):
            for k, v in value.items():
                if k not in SKIP:
                    walk(f"{key}.{k}", v)
        elif isinstance(value, (list, tuple)) and value and not isinstance(value[0], str):
            arr = np.asarray(value, dtype=np.float64) if not isinstance(value[0], (list, tuple, dict)) else None
            if arr is not None:
                out[key] = arr
            else:
                for i, v in enumerate(value):
                    walk(f"{key}[{i}]", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
            out[key] = np.float64(value)

    d = result.as_dict() if hasattr(result, "as_dict") else result
    for key, value in d.items():
        if key not in SKIP:
            walk(key, value)
    return out


def protocol(result) -> tuple:
    d = result.as_dict() if hasattr(result, "as_dict") else result
    return d.get("world_size"), d.get("backend")


def measure_all(data) -> dict:
    """Every full-data measure on the toy model and ``data``: name -> (numbers, (world_size, backend))."""
    model = net()
    d1 = batchgap.filter_normalized_direction(model, seed=1)
    d2 = batchgap.filter_normalized_direction(model, seed=2)
    kw = dict(batch_size=BATCH)
    runs = {
        "evaluate": lambda: batchgap.evaluate(model, data, **kw),
        "evaluate_recompute": lambda: batchgap.evaluate(model, data, bn="recompute", **kw),
        "eps_sharpness": lambda: batchgap.eps_sharpness(model, data, eps=1e-2, max_iter=5, **kw),
        "eigenvalues": lambda: batchgap.hessian_eigenvalues(model, data, k=3, **kw),
        "trace": lambda: batchgap.hessian_trace(model, data, n_probes=6, **kw),
        "density": lambda: batchgap.hessian_density(model, data, n_vectors=2, steps=8, grid_points=21, **kw),
        "adaptive": lambda: batchgap.adaptive_sharpness(model, data, rho=1e-2, max_iter=4, **kw),
        "adaptive_m": lambda: batchgap.adaptive_sharpness(model, data, rho=1e-2, max_iter=3, m=10, n_points=50, **kw),
        "average": lambda: batchgap.average_sharpness(model, data, sigma=0.05, n_samples=6, bn="recompute", **kw),
        "pac_bayes": lambda: batchgap.pac_bayes_flatness(model, data, delta=0.05, n_samples=4, rtol=0.1, **kw),
        "worst_case": lambda: batchgap.worst_case_flatness(model, data, delta=0.05, max_iter=2, rtol=0.3, **kw),
        "noise": lambda: batchgap.gradient_noise_scale(model, data, small=4, n_batches=6, n_boot=50, **kw),
        "noise_exact": lambda: batchgap.exact_gradient_noise_scale(model, data, **kw),
        "noise_exact_vmap": lambda: batchgap.exact_gradient_noise_scale(model, data, _fast=False, chunk=16, **kw),
        "norms": lambda: batchgap.norm_measures(model, data, **kw),
        "curve": lambda: batchgap.loss_curve(model, d1, data, alphas=[-1, 0, 0.5, 1], **kw),
        "curve_recompute": lambda: batchgap.loss_curve(model, d1, data, alphas=[0, 1], bn="recompute", **kw),
        "surface": lambda: batchgap.loss_surface(model, d1, d2, data, alphas=[-1, 0, 1], betas=[0, 1], **kw),
        "interpolate": lambda: batchgap.interpolate(model, net(seed=1), data, alphas=[0, 0.5, 1], bn="recompute",
                                                    **kw),
    }
    out = {}
    for name, run in runs.items():
        result = run()
        out[name] = (numbers(result), protocol(result))
    return out


def sampled_gradients(run) -> int:
    """How many batch gradients this process computed in ``run`` (the sampled noise scale's |G_B|^2 rows)."""
    from batchgap.landscape import noise

    rows, real = [0], noise._sq_norms

    def counted(grads):
        rows[0] += len(next(iter(grads.values())))
        return real(grads)

    noise._sq_norms = counted
    try:
        run()
    finally:
        noise._sq_norms = real
    return rows[0]


def _worker(rank, world, store, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    out = {"measures": measure_all(toy())}
    refusals = {}
    for name, run in {
        # rank 1 sees other data than rank 0: refused on every rank
        "mismatch": lambda: batchgap.evaluate(net(), toy(seed=rank % 2), batch_size=BATCH),
        # 2 batches cannot be shared by 3 processes (and 1 batch not by 2)
        "few": lambda: batchgap.hessian_eigenvalues(net(), toy(BATCH * (world - 1)), k=1,
                                                    batch_size=BATCH),
    }.items():
        try:
            run()
            refusals[name] = None
        except ValueError as err:
            refusals[name] = str(err)
    out["refusals"] = refusals
    out["noise_rows"] = sampled_gradients(lambda: batchgap.gradient_noise_scale(net(), toy(), small=4, n_batches=6,
                                                                                n_boot=50, batch_size=BATCH))
    with ranks.alone():  # inside alone(), one rank measures by itself while the others do not take part
        out["alone"] = batchgap.evaluate(net(), toy(), batch_size=BATCH).loss if rank == 0 else None
    torch.save(out, f"{results}-{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def single():
    torch.set_num_threads(1)
    return measure_all(toy())


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """One spawn per world size, each rank running every measure: {world: [rank 0's output, ...]}."""
    out = {}
    for world in WORLDS:
        tmp = tmp_path_factory.mktemp(f"world{world}")
        mp.spawn(_worker, args=(world, str(tmp / "store"), str(tmp / "rank")), nprocs=world, join=True)
        out[world] = [torch.load(tmp / f"rank-{r}.pt", weights_only=False) for r in range(world)]
    return out


@pytest.fixture(params=WORLDS)
def spawned(request, worlds):
    return request.param, worlds[request.param]


def test_the_data_do_not_divide_among_the_ranks():
    batches = math.ceil(len(toy().y) / BATCH)
    assert batches % 2 and batches % 3


@pytest.mark.parametrize("name", sorted(TOL))
def test_every_rank_gets_the_one_process_value(spawned, single, name):
    world, got = spawned
    want, proto = single[name]
    recorded = proto != (None, None)  # evaluate's Metrics carry no protocol
    assert proto == ((1, None) if recorded else (None, None))
    for r, out in enumerate(got):
        numbers_r, proto_r = out["measures"][name]
        assert proto_r == ((world, "gloo") if recorded else (None, None))
        assert numbers_r.keys() == want.keys(), name
        for key, value in want.items():
            np.testing.assert_allclose(numbers_r[key], value, rtol=TOL[name], atol=TOL[name] * 1e-3,
                                       err_msg=f"{name}.{key} on rank {r} of {world}")


def test_the_ranks_agree_bit_for_bit(spawned):
    _, got = spawned
    first = got[0]["measures"]
    for out in got[1:]:
        for name, (nums, _) in out["measures"].items():
            for key, value in nums.items():
                assert np.array_equal(value, first[name][0][key], equal_nan=True), f"{name}.{key}"


def test_mismatched_data_across_ranks_is_refused_on_every_rank(spawned):
    world, got = spawned
    for out in got:
        assert "different data" in out["refusals"]["mismatch"]


def test_fewer_batches_than_ranks_is_refused_on_every_rank(spawned):
    world, got = spawned
    for out in got:
        message = out["refusals"]["few"]
        assert f"over {world} processes needs at least {world} batches" in message


def test_a_rank_measures_alone_inside_alone(spawned, single):
    _, got = spawned
    assert got[0]["alone"] == pytest.approx(float(single["evaluate"][0]["loss"]), rel=1e-12)


# ---------------------------------------------------------------- batchgap measure --nproc N (torchrun)

def _measure_files(tmp_path):
    """test_measure_cmd's user folder (nets.py, data.npz) and an untrained checkpoint of nets.py:mlp."""
    from test_measure_cmd import NETS, _arrays

    from batchgap import plugins

    (tmp_path / "nets.py").write_text(NETS)
    np.savez(tmp_path / "data.npz", **_arrays())
    ds = plugins.load_user_data("npz", "data.npz", tmp_path)
    net = plugins.build_model("nets.py:mlp", tmp_path, ds.input_shape, ds.num_classes, {}, seed=0)
    torch.save(net.state_dict(), tmp_path / "a.pt")


def test_measure_nproc_2_gives_the_one_process_numbers(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from test_measure_cmd import FAST

    _measure_files(tmp_path)
    # 120 train / 60 test examples in batches of 50: 3 and 2 batches, the 3 not divisible by 2
    argv = ["a.pt", "--model", "nets.py:mlp", "--data", "data.npz", "--no-report", *FAST,
            "--set", "measure.eval_batch_size=50"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    docs = {}
    for nproc in (1, 2):
        proc = subprocess.run([sys.executable, "-m", "batchgap", "measure", *argv, "--out", f"m{nproc}",
                               "--nproc", str(nproc)], cwd=tmp_path, capture_output=True, text=True, env=env,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == [str(Path(f"m{nproc}") / "measures.json")]  # rank 0 alone prints
        docs[nproc] = json.loads((tmp_path / f"m{nproc}" / "measures.json").read_text())
    one, two = docs[1], docs[2]
    assert one["processes"] == {"world_size": 1, "backend": None}
    assert two["processes"] == {"world_size": 2, "backend": "gloo"}
    assert two["command"].startswith("torchrun --nproc_per_node=2 -m batchgap measure a.pt")
    assert two["geometry"]["hessian_eigenvalues"]["world_size"] == 2
    a, b = numbers(one["geometry"]), numbers(two["geometry"])
    assert a.keys() == b.keys()
    for key in a:  # float32 model: round-off of float32 sums in a different order, through the solvers
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=key)
    for split in ("train", "test"):
        assert two[split]["loss"] == pytest.approx(one[split]["loss"], rel=1e-6)
        assert two[split]["accuracy"] == one[split]["accuracy"]


def test_measure_nproc_above_the_batch_count_is_one_line_before_anything_is_launched(tmp_path, monkeypatch, capsys):
    import subprocess

    from test_measure_cmd import FAST

    from batchgap.cli import main

    _measure_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("launched torchrun"))
    argv = ["measure", "a.pt", "--model", "nets.py:mlp", "--data", "data.npz", "--out", "m", *FAST,
            "--set", "measure.eval_batch_size=50"]
    assert main([*argv, "--nproc", "3"]) == 2  # the test set makes 2 batches of 50
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--nproc 3: the smallest data pass (60 examples) makes 2 batch(es)" in err
    assert main([*argv, "--nproc", "0"]) == 2
    assert "--nproc: must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------- batchgap run --nproc N: runs measured by all workers

RUN_STUDY = ["train.epochs=1", "data.train_subset=400", "data.test_subset=200", "seeds=[0]",
             "measure.interpolation_points=3", "measure.sharpness_eps=[0.001]", "measure.sharpness_max_iter=2",
             "measure.sharpness_subspace_dim=0", "measure.adaptive_rho=0.0", "measure.hessian_top_k=2",
             "measure.hessian_max_hvp=12", "measure.hessian_trace_probes=0", "measure.curve_directions=0",
             "measure.surface_points=0", "measure.norms=false", "measure.average_sigma=0",
             "measure.average_sigma_relative=0", "measure.pac_bayes_delta=0", "measure.density_vectors=0",
             "measure.eval_batch_size=150"]


def test_run_nproc_2_measures_each_run_on_both_workers_with_the_one_process_numbers(tmp_path, mnist1d_dir):
    import json
    import os
    import subprocess
    import sys

    from batchgap import build
    from batchgap.config import load_study
    from batchgap.measure import geometry
    from batchgap.studies import find_study

    out = tmp_path / "out"
    sets = [a for s in RUN_STUDY for a in ("--set", s)]
    env = {**os.environ, "BATCHGAP_DATA": str(mnist1d_dir), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "batchgap", "run", "default", "--nproc", "2", "--out", str(out),
                           "--no-report", *sets], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "trained and measured on every worker" in proc.stderr
    doc = json.loads((out / "results.json").read_text())
    cfg = load_study(find_study("default"), RUN_STUDY)
    ds = build.prepare_data(cfg, mnist1d_dir, False)  # 400 examples in batches of 150: 3, not divisible by 2
    for run in doc["runs"]:
        geo = run["geometry"]
        assert geo["hessian_eigenvalues"]["world_size"] == 2 and geo["hessian_eigenvalues"]["backend"] == "gloo"
        model = build.model(cfg, ds, torch.load(out / run["checkpoint"], weights_only=True))
        torch.set_num_threads(1)
        alone = geometry(model, ds, cfg.measure, run["seed"], surface=False)  # this process alone, its model file
        assert alone["hessian_eigenvalues"]["world_size"] == 1
        a, b = numbers(alone), numbers(geo)
        assert a.keys() == b.keys()
        for key in a:  # float32 model: float32 round-off, summed in another order, through the solvers
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=f"{run['id']}: {key}")


def test_the_sampled_noise_scale_splits_its_batches_over_the_ranks(spawned):
    """Each rank computes its share of the 6 sampled batch gradients (not all 6), and still holds every value."""
    world, got = spawned
    assert sampled_gradients(lambda: batchgap.gradient_noise_scale(net(), toy(), small=4, n_batches=6, n_boot=50,
                                                                   batch_size=BATCH)) == 6
    assert [out["noise_rows"] for out in got] == [6 // world] * world
