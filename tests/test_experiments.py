"""Remedies and experiment plumbing in studies: settings that must reduce to the plain LB run do."""
import json

import pytest

from batchgap.config import from_dict
from batchgap.results import to_dict
from batchgap.study import run_study

TINY_MEASURE = {"sharpness_eps": [1e-3], "sharpness_subspace_dim": 0, "sharpness_max_iter": 2, "adaptive_rho": 0.0,
                "hessian_top_k": 0, "hessian_trace_probes": 0, "curve_directions": 0, "surface_points": 0,
                "noise_scale_batches": 0, "interpolation": False, "norms": False, "average_sigma": 0.0,
                "average_sigma_relative": 0.0, "pac_bayes_delta": 0.0, "density_vectors": 0}


def study(regimes, **extra):
    return from_dict({
        "name": "t", "seeds": [0], "data": {"name": "mnist1d", "train_subset": 400, "test_subset": 200},
        "model": {"name": "mlp", "options": {"width": 32, "depth": 2}}, "train": {"epochs": 3},
        "measure": {**TINY_MEASURE, **extra.pop("measure", {})}, "regimes": regimes, **extra,
    })


def strip(run):
    keep = ("train", "test", "distance_from_init", "geometry", "steps")
    return {k: run[k] for k in keep if k in run}


def test_settings_that_reduce_to_plain_lb_give_identical_runs(tmp_path, mnist1d_dir):
    cfg = study([
        {"name": "SB", "batch_size": 16},
        {"name": "LB", "batch_size": 80},
        {"name": "LB-k0", "batch_size": 80, "init_from": {"regime": "SB", "epoch": 0}},
        {"name": "LB-ghost-all", "batch_size": 80, "ghost_batch": 80},
        {"name": "LB-switch0", "batch_size": 80, "batch_schedule": {"kind": "switch", "small": 16, "switch_epoch": 0}},
        {"name": "LB-sam0", "batch_size": 80, "remedy": "sam", "remedy_options": {"rho": 0.0}},
    ])
    doc = to_dict(run_study(cfg, tmp_path / "out", data_dir=mnist1d_dir))
    runs = {r["regime"]: r for r in doc["runs"]}
    for name in ("LB-k0", "LB-ghost-all", "LB-switch0", "LB-sam0"):
        assert strip(runs[name]) == strip(runs["LB"]), name
    assert runs["LB-k0"]["init_from"]["run"] == runs["SB"]["id"]
    assert strip(runs["SB"]) != strip(runs["LB"])


def test_remedies_change_training_and_are_recorded(tmp_path, mnist1d_dir):
    cfg = study([
        {"name": "LB", "batch_size": 80},
        {"name": "LB-k2", "batch_size": 80, "init_from": {"regime": "LB", "epoch": 2}},
        {"name": "LB-ghost", "batch_size": 80, "ghost_batch": 16},
        {"name": "LB-grow", "batch_size": 80, "batch_schedule": {"kind": "geometric", "small": 16, "epochs": 2}},
        {"name": "LB-sam", "batch_size": 80, "remedy": "sam", "remedy_options": {"rho": 0.05}},
        {"name": "LB-prox", "batch_size": 80, "remedy": "proximal"},
    ], compare=["LB", "LB-sam"])
    out = tmp_path / "out"
    doc = to_dict(run_study(cfg, out, data_dir=mnist1d_dir))
    runs = {r["regime"]: r for r in doc["runs"]}
    base = strip(runs["LB"])
    for name in ("LB-k2", "LB-ghost", "LB-grow", "LB-sam", "LB-prox"):
        assert strip(runs[name]) != base, name
    assert runs["LB-sam"]["remedy"]["rho"] == 0.05 and runs["LB-ghost"]["ghost_batch"] == 16
    hist = [json.loads(line) for line in (out / runs["LB-grow"]["history"]).read_text().splitlines()]
    assert [h["batch_size"] for h in hist] == [16, 36, 80]  # geometric 16 -> 80 over 2 epochs, then 80
    # LB kept its iterate after epoch 2 for the warm start, and only what was asked
    assert sorted(p.name for p in (out / "runs" / runs["LB"]["id"] / "iterates").glob("*.pt")) == ["epoch-2.pt"]


def test_trajectory_measures_each_kept_iterate(tmp_path, mnist1d_dir):
    cfg = study([{"name": "SB", "batch_size": 16}, {"name": "LB", "batch_size": 80}],
                measure={"trajectory_epochs": [0, 1, 3], "noise_scale_batches": 5})
    doc = to_dict(run_study(cfg, tmp_path / "out", data_dir=mnist1d_dir))
    for r in doc["runs"]:
        t = r["trajectory"]
        assert [p["epoch"] for p in t] == [0, 1, 3]
        assert t[-1]["train_loss"] == pytest.approx(r["train"]["loss"], rel=1e-6)  # the last iterate is the solution
        assert t[0]["train_loss"] > t[-1]["train_loss"]
        assert all(p["sharpness"]["0.001"] >= 0 and p["noise_scale"] is not None for p in t)


@pytest.mark.parametrize("regime, needle", [
    ({"name": "X", "batch_size": 8, "init_from": {"regime": "Y", "epoch": 1}}, "init_from.regime"),
    ({"name": "X", "batch_size": 8, "init_from": {"regime": "SB", "epoch": 99}}, "beyond the 3 epochs"),
    ({"name": "X", "batch_size": 8, "batch_schedule": {"kind": "linear", "small": 2}}, "batch_schedule.kind"),
    ({"name": "X", "batch_size": 8, "batch_schedule": {"kind": "switch", "small": 4}}, "takes exactly"),
    ({"name": "X", "batch_size": 8, "remedy": "sam", "remedy_options": {"rhoo": 1}}, "remedy_options"),
    ({"name": "X", "batch_size": 8, "remedy": "lars"}, "remedy: unknown value 'lars'"),
    ({"name": "X", "batch_size": 8, "ghost_batch": 1}, "ghost_batch"),
])
def test_bad_remedy_settings_name_the_field(regime, needle):
    from batchgap.errors import UserError

    with pytest.raises(UserError, match=needle):
        study([{"name": "SB", "batch_size": 8}, regime])


def test_each_remedy_row_names_its_method_and_settings():
    from batchgap.report.experiments import describe
    assert describe({"batch_size": 400}) == "baseline"
    assert describe({"remedy": "proximal", "remedy_options": {"lam": 1e-3, "inner_steps": 3}}) \
        == "conservative training (proximal) (lam 0.001, inner_steps 3)"
    assert describe({"remedy": "sam", "remedy_options": {"rho": 0.05}}) == "SAM (rho 0.05)"
    assert describe({"batch_size": 400, "batch_schedule": {"kind": "switch", "small": 32, "switch_epoch": 10}}) \
        == "batch 32 → 400, switch at epoch 10"
    assert describe({"lr_rule": "linear", "warmup_epochs": 5.0}) == "lr rule linear; 5 warmup epochs"
