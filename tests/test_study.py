"""Studies end to end: results.json, report, resume, locks, every built-in study with --quick."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from batchgap import build, devices, study as study_mod
from batchgap.results import load_results
from batchgap.cli import main
from batchgap.studies import regime_study_names
from data_fixtures import install_fake_data

SMALL = ["--set", "train.epochs=2", "--set", "data.train_subset=400", "--set", "data.test_subset=200",
         "--set", "seeds=[0, 1]", "--set", "measure.interpolation_points=5", "--set", "measure.sharpness_max_iter=3",
         "--set", "measure.sharpness_subspace_dim=10", "--set", "measure.hessian_trace_probes=3",
         "--set", "measure.curve_directions=2", "--set", "measure.curve_points=7", "--set", "measure.surface_points=5",
         "--set", "measure.density_steps=4", "--set", "measure.flatness_samples=2"]


def run_cli(*args):
    return main(["run", *args])


@pytest.fixture(scope="module")
def default_out(tmp_path_factory, mnist1d_dir):
    out = tmp_path_factory.mktemp("study") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BATCHGAP_DATA", str(mnist1d_dir))
        assert run_cli("default", "--out", str(out), *SMALL) == 0
    return out


@pytest.fixture
def default_run(default_out, tmp_path, mnist1d_dir, monkeypatch):
    """A private copy of one finished small default study (tests may change it)."""
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    shutil.copytree(default_out, tmp_path / "out")
    return tmp_path / "out"


def test_results_json_has_every_run_and_a_correct_summary(default_run):
    doc = json.loads((default_run / "results.json").read_text())
    assert doc["study"]["name"] == "default"
    runs = doc["runs"]
    assert sorted((r["regime"], r["seed"]) for r in runs) == [("LB", 0), ("LB", 1), ("SB", 0), ("SB", 1)]
    for r in runs:
        for key in ("id", "regime", "batch_size", "seed", "lr", "epochs", "train", "test", "distance_from_init",
                    "wall_time_s"):
            assert key in r
        assert 0 <= r["train"]["accuracy"] <= 1 and 0 <= r["test"]["accuracy"] <= 1
        assert r["distance_from_init"]["value"] > 0
        assert r["batch_size"] == (32 if r["regime"] == "SB" else 40)  # LB = 10% of 400
    sb = [r["test"]["accuracy"] for r in runs if r["regime"] == "SB"]
    lb = [r["test"]["accuracy"] for r in runs if r["regime"] == "LB"]
    summary = {row["name"]: row for row in doc["summary"]}
    assert summary["SB"]["test_accuracy"]["mean"] == pytest.approx(np.mean(sb))
    assert summary["LB"]["test_accuracy"]["std"] == pytest.approx(np.std(lb, ddof=1))
    comp = doc["comparison"]
    assert comp["test_accuracy_gap"] == pytest.approx(np.mean(sb) - np.mean(lb))
    assert comp["p_value"] == pytest.approx(stats.ttest_ind(sb, lb, equal_var=False).pvalue)
    # the per-run test accuracy is the model's, re-evaluated from its checkpoint
    from batchgap.config import from_dict
    from batchgap.landscape import evaluate
    cfg = from_dict(doc["study"])  # results.json's study round-trips to the same config
    assert cfg.to_dict() == doc["study"]
    ds = build.prepare_data(cfg)
    model = build.model(cfg, ds, torch.load(default_run / runs[0]["checkpoint"], weights_only=True))
    assert evaluate(model, ds.test).accuracy == pytest.approx(runs[0]["test"]["accuracy"])


def test_regimes_of_one_seed_share_x0(default_run):
    doc = json.loads((default_run / "results.json").read_text())
    by_seed = {}
    for r in doc["runs"]:
        by_seed.setdefault(r["seed"], set()).add(r["x0"])
    assert all(len(v) == 1 for v in by_seed.values()) and len(by_seed) == 2
    x0 = [torch.load(default_run / next(iter(v)), weights_only=True) for v in by_seed.values()]
    assert not torch.equal(next(iter(x0[0].values())), next(iter(x0[1].values())))


def test_parametric_plot_endpoints_match_the_runs(default_run):
    doc = json.loads((default_run / "results.json").read_text())
    pair = doc["pairs"][0]
    alphas = pair["parametric"]["alphas"]
    assert len(alphas) == 7 and alphas[0] == -1.0 and alphas[-1] == 2.0  # 5 points plus alpha = 0 and 1
    runs = {r["id"]: r for r in doc["runs"]}
    # alpha = 0 is SB and alpha = 1 is LB: with BN statistics recomputed on the train set the numbers
    # differ slightly from the runs' own (running statistics), but accuracy must be close
    i0, i1 = alphas.index(0.0), alphas.index(1.0)
    assert abs(pair["parametric"]["test"]["accuracy"][i0] - runs[pair["sb"]]["test"]["accuracy"]) < 0.05
    assert abs(pair["parametric"]["test"]["accuracy"][i1] - runs[pair["lb"]]["test"]["accuracy"]) < 0.05
    assert "recomputed" in pair["parametric"]["protocol"]["bn"]


def test_report_has_the_tables_and_figures(default_run):
    text = (default_run / "report.md").read_text()
    for needle in ("Table 2", "Welch's t-test, 2 and 2 seeds: t = ", "Figure 2", "Figure 3",
                   "Distance from the start point",
                   "PyTorch", "s of training and", "figures/accuracy_curves.png", "figures/parametric_plot.png",
                   "Tables 3 and 4", "ε-sharpness, full ε = 0.001", "top Hessian eigenvalue", "adaptive sharpness",
                   "Reading the numbers", "LB/SB = ", "What the measures are", "Second order, LB", "205.14 ± 69.52"):
        assert needle in text
    for fig in ("accuracy_curves.png", "parametric_plot.png", "sharpness_comparison.png", "loss_surface.png"):
        data = (default_run / "figures" / fig).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_rerun_skips_finished_runs_and_reproduces_results(default_run, monkeypatch):
    before = json.loads((default_run / "results.json").read_text())
    def boom(*a, **k):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(study_mod, "train", boom)
    assert run_cli("default", "--out", str(default_run), *SMALL) == 0
    after = json.loads((default_run / "results.json").read_text())
    assert after["runs"] == before["runs"] and after["pairs"] == before["pairs"]


def test_a_changed_setting_makes_new_runs(default_run):
    assert run_cli("default", "--out", str(default_run), *SMALL, "--set", "regimes.LB.lr_rule=sqrt", "--force") == 0
    doc = json.loads((default_run / "results.json").read_text())
    assert len(doc["runs"]) == 4
    lb = [r for r in doc["runs"] if r["regime"] == "LB"]
    assert all(r["lr"] == pytest.approx(1e-3 * (40 / 256) ** 0.5) for r in lb)
    assert len(list((default_run / "runs").iterdir())) == 6  # SB reused, LB new


def test_same_study_twice_gives_identical_numbers(tmp_path, mnist1d_dir, monkeypatch):
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    docs = []
    for name in ("a", "b"):
        torch.manual_seed(len(name) * 17)  # unrelated global state must not matter
        assert run_cli("default", "--out", str(tmp_path / name), *SMALL, "--set", "seeds=[3]") == 0
        docs.append(json.loads((tmp_path / name / "results.json").read_text()))
    def strip(rs):
        """The runs without their timings."""
        return [{k: v for k, v in r.items() if k not in ("wall_time_s", "measure_time_s")} for r in rs]

    assert strip(docs[0]["runs"]) == strip(docs[1]["runs"])


def test_a_second_run_into_a_locked_directory_refuses(tmp_path, mnist1d_dir, monkeypatch, capsys):
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(str(holder.pid))
        assert run_cli("default", "--out", str(out), *SMALL) == 2
        err = capsys.readouterr().err
        assert "another batchgap run" in err and err.count("\n") == 1
        assert not (out / "results.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and the next run takes it over
    assert run_cli("default", "--out", str(out), *SMALL, "--no-report") == 0
    assert not (out / ".lock").exists()


def test_divergent_runs_are_marked_and_reported(tmp_path, mnist1d_dir, monkeypatch):
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    out = tmp_path / "out"
    assert run_cli("default", "--out", str(out), *SMALL, "--set", "model.bn=none", "--set", "train.optimizer=sgd",
                   "--set", "regimes.LB.lr=1e9", "--set", "train.momentum=0.0") == 0
    doc = json.loads((out / "results.json").read_text())
    lb = [r for r in doc["runs"] if r["regime"] == "LB"]
    assert all(r["diverged_epoch"] for r in lb)
    assert load_results(out).regime("LB").diverged == 2
    assert "diverged at epoch" in (out / "report.md").read_text()


def _needs_files(name):
    from batchgap.config import load_study
    from batchgap.data import DATASETS
    from batchgap.studies import find_study

    spec = DATASETS.get(load_study(find_study(name)).data.name)  # None: a loader MODULE:CALLABLE (char-lm)
    return spec is not None and spec.needs_files


# C3 and C4 are C1 and C2 with 100 outputs, whose quick runs measure everything on the same network: here the
# curvature measures (Lanczos, SLQ and the trace, PAC-Bayes' search, the subspace solve) are left to those, which
# halves the two slowest quick runs of the suite (C4: 178 s in CI)
SAME_NETWORK = {name: ["measure.hessian_top_k=0", "measure.hessian_trace_probes=0", "measure.density_vectors=0",
                       "measure.pac_bayes_delta=0", "measure.sharpness_subspace_dim=0"]
                for name in ("keskar-c3", "keskar-c4")}


# measures: test_measures_study; char-lm: test_charlm (its --quick, with assertions of its own)
@pytest.mark.parametrize("name", [n for n in regime_study_names() if n not in ("default", "measures", "char-lm")])
def test_every_builtin_study_runs_quick(name, tmp_path, monkeypatch, mnist1d_dir):
    """Paper-scale studies on format-exact fake files; the MNIST-1D experiments on the real data."""
    jobs = []
    if _needs_files(name):  # the fake files' checksums are trusted in this process only: no worker processes
        data_dir, jobs = install_fake_data(monkeypatch, tmp_path / "data", n_train=300, n_test=150), ["--jobs", "1"]
        jobs += ["--set", "measure.geometry_examples=4"]  # conv nets: every measure, 4 examples
        jobs += [a for s in SAME_NETWORK.get(name, ()) for a in ("--set", s)]
    else:
        data_dir = mnist1d_dir
    out = tmp_path / "out"
    assert run_cli(name, "--quick", "--out", str(out), "--data-dir", str(data_dir), *jobs) == 0
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["runs"]) >= 2 and all(r.get("complete") for r in doc["runs"])
    assert (out / "report.md").exists() and (out / "figures" / "parametric_plot.png").exists()
    report = (out / "report.md").read_text()
    for figure in doc["study"]["figures"]:  # each experiment's own figure is drawn and shown in the report
        png = EXPERIMENT_FIGURES[figure]
        assert f"](figures/{png})" in report and (out / "figures" / png).read_bytes()[:4] == b"\x89PNG"
    if "remedies" in doc["study"]["figures"]:
        table = [line for line in report.splitlines() if line.startswith("| ") and "(batch " in line]
        assert len(table) == len(doc["study"]["regimes"])


EXPERIMENT_FIGURES = {"batch-sweep": "batch_sweep.png", "warm-start": "warm_start.png", "remedies": "remedies.png",
                      "trajectory": "sharpness_trajectory.png", "noise-scale": "noise_scale.png"}


@pytest.mark.parametrize("name", [n for n in regime_study_names() if _needs_files(n)])
def test_paper_studies_without_their_data_stop_with_one_line(name, tmp_path, capsys):
    assert run_cli(name, "--quick", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "empty")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "batchgap data download" in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_geometry_is_measured_per_run_and_summarized(default_run):
    doc = json.loads((default_run / "results.json").read_text())
    for r in doc["runs"]:
        g = r["geometry"]
        keys = sorted((e["subspace_dim"] or 0, e["eps"]) for e in g["sharpness"])
        assert keys == [(0, 0.0005), (0, 0.001), (10, 0.0005), (10, 0.001)]
        assert all(e["value"] >= 0 and e["nfev"] <= e["max_fun"] and e["n"] == 400 for e in g["sharpness"])
        assert g["hessian_eigenvalues"]["eigenvalues"][0] > 0 and g["hessian_trace"]["n_probes"] == 3
        assert len(g["curves"]["loss"]) == 2 and len(g["curves"]["alphas"]) == 7
        # the curves pass through the model's own training loss at alpha = 0
        i0 = g["curves"]["alphas"].index(0.0)
        assert all(row[i0] == pytest.approx(r["train"]["loss"], rel=1e-5) for row in g["curves"]["loss"])
        assert ("surface" in g) == (r["seed"] == 0)
    sb = [next(e["value"] for e in r["geometry"]["sharpness"] if e["eps"] == 0.001 and e["subspace_dim"] is None)
          for r in doc["runs"] if r["regime"] == "SB"]
    lb = [next(e["value"] for e in r["geometry"]["sharpness"] if e["eps"] == 0.001 and e["subspace_dim"] is None)
          for r in doc["runs"] if r["regime"] == "LB"]
    res = load_results(default_run)
    assert res.regime("SB").sharp(0.001, None).mean == pytest.approx(np.mean(sb))
    assert res.comparison.ratio("sharpness", eps=0.001) == pytest.approx(np.mean(lb) / np.mean(sb))
    assert res.comparison.ratio("sharpness", eps=0.001, subspace_dim=10) == pytest.approx(
        res.regime("LB").sharp(0.001, 10).mean / res.regime("SB").sharp(0.001, 10).mean)


def test_changed_measure_settings_remeasure_without_retraining(default_run, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(study_mod, "train", boom)
    assert run_cli("default", "--out", str(default_run), *SMALL, "--set", "measure.hessian_trace_probes=4") == 0
    doc = json.loads((default_run / "results.json").read_text())
    assert all(r["geometry"]["hessian_trace"]["n_probes"] == 4 for r in doc["runs"])


def test_the_numbers_do_not_depend_on_jobs(default_out, tmp_path, mnist1d_dir, monkeypatch):
    """Issue 13, fault 2: --jobs chooses how many runs go side by side, nothing else. The fixture ran with
    the default (2 jobs on 2 cores), this with one job: the same run ids and the same numbers, bitwise."""
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    monkeypatch.setattr(devices, "cores", lambda: 2)
    out = tmp_path / "seq"
    assert run_cli("default", "--out", str(out), *SMALL, "--jobs", "1") == 0
    seq = json.loads((out / "results.json").read_text())
    par = json.loads((default_out / "results.json").read_text())
    def strip(rs):
        """The runs without their timings."""
        return [{k: v for k, v in r.items() if k not in ("wall_time_s", "measure_time_s")} for r in rs]

    assert strip(par["runs"]) == strip(seq["runs"]) and all(r["threads"] == 1 for r in seq["runs"])


def test_the_thread_count_is_part_of_a_run(default_out, tmp_path, mnist1d_dir, monkeypatch):
    """Another thread count is another run (float rounding depends on it): new ids, recorded threads."""
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    out = tmp_path / "out"
    shutil.copytree(default_out, out)
    seen = []
    real = study_mod.execute_runs
    monkeypatch.setattr(study_mod, "execute_runs", lambda *a, **k: seen.append(a[3]) or real(*a, **k))
    monkeypatch.setattr(study_mod, "train", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("trains")))
    with pytest.raises(RuntimeError, match="trains"):  # nothing finished for 2 threads: it must train
        main(["run", "default", "--out", str(out), *SMALL, "--threads", "2", "--jobs", "1", "--force"])
    ids_1 = {r["id"] for r in json.loads((default_out / "results.json").read_text())["runs"]}
    assert len(seen[0]) == 4 and not {r.id for r in seen[0]} & ids_1 and all(r.threads == 2 for r in seen[0])


def test_jobs_default_to_the_cores_available(tmp_path, mnist1d_dir, monkeypatch):
    """Issue 13, fault 3: without --jobs, as many runs side by side as the cores hold at each run's threads."""
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    seen = []
    monkeypatch.setattr(study_mod, "execute_runs", lambda *a, **k: seen.append(k["jobs"]) or [])
    monkeypatch.setattr(study_mod, "_results", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    for cores, threads, jobs in ((2, 1, 2), (8, 1, 4), (8, 2, 4), (2, 2, 1), (3, 2, 1)):
        monkeypatch.setattr(devices, "cores", lambda c=cores: c)
        main(["run", "default", "--out", str(tmp_path / f"o{cores}{threads}"), *SMALL, "--threads", str(threads)])
        assert seen[-1] == jobs  # 4 runs: never more jobs than runs


def test_a_paper_scale_study_runs_shrunk_with_set(tmp_path, monkeypatch):
    """--paper-scale's C1/CIFAR-10 setting (batch-statistics BN, measurements along training) runs end to
    end on format-exact fake CIFAR-10 files, shrunk with --set as the README says."""
    data_dir = install_fake_data(monkeypatch, tmp_path / "data", names=("cifar10",), n_train=200, n_test=100)
    out = tmp_path / "out"
    shrink = ["seeds=[0]", "train.epochs=2", "regimes.SB.batch_size=20", "measure.trajectory_epochs=[1, 2]",
              "measure.sharpness_max_iter=2", "measure.hessian_top_k=0", "train.eval_batch_size=100",
              "measure.eval_batch_size=100", "measure.interpolation_points=3",
              # the generalization measures have their own tests; on C1 they took 140 of this test's 200 s
              "measure.density_vectors=0", "measure.pac_bayes_delta=0", "measure.average_sigma=0",
              "measure.average_sigma_relative=0", "measure.norms=false"]
    assert run_cli("sharpness-trajectory", "--paper-scale", "--out", str(out), "--data-dir", str(data_dir),
                   "--jobs", "1", *[a for s in shrink for a in ("--set", s)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["study"]["model"]["name"] == "C1" and doc["study"]["data"]["name"] == "cifar10"
    assert {(r["regime"], r["batch_size"]) for r in doc["runs"]} == {("SB", 20), ("LB", 20)}
    assert all([p["epoch"] for p in r["trajectory"]] == [1, 2] for r in doc["runs"])
    assert (out / "figures" / "sharpness_trajectory.png").exists()


def test_each_run_records_the_device_it_trained_on(default_out):
    doc = json.loads((default_out / "results.json").read_text())
    device = "cpu" if not torch.cuda.is_available() else doc["environment"]["device"]
    assert doc["environment"]["device"] == device and all(r["device"] == device for r in doc["runs"])


def test_the_report_flags_regimes_that_did_not_fit_the_training_set(default_run):
    from batchgap.report import write_report

    doc = json.loads((default_run / "results.json").read_text())
    for fitted in (False, True):
        for row in doc["summary"]:
            row["train_accuracy"]["mean"] = 0.995 if row["name"] == "SB" else 1.0 if fitted else 0.9
        (default_run / "results.json").write_text(json.dumps(doc))
        line = [x for x in write_report(default_run).read_text().splitlines() if x.startswith("**Not fitted:**")]
        if fitted:
            assert not line
        else:
            assert len(line) == 1 and "LB (90.0% after" in line[0] and "SB (" not in line[0]


# scipy, on the constant SB
@pytest.mark.filterwarnings("ignore:Precision loss occurred in moment calculation:RuntimeWarning")
def test_a_gap_without_variance_is_reported_without_a_t_test():
    """Two seeds per regime that agree exactly (a tiny quick run can): Welch's t is 0/0 there, so the
    comparison says so instead of carrying scipy's nan p-value (and its warning) into the report."""
    import warnings
    from batchgap.config import from_dict
    from batchgap.report import _table2
    from batchgap.results import Metrics, Results, RunResult
    from batchgap.stats import compare, summarize
    cfg = from_dict({"name": "t", "regimes": [{"name": "SB", "batch_size": 32}, {"name": "LB", "batch_size": 512}],
                     "compare": ["SB", "LB"], "seeds": [0, 1]})

    def run(regime, seed, acc):
        return RunResult(id=f"{regime}-s{seed}", regime=regime, seed=seed, batch_size=32 if regime == "SB" else 512,
                         lr=1e-3, lr_rule="none", optimizer="adam", epochs=1, steps=10, steps_per_epoch=10,
                         diverged_epoch=None, wall_time_s=1.0, x0="", checkpoint="", history="", remedy={},
                         ghost_batch=None, augment="none", batch_schedule=None, init_from=None, device="cpu", threads=1,
                         train=Metrics(0.01, 1.0), test=Metrics(1.0, acc), distance_from_init={"value": 1.0})
    for lb_accs, tested in (([0.5, 0.5], False), ([0.5, 0.6], True)):
        runs = [run("SB", 0, 0.75), run("SB", 1, 0.75), run("LB", 0, lb_accs[0]), run("LB", 1, lb_accs[1])]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = summarize(["SB", "LB"], runs)
            comp = compare("SB", "LB", runs, summary)
        assert comp.test_accuracy_gap == pytest.approx(0.75 - np.mean(lb_accs))
        assert (comp.p_value is not None) is tested and comp.test.startswith("none") is not tested
        if tested:  # one constant regime still has a Welch test (its variance is the other's alone)
            assert comp.p_value == pytest.approx(stats.ttest_ind([0.75, 0.75], lb_accs, equal_var=False).pvalue)
        else:
            assert not [str(w.message) for w in caught]
        res = Results(study=cfg.to_dict(), data={}, environment={}, command=None, runs=runs, pairs=[], summary=summary,
                      comparison=comp, wall_time_s=1.0)
        line = "\n".join(_table2(res))
        assert ("no t-test" in line) is not tested and ("Welch's t-test" in line) is tested and "nan" not in line


def test_results_of_another_schema_are_refused_with_one_line(default_run, capsys):
    """results.json carries its schema version; the report refuses one it does not know."""
    doc = json.loads((default_run / "results.json").read_text())
    assert doc["schema"] == 2 and all(r["schema"] == 2 for r in doc["runs"])
    for schema in (1, 3):
        doc["schema"] = schema
        (default_run / "results.json").write_text(json.dumps(doc))
        assert main(["report", str(default_run)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"results schema {schema}" in err
    del doc["schema"]  # a file written before the schema existed
    (default_run / "results.json").write_text(json.dumps(doc))
    assert main(["report", str(default_run)]) == 2 and "results schema 1" in capsys.readouterr().err


def test_results_round_trip_through_the_schema(default_run):
    """Written and read back, the typed results are the same document (nothing lost or renamed)."""
    from batchgap.results import to_dict
    doc = json.loads((default_run / "results.json").read_text())
    assert json.loads(json.dumps(to_dict(load_results(default_run)))) == doc


def test_a_worker_that_cannot_load_the_data_stops_the_study_with_one_line(tmp_path, monkeypatch, capsys):
    """Fake files trusted in this process alone: the --jobs workers, which load the data themselves,
    refuse them; the study stops with their one line, not a broken process pool."""
    data_dir = install_fake_data(monkeypatch, tmp_path / "data", names=("mnist",), n_train=200, n_test=100)
    assert run_cli("keskar-f1", "--quick", "--out", str(tmp_path / "out"), "--data-dir", str(data_dir),
                   "--jobs", "2", "--no-report") == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("batchgap: error: a --jobs worker process could not load the data")
    assert "expected f68b3c2d" in err[-1] and not any("Traceback" in line for line in err)


def test_one_output_directory_holds_one_study(default_run, capsys):
    """Issue 19: another study, or this one with settings that change its runs, is refused with one line
    naming what differs and the way out; --force makes the directory the new study's; adding seeds resumes."""
    before = (default_run / "results.json").read_text()
    for extra, needle in ((["--set", "train.epochs=1"], "train.epochs: 2 here, 1 now"),
                          (["--set", "regimes.LB.batch_size=80"], 'regimes.LB.batch_size: "10%" here, 80 now')):
        assert run_cli("default", "--out", str(default_run), *SMALL, *extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and "--force" in err and "another --out" in err
    assert run_cli("warm-start", "--quick", "--out", str(default_run)) == 2
    assert "study 'default' is there, this is 'warm-start'" in capsys.readouterr().err
    assert (default_run / "results.json").read_text() == before  # nothing was touched
    # the same study with one seed more resumes: the two finished seeds are not trained again
    assert run_cli("default", "--out", str(default_run), *SMALL, "--set", "seeds=[0, 1, 2]", "--no-report") == 0
    assert "4 of 6 runs found finished" in capsys.readouterr().err
    assert len(json.loads((default_run / "results.json").read_text())["runs"]) == 6


def test_report_refuses_a_directory_that_mixes_studies(default_run, capsys):
    doc = json.loads((default_run / "results.json").read_text())
    plan = json.loads((default_run / "plan.json").read_text())
    plan["study"]["train"]["epochs"] = 7  # as an older batchgap left it: the plan of one study, results of another
    (default_run / "plan.json").write_text(json.dumps(plan))
    assert main(["report", str(default_run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "of different studies (train.epochs: 2 here, 7 now)" in err
    assert json.loads((default_run / "results.json").read_text()) == doc


def test_ctrl_c_under_jobs_stops_the_workers_at_once(tmp_path, mnist1d_dir):
    """Issue 19: an interrupt under --jobs 2 stops both workers within seconds (each run long enough that
    waiting for them would take minutes), says so, keeps what finished, and the same command resumes."""
    import signal as sig
    out = tmp_path / "out"
    args = [sys.executable, "-m", "batchgap", "run", "default", "--out", str(out), "--jobs", "2", "--no-report",
            *SMALL, "--set", "train.epochs=400"]
    env = {**__import__("os").environ, "BATCHGAP_DATA": str(mnist1d_dir)}
    # a shell's background job inherits SIGINT ignored, and Python then keeps it ignored: restore the default
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                            preexec_fn=lambda: sig.signal(sig.SIGINT, sig.SIG_DFL))
    try:
        for line in proc.stderr:
            if "worker processes" in line:
                break
        children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == proc.pid
                    and b"resource_tracker" not in _cmdline(p)]  # the workers, not multiprocessing's tracker
        proc.send_signal(sig.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 130  # 400 epochs a run: minutes if the workers went on
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped: 0 of 4 runs finished and kept" in rest and "run the same command again to resume" in rest
    assert len(children) == 2 and not [c for c in children if Path(f"/proc/{c}").exists() and _state(c) != "Z"]
    assert not (out / "results.json").exists()


def _ppid(p):
    try:
        return int(p.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(p):
    try:
        return p.joinpath("cmdline").read_bytes()
    except OSError:
        return b""


def _state(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_report_refuses_runs_measured_with_other_settings(default_run, capsys):
    """A report does not measure: when the plan's measure settings differ from the runs' (the settings or
    their defaults changed since), it says how to re-measure instead of dropping every run."""
    before = (default_run / "results.json").read_text()
    plan = json.loads((default_run / "plan.json").read_text())
    plan["study"]["measure"]["curve_points"] = 9
    (default_run / "plan.json").write_text(json.dumps(plan))
    (default_run / "results.json").unlink()
    assert main(["report", str(default_run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "4 run(s) were measured with other measure settings" in err
    assert not (default_run / "results.json").exists()
    (default_run / "results.json").write_text(before)
