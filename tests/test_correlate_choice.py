"""batchgap correlate: each measure's tau against the learning rate and the batch size of the runs (Andriushchenko
et al. 2023), with the seed bootstrap's interval: exact on measures that are known functions of one choice, the
interval equal to a hand resampling, and the table and paragraph saying it."""
import itertools
import math

import numpy as np
import pytest
from scipy import stats

from batchgap.correlate import MIN_SEEDS, correlate
from batchgap.rank_bootstrap import TAU_RESAMPLED, expanded_percentile_interval, seed_pair_sums, seed_resamples, \
    tau_b_of_counts
from test_correlate import cli, results, run, write_output

BATCHES, LRS = (32, 128, 512), (1e-3, 3e-3, 1e-2)


def grid(n_seeds):
    """3 batch sizes x 3 learning rates x n_seeds; the gap follows the batch size plus seed noise; three measures:
    a monotone function of lr alone, one of the batch size alone, and one that mixes both with noise."""
    runs = []
    for i, (s, b, lr) in enumerate(itertools.product(range(n_seeds), BATCHES, LRS)):
        gap = b / 50 + math.sin(3 * s + i)
        geo = {"hessian_trace": {"value": math.exp(100 * lr)},  # strictly increasing in lr
               "hessian_eigenvalues": {"eigenvalues": [1.0 / b]},  # decreasing in the batch size
               "adaptive_sharpness": {"value": 100 * lr + b / 1000 + 0.5 * math.cos(5 * i + s)}}
        runs.append(run(i, b, lr, s, 1.0, 1.0 - gap / 100, geo))
    return runs


def rows(runs):
    return {r.measure: r for r in correlate([("g", results(runs))]).rows}


def test_tau_against_a_choice_is_exact_for_a_function_of_that_choice():
    got = rows(grid(MIN_SEEDS))
    lr_only, batch_only = got["hessian_trace"], got["hessian_top_eigenvalue"]
    # a strictly increasing function of lr: tau-b exactly 1 (the ties in lr are ties in the measure too);
    # the lr does not depend on the batch size in a full grid: concordant and discordant pairs cancel
    assert lr_only.tau_lr == 1.0 and lr_only.tau_batch == 0.0
    assert batch_only.tau_batch == -1.0 and batch_only.tau_lr == 0.0
    # every resample of the seeds keeps a deterministic function's tau: the interval is the point
    assert (lr_only.tau_lr_interval.lo, lr_only.tau_lr_interval.hi) == (1.0, 1.0)
    assert (batch_only.tau_batch_interval.lo, batch_only.tau_batch_interval.hi) == (-1.0, -1.0)


def test_tau_against_a_choice_equals_scipy_and_a_hand_resampling():
    runs = grid(MIN_SEEDS)
    row = rows(runs)["adaptive_sharpness"]
    v = [r.geometry["adaptive_sharpness"]["value"] for r in runs]
    for choice, tau, iv in (("lr", row.tau_lr, row.tau_lr_interval),
                            ("batch_size", row.tau_batch, row.tau_batch_interval)):
        x = [getattr(r, choice) for r in runs]
        assert tau == pytest.approx(stats.kendalltau(v, x).statistic, abs=1e-12)
        sums = seed_pair_sums(v, x, [r.seed for r in runs], list(range(MIN_SEEDS)))
        want = expanded_percentile_interval(tau_b_of_counts(sums, seed_resamples(MIN_SEEDS)), MIN_SEEDS, TAU_RESAMPLED)
        assert (iv.lo, iv.hi, iv.method) == (want.lo, want.hi, want.method)
        assert iv.lo < tau < iv.hi  # noisy: a real interval, not a point
    # it is the same kind of interval as the gap's tau
    assert row.tau_lr_interval.method == row.tau_interval.method


def test_a_choice_the_runs_do_not_vary_has_no_tau():
    runs = [r for r in grid(2) if r.lr == 1e-3]
    row = rows(runs)["adaptive_sharpness"]
    assert row.tau_lr is None and row.tau_lr_interval is None
    assert row.tau_batch is not None and row.tau_batch_interval.lo is None  # 2 seeds: no interval
    assert "no interval with 2 seeds" in row.tau_batch_interval.method


def test_the_table_and_the_paragraph_say_which_measure_follows_a_choice(tmp_path, capsys):
    out = write_output(tmp_path, grid(MIN_SEEDS))
    code, err = cli(capsys, out)
    assert code == 0, err
    md = (out / "correlation.md").read_text()
    assert "| τ lr | 95% interval | τ batch | 95% interval |" in md
    line = next(x for x in md.splitlines() if x.startswith("| Hessian trace |"))
    cells = [c.strip() for c in line.split("|")]
    assert cells[-7:-3] == ["+1.00", "[+1.00, +1.00]", "+0.00", "[+0.00, +0.00]"]
    # every row of every table has as many cells as its header
    for block in md.split("\n\n"):
        table = [x for x in block.splitlines() if x.startswith("|")]
        if table:
            assert len({x.replace("\\|", "").count("|") for x in table}) == 1, table[0]
    assert "The 95% interval of τ against the learning rate excludes 0 for" in md
    sentence = next(s for s in md.split("\n") if "against the learning rate excludes 0" in s)
    assert "Hessian trace (+1.00)" in sentence and "Hessian λ_max" not in sentence.split("learning rate")[1]
    assert "τ against the batch size excludes 0 for" in md and "Hessian λ_max (-1.00)" in md


def test_no_claim_without_an_interval():
    from batchgap.report.correlation import choice_sentences
    c = correlate([("g", results(grid(2)))])
    assert all(np.isfinite(r.tau_lr) for r in c.rows if r.tau_lr is not None)
    assert choice_sentences(c) == []  # 2 seeds: no interval, so nothing said about the choices
