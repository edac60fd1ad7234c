"""The reparametrization report: the invariance table, the orderings and one figure, from ``results.json`` alone."""
from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .common import load_results, save_png, write_markdown  # noqa: E402

FIGURE = "reparametrization.png"
WORDS = {"layers": "Dinh rescaling (layer × α, next × 1/α)", "batchnorm": "pre-BatchNorm layer × α"}
CLAIM = ("Dinh et al. 2017: for a ReLU network the alpha-scale transformation changes no prediction, yet it can make "
         "eps-sharpness and the Hessian's top eigenvalue as large (or as small) as one likes, so neither can "
         "compare two solutions on its own; measures built to be scale-aware (adaptive sharpness, Kwon et al. 2021 "
         "and Andriushchenko et al. 2023; Li et al.'s filter-normalized curves) are unchanged by it.")


def median_ratio(rs: list) -> float | None:
    """The median of a factor's ratios over the runs; None when any run's is missing."""
    known = [r for r in rs if r is not None]
    return statistics.median(known) if known and len(known) == len(rs) else None


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


def _yes(v, yes="yes", no="**no**") -> str:
    return "n/a" if v is None else (yes if v else no)


def table(summary: dict) -> list[str]:
    """One row per measure: per transform the median ratio at each factor and the verdict, then the ordering."""
    kinds, factors = summary["transforms"], summary["factors"]
    head = "| measure | " + " | ".join(f"{k}: ratio at α = {', '.join(f'{a:g}' for a in factors)} | {k}: invariant"
                                      for k in kinds)
    head += " | LB vs SB as trained | " + " | ".join(f"ordering holds, {k}: same α / any α" for k in kinds) + " |"
    lines = [head, "|" + "---|" * (2 + 3 * len(kinds))]
    for row in summary["rows"]:
        cells = [row["label"].replace("|", "\\|")]
        for k in kinds:
            cells.append(", ".join(_fmt(median_ratio(row["ratios"][k][f"{a:g}"])) for a in factors))
            dev = row["max_deviation"][k]
            cells.append("n/a" if dev is None else f"{_yes(row['invariant'][k])} (max |r − 1| {_fmt(dev)})")
        signs = [s for s in row["ordering"].values()]
        cells.append(", ".join({1: "LB >", -1: "LB <", 0: "equal", None: "n/a"}[s] for s in signs) or "n/a")
        for k in kinds:
            cells.append(f"{_yes(row['same_factor'][k])} / {_yes(row['across_factors'][k])}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def findings(summary: dict) -> list[str]:
    """The verdicts in words, from the table's numbers."""
    out = []
    for k in summary["transforms"]:
        inv = [r["label"] for r in summary["rows"] if r["invariant"][k]]
        var = [r["label"] for r in summary["rows"] if r["invariant"][k] is False]
        flip = [r["label"] for r in summary["rows"] if r["same_factor"][k] is False]
        cross = [r["label"] for r in summary["rows"] if r["across_factors"][k] is False]
        out.append(f"- **{WORDS[k]}**: unchanged (|ratio − 1| ≤ {summary['tolerance']:g} at every factor and run): "
                   f"{', '.join(inv) or 'none'}. Changed: {', '.join(var) or 'none'}. The LB/SB ordering "
                   f"breaks at some factor applied to both: {', '.join(flip) or 'none'}; applied to each solution "
                   f"with its own factor: {', '.join(cross) or 'none'}.")
    return out


def draw(summary: dict, path: Path) -> Path:
    """Per transform, each measure's median ratio against alpha (log-log); invariant measures lie on 1 (dotted)."""
    kinds, factors = summary["transforms"], summary["factors"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(7.5 * len(kinds), 6.2), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, k in zip(axes[0], kinds):
        for i, row in enumerate(summary["rows"]):
            ys = [median_ratio(row["ratios"][k][f"{a:g}"]) for a in factors]
            pts = [(a, y) for a, y in zip([*factors, 1.0], [*ys, 1.0]) if y is not None and y > 0]
            if not pts:
                continue
            pts.sort()
            style = "-" if row["invariant"][k] is False else ":"
            ax.plot([a for a, _ in pts], [y for _, y in pts], style, marker="osD^v"[i // 10 % 5], ms=4,
                    color=cmap(i % 10 * 2 + i // 10 % 2),
                    label=row["label"] if len(row["label"]) < 48 else row["label"][:45] + "…")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xlabel("α")
        ax.set_ylabel("ratio to the value as trained (median over runs)")
        ax.set_title(WORDS[k], fontsize=10)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.27, 1, 1))
    return save_png(fig, path, 100)


def write_report(out: Path) -> Path:
    """``out/report.md`` and ``out/figures/reparametrization.png`` from ``out/results.json``."""
    doc = load_results(out, "reparametrization")
    s = doc["summary"]
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    draw(s, fig_dir / FIGURE)
    runs = ", ".join(f"{r['regime']} seed {r['seed']} (batch {r['batch_size']})" for r in doc["runs"])
    md = [f"# {doc['name']}: which measures survive a reparametrization that keeps the function?", "",
          doc["description"], "", f"Runs: {runs}. Factors α: {', '.join(f'{a:g}' for a in s['factors'])}, "
          f"at layer {doc['settings']['layer']}. Largest output change of any transform: "
          f"{s['output_change_max']:.2g} (relative; refused above {doc['settings']['output_rtol']:g}).", "",
          f"Paper: {CLAIM}", "", "## Invariance and ordering", "",
          f"A measure counts as invariant when |ratio − 1| ≤ {s['tolerance']:g} for every factor and run (the curves: "
          "every point within that fraction of the curve's largest loss). \"LB vs SB\" is the sign of "
          "value(LB) − value(SB) as trained, per seed; \"same α\": both solutions transformed by one factor keep "
          "that sign at every factor; \"any α\": each solution transformed by its own factor (every pair of the "
          "factors and 1) keeps it.", "", *table(s), "", *findings(s), "",
          f"![ratio against alpha](figures/{FIGURE})", "", "## Protocol", "",
          *(f"- {k}: {v}" for k, v in doc["protocol"].items()), ""]
    return write_markdown(out, md)
