"""Shards of a study (``--shard I/N``), run at once into one --out, merged by ``batchgap report``."""
import json
import os
import subprocess
import sys

import pytest

from batchgap.cli import main
from batchgap.errors import UserError
from batchgap.sharding import parse_shard, select

SETTINGS = [*(a for s in ("train.epochs=2", "data.train_subset=400", "data.test_subset=200", "seeds=[0, 1]",
                          "measure.interpolation_points=3", "measure.sharpness_eps=[0.001]",
                          "measure.sharpness_max_iter=2", "measure.sharpness_subspace_dim=0",
                          "measure.hessian_top_k=0", "measure.hessian_trace_probes=0",
                          "measure.curve_directions=1", "measure.curve_points=5", "measure.surface_points=0",
                          "measure.norms=false", "measure.average_sigma=0", "measure.average_sigma_relative=0",
                          "measure.pac_bayes_delta=0", "measure.density_vectors=0")
              for a in ("--set", s)), "--threads", "1"]


def strip(runs):
    return [{k: v for k, v in r.items() if k not in ("wall_time_s", "measure_time_s")} for r in runs]


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory, mnist1d_dir):
    out = tmp_path_factory.mktemp("unsharded") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BATCHGAP_DATA", str(mnist1d_dir))
        assert main(["run", "default", "--out", str(out), "--no-report", *SETTINGS]) == 0
    return json.loads((out / "results.json").read_text())


def test_shards_cover_every_run_once_in_plan_order():
    runs = list(range(7))
    shares = [select(runs, (i, 3)) for i in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(shares, [])) == runs and select(runs, None) == runs


def test_a_warm_started_run_goes_with_the_run_it_starts_from():
    # plan order: the runs from x0 (seeds outer), then the warm starts; "W-s1" starts from "SB-s1"
    runs = [("SB-s0", None), ("LB-s0", None), ("SB-s1", None), ("LB-s1", None), ("W-s0", "SB-s0"), ("W-s1", "SB-s1"),
            ("W2-s1", "W-s1")]
    shares = [[r[0] for r in select(runs, (i, 2), depends_on=lambda r: r[1], id_of=lambda r: r[0])] for i in range(2)]
    assert shares == [["SB-s0", "SB-s1", "W-s0", "W-s1", "W2-s1"], ["LB-s0", "LB-s1"]]


@pytest.mark.parametrize("text", ["4/4", "-1/4", "1/0", "a/b", "1", "", "1/2/3", "0.5/2"])
def test_a_bad_shard_is_refused(text):
    with pytest.raises(UserError, match=r"--shard: expected I/N with 0 <= I < N"):
        parse_shard(text)
    assert parse_shard(" 3/4 ") == (3, 4)


def test_bad_shard_on_the_command_line_is_one_line_and_writes_nothing(tmp_path, mnist1d_dir, monkeypatch, capsys):
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    assert main(["run", "default", "--out", str(tmp_path / "out"), "--shard", "2/2", *SETTINGS]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--shard" in err and not (tmp_path / "out").exists()


def test_two_shards_at_once_then_report_give_the_unsharded_results(unsharded, tmp_path, mnist1d_dir, monkeypatch,
                                                                   capsys):
    out = tmp_path / "out"
    env = {**os.environ, "BATCHGAP_DATA": str(mnist1d_dir), "OMP_NUM_THREADS": "1"}
    # shard 0 alone first: SB of both seeds; a report then merges what has finished
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    assert main(["run", "default", "--out", str(out), "--shard", "0/2", *SETTINGS]) == 0
    assert not (out / "results.json").exists()
    assert main(["report", str(out)]) == 0
    partial = json.loads((out / "results.json").read_text())
    assert [r["regime"] for r in partial["runs"]] == ["SB", "SB"] and partial["pairs"] == []
    assert partial["unfinished"] == [r["id"] for r in unsharded["runs"] if r["regime"] == "LB"]
    assert "Runs not finished yet" in (out / "report.md").read_text()
    # then both shards at once, as two tasks of a job array (shard 0 finds its runs done)
    procs = [subprocess.Popen([sys.executable, "-m", "batchgap", "run", "default", "--out", str(out),
                               "--shard", f"{i}/2", *SETTINGS], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (1, 0)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert "batchgap report" in err
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    merged = json.loads((out / "results.json").read_text())
    assert strip(merged["runs"]) == strip(unsharded["runs"])
    assert merged["pairs"] == unsharded["pairs"] and merged["unfinished"] == []
    assert merged["summary"][1]["test_accuracy"] == unsharded["summary"][1]["test_accuracy"]  # LB
    assert "Runs not finished yet" not in (out / "report.md").read_text()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".lock")]
    # a report with nothing new to merge leaves results.json as it is
    before = (out / "results.json").read_bytes()
    assert main(["report", str(out)]) == 0
    assert (out / "results.json").read_bytes() == before


@pytest.fixture
def holder():
    """A live process whose pid a test writes into lock files."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("lock, content, argv, needle", [
    (".lock-shard-1-of-2", "shard 1/2 KEY", [], "run the other shards"),
    (".lock", "run", ["--shard", "0/2"], "another batchgap run"),
    (".lock-shard-0-of-2", "shard 0/2 KEY", ["--shard", "0/2"], "another batchgap run --shard 0/2"),
    (".lock-shard-1-of-3", "shard 1/3 KEY", ["--shard", "0/2"], "splits the study 3 ways"),
    (".lock-shard-1-of-2", "shard 1/2 OTHER", ["--shard", "0/2"], "runs other settings there"),
])
def test_runs_that_would_collide_are_refused(lock, content, argv, needle, holder, tmp_path, mnist1d_dir, monkeypatch,
                                             capsys):
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    out = tmp_path / "out"
    out.mkdir()
    (out / lock).write_text(f"{holder} {content}")
    assert main(["run", "default", "--out", str(out), *SETTINGS, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
    assert not (out / "runs").exists() and (out / lock).exists()
