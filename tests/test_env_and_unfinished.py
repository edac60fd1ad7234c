"""Issue 26, faults 6 and 7 (correlate half): environment variables named in their own errors, a thread
count above the cores warned about, and `batchgap correlate` naming the unfinished runs it left out."""
import json

import pytest
import torch

from batchgap import devices
from batchgap.cli import main
from batchgap.errors import UserError
from test_correlate import cli, grid_runs, results, write_output
from batchgap.results import to_dict


@pytest.mark.parametrize("value, needle", [("0", "BATCHGAP_THREADS: must be at least 1, got 0"),
                                           ("two", "BATCHGAP_THREADS: expected a positive integer")])
def test_a_bad_batchgap_threads_is_named_not_a_flag_never_passed(value, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BATCHGAP_THREADS", value)
    out = tmp_path / "out"
    assert main(["run", "default", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "--threads" not in err and not out.exists()


def test_a_bad_threads_flag_is_still_named_as_the_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BATCHGAP_THREADS", "3")
    assert main(["run", "default", "--quick", "--out", str(tmp_path / "out"), "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert "--threads: must be at least 1, got 0" in err and "BATCHGAP_THREADS" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without a GPU")
@pytest.mark.parametrize("spec, needle", [("gpu", "BATCHGAP_DEVICE: unknown device 'gpu'"),
                                          ("meta", "BATCHGAP_DEVICE: 'meta' is not supported"),
                                          ("cuda", "BATCHGAP_DEVICE=cuda: this torch")])
def test_batchgap_device_errors_name_the_variable(spec, needle, monkeypatch):
    monkeypatch.setenv("BATCHGAP_DEVICE", spec)
    with pytest.raises(UserError) as e:
        devices.resolve(None)
    assert needle in str(e.value) and "--device" not in str(e.value)
    with pytest.raises(UserError, match="^--device"):  # the flag, when given, is named as the flag
        devices.resolve(spec)


def test_more_threads_than_cores_is_warned_in_one_line(tmp_path, mnist1d_dir, monkeypatch, capsys):
    """A warning, not a refusal: the thread count is part of a run's id, so a run made on a larger machine
    can only be reproduced or resumed with it. The run goes on (here stopped right after the check)."""
    from batchgap import study as study_mod

    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    monkeypatch.setattr(devices, "cores", lambda: 2)
    seen = []
    monkeypatch.setattr(study_mod, "run_study", lambda cfg, *a, **k: seen.append(cfg) or None)
    for threads, warned in (("999", True), ("2", False)):
        monkeypatch.setenv("BATCHGAP_THREADS", threads)
        assert main(["run", "default", "--quick", "--out", str(tmp_path / "out")]) == 0
        err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
        assert len(err) == int(warned)
        if warned:
            assert "999 torch threads per run on 2 available core(s)" in err[0]
        assert {r.train.threads for r in seen[-1].regimes} == {int(threads)}


def test_correlate_names_the_unfinished_runs_of_each_output(tmp_path, capsys):
    runs, _, _ = grid_runs()
    done = write_output(tmp_path, runs, "done")
    part = tmp_path / "part"
    part.mkdir()
    doc = to_dict(results(runs[:5], "part"))
    doc["unfinished"] = ["r5", "r6", "r7"]  # as `batchgap report` merges shards not all finished
    (part / "results.json").write_text(json.dumps(doc))
    code, err = cli(capsys, done, part, "--out", tmp_path / "c")
    assert code == 0, err
    line = [x for x in err.splitlines() if "unfinished" in x]
    assert len(line) == 1 and f"{part}: 3 unfinished run(s)" in line[0] and "r5, r6, r7" in line[0]
    md = (tmp_path / "c" / "correlation.md").read_text()
    assert "Unfinished runs" in md and f"`{part}`: 3 run(s): `r5`, `r6`, `r7`" in md and f"- `{done}`" not in md
    for entry in json.loads((tmp_path / "c" / "correlation.json").read_text()):
        assert entry["unfinished"] == {str(part): ["r5", "r6", "r7"]}
    code, err = cli(capsys, done)  # every run finished: nothing said
    assert code == 0 and "unfinished" not in err
    assert "Unfinished" not in (done / "correlation.md").read_text()
