"""Issue 26, fault 1: the workers of ``batchgap run --jobs 2`` end with their parent, whatever ends it.

The study runs as a real subprocess. To stop its worker processes at an exact point (a run trained, its
measures about to start), each process starts with a ``sitecustomize`` hook (``HOOK`` below, test code
only, found through PYTHONPATH, so the spawned workers load it too) that patches one library function to
print "STOPPED <pid>" and wait for a gate file the test creates. The test kills or terminates the parent
there. No sleeps: every wait polls a condition with a deadline.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchgap.cli import main

SETTINGS = [*(a for s in ("train.epochs=2", "data.train_subset=300", "data.test_subset=150", "seeds=[0]",
                          "measure.interpolation_points=3", "measure.sharpness_eps=[0.001]",
                          "measure.sharpness_max_iter=2", "measure.sharpness_subspace_dim=0", "measure.hessian_top_k=0",
                          "measure.hessian_trace_probes=0", "measure.curve_directions=1", "measure.curve_points=5",
                          "measure.surface_points=0", "measure.norms=false", "measure.average_sigma=0",
                          "measure.average_sigma_relative=0", "measure.pac_bayes_delta=0", "measure.density_vectors=0")
             for a in ("--set", s)), "--threads", "1", "--no-report"]

# Loaded by every Python process the test starts (the parent and its spawned workers). With $STOP_GATE set,
# a run about to be measured prints "STOPPED <pid>" and waits until the gate file exists. With
# $STOP_NO_PDEATHSIG, a worker is not bound to its parent (as in the instant between the parent's death and
# the kernel's signal, or where only a polling watch exists): what it may still do is then tested.
HOOK = r'''
import os, threading
gate = os.environ.get("STOP_GATE")
if gate:
    import batchgap.study as study
    name = os.environ.get("STOP_IN", "geometry")  # geometry: a run trained, about to be measured
    real = getattr(study, name)
    def stop(*a, **k):
        print("STOPPED", os.getpid(), flush=True)
        done = threading.Event()
        for _ in range(2400):  # two minutes at most, so no process outlives a failed test for long
            if os.path.exists(gate) or done.wait(0.05):
                break
        return real(*a, **k)
    setattr(study, name, stop)
    if os.environ.get("STOP_NO_PDEATHSIG"):
        try:
            import batchgap.lifecycle as lifecycle
            lifecycle.die_with_parent = lambda parent, *a, **k: setattr(lifecycle, "_expected_parent", parent)
        except ImportError:
            pass
'''


def strip(runs):
    return [{k: v for k, v in r.items() if k not in ("wall_time_s", "measure_time_s")} for r in runs]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist1d_dir):
    """The study run once, uninterrupted, in one process."""
    out = tmp_path_factory.mktemp("reference") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BATCHGAP_DATA", str(mnist1d_dir))
        assert main(["run", "default", "--out", str(out), *SETTINGS, "--jobs", "1"]) == 0
    return json.loads((out / "results.json").read_text())


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def gone(pid: int) -> bool:
    if Path("/proc").is_dir():
        return _state(pid) in ("gone", "Z")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_until(condition, deadline_s: float = 10.0) -> bool:
    """Poll ``condition`` until it holds or ``deadline_s`` has passed; whether it holds."""
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            return condition()
        time.sleep(0.05)
    return True


class Stopped:
    """``batchgap run --jobs 2`` started through the hook and held with both workers at their measures."""

    def __init__(self, tmp_path: Path, mnist1d_dir, bound: bool = True, argv=("--jobs", "2"), stop_in="geometry"):
        hooks = tmp_path / "hooks"
        hooks.mkdir()
        (hooks / "sitecustomize.py").write_text(HOOK)
        self.out, self.gate = tmp_path / "out", tmp_path / "gate"
        env = {**os.environ, "BATCHGAP_DATA": str(mnist1d_dir), "OMP_NUM_THREADS": "1", "STOP_GATE": str(self.gate),
               "PYTHONPATH": os.pathsep.join([str(hooks), *filter(None, [os.environ.get("PYTHONPATH")])])}
        env["STOP_IN"] = stop_in
        if not bound:
            env["STOP_NO_PDEATHSIG"] = "1"
        self.err = tmp_path / "stderr.txt"
        with open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "batchgap", "run", "default", "--out", str(self.out),
                                          *SETTINGS, *argv], stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        self.workers = []
        for line in self.proc.stdout:
            if line.startswith("STOPPED"):
                self.workers.append(int(line.split()[1]))
                if len(self.workers) == 2:
                    break
        assert len(self.workers) == 2, self.err.read_text()

    def open_gate(self) -> None:
        self.gate.write_text("")

    def finished_runs(self) -> list[Path]:
        return sorted(self.out.glob("runs/*/result.json"))

    def close(self) -> None:
        self.open_gate()
        for pid in [self.proc.pid, *self.workers]:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def stopped(tmp_path, mnist1d_dir):
    made = []
    yield lambda **k: made.append(Stopped(tmp_path, mnist1d_dir, **k)) or made[-1]
    for s in made:
        s.close()


def test_workers_end_within_seconds_of_a_sigkilled_parent_and_a_resume_gives_the_same_numbers(
        stopped, reference, mnist1d_dir, monkeypatch):
    s = stopped()
    s.proc.send_signal(signal.SIGKILL)  # the OOM killer
    s.proc.wait()
    s.open_gate()  # a worker still alive now goes on to measure and write its finished run
    assert wait_until(lambda: all(gone(pid) for pid in s.workers)), "workers outlived their SIGKILLed parent"
    assert s.finished_runs() == []
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    assert main(["run", "default", "--out", str(s.out), *SETTINGS, "--jobs", "2"]) == 0
    assert strip(json.loads((s.out / "results.json").read_text())["runs"]) == strip(reference["runs"])


def test_sigterm_stops_the_workers_as_ctrl_c_does_and_exits_143(stopped):
    s = stopped()
    s.proc.send_signal(signal.SIGTERM)  # Slurm's time limit, scancel
    assert s.proc.wait(timeout=60) == 143
    assert wait_until(lambda: all(gone(pid) for pid in s.workers)), "workers outlived their terminated parent"
    err = s.err.read_text()
    assert "stopped: 0 of 2 runs finished and kept" in err and err.rstrip().endswith(
        "batchgap: terminated (SIGTERM); run the same command again to resume")
    assert "Traceback" not in err and not (s.out / ".lock").exists()
    s.open_gate()
    assert s.finished_runs() == []


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
def test_the_torchrun_agent_and_ranks_of_nproc_end_with_a_sigkilled_parent(stopped):
    s = stopped(argv=("--nproc", "2"), stop_in="train")  # both ranks inside their first run's training
    agents = {_ppid(pid) for pid in s.workers}
    assert len(agents) == 1 and None not in agents and agents != {s.proc.pid}
    s.workers += list(agents)  # closed with the rest if the test fails
    s.proc.send_signal(signal.SIGKILL)
    s.proc.wait()
    assert wait_until(lambda: all(gone(pid) for pid in s.workers)), "torchrun or its ranks outlived the parent"
    s.open_gate()
    assert s.finished_runs() == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
def test_sigterm_to_the_parent_of_nproc_stops_torchrun_and_its_ranks_and_exits_143(stopped):
    s = stopped(argv=("--nproc", "2"), stop_in="train")
    s.workers += list({_ppid(pid) for pid in s.workers})
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=60) == 143
    assert wait_until(lambda: all(gone(pid) for pid in s.workers)), "torchrun or its ranks outlived the parent"
    assert s.err.read_text().rstrip().endswith("batchgap: terminated (SIGTERM); run the same command again to resume")
    s.open_gate()
    assert s.finished_runs() == [] and not (s.out / ".lock").exists()


def test_a_worker_outliving_its_parent_holds_the_lock_and_writes_no_finished_run(
        stopped, reference, mnist1d_dir, monkeypatch, capsys):
    s = stopped(bound=False)  # the workers not signalled: the lock and the last check must hold alone
    s.proc.send_signal(signal.SIGKILL)
    s.proc.wait()
    assert not any(gone(pid) for pid in s.workers)
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    assert main(["run", "default", "--out", str(s.out), *SETTINGS, "--jobs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another batchgap run" in err and "still running" in err
    assert any(f"process {pid} still running" in err for pid in s.workers)
    s.open_gate()  # they measure, then find their parent gone before writing
    assert wait_until(lambda: all(gone(pid) for pid in s.workers), 60)
    assert s.finished_runs() == []
    assert main(["run", "default", "--out", str(s.out), *SETTINGS, "--jobs", "1"]) == 0  # the lock is stale now
    assert strip(json.loads((s.out / "results.json").read_text())["runs"]) == strip(reference["runs"])


@pytest.fixture
def sleeper():
    """A live process that is not this one."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_a_lock_is_held_while_any_process_it_names_lives_and_a_reused_pid_is_not_its_process(tmp_path, sleeper):
    from batchgap import lifecycle
    from batchgap.errors import UserError
    from batchgap.sharding import OutputLock

    start = lifecycle.start_time(sleeper)
    if start is None:
        pytest.skip("no /proc: start times unknown here")
    lock = tmp_path / ".lock"
    dead = _dead_pid()
    lock.write_text(f"{dead} run\nproc {dead} 1\nproc {sleeper} {start}\n")  # the parent gone, a worker alive
    with pytest.raises(UserError, match=f"pid {dead}, its worker process {sleeper} still running"):
        OutputLock(tmp_path).__enter__()
    assert lock.read_text().startswith(f"{dead} run")
    lock.write_text(f"{sleeper} run\nproc {sleeper} {start + 1}\n")  # the pid now names another process
    with OutputLock(tmp_path):
        assert lock.read_text().split()[0] == str(os.getpid())
    assert not lock.exists()
