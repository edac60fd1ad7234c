"""The critical-batch report: two figures and report.md, drawn from ``results.json`` alone."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .common import load_results, save_png, write_markdown  # noqa: E402
from .critical_fit import pareto_steps  # noqa: E402

STEPS_FIGURE = "critical_batch_steps.png"
SCALES_FIGURE = "critical_batch_scales.png"
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")

CLAIMS = (
    "McCandlish et al. 2018: steps and examples to a target trade off as (S/S_min - 1)(E/E_min - 1) = 1, and the "
    "critical batch B_crit = E_min/S_min is predicted by the noise scale B_noise = tr(H Sigma)/(G^T H G), "
    "approximated by B_simple = tr(Sigma)/|G|^2 (their figure 4: B_crit and B_simple within about an order of "
    "magnitude of each other, both growing as the loss falls).",
    "Shallue et al. 2019: with the learning rate retuned per batch size, steps to target fall in proportion to 1/B "
    "(perfect scaling), then more slowly (diminishing returns), then not at all (maximal data parallelism).",
    "Merrill et al. 2025: the local critical batch size measured by branching is near 0 at initialization, rises "
    "quickly early in training and then plateaus; the noise scale need not track it.",
)


def _png(fig, path: Path) -> Path:
    fig.tight_layout()
    return save_png(fig, path, 110)


def draw_steps(doc: dict, path: Path) -> Path:
    """Steps to each target against batch size (log-log), the best learning rate's mean over seeds, with the
    fitted S(B) = S_min (1 + B_crit / B) and B_crit marked; beside it the examples E = B S.

    Args:
        doc: the results.
        path: the PNG to write (atomically).

    Returns:
        ``path``.
    """
    sizes = np.array(doc["batch_sizes"], dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    grid = np.geomspace(sizes[0], sizes[-1], 200)
    for color, t, f in zip(COLORS, doc["settings"]["targets"], doc["fits"]):
        if f["fit"] is None:
            continue
        steps = np.array([np.nan if v is None else v for v in f["fit"]["steps"]])
        fit = f["fit"]
        label = f"loss {t:g}: B_crit {fit['b_crit']:.0f}"
        axes[0].loglog(sizes, steps, "o", color=color, label=label)
        axes[0].loglog(grid, pareto_steps(grid, fit["s_min"], fit["b_crit"]), "-", color=color, lw=1)
        axes[0].axvline(fit["b_crit"], color=color, ls=":", lw=1)
        axes[1].loglog(steps, sizes * steps, "o", color=color)
        curve = pareto_steps(grid, fit["s_min"], fit["b_crit"])
        axes[1].loglog(curve, grid * curve, "-", color=color, lw=1)
        axes[1].plot([fit["s_min"]], [fit["e_min"]], "x", color=color)
    axes[0].set(xlabel="batch size B", ylabel="steps S to target (best lr, mean over seeds)",
                title="steps to target; dotted: B_crit")
    axes[0].legend(fontsize=8)
    axes[1].set(xlabel="steps S", ylabel="examples E = B S", title="the trade-off; x: (S_min, E_min)")
    return _png(fig, path)


def _label(t) -> str:
    return "init" if t is None else f"{t:g}"


def draw_scales(doc: dict, path: Path) -> Path:
    """Left: B_crit (with its bootstrap interval), B_noise (seed mean, envelope of the per-seed intervals) and
    B_simple (each seed) against the training loss at which they are measured. Right: the local critical batch by
    branching against B_simple at the same checkpoints of the first seed's reference run.

    Args:
        doc: the results.
        path: the PNG to write (atomically).

    Returns:
        ``path``.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for t, f in zip(doc["settings"]["targets"], doc["fits"]):
        if f["fit"] is None:
            continue
        ci = (f.get("interval") or {}).get("b_crit")
        yerr = None if ci is None else [[f["fit"]["b_crit"] - ci[0]], [ci[1] - f["fit"]["b_crit"]]]
        ax.errorbar([t], [f["fit"]["b_crit"]], yerr=yerr, fmt="s", color="black", capsize=3,
                    label="B_crit (fit, bootstrap)" if t == doc["settings"]["targets"][0] else None)
    first = True
    for sc in doc["scales"]:
        loss = float(np.mean(sc["loss"]))
        if sc["b_noise_mean"] is not None:
            env = sc["b_noise_envelope"]
            yerr = None if env is None else [[sc["b_noise_mean"] - env[0]], [env[1] - sc["b_noise_mean"]]]
            ax.errorbar([loss], [sc["b_noise_mean"]], yerr=yerr, fmt="o", color="tab:red", capsize=3,
                        label="B_noise (seed mean, interval envelope)" if first else None)
        vals = [v for v in sc["b_simple"] if v is not None]
        ax.plot([loss] * len(vals), vals, ".", color="tab:blue", label="B_simple (each seed)" if first else None)
        first = False
    ax.set(yscale="log", xlabel="training loss (where measured)", ylabel="batch size",
           title="critical batch and noise scales along the loss")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    ax = axes[1]
    br = [b for b in doc["branching"]]
    xs = np.arange(len(br))
    local = [np.nan if b["b_local"] is None else b["b_local"] for b in br]
    ax.plot(xs, local, "o-", color="black", label=f"local B_crit (branching, tol {doc['settings']['branch_tol']:g})")
    ax.plot(xs, [np.nan if b["b_simple"] is None else b["b_simple"] for b in br], "s--", color="tab:blue",
            label="B_simple (same checkpoint)")
    ax.set_xticks(xs, [f"{_label(b['checkpoint'])}\n({b['start_loss']:.2f})" for b in br])
    ax.set(yscale="log", xlabel="checkpoint: target reached (its loss)", ylabel="batch size",
           title="local critical batch by branching (first seed)")
    ax.axhline(doc["batch_sizes"][-1], color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=8)
    return _png(fig, path)


def _num(v, fmt=".0f") -> str:
    return "-" if v is None else format(v, fmt)


def _ci(ci, fmt=".0f") -> str:
    return "" if ci is None else f" [{format(ci[0], fmt)}, {format(ci[1], fmt)}]"


def lines_of(doc: dict) -> list[str]:
    """The report's tables as markdown lines: the fit per target, the noise scales and the branching.

    Args:
        doc: the results.

    Returns:
        The lines.
    """
    s = doc["settings"]
    conf = f"{100 * s['confidence']:g}%"
    out = [f"## Steps to target and the trade-off fit ({conf} bootstrap over {len(s['seeds'])} seeds)", "",
           "| target loss | S_min | E_min | B_crit | batch sizes fitted | rms log residual | best lr per batch |",
           "|---|---|---|---|---|---|---|"]
    for t, f in zip(s["targets"], doc["fits"]):
        if f["fit"] is None:
            out.append(f"| {t:g} | - | - | - | {f['reason']} | | |")
            continue
        fit, ci = f["fit"], f.get("interval") or {}
        edge = "" if fit["bracketed"] else " (not bracketed)"
        out.append(f"| {t:g} | {fit['s_min']:.0f}{_ci(ci.get('s_min'))} | {fit['e_min']:.0f}{_ci(ci.get('e_min'))}"
                   f" | {fit['b_crit']:.0f}{_ci(ci.get('b_crit'))}{edge} | {fit['points']} | "
                   f"{fit['rms_log_residual']:.3f} | {', '.join(_num(v, 'g') for v in f['lr'])} |")
    ref = doc["reference"]
    out += ["", "## Noise scales along the reference run", ""]
    if ref is None:
        return out + ["The smallest batch size reached no target: no reference run, no noise scales or branches."]
    out += [f"Reference run: batch {ref['batch']}, lr {ref['lr']:g} (best for loss {ref['target']:g}). B_noise: "
            f"{s['probes']} sampled examples per measurement, {conf} Student-t interval; the envelope spans the "
            "seeds' intervals.", "",
            "| checkpoint | loss (seed mean) | B_simple per seed | B_noise (seed mean) | envelope | B_crit fit |",
            "|---|---|---|---|---|---|"]
    fits = dict(zip(s["targets"], doc["fits"]))
    for sc in doc["scales"]:
        f = fits.get(sc["checkpoint"])
        crit = "-"
        if f is not None and f["fit"] is not None:
            crit = f"{f['fit']['b_crit']:.0f}{_ci((f.get('interval') or {}).get('b_crit'))}"
        out.append(f"| {_label(sc['checkpoint'])} | {np.mean(sc['loss']):.3f} | "
                   f"{', '.join(_num(v, '.1f') for v in sc['b_simple'])} | {_num(sc['b_noise_mean'], '.1f')} | "
                   f"{_ci(sc['b_noise_envelope'], '.1f').strip() or '-'} | {crit} |")
    out += ["", f"## Local critical batch by branching (seed {s['seeds'][0]}, {s['branch_examples']} examples per "
            f"branch, tolerance {s['branch_tol']:g})", "",
            "| checkpoint | start loss | " + " | ".join(f"B={b}" for b in doc["batch_sizes"]) + " | local B_crit | "
            "B_simple |", "|---|---|" + "---|" * len(doc["batch_sizes"]) + "---|---|"]
    for b in doc["branching"]:
        cells = [f"{_num(v, '.3f')}{'' if k is None or k else ' ✗'}" for v, k in zip(b["losses"], b["keeps"])]
        out.append(f"| {_label(b['checkpoint'])} | {b['start_loss']:.3f} | {' | '.join(cells)} | "
                   f"{_num(b['b_local'], 'd')} | {_num(b['b_simple'], '.1f')} |")
    return out


def write_report(out: Path) -> Path:
    """Draw the figures into ``out/figures/`` and write ``out/report.md`` (atomically) from ``out/results.json``.

    Args:
        out: the output directory.

    Returns:
        The report's path.
    """
    doc = load_results(out, "critical-batch")
    draw_steps(doc, out / "figures" / STEPS_FIGURE)
    draw_scales(doc, out / "figures" / SCALES_FIGURE)
    s = doc["settings"]
    lines = [f"# {doc['name']}: critical batch size", "", doc.get("description", ""), "",
             f"{doc['n']} training examples; batch sizes {', '.join(map(str, doc['batch_sizes']))}; learning rates "
             f"{', '.join(format(v, 'g') for v in s['lrs'])}; seeds {', '.join(map(str, s['seeds']))}; "
             f"targets {', '.join(format(v, 'g') for v in s['targets'])}." + (" (--quick)" if doc["quick"] else ""),
             "", f"![steps to target against batch size](figures/{STEPS_FIGURE})", "",
             f"![B_crit, B_noise and B_simple along the loss; local critical batch](figures/{SCALES_FIGURE})", ""]
    lines += lines_of(doc)
    lines += ["", "## What the papers report", ""] + [f"- {c}" for c in CLAIMS]
    lines += ["", "## Protocol", ""] + [f"- **{k}**: {v}" for k, v in doc["protocol"].items()]
    return write_markdown(out, lines + [""])
