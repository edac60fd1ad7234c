"""Issue 19, the figures a reviewer trusts: labels say what was run, spreads on log axes are geometric,
unfitted points are marked, labels and ticks do not run together."""
import math
from itertools import combinations

import matplotlib
import numpy as np
import pytest

from batchgap.cli import main
from batchgap.report import experiments, figures
from batchgap.results import load_results

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.text import Text  # noqa: E402


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory, mnist1d_dir):
    """`batchgap run batch-sweep --quick` once: a 512-example slice, so B512..B4000 run 320..512."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BATCHGAP_DATA", str(mnist1d_dir))
        assert main(["run", "batch-sweep", "--quick", "--out", str(out), "--jobs", "1"]) == 0
    return out


def drawn(monkeypatch, draw, *args):
    """Call a figure function and keep its figure (it closes it after saving)."""
    kept = []
    monkeypatch.setattr(experiments.plt, "close", lambda fig=None: kept.append(fig))
    assert draw(*args) is not None
    return kept[-1]


def overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_the_sweep_is_labelled_by_the_batches_run(quick_sweep, tmp_path, monkeypatch):
    res = load_results(quick_sweep)
    run = {r.regime: r.batch_size for r in res.runs}
    assert [run[n] for n in ("B512", "B1024", "B2048", "B4000")] == [320, 384, 448, 512]
    assert experiments.renamed(res) == [("B512", 512, 320), ("B1024", 1024, 384), ("B2048", 2048, 448),
                                        ("B4000", 4000, 512)]
    fig = drawn(monkeypatch, experiments.batch_sweep, res, tmp_path / "sweep.png")
    fig.canvas.draw()
    for ax in fig.axes:
        labels = [t for t in ax.get_xticklabels() if t.get_text()]
        assert [int(t.get_text()) for t in labels] == sorted(run.values())  # every batch run, none named
        boxes = [t.get_window_extent() for t in labels]
        assert not any(overlap(a, b) for a, b in combinations(boxes, 2))  # readable: none run together
    note = " ".join(t.get_text() for t in fig.texts)
    assert "B512 ran 320" in note and "B4000 ran 512" in note and "512 examples" in note
    plt.close(fig)


def test_the_report_says_the_seeds_epochs_and_batches_run(quick_sweep):
    res = load_results(quick_sweep)
    report = (quick_sweep / "report.md").read_text()
    assert "1 seed, 2 epochs" in report and "3 seeds" not in report and "40 epochs" not in report
    assert "| B512 | 320 |" in report and "| B4000 | 512 |" in report
    text = experiments.as_run(res)
    assert text.startswith("As run: 1 seed (0), 2 epochs")
    assert "B512, B1024, B2048 and B4000 ran batches of 320, 384, 448 and 512, not the 512, 1024, 2048 and 4000" in text


def test_unfitted_points_are_hollow_with_a_legend_entry(quick_sweep, tmp_path, monkeypatch):
    res = load_results(quick_sweep)
    fig = drawn(monkeypatch, experiments.batch_sweep, res, tmp_path / "sweep.png")
    for ax in fig.axes:  # two epochs fit nothing: every point hollow, and the legend says what hollow means
        hollow = [line for line in ax.lines if line.get_marker() == "o" and len(line.get_xdata())
                  and line.get_markerfacecolor() == "white"]
        assert sum(len(line.get_xdata()) for line in hollow) >= 8
        assert figures.UNFITTED_LABEL in [t.get_text() for t in ax.get_legend().get_texts()]
    assert figures.UNFITTED_LABEL == "did not fit the training set (< 99%)"
    plt.close(fig)


@pytest.mark.parametrize("accuracies, unfitted", [
    ([0.983, 0.99], True),     # mean 98.65%
    ([0.833, 0.834], True),    # the remedies study's augmentation
    ([1.0, 0.995], False),
    ([0.99], False),           # the threshold itself fits
    ([0.98, None], True),      # a missing value is left out
    ([], False),               # nothing to judge
])
def test_did_not_fit_is_the_mean_training_accuracy_below_99_percent(accuracies, unfitted):
    assert figures.did_not_fit(accuracies) is unfitted


def test_geometric_error_bars_are_exp_of_mean_plus_minus_std_of_logs():
    c, lo, hi = figures.geometric_stats([1.0, 10.0, 100.0])
    assert (c, lo, hi) == pytest.approx((10.0, 1.0, 100.0))
    v = np.array([0.004, 0.03, 2.0, 210.0])
    logs = np.log(v)
    m, s = logs.mean(), logs.std(ddof=1)
    assert figures.geometric_stats(v) == pytest.approx((math.exp(m), math.exp(m - s), math.exp(m + s)))
    assert figures.geometric_stats([5.0]) == pytest.approx((5.0, 5.0, 5.0))  # one seed: no spread
    assert figures.geometric_stats([0.0, -1.0, 4.0, 4.0]) == pytest.approx((4.0, 4.0, 4.0))  # not drawable: left out
    assert all(math.isnan(x) for x in figures.geometric_stats([0.0]))
    # the arithmetic bar of the same values would run below zero, off a log axis's left edge
    assert figures.arithmetic_stats(v)[1] < 0 < lo
    # the bars drawn on a log axis are those: from exp(m - s) to exp(m + s), around exp(m)
    fig, ax = plt.subplots()
    figures.errorbar(ax, [1.0], [v], log=True)
    (seg,) = ax.collections[0].get_segments()
    assert seg[:, 1] == pytest.approx([math.exp(m - s), math.exp(m + s)])
    (point,) = [line for line in ax.lines if line.get_marker() == "o" and len(line.get_ydata())]
    assert point.get_ydata()[0] == pytest.approx(math.exp(m))
    plt.close(fig)


def test_spread_notes_name_the_kind_of_spread():
    assert figures.spread_note(3, ("accuracy", False), ("sharpness", True)) == (
        "Accuracy error bars: mean ± 1 std over 3 seeds; sharpness error bars: geometric mean ×/÷ 1 geometric std, "
        "exp(mean ± std of the logs) over 3 seeds")
    assert figures.spread_note(1, ("accuracy", False), kind="band") == "One seed: no band"


def test_labels_are_placed_without_overlap():
    rng = np.random.default_rng(0)
    xy = np.column_stack([np.exp(rng.uniform(np.log(500), np.log(1300), 9)), rng.uniform(66.5, 68.5, 9)])
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(xy[:, 0], xy[:, 1], "o")
    ax.set_xscale("log")
    ax.set_xlim(5, 5000)
    ax.set_ylim(64, 78)
    notes = figures.place_labels(ax, xy, [f"LB-remedy-{i}" for i in range(9)], ["k"] * 9)
    fig.canvas.draw()
    boxes = [Text.get_window_extent(a) for a in notes]  # the text alone, not its leader line
    assert not any(overlap(a, b) for a, b in combinations(boxes, 2))
    dots = ax.transData.transform(xy)
    assert not any(b.x0 < x < b.x1 and b.y0 < y < b.y1 for b in boxes for x, y in dots)
    frame = ax.get_window_extent()
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    plt.close(fig)


def test_contour_levels_are_round_and_on_a_log_scale():
    levels = figures.log_levels(0.00228, 39.1)
    assert list(levels) == pytest.approx([0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50])
    wide = figures.log_levels(1e-6, 1e4)
    assert len(wide) <= 16 and wide[0] <= 1e-6 and wide[-1] >= 1e4
    assert all(math.log10(v) == pytest.approx(round(math.log10(v))) for v in wide)  # whole decades
    narrow = figures.log_levels(1.22, 7.39)  # under a decade: 1-1.5-2-3-5-7
    assert list(narrow) == pytest.approx([1, 1.5, 2, 3, 5, 7, 10])


def test_the_smoothed_surface_passes_through_the_measured_grid():
    g = np.linspace(-1, 1, 15)
    a, b = np.meshgrid(g, g, indexing="ij")
    loss = 0.002 + 40 * (a ** 2 + 0.7 * b ** 2)  # a sharp minimum between few grid points
    fa, fb, z = figures.smooth_surface(g, g, loss)
    assert len(fa) == 8 * 14 + 1 and fa[::8] == pytest.approx(g)
    assert z[::8, ::8] == pytest.approx(loss, rel=1e-6)
    assert np.all(z > 0)
    small = figures.smooth_surface(g[:3], g[:3], loss[:3, :3])  # too few points for a cubic: as measured
    assert small[2] is not None and np.shape(small[2]) == (3, 3)


def test_warm_start_has_k_between_10_and_20_and_quick_runs_each_k_once():
    from batchgap.config import load_study
    from batchgap.studies import find_study

    ks = lambda cfg: [r.train.init_from.epoch for r in cfg.regimes if r.train.init_from]  # noqa: E731
    assert ks(load_study(find_study("warm-start"))) == [0, 1, 2, 5, 10, 12, 14, 16, 18, 20]
    quick = load_study(find_study("warm-start"), quick=True)
    assert ks(quick) == [0, 1, 2, 3] and quick.compare == ["SB", "LB-k0"]


def test_steepest_fall_is_per_epoch_of_k():
    # 10 -> 20 falls 100x over 10 epochs (x0.63 an epoch); 5 -> 10 only 2x but over 5 epochs (x0.87)
    assert experiments.steepest_fall([0, 5, 10, 20], [400, 400, 200, 2]) == pytest.approx((10, 20, 200, 2, 0.01 ** 0.1))
    assert experiments.steepest_fall([0, 1], [1.0, 2.0]) is None
