"""The study report: ``OUT/report.md`` and ``OUT/figures/*.png``, drawn from ``OUT/results.json`` alone.

``write_report(out)`` can be run again at any time (``batchgap report OUT``); it never trains.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..util import atomic_write_text
from . import experiments, figures
from .geometry import hessian_table, reading, sharpness_table


def _pm(stat: dict | None, scale: float = 100.0, digits: int = 2) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def load_results(out: Path) -> dict:
    path = out / "results.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no results here; run `batchgap run STUDY --out {out}` first") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable results file ({e.__class__.__name__})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("runs"), list) or not isinstance(doc.get("study"), dict):
        raise UserError(f"{path}: not a batchgap results file (missing 'study' or 'runs')")
    return doc


def _settings(doc: dict) -> list[str]:
    s = doc["study"]
    t = s["train"]
    lines = [
        "| setting | value |", "|---|---|",
        f"| data | {doc['data']['dataset']}: {doc['data']['train_examples']} train, {doc['data']['test_examples']} test examples; augmentation: {s['data']['augment']} |",
        f"| model | {s['model']['name']} {json.dumps(s['model']['options']) if s['model']['options'] else ''}, BatchNorm: {s['model']['bn']} statistics at evaluation |",
        f"| optimizer | {t['optimizer']}, lr {t['lr']:g}" + (f", momentum {t['momentum']}" if t["optimizer"] == "sgd" else "")
        + f", weight decay {t['weight_decay']:g}, {t['epochs']} epochs |",
        f"| seeds | {', '.join(map(str, s['seeds']))} (SB and LB of one seed start from the same x0) |",
    ]
    for r in s["regimes"]:
        extra = {k: v for k, v in r.items() if k not in ("name", "batch_size")}
        lines.append(f"| regime {r['name']} | batch {r['batch_size']}" + (f", {json.dumps(extra)}" if extra else "") + " |")
    for proto in {json.dumps(r["distributed"], sort_keys=True) for r in doc["runs"] if r.get("distributed")}:
        d = json.loads(proto)
        lines.append(f"| data-parallel | {d['world_size']} workers ({d['backend']}), global batch {d['global_batch']}, "
                     f"{d['per_worker_batch']} per worker; {d['bn']} |")
    sub = doc["data"].get("subset")
    if isinstance(sub, dict):
        lines.append(f"| data subset | {json.dumps(sub)} |")
    return lines


def _table2(doc: dict) -> list[str]:
    lines = ["| regime | batch | lr | train accuracy (%) | test accuracy (%) | runs |", "|---|---|---|---|---|---|"]
    for name, row in doc["summary"].items():
        runs = f"{row['runs']}" + (f" ({row['diverged']} diverged)" if row["diverged"] else "")
        lines.append(f"| {name} | {row['batch_size']} | {_fmt(row['lr'])} | {_pm(row['train_accuracy'])} | {_pm(row['test_accuracy'])} | {runs} |")
    comp = doc.get("comparison") or {}
    if "test_accuracy_gap" in comp:
        gap = 100 * comp["test_accuracy_gap"]
        sentence = f"\n**Gap:** {comp['small']} − {comp['large']} test accuracy = **{gap:+.2f} points**"
        if "p_value" in comp:
            verdict = "significant at 0.05" if comp["p_value"] < 0.05 else "not significant at 0.05"
            sentence += f" (Welch t = {comp['welch_t']:.2f}, two-sided p = {comp['p_value']:.3g}, {verdict})."
        elif comp.get("test", "").startswith("none"):
            sentence += f" (no t-test: {comp['test'][len('none: '):]})."
        else:
            sentence += " (one seed per regime: no test)."
        lines.append(sentence)
    lines += _not_fitted(doc)
    paper = doc["study"].get("paper", {}).get("table2")
    if paper:
        lines.append(f"\nThe paper's Table 2 for {paper.get('network', 'this setting')}: train SB {paper['train_sb']}, "
                     f"LB {paper['train_lb']}; test SB {paper['test_sb']}, LB {paper['test_lb']} (% , mean ± std over 5 trials).")
    return lines


FITTED = 0.99  # the paper's networks all reach 99-100% training accuracy (its Table 2)


def _not_fitted(doc: dict) -> list[str]:
    """Regimes whose solutions did not fit the training set: a test gap against them is partly an
    optimization gap (too few steps), not the generalization gap the paper studies."""
    low = [(name, row) for name, row in doc["summary"].items()
           if row["train_accuracy"]["mean"] is not None and row["train_accuracy"]["mean"] < FITTED]
    if not low:
        return []
    steps = {r["regime"]: r["steps"] for r in doc["runs"]}
    named = ", ".join(f"{name} ({100 * row['train_accuracy']['mean']:.1f}% after {steps.get(name, '?')} steps)"
                      for name, row in low)
    return [f"\n**Not fitted:** {named} stayed below {100 * FITTED:.0f}% training accuracy. The paper compares "
            "solutions that both fit the training set; a test gap against these is partly an optimization gap "
            "(too few updates), not only the generalization gap."]


def _distance(doc: dict) -> list[str]:
    lines = ["| regime | ‖x* − x0‖ | ‖x0‖ |", "|---|---|---|"]
    for name, row in doc["summary"].items():
        x0 = [r["distance_from_init"]["x0_norm"] for r in doc["runs"] if r["regime"] == name and r.get("distance_from_init")]
        lines.append(f"| {name} | {_pm(row['distance_from_init'], 1.0, 3)} | {x0[0]:.3f} |" if x0 else f"| {name} | n/a | n/a |")
    comp = doc.get("comparison") or {}
    if "distance_ratio" in comp:
        lines.append(f"\nRatio ‖x_{comp['small']} − x0‖ / ‖x_{comp['large']} − x0‖ = **{comp['distance_ratio']:.2f}** "
                     "(the paper found 3 to 10). All trainable parameters, BN affine included.")
    return lines


def _runs(doc: dict) -> list[str]:
    lines = ["| run | regime | seed | batch | lr | epochs | steps | train acc | test acc | ‖x*−x0‖ | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        if r.get("diverged_epoch"):
            status = f"diverged at epoch {r['diverged_epoch']} | | |"
        else:
            status = f"{100 * r['train']['accuracy']:.2f} | {100 * r['test']['accuracy']:.2f} | {r['distance_from_init']['value']:.3f} |"
        lines.append(f"| {r['id']} | {r['regime']} | {r['seed']} | {r['batch_size']} | {_fmt(r['lr'])} | {r['epochs']} | "
                     f"{r['steps']} | {status} {r['wall_time_s']:.1f} |")
    return lines


def write_report(out: str | Path) -> Path:
    """Write ``out/report.md`` and its figures from ``out/results.json``; return the report's path."""
    out = Path(out)
    doc = load_results(out)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    env = doc.get("environment", {})
    s = doc["study"]
    md = [f"# batchgap study `{s['name']}`", ""]
    if s.get("description"):
        md += [s["description"], ""]
    md += [
        f"Software: batchgap {env.get('batchgap')}, Python {env.get('python')}, PyTorch {env.get('torch')}, "
        f"NumPy {env.get('numpy')}, SciPy {env.get('scipy')}; {env.get('platform')}, {env.get('torch_threads')} threads. "
        f"Wall time of this invocation: {doc.get('wall_time_s', 0):.1f} s "
        f"(training time summed over runs: {sum(r['wall_time_s'] for r in doc['runs']):.1f} s"
        + ("; seeds trained together as one stacked model each record the whole group's time)."
           if any(r.get("stacked") for r in doc["runs"]) else ")."),
        "",
    ]
    if doc.get("command"):
        md += [f"Command: `{doc['command']}`", ""]
    md += ["## Settings", "", *_settings(doc), ""]
    md += ["## Accuracy (the paper's Table 2)", "",
           "Mean ± sample standard deviation over seeds, on the full train and test sets "
           f"({doc['runs'][0].get('eval_protocol', {}).get('bn', 'n/a') if doc['runs'] else 'n/a'}).", "",
           *_table2(doc), ""]
    fig2 = figures.accuracy_curves(doc, out, fig_dir / "accuracy_curves.png")
    if fig2:
        md += ["## Training curves (the paper's Figure 2)", "", f"![accuracy per epoch](figures/{fig2.name})", ""]
    fig3 = figures.parametric_plot(doc, fig_dir / "parametric_plot.png")
    if fig3:
        proto = doc["pairs"][0]["parametric"]["protocol"]
        md += ["## Parametric plot (the paper's Figure 3)", "",
               f"Loss and accuracy along {proto['formula']}, α from {s['measure']['interpolation_range'][0]} to "
               f"{s['measure']['interpolation_range'][1]} ({proto['points']} points), per seed between the "
               "two regimes' solutions of that seed, mean ± std over seeds.", "",
               f"![parametric plot](figures/{fig3.name})", "",
               f"Protocol: {proto['data']}; BatchNorm: {proto['bn']}; {proto['parameters']}.", ""]
    extra = s.get("figures", [])
    if "remedies" in extra:
        md += ["## Remedies", "", *experiments.remedies_table(doc), ""]
        if f := experiments.remedies(doc, fig_dir / "remedies.png"):
            md += [f"![remedies: test accuracy against sharpness](figures/{f.name})", ""]
    if "batch-sweep" in extra and (f := experiments.batch_sweep(doc, fig_dir / "batch_sweep.png")):
        md += ["## Batch-size sweep (the paper's Figure 4)", "", f"![batch sweep](figures/{f.name})", ""]
    if "warm-start" in extra and (f := experiments.warm_start(doc, out, fig_dir / "warm_start.png")):
        md += ["## Warm start from the small batch (the paper's Figure 5)", "", f"![warm start](figures/{f.name})", ""]
    if "trajectory" in extra and (f := experiments.trajectory(doc, fig_dir / "sharpness_trajectory.png")):
        md += ["## Sharpness along training (the paper's Figure 6)", "", f"![sharpness along training](figures/{f.name})", ""]
    if "noise-scale" in extra and (f := experiments.noise_scale(doc, fig_dir / "noise_scale.png")):
        md += ["## Gradient noise scale along training", "", f"![noise scale](figures/{f.name})", ""]
    sharp = sharpness_table(doc)
    if sharp:
        md += ["## Sharpness (the paper's Tables 3 and 4)", "", "Mean ± std over seeds.", "", *sharp, ""]
    hess = hessian_table(doc)
    if hess:
        md += ["## Curvature and scale-aware sharpness", "", *hess, ""]
    fig_curves = figures.sharpness_curves(doc, fig_dir / "sharpness_comparison.png")
    if fig_curves:
        md += ["## Loss along filter-normalized random directions", "",
               "The seed demonstration's `sharpness_comparison.png`, done right: directions normalized per filter "
               "and per neuron (Li et al. 2018), several per model, on the full training set.", "",
               f"![filter-normalized curves](figures/{fig_curves.name})", ""]
    fig_surf = figures.loss_surfaces(doc, fig_dir / "loss_surface.png")
    if fig_surf:
        md += ["## Loss surface", "", f"![2-D loss contours](figures/{fig_surf.name})", ""]
    read = reading(doc)
    if read:
        md += ["## Reading the numbers", "", *read, ""]
    md += ["## Distance from the start point", "", *_distance(doc), ""]
    md += ["## Runs", "", *_runs(doc), ""]
    if doc.get("unfinished"):
        md += ["## Runs not finished yet", "",
               f"{len(doc['unfinished'])} of the study's {len(doc['unfinished']) + len(doc['runs'])} runs are not in "
               f"these numbers: {', '.join(doc['unfinished'])}. `batchgap report {out}` merges them once they finish.", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md))
    return path
