"""The edge-of-stability study (issue 28): its machinery against exact oracles, and the study end to end."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from experiment_checks import assert_documented, assert_other_output_refused, assert_refused_in_one_line, run_cli

from batchgap.cli import main
from batchgap.experiments import edge_of_stability as eos
from batchgap.experiments.eos_summary import summarize
from batchgap.experiments.eos_trace import model_objective, quadratic_objective, sharpness, trace


def spd(eigenvalues, seed=0):
    """A symmetric matrix with the given eigenvalues and a seeded random eigenbasis (float64)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ Q.T


@pytest.mark.parametrize("eta_times_lambda", [1.9, 1.98, 2.02, 2.1])
def test_gd_on_a_quadratic_diverges_exactly_past_two_over_eta_and_the_detector_agrees(eta_times_lambda):
    """f(x) = x^T A x / 2: GD multiplies the top eigencomponent by (1 - eta lambda_max) per step, so it diverges
    exactly when lambda_max > 2/eta; the study's tracked lambda_max is lambda_max(A) and its detector sees it."""
    A = spd([5.0, 3.0, 1.0, 0.5])
    eta = eta_times_lambda / 5.0
    x0 = torch.randn(4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tr = trace(quadratic_objective(A, x0), "gd", eta, steps=1000, every=50)
    assert tr.sharpness[0] == pytest.approx(5.0, rel=1e-9)
    unstable = 5.0 > 2 / eta
    assert (tr.diverged_at is not None) == unstable
    assert (tr.sharpness[0] > 2 / eta) == unstable
    if not unstable:  # it converges, slowly at 1.98: |1 - 1.98| = 0.98 per step
        assert tr.loss[-1] < 1e-6 * tr.loss[0] and tr.steps[-1] == 1000


def test_preconditioned_sharpness_is_the_top_eigenvalue_of_p_inverse_a():
    """lambda_max(P^-1 A) computed densely (a non-symmetric eigenproblem) equals the study's Lanczos on
    P^-1/2 A P^-1/2, for an indefinite A too."""
    A = spd([4.0, 2.5, -1.0, 0.3, -3.0, 1.7], seed=2)
    p = torch.tensor([0.5, 2.0, 0.1, 1.3, 3.0, 0.05], dtype=torch.float64)
    obj = quadratic_objective(A, torch.zeros(6, dtype=torch.float64))
    start = torch.ones(6, dtype=torch.float64)
    value, vector, _, converged = sharpness(obj, obj.theta0, start, scale=p.rsqrt(), tol=1e-10)
    dense = np.linalg.eigvals((torch.diag(1 / p) @ A).numpy()).real.max()
    assert converged and value == pytest.approx(dense, rel=1e-9)
    d = p.rsqrt()
    assert torch.allclose(d * (A @ (d * vector)), value * vector, atol=1e-8)


def test_adam_matches_torch_and_its_preconditioned_sharpness_uses_v_hat():
    """The study's Adam takes torch.optim.Adam's steps, and at each measured step its preconditioned sharpness is
    lambda_max(P^-1 A) with P = diag(sqrt(v_hat)) + eps read from torch's optimizer state."""
    A = spd([6.0, 2.0, 1.0, 0.2], seed=3)
    x0 = torch.randn(4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    lr, b1, b2, eps = 0.05, 0.9, 0.99, 1e-8
    tr = trace(quadratic_objective(A, x0), "adam", lr, steps=30, every=10, beta1=b1, beta2=b2, eps=eps, tol=1e-10,
               keep_iterates=True)
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr, betas=(b1, b2), eps=eps)
    for t in range(1, 31):
        opt.zero_grad()
        (0.5 * x @ (A @ x)).backward()
        opt.step()
        if t % 10 == 0:
            i = tr.steps.index(t)
            assert torch.allclose(tr.iterates[i], x.detach(), rtol=1e-10, atol=1e-12)
            v_hat = opt.state[x]["exp_avg_sq"] / (1 - b2 ** t)
            P = v_hat.sqrt() + eps
            dense = np.linalg.eigvals((torch.diag(1 / P) @ A).numpy()).real.max()
            assert tr.preconditioned[i] == pytest.approx(dense, rel=1e-8)
    assert tr.preconditioned[0] is None  # no v_hat before the first step


class Tiny(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))


@pytest.mark.parametrize("loss", ["cross-entropy", "mse"])
@pytest.mark.parametrize("optimizer", ["gd", "sgd"])
def test_tracked_lambda_max_equals_torch_func_hessian_on_a_tiny_net(loss, optimizer):
    """At every measured iterate of a run, the warm-started Lanczos value is the top eigenvalue of the exact Hessian
    (torch.func.hessian of the same loss, written out independently here)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (24,), generator=g)
    torch.manual_seed(0)
    net = Tiny().double()
    obj = model_objective(net, x, y, loss)
    tr = trace(obj, optimizer, 0.5, steps=40, every=10, batch_size=8, tol=1e-10, keep_iterates=True)
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]

    def full_loss(theta):
        parts = torch.split(theta, [int(np.prod(s)) for s in shapes])
        out = torch.func.functional_call(net, {n: p.view(s) for n, p, s in zip(names, parts, shapes)}, (x,))
        if loss == "mse":
            return 0.5 * ((out - nn.functional.one_hot(y, 4).double()) ** 2).sum() / len(y)
        return nn.functional.cross_entropy(out, y)

    assert tr.steps == [0, 10, 20, 30, 40] and tr.diverged_at is None
    for theta, value, full in zip(tr.iterates, tr.sharpness, tr.loss):
        H = torch.func.hessian(full_loss)(theta)
        assert value == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-7)
        assert full == pytest.approx(float(full_loss(theta)), rel=1e-12)
    assert tr.loss[-1] < tr.loss[0]


def test_the_summary_reads_reach_hover_and_settle_from_the_ratios():
    s = {"beta1": 0.9}
    ratios = [0.1, 0.5, 0.95, 1.1, 1.0, 0.9, 1.05, 1.2, 1.0]
    record = {"optimizer": "gd", "lr": 0.5, "trace": {
        "steps": list(range(0, 90, 10)), "sharpness": [4 * r for r in ratios], "loss": [1.0] * 9,
        "accuracy": [0.5] * 9, "converged": [True] * 9, "diverged_at": None}}
    out = summarize(record, s["beta1"])["summary"]
    assert out["reached_at"] == 20 and out["peak"] == pytest.approx(1.2) and out["hovers"]
    assert out["median_after"] == pytest.approx(1.0) and out["within_after"] == 1.0
    assert out["settled"] == pytest.approx(1.1)  # median of the last quarter (2 of 9): 1.2, 1.0
    assert out["settled_range"] == [1.0, 1.2] and out["left_at"] is None
    falling = [0.1, 1.0, 1.1, 0.7, 1.0, 0.75, 0.5, 0.4, 0.3]  # the dip at step 30 is not leaving; step 50 is
    left = summarize({**record, "trace": {**record["trace"], "sharpness": [4 * r for r in falling],
                                          "loss": [1.0 / (t + 1) for t in range(9)]}}, 0.9)["summary"]
    assert left["left_at"] == 50 and left["left_loss"] == pytest.approx(1 / 6) and not left["hovers"]
    adam = summarize({**record, "optimizer": "adam", "trace": {**record["trace"], "preconditioned_sharpness":
                                                              [None] + [76 * r for r in ratios[1:]]}}, 0.9)
    assert adam["threshold"] == pytest.approx(38 / 0.5) and adam["summary"]["reached_at"] == 20


def test_the_study_runs_quick_end_to_end_resumes_and_redraws(tmp_path, mnist1d_dir, monkeypatch, capsys):
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    out = tmp_path / "out"
    assert run_cli("edge-of-stability", "--quick", "--out", str(out), "--jobs", "1") == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["experiment"] == "edge-of-stability" and len(doc["runs"]) == 2 * (3 + 2 + 1)
    for r in doc["runs"]:
        t = r["trace"]
        assert t["steps"][0] == 0 and t["steps"][-1] == r["steps"] and len(t["sharpness"]) == len(t["steps"])
        assert r["threshold"] == pytest.approx(38 / r["lr"] if r["optimizer"] == "adam" else 2 / r["lr"])
        assert all(v > 0 for v in t["sharpness"]) and r["n"] == 200
    gd = [r for r in doc["runs"] if r["optimizer"] == "gd" and r["loss"] == "mse"]
    assert [r["steps"] for r in gd] == [40, 20, 10]  # time / lr
    report = (out / "report.md").read_text()
    assert "](figures/edge_of_stability.png)" in report and "Cohen et al. 2021" in report
    assert (out / "figures" / "edge_of_stability.png").read_bytes()[:4] == b"\x89PNG"
    # a rerun trains nothing and gives the same numbers; `report` redraws from results.json
    monkeypatch.setattr(eos, "trace", lambda *a, **k: pytest.fail("a finished run was run again"))
    assert run_cli("edge-of-stability", "--quick", "--out", str(out), "--jobs", "1") == 0
    again = json.loads((out / "results.json").read_text())
    assert again["runs"] == doc["runs"]
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.md").read_text() == report
    capsys.readouterr()
    assert main(["show", "edge-of-stability", "--quick"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["eos"]["time"] == 4.0 and len(shown["runs"]) == 12


@pytest.mark.parametrize("setting, needle", [
    ("eos.losses=[\"hinge\"]", "eos.losses"),
    ("eos.sgd_batch_sizes=[5000]", "eos.sgd_batch_sizes"),
    ("eos.gd_lrs=[0.1, -1]", "eos.gd_lrs"),
    ("eos.beta1=1.0", "eos.beta1"),
    ("eos.stepz=3", "stepz"),
    ("model.bn=running", "BatchNorm"),
])
def test_bad_settings_stop_with_one_line_before_anything_is_written(setting, needle, tmp_path, mnist1d_dir,
                                                                    monkeypatch, capsys):
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    assert_refused_in_one_line("edge-of-stability", setting, needle, tmp_path / "out", capsys)


def test_another_studys_output_is_refused_without_force(tmp_path, capsys):
    other = {"schema": 3, "study": {"name": "default"}, "runs": []}
    assert_other_output_refused("edge-of-stability", other, tmp_path / "out", capsys)


def test_every_public_function_of_the_study_documents_its_arguments_and_return():
    from batchgap.experiments import eos_report, eos_summary, eos_trace

    assert_documented((eos, eos_trace, eos_summary, eos_report))


def test_a_divergent_run_is_stopped_marked_and_reported(tmp_path, mnist1d_dir, monkeypatch):
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    out = tmp_path / "out"
    sets = ["eos.gd_lrs=[0.5, 5.0]", "eos.time=40", "eos.losses=[\"mse\"]", "eos.sgd_batch_sizes=[]"]
    assert run_cli("edge-of-stability", "--quick", "--out", str(out), "--jobs", "1",
                   *[a for s in sets for a in ("--set", s)]) == 0
    runs = {r["label"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert set(runs) == {"GD eta=0.5", "GD eta=5", "Adam eta=0.001"}
    bad, good = runs["GD eta=5"], runs["GD eta=0.5"]
    assert bad["summary"]["diverged_at"] == bad["trace"]["steps"][-1] < bad["steps"]  # stopped there
    assert bad["trace"]["sharpness"][-1] is None and bad["trace"]["sharpness"][0] > 2 / 5  # past the edge at x0
    assert good["summary"]["diverged_at"] is None and good["trace"]["steps"][-1] == 80
    assert f"GD eta=5: diverged at step {bad['summary']['diverged_at']}" in (out / "report.md").read_text()
