"""The "which measure predicts the gap" section: the table of tau and Psi with intervals, a ranking figure,
a grid of scatter plots measure vs gap, and a paragraph that claims no more than the intervals allow.

Used by ``batchgap correlate`` (``correlation.md`` in its output folder) and by a study's report when the
study asks for it (``figures = ["correlation"]``, as the built-in ``measures`` study does).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..correlate import MIN_SEEDS, Correlation, Row
from ..results import FITTED, Interval
from ..util import atomic_write_text


def _num(v: float | None, fmt: str = "+.2f") -> str:
    return "n/a" if v is None else f"{v:{fmt}}"


def _iv(iv: Interval | None) -> str:
    return "n/a" if iv is None or iv.lo is None else f"[{iv.lo:+.2f}, {iv.hi:+.2f}]"


def verdict(row: Row, n_seeds: int) -> str:
    """What Psi's interval allows: "ranks as predicted" (interval above 0), "ranks it the other way" (below 0),
    else undetermined; never a claim from the point value alone."""
    iv = row.psi_interval
    if row.psi is None:
        return "no set of runs varies one axis alone" if row.n >= 3 else f"too few runs ({row.n})"
    if iv is None or iv.lo is None:
        return f"undetermined with {n_seeds} seed{'s' * (n_seeds != 1)}"
    if iv.lo > 0:
        return "ranks as predicted"
    if iv.hi < 0:
        return "ranks it the other way"
    return f"undetermined with {n_seeds} seed{'s' * (n_seeds != 1)}"


def table(c: Correlation) -> list[str]:
    axes = c.axes
    head = ("| measure | Ψ | 95% interval | " + "".join(f"ψ {a} | " for a in axes) + "τ (all runs) | 95% interval "
            "| τ lr | 95% interval | τ batch | 95% interval | runs | reading |")
    lines = [head, "|" + "---|" * (11 + len(axes))]
    for row in c.rows:
        per_axis = " | ".join(_num(row.psi_axes.get(a)) for a in axes)
        lines.append(f"| {row.label.replace('|', chr(92) + '|')} | {_num(row.psi)} | {_iv(row.psi_interval)} | "
                     f"{per_axis}{' | ' if axes else ''}"
                     f"{_num(row.tau)} | {_iv(row.tau_interval)} | {_num(row.tau_lr)} | {_iv(row.tau_lr_interval)} | "
                     f"{_num(row.tau_batch)} | {_iv(row.tau_batch_interval)} | {row.n} | "
                     f"{verdict(row, len(c.seeds))} |")
    return lines


def paragraph(c: Correlation) -> str:
    n = len(c.seeds)
    if not c.rows:
        return "No measure to correlate: the runs carry no geometry."
    good = [r.label for r in c.rows if verdict(r, n) == "ranks as predicted"]
    bad = [r.label for r in c.rows if verdict(r, n) == "ranks it the other way"]
    open_ = [r for r in c.rows if r.psi is not None and r.label not in good + bad]
    straddle = [r.label for r in open_ if r.psi_interval is not None and r.psi_interval.lo is not None]
    none = [r.label for r in open_ if r.label not in straddle]
    parts = [f"Over {c.runs_used} fitted runs ({n} seed{'s' * (n != 1)}, axes varied: {', '.join(c.axes) or 'none'}), "
             f"against the {c.target_label}:"]
    above, below = "the 95% interval of Ψ lies above 0", "it lies below 0"
    if good:
        parts.append(f"{above} for {', '.join(good)}: "
                     f"{'these rank' if len(good) > 1 else 'it ranks'} the gap as "
                     f"{'their' if len(good) > 1 else 'its'} "
                     "theory predicts when one training choice changes at a time.")
    if bad:
        parts.append(f"{below[0].upper() + below[1:]} for {', '.join(bad)}: larger values went with smaller gaps, the "
                     "opposite of what the measure's theory predicts.")
    seeds = f"{n} seed{'s' * (n != 1)}"
    for labels, why in ((straddle, "the interval includes 0"),
                        (none, f"there is no interval with {seeds} (the seed bootstrap needs at least {MIN_SEEDS})"
                         if n < MIN_SEEDS else "there is no interval")):
        if labels and len(labels) == len(c.rows):  # every measure: say it once, not as a list of all of them
            parts.append(f"For every measure {why}: each is undetermined with {seeds}, and the point values above "
                         "do not establish an order.")
        elif labels:
            parts.append(f"For {', '.join(labels)} {why}: undetermined with {seeds}, which says nothing either way "
                         "about the measure.")
    parts += choice_sentences(c)
    top = [r for r in c.rows if r.psi is not None and r.psi_interval is not None and r.psi_interval.lo is not None]
    if len(top) >= 2:
        best = max(top, key=lambda r: r.psi)
        others = [r for r in top if r is not best]
        if all(best.psi_interval.lo > r.psi_interval.hi for r in others):
            parts.append(f"{best.label} ranks first: its interval lies above every other measure's.")
        else:
            parts.append(f"{best.label} has the highest Ψ, but its interval overlaps another measure's: the order of "
                         "the leading measures is not established.")
    return " ".join(parts)


def choice_sentences(c: Correlation) -> list[str]:
    """Which measures follow a training choice: the interval of their τ against the learning rate or the batch
    size excludes 0 (Andriushchenko et al. 2023); nothing is claimed from a point value alone."""
    out = []
    for what, tau, iv in (("learning rate", "tau_lr", "tau_lr_interval"), ("batch size", "tau_batch",
                                                                            "tau_batch_interval")):
        sure = [r for r in c.rows if getattr(r, tau) is not None and getattr(r, iv) is not None
                and getattr(r, iv).lo is not None and (getattr(r, iv).lo > 0 or getattr(r, iv).hi < 0)]
        if sure:
            out.append(f"The 95% interval of τ against the {what} excludes 0 for "
                       f"{', '.join(f'{r.label} ({getattr(r, tau):+.2f})' for r in sure)}: "
                       f"{'these follow' if len(sure) > 1 else 'it follows'} the {what} of the runs, so "
                       f"{'their' if len(sure) > 1 else 'its'} τ against the gap may reflect that training "
                       "choice rather than generalization.")
    return out


def left_out(c: Correlation) -> str:
    if not c.left_out:
        return f"All {c.runs_total} runs fitted the training set and are used."
    what = ", ".join(f"{k}: {v}" for k, v in c.left_out.items())
    return (f"{c.runs_used} of {c.runs_total} runs used; left out ({what}). As Jiang et al., only runs that fit the "
            f"training set (≥ {100 * FITTED:.0f}% train accuracy) are compared: among unfitted runs a gap is partly "
            "an optimization gap.")


def ranking_figure(c: Correlation, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in c.rows if r.psi is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.8))
    y = np.arange(len(rows))[::-1]
    for yi, r in zip(y, rows):
        iv = r.psi_interval
        if iv is not None and iv.lo is not None:
            ax.plot([iv.lo, iv.hi], [yi, yi], color="tab:blue", lw=2)
        ax.plot(r.psi, yi, "o", color="tab:blue")
        if r.tau is not None:
            ax.plot(r.tau, yi, "x", color="tab:gray")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y, [r.label for r in rows], fontsize=8)
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel(f"rank correlation with the\n{c.target_label}", fontsize=9)
    n = len(c.seeds)
    bars = (f"95% expanded percentile bootstrap over {n} seeds" if n >= MIN_SEEDS
            else f"no interval with {n} seed{'s' * (n != 1)}")
    ax.set_title(f"Ψ (dots, {bars})\nand τ over all runs (crosses)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scatter_figure(c: Correlation, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in c.rows if len(c.points.get(r.measure, [])) >= 2]
    if not rows:
        return None
    pts_all = [p for r in rows for p in c.points[r.measure]]
    batches = sorted({p[2] for p in pts_all})
    lrs = sorted({p[3] for p in pts_all})
    cmap = matplotlib.colormaps["viridis"]
    color = {b: cmap(i / max(len(batches) - 1, 1)) for i, b in enumerate(batches)}
    markers = "osD^v<>pP*X"
    marker = {lr: markers[i % len(markers)] for i, lr in enumerate(lrs)}
    cols = min(4, len(rows))
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.7 * nrows), squeeze=False)
    for ax, r in zip(axes.ravel(), rows):
        pts = c.points[r.measure]
        v = np.array([p[4] for p in pts])
        for p in pts:
            ax.scatter(p[4], p[5], color=color[p[2]], marker=marker[p[3]], s=22)
        if (v > 0).all() and v.max() / v.min() > 100:
            ax.set_xscale("log")
        ax.set_title(f"{r.label}\nΨ {_num(r.psi)} {_iv(r.psi_interval)}", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(rows):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(c.target_label, fontsize=7)
    handles = [Line2D([], [], color=color[b], marker="o", ls="", label=f"batch {b}") for b in batches]
    handles += [Line2D([], [], color="k", marker=marker[lr], ls="", label=f"lr {lr:g}") for lr in lrs]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def intervals(c: Correlation) -> str:
    """What the table's intervals are: the method texts of the first row with a τ and a Ψ interval."""
    tau = next((r.tau_interval.method for r in c.rows if r.tau_interval is not None), None)
    psi = next((r.psi_interval.method for r in c.rows if r.psi_interval is not None), None)
    if tau is None and psi is None:
        return "Intervals: none."
    if tau == psi or psi is None or tau is None:
        return f"Intervals: {tau or psi}."
    cut = tau.rfind(": ", 0, len(os.path.commonprefix([tau, psi])))  # the shared head: how the seeds were drawn
    if cut > 0:
        return f"Intervals: {tau[:cut]}; for τ, {tau[cut + 2:]}; for Ψ, {psi[cut + 2:]}."
    return f"Intervals of τ: {tau}. Intervals of Ψ: {psi}."


def section(c: Correlation, fig_dir: Path, rel: str = "figures") -> list[str]:
    """The markdown lines of the section, its two figures written into ``fig_dir``."""
    md = [f"Rank correlation of each measure with the {c.target_label} over the runs of "
          f"{', '.join(f'`{s}`' for s in c.sources)}. {c.method}. {intervals(c)}",
          "", left_out(c), "", *table(c), "", paragraph(c), ""]
    if f := ranking_figure(c, fig_dir / "correlation_ranking.png"):
        md += [f"![measures ranked by Ψ]({rel}/{f.name})", ""]
    if f := scatter_figure(c, fig_dir / "correlation_scatter.png"):
        md += [f"![each measure against the gap; color: batch size, marker: learning rate]({rel}/{f.name})", ""]
    return md


def unfinished_runs(unfinished: dict) -> list[str]:
    """Markdown naming the unfinished runs of each output read.

    Args:
        unfinished: output directory -> ids of its runs not finished.

    Returns:
        markdown lines ([] when every run finished). Cost: none."""
    if not unfinished:
        return []
    md = ["**Unfinished runs, not in this correlation** (each output's `results.json` lists them):", ""]
    md += [f"- `{name}`: {len(ids)} run(s): {', '.join(f'`{i}`' for i in ids)}" for name, ids in unfinished.items()]
    return [*md, ""]


def write(correlations: list[Correlation], out: Path, command: str | None = None,
          unfinished: dict | None = None) -> Path:
    """``out/correlation.md``, ``out/correlation.json`` and ``out/figures/correlation_*.png``.

    Args:
        correlations: one per target, in the order of the sections.
        out: the directory written.
        command: the command line, for the record.
        unfinished: output directory -> the ids of its runs not finished (left out of every correlation);
            named at the top of the markdown and under ``"unfinished"`` in each JSON entry.

    Returns:
        the path of ``correlation.md``. Cost: two figures drawn; no measurement."""
    unfinished = {k: list(v) for k, v in (unfinished or {}).items()}
    out.mkdir(parents=True, exist_ok=True)
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    md = ["# Which measure ranks the generalization gap", ""]
    if command:
        md += [f"Command: `{command}`", ""]
    md += unfinished_runs(unfinished)
    for i, c in enumerate(correlations):
        md += [f"## Against the {c.target_label}", ""]
        if i == 0:
            md += section(c, fig_dir)
        else:
            md += [left_out(c), "", *table(c), "", paragraph(c), ""]
    doc = [{**asdict(c), "unfinished": unfinished} for c in correlations]
    atomic_write_text(out / "correlation.json", json.dumps(doc, indent=1))
    path = out / "correlation.md"
    atomic_write_text(path, "\n".join(md))
    return path
