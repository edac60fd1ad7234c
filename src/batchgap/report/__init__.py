"""The study report: ``OUT/report.md`` and ``OUT/figures/*.png``, drawn from ``OUT/results.json`` alone.

``write_report(out)`` can be run again at any time (``batchgap report OUT``); it never trains.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..machine import summary
from ..results import FITTED, Results, Stat, load_results
from ..stats import mean_std
from ..util import atomic_write_text
from . import experiments, figures, generalization, text
from .definitions import definitions
from .geometry import hessian_table, reading, sharpness_table


def _pm(stat: Stat | None, scale: float = 100.0, digits: int = 2) -> str:
    return text.pm(stat, scale, digits, fixed=True)


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _settings(res: Results) -> list[str]:
    s = res.study
    t = s["train"]
    lines = [
        "| setting | value |", "|---|---|",
        f"| data | {res.data['dataset']}: {res.data['train_examples']} train, {res.data['test_examples']} test "
        f"examples; augmentation: {s['data']['augment']} |",
        f"| model | {s['model']['name']} {json.dumps(s['model']['options']) if s['model']['options'] else ''}, "
        f"BatchNorm: {s['model']['bn']} statistics at evaluation |",
        f"| optimizer | {t['optimizer']}, lr {t['lr']:g}"
        + (f", momentum {t['momentum']}" if t["optimizer"] == "sgd" else "")
        + f", weight decay {t['weight_decay']:g}, {t['epochs']} epochs |",
        f"| seeds | {', '.join(map(str, s['seeds']))} (SB and LB of one seed start from the same x0) |",
    ]
    if s["model"]["bn"] == "auto":  # a user's model, measured as built
        lines[3] = lines[3].replace("BatchNorm: auto statistics at evaluation", "BatchNorm as the model builds it: "
                                    + next((r.eval_protocol["bn"] for r in res.runs if r.eval_protocol), "n/a"))
    for kind, ident in res.user.items():
        for spec, d in (ident.items() if kind == "augment" else [(ident.get("spec") or ident.get("source"), ident)]):
            shas = ", ".join(f"{k.removesuffix('_sha256').removesuffix('sha256') or 'tensors'} sha256 {v[:16]}"
                             for k, v in d.items() if k.endswith("sha256"))
            lines.append(f"| your {kind} | `{spec}` ({shas}) |")
    for r in s["regimes"]:
        extra = {k: v for k, v in r.items() if k not in ("name", "batch_size")}
        lines.append(f"| regime {r['name']} | batch {r['batch_size']}"
                     + (f", {json.dumps(extra)}" if extra else "") + " |")
    for proto in {json.dumps(r.distributed, sort_keys=True) for r in res.runs if r.distributed}:
        d = json.loads(proto)
        lines.append(f"| data-parallel | {d['world_size']} workers ({d['backend']}), global batch {d['global_batch']}, "
                     f"{d['per_worker_batch']} per worker; {d['bn']} |")
    sub = res.data.get("subset")
    if isinstance(sub, dict):
        lines.append(f"| data subset | {json.dumps(sub)} |")
    return lines


def _machines(res: Results) -> str:
    """The header's line of every machine that computed runs (CPU model, kernels, threads, device), with counts."""
    machines = summary(res.runs)
    if not machines:
        return "Machines: no finished runs yet."
    listed = "; ".join(f"{label}: {n} run{'s' if n != 1 else ''}" for label, n in machines)
    return f"Machines that computed the runs (CPU model (kernels), torch threads, device: runs): {listed}."


def _table2(res: Results) -> list[str]:
    lines = ["| regime | batch | lr | train accuracy (%) | test accuracy (%) | runs |", "|---|---|---|---|---|---|"]
    for row in res.summary:
        runs = f"{row.runs}" + (f" ({row.diverged} diverged)" if row.diverged else "")
        lines.append(f"| {row.name} | {row.batch_size} | {_fmt(row.lr)} | {_pm(row.train_accuracy)} | "
                     f"{_pm(row.test_accuracy)} | {runs} |")
    comp = res.comparison
    if comp is not None and comp.test_accuracy_gap is not None:
        gap = 100 * comp.test_accuracy_gap
        sentence = f"\n**Gap:** {comp.small} − {comp.large} test accuracy = **{gap:+.2f} points**"
        if comp.p_value is not None:
            verdict = "significant at 0.05" if comp.p_value < 0.05 else "not significant at 0.05"
            iv = comp.gap_interval
            ci = (f"{int(100 * iv.level)}% interval [{100 * iv.lo:+.2f}, {100 * iv.hi:+.2f}] points; "
                  if iv and iv.lo is not None else "")
            sentence += (f" ({ci}Welch's t-test, {comp.n_small} and {comp.n_large} seeds: t = {comp.welch_t:.2f}, "
                         f"two-sided p = {text.p_value(comp.p_value)}, {verdict}).")
        elif (comp.test or "").startswith("none"):
            sentence += f" (no t-test: {comp.test[len('none: '):]})."
        else:
            sentence += " (one seed per regime: no test)."
        lines.append(sentence)
    lines += _not_fitted(res)
    paper = res.study.get("paper", {}).get("table2")
    if paper:
        lines.append(f"\nThe paper's Table 2 for {paper.get('network', 'this setting')}: train SB {paper['train_sb']}, "
                     f"LB {paper['train_lb']}; test SB {paper['test_sb']}, LB {paper['test_lb']} "
                     "(% , mean ± std over 5 trials).")
    return lines




def _not_fitted(res: Results) -> list[str]:
    """Regimes whose solutions did not fit the training set: a test gap against them is partly an
    optimization gap (too few steps), not the generalization gap the paper studies. A language model's token
    accuracy has no such bar (the text's own entropy bounds it): its training losses are stated instead."""
    if any((r.eval_protocol or {}).get("unit") == "token" for r in res.runs):
        losses = ", ".join(f"{row.name} {row.train_loss.mean:.4f}" for row in res.summary if row.train_loss.mean
                           is not None)
        return [f"\n**Fit:** the units are tokens, whose accuracy the text's own unpredictability bounds far below "
                f"{100 * FITTED:.0f}%: no fitted-or-not rule; the training losses (nats per token) are {losses}."]
    low = [row for row in res.summary if row.train_accuracy.mean is not None and row.train_accuracy.mean < FITTED]
    if not low:
        return []
    steps = {r.regime: r.steps for r in res.runs}
    named = ", ".join(f"{row.name} ({100 * row.train_accuracy.mean:.1f}% after {steps.get(row.name, '?')} steps)"
                      for row in low)
    return [f"\n**Not fitted:** {named} stayed below {100 * FITTED:.0f}% training accuracy. The paper compares "
            "solutions that both fit the training set; a test gap against these is partly an optimization gap "
            "(too few updates), not only the generalization gap."]


def _distance(res: Results) -> list[str]:
    lines = ["| regime | ‖x* − x0‖ | ‖x0‖ |", "|---|---|---|"]
    for row in res.summary:
        x0 = mean_std([r.distance_from_init["x0_norm"] for r in res.runs_of(row.name) if r.distance_from_init])
        lines.append(f"| {row.name} | {text.pm(row.distance_from_init, 1.0, 3, fixed=True)} | "
                     f"{text.pm(x0, 1.0, 3, fixed=True)} |")
    comp = res.comparison
    if comp is not None and comp.distance_ratio is not None:
        lines.append(f"\nRatio ‖x_{comp.small} − x0‖ / ‖x_{comp.large} − x0‖ = **{comp.distance_ratio:.2f}** "
                     f"({text.interval(comp.distance_interval, '.2f')}; the paper found 3 to 10). All trainable "
                     "parameters, BN affine included; mean ± std over seeds.")
    return lines


def _runs(res: Results) -> list[str]:
    lines = ["| run | regime | seed | batch | lr | epochs | steps | train acc | test acc | ‖x*−x0‖ | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res.runs:
        if r.diverged_epoch:
            status = f"diverged at epoch {r.diverged_epoch} | | |"
        else:
            status = (f"{100 * r.train.accuracy:.2f} | {100 * r.test.accuracy:.2f} | "
                      f"{r.distance_from_init['value']:.3f} |")
        lines.append(f"| {r.id} | {r.regime} | {r.seed} | {r.batch_size} | {_fmt(r.lr)} | {r.epochs} | "
                     f"{r.steps} | {status} {r.wall_time_s:.1f} |")
    return lines


def write_report(out: str | Path) -> Path:
    """Write ``out/report.md`` and its figures from ``out/results.json``; return the report's path."""
    out = Path(out)
    res = load_results(out)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    env = res.environment or {}
    s = res.study
    md = [f"# batchgap study `{s['name']}`", ""]
    if s.get("description"):
        md += [s["description"], ""]
    if line := experiments.as_run(res):  # the description names the full study; this, what ran
        md += [line, ""]
    md += [
        f"Software: batchgap {env.get('batchgap')}, Python {env.get('python')}, PyTorch {env.get('torch')}, "
        f"NumPy {env.get('numpy')}, SciPy {env.get('scipy')}; {env.get('platform')}, "
        f"{'/'.join(sorted({str(r.threads) for r in res.runs})) or 'n/a'} torch thread(s) per run. "
        f"The study's runs took {sum(r.wall_time_s for r in res.runs):.1f} s of training and "
        f"{sum(r.measure_time_s or 0 for r in res.runs):.1f} s of measuring, summed over runs (side by side with "
        f"--jobs, so more than the time it took); the last `batchgap` invocation took {res.wall_time_s:.1f} s.",
        "",
    ]
    md += [_machines(res), ""]
    if res.command:
        md += [f"Command: `{res.command}`", ""]
    md += ["## Settings", "", *_settings(res), ""]
    md += ["## Accuracy (the paper's Table 2)", "",
           "Mean ± sample standard deviation over seeds, on the full train and test sets "
           f"({(res.runs[0].eval_protocol or {}).get('bn', 'n/a') if res.runs else 'n/a'}).", "",
           *_table2(res), ""]
    fig2 = figures.accuracy_curves(res, out, fig_dir / "accuracy_curves.png")
    if fig2:
        md += ["## Training curves (the paper's Figure 2)", "", f"![accuracy per epoch](figures/{fig2.name})", ""]
    fig3 = figures.parametric_plot(res, fig_dir / "parametric_plot.png")
    if fig3:
        proto = res.pairs[0].parametric["protocol"]
        md += ["## Parametric plot (the paper's Figure 3)", "",
               f"Loss and accuracy along {proto['formula']}, α from {s['measure']['interpolation_range'][0]} to "
               f"{s['measure']['interpolation_range'][1]} ({proto['points']} points), per seed between the "
               "two regimes' solutions of that seed, mean ± std over seeds.", "",
               f"![parametric plot](figures/{fig3.name})", "",
               f"Protocol: {proto['data']}; BatchNorm: {proto['bn']}; {proto['parameters']}.", ""]
    extra = s.get("figures", [])
    if "remedies" in extra:
        md += ["## Remedies", "", *experiments.remedies_table(res), ""]
        if f := experiments.remedies(res, fig_dir / "remedies.png"):
            md += [f"![remedies: test accuracy against sharpness](figures/{f.name})", ""]
    if "batch-sweep" in extra and (f := experiments.batch_sweep(res, fig_dir / "batch_sweep.png")):
        md += ["## Batch-size sweep (the paper's Figure 4)", "", f"![batch sweep](figures/{f.name})", ""]
    if "warm-start" in extra and (f := experiments.warm_start(res, out, fig_dir / "warm_start.png")):
        md += ["## Warm start from the small batch (the paper's Figure 5)", "", f"![warm start](figures/{f.name})", ""]
    if "trajectory" in extra and (f := experiments.trajectory(res, fig_dir / "sharpness_trajectory.png")):
        md += ["## Sharpness along training (the paper's Figure 6)", "",
               f"![sharpness along training](figures/{f.name})", ""]
    if "noise-scale" in extra and (f := experiments.noise_scale(res, fig_dir / "noise_scale.png")):
        md += ["## Gradient noise scale along training", "", f"![noise scale](figures/{f.name})", ""]
    sharp = sharpness_table(res)
    if sharp:
        md += ["## Sharpness (the paper's Tables 3 and 4)", "", "Mean ± std over seeds.", "", *sharp, ""]
    hess = hessian_table(res)
    if hess:
        md += ["## Curvature and scale-aware sharpness", "", *hess, ""]
    if gen := generalization.measures_table(res):
        md += ["## Generalization measures", "", "Mean ± std over seeds.", "", *gen, ""]
    if dens := generalization.density_section(res, fig_dir):
        md += ["## Hessian spectral density", "", *dens, ""]
    fig_curves = figures.sharpness_curves(res, fig_dir / "sharpness_comparison.png")
    if fig_curves:
        md += ["## Loss along filter-normalized random directions", "",
               "The seed demonstration's `sharpness_comparison.png`, done right: directions normalized per filter "
               "and per neuron (Li et al. 2018), several per model, on the full training set.", "",
               f"![filter-normalized curves](figures/{fig_curves.name})", ""]
    fig_surf = figures.loss_surfaces(res, fig_dir / "loss_surface.png")
    if fig_surf:
        md += ["## Loss surface", "", f"![2-D loss contours](figures/{fig_surf.name})", ""]
    if "correlation" in extra:
        from ..correlate import correlate
        from .correlation import section

        md += ["## Which measure ranks the generalization gap", ""]
        c = correlate([(s["name"], res)])
        md += section(c, fig_dir) if c.runs_used >= 3 else [
            f"Not computed: {c.runs_used} of the {c.runs_total} runs fitted the training set; a rank correlation "
            f"needs at least 3. `batchgap correlate {out}` computes it once more runs are in.", ""]
    read = reading(res)
    if read:
        md += ["## Reading the numbers", "", *read, ""]
    if defs := definitions(res):
        md += ["## What the measures are", "", *defs, ""]
    md += ["## Distance from the start point", "", *_distance(res), ""]
    md += ["## Runs", "", *_runs(res), ""]
    if res.unfinished:
        md += ["## Runs not finished yet", "",
               f"{len(res.unfinished)} of the study's {len(res.unfinished) + len(res.runs)} runs are not in "
               f"these numbers: {', '.join(res.unfinished)}. `batchgap report {out}` merges them once they finish.", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md))
    return path
