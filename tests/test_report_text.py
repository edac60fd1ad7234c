"""Issue 19: the generated "Reading the numbers" never claims more than the intervals allow.

A table over the cases: each measure's LB/SB interval above 1, below 1, straddling 1 (wide), narrow
around 1, one seed; the regimes fitted or not."""
import pytest

from batchgap.report.geometry import reading
from batchgap.report.text import verdict
from batchgap.results import Comparison, Interval, Ratio, RegimeSummary, Results, RunResult, SharpnessStat, Stat


def iv(lo, hi, n=5):
    return (Interval(lo, hi, 0.95, "paired percentile bootstrap", n) if lo is not None
            else Interval(None, None, 0.95, "one seed: no interval", 1))


CASES = {  # interval -> verdict
    "above": ((1.8, 40.0), "sharper"),
    "below": ((0.01, 0.6), "flatter"),
    "straddling": ((0.5, 3.0), "undetermined with 5 seeds"),
    "narrow around 1": ((0.9, 1.1), "about the same"),
    "one seed": ((None, None), "undetermined with 1 seed"),
    "just touching 1": ((1.0, 2.0), "undetermined with 5 seeds"),
}


@pytest.mark.parametrize("case", CASES)
def test_the_verdict_follows_the_interval(case):
    (lo, hi), want = CASES[case]
    r = Ratio("sharpness", 2.0, 0.001, None, iv(lo, hi, 1 if lo is None else 5))
    assert verdict(r, "sharper", "flatter") == want


def results(sharp, adaptive, fitted=True, n=5):
    def stat(v):
        return Stat(v, v / 10, n)

    def row(name, s, train):
        return RegimeSummary(name, 32, 1e-3, n, 0, Stat(train, 0.001, n), Stat(0.7, 0.01, n), Stat(0.01, 0.0, n),
                             Stat(1.0, 0.1, n), Stat(3.0, 0.1, n), Stat(5.0, 1.0, n),
                             [SharpnessStat(0.001, None, stat(s))], stat(0.1 * s), stat(5.0), None, None)
    run = RunResult(id="SB-s0", regime="SB", batch_size=32, seed=0, lr=1e-3, lr_rule="none", optimizer="adam", epochs=1,
                    steps=1, steps_per_epoch=1, diverged_epoch=None, wall_time_s=1.0, x0="", checkpoint="", history="",
                    remedy={}, ghost_batch=None, augment="none", batch_schedule=None, init_from=None, device="cpu",
                    threads=1, geometry={"data": "full training set (4000 examples)",
                                         "adaptive_sharpness": {"variant": "n-sharpness"}})
    comp = Comparison("SB", "LB", 0.05, 3.0, 0.01, "Welch", [
        Ratio("sharpness", sharp[2], 0.001, None, iv(*sharp[:2], n=n)),
        Ratio("adaptive_sharpness", adaptive[2], None, None, iv(*adaptive[:2], n=n))], 2.5, n_small=n, n_large=n)
    return Results({}, {}, {}, None, [run], [],
                   [row("SB", 10.0, 1.0), row("LB", 10.0 * sharp[2], 1.0 if fitted else 0.9)], comp, 1.0)


TABLE = [  # (eps-sharpness interval, adaptive interval, fitted) -> what the paragraph must and must not say
    (((5, 80, 20), (2, 9, 4), True), ["LB solutions are **sharper**", "agrees with the raw measure"],
     ["flatter", "Caveat"]),
    (((5, 80, 20), (0.01, 0.5, 0.1), True), ["**sharper**", "disagrees with the raw measure (finds them flatter)"], []),
    (((0.1, 0.5, 0.2), (0.05, 0.6, 0.2), True), ["LB solutions are **flatter**", "agrees"], ["sharper"]),
    (((0.5, 3, 1.2), (0.01, 0.5, 0.1), True),
     ["is **undetermined with 5 seeds**", "finds them flatter where the raw measure is not decisive"],
     ["**sharper**", "**flatter**"]),
    (((0.9, 1.1, 1.0), (0.5, 4, 1.0), True), ["**about as sharp**", "is not decisive"], ["sharper"]),
    (((5, 80, 20), (2, 9, 4), False), ["Caveat: LB did not fit the training set", "**sharper**"], []),
    (((None, None, 20), (None, None, 4), True), ["**undetermined with 1 seed**", "no interval: one seed"],
     ["**sharper**", "agrees"]),
]


@pytest.mark.parametrize("row", range(len(TABLE)))
def test_the_paragraph_says_what_the_intervals_allow(row):
    (sharp, adaptive, fitted), must, must_not = TABLE[row]
    n = 1 if sharp[0] is None else 5
    text = reading(results(sharp, adaptive, fitted, n))[0]
    for needle in must:
        assert needle in text, (needle, text)
    for needle in must_not:
        assert needle not in text, (needle, text)


@pytest.mark.parametrize("n, method, want", [
    (5, "unbounded with 5 seeds (Fieller, t with 4 d.f.: the denominator's mean is not distinguishable from 0)",
     "0.966× (unbounded: no interval)"),
    (1, "one seed: no interval", "0.966× (one seed)"),
])
def test_a_ratio_cell_without_an_interval_says_why(n, method, want):
    """Five seeds whose SB mean Fieller cannot tell from 0 have no interval: the table must not call that one seed."""
    from batchgap.report.geometry import _cell

    res = results((5, 80, 20), (2, 9, 4), n=n)
    res.comparison.large_over_small.append(
        Ratio("hessian_top_eigenvalue", 0.966, None, None, Interval(None, None, 0.95, method, n)))
    assert _cell(res, "hessian_top_eigenvalue") == want
