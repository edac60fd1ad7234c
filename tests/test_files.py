"""The files a run writes and reads back (issues 24 and 26): checkpoints loaded weights-only and verified
against the sha256 recorded when written, a damaged one recovered from what is intact, OS errors (a full
disk, a read-only run directory) as one line and exit code 2 that the same command resumes from, and files
created with the permissions the umask gives.

The study runs are real ``python -m batchgap run`` subprocesses of test_resume's small study; each fault is
followed by a resume whose results.json must equal the uninterrupted run's (bitwise: the JSON numbers).
"""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from batchgap.cli import main
from batchgap.config import TrainConfig
from batchgap.data.base import TensorData
from batchgap.measure_cmd import read_checkpoint
from batchgap.models import init_model
from batchgap.rundir import (DamagedFile, RunDir, checkpoint_problem, load_checkpoint, recorded_checksums,
                             save_checkpoint)
from batchgap.train import train
from batchgap.util import FileWriteError, atomic_save_torch, atomic_write_json, atomic_write_text, sha256_file
from test_resume import SETTINGS, strip

class Planted:
    """Unpickling this touches ``path``: a stand-in for the code a crafted checkpoint would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist1d_dir):
    """The study run once, uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BATCHGAP_DATA", str(mnist1d_dir))
        assert main(["run", "default", "--out", str(out), *SETTINGS]) == 0
    return out


@pytest.fixture
def env(mnist1d_dir):
    return {**os.environ, "BATCHGAP_DATA": str(mnist1d_dir), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}


def batchgap(env, *argv):
    """``batchgap ARGV`` in a subprocess, as a user runs it: (exit code, stderr lines)."""
    proc = subprocess.run([sys.executable, "-m", "batchgap", *argv], env=env, capture_output=True, text=True,
                          timeout=600)
    return proc.returncode, proc.stderr.splitlines()


def run(env, out, *more):
    return batchgap(env, "run", "default", "--out", str(out), *SETTINGS, *more)


def same_results(out, reference):
    got, want = (json.loads((d / "results.json").read_text()) for d in (out, reference))
    return strip(got["runs"]) == strip(want["runs"]) and got["pairs"] == want["pairs"] and not got["unfinished"]


def errors_of(lines):
    """The error lines, after checking that nothing of a traceback was printed."""
    assert not any("Traceback" in line or line.startswith("  File ") for line in lines), "\n".join(lines)
    return [line for line in lines if line.startswith("batchgap: error:")]


def run_ids(reference):
    return sorted(p.name for p in (reference / "runs").iterdir())


def mount(*args):
    try:
        subprocess.run(["mount", *args], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount here ({e})")


# ---------------------------------------------------------------- issue 24: resume runs no foreign code
def test_resume_refuses_a_state_pt_that_would_run_code_and_trains_from_scratch(reference, tmp_path, env):
    out, marker = tmp_path / "out", tmp_path / "ran"
    shutil.copytree(reference, out)
    sb = out / "runs" / run_ids(reference)[1]
    for name in ("result.json", "model.pt", "model.pt.sha256"):
        (sb / name).unlink()
    torch.save({"model": Planted(marker)}, sb / "state.pt")
    (sb / "state.pt.sha256").write_text(f"{sha256_file(sb / 'state.pt')}  state.pt\n")  # a hash is no defence
    rc, lines = run(env, out)
    assert not marker.exists(), "the planted pickle ran"
    assert rc == 0, lines
    told = [line for line in lines if "state.pt" in line]
    assert len(told) == 1 and str(sb / "state.pt") in told[0] and "will not unpickle" in told[0], lines
    assert "trains from scratch" in told[0]
    assert same_results(out, reference)


def test_a_checkpoint_with_pickled_objects_is_refused_by_every_reader(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "x": Planted(marker)}, tmp_path / "model.pt")
    with pytest.raises(DamagedFile, match="will not unpickle"):
        load_checkpoint(tmp_path / "model.pt")
    assert RunDir(tmp_path).load_state() is None and not marker.exists()


# ---------------------------------------------------------------- issue 26 item 2: damaged checkpoints
def test_checkpoints_are_verified_against_the_sha256_recorded_when_written(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"w": torch.arange(1000.0)}, path)
    assert checkpoint_problem(path) is None and torch.equal(load_checkpoint(path)["w"], torch.arange(1000.0))
    blob = bytearray(path.read_bytes())
    i = blob.index(torch.arange(1000.0)[500:501].numpy().tobytes())  # one float of the tensor's data: still loads
    blob[i] ^= 1
    path.write_bytes(bytes(blob))
    assert torch.load(path, weights_only=True)["w"][500] != 500.0  # torch itself takes it
    assert "damaged" in checkpoint_problem(path)
    with pytest.raises(DamagedFile, match="sha256"):
        load_checkpoint(path)
    path.write_bytes(os.urandom(3000))
    path.with_name("c.pt.sha256").unlink()  # no record (an older output): a weights-only load decides
    assert "unreadable" in checkpoint_problem(path)
    assert checkpoint_problem(tmp_path / "none.pt") == "missing"


@pytest.mark.parametrize("killed_at", [1, 2, 3])
def test_a_kill_at_any_moment_of_a_checkpoint_write_leaves_a_file_its_record_names(tmp_path, monkeypatch, killed_at):
    path = tmp_path / "state.pt"
    save_checkpoint({"w": torch.zeros(3)}, path)
    real, calls = os.replace, []

    def replace(src, dst):  # the sidecar's first record, the file, the sidecar's last record
        calls.append(dst)
        if len(calls) == killed_at:
            raise SystemExit("killed")  # as a SIGKILL there: nothing after it happens
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SystemExit):
        save_checkpoint({"w": torch.ones(3)}, path)
    monkeypatch.setattr(os, "replace", real)
    assert checkpoint_problem(path) is None, killed_at
    assert float(load_checkpoint(path)["w"].sum()) == (0.0 if killed_at <= 2 else 3.0)
    save_checkpoint({"w": torch.full((3,), 2.0)}, path)  # and the next write after the kill
    assert recorded_checksums(path) == [sha256_file(path)] and float(load_checkpoint(path)["w"][0]) == 2.0


def test_a_damaged_model_pt_is_reported_then_recovered_to_the_same_numbers(reference, tmp_path, env):
    out = tmp_path / "out"
    shutil.copytree(reference, out)  # the pair's parametric plot is cached: nothing else would read model.pt
    sb_id = run_ids(reference)[1]
    model = out / "runs" / sb_id / "model.pt"
    model.write_bytes(os.urandom(model.stat().st_size))
    rc, lines = batchgap(env, "report", str(out))
    assert rc == 0, lines
    said = [line for line in lines if str(model) in line]
    assert len(said) == 1 and "damaged" in said[0] and sb_id in said[0] and "not finished" in said[0], lines
    assert json.loads((out / "results.json").read_text())["unfinished"] == [sb_id]
    assert sb_id in (out / "report.md").read_text().split("## Runs not finished yet")[1]
    rc, lines = run(env, out)
    assert rc == 0 and errors_of(lines) == [] and sum(str(model) in line for line in lines) == 1, lines
    assert checkpoint_problem(model) is None and same_results(out, reference)


def test_a_damaged_kept_iterate_makes_the_run_train_again(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g))
    cfg = TrainConfig(epochs=3)

    def net():
        return init_model("mlp", (6,), 3, 0, width=8, depth=2)

    train(net(), data, None, cfg, batch_size=16, seed=1, run_dir=tmp_path, keep_epochs=(1,))
    want = RunDir(tmp_path).load_iterate(1)
    path = RunDir(tmp_path).iterate(1)
    path.write_bytes(path.read_bytes()[:-100])
    res = train(net(), data, None, cfg, batch_size=16, seed=1, run_dir=tmp_path, keep_epochs=(1,))
    assert res.resumed_from_epoch == 0  # the final state.pt cannot make epoch 1's iterate again
    got = RunDir(tmp_path).load_iterate(1)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_measure_never_suggests_unpickling_a_damaged_checkpoint(reference, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(Exception) as e:
        read_checkpoint(junk)
    assert "damaged" in str(e.value) and "weights_only" not in str(e.value) and "trust-pickle" not in str(e.value)
    run_dir = tmp_path / "run"
    shutil.copytree(reference / "runs" / run_ids(reference)[0], run_dir)
    (run_dir / "model.pt").write_bytes(os.urandom(4096))
    with pytest.raises(Exception, match="damaged") as e:
        read_checkpoint(run_dir)
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


def test_a_damaged_history_is_one_line(tmp_path):
    (tmp_path / "history.jsonl").write_bytes(b'{"epoch": 1}\n\xff\xfe{"ep')
    with pytest.raises(DamagedFile, match="history.jsonl: unreadable"):
        RunDir(tmp_path).read_history()


# ---------------------------------------------------------------- items 3 and 4: OS errors, one line, resumable
def cli(out, capsys, *more):
    """``batchgap run`` in this process (its --jobs workers are processes of their own): (exit code, stderr lines)."""
    capsys.readouterr()
    rc = main(["run", "default", "--out", str(out), *SETTINGS, *more])
    return rc, capsys.readouterr().err.splitlines()


def test_a_full_disk_is_one_line_exit_2_no_temporary_left_and_resumes(reference, tmp_path, mnist1d_dir, capsys,
                                                                      monkeypatch):
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    out, calls, real = tmp_path / "out", [], os.fsync

    def fsync(fd):  # the 9th file written (inside the first run's training) finds the disk full
        calls.append(fd)
        if len(calls) == 9:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    rc, lines = cli(out, capsys)
    [err] = errors_of(lines)
    assert rc == 2 and "No space left on device" in err and str(out) in err, lines
    assert not list(out.rglob("*.tmp")) and list((out / "runs").iterdir())
    monkeypatch.setattr(os, "fsync", real)  # space freed
    rc, lines = cli(out, capsys)
    assert rc == 0 and same_results(out, reference), lines


def test_a_full_file_system_in_worker_processes_is_one_line_and_resumes(reference, tmp_path, mnist1d_dir, capsys,
                                                                        monkeypatch):
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    small = tmp_path / "small"
    small.mkdir()
    mount("-t", "tmpfs", "-o", "size=2600k", "tmpfs", str(small))  # about half of what the study writes
    try:
        rc, lines = cli(small / "out", capsys, "--jobs", "2")  # the error is raised in a worker process
        [err] = errors_of(lines)
        assert rc == 2 and "No space left on device" in err and str(small) in err, lines
        assert not any(line.startswith("stopped:") for line in lines)
        mount("-o", "remount,size=64m", str(small))  # space freed
        rc, lines = cli(small / "out", capsys, "--jobs", "2")
        assert rc == 0 and same_results(small / "out", reference), lines
        assert not list((small / "out").rglob("*.tmp"))
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


def test_an_unwritable_run_directory_is_one_line_as_root_too(reference, tmp_path, mnist1d_dir, capsys, monkeypatch):
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    out = tmp_path / "out"
    run_dir = out / "runs" / run_ids(reference)[1]  # SB: the plan's first run
    run_dir.parent.mkdir(parents=True)
    run_dir.write_text("")  # a file where the run's directory goes: no chmod stops root, this does
    rc, lines = cli(out, capsys)
    [err] = errors_of(lines)
    assert rc == 2 and str(run_dir) in err and "not a directory" in err, lines
    run_dir.unlink()
    run_dir.mkdir()
    mount("--bind", str(run_dir), str(run_dir))
    try:
        mount("-o", "remount,bind,ro", str(run_dir))  # read-only, as a mount or an admin would make it
        rc, lines = cli(out, capsys)
        [err] = errors_of(lines)
        assert rc == 2 and str(run_dir) in err and "Read-only file system" in err, lines
    finally:
        subprocess.run(["umount", str(run_dir)], capture_output=True)
    rc, lines = cli(out, capsys)
    assert rc == 0 and same_results(out, reference), lines


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"a": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(FileWriteError, match=r"r\.json: cannot write \(No space left on device\)"):
        atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["r.json"]


# ---------------------------------------------------------------- item 5: the umask's permissions
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_get_the_permissions_the_umask_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_save_torch({"w": torch.ones(1)}, tmp_path / "b.pt")
        save_checkpoint({"w": torch.ones(1)}, tmp_path / "c.pt")
        with open(tmp_path / "as-open", "w"):
            pass
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert (tmp_path / "as-open").stat().st_mode & 0o777 == want
    for name in ("a.txt", "b.pt", "c.pt", "c.pt.sha256"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, name
