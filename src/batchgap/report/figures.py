"""Figures of a study, drawn from results.json and the runs' histories (matplotlib, Agg)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator  # noqa: E402

from ..results import Results  # noqa: E402
from ..rundir import read_history  # noqa: E402

COLORS = {0: "tab:blue", 1: "tab:red"}
OTHER = ["tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan"]


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


def _band(ax, x, rows, color, style, label):
    arr = np.asarray(rows, dtype=float)
    mean = np.nanmean(arr, axis=0)
    ax.plot(x, mean, style, color=color, label=label, lw=1.8)
    if len(arr) > 1:
        std = np.nanstd(arr, axis=0, ddof=1)
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.18, lw=0)


def _protocol_note(fig, text: str) -> None:
    fig.text(0.01, 0.01, text, fontsize=7.5, color="0.3", ha="left", va="bottom", wrap=True)


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
    n_seeds = len(res.study["seeds"])
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{res.study['name']}: accuracy during training (mean ± std over {n_seeds} seeds)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(colors), bbox_to_anchor=(0.5, 0.07), frameon=False)
    fig.subplots_adjust(bottom=0.28)
    _protocol_note(fig, "Full train and test sets evaluated after each epoch; solid = train, dashed = test; "
                        "band = ±1 std over seeds.")
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
    for split, style in (("train", "-"), ("test", "--")):
        _band(ax, alphas, [p[split]["loss"] for p in pairs], "tab:blue", style, f"{split} cross-entropy")
        _band(ax2, alphas, [[100 * a for a in p[split]["accuracy"]] for p in pairs], "tab:red", style, f"{split} accuracy")
    losses = np.asarray([p[s]["loss"] for p in pairs for s in ("train", "test")], dtype=float)
    log_scale = np.nanmax(losses) > 10 * np.nanmin(losses) > 0  # log only when the loss spans a decade
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
    ax.set_title(f"{res.study['name']}: f({proto['formula']}), {len(pairs)} seeds", fontsize=10)
    fig.subplots_adjust(bottom=0.25, left=0.11, right=0.89)
    _protocol_note(fig, f"Protocol: {proto['data']}; BN: {proto['bn']}; {proto['parameters']}; "
                        f"{proto['points']} points; band = ±1 std over seeds.")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def sharpness_curves(res: Results, path: Path) -> Path | None:
    """The seed demonstration's figure, done right: loss along filter-normalized random directions.

    One line per regime (the mean over every seed and direction), a band from the lowest to the
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
        ax.plot(alphas, rows.mean(0), color=color, lw=2, label=f"{regime} (batch {res.regime(regime).batch_size}), mean of {len(rows)} curves")
        ax.fill_between(alphas, rows.min(0), rows.max(0), color=color, alpha=0.18, lw=0)
        drawn, proto = True, curves[0]["protocol"]
    if not drawn:
        plt.close(fig)
        return None
    ax.set_yscale("log")
    ax.set_xlabel("alpha (step along a filter-normalized random direction d)")
    ax.set_ylabel("training cross-entropy L(θ* + α d) (log scale)")
    ax.set_title(f"{res.study['name']}: loss along random directions around each solution", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper center")
    fig.subplots_adjust(bottom=0.2)
    _protocol_note(fig, f"Directions: {proto['direction']}; {proto['directions']} per run, every seed pooled; "
                        f"band = lowest to highest curve. Data: {proto['data']}; BN: {proto['bn']}.")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def loss_surfaces(res: Results, path: Path) -> Path | None:
    """2-D contours of the training loss around the compared regimes' solutions (first seed), shared levels."""
    comp = res.comparison
    names = [n for n in ((comp.small, comp.large) if comp else ()) if n]
    surfaces = []
    for name in names:
        s = next((r.geometry["surface"] for r in res.runs if r.regime == name and (r.geometry or {}).get("surface")), None)
        if s is not None:
            surfaces.append((name, s))
    if not surfaces:
        return None
    values = np.concatenate([np.asarray(s["loss"], dtype=float).ravel() for _, s in surfaces])
    values = values[np.isfinite(values) & (values > 0)]
    levels = np.geomspace(values.min(), values.max(), 16)
    fig, axes = plt.subplots(1, len(surfaces), figsize=(5.0 * len(surfaces) + 1.4, 5.2), squeeze=False)
    for ax, (name, s) in zip(axes[0], surfaces):
        a, b = np.meshgrid(s["alphas"], s["betas"], indexing="ij")
        cs = ax.contourf(a, b, np.asarray(s["loss"], dtype=float), levels=levels, norm=matplotlib.colors.LogNorm(), cmap="viridis")
        ax.contour(a, b, np.asarray(s["loss"], dtype=float), levels=levels, colors="white", linewidths=0.4)
        ax.plot([0], [0], "r*", ms=10)
        ax.set_title(f"{name} (batch {res.regime(name).batch_size})")
        ax.set_xlabel("alpha (direction 1)")
        ax.set_ylabel("beta (direction 2)")
        ax.set_aspect("equal")
    fig.subplots_adjust(left=0.07, right=0.86, bottom=0.2, top=0.86, wspace=0.3)
    cax = fig.add_axes([0.89, 0.2, 0.018, 0.66])
    cbar = fig.colorbar(cs, cax=cax, ticks=levels[::3])
    cbar.ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    cbar.ax.yaxis.set_minor_formatter(FormatStrFormatter(""))
    cbar.set_label("training cross-entropy (log color scale)")
    proto = surfaces[0][1]["protocol"]
    fig.suptitle(f"{res.study['name']}: training loss around each solution (seed {res.study['seeds'][0]})", fontsize=11)
    _protocol_note(fig, f"Two filter-normalized random directions per solution; same color levels in both panels. "
                        f"Data: {proto['data']}; BN: {proto['bn']}.")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
