"""Issue 14: the user's own model and data through the whole study machinery (examples/own-model/)."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from batchgap.cli import main

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "own-model"
SMALL = [a for s in ("seeds=[0, 1]", "measure.curve_directions=1", "measure.surface_points=0",
                     "measure.hessian_trace_probes=0", "measure.noise_scale_batches=0",
                     "measure.interpolation_points=3", "measure.pac_bayes_delta=0", "measure.density_vectors=0")
         for a in ("--set", s)]


def strip(runs):
    return [{k: v for k, v in r.items() if k not in ("wall_time_s", "measure_time_s")} for r in runs]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The example copied out of the repo, its data.npz written by its own script."""
    root = tmp_path_factory.mktemp("own") / "own-model"
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns("data.npz", "__pycache__"))
    subprocess.run([sys.executable, "make_data.py"], cwd=root, check=True, capture_output=True)
    return root


@pytest.fixture(scope="module")
def reference(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    assert main(["run", str(example / "study.toml"), "--quick", "--out", str(out), "--jobs", "1", *SMALL]) == 0
    return out


def test_the_example_runs_end_to_end_and_names_its_sources(example, reference):
    doc = json.loads((reference / "results.json").read_text())
    assert [r["regime"] for r in doc["runs"]] == ["SB", "LB", "SB", "LB"] and doc["pairs"]
    assert doc["user"]["model"]["spec"] == "nets.py:small_cnn" and len(doc["user"]["model"]["source_sha256"]) == 64
    assert (doc["user"]["data"]["file_sha256"]
            == __import__("hashlib").sha256((example / "data.npz").read_bytes()).hexdigest())
    report = (reference / "report.md").read_text()
    assert "`nets.py:small_cnn`" in report and "BatchNorm as the model builds it" in report
    # the model is the user's: its parameters are those of nets.small_cnn, seeded per seed
    sys.path.insert(0, str(example))
    try:
        import nets
    finally:
        sys.path.remove(str(example))
    state = torch.load(reference / doc["runs"][0]["x0"], weights_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        assert all(torch.equal(a, b)
                   for a, b in zip(nets.small_cnn((1, 8, 8), 4, width=8).state_dict().values(), state.values()))


def test_jobs_give_the_same_numbers(example, reference, tmp_path):
    out = tmp_path / "out"
    assert main(["run", str(example / "study.toml"), "--quick", "--out", str(out), "--jobs", "2", *SMALL]) == 0
    got, want = (json.loads((d / "results.json").read_text()) for d in (out, reference))
    assert strip(got["runs"]) == strip(want["runs"]) and got["pairs"] == want["pairs"]


def test_torchrun_with_two_workers(example, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "batchgap", "run", str(example / "study.toml"), "--quick", "--out",
                           str(out), "--nproc", "2", "--no-report", *SMALL, "--set", "regimes.LB.batch_size=50"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "results.json").read_text())
    assert [r["distributed"]["world_size"] for r in doc["runs"]] == [2] * 4 and doc["user"]["model"]["spec"]


KILLER = r'''
import sys, threading
import batchgap.study as study
calls = []
real = study.geometry
def geometry(*a, **k):
    calls.append(1)
    if len(calls) == 2:  # the second run trained, not measured
        print("STOPPED", flush=True)
        threading.Event().wait()
    return real(*a, **k)
study.geometry = geometry
from batchgap.cli import main
sys.exit(main(sys.argv[1:]))
'''


def test_killed_and_resumed_gives_the_same_numbers(example, reference, tmp_path):
    out = tmp_path / "out"
    args = ["run", str(example / "study.toml"), "--quick", "--out", str(out), "--jobs", "1", *SMALL]
    proc = subprocess.Popen([sys.executable, "-c", KILLER, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        assert proc.stdout.readline().startswith("STOPPED")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "results.json").exists() and len(list((out / "runs").iterdir())) == 2
    assert main(args) == 0
    got, want = (json.loads((d / "results.json").read_text()) for d in (out, reference))
    assert strip(got["runs"]) == strip(want["runs"])


def test_editing_the_model_or_the_data_makes_new_runs(example, reference, tmp_path):
    root = tmp_path / "own-model"
    shutil.copytree(example, root)
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    args = ["run", str(root / "study.toml"), "--quick", "--out", str(out), "--jobs", "1", *SMALL, "--no-report"]
    assert main(args) == 0  # the same code and data at another path: every run found finished
    ids = {r["id"] for r in json.loads((reference / "results.json").read_text())["runs"]}
    assert {r["id"] for r in json.loads((out / "results.json").read_text())["runs"]} == ids
    (root / "nets.py").write_text((root / "nets.py").read_text() + "\n# an edit that changes nothing but the source\n")
    assert main(args) == 0
    edited = {r["id"] for r in json.loads((out / "results.json").read_text())["runs"]}
    assert not edited & ids
    data = dict(np.load(root / "data.npz"))
    data["x_train"][0, 0, 0, 0] += 1.0
    np.savez(root / "data.npz", **data)
    assert main(args) == 0
    assert not {r["id"] for r in json.loads((out / "results.json").read_text())["runs"]} & (ids | edited)


def _write(root: Path, nets: str = "", data: dict | None = None, **settings) -> Path:
    (root / "nets.py").write_text(nets or "from torch import nn\ndef mlp(input_shape, num_classes):\n"
                                  "    return nn.Sequential(nn.Flatten(), nn.Linear(6, num_classes))\n")
    g = np.random.default_rng(0)
    arrays = {"x_train": g.normal(size=(40, 6)).astype(np.float32), "y_train": g.integers(0, 3, 40),
              "x_test": g.normal(size=(20, 6)).astype(np.float32), "y_test": g.integers(0, 3, 20)}
    arrays.update(data or {})
    np.savez(root / "data.npz", **{k: v for k, v in arrays.items() if v is not None})
    body = {"data.name": '"npz"', "data.path": '"data.npz"', "model.name": '"nets.py:mlp"', **settings}
    tables = {}
    for key, value in body.items():
        table, field = key.split(".")
        tables.setdefault(table, []).append(f"{field} = {value}")
    text = 'name = "mine"\nseeds = [0]\n' + "".join(f"[{t}]\n" + "\n".join(v) + "\n" for t, v in tables.items())
    text += '[[regimes]]\nname = "SB"\nbatch_size = 8\n[[regimes]]\nname = "LB"\nbatch_size = 20\n'
    (root / "study.toml").write_text(text)
    return root / "study.toml"


BAD = {
    "module does not import": ({"nets": "import not_a_module_anywhere\n"}, "does not import (ModuleNotFoundError"),
    "no such module": ({"model.name": '"nowhere_pkg.sub:f"'}, "module 'nowhere_pkg.sub' does not import"),
    "missing attribute": ({"model.name": '"nets.py:resnet"'}, "has no attribute 'resnet'"),
    "not callable": ({"nets": "value = 3\n", "model.name": '"nets.py:value"'}, "is not callable"),
    "factory raises": ({"nets": "def mlp(input_shape, num_classes):\n    raise RuntimeError('no GPU here')\n"},
                       "raised RuntimeError: no GPU here"),
    "output shape": ({"nets": "from torch import nn\ndef mlp(input_shape, num_classes):\n    return nn.Linear(6, 7)\n"},
                     "must return logits of shape (batch, num_classes) = (2, 3), got (2, 7)"),
    "missing file": ({"data.path": '"nothere.npz"'}, "nothere.npz: no such file"),
    "missing array": ({"data": {"y_test": None}}, "missing y_test"),
    "float labels": ({"data": {"y_train": np.zeros(40, dtype=np.float32)}},
                     "y_train must be a 1-D array of integer class labels"),
    "labels out of range": ({"data": {"y_test": np.full(20, 5)}, "data.num_classes": "3"}, "labels must lie in [0, 3)"),
    "nan inputs": ({"data": {"x_test": np.full((20, 6), np.nan, dtype=np.float32)}},
                   "x_test holds NaN or infinite values"),
    "shapes differ": ({"data": {"x_test": np.zeros((20, 5), dtype=np.float32)}},
                      "train and test inputs differ in shape"),
    "bn not honoured": ({"model.bn": '"batch"'}, "model.bn = 'batch' cannot be honoured"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_user_code_or_data_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    change, needle = BAD[case]
    change = dict(change)
    nets, data = change.pop("nets", ""), change.pop("data", None)
    study = _write(tmp_path, nets, data, **change)
    out = tmp_path / "out"
    assert main(["run", str(study), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err, err
    assert not out.exists()
