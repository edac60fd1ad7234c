"""The report of ``batchgap measure``: ``DIR/report.md`` and ``DIR/figures/*.png``, from ``DIR/measures.json`` alone.

A table of every number with its protocol, then the figures: the loss along filter-normalized random
directions, the 2-D loss surface and, with ``--compare``, the parametric plot between the two checkpoints.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..errors import UserError  # noqa: E402
from ..results import space_label  # noqa: E402
from ..rundir import read_json  # noqa: E402
from ..util import atomic_write_text  # noqa: E402
from .generalization import draws  # noqa: E402

# the file batchgap.measure_cmd writes, and the schema read here (its SCHEMA; a test holds the two equal)
MEASURES, SCHEMA = "measures.json", 1


def load_measures(out: str | Path) -> dict:
    """``out/measures.json``, refused in one line when missing, foreign or of another schema."""
    path = Path(out) / MEASURES
    doc = read_json(path)
    if doc is None or doc.get("kind") != "batchgap measure":
        raise UserError(f"{path}: not a batchgap measures file (missing, unreadable or edited); run batchgap measure")
    if doc.get("schema") != SCHEMA:
        raise UserError(f"{path}: schema {doc.get('schema')!r}, this batchgap reads schema {SCHEMA}; measure again")
    return doc


def _g(v, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _common(geo: dict) -> list[str]:
    """What the geometry rows share, stated once: data, BatchNorm, parameters, batch, loss, solver."""
    found = [geo[k] for k in ("adaptive_sharpness", "hessian_eigenvalues", "hessian_trace", "noise_scale")
             if geo.get(k)]
    found = geo.get("sharpness", []) + found
    if not found:
        return []
    d = found[0]
    lines = [f"Every geometry row: the training loss ({d['loss_fn']}) on the {geo['data']}; "
             f"BatchNorm: {d['bn_description']}; parameters: {d['params']} ({d['num_params']} entries); "
             f"evaluation batch {d['batch_size']}."]
    solvers = {x["solver"] for x in found if "solver" in x}
    lines += [f"Sharpness solver: {s}." for s in sorted(solvers)]
    return lines


def numbers_table(doc: dict) -> list[str]:
    """One row per number: what it is, its value, its protocol (the shared part below the table)."""
    rows = []

    def add(quantity: str, value: str, protocol: str) -> None:
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in (quantity, value, protocol)) + " |")

    ev = doc["eval_protocol"]
    for split in ("train", "test"):
        m = doc[split]
        proto = (f"full {split} set, {m['n']} examples; BN: {ev['bn']}; batch {ev['eval_batch_size']}; "
                 f"dropout {ev['dropout']}")
        add(f"{split} loss", _g(m["loss"]), proto)
        add(f"{split} accuracy", f"{100 * m['accuracy']:.2f}%", proto)
    geo = doc["geometry"]
    for s in geo.get("sharpness", []):
        add(f"ε-sharpness φ (%), {space_label(s['eps'], s['subspace_dim'])}", _g(s["value"]),
            f"{s['space']}; {s['nit']} of at most {s['max_iter']} iterations, {s['nfev']} evaluations; "
            f"seed {s['seed']}")
    if a := geo.get("adaptive_sharpness"):
        add(f"adaptive sharpness, ρ = {a['rho']:g}", f"{_g(a['value'])} (relative {_g(a['relative'])}%)",
            f"{a['perturbation_set']}; {a['nit']} of at most {a['max_iter']} iterations")
    if h := geo.get("hessian_eigenvalues"):
        add(f"Hessian top-{h['k']} eigenvalues", ", ".join(_g(v) for v in h["eigenvalues"]),
            f"{h['method'].split(';')[0]}; {h['lanczos_steps']} Lanczos steps, "
            f"{'converged' if h['converged'] else 'NOT converged'} (tol {h['tol']:g}); seed {h['seed']}")
    if t := geo.get("hessian_trace"):
        add("Hessian trace", f"{_g(t['value'])} ± {_g(t['stderr'], 3)} ({100 * t['confidence']:g}% interval "
                             f"{_g(t['ci_low'])} to {_g(t['ci_high'])})",
            f"{t['method'].split(';')[0]}, {t['n_probes']} probes; {t['interval']}; seed {t['seed']}")
    if (n := geo.get("noise_scale")) and n["interval"].startswith("none: exact"):
        add("gradient noise scale B_simple", f"{_g(n['b_simple'])} (exact)",
            f"every one of the {n['n']} examples' gradients (McCandlish et al. 2018, population covariance); "
            f"{n['grad_path']}")
    elif n:
        add("gradient noise scale B_simple", f"{_g(n['b_simple'])} ({100 * n['confidence']:g}% interval "
                                             f"{_g(n['ci_low'])} to {_g(n['ci_high'])})",
            f"{n['n_batches_small']} random batches of {n['small']} against {n['big']} (McCandlish et al. 2018, "
            f"finite-population correction); seed {n['seed']}")
    for key, words in (("average_sharpness", "σ"), ("average_sharpness_mag", "σ|w| (magnitude-aware)")):
        if a := geo.get(key):
            add(f"average sharpness, {words} = {a['sigma']:g}",
                f"{_g(a['value'])} ({100 * a['confidence']:g}% interval {_g(a['ci_low'])} to {_g(a['ci_high'])})",
                f"{a['noise']}; {draws(a)} draws; seed {a['seed']}")
    for key, words in (("pac_bayes", "1/σ²"), ("pac_bayes_mag", "1/σ'² (magnitude-aware)"),
                       ("pac_bayes_error", "1/σ²"), ("pac_bayes_mag_error", "1/σ'² (magnitude-aware)"),
                       ("worst_case", "worst-case 1/α²"), ("worst_case_mag", "worst-case 1/α'² (magnitude-aware)")):
        if f := geo.get(key):
            size = f.get("sigma", f.get("alpha"))
            target = f.get("target", "loss")
            bound = ("training-accuracy drop" if target == "error" else "loss rise")
            add(f"{'PAC-Bayes flatness ' if key.startswith('pac') else 'flatness, '}{words}, {target} target "
                f"({bound} ≤ δ = {f['delta']:g})",
                _g(f["value"]) if f["value"] is not None else f"n/a ({f['reason']})",
                f"{'σ' if key.startswith('pac') else 'α'} = {_g(size) if size is not None else 'n/a'}; {f['search']}")
    if nm := geo.get("norms"):
        for field, words in (("params_norm", "Σ ‖W_i‖_F² (Jiang's params.norm, eq. 42)"),
                             ("param_norm_all", "‖w‖, all parameters"),
                             ("sum_of_spec", "d (∏ ‖W_i‖_2²)^(1/d) (Jiang's sum.of.spec)"),
                             ("sum_of_fro", "d (∏ ‖W_i‖_F²)^(1/d) (Jiang's sum.of.fro)"),
                             ("log_prod_of_spec", "log ∏ ‖W_i‖_2² (Jiang's eq. 32)"),
                             ("path_norm", "path norm"), ("fisher_rao_norm", "Fisher-Rao norm"),
                             ("margin", f"margin ({nm['percentile']:g}th percentile)")):
            if field not in nm and f"{field}_reason" not in nm:
                continue  # measured before this field existed
            value = nm.get(field)
            reason = nm.get(f"{field}_reason")
            add(words, _g(value) if value is not None else f"n/a ({reason})", nm["definitions"].get(field, ""))
    if d := geo.get("density"):
        add("Hessian spectrum: λ_min, λ_max (SLQ)", f"{_g(d['lambda_min'])}, {_g(d['lambda_max'])}",
            f"{d['method'].split(';')[0]}; mass below −s: {_g(d['negative_weight'], 3)}; seed {d['seed']}")
        if d.get("trace") is not None and d.get("trace_ci_low") is not None:  # a trace only with its interval
            add("Hessian trace (SLQ start vectors)",
                f"{_g(d['trace'])} ± {_g(d['trace_stderr'], 3)} ({100 * d['trace_confidence']:g}% interval "
                f"{_g(d['trace_ci_low'])} to {_g(d['trace_ci_high'])})",
                f"{d['n_vectors']} Rademacher start vectors; {d['trace_interval']}; seed {d['seed']}")
    if p := doc.get("parametric"):
        proto = p["protocol"]
        for alpha, name in ((0.0, "A"), (1.0, "B")):
            if alpha in p["alphas"]:
                i = p["alphas"].index(alpha)
                add(f"parametric plot at α = {alpha:g} ({name}): train / test loss",
                    f"{_g(p['train']['loss'][i])} / {_g(p['test']['loss'][i])}",
                    f"f({proto['formula']}); {proto['data']}; BN: {proto['bn']}")
    head = ["| quantity | value | protocol |", "|---|---|---|"]
    return head + rows + [x for line in _common(geo) for x in ("", line)]


def _note(fig, text: str) -> None:
    fig.text(0.01, 0.01, text, fontsize=7.5, color="0.3", ha="left", va="bottom", wrap=True)


def curves_figure(doc: dict, path: Path) -> Path | None:
    """The training loss along each filter-normalized random direction, log scale."""
    c = doc["geometry"].get("curves")
    if not c:
        return None
    fig, ax = plt.subplots(figsize=(7.2, 5.0))
    for k, row in enumerate(c["loss"]):
        ax.plot(c["alphas"], row, lw=1.6, label=f"direction {k + 1} (seed {c['protocol']['direction_seeds'][k]})")
    values = np.asarray(c["loss"], dtype=float)
    if np.all(values[np.isfinite(values)] > 0):
        ax.set_yscale("log")
    ax.set_xlabel("alpha (step along a filter-normalized random direction d)")
    ax.set_ylabel("training cross-entropy L(θ* + α d)")
    ax.set_title("loss along random directions around the checkpoint", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.subplots_adjust(bottom=0.2)
    _note(fig, f"Directions: {c['protocol']['direction']}. Data: {c['protocol']['data']}; BN: {c['protocol']['bn']}.")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def surface_figure(doc: dict, path: Path) -> Path | None:
    """2-D contours of the training loss around the checkpoint."""
    s = doc["geometry"].get("surface")
    if not s:
        return None
    loss = np.asarray(s["loss"], dtype=float)
    finite = loss[np.isfinite(loss) & (loss > 0)]
    if finite.size == 0 or finite.min() == finite.max():
        return None
    levels = np.geomspace(finite.min(), finite.max(), 16)
    a, b = np.meshgrid(s["alphas"], s["betas"], indexing="ij")
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    cs = ax.contourf(a, b, loss, levels=levels, norm=matplotlib.colors.LogNorm(), cmap="viridis")
    ax.contour(a, b, loss, levels=levels, colors="white", linewidths=0.4)
    ax.plot([0], [0], "r*", ms=10)
    ax.set_xlabel("alpha (direction 1)")
    ax.set_ylabel("beta (direction 2)")
    ax.set_aspect("equal")
    cbar = fig.colorbar(cs, ax=ax, ticks=levels[::3], format="%.3g")
    cbar.set_label("training cross-entropy (log color scale)")
    ax.set_title("training loss around the checkpoint", fontsize=10)
    fig.subplots_adjust(bottom=0.18)
    _note(fig, f"Directions: {s['protocol']['direction']} (seeds {s['protocol']['direction_seeds']}). "
               f"Data: {s['protocol']['data']}; BN: {s['protocol']['bn']}.")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def parametric_figure(doc: dict, path: Path) -> Path | None:
    """Cross-entropy (left axis) and accuracy (right axis) along the path from A (α = 0) to B (α = 1)."""
    p = doc.get("parametric")
    if not p:
        return None
    alphas = p["alphas"]
    fig, ax = plt.subplots(figsize=(7.2, 5.2))
    ax2 = ax.twinx()
    for split, style in (("train", "-"), ("test", "--")):
        ax.plot(alphas, p[split]["loss"], style, color="tab:blue", lw=1.8, label=f"{split} cross-entropy")
        ax2.plot(alphas, [100 * a for a in p[split]["accuracy"]], style, color="tab:red", lw=1.8,
                 label=f"{split} accuracy")
    losses = np.asarray(p["train"]["loss"] + p["test"]["loss"], dtype=float)
    if np.nanmax(losses) > 10 * np.nanmin(losses) > 0:
        ax.set_yscale("log")
    for a in (0.0, 1.0):
        ax.axvline(a, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("alpha   (0 = A, the checkpoint; 1 = B, --compare)")
    ax.set_ylabel("cross-entropy", color="tab:blue")
    ax2.set_ylabel("accuracy (%)", color="tab:red")
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    fig.legend(lines, labels, fontsize=8, loc="lower center", ncol=4, bbox_to_anchor=(0.5, 0.075), frameon=False)
    proto = p["protocol"]
    ax.set_title(f"f({proto['formula']})", fontsize=10)
    fig.subplots_adjust(bottom=0.25, left=0.11, right=0.89)
    _note(fig, f"Protocol: {proto['data']}; BN: {proto['bn']}; {proto['parameters']}; {proto['points']} points.")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def write_measures_report(out: str | Path) -> Path:
    """Write ``out/report.md`` and ``out/figures/`` from ``out/measures.json``; return the report's path."""
    out = Path(out)
    doc = load_measures(out)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    ck, data, model = doc["checkpoint"], doc["data"], doc["model"]
    md = ["# batchgap measure", ""]
    if doc.get("command"):
        md += [f"Command: `{doc['command']}`", ""]
    md += ["| | |", "|---|---|",
           f"| checkpoint | `{ck['path']}` ({ck['format']}, sha256 {ck['sha256'][:16]})"
           + (f", run {ck['run']['id']}" if ck.get("run") else "") + " |"]
    if cmp := doc.get("compare"):
        md.append(f"| compared with | `{cmp['path']}` ({cmp['format']}, sha256 {cmp['sha256'][:16]}) |")
    shas = ", ".join(f"{k} {v[:16]}" for k, v in model.items() if k.endswith("sha256"))
    md += [f"| model | `{model['name']}` {json.dumps(model['options']) if model.get('options') else ''}"
           f"{' (' + shas + ')' if shas else ''}; BatchNorm {model['bn']} |",
           f"| data | {data['dataset']}: {data['train_examples']} train, {data['test_examples']} test examples, "
           f"inputs {tuple(data['input_shape'])}, {data['num_classes']} classes"
           + (f"; sha256 {data['info']['sha256'][:16]}" if data["info"].get("sha256") else "") + " |",
           f"| seed, threads, device | {doc['seed']}, {doc['threads']}, {doc['device']} |",
           f"| time | {doc['wall_time_s']:.1f} s |", ""]
    md += ["## Numbers", "", *numbers_table(doc), ""]
    if f := curves_figure(doc, fig_dir / "loss_curves.png"):
        md += ["## Loss along filter-normalized random directions", "", f"![loss curves](figures/{f.name})", ""]
    if f := surface_figure(doc, fig_dir / "loss_surface.png"):
        md += ["## Loss surface", "", f"![2-D loss contours](figures/{f.name})", ""]
    if f := parametric_figure(doc, fig_dir / "parametric_plot.png"):
        md += ["## Parametric plot between the two checkpoints", "", f"![parametric plot](figures/{f.name})", ""]
    md += ["## Measure settings", "", "| setting | value |", "|---|---|",
           *(f"| measure.{k} | {json.dumps(v)} |" for k, v in doc["measure"].items()), ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md))
    return path
