"""batchgap correlate: Kendall's tau against scipy, Psi against a hand computation on a 2 x 2 x 2 grid, the
seed bootstrap's resampled statistics against hand computations, which runs are used, and the command's output
and bad input. The intervals' coverage: test_correlate_interval.py."""
import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats

from batchgap.correlate import MIN_SEEDS, correlate, kendall_tau_b, measures_of
from batchgap.rank_bootstrap import (
    expanded_levels, expanded_percentile_interval, psi_of_counts, seed_pair_sums, seed_resamples, tau_b_of_counts,
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
            # the resampling's sums with every seed drawn once are the plain statistic, ties and all
            sums = seed_pair_sums(x, y, rng.integers(0, 4, n))
            got_sums = tau_b_of_counts(sums, np.ones(len(sums.seeds)))[0]
            assert got_sums == pytest.approx(got, abs=1e-12, nan_ok=True)
    assert math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))


def test_resampled_tau_counts_each_draw_as_a_seed_of_its_own():
    """Against a hand count: a draw's own pairs once per draw, pairs across draws of two seeds once per
    pair of draws, pairs across two draws of one seed not at all."""
    x, y = [1.0, 2.0, 3.0, 4.0, 0.5], [1.0, 2.0, 4.0, 3.0, 5.0]
    seeds = ["A", "A", "B", "B", "C"]
    sums = seed_pair_sums(x, y, seeds)
    sign = lambda i, j: np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])  # noqa: E731
    within_a, within_b = sign(0, 1), sign(2, 3)
    ab = sum(sign(i, j) for i in (0, 1) for j in (2, 3))
    ac, bc = sign(0, 4) + sign(1, 4), sign(2, 4) + sign(3, 4)
    assert (within_a, within_b) == (1.0, -1.0)
    for counts in ([1, 1, 1], [2, 0, 1], [3, 0, 0], [0, 2, 1], [1, 2, 0]):
        ca, cb, cc = counts
        num = ca * within_a + cb * within_b + ca * cb * ab + ca * cc * ac + cb * cc * bc
        pairs = ca + cb + 4 * ca * cb + 2 * ca * cc + 2 * cb * cc  # no ties here: tau-b is num / pairs
        assert tau_b_of_counts(sums, counts)[0] == pytest.approx(num / pairs), counts
    assert tau_b_of_counts(sums, [1, 1, 1])[0] == pytest.approx(stats.kendalltau(x, y).statistic)
    # a seed without runs in these points (a measure missing there) is a zero column, not an error
    wider = seed_pair_sums(x, y, seeds, order=("A", "B", "C", "D"))
    assert tau_b_of_counts(wider, [1, 1, 1, 1])[0] == pytest.approx(tau_b_of_counts(sums, [1, 1, 1])[0])
    with pytest.raises(ValueError, match="not in order"):
        seed_pair_sums(x, y, seeds, order=("A", "B"))


def test_two_seeds_each_concordant_alone_keep_the_meaning_of_the_point_value():
    """Issue 24, point 3: each seed alone ranks perfectly (tau = +1), the seeds' offsets run the other way,
    so tau over all 6 runs is (6 concordant - 9 discordant) / 15 = -0.20. The resample drawing each seed once
    is the data and must give -0.20 (the distinct-draw weighting gave the 9 cross pairs alone, -1), and with 2
    seeds there is no interval (it was [-1, +1], sold as "the range of the seeds' own values")."""
    measure = [0.0, 1.0, 2.0, 10.0, 11.0, 12.0]
    gap = [20.0, 21.0, 22.0, 10.0, 11.0, 12.0]
    seeds = [0, 0, 0, 1, 1, 1]
    sums = seed_pair_sums(measure, gap, seeds)
    assert tau_b_of_counts(sums, [[1, 1], [2, 0], [0, 2]]) == pytest.approx([-0.2, 1.0, 1.0])
    runs = [run(i, (32, 64, 128)[i % 3], 1e-3, s, 1.0, 1.0 - g / 100, {"hessian_trace": {"value": v}})
            for i, (v, g, s) in enumerate(zip(measure, gap, seeds))]
    row = next(r for r in correlate([("two", results(runs))]).rows if r.measure == "hessian_trace")
    assert row.tau == pytest.approx(-0.2) and row.psi == pytest.approx(1.0)
    for iv in (row.tau_interval, row.psi_interval):
        assert iv.lo is None and iv.hi is None
        assert iv.method == f"no interval with 2 seeds: the bootstrap over seeds needs at least {MIN_SEEDS}"


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


def test_seed_resamples_draw_every_seed_with_replacement():
    draws = seed_resamples(5, n_boot=4000, seed=3)
    assert draws.shape == (4000, 5) and (draws.sum(axis=1) == 5).all()
    assert draws.mean(axis=0) == pytest.approx(np.ones(5), abs=0.05)  # each seed drawn once on average
    assert draws.var(axis=0) == pytest.approx(np.full(5, 0.8), abs=0.08)  # binomial(5, 1/5)
    assert (seed_resamples(5, 10, seed=3) == draws[:10]).all()  # seeded: the same draws every time


def test_expanded_percentile_interval_takes_the_expanded_percentiles():
    v = np.random.default_rng(1).normal(size=4001)
    q_lo, q_hi = expanded_levels(10)
    # q = Phi(-sqrt(S / (S - 1)) t_{S-1, 0.975})
    assert q_lo == pytest.approx(stats.norm.cdf(-math.sqrt(10 / 9) * stats.t.ppf(0.975, 9))) and q_hi == 1 - q_lo
    assert expanded_levels(10_000)[0] == pytest.approx(0.025, abs=1e-4)  # the plain percentile interval
    iv = expanded_percentile_interval(v, 10, "how")
    assert iv.lo == pytest.approx(np.quantile(v, q_lo, method="inverted_cdf"))
    assert iv.hi == pytest.approx(np.quantile(v, q_hi, method="inverted_cdf"))
    assert iv.method.endswith("4001 resamples of the seeds with replacement, a seed's runs drawn together: how")
    with_nan = expanded_percentile_interval(np.append(v, [np.nan] * 7), 10, "how")
    assert (with_nan.lo, with_nan.hi) == (iv.lo, iv.hi)
    assert "7 resamples where it is undefined left out" in with_nan.method
    assert expanded_percentile_interval([np.nan] * 3, 10, "how").lo is None


def test_psi_under_a_resample_weights_each_set_by_its_seeds_draws():
    runs, m, g = grid_runs()
    c = correlate([("grid", results(runs))])
    row = next(r for r in c.rows if r.measure == "hessian_trace")
    per_seed = []
    for s in (0, 1):
        sub = [r for r in runs if r.seed == s]
        per_seed.append(next(r.psi for r in correlate([("g", results(sub))]).rows if r.measure == "hessian_trace"))
    assert sorted(per_seed) == [0.0, 0.5]
    # seed 0 drawn twice is seed 0 alone; each drawn once is the point value
    sign = lambda a, b: float(np.sign(m[a] - m[b]) * np.sign(g[a] - g[b]))  # noqa: E731
    parts = {"batch_size": [(s, sign((512, lr, s), (32, lr, s))) for lr in (1e-3, 1e-2) for s in (0, 1)],
             "lr": [(s, sign((b, 1e-2, s), (b, 1e-3, s))) for b in (32, 512) for s in (0, 1)]}
    psi, per_axis = psi_of_counts(parts, [0, 1], [[2, 0], [0, 2], [1, 1]])
    assert psi == pytest.approx([per_seed[0], per_seed[1], row.psi])
    assert per_axis[2] == pytest.approx([row.psi_axes["batch_size"], row.psi_axes["lr"]])
    # an axis only one seed varies: a resample without that seed averages over the other axis alone
    one_sided = {"batch_size": [(0, 1.0)], "lr": [(0, 0.0), (1, -1.0)]}
    assert psi_of_counts(one_sided, [0, 1], [[0, 2], [1, 1]])[0] == pytest.approx([-1.0, (1.0 - 0.5) / 2])
    # ... so with 2 seeds the pooled Psi can lie outside what each seed gives alone: 0 and 0, together -0.25
    outside = {"batch_size": [(0, 0.0), (1, 1.0)], "lr": [(1, -1.0)]}
    assert psi_of_counts(outside, [0, 1], [[2, 0], [0, 2], [1, 1]])[0] == pytest.approx([0.0, 0.0, -0.25])
    assert row.psi_interval.lo is None and "no interval with 2 seeds" in row.psi_interval.method


def test_intervals_from_the_minimum_number_of_seeds_on():
    """With MIN_SEEDS seeds every row carries both intervals, around its point value."""
    runs, i = [], 0
    for s in range(MIN_SEEDS):
        for b, lr in itertools.product((32, 512), (1e-3, 1e-2)):
            value = b / 100 + 10 * lr + np.sin(7 * s + b + 100 * lr)  # deterministic, seed-dependent
            runs.append(run(i, b, lr, s, 1.0, 1.0 - (b / 20 + s % 3) / 100, {"hessian_trace": {"value": value}}))
            i += 1
    row = next(r for r in correlate([("many", results(runs))]).rows if r.measure == "hessian_trace")
    assert row.tau_interval.lo <= row.tau <= row.tau_interval.hi
    assert row.psi_interval.lo <= row.psi <= row.psi_interval.hi
    assert f"over the {MIN_SEEDS} seeds" in row.tau_interval.method and "pairs across" in row.tau_interval.method
    assert "weighted by the number of draws of its seed" in row.psi_interval.method


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
    # 2 seeds: no interval, so no claim either way
    assert "| Hessian trace | +0.25 | n/a |" in md and "undetermined with 2 seeds" in md
    assert f"no interval with 2 seeds: the bootstrap over seeds needs at least {MIN_SEEDS}" in md
    assert f"there is no interval with 2 seeds (the seed bootstrap needs at least {MIN_SEEDS})" in md
    # said once for every measure, not as a list of every label
    assert "For every measure there is no interval with 2 seeds" in md and "do not establish an order" in md
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
