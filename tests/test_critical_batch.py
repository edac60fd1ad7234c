"""The critical-batch study (issue 28): its fit and noise scale against exact oracles, and the study end to end."""
import json
import math

import numpy as np
import pytest
import torch

from experiment_checks import assert_documented, assert_other_output_refused, assert_refused_in_one_line, run_cli

from batchgap.experiments.critical_fit import (
    b_noise_estimate, best_steps, bootstrap_fit, fit_pareto, fit_table, pareto_steps,
)

B = np.array([16, 32, 64, 128, 256, 512, 1024, 2000], dtype=float)


@pytest.mark.parametrize("s_min, b_crit", [(150.0, 300.0), (40.0, 25.0), (1000.0, 3000.0)])
def test_the_fit_recovers_s_min_e_min_and_b_crit_from_steps_made_by_the_formula(s_min, b_crit):
    steps = pareto_steps(B, s_min, b_crit)
    E = B * steps
    assert np.allclose((steps / s_min - 1) * (E / (s_min * b_crit) - 1), 1.0)  # the trade-off itself
    fit = fit_pareto(B, steps)
    assert fit["s_min"] == pytest.approx(s_min, rel=1e-7) and fit["b_crit"] == pytest.approx(b_crit, rel=1e-7)
    assert fit["e_min"] == pytest.approx(s_min * b_crit, rel=1e-7) and fit["rms_log_residual"] < 1e-9


def noisy_table(s_min, b_crit, seeds, sigma, rng, lrs=3):
    """Steps per (seed, batch, lr): the formula times seeded log-normal noise at the best lr, worse at the others,
    and one lr that never reaches the target at the largest batch."""
    base = pareto_steps(B, s_min, b_crit)
    table = np.empty((seeds, len(B), lrs))
    for j in range(lrs):
        table[:, :, j] = base * (1 + 0.5 * j) * np.exp(sigma * rng.standard_normal((seeds, len(B))))
    table[0, -1, 1] = np.inf
    return table


def test_best_steps_keeps_the_learning_rate_with_the_fewest_mean_steps_over_seeds():
    table = np.array([[[10.0, 8.0, np.inf]], [[10.0, 12.0, 1.0]]])  # one batch size, three lrs, two seeds
    steps, best = best_steps(table)
    assert best.tolist() == [0] and steps.tolist() == [10.0]  # lr 2 missed in one seed; lr 1's mean is 10 too late
    assert best_steps(np.full((2, 1, 2), np.inf))[1].tolist() == [-1]


def test_the_bootstrap_interval_over_seeds_covers_the_true_values_under_noise():
    """Steps with 10% log-normal noise per seed: the 95% intervals hold the true S_min, E_min, B_crit in most
    of 20 independent studies (a 95% interval misses about 1 in 20; 8 seeds make the bootstrap a bit narrow)."""
    rng = np.random.default_rng(0)
    s_min, b_crit = 150.0, 300.0
    hits, width = [], []
    for _ in range(20):
        table = noisy_table(s_min, b_crit, 8, 0.1, rng)
        point = fit_table(B, table)
        assert point["lr_index"][:-1] == [0] * (len(B) - 1)
        ci = bootstrap_fit(B, table, resamples=200, seed=1)
        truth = {"s_min": s_min, "e_min": s_min * b_crit, "b_crit": b_crit}
        hits.append(all(ci[k][0] <= v <= ci[k][1] for k, v in truth.items()))
        assert all(ci[k][0] <= point[k] <= ci[k][1] for k in truth)
        width.append(ci["b_crit"][1] / ci["b_crit"][0])
    assert sum(hits) >= 15, hits
    assert np.median(width) < 2.0  # the interval is informative, not everything


def quadratic(n=12, p=5, seed=0):
    """Per-example losses l_i(x) = (x - c_i)^T A_i (x - c_i) / 2 with symmetric (indefinite) A_i: g_i = A_i (x -
    c_i), and the mean loss's Hessian is H = mean A_i, the same at every x."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, p, p, generator=g, dtype=torch.float64)
    A = (A + A.transpose(1, 2)) / 2 + 3 * torch.eye(p, dtype=torch.float64)
    c = torch.randn(n, p, generator=g, dtype=torch.float64)
    x = torch.randn(p, generator=g, dtype=torch.float64)
    grads = torch.einsum("ipq,iq->ip", A, x - c)
    return A.mean(0), grads


def dense_b_noise(H, grads):
    G = grads.mean(0)
    D = grads - G
    sigma = D.T @ D / len(grads)  # population covariance
    return float(torch.trace(H @ sigma) / (G @ H @ G))


def test_b_noise_with_every_example_equals_the_dense_formula_on_a_quadratic():
    H, grads = quadratic()
    out = b_noise_estimate(grads.mean(0), lambda idx: grads[idx], lambda V: V @ H, len(grads), probes=100, chunk=5)
    assert out["exact"] and out["probes"] == 12 and out["ci_low"] == out["ci_high"] == out["b_noise"]
    assert out["b_noise"] == pytest.approx(dense_b_noise(H, grads), rel=1e-12)
    G = grads.mean(0)
    assert out["g_h_g"] == pytest.approx(float(G @ H @ G), rel=1e-12)


def test_b_noise_from_sampled_probes_is_unbiased_and_its_interval_covers():
    """m = 10 of n = 40 examples: over 200 seeds the mean estimate is the dense value and the 95% interval
    (finite-population corrected) covers it at about its nominal rate."""
    H, grads = quadratic(n=40, p=6, seed=3)
    truth = dense_b_noise(H, grads)
    runs = [b_noise_estimate(grads.mean(0), lambda idx: grads[idx], lambda V: V @ H, 40, probes=10, seed=s)
            for s in range(200)]
    est = np.array([r["b_noise"] for r in runs])
    assert abs(est.mean() - truth) < 3 * est.std() / math.sqrt(len(est))
    cover = np.mean([r["ci_low"] <= truth <= r["ci_high"] for r in runs])
    assert 0.88 <= cover <= 0.99, cover
    assert not runs[0]["exact"] and runs[0]["ci_low"] < runs[0]["b_noise"] < runs[0]["ci_high"]


def test_b_noise_is_undefined_where_the_loss_curves_down_along_g():
    H, grads = quadratic()
    out = b_noise_estimate(grads.mean(0), lambda idx: grads[idx], lambda V: -(V @ H.abs()) - V, 12, probes=12)
    assert out["b_noise"] is None and "G^T H G" in out["reason"]


def test_the_fit_refuses_too_few_points():
    with pytest.raises(ValueError, match="2 distinct"):
        fit_pareto([16, 16], [10, 11])
    assert fit_table(B[:2], np.ones((2, 2, 1))) is None



def test_noise_scales_on_a_tiny_net_equal_the_dense_hessian_and_per_example_jacobian():
    """B_simple and B_noise (every example) at given parameters equal tr(Sigma)/|G|^2 and tr(H Sigma)/(G^T H G)
    built from torch.func.hessian of the full-data loss and the per-example gradients as one Jacobian."""
    from torch import nn
    from torch.func import functional_call, hessian, jacrev
    from torch.nn.utils import parameters_to_vector

    from batchgap.experiments.critical_train import noise_scales

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randint(0, 3, (9,))
    theta = parameters_to_vector(net.parameters()).detach() + 0.3 * torch.randn(31, dtype=torch.float64)
    shapes = [p.shape for p in net.parameters()]
    names = [k for k, _ in net.named_parameters()]

    def losses(vec):
        parts, i = {}, 0
        for k, s in zip(names, shapes):
            parts[k] = vec[i:i + math.prod(s)].view(s)
            i += math.prod(s)
        return torch.nn.functional.cross_entropy(functional_call(net, parts, (x,)), y, reduction="none")

    H = hessian(lambda v: losses(v).mean())(theta)
    grads = jacrev(losses)(theta)
    G = grads.mean(0)
    D = grads - G
    sigma = D.T @ D / 9
    out = noise_scales(net, theta, x, y, probes=9, seed=0)
    assert out["b_simple"] == pytest.approx(float(torch.trace(sigma) / (G @ G)), rel=1e-9)
    assert out["b_noise"]["exact"]
    assert out["b_noise"]["b_noise"] == pytest.approx(float(torch.trace(H @ sigma) / (G @ H @ G)), rel=1e-9)
    assert torch.equal(parameters_to_vector(net.parameters()), theta)


def test_steps_to_target_is_the_first_checked_step_at_or_below_it():
    """Rerunning the same seeded SGD for exactly the reported step count lands on the reported loss side: at the
    reported step the loss is <= target, at the check before it > target (the runs are deterministic)."""
    from torch import nn

    from batchgap.experiments.critical_train import eval_steps, full_loss, sgd_to_targets

    assert eval_steps(30, 1.25) == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 18, 22, 27, 30]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)

    def net():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))

    out = sgd_to_targets(net(), x, y, batch=8, lr=0.3, targets=[0.9, 1.0], max_steps=200, seed=3, ratio=1.1)
    checks = eval_steps(200, 1.1)
    for target, step in out["steps"].items():
        assert step is not None and step in checks
        m = net()
        sgd_to_targets(m, x, y, 8, 0.3, [-1.0], step, 3, ratio=1.1)
        assert full_loss(m, x, y) <= target
        assert torch.allclose(torch.nn.utils.parameters_to_vector(m.parameters()), out["iterates"][target])
        before = checks[checks.index(step) - 1]
        m = net()
        sgd_to_targets(m, x, y, 8, 0.3, [-1.0], before, 3, ratio=1.1)
        assert full_loss(m, x, y) > target
    assert out["steps"][1.0] <= out["steps"][0.9] and not out["diverged"]
    bad = sgd_to_targets(net(), x, y, 8, 500.0, [0.1], 200, 3)
    assert bad["diverged"] and bad["steps"] == {0.1: None} and bad["last_step"] < 200


def test_the_local_critical_batch_is_the_largest_batch_up_to_which_every_branch_keeps_up():
    from batchgap.experiments.critical_summary import local_critical_batch

    sizes = [16, 32, 64, 128]
    # start 2.0, smallest batch reaches 1.0: the bound is 1.0 + 0.1 x 1.0 = 1.1
    assert local_critical_batch(sizes, 2.0, [1.0, 1.05, 1.1, 1.5], 0.1) == (64, [True, True, True, False])
    assert local_critical_batch(sizes, 2.0, [1.0, 1.2, 1.05, 1.0], 0.1)[0] == 16  # a gap ends the run of keeps
    assert local_critical_batch(sizes, 2.0, [1.0, None, 1.0, 1.0], 0.1)[0] == 16  # diverged: not kept
    assert local_critical_batch(sizes, 1.0, [1.2, 1.0, 1.0, 1.0], 0.1) == (None, [None] * 4)  # no progress


def test_the_study_runs_quick_end_to_end_resumes_with_the_same_numbers_and_redraws(tmp_path, mnist1d_dir,
                                                                                  monkeypatch, capsys):
    from batchgap.cli import main
    from batchgap.experiments import critical_batch as cb

    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    out = tmp_path / "out"
    assert run_cli("critical-batch", "--quick", "--out", str(out), "--jobs", "1") == 0
    doc = json.loads((out / "results.json").read_text())
    s = doc["settings"]
    assert doc["experiment"] == "critical-batch" and doc["n"] == 200 and doc["batch_sizes"] == [16, 64, 200]
    assert len(doc["runs"]) == len(s["seeds"]) * 3 * len(s["lrs"])
    for r in doc["runs"]:  # targets ascend, so a run reaches them in decreasing steps (None: missed)
        hit = [v for v in r["steps"] if v is not None]
        assert hit == sorted(hit, reverse=True) and all(0 < v <= s["max_steps"] for v in hit)
    fits = [f for f in doc["fits"] if f["fit"] is not None]
    assert fits, doc["fits"]
    for f in fits:
        fit, ci = f["fit"], f["interval"]
        assert fit["e_min"] == pytest.approx(fit["s_min"] * fit["b_crit"])
        assert ci["b_crit"][0] <= fit["b_crit"] <= ci["b_crit"][1]
    assert doc["reference"]["batch"] == 16 and doc["scales"][0]["checkpoint"] is None  # init first
    for sc in doc["scales"]:
        assert all(v is not None and v > 0 for v in sc["b_simple"]) and len(sc["seeds"]) <= len(s["seeds"])
    for rec in doc["noise"]:
        assert rec["b_noise"]["probes"] == 8 and not rec["b_noise"]["exact"]
    assert doc["branching"] and all(len(b["losses"]) == 3 for b in doc["branching"])
    report = (out / "report.md").read_text()
    assert "McCandlish et al. 2018" in report and "Merrill et al. 2025" in report
    for fig in ("critical_batch_steps.png", "critical_batch_scales.png"):
        assert f"](figures/{fig})" in report and (out / "figures" / fig).read_bytes()[:4] == b"\x89PNG"
    # a rerun trains and measures nothing and gives the same numbers; `report` redraws from results.json
    monkeypatch.setattr(cb, "run_job", lambda job: pytest.fail(f"a finished job was run again: {job['spec']}"))
    assert run_cli("critical-batch", "--quick", "--out", str(out), "--jobs", "1") == 0
    again = json.loads((out / "results.json").read_text())
    assert {k: v for k, v in again.items() if k != "environment"} == {k: v for k, v in doc.items()
                                                                     if k != "environment"}
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.md").read_text() == report
    capsys.readouterr()
    assert main(["show", "critical-batch", "--quick"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["critical"]["lrs"] == [0.5, 2.0] and shown["batch_sizes"] == [16, 64, 200]


@pytest.mark.parametrize("setting, needle", [
    ("critical.lrs=[0.1, -1]", "critical.lrs"),
    ("critical.seeds=[0, 0]", "critical.seeds"),
    ("critical.targets=[]", "critical.targets"),
    ("critical.min_batch=5000", "critical.min_batch"),
    ("critical.grid_factor=1", "critical.grid_factor"),
    ("critical.confidence=1.5", "critical.confidence"),
    ("critical.stepz=3", "stepz"),
    ("model.bn=running", "BatchNorm"),
])
def test_bad_settings_stop_with_one_line_before_anything_is_written(setting, needle, tmp_path, mnist1d_dir,
                                                                    monkeypatch, capsys):
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    assert_refused_in_one_line("critical-batch", setting, needle, tmp_path / "out", capsys)


def test_another_studys_output_is_refused_without_force(tmp_path, capsys):
    other = {"experiment": "edge-of-stability", "name": "x", "runs": []}
    assert_other_output_refused("critical-batch", other, tmp_path / "out", capsys)


def test_every_public_function_of_the_study_documents_its_arguments_and_return():
    from batchgap.experiments import critical_batch, critical_fit, critical_report, critical_summary, critical_train

    assert_documented((critical_batch, critical_fit, critical_report, critical_summary, critical_train))


def test_the_batch_grid_is_a_log_grid_ending_at_the_full_training_set_and_the_reference_is_the_smallest_batch():
    from batchgap.experiments.critical_batch import CriticalSettings, batch_grid, reference

    s = CriticalSettings()
    assert batch_grid(2000, s) == [16, 32, 64, 128, 256, 512, 1024, 2000]
    assert batch_grid(1024, s) == [16, 32, 64, 128, 256, 512, 1024]
    assert batch_grid(200, CriticalSettings(grid_factor=4.0)) == [16, 64, 200]
    assert batch_grid(16, s) == [16]
    assert batch_grid(100, CriticalSettings(min_batch=10, grid_factor=1.5)) == [10, 15, 22, 34, 51, 76, 100]
    s = CriticalSettings(lrs=[0.1, 0.2, 0.4], seeds=[0, 1], targets=[0.5, 1.0])
    table = np.full((2, 2, 3, 2), np.inf)  # (seeds, batch sizes, lrs, targets)
    table[:, 0, :, 1] = [[30, 20, 10], [30, 20, 10]]  # loss 1.0: lr 0.4 fastest at batch 16
    table[:, 0, :2, 0] = [[90, 60], [100, 80]]  # loss 0.5: lr 0.4 never; lr 0.2 fastest on average
    assert reference(table, s, [16, 64]) == {"batch": 16, "lr": 0.2, "target": 0.5}
    table[1, 0, 1, 0] = np.inf  # a seed misses with lr 0.2: lr 0.1 is kept
    assert reference(table, s, [16, 64])["lr"] == 0.1
    table[:, 0, :, 0] = np.inf  # nothing reaches 0.5: the reference is the best run for 1.0
    assert reference(table, s, [16, 64]) == {"batch": 16, "lr": 0.4, "target": 1.0}
    assert reference(np.full((2, 2, 3, 2), np.inf), s, [16, 64]) is None


def test_a_branch_is_the_same_sgd_for_examples_over_batch_steps_from_an_unchanged_start():
    from torch import nn
    from torch.nn.utils import parameters_to_vector

    from batchgap.experiments.critical_train import branch, full_loss, sgd_to_targets

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    theta = parameters_to_vector(net.parameters()).detach().clone()
    loss = branch(net, theta, x, y, batch=8, lr=0.5, examples=100, seed=5)  # 100 // 8 = 12 steps
    other = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    torch.nn.utils.vector_to_parameters(theta.clone(), other.parameters())
    sgd_to_targets(other, x, y, 8, 0.5, [-1.0], 12, 5)
    assert loss == full_loss(other, x, y)
    start = theta.clone()
    torch.nn.utils.vector_to_parameters(theta.clone(), other.parameters())
    before = full_loss(other, x, y)
    after = branch(net, theta, x, y, batch=40, lr=0.5, examples=10, seed=5)  # fewer examples than a batch: 1 step
    other[0].weight.grad = None
    one = torch.nn.functional.cross_entropy(other(x), y)
    one.backward()
    with torch.no_grad():
        for p in other.parameters():
            p -= 0.5 * p.grad
    assert after == pytest.approx(full_loss(other, x, y), rel=1e-6) and after < before  # batch order: sum order
    assert torch.equal(theta, start)  # the start point is not consumed
