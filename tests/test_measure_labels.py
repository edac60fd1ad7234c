"""Issue 24: every measure that cites Jiang et al. 2019 computes what they define (checked against the formulas of
their appendix C, as the reference code of Dziugaite et al. 2020 computes them, on a real NormResult), the
PAC-Bayes target is in every label, and the study setting is validated."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from batchgap.config import from_dict
from batchgap.correlate import FIXED_MEASURES
from batchgap.errors import UserError
from batchgap.landscape.norms import norm_measures
from batchgap.report.measures import numbers_table

from batchgap.results import Metrics, RunResult
from test_landscape_common import mlp, toy_data, train_briefly


def run(geometry):
    return RunResult(
        id="r0", regime="b32", batch_size=32, seed=0, lr=1e-3, lr_rule="none", optimizer="adam", epochs=1, steps=1,
        steps_per_epoch=1, diverged_epoch=None, wall_time_s=1.0, x0="x0.pt", checkpoint="c.pt", history="h.json",
        remedy={"name": "plain"}, ghost_batch=None, augment="none", batch_schedule=None, init_from=None, device="cpu",
        threads=1, train=Metrics(0.01, 1.0, 40), test=Metrics(1.0, 0.9, 40), distance_from_init={"value": 1.0},
        geometry=geometry, complete=True)


@pytest.fixture(scope="module")
def geometry():
    data = toy_data(n=40, d=4, classes=3, seed=1)
    model = train_briefly(mlp(d=4, hidden=(5, 6), classes=3, bn=False, seed=1), data, steps=400, lr=0.2)
    weights = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
    return {"norms": norm_measures(model, data).as_dict()}, model, data, weights


def jiang(weights, margin, path_sq):
    """Jiang et al.'s appendix C measures, written from their definitions (squared layer norms, d layers)."""
    fro2 = np.array([float(torch.linalg.matrix_norm(w, "fro")) ** 2 for w in weights])
    spec2 = np.array([float(torch.linalg.matrix_norm(w, 2)) ** 2 for w in weights])
    d = len(weights)
    return {
        "params_norm": fro2.sum(),  # eq. 42
        "log_prod_of_fro": np.log(fro2.prod()),  # eq. 37
        "log_prod_of_spec": np.log(spec2.prod()),  # eq. 32
        "sum_of_fro": d * fro2.prod() ** (1 / d),  # exp of eq. 39
        "sum_of_spec": d * spec2.prod() ** (1 / d),  # exp of eq. 35
        "inverse_margin": 1 / margin**2,  # eq. 22
        "spectral_margin": np.log(spec2.prod()) - 2 * math.log(margin),  # eq. 31
        "path_norm": path_sq,  # eq. 44: the squared network's output sum, no square root
    }


def test_every_measure_citing_jiang_computes_their_formula(geometry):
    geo, model, data, weights = geometry
    nm = geo["norms"]
    squared = copy.deepcopy(model)
    with torch.no_grad():
        for p in squared.parameters():
            p.pow_(2)
        path_sq = float(squared(torch.ones(1, 4, dtype=torch.float64)).sum())
    expected = jiang(weights, nm["margin"], path_sq)
    assert nm["margin"] > 0
    r = run(geo)
    cited = {m.key: m for m in FIXED_MEASURES if m.source.startswith("Jiang et al. 2019 (")}
    for key in ("params_norm", "log_prod_of_fro", "log_prod_of_spec", "sum_of_fro", "sum_of_spec", "inverse_margin",
                "spectral_margin", "path_norm"):
        assert key in cited, key
        assert cited[key].pick(r) == pytest.approx(expected[key], rel=1e-10), key
    # what is not Jiang's says so: the all-parameter norm, the loss-target flatness, the distance
    others = {m.key: m.source for m in FIXED_MEASURES}
    assert "not Jiang" in others["param_norm_all"] and "not Jiang" in others["distance"]
    biases = sum(float((m.bias.detach() ** 2).sum()) for m in model if isinstance(m, nn.Linear))
    assert nm["param_norm_all"] ** 2 > nm["params_norm"] and biases > 0


def test_pac_bayes_target_is_in_every_label_and_only_the_error_target_is_jiangs():
    by_key = {m.key: m for m in FIXED_MEASURES}
    for key in ("pac_bayes", "pac_bayes_mag"):
        assert "loss target" in by_key[key].label and by_key[key].source.startswith("loss-target variant of Jiang")
    for key in ("pac_bayes_error", "pac_bayes_mag_error"):
        assert "error target" in by_key[key].label and "accuracy" in by_key[key].source
    assert by_key["pac_bayes_error"].source.startswith("Jiang et al. 2019 (pacbayes.flatness, eq. 53)")
    assert "ε" in by_key["pac_bayes_mag_error"].source  # ours has no noise floor: the label says so
    jiang_pac = [m.key for m in FIXED_MEASURES if m.source.startswith("Jiang et al. 2019 (pacbayes")]
    assert jiang_pac == ["pac_bayes_error", "pac_bayes_mag_error"]


def test_the_report_row_names_the_target():
    row = {"value": 20.0, "sigma": 0.22, "delta": 0.1, "reason": None, "search": "s"}
    geo = {"pac_bayes": {**row, "target": "loss"}, "pac_bayes_error": {**row, "target": "error"}}
    doc = {"eval_protocol": {"bn": "x", "eval_batch_size": 1, "dropout": "off"}, "geometry": geo,
           **{s: {"loss": 0.1, "accuracy": 0.9, "n": 1} for s in ("train", "test")}}
    table = "\n".join(numbers_table(doc))
    assert "1/σ², loss target (loss rise ≤ δ = 0.1)" in table
    assert "1/σ², error target (training-accuracy drop ≤ δ = 0.1)" in table


MINIMAL = {"name": "t", "regimes": [{"name": "SB", "batch_size": 8}, {"name": "LB", "batch_size": "25%"}]}


def test_pac_bayes_target_setting_is_validated_with_its_allowed_values():
    assert from_dict({**MINIMAL, "measure": {"pac_bayes_target": "error"}}).measure.pac_bayes_target == "error"
    with pytest.raises(UserError) as e:
        from_dict({**MINIMAL, "measure": {"pac_bayes_target": "accuracy"}})
    msg = str(e.value)
    assert "measure.pac_bayes_target" in msg and all(v in msg for v in ("loss", "error", "both"))
    assert "\n" not in msg


def test_the_report_definitions_give_jiangs_equations_and_the_target():
    from batchgap.report.definitions import _jiang

    geo = {"norms": {"layers": ["0.weight", "2.weight"], "percentile": 10.0},
           "pac_bayes": {"target": "loss", "delta": 0.1, "n_samples": 8},
           "pac_bayes_error": {"target": "error", "delta": 0.1, "n_samples": 8},
           "density": {"n_vectors": 1, "steps": 20, "trace_ci_low": None}}
    text = "\n".join(_jiang(geo))
    for needle in ("params.norm Σ‖W_i‖_F² (eq. 42)", "sum.of.spec d (∏ ‖W_i‖_2²)^(1/d)", "(eq. 22)", "(eq. 44)",
                   "loss target** (a loss-target variant",
                   "error target** (Jiang et al. 2019's pacbayes.flatness (eq. 53))",
                   "training-accuracy drop ≤ δ = 0.1", "no trace (one start vector gives no interval)"):
        assert needle in text, needle
