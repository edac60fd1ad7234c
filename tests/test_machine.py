"""The machine each run records (CPU model, kernel family), the one-line note of a resume on another
machine, and the report header's list of machines."""
import json

import pytest

from batchgap import machine
from batchgap.cli import main
from batchgap.results import RunResult, from_dict

# the cheapest study that trains and measures: every costly measure off, one epoch, a small subset
TINY = [*(a for s in ("train.epochs=1", "data.train_subset=200", "data.test_subset=100",
                      "measure.interpolation_points=3", "measure.sharpness_eps=[0.001]", "measure.sharpness_max_iter=1",
                      "measure.sharpness_subspace_dim=0", "measure.hessian_top_k=0", "measure.hessian_trace_probes=0",
                      "measure.curve_directions=0", "measure.surface_points=0", "measure.norms=false",
                      "measure.average_sigma=0", "measure.average_sigma_relative=0", "measure.pac_bayes_delta=0",
                      "measure.density_vectors=0")
          for a in ("--set", s)), "--threads", "1", "--jobs", "1", "--no-report"]


def _run(out, seeds, cpu, monkeypatch):
    monkeypatch.setattr(machine, "cpu_model", lambda: cpu)
    return main(["run", "default", "--out", str(out), *TINY, "--set", f"seeds={seeds}"])


def test_a_resume_on_another_cpu_model_says_so_and_the_header_lists_both(tmp_path, mnist1d_dir, monkeypatch,
                                                                          capsys):
    from batchgap.report import write_report

    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    out = tmp_path / "out"
    assert _run(out, "[0]", "CPU A", monkeypatch) == 0
    first = capsys.readouterr().err
    assert "note:" not in first  # one machine so far: nothing to say
    assert _run(out, "[0, 1]", "CPU B", monkeypatch) == 0  # the same study, one seed more: 2 runs added
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note:") and "machines" in line]
    assert len(notes) == 1, err
    kernels = machine.kernels()
    assert f"CPU A ({kernels}) (2 runs)" in notes[0] and f"CPU B ({kernels}) (2 runs)" in notes[0]
    assert "computed on 2 machines" in notes[0] and "last digits may differ" in notes[0]
    doc = json.loads((out / "results.json").read_text())
    assert sorted(r["cpu"] for r in doc["runs"]) == ["CPU A", "CPU A", "CPU B", "CPU B"]  # 0 retrained
    assert {r["kernels"] for r in doc["runs"]} == {kernels}
    assert {r["train_step"] for r in doc["runs"]} == {"chainstep"}  # the default MLP on the tested torch
    header = write_report(out).read_text().split("## Settings")[0]
    machines = [line for line in header.splitlines() if line.startswith("Machines")]
    assert len(machines) == 1
    assert f"CPU A ({kernels}), 1 thread(s), cpu: 2 runs" in machines[0]
    assert f"CPU B ({kernels}), 1 thread(s), cpu: 2 runs" in machines[0]
    # a rerun that adds nothing still says it (the output mixes machines); an output of one machine: no note
    assert _run(out, "[0, 1]", "CPU B", monkeypatch) == 0
    assert "machines" in capsys.readouterr().err  # still 2 machines in this output: said again, once
    solo = tmp_path / "solo"
    assert _run(solo, "[0]", "CPU B", monkeypatch) == 0
    assert "note:" not in capsys.readouterr().err


def _result(cpu, kernels="k", threads=1, device="cpu"):
    return RunResult(id="r", regime="SB", batch_size=8, seed=0, lr=1e-3, lr_rule="none", optimizer="adam",
                     epochs=1, steps=1, steps_per_epoch=1, diverged_epoch=None, wall_time_s=0.0, x0="", checkpoint="",
                     history="", remedy={}, ghost_batch=None, augment="", batch_schedule=None, init_from=None,
                     device=device, threads=threads, cpu=cpu, kernels=kernels)


def test_note_counts_machines_by_cpu_model_and_kernels():
    assert machine.note([_result("A"), _result("A", threads=2)]) is None  # one machine, two thread counts
    assert machine.note([_result(None), _result("A")]) is None  # an earlier batchgap's run: nothing says
    line = machine.note([_result("A"), _result("A"), _result("A", kernels="openblas"), _result("B")])
    assert line.count("\n") == 0 and "3 machines" in line
    assert line.index("A (k) (2 runs)") < line.index("A (openblas) (1 run)") < line.index("B (k) (1 run)")


def test_summary_lists_each_machine_with_threads_device_and_runs():
    rows = machine.summary([_result("A"), _result("A"), _result("A", threads=2), _result(None, None, 1, "cuda:0")])
    assert rows == [("A (k), 1 thread(s), cpu", 2), ("A (k), 2 thread(s), cpu", 1),
                    (f"{machine.UNRECORDED}, 1 thread(s), cuda:0", 1)]


def test_results_of_an_earlier_batchgap_without_the_machine_still_load():
    doc = {k: v for k, v in vars(_result("A")).items() if k not in ("cpu", "kernels", "train_step")}
    r = from_dict(RunResult, doc, "result.json")
    assert r.cpu is None and r.kernels is None and r.train_step is None


@pytest.mark.parametrize("text, expected", [
    ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)  CPU @ 2.80GHz\n",
     "Intel(R) Xeon(R) CPU @ 2.80GHz"),
    ("processor\t: 0\nBogoMIPS\t: 50.00\nHardware\t: BCM2835\n", "BCM2835"),
])
def test_cpu_model_reads_proc_cpuinfo(monkeypatch, tmp_path, text, expected):
    import builtins

    fake = tmp_path / "cpuinfo"
    fake.write_text(text)
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(fake if p == "/proc/cpuinfo" else p, *a, **k))
    machine._cpu_model.cache_clear()
    try:
        assert machine.cpu_model() == expected
    finally:
        machine._cpu_model.cache_clear()


def test_kernels_name_the_blas_and_the_matmul_path():
    k = machine.kernels()
    assert k.startswith("BLAS ") and ("fp32 matmul on BLAS" in k or "fp32 matmul on oneDNN" in k)
