"""batchgap correlate: Kendall's tau against scipy, Psi against a hand computation on a 2 x 2 x 2 grid, the
exact seed bootstrap, which runs are used, and the command's output and bad input."""
import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats

from batchgap.correlate import (
    EXACT_UP_TO, correlate, kendall_tau_b, measures_of, resamples, weighted_interval,
)
from batchgap.results import Metrics, Results, RunResult, to_dict


def run(i, batch, lr, seed, train_acc, test_acc, geometry, train_loss=0.01, test_loss=1.0, diverged=None):
    return RunResult(
        id=f"r{i}", regime=f"b{batch}-lr{lr:g}", batch_size=batch, seed=seed, lr=lr, lr_rule="none", optimizer="adam",
        epochs=10, steps=100, steps_per_epoch=10, diverged_epoch=diverged, wall_time_s=1.0, x0="x0.pt",
        checkpoint="c.pt", history="h.json", remedy={"name": "plain"}, ghost_batch=None, augment="none",
        batch_schedule=None, init_from=None, device="cpu", threads=1,
        train=Metrics(train_loss, train_acc, 100), test=Metrics(test_loss, test_acc, 100),
        distance_from_init={"value": 1.0 + i, "x0_norm": 10.0}, geometry=geometry, complete=True)


def results(runs, name="grid"):
    return Results(study={"name": name}, data={}, environment={}, command=None, runs=runs, pairs=[], summary=[],
                   comparison=None, wall_time_s=0.0)


def test_kendall_tau_b_equals_scipy_with_and_without_ties():
    rng = np.random.default_rng(0)
    for n in (3, 5, 12, 30):
        for ties in (False, True):
            x, y = rng.normal(size=n), rng.normal(size=n)
            if ties:
                x, y = np.round(x), np.round(y * 2)
            expected = stats.kendalltau(x, y).statistic
            got = kendall_tau_b(x, y)
            assert (math.isnan(expected) and math.isnan(got)) or got == pytest.approx(expected, abs=1e-12)
            # unit weights with every point its own cluster are the plain statistic
            assert kendall_tau_b(x, y, np.ones(n), np.arange(n)) == pytest.approx(got, abs=1e-12, nan_ok=True)
    assert math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))


def test_weighted_tau_counts_pairs_of_distinct_draws():
    # a resample drawing cluster A twice and B never: A's pairs count c(c-1) = 2 times, B's none
    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 4.0, 3.0]
    clusters = ["A", "A", "B", "B"]
    assert kendall_tau_b(x, y, [2, 2, 0, 0], clusters) == pytest.approx(1.0)  # A alone is concordant
    assert kendall_tau_b(x, y, [0, 0, 2, 2], clusters) == pytest.approx(-1.0)
    # every point its own cluster, drawn once: all 6 pairs once, the plain statistic
    assert kendall_tau_b(x, y, [1, 1, 1, 1], [0, 1, 2, 3]) == pytest.approx(stats.kendalltau(x, y).statistic)
    # each of A and B drawn once: a cluster's own pair needs two draws of it, so only the 4 cross pairs count
    cross = [np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i in (0, 1) for j in (2, 3)]
    assert kendall_tau_b(x, y, [1, 1, 1, 1], clusters) == pytest.approx(np.mean(cross))
    # A drawn twice and B once: A's pair 2 times, each cross pair 2 times
    within_a, within_b = 1.0, -1.0
    assert kendall_tau_b(x, y, [2, 2, 1, 1], clusters) == pytest.approx((2 * within_a + 2 * sum(cross)) / 10)
    assert within_b == -1.0


def grid_runs():
    """2 batch sizes x 2 learning rates x 2 seeds with chosen measure and gap values."""
    measure = {(32, 1e-3, 0): 1.0, (512, 1e-3, 0): 3.0, (32, 1e-2, 0): 2.0, (512, 1e-2, 0): 0.5,
               (32, 1e-3, 1): 1.5, (512, 1e-3, 1): 1.0, (32, 1e-2, 1): 2.5, (512, 1e-2, 1): 4.0}
    gap = {(32, 1e-3, 0): 10, (512, 1e-3, 0): 20, (32, 1e-2, 0): 15, (512, 1e-2, 0): 25,
           (32, 1e-3, 1): 11, (512, 1e-3, 1): 21, (32, 1e-2, 1): 14, (512, 1e-2, 1): 26}
    runs = []
    for i, (b, lr, s) in enumerate(itertools.product((32, 512), (1e-3, 1e-2), (0, 1))):
        runs.append(run(i, b, lr, s, 1.0, 1.0 - gap[b, lr, s] / 100,
                        {"hessian_trace": {"value": measure[b, lr, s]}}))
    return runs, measure, gap


def test_psi_equals_a_hand_computation_on_a_2x2x2_grid():
    runs, m, g = grid_runs()
    sign = lambda a, b: float(np.sign(m[a] - m[b]) * np.sign(g[a] - g[b]))  # noqa: E731
    # batch size varies alone within each (lr, seed): 4 pairs
    psi_b = np.mean([sign((512, lr, s), (32, lr, s)) for lr in (1e-3, 1e-2) for s in (0, 1)])
    psi_lr = np.mean([sign((b, 1e-2, s), (b, 1e-3, s)) for b in (32, 512) for s in (0, 1)])
    assert (psi_b, psi_lr) == (0.0, 0.5)  # the hand values: (+1 - 1 - 1 + 1) / 4, (+1 - 1 + 1 + 1) / 4
    c = correlate([("grid", results(runs))])
    row = next(r for r in c.rows if r.measure == "hessian_trace")
    assert c.axes == ["batch_size", "lr"]
    assert row.psi_axes == {"batch_size": pytest.approx(psi_b), "lr": pytest.approx(psi_lr)}
    assert row.psi == pytest.approx((psi_b + psi_lr) / 2)
    assert row.groups == {"batch_size": 4, "lr": 4}
    values = [m[b, lr, s] for b, lr, s in itertools.product((32, 512), (1e-3, 1e-2), (0, 1))]
    gaps = [g[b, lr, s] for b, lr, s in itertools.product((32, 512), (1e-3, 1e-2), (0, 1))]
    assert row.tau == pytest.approx(stats.kendalltau(values, gaps).statistic)
    assert row.n == 8


def test_exact_bootstrap_enumerates_every_resample_with_its_probability():
    for S in (1, 2, 3, 5):
        draws = resamples(list(range(S)))
        assert len(draws) == math.comb(2 * S - 1, S)
        assert sum(p for _, p in draws) == pytest.approx(1.0)
        assert all(sum(w.values()) == S for w, _ in draws)
    # 2 seeds: {0,0} and {1,1} each 1/4, {0,1} 1/2
    probs = {tuple(sorted(w.items())): p for w, p in resamples([0, 1])}
    assert probs == {((0, 2),): 0.25, ((1, 2),): 0.25, ((0, 1), (1, 1)): 0.5}
    # against brute force over all S^S ordered draws for S = 3
    brute = {}
    for d in itertools.product(range(3), repeat=3):
        key = tuple(sorted({s: d.count(s) for s in set(d)}.items()))
        brute[key] = brute.get(key, 0) + 1 / 27
    assert {tuple(sorted(w.items())): p for w, p in resamples([0, 1, 2])} == pytest.approx(brute)
    assert len(resamples(list(range(EXACT_UP_TO + 1)), n_boot=50)) == 50


def test_weighted_interval_is_the_percentile_of_the_discrete_distribution():
    assert weighted_interval([0.0, 1.0, 2.0], [0.25, 0.5, 0.25]) == (0.0, 2.0)
    assert weighted_interval([0.0, 1.0, 2.0], [0.01, 0.98, 0.01]) == (1.0, 1.0)
    v = np.random.default_rng(1).normal(size=4001)
    lo, hi = weighted_interval(v, np.ones(len(v)))
    assert lo == pytest.approx(np.quantile(v, 0.025, method="inverted_cdf"))
    assert hi == pytest.approx(np.quantile(v, 0.975, method="inverted_cdf"))


def test_psi_interval_with_two_seeds_spans_the_seeds_alone():
    runs, m, g = grid_runs()
    c = correlate([("grid", results(runs))])
    row = next(r for r in c.rows if r.measure == "hessian_trace")
    per_seed = []
    for s in (0, 1):
        sub = [r for r in runs if r.seed == s]
        per_seed.append(next(r.psi for r in correlate([("g", results(sub))]).rows if r.measure == "hessian_trace"))
    assert sorted(per_seed) == [0.0, 0.5]
    assert row.psi_interval.lo == pytest.approx(min(per_seed)) and row.psi_interval.hi == pytest.approx(max(per_seed))
    assert "exact" in row.psi_interval.method


def test_unfitted_diverged_and_unmeasured_runs_are_left_out_and_counted():
    runs, _, _ = grid_runs()
    runs[0] = run(0, 32, 1e-3, 0, 0.95, 0.8, {"hessian_trace": {"value": 9.0}})
    runs[1] = run(1, 32, 1e-3, 1, 1.0, 0.8, None, diverged=3)
    runs[2].geometry = {}
    c = correlate([("grid", results(runs))])
    assert c.runs_total == 8 and c.runs_used == 6
    assert c.left_out == {"not fitted (train accuracy < 99%)": 1, "diverged": 1}
    assert next(r for r in c.rows if r.measure == "hessian_trace").n == 5  # one fitted run has no measure
    # a run id in two outputs counts once; a second study is an axis
    twice = correlate([("a", results(runs)), ("b", results(runs))])
    assert twice.runs_total == 8
    other = [run(100 + i, r.batch_size, r.lr, r.seed, 1.0, r.test.accuracy, r.geometry) for i, r in enumerate(runs)]
    both = correlate([("a", results(runs)), ("b", results(other))])
    assert "study" in both.axes


def test_measures_are_oriented_as_complexities():
    geo = {"norms": {"margin": 2.0, "log_prod_spectral": 1.0, "param_norm_all": 3.0},
           "sharpness": [{"eps": 1e-3, "subspace_dim": None, "value": 5.0}]}
    r = run(0, 32, 1e-3, 0, 1.0, 0.9, geo)
    got = {m.key: m.pick(r) for m in measures_of([r])}
    assert got["inverse_margin"] == pytest.approx(0.25)
    assert got["spectral_margin"] == pytest.approx(2 * 1.0 - 2 * math.log(2.0))
    assert got["sharpness_full_0.001"] == 5.0 and got["param_norm_all"] == 3.0 and got["distance"] == 1.0
    assert "path_norm" not in got  # only the measures the runs carry
    r.geometry["norms"]["margin"] = -0.1  # a negative 10th-percentile margin has no inverse square
    assert "inverse_margin" not in {m.key for m in measures_of([r])}


def write_output(tmp_path, runs, name="grid"):
    out = tmp_path / name
    out.mkdir()
    (out / "results.json").write_text(json.dumps(to_dict(results(runs, name))))
    return out


def cli(capsys, *args):
    """``batchgap correlate ARGS`` in this process: (exit code, stderr)."""
    from batchgap.cli import main

    capsys.readouterr()
    code = main(["correlate", *map(str, args)])
    return code, capsys.readouterr().err


def test_correlate_command_writes_the_table_and_figures(tmp_path, capsys):
    runs, _, _ = grid_runs()
    out = write_output(tmp_path, runs)
    code, err = cli(capsys, out)
    assert code == 0, err
    md = (out / "correlation.md").read_text()
    assert "| Hessian trace | +0.25 |" in md and "ψ batch_size" in md and "ψ lr" in md
    # Psi is 0 on seed 0 alone and 0.5 on seed 1 alone: its interval [0, 0.5] includes 0
    assert "| Hessian trace | +0.25 | [+0.00, +0.50] |" in md and "undetermined with 2 seeds" in md
    doc = json.loads((out / "correlation.json").read_text())
    assert [d["target"] for d in doc] == ["gap", "test_error", "loss_gap"]
    assert (out / "figures" / "correlation_ranking.png").stat().st_size > 1000
    assert (out / "figures" / "correlation_scatter.png").stat().st_size > 1000


def test_correlate_bad_input_is_one_line(tmp_path, capsys):
    runs, _, _ = grid_runs()
    a = write_output(tmp_path, runs, "a")
    b = write_output(tmp_path, runs[:2], "b")
    (tmp_path / "c").mkdir()
    for args, words in [((a, b), "--out"), ((tmp_path / "c",), "no results here"),
                        ((b,), "needs at least 3"), ((tmp_path / "nope",), "no results here")]:
        code, err = cli(capsys, *args)
        assert code == 2, err
        assert words in err and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err
    assert not (b / "correlation.md").exists()


def test_a_regime_override_the_run_record_lacks_is_an_axis():
    """Two regimes differing only in weight decay must not share a "batch size only" group."""
    runs, _, _ = grid_runs()
    res = results(runs)
    res.study["regimes"] = [{"name": r.regime, "batch_size": r.batch_size, "lr": r.lr} for r in runs]
    assert "settings" not in correlate([("grid", res)]).axes
    for g in res.study["regimes"]:
        if g["batch_size"] == 512:
            g["weight_decay"] = 1e-4  # the batch-512 regimes also decay their weights
    c = correlate([("grid", res)])
    assert "settings" in c.axes
    row = next(r for r in c.rows if r.measure == "hessian_trace")
    assert row.groups["batch_size"] == 0  # batch size never varies alone now


def test_report_text_claims_no_more_than_the_intervals():
    from batchgap.correlate import Correlation, Row
    from batchgap.report.correlation import paragraph, table
    from batchgap.results import Interval

    def row(name, psi, lo, hi):
        return Row(name, name, "", 10, psi, None, psi, Interval(lo, hi, 0.95, "m", 5), {}, {})

    def corr(rows, axes=("batch_size",)):
        return Correlation("gap", "gap", list(axes), [0, 1, 2, 3, 4], 10, 10, {}, ["x"], rows, "m")

    # A leads B, but C's wide interval overlaps A: no "ranks first"
    text = paragraph(corr([row("A", 0.6, 0.5, 0.7), row("B", 0.4, 0.3, 0.45), row("C", 0.3, -0.2, 0.95)]))
    assert "ranks first" not in text and "not established" in text and "C the interval includes 0" in text
    text = paragraph(corr([row("A", 0.6, 0.5, 0.7), row("B", 0.4, 0.3, 0.45)]))
    assert "A ranks first" in text and "the 95% interval of Ψ lies above 0 for A, B" in text
    for axes in ((), ("batch_size", "lr")):  # the header has as many cells as the rows, axes or none
        lines = table(corr([row("A", 0.6, 0.5, 0.7)], axes))
        assert len({line.count("|") for line in lines}) == 1, lines
