"""The reparametrization study (issue 28): Dinh et al.'s rescaling and the pre-BatchNorm rescaling keep every
output, the scale-aware measures are unchanged by them and eps-sharpness and lambda_max are not (lambda_max
exactly as T^-1 H T^-1 predicts, against a dense Hessian), the table's verdicts, and the study end to end."""
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from batchgap.cli import main
from batchgap.experiments import reparam_table
from batchgap.landscape import adaptive_sharpness, eps_sharpness, filter_normalized_direction, loss_curve
from batchgap.landscape.hessian import hessian_eigenvalues
from batchgap.landscape.rescale import checked, max_output_change, rescale_before_bn, rescale_layers, transform
from batchgap.models import init_model
from test_landscape_common import assert_same_state, full_state, mlp, toy_data, train_briefly


@pytest.mark.parametrize("bn", ["running", "batch", "none"])
@pytest.mark.parametrize("protocol", ["eval", "batch", "recompute"])
def test_every_transform_keeps_every_output_of_the_default_mlp(bn, protocol):
    """The default MLP (40 -> 3 x (256, BN, ReLU) -> 10) with moved BN statistics, every layer, factors far from 1,
    under each BN protocol the measures use; the original model is not touched."""
    model = init_model("mlp", (40,), 10, seed=0, bn=bn)
    g = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(5):  # running statistics away from (0, 1)
            model(2 * torch.randn(64, 40, generator=g) + 1)
    x = torch.randn(300, 40, generator=g)
    before = full_state(model)
    kinds = ["layers"] + (["batchnorm"] if bn != "none" else [])
    for kind in kinds:
        for layer in (1, 2, 3):
            for alpha in (0.01, 0.3, 7.0, 100.0):
                new = transform(model, kind, alpha, layer)
                assert max_output_change(model, new, x, protocol) < 2e-6, (kind, layer, alpha)
                moved = [n for (n, p), q in zip(model.named_parameters(), new.parameters()) if not torch.equal(p, q)]
                assert moved, "the transform changed no parameter"
    assert_same_state(model, before)


def test_the_transforms_scale_exactly_the_parameters_they_name():
    model = mlp(hidden=(6, 6), bn=True)
    new = rescale_layers(model, 4.0, layer=1)  # BN 1's affine x 4, Linear 2's weight / 4
    old = dict(model.named_parameters())
    for name, p in new.named_parameters():
        factor = {"1.weight": 4.0, "1.bias": 4.0, "3.weight": 0.25}.get(name, 1.0)
        assert torch.equal(p, old[name] * factor), name
    plain = mlp(hidden=(6, 6), bn=False)
    new = rescale_layers(plain, 3.0, layer=2)  # Linear 2 (weight and bias) x 3, the head's weight / 3
    old = dict(plain.named_parameters())
    for name, p in new.named_parameters():
        factor = {"2.weight": 3.0, "2.bias": 3.0, "4.weight": 1 / 3}.get(name, 1.0)
        assert torch.allclose(p, old[name] * factor, rtol=1e-15, atol=0), name
    train_briefly(model, toy_data())
    new = rescale_before_bn(model, 5.0, layer=2)
    assert torch.equal(new[3].weight, model[3].weight * 5.0) and torch.equal(new[3].bias, model[3].bias * 5.0)
    assert torch.equal(new[4].running_mean, model[4].running_mean * 5.0)
    assert torch.allclose(new[4].running_var, model[4].running_var * 25.0) and new[4].eps == pytest.approx(25e-5)
    assert all(torch.equal(p, q) for (n, p), q in zip(model.named_parameters(), new.parameters()) if n[0] != "3")


class _Registered(nn.Module):
    """Layers registered in another order than the forward pass: the transform scales the wrong pair."""

    def __init__(self):
        super().__init__()
        self.head, self.act, self.first = nn.Linear(6, 3), nn.ReLU(), nn.Linear(5, 6)

    def forward(self, x):
        return self.head(self.act(self.first(x)))


def test_a_transform_that_changes_the_function_is_refused():
    x, _ = toy_data()
    with pytest.raises(ValueError, match="ReLU"):  # tanh is not positively homogeneous: nothing to rescale around
        checked(mlp(act=nn.Tanh, bn=False), "layers", 2.0, x)
    model = _Registered().double()
    with pytest.raises(ValueError, match="changed the outputs by .* tolerance 0.0001"):
        checked(model, "layers", 2.0, x)
    # without the eps change a large factor before BatchNorm moves the function by ~ eps / var: the check sees it
    bn = mlp(bn=True)
    new = rescale_before_bn(bn, 1e3)
    new[1].eps = bn[1].eps
    assert max_output_change(bn, new, x) > 1e-6 > max_output_change(bn, rescale_before_bn(bn, 1e3), x)
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="alpha must be"):
            transform(mlp(), "layers", bad)
    with pytest.raises(ValueError, match="layer must be an integer from 1 to 2"):
        transform(mlp(), "layers", 2.0, layer=3)
    with pytest.raises(ValueError, match="BatchNorm"):
        transform(mlp(bn=False), "batchnorm", 2.0)
    with pytest.raises(ValueError, match="kind must be"):
        transform(mlp(), "weights", 2.0)


@pytest.mark.parametrize("kind", ["layers", "batchnorm"])
def test_scale_aware_measures_are_unchanged_and_eps_sharpness_and_lambda_max_are_not(kind):
    """Filter-normalized curves and adaptive sharpness: the same to float64 rounding; eps-sharpness and the
    Hessian's lambda_max move by far more than that (Dinh et al.)."""
    data = toy_data(n=96)
    model = mlp(hidden=(8, 8), bn=True)
    train_briefly(model, data, steps=60)
    new, change = checked(model, kind, 10.0, data[0])
    assert change < 1e-12
    alphas = np.linspace(-1, 1, 9)
    for k in range(3):
        a = loss_curve(model, filter_normalized_direction(model, seed=k), data, alphas).loss
        b = loss_curve(new, filter_normalized_direction(new, seed=k), data, alphas).loss
        assert np.allclose(a, b, rtol=1e-10, atol=0), (a, b)
    ad_a = adaptive_sharpness(model, data, rho=0.05, max_iter=5)
    ad_b = adaptive_sharpness(new, data, rho=0.05, max_iter=5)
    assert ad_b.value == pytest.approx(ad_a.value, rel=1e-8) and ad_a.value > 0
    e_a, e_b = (eps_sharpness(m, data, eps=1e-2, max_iter=5).value for m in (model, new))
    assert abs(e_b / e_a - 1) > 0.05
    l_a, l_b = (hessian_eigenvalues(m, data, k=1, tol=1e-8, max_hvp=200).eigenvalues[0] for m in (model, new))
    assert abs(l_b / l_a - 1) > 0.05


def test_lambda_max_after_dinh_rescaling_is_that_of_t_inverse_h_t_inverse():
    """Tiny 2-layer ReLU net f(x) = W2 relu(W1 x + b1) + b2, no BatchNorm. In the new parameters theta' = T theta
    (T = alpha on W1, b1; 1/alpha on W2; 1 on b2) the loss is L(T^-1 theta'), so H' = T^-1 H T^-1: the dense
    Hessian of the transformed net equals it, and batchgap's lambda_max is its top eigenvalue, not H's."""
    x, y = toy_data(n=40, d=3, classes=2)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=torch.float64))

    def dense(model):
        names = [n for n, _ in model.named_parameters()]
        shapes = [p.shape for _, p in model.named_parameters()]
        sizes = [p.numel() for _, p in model.named_parameters()]
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

        def loss(v):
            params = {n: t.view(s) for n, t, s in zip(names, v.split(sizes), shapes)}
            return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
        return hessian(loss)(flat)

    alpha = 5.0
    new = rescale_layers(net, alpha)
    t = torch.tensor([alpha] * 12 + [alpha] * 4 + [1 / alpha] * 8 + [1.0] * 2, dtype=torch.float64)
    h, h_new = dense(net), dense(new)
    assert torch.allclose(h_new, h / t[:, None] / t[None, :], rtol=1e-9, atol=1e-12)
    want = float(torch.linalg.eigvalsh(h_new)[-1])
    got = hessian_eigenvalues(new, (x, y), k=1, tol=1e-10, max_hvp=26).eigenvalues[0]
    assert got == pytest.approx(want, rel=1e-8)
    assert abs(want / float(torch.linalg.eigvalsh(h)[-1]) - 1) > 0.1  # lambda_max moved


class _S:
    factors, transforms, tolerance = [0.5, 2.0], ["layers"], 1e-3


def _record(run, seed, regime, kind, alpha, geo, loss=0.1):
    return {"run": run, "seed": seed, "regime": regime, "kind": kind, "alpha": alpha, "output_change": 0.0,
            "train": {"loss": loss}, "test": {"accuracy": 0.9}, "geometry": geo}


def test_the_table_marks_invariance_and_the_ordering_from_the_values():
    """Hand values: a measure invariant to 5e-4, one scaling as alpha^2 (the LB/SB sign kept when both use one
    alpha, reversed when SB is scaled by 2 and LB by 0.5), one whose LB/SB sign flips at alpha = 2."""
    def geo(inv, sq, flip):
        return {"adaptive_sharpness": {"value": inv}, "hessian_trace": {"value": sq},
                "hessian_eigenvalues": {"eigenvalues": [flip]}}

    recs = []
    for run, regime, base in (("a", "SB", 1.0), ("b", "LB", 3.0)):
        recs.append(_record(run, 0, regime, "none", 1.0, geo(base, base, base)))
        recs.append(_record(run, 0, regime, "layers", 0.5, geo(base * 1.0005, base * 0.25, base)))
        recs.append(_record(run, 0, regime, "layers", 2.0, geo(base, base * 4,
                                                                   base * (0.1 if regime == "LB" else 1))))
    s = reparam_table.summarize(recs, _S, ["SB", "LB"])
    rows = {r["key"]: r for r in s["rows"]}
    assert rows["adaptive_sharpness"]["invariant"]["layers"] is True
    assert rows["adaptive_sharpness"]["max_deviation"]["layers"] == pytest.approx(5e-4)
    assert rows["hessian_trace"]["ratios"]["layers"] == {"0.5": [0.25, 0.25], "2": [4.0, 4.0]}
    assert rows["hessian_trace"]["invariant"]["layers"] is False
    assert rows["hessian_trace"]["same_factor"]["layers"] is True  # 3 > 1 at every common alpha
    assert rows["hessian_trace"]["across_factors"]["layers"] is False  # LB at 0.5: 0.75 < SB at 2: 4
    assert rows["adaptive_sharpness"]["across_factors"]["layers"] is True
    assert rows["hessian_top_eigenvalue"]["same_factor"]["layers"] is False  # LB 0.3 < SB 1 at alpha 2
    assert rows["hessian_top_eigenvalue"]["ordering"] == {"0": 1}
    assert rows["train_loss"]["invariant"]["layers"] is True
    # a log of a product of norms: its ratio is that of the products, exp(difference), not a ratio of logs
    assert reparam_table.ratio(0.5, -0.2, log=True) == pytest.approx(np.exp(0.7))
    assert reparam_table.ratio(0.0, 0.0) == 1.0 and reparam_table.ratio(1.0, 0.0) is None


def test_study_quick_end_to_end_and_resumes(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["run", "reparametrization", "--quick", "--out", str(out), "--jobs", "1"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["experiment"] == "reparametrization" and len(doc["records"]) == 2 * (1 + 2 * 2)
    rows = {r["key"]: r for r in doc["summary"]["rows"]}
    for kind in ("layers", "batchnorm"):  # the oracles on the real study's numbers
        assert rows["adaptive_sharpness"]["invariant"][kind] and rows["curves"]["invariant"][kind]
        assert rows["train_loss"]["invariant"][kind]
        assert rows["hessian_top_eigenvalue"]["invariant"][kind] is False
        assert any(not rows[k]["invariant"][kind] for k in rows if k.startswith("sharpness_full"))
    assert doc["summary"]["output_change_max"] <= doc["settings"]["output_rtol"]
    md = (out / "report.md").read_text()
    assert "| adaptive sharpness (worst case, ρ\\|w\\|) |" in md and "ordering holds" in md
    assert (out / "figures" / "reparametrization.png").read_bytes()[:4] == b"\x89PNG"
    kept = {f: f.stat().st_mtime_ns for f in (out / "reparam").iterdir()}
    assert len(kept) == 10
    # run again: it resumes, nothing is measured again
    assert main(["run", "reparametrization", "--quick", "--out", str(out), "--jobs", "1"]) == 0
    assert {f: f.stat().st_mtime_ns for f in (out / "reparam").iterdir()} == kept
    assert json.loads((out / "results.json").read_text())["summary"] == doc["summary"]


@pytest.mark.parametrize("setting, words", [
    ("reparam.factors=[1.0, 2.0]", "reparam.factors: expected a list of distinct positive numbers other than 1"),
    ("reparam.factors=[-2.0]", "reparam.factors"),
    ("reparam.transforms=[\"layer\"]", "reparam.transforms"),
    ("reparam.tolerance=0", "reparam.tolerance"),
    ("model.bn=\"none\"", "reparam.transforms 'batchnorm'"),
    ("reparam.layer=9", "layer must be an integer from 1 to 2"),
])
def test_bad_settings_are_one_line_exit_2_nothing_written(tmp_path, capsys, setting, words):
    out = tmp_path / "bad"
    capsys.readouterr()
    code = main(["run", "reparametrization", "--quick", "--out", str(out), "--set", setting])
    err = capsys.readouterr().err
    assert code == 2, err
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists() or not any(out.iterdir())


def test_show_gives_the_settings_and_the_measurements_per_run(capsys):
    capsys.readouterr()
    assert main(["show", "reparametrization", "--quick"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["reparam"]["factors"] == [0.5, 4.0] and doc["measurements_per_run"] == 1 + 2 * 2
    assert doc["regimes"] == ["SB", "LB"] and doc["measure"]["bn"] == "eval"


def test_the_study_stops_when_a_transform_changes_the_outputs(tmp_path, capsys, monkeypatch):
    """A transform that moved the function (here: one that also nudges the head's bias at alpha 4) stops the study
    in one line before any measurement of it is written."""
    import batchgap.landscape.rescale as rescale

    real = rescale.transform

    def nudged(model, kind, alpha, layer=1):
        out = real(model, kind, alpha, layer)
        if alpha == 4.0:
            with torch.no_grad():
                out.head.bias.add_(1e-2)
        return out

    monkeypatch.setattr(rescale, "transform", nudged)
    out = tmp_path / "stop"
    capsys.readouterr()
    code = main(["run", "reparametrization", "--quick", "--out", str(out), "--jobs", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.strip().splitlines()[-1]  # progress lines before it, then the error in one line
    assert "rescaling by 4 changed the outputs by" in last and last.endswith("stopped") and "Traceback" not in err
    assert not (out / "results.json").exists()
    assert all(json.loads(f.read_text())["alpha"] != 4.0 for f in (out / "reparam").iterdir())
