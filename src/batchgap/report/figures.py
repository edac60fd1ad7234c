"""Figures of a study, drawn from results.json and the runs' histories (matplotlib, Agg).

A spread over seeds is drawn one way everywhere and named in each caption (:func:`spread_note`): on a
linear axis the mean and ±1 sample std; on a log axis the geometric mean and ×/÷ one geometric std,
exp(mean ± std) of the log values (:func:`geometric_stats`), which stays positive and is symmetric there.
A band pooled over curves from the lowest to the highest says "min-max". Points of regimes that did not
fit the training set (:func:`did_not_fit`) are hollow.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FixedLocator, FormatStrFormatter, LogLocator, MaxNLocator, NullLocator  # noqa: E402

from ..results import FITTED, Results  # noqa: E402
from ..rundir import read_history  # noqa: E402

COLORS = {0: "tab:blue", 1: "tab:red"}
OTHER = ["tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan",
         "navy", "darkgoldenrod", "darkslategray", "magenta", "lime", "maroon"]

UNFITTED_LABEL = f"did not fit the training set (< {100 * FITTED:.0f}%)"
SPREAD_STD = "mean ± 1 std"
SPREAD_GEO = "geometric mean ×/÷ 1 geometric std, exp(mean ± std of the logs)"


def regime_colors(res: Results) -> dict:
    """SB blue, LB red (as the seed demonstration), other regimes from a fixed cycle."""
    names = [r["name"] for r in res.study["regimes"]]
    comp = res.comparison
    fixed = {comp.small: COLORS[0], comp.large: COLORS[1]} if comp else {}
    out, k = {}, 0
    for n in names:
        if n in fixed and n is not None:
            out[n] = fixed[n]
        else:
            out[n] = OTHER[k % len(OTHER)]
            k += 1
    return out


# ------------------------------------------------------------------ spreads over seeds

def geometric_stats(values) -> tuple[float, float, float]:
    """``(exp(m), exp(m - s), exp(m + s))``, m and s the mean and sample std (ddof 1; 0 for one value) of
    ``log(values)``: the geometric mean and its ×/÷ one-geometric-std interval, the spread of a log axis.
    Values <= 0 or not finite cannot be drawn there and are left out (nan when none is left)."""
    v = np.asarray(values, dtype=float).ravel()
    logs = np.log(v[np.isfinite(v) & (v > 0)])
    if not len(logs):
        return math.nan, math.nan, math.nan
    m, s = float(logs.mean()), float(logs.std(ddof=1)) if len(logs) > 1 else 0.0
    return math.exp(m), math.exp(m - s), math.exp(m + s)


def arithmetic_stats(values) -> tuple[float, float, float]:
    """``(mean, mean - std, mean + std)`` with the sample std (ddof 1; 0 for one value); nan ignored."""
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    if not len(v):
        return math.nan, math.nan, math.nan
    m, s = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return m, m - s, m + s


def spreads(rows, log: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Center, low and high of each row (the values over seeds at one x): geometric when ``log``."""
    stats = np.asarray([(geometric_stats if log else arithmetic_stats)(row) for row in rows], dtype=float)
    return (stats[:, 0], stats[:, 1], stats[:, 2]) if len(stats) else (np.array([]),) * 3


def spread_note(n_seeds: int, *parts: tuple[str, bool], kind: str = "error bars") -> str:
    """The caption's words for the spreads over ``n_seeds`` seeds: ``parts`` are (what, on a log axis),
    e.g. ``("accuracy", False), ("sharpness", True)``; one seed: none drawn."""
    if n_seeds < 2:
        return f"One seed: no {kind}"
    text = "; ".join(f"{what} {kind}: {SPREAD_GEO if log else SPREAD_STD} over {n_seeds} seeds" for what, log in parts)
    return text[:1].upper() + text[1:]


def did_not_fit(train_accuracies) -> bool:
    """A regime's solutions did not fit the training set: mean training accuracy over its seeds below
    :data:`FITTED` (99%), the report's "Not fitted" rule. A gap against them is partly an optimization gap."""
    v = [a for a in train_accuracies if a is not None and math.isfinite(a)]
    return bool(v) and float(np.mean(v)) < FITTED


def errorbar(ax, x, rows, log: bool = False, hollow=None, color="k", ls="-", marker="o", label=None, ms=5.0):
    """Points at ``x``: the center and spread of each row (:func:`spreads`, geometric when ``log``), a line
    through them; ``hollow[i]`` draws point i hollow (did not fit). Returns the legend handle."""
    x = np.asarray(x, dtype=float)
    c, lo, hi = spreads(rows, log)
    ax.errorbar(x, c, yerr=np.vstack([c - lo, hi - c]), fmt="none", ecolor=color, elinewidth=1.2, capsize=3)
    if ls != "none":
        ax.plot(x, c, ls=ls, color=color, lw=1.5)
    hollow = np.zeros(len(x), bool) if hollow is None else np.asarray(hollow, bool)
    ax.plot(x[~hollow], c[~hollow], ls="none", marker=marker, ms=ms, color=color, zorder=3)
    ax.plot(x[hollow], c[hollow], ls="none", marker=marker, ms=ms, color=color, mfc="white", mew=1.4, zorder=3)
    return Line2D([], [], ls=ls, marker=marker, ms=ms, color=color, label=label)


def unfitted_handle() -> Line2D:
    return Line2D([], [], ls="none", marker="o", ms=5, color="0.35", mfc="white", mew=1.4, label=UNFITTED_LABEL)


def _band(ax, x, rows, color, style, label, log: bool = False):
    """A line through the center of each column of ``rows`` (one row per seed) and its spread as a band."""
    arr = np.asarray(rows, dtype=float)
    c, lo, hi = spreads(arr.T, log)
    ax.plot(x, c, style, color=color, label=label, lw=1.8)
    if len(arr) > 1:
        ax.fill_between(x, lo, hi, color=color, alpha=0.18, lw=0)


def _protocol_note(fig, text: str) -> None:
    fig.text(0.01, 0.01, text, fontsize=7.5, color="0.3", ha="left", va="bottom", wrap=True)


def plain_log(ax, axis: str = "y") -> None:
    """Log scale with tick labels written as plain numbers (1, 2, 5, 10, ...)."""
    a = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    a.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    a.set_major_formatter(FormatStrFormatter("%g"))
    a.set_minor_formatter(FormatStrFormatter(""))


def thinned(ax, values, labels, rotation: float = 0.0, fontsize: float = 8.0) -> list[bool]:
    """Which of the x ticks at ``values`` keep their label so that no two labels touch: each far enough
    from the last kept one (a text height over sin(rotation) when rotated, its width when not), the first
    and the last always kept. Set the axes' scale, limits and layout first."""
    px = ax.transData.transform(np.column_stack([values, np.ones(len(values))]))[:, 0]
    size = fontsize * ax.figure.dpi / 72
    if rotation >= 30:
        need = np.full(len(values), 1.1 * size / math.sin(math.radians(rotation)))
    else:  # half of this label and half of the next, about 0.6 text heights a character, and a gap
        need = np.asarray([0.6 * size * len(t) + 0.8 * size for t in labels])
    order = list(np.argsort(px))
    keep, last = [False] * len(values), None
    for i in order:
        if last is None or px[i] - px[last] >= (need[i] + need[last]) / 2:
            keep[i], last = True, i
    end = order[-1]
    if not keep[end]:
        kept = [i for i in order if keep[i]]
        if len(kept) > 1 and px[end] - px[kept[-1]] < (need[end] + need[kept[-1]]) / 2:
            keep[kept[-1]] = False
        keep[end] = True
    return keep


def value_ticks(ax, values, fontsize: float = 8.0, rotation: float = 0.0) -> None:
    """X ticks at exactly ``values`` (the settings run), labels thinned so that none touch (:func:`thinned`)."""
    values = sorted(set(values))
    labels = [f"{v:g}" for v in values]
    ax.xaxis.set_major_locator(FixedLocator(values))
    ax.xaxis.set_minor_locator(NullLocator())
    keep = thinned(ax, values, labels, rotation, fontsize)
    kw = {"rotation": rotation, "ha": "right", "va": "center", "rotation_mode": "anchor"} if rotation else {}
    ax.set_xticks(values, [t if k else "" for t, k in zip(labels, keep)], fontsize=fontsize, **kw)


def batch_ticks(ax, sizes, fontsize: float = 8.0) -> None:
    """A log2 batch-size axis ticked at the batches run: labels level where they fit, else at 45°, else
    upright, thinned only where even upright labels would touch."""
    ax.set_xscale("log", base=2)
    ax.set_xlim(min(sizes) / 2 ** 0.35, max(sizes) * 2 ** 0.35)
    values = sorted(set(sizes))
    labels = [str(v) for v in values]
    rotation = next((rot for rot in (0.0, 45.0) if all(thinned(ax, values, labels, rot, fontsize))), 90.0)
    value_ticks(ax, sizes, fontsize, rotation=rotation)


def _overlap(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def place_labels(ax, xy, texts, colors, fontsize: float = 7.5, segments=()) -> list:
    """Label each point at the nearest spot (rings of offsets around it) where the label overlaps no other
    label, no point and no error bar (``segments``: ((x0, y0), (x1, y1)) in data coordinates) and stays
    inside the axes; where none is free, the spot it overlaps least. A leader line joins a label set away
    from its point. Set the axes' limits and layout first. Returns the annotations."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    scale = fig.dpi / 72.0
    pts = ax.transData.transform(np.asarray(xy, dtype=float))
    frame = ax.get_window_extent(renderer)
    r_dot = 6.0 * scale
    taken = [(x - r_dot, y - r_dot, x + r_dot, y + r_dot) for x, y in pts]
    for a, b in segments:  # an error bar as a thin box, its caps included
        (x0, y0), (x1, y1) = ax.transData.transform([a, b])
        taken.append((min(x0, x1) - 3 * scale, min(y0, y1) - 3 * scale,
                      max(x0, x1) + 3 * scale, max(y0, y1) + 3 * scale))
    rings = [(r, math.radians(a)) for r in (7, 14, 24, 36, 50, 66, 84)
             for a in (20, -20, 160, 200, 60, -60, 120, 240, 90, 270, 0, 180)]
    out = []
    for (x, y), text, color in sorted(zip(pts, texts, colors), key=lambda t: -t[0][1]):
        probe = ax.text(0, 0, text, fontsize=fontsize)
        bb = probe.get_window_extent(renderer)
        w, h = bb.width, bb.height
        probe.remove()
        best, best_cost = None, math.inf
        for r, a in rings:
            dx, dy = r * scale * math.cos(a), r * scale * math.sin(a)
            ha = "left" if math.cos(a) > 0.3 else "right" if math.cos(a) < -0.3 else "center"
            va = "bottom" if math.sin(a) > 0.3 else "top" if math.sin(a) < -0.3 else "center"
            x0 = x + dx - (0 if ha == "left" else w if ha == "right" else w / 2)
            y0 = y + dy - (0 if va == "bottom" else h if va == "top" else h / 2)
            box = (x0 - 1, y0 - 1, x0 + w + 1, y0 + h + 1)
            outside = box[0] < frame.x0 or box[2] > frame.x1 or box[1] < frame.y0 or box[3] > frame.y1
            cost = sum(_overlap(box, t) for t in taken) + (1e6 if outside else 0.0)
            if cost == 0:
                best = (dx, dy, ha, va, box, r)
                break
            if cost < best_cost:
                best, best_cost = (dx, dy, ha, va, box, r), cost
        dx, dy, ha, va, box, r = best
        taken.append(box)
        arrow = dict(arrowstyle="-", color=color, lw=0.6, shrinkA=0, shrinkB=4) if r > 10 else None
        out.append(ax.annotate(text, ax.transData.inverted().transform((x, y)), xytext=(dx / scale, dy / scale),
                               textcoords="offset points", ha=ha, va=va, fontsize=fontsize, color=color,
                               arrowprops=arrow))
    return out


# ------------------------------------------------------------------ the figures of every study

def accuracy_curves(res: Results, out: Path, path: Path) -> Path | None:
    """Figure 2 analog: train (solid) and test (dashed) accuracy per epoch, mean +- std over seeds."""
    colors = regime_colors(res)
    fig, ax = plt.subplots(figsize=(7.2, 5.2))
    drawn = False
    for regime in colors:
        runs = res.runs_of(regime)
        hists = [[h for h in read_history(out / Path(r.history).parent) if "test_accuracy" in h] for r in runs]
        hists = [h for h in hists if h]
        if not hists:
            continue
        length = min(len(h) for h in hists)
        epochs = [h["epoch"] for h in hists[0][:length]]
        bs = runs[0].batch_size
        for key, style, word in (("train_accuracy", "-", "train"), ("test_accuracy", "--", "test")):
            rows = [[100 * row[key] for row in h[:length]] for h in hists]
            _band(ax, epochs, rows, colors[regime], style, f"{regime} (batch {bs}) {word}")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    n_seeds = len({r.seed for r in res.runs})
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{res.study['name']}: accuracy during training ({n_seeds} seed{'s' if n_seeds != 1 else ''})")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    # a regime's train and test one above the other; as many regimes a row as their labels fit in 7 inches
    ncol = max(1, min(len(labels) // 2, 4, int(7.0 / (0.06 * max(map(len, labels)) + 0.6))))
    rows = 2 * math.ceil(len(labels) / 2 / ncol)
    pad = ncol * rows - len(labels)  # blank entries at the end keep each regime's pair in one column
    handles, labels = handles + [Line2D([], [], alpha=0)] * pad, labels + [""] * pad
    fig.set_size_inches(7.2, 4.4 + 0.22 * rows)
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=ncol, bbox_to_anchor=(0.5, 0.06), frameon=False)
    fig.subplots_adjust(bottom=(0.75 + 0.22 * rows) / (4.4 + 0.22 * rows))
    _protocol_note(fig, "Full train and test sets evaluated after each epoch; solid = train, dashed = test. "
                        f"{spread_note(n_seeds, ('accuracy', False), kind='band')}.")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def parametric_plot(res: Results, path: Path) -> Path | None:
    """Figure 3 analog: cross-entropy (left) and accuracy (right) along alpha x_LB + (1-alpha) x_SB."""
    pairs = [p.parametric for p in res.pairs if p.parametric]
    if not pairs:
        return None
    alphas = np.asarray(pairs[0]["alphas"])
    comp = res.comparison
    fig, ax = plt.subplots(figsize=(7.2, 5.4))
    ax2 = ax.twinx()
    losses = np.asarray([p[s]["loss"] for p in pairs for s in ("train", "test")], dtype=float)
    log_scale = bool(np.nanmax(losses) > 10 * np.nanmin(losses) > 0)  # log only when the loss spans a decade
    for split, style in (("train", "-"), ("test", "--")):
        _band(ax, alphas, [p[split]["loss"] for p in pairs], "tab:blue", style, f"{split} cross-entropy", log=log_scale)
        _band(ax2, alphas, [[100 * a for a in p[split]["accuracy"]] for p in pairs], "tab:red", style,
              f"{split} accuracy")
    if log_scale:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter(""))
    ax.set_xlabel(f"alpha   (0 = {comp.small}, 1 = {comp.large})")
    ax.set_ylabel("cross-entropy" + (" (log scale)" if log_scale else ""), color="tab:blue")
    ax2.set_ylabel("accuracy (%)", color="tab:red")
    ax.tick_params(axis="y", colors="tab:blue")
    ax2.tick_params(axis="y", colors="tab:red")
    for a in (0.0, 1.0):
        ax.axvline(a, color="0.6", lw=0.8, ls=":")
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    fig.legend(lines, labels, fontsize=8, loc="lower center", ncol=4, bbox_to_anchor=(0.5, 0.075), frameon=False)
    proto = pairs[0]["protocol"]
    ax.set_title(f"{res.study['name']}: f({proto['formula']}), {len(pairs)} seed{'s' if len(pairs) != 1 else ''}",
                 fontsize=10)
    fig.subplots_adjust(bottom=0.25, left=0.11, right=0.89)
    n = len(pairs)
    band = spread_note(n, ("cross-entropy", log_scale), ("accuracy", False), kind="band")
    _protocol_note(fig, f"Protocol: {proto['data']}; BN: {proto['bn']}; {proto['parameters']}; "
                        f"{proto['points']} points. {band}.")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def sharpness_curves(res: Results, path: Path) -> Path | None:
    """The seed demonstration's figure, done right: loss along filter-normalized random directions.

    One line per regime (the geometric mean over every seed and direction), a band from the lowest to the
    highest curve, on the data the geometry protocol names.
    """
    colors = regime_colors(res)
    fig, ax = plt.subplots(figsize=(7.2, 5.0))
    drawn, proto = False, None
    for regime, color in colors.items():
        curves = [r.geometry["curves"] for r in res.runs if r.regime == regime and (r.geometry or {}).get("curves")]
        if not curves:
            continue
        alphas = np.asarray(curves[0]["alphas"])
        rows = np.asarray([row for c in curves for row in c["loss"]], dtype=float)
        center = spreads(rows.T, log=True)[0]
        ax.plot(alphas, center, color=color, lw=2,
                label=f"{regime} (batch {res.regime(regime).batch_size}), geometric mean of {len(rows)} curves")
        ax.fill_between(alphas, rows.min(0), rows.max(0), color=color, alpha=0.18, lw=0)
        drawn, proto = True, curves[0]["protocol"]
    if not drawn:
        plt.close(fig)
        return None
    plain_log(ax)
    ax.set_xlabel("alpha (step along a filter-normalized random direction d)")
    ax.set_ylabel("training cross-entropy L(θ* + α d) (log scale)")
    ax.set_title(f"{res.study['name']}: loss along random directions around each solution", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper center")
    fig.subplots_adjust(bottom=0.2)
    _protocol_note(fig, f"Directions: {proto['direction']}; {proto['directions']} per run, every seed pooled; "
                        f"line: geometric mean of the curves; band: min-max, the lowest to the highest curve. "
                        f"Data: {proto['data']}; BN: {proto['bn']}.")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def log_levels(lo: float, hi: float, max_levels: int = 16) -> np.ndarray:
    """Round contour levels from a level <= ``lo`` to one >= ``hi`` on a log scale: 1-2-5 in each decade;
    1-1.5-2-3-5-7 where 1-2-5 would give under 6 (less than a decade); 1-3, or one a decade (every other,
    every fifth) where the finer sequence would give more than ``max_levels``."""
    d0, d1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))

    def levels(mantissas, step=1):
        out = np.array([m * 10.0 ** d for d in range(d0, d1 + 1, step) for m in mantissas] + [10.0 ** (d1 + step)])
        first = np.searchsorted(out, lo * (1 + 1e-9), side="right") - 1
        return out[max(first, 0): np.searchsorted(out, hi * (1 - 1e-9), side="left") + 1]

    if len(levels((1, 2, 5))) < 6:
        return levels((1, 1.5, 2, 3, 5, 7))
    for mantissas, step in (((1, 2, 5), 1), ((1, 3), 1), ((1,), 1), ((1,), 2)):
        if len(out := levels(mantissas, step)) <= max_levels:
            return out
    return levels((1,), 5)


def smooth_surface(alphas, betas, loss, factor: int = 8):
    """The surface on a grid ``factor`` times finer: a bicubic interpolating spline of log(loss) (it passes
    through every measured point), so that a sharp minimum between few grid points is drawn round, not as
    the diamond of linear contouring. Grids under 4 points a side are returned as they are."""
    from scipy.interpolate import RectBivariateSpline

    a, b, z = np.asarray(alphas, float), np.asarray(betas, float), np.asarray(loss, dtype=float)
    if min(len(a), len(b)) < 4 or not np.all(np.isfinite(z) & (z > 0)):
        return a, b, z
    spline = RectBivariateSpline(a, b, np.log(z), kx=3, ky=3, s=0)
    fa, fb = np.linspace(a[0], a[-1], factor * (len(a) - 1) + 1), np.linspace(b[0], b[-1], factor * (len(b) - 1) + 1)
    return fa, fb, np.exp(spline(fa, fb))


def loss_surfaces(res: Results, path: Path) -> Path | None:
    """2-D contours of the training loss around the compared regimes' solutions (first seed), shared levels
    on a log scale at round values (1-2-5), drawn from a smooth interpolation of the measured grid."""
    comp = res.comparison
    names = [n for n in ((comp.small, comp.large) if comp else ()) if n]
    surfaces = []
    for name in names:
        s = next((r.geometry["surface"] for r in res.runs if r.regime == name and (r.geometry or {}).get("surface")),
                 None)
        if s is not None:
            surfaces.append((name, s))
    if not surfaces:
        return None
    values = np.concatenate([np.asarray(s["loss"], dtype=float).ravel() for _, s in surfaces])
    values = values[np.isfinite(values) & (values > 0)]
    if not len(values):
        return None
    levels = log_levels(values.min(), values.max() if values.max() > values.min() else values.min() * 1.01)
    norm = matplotlib.colors.LogNorm(levels[0], levels[-1])
    fig, axes = plt.subplots(1, len(surfaces), figsize=(5.0 * len(surfaces) + 1.4, 5.2), squeeze=False)
    for ax, (name, s) in zip(axes[0], surfaces):
        fa, fb, z = smooth_surface(s["alphas"], s["betas"], s["loss"])
        a, b = np.meshgrid(fa, fb, indexing="ij")
        z = np.clip(z, levels[0], levels[-1])
        cs = ax.contourf(a, b, z, levels=levels, norm=norm, cmap="viridis")
        ax.contour(a, b, z, levels=levels, colors="white", linewidths=0.4)
        ga, gb = np.meshgrid(s["alphas"], s["betas"], indexing="ij")
        ax.plot(ga.ravel(), gb.ravel(), ".", color="white", ms=1.2, alpha=0.5)
        ax.plot([0], [0], "r*", ms=10)
        ax.set_title(f"{name} (batch {res.regime(name).batch_size})")
        ax.set_xlabel("alpha (direction 1)")
        ax.set_ylabel("beta (direction 2)")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(5, steps=[1, 2, 2.5, 5, 10]))
            axis.set_major_formatter(FormatStrFormatter("%g"))
        ax.set_aspect("equal")
    fig.subplots_adjust(left=0.07, right=0.86, bottom=0.2, top=0.86, wspace=0.3)
    cax = fig.add_axes([0.89, 0.2, 0.018, 0.66])
    cbar = fig.colorbar(cs, cax=cax, ticks=levels)
    cbar.ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    cbar.ax.yaxis.set_minor_locator(NullLocator())
    cbar.set_label("training cross-entropy (log color scale)")
    proto = surfaces[0][1]["protocol"]
    n = len(surfaces[0][1]["alphas"])
    fig.suptitle(f"{res.study['name']}: training loss around each solution (seed {res.study['seeds'][0]})", fontsize=11)
    _protocol_note(fig, f"Two filter-normalized random directions per solution; measured on a {n} × {n} grid (dots), "
                        "contoured from a bicubic interpolation of log loss through those points; the same round "
                        f"levels in both panels. Data: {proto['data']}; BN: {proto['bn']}.")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
