"""The report's generalization-measure sections: Jiang et al.'s measures per regime with LB/SB ratios and
their intervals, and the Hessian's spectral density (SLQ), the compared regimes against each other."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..correlate import FIXED_MEASURES
from ..results import Results
from ..stats import mean_std, ratio_interval
from . import text

# shown in the curvature table already (report.geometry), or a log: no ratio
_ELSEWHERE = {"adaptive_sharpness", "hessian_top_eigenvalue", "hessian_trace", "distance"}
_LOGS = {"log_prod_of_fro", "log_prod_of_spec", "spectral_margin"}


def _regimes(res: Results) -> list[str]:
    comp = res.comparison
    return [comp.small, comp.large] if comp and comp.small and comp.large else [r.name for r in res.summary][:2]


def draws(result: dict) -> str:
    """How a Monte Carlo measure drew: "8", or "8 (4 antithetic pairs u, −u)"."""
    n = result["n_samples"]
    return f"{n} ({n // 2} antithetic pairs u, −u)" if result.get("antithetic") else str(n)


def measures_table(res: Results) -> list[str]:
    """Each generalization measure the runs carry: mean ± std per compared regime, and LB/SB with a paired
    bootstrap interval over seeds (a difference for the measures that are logarithms)."""
    names = _regimes(res)
    if len(names) < 2:
        return []
    runs = {n: [r for r in res.runs_of(n) if r.geometry] for n in names}
    rows = []
    for m in FIXED_MEASURES:
        if m.key in _ELSEWHERE:
            continue
        per = {n: {r.seed: v for r in runs[n] if (v := m.pick(r)) is not None} for n in names}
        if not all(per.values()):
            continue
        cells = [text.pm(mean_std(per[n].values()), 1.0, 3) for n in names]
        if m.key in _LOGS:
            diff = np.mean(list(per[names[1]].values())) - np.mean(list(per[names[0]].values()))
            last = f"difference {diff:+.3g}"
        else:
            lo_mean = np.mean(list(per[names[0]].values()))
            value = np.mean(list(per[names[1]].values())) / lo_mean if lo_mean else None
            iv = ratio_interval(per[names[1]], per[names[0]])
            last = ("n/a" if value is None
                    else f"{value:.3g}×" + (f" [{iv.lo:.3g}, {iv.hi:.3g}]" if iv.lo is not None else ""))
        rows.append(f"| {m.label.replace('|', chr(92) + '|')} | " + " | ".join(cells) + f" | {last} |")
    if not rows:
        return []
    head = [f"| measure | {names[0]} | {names[1]} | {names[1]}/{names[0]} (95% interval over seeds) |",
            "|---|---|---|---|"]
    geo = next(r.geometry for n in names for r in runs[n])
    notes = []
    for key in ("pac_bayes", "pac_bayes_error"):
        if p := geo.get(key):
            bound = ("the training-accuracy drop E[acc(w) − acc(w+u)]" if p.get("target", "loss") == "error"
                     else "the loss rise E[L(w+u)] − L(w)")
            notes.append(f"PAC-Bayes flatness, {p.get('target', 'loss')} target: 1/σ² for the largest σ with "
                         f"{bound} ≤ δ = {p['delta']:g} ({draws(p)} common draws, σ to {100 * p['rtol']:g}%)")
    if a := geo.get("average_sharpness"):
        notes.append(f"average sharpness: E[L(w+u)] − L(w), u ~ N(0, {a['sigma']:g}² I)"
                     + (f" and u_i ~ N(0, {geo['average_sharpness_mag']['sigma']:g}² w_i²)"
                        if geo.get("average_sharpness_mag") else "")
                     + f", {draws(a)} draws")
    if w := geo.get("worst_case"):
        notes.append(f"worst-case flatness: 1/α² for the largest box |u_i| ≤ α (or α|w_i|) whose maximum rise is ≤ "
                     f"δ = {w['delta']:g} ({w['max_iter']} solver iterations per box; α an upper estimate)")
    if nm := geo.get("norms"):
        notes.append(f"norms over the weight matrices of {len(nm['layers'])} layers ({nm['conv_norm']}); margin: the "
                     f"{nm['percentile']:g}th percentile of f_y − max_(j≠y) f_j over the "
                     f"{geo.get('data', 'training set')}"
                     + ("" if nm.get("path_norm") is not None
                        else f"; path norm not defined here ({nm.get('path_norm_reason')})"))
    return head + rows + ["", "; ".join(notes) + ". Every measure is oriented so that larger means more complex "
                          "(a margin enters as 1/margin²); which of them ranks the gap is the correlation's question, "
                          "not this table's."]


def _densities(res: Results, names: list[str]) -> dict:
    return {n: [r.geometry["density"] for r in res.runs_of(n) if r.geometry and r.geometry.get("density")]
            for n in names}


def density_figure(res: Results, dens: dict, path: Path) -> Path | None:
    """One line per run of each regime in ``dens`` (regime -> the runs' density results)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .figures import regime_colors

    if not any(dens.values()):
        return None
    colors = regime_colors(res)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for n, runs in dens.items():
        for i, d in enumerate(runs):
            grid, phi = np.asarray(d["grid"]), np.asarray(d["density"])
            ax.plot(grid, np.maximum(phi, 1e-12), color=colors.get(n, "k"), lw=1, alpha=0.7,
                    label=n if i == 0 else None)
    ax.set_yscale("log")
    ax.set_ylim(bottom=max(1e-8, ax.get_ylim()[0]))
    ax.axvline(0, color="k", lw=0.6)
    ax.set_xlabel("eigenvalue of the training-loss Hessian")
    ax.set_ylabel("spectral density (log)")
    d0 = next(d for v in dens.values() for d in v)
    ax.set_title(f"SLQ, {d0['n_vectors']} start vector(s) x {d0['steps']} Lanczos steps per run, one line per seed",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def density_section(res: Results, fig_dir: Path) -> list[str]:
    names = _regimes(res)
    per = _densities(res, names)
    if not all(per.values()):
        return []
    lines = ["| regime | λ_min | λ_max | \\|λ_min\\| / λ_max | mass below −s |", "|---|---|---|---|---|"]
    for n in names:
        d = per[n]
        lines.append(f"| {n} | {text.pm(mean_std([x['lambda_min'] for x in d]), 1.0, 3)} | "
                     f"{text.pm(mean_std([x['lambda_max'] for x in d]), 1.0, 3)} | "
                     f"{text.pm(mean_std([x['min_max_ratio'] for x in d]), 1.0, 3)} | "
                     f"{text.pm(mean_std([x['negative_weight'] for x in d]), 1.0, 3)} |")
    neg = {n: sum(x["lambda_min"] < 0 for x in per[n]) for n in names}
    d0 = per[names[0]][0]
    lines += ["", f"Ghorbani et al. 2019's method (PyHessian's ESD), {d0['method']}. λ_min and "
              "λ_max are the extreme Ritz values, estimates from inside the spectrum that sharpen with more steps. "
              + "; ".join(f"{n}: λ_min < 0 in {neg[n]} of {len(per[n])} runs" for n in names)
              + " — a negative λ_min is negative curvature (not a minimum); its size against λ_max says how much. "
              "'Mass below −s' is the spectral weight more than one kernel width s below 0."]
    if f := density_figure(res, per, fig_dir / "hessian_density.png"):
        lines += ["", f"![Hessian spectral density]({'figures'}/{f.name})"]
    return lines
