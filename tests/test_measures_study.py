"""The built-in `measures` study end to end (--quick): every generalization measure on every run, the report's
sections, and `batchgap correlate` over its output reproducing the report's table."""
import json

import pytest

from batchgap.cli import main
from batchgap.correlate import correlate
from batchgap.report.generalization import draws
from batchgap.results import load_results

NEW = ("norms", "average_sharpness", "average_sharpness_mag", "pac_bayes", "pac_bayes_mag", "pac_bayes_error",
       "pac_bayes_mag_error", "worst_case", "worst_case_mag", "density")


@pytest.fixture(scope="module")
def quick(tmp_path_factory, mnist1d_dir):
    out = tmp_path_factory.mktemp("measures")
    mp = pytest.MonkeyPatch()
    mp.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    try:
        assert main(["run", "measures", "--quick", "--out", str(out)]) == 0
    finally:
        mp.undo()
    return out


def test_every_run_carries_every_measure_with_its_protocol(quick):
    res = load_results(quick)
    assert len(res.runs) == 8
    for r in res.runs:
        assert set(NEW) <= set(r.geometry), r.id
        for key in NEW:
            g = r.geometry[key]
            assert g["n"] == r.train.n and g["bn"] == "eval" and g["num_params"] > 0, (r.id, key)
        assert r.geometry["pac_bayes"]["bracketed"] and r.geometry["pac_bayes"]["value"] > 0
        # magnitude-aware PAC-Bayes uses relative noise: its sigma is on another scale than the plain one
        assert r.geometry["pac_bayes_mag"]["sigma"] > r.geometry["pac_bayes"]["sigma"]
        for key, target in (("pac_bayes", "loss"), ("pac_bayes_mag", "loss"), ("pac_bayes_error", "error"),
                            ("pac_bayes_mag_error", "error")):  # the study reports both targets (issue 24)
            assert r.geometry[key]["target"] == target, (r.id, key)
        assert r.geometry["pac_bayes_error"]["accuracy_x"] == pytest.approx(r.train.accuracy)
        d = r.geometry["density"]
        assert d["lambda_min"] <= d["lambda_max"] and len(d["grid"]) == len(d["density"])
        assert d["trace_ci_low"] <= d["trace"] <= d["trace_ci_high"]  # a trace only with its interval


def test_report_has_the_correlation_measures_and_density_sections(quick):
    md = (quick / "report.md").read_text()
    for heading in ("## Which measure ranks the generalization gap", "## Generalization measures",
                    "## Hessian spectral density"):
        assert heading in md
    for fig in ("correlation_ranking.png", "correlation_scatter.png", "hessian_density.png"):
        assert (quick / "figures" / fig).stat().st_size > 1000
    assert "ψ batch_size | ψ lr" in md
    assert "| τ lr | 95% interval | τ batch | 95% interval |" in md  # issue 28: tau against the training choices
    assert "PAC-Bayes flatness 1/σ², error target" in md and "PAC-Bayes flatness 1/σ², loss target" in md
    pb = load_results(quick).runs[0].geometry["pac_bayes"]  # how the draws were made is said (issue 27)
    assert f"({draws(pb)} common draws" in md
    assert draws({"n_samples": 8, "antithetic": True}) == "8 (4 antithetic pairs u, −u)"
    assert draws({"n_samples": 8, "antithetic": False}) == "8"
    # every table row has as many cells as its header (a '|' inside a label would break it)
    for block in md.split("\n\n"):
        rows = [line for line in block.splitlines() if line.startswith("|")]
        if rows:
            cells = {len(line.replace("\\|", "").split("|")) for line in rows}
            assert len(cells) == 1, rows[0]


def test_correlate_command_agrees_with_the_report(quick, tmp_path, capsys):
    assert main(["correlate", str(quick), "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "correlation.json").read_text())
    c = correlate([("measures", load_results(quick))])
    assert [row["measure"] for row in doc[0]["rows"]] == [row.measure for row in c.rows]
    assert [row["psi"] for row in doc[0]["rows"]] == pytest.approx([row.psi for row in c.rows], nan_ok=True)
    assert doc[0]["axes"] == ["batch_size", "lr"] and doc[0]["runs_total"] == 8
    md = (quick / "report.md").read_text()
    first = c.rows[0]
    assert f"| {first.label.replace('|', chr(92) + '|')} | {first.psi:+.2f} |" in md
