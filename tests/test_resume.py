"""A study killed with SIGKILL at any moment and started again finishes with the numbers of an
uninterrupted run, bitwise; a half-written file is never taken for a finished one.

The kill test runs ``python -m batchgap run`` as a real subprocess. To stop it at exact points (inside
an epoch, between the history and the checkpoint, inside an atomic write, inside a measurement, ...)
the subprocess is started through a small wrapper (``STOPPER`` below, test code only) that patches
one library function to announce the point on stdout and block; the test reads that line and kills
the process there. No sleeps, no timing.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from batchgap import study as study_mod
from batchgap.cli import main
from batchgap.config import TrainConfig
from batchgap.train import read_history, train

# small, and every measure is cheap but present (a Hessian would take most of the time)
SETTINGS = [*(a for s in ("train.epochs=4", "train.checkpoint_every=2", "data.train_subset=400", "data.test_subset=200",
                          "seeds=[0]", "measure.interpolation_points=3", "measure.sharpness_eps=[0.001]",
                          "measure.sharpness_max_iter=2", "measure.sharpness_subspace_dim=0", "measure.hessian_top_k=0",
                          "measure.hessian_trace_probes=0", "measure.curve_directions=1", "measure.curve_points=5",
                          "measure.surface_points=0", "measure.norms=false", "measure.average_sigma=0",
                          "measure.average_sigma_relative=0", "measure.pac_bayes_delta=0", "measure.density_vectors=0")
             for a in ("--set", s)), "--threads", "1", "--jobs", "1", "--no-report"]

# Runs batchgap's CLI with one function patched to print "STOPPED <point>" and block when it reaches
# the point named in $STOP_AT. The plan has two runs, SB-s0 (12 steps an epoch) then LB-s0 (10 steps).
STOPPER = r'''
import os, sys, threading
from pathlib import Path
import batchgap.study as study, batchgap.util as util
from batchgap.train import sgd_step

point = os.environ.get("STOP_AT", "")
calls = {}

def stop():
    print("STOPPED", point, flush=True)
    threading.Event().wait()

def nth(key, n):
    calls[key] = calls.get(key, 0) + 1
    return calls[key] == n

if point == "mid-epoch":  # the 30th step: inside epoch 3 of SB-s0, whose state.pt holds epoch 2
    real_train = study.train
    def patched(*a, **k):
        inner = k.get("step", sgd_step)
        def step(*b):
            if nth("step", 30):
                stop()
            return inner(*b)
        return real_train(*a, **{**k, "step": step})
    study.train = patched
if point in ("history-ahead-of-state", "mid-write-state", "mid-write-results"):
    real_replace = os.replace
    target = {"history-ahead-of-state": "history.jsonl", "mid-write-state": "state.pt",
              "mid-write-results": "results.json"}[point]
    def replace(src, dst):
        name = Path(dst).name
        if point == "history-ahead-of-state" and name == target:
            real_replace(src, dst)
            if Path(dst).read_text().count("\n") == 3:  # epoch 3 logged; state.pt holds epoch 2
                stop()
            return
        if name == target and nth(target, 1):  # a writer killed half way through its temporary file
            os.truncate(src, os.path.getsize(src) // 2)
            stop()
        real_replace(src, dst)
    util.os.replace = replace
if point == "mid-measure":  # LB-s0 trained, its model.pt written, its result.json not yet
    real_geometry = study.geometry
    def geometry(*a, **k):
        if nth("geometry", 2):
            stop()
        return real_geometry(*a, **k)
    study.geometry = geometry
if point == "mid-pair":
    study.parametric_plot = lambda *a, **k: stop()

from batchgap.cli import main
sys.argv = ["batchgap", *sys.argv[1:]]
sys.exit(main())
'''


def strip(runs):
    # train_step: the stopper's wrapped step trains its epochs on autograd ("autograd+chainstep"), same bits
    return [{k: v for k, v in r.items() if k not in ("wall_time_s", "measure_time_s", "train_step")} for r in runs]


def history(out, run):
    return [{k: v for k, v in row.items() if k != "time_s"} for row in read_history(out / "runs" / run["id"])]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist1d_dir):
    """The study run once, uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BATCHGAP_DATA", str(mnist1d_dir))
        assert main(["run", "default", "--out", str(out), *SETTINGS]) == 0
    return out


def run_until(out, point, env):
    """Start the study; if it reaches ``point``, SIGKILL it there. Returns whether it stopped there."""
    err = out.parent / f"stderr-{point or 'end'}.txt"
    with open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", STOPPER, "run", "default", "--out", str(out), *SETTINGS],
                                stdout=subprocess.PIPE, stderr=stderr, text=True, env={**env, "STOP_AT": point})
    try:
        for line in proc.stdout:
            if line.startswith("STOPPED"):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
        assert proc.wait() == 0, err.read_text()
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_study_killed_at_every_kind_of_point_resumes_to_the_same_numbers(reference, tmp_path, mnist1d_dir):
    env = {**os.environ, "BATCHGAP_DATA": str(mnist1d_dir), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    runs = out / "runs"

    assert run_until(out, "mid-epoch", env)
    [sb] = list(runs.iterdir())
    state = torch.load(sb / "state.pt", weights_only=True)
    assert state["result"]["epochs_done"] == 2 and len(read_history(sb)) == 2 and not (sb / "model.pt").exists()

    assert run_until(out, "history-ahead-of-state", env)
    state = torch.load(sb / "state.pt", weights_only=True)
    assert state["result"]["epochs_done"] == 2 and len(read_history(sb)) == 3  # history one epoch ahead

    assert run_until(out, "mid-write-state", env)  # a truncated temporary beside the state.pt of epoch 2
    assert [p.name.startswith(".state.pt.") for p in sb.glob("*.tmp")] == [True]
    assert torch.load(sb / "state.pt", weights_only=True)["result"]["epochs_done"] == 2

    assert run_until(out, "mid-measure", env)  # SB-s0 finished; LB-s0 trained, not measured
    lb = next(p for p in runs.iterdir() if p.name.startswith("LB"))
    assert (sb / "result.json").exists() and (lb / "model.pt").exists() and not (lb / "result.json").exists()
    assert not list(sb.glob("*.tmp"))  # the killed writer's leftovers were cleared when the run resumed

    assert run_until(out, "mid-pair", env)
    assert (lb / "result.json").exists() and not (out / "pairs").exists()

    assert run_until(out, "mid-write-results", env)
    assert not (out / "results.json").exists() and list(out.glob(".results.json.*.tmp"))

    assert not run_until(out, "", env)  # to the end
    got, want = (json.loads((d / "results.json").read_text()) for d in (out, reference))
    assert strip(got["runs"]) == strip(want["runs"])  # bitwise: the JSON numbers are equal
    assert got["pairs"] == want["pairs"] and [r["name"] for r in got["summary"]] == [r["name"] for r in want["summary"]]
    for run in want["runs"]:
        assert history(out, run) == history(reference, run)
    assert not list(out.rglob("*.tmp")) and not (out / ".lock").exists()


def test_a_result_json_that_does_not_parse_is_measured_again(reference, tmp_path, mnist1d_dir, monkeypatch):
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    want = json.loads((reference / "results.json").read_text())
    sb = out / want["runs"][0]["checkpoint"].rsplit("/", 1)[0]
    text = (sb / "result.json").read_text()
    (sb / "result.json").write_text(text[: len(text) // 2])  # as a non-atomic writer would leave it
    lb = out / want["runs"][1]["checkpoint"].rsplit("/", 1)[0]
    (lb / "result.json").write_text(json.dumps({"id": "someone-else", "complete": True}))
    measured = []
    real = study_mod.geometry
    monkeypatch.setattr(study_mod, "geometry", lambda *a, **k: measured.append(1) or real(*a, **k))
    assert main(["run", "default", "--out", str(out), *SETTINGS]) == 0
    assert len(measured) == 2
    got = json.loads((out / "results.json").read_text())
    assert strip(got["runs"]) == strip(want["runs"])


def test_an_unreadable_checkpoint_restarts_training_from_x0(tmp_path):
    g = torch.Generator().manual_seed(0)
    from batchgap.data.base import TensorData
    from batchgap.models import init_model
    data = TensorData(torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g))
    full = init_model("mlp", (6,), 3, 0, width=16, depth=2)
    train(full, data, data, TrainConfig(epochs=3), batch_size=16, seed=1, run_dir=tmp_path / "full")
    part = tmp_path / "part"
    train(init_model("mlp", (6,), 3, 0, width=16, depth=2), data, data, TrainConfig(epochs=2), batch_size=16,
          seed=1, run_dir=part)
    blob = (part / "state.pt").read_bytes()
    (part / "state.pt").write_bytes(blob[: len(blob) // 2])
    again = init_model("mlp", (6,), 3, 0, width=16, depth=2)
    res = train(again, data, data, TrainConfig(epochs=3), batch_size=16, seed=1, run_dir=part)
    assert res.resumed_from_epoch == 0
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), again.state_dict().values()))
    assert [h["epoch"] for h in read_history(part)] == [1, 2, 3]
