"""The geometry sections of the report: Tables 3-4 analogs, Hessian, and "Reading the numbers"."""
from __future__ import annotations

from ..results import FITTED, Ratio, Results, Stat, space_label
from . import text

# LB/SB ratios of full-space eps-sharpness at eps = 1e-3 in the paper's Table 3, per network
PAPER_RATIOS = {"F1": 205.14 / 1.23, "F2": 310.64 / 1.39, "C1": 707.23 / 28.58, "C2": 925.32 / 8.68,
                "C3": 258.75 / 29.85, "C4": 421.84 / 12.83}


def _pm(stat: Stat | None, digits: int = 3) -> str:
    return text.pm(stat, 1.0, digits)


def _first_geometry(res: Results) -> dict | None:
    return next((r.geometry for r in res.runs if r.geometry), None)


def _ratios(res: Results) -> list[Ratio]:
    return res.comparison.large_over_small if res.comparison else []


def _ratio(res: Results, measure: str, eps: float | None = None, subspace_dim: int | None = None) -> float | None:
    return res.comparison.ratio(measure, eps=eps, subspace_dim=subspace_dim) if res.comparison else None


def _cell(res: Results, measure: str, eps: float | None = None, dim: int | None = None) -> str:
    """An LB/SB table cell: ``52.9× [48, 58.3]``; ``n/a`` without a ratio."""
    r = res.comparison.ratio_of(measure, eps, dim) if res.comparison else None
    if r is None or not r.value:
        return "n/a"
    iv = r.interval
    if iv and iv.lo is not None:
        return f"{r.value:.3g}× [{iv.lo:.3g}, {iv.hi:.3g}]"
    unbounded = iv is not None and iv.method.startswith("unbounded")  # Fieller: the SB mean not told from 0
    return f"{r.value:.3g}× ({'unbounded: no interval' if unbounded else 'one seed'})"


def _paper(paper: list, eps: float, subspace_dim: int | None) -> tuple[str, str]:
    """The paper's SB and LB values at one setting, from a study's ``[[paper.sharpness]]`` tables."""
    row = next((p for p in paper if p["eps"] == eps and p.get("subspace_dim") == subspace_dim), None)
    return (row["sb"], row["lb"]) if row else ("not reported", "not reported")


def sharpness_table(res: Results) -> list[str]:
    geo = _first_geometry(res)
    if not geo or not geo.get("sharpness"):
        return []
    regimes = [row for row in res.summary if row.sharpness]
    if not regimes:
        return []
    settings = [(e.eps, e.subspace_dim) for e in regimes[0].sharpness]
    paper_all = res.study.get("paper", {})
    paper = paper_all.get("sharpness", [])
    head = ("| measure | " + " | ".join(row.name for row in regimes) + " | LB/SB (95% interval over seeds) |"
            + (" paper SB | paper LB |" if paper else ""))
    lines = [head, "|" + "---|" * (len(regimes) + 2 + (2 if paper else 0))]
    for eps, dim in settings:
        row = f"| ε-sharpness, {space_label(eps, dim)} | " + " | ".join(_pm(r.sharp(eps, dim)) for r in regimes)
        row += f" | {_cell(res, 'sharpness', eps, dim)} |"
        if paper:
            sb, lb = _paper(paper, eps, dim)
            row += f" {sb} | {lb} |"
        lines.append(row)
    s0 = geo["sharpness"][0]
    sub = next((e for e in geo["sharpness"] if e.get("subspace_dim")), None)
    lines += ["", f"Keskar's φ (paper eq. 3-4, in the paper's units): {s0['solver']}, at most {s0['max_iter']} "
              f"iterations and {s0['max_fun']} evaluations; data: {geo['data']}; BN: {s0['bn_description']}; "
              f"parameters: {s0['params']} ({s0['num_params']} entries)."
              + (f" Random subspace: {sub['space']}, drawn from the run's seed." if sub else "")]
    if sub:
        norm = f", mean column norm {sub['column_norm']:.3g}" if sub.get("column_norm") else ""
        lines.append(f"The random-subspace levels depend on the scale of A's columns "
                     f"(here {sub['space'].split(', ', 1)[-1]}{norm}: the box ε(|(A⁺x)ᵢ| + 1) is about ±ε whatever "
                     "that scale, so the column norm sets how far the parameters move), which the paper does not give: "
                     "only the LB/SB ratios of the subspace rows, not their levels, are comparable with the paper, and "
                     "only at one column scale (the reach decides whether the gradient or the curvature dominates, so "
                     "the ratio can change with it too).")
    solves = [e for r in res.runs if r.geometry for e in r.geometry.get("sharpness", [])]
    if capped := [e for e in solves if e.get("capped")]:
        lines.append(f"The evaluation cap, not the {s0['max_iter']} iterations, ended {len(capped)} of {len(solves)} "
                     "ε-sharpness solves (their values are lower bounds from fewer iterations).")
    if paper:
        lines.append(f"Paper columns: {paper_all.get('network', 'the paper')}, "
                     "mean ± std over 5 trials (Tables 3 and 4).")
    return lines


def _adaptive_label(geo: dict) -> str:
    """Which adaptive-sharpness statistic the study measured, e.g. "m-sharpness, m = 128 over 1024 points"."""
    a = geo["adaptive_sharpness"]
    if a.get("variant") == "m-sharpness":
        return f"m-sharpness, m = {a['m']} over {a['n']} points"
    data = geo.get("data", "")
    return "n-sharpness, " + ("full training set" if data.startswith("full training set") else data)


def hessian_table(res: Results) -> list[str]:
    geo = _first_geometry(res)
    if not geo:
        return []
    rows = [("top Hessian eigenvalue", "hessian_top_eigenvalue", "hessian_eigenvalues"),
            ("Hessian trace", "hessian_trace", "hessian_trace"),
            (f"adaptive sharpness ({_adaptive_label(geo)})" if "adaptive_sharpness" in geo else "",
             "adaptive_sharpness", "adaptive_sharpness"),
            ("gradient noise scale B_simple", "noise_scale", "noise_scale")]
    rows = [r for r in rows if r[2] in geo]
    if not rows:
        return []
    regimes = [row for row in res.summary if getattr(row, rows[0][1]) is not None]
    lines = ["| measure | " + " | ".join(row.name for row in regimes) + " | LB/SB (95% interval over seeds) |",
             "|" + "---|" * (len(regimes) + 2)]
    for label, key, _ in rows:
        lines.append(f"| {label} | " + " | ".join(_pm(getattr(row, key)) for row in regimes)
                     + f" | {_cell(res, key)} |")
    notes = []
    if "hessian_eigenvalues" in geo:
        e = geo["hessian_eigenvalues"]
        notes.append(f"Eigenvalue: {e['method']}, tolerance {e['tol']}, residual ‖Hv − λv‖ reported per run")
    if "hessian_trace" in geo:
        t = geo["hessian_trace"]
        notes.append(f"trace: {t['method']} with {t['n_probes']} probes, "
                     f"{int(100 * t['confidence'])}% interval per run ({t['interval']})")
    if "adaptive_sharpness" in geo:
        a = geo["adaptive_sharpness"]
        kind = ("the mean over the batches of each batch's max L_B(w + δ) − L_B(w), " + a["sampling"]
                if a.get("variant") == "m-sharpness" else "one max L(w + δ) − L(w) over the whole data")
        notes.append(f"adaptive sharpness ({_adaptive_label(geo)}): {kind}, over {a['perturbation_set']} "
                     "(Andriushchenko et al. 2023 report m-sharpness, m = 128 over 1024 points), "
                     "invariant to rescaling a ReLU layer by c and the next by 1/c")
        runs = [r.geometry["adaptive_sharpness"] for r in res.runs if r.geometry and "adaptive_sharpness" in r.geometry]
        if capped := [x for x in runs if x.get("capped")]:
            notes.append(f"the evaluation cap, not the {a['max_iter']} iterations, ended the adaptive "
                         f"sharpness solve in {len(capped)} of {len(runs)} runs (lower bounds from fewer iterations)")
    if "noise_scale" in geo:
        n = geo["noise_scale"]
        how = (f"exact, from every one of the {n['n']} examples' gradients (population covariance)"
               if n["interval"].startswith("none: exact") else
               f"from {n['n_batches_small']} batches of {n['small']} and the full gradient, {n['sampling']}")
        notes.append(f"noise scale: B_simple = tr(Σ)/|G|² (McCandlish et al. 2018) {how}"
                     + (f"; BN with batch statistics has no per-example gradients, so the estimator's examples are "
                        f"ghost batches of {n['ghost_batch']} ({n['bn_description']}), B_simple still in examples"
                        if n.get("ghost_batch") else ""))
        unset = [r.geometry["noise_scale"] for r in res.runs
                 if r.geometry and "noise_scale" in r.geometry and r.geometry["noise_scale"].get("b_simple") is None]
        if unset:
            notes.append(f"B_simple not estimated on {len(unset)} run(s), left out of the means "
                         f"({unset[0].get('reason')})")
    lines += ["", "; ".join(notes) + f". Data: {geo['data']}."]
    return lines


def _fitted_caveat(res: Results, names: tuple[str, str]) -> str:
    """A caveat when a compared regime did not fit the training set (the paper compares fitted solutions); for token
    units (no accuracy bar: the text's entropy bounds it) when the training losses differ by more than 10%."""
    if any((r.eval_protocol or {}).get("unit") == "token" for r in res.runs):
        loss = [res.regime(n).train_loss.mean if res.regime(n) else None for n in names]
        if None in loss or max(loss) <= 1.1 * min(loss):
            return ""
        return (f"Caveat: {names[0]} and {names[1]} end at training losses of {loss[0]:.3f} and {loss[1]:.3f} nats per "
                "token, so what follows compares solutions of unequal training, not two equally fitted minima. ")
    low = [n for n in names if (row := res.regime(n)) and row.train_accuracy.mean is not None
           and row.train_accuracy.mean < FITTED]
    if not low:
        return ""
    return (f"Caveat: {' and '.join(low)} did not fit the training set "
            f"(below {100 * FITTED:.0f}% training accuracy), so "
            "what follows compares solutions of unequal training, not the paper's setting of two fitted minima. ")


def reading(res: Results) -> list[str]:
    """The paragraph under the tables: every comparison as its LB/SB ratio with the interval over seeds,
    and a verdict (:func:`text.verdict`) that claims no more than the interval allows."""
    comp = res.comparison
    ratios = _ratios(res)
    if not ratios or not comp.small:
        return []
    sb, lb = comp.small, comp.large
    caveat = _fitted_caveat(res, (sb, lb)).strip()
    out = [caveat] if caveat else []
    sharp = [r for r in ratios if r.measure == "sharpness"]
    full = [r for r in sharp if r.subspace_dim is None]
    main = next((r for r in full if r.eps == 0.001), full[0] if full else None)
    paper_range = f"{min(PAPER_RATIOS.values()):.0f}× to {max(PAPER_RATIOS.values()):.0f}×"
    raw = None
    if main and main.value:
        raw = text.verdict(main, "sharper", "flatter")
        what = {"sharper": f"the {lb} solutions are **sharper** than the {sb} ones",
                "flatter": f"the {lb} solutions are **flatter** than the {sb} ones",
                "about the same": f"the {lb} and {sb} solutions are **about as sharp**"}
        out.append(f"By Keskar's ε-sharpness ({space_label(main.eps, None)}) "
                   + what.get(raw, f"whether the {lb} solutions are sharper than the {sb} ones is **{raw}**"))
        out[-1] += (f": LB/SB = {text.ratio_text(main)}; {_pm(res.regime(lb).sharp(main.eps))} against "
                    f"{_pm(res.regime(sb).sharp(main.eps))} (the paper's Table 3 ratios at ε = 1e-3 run from "
                    f"{paper_range} across its six networks).")
    sub = [r for r in sharp if r.subspace_dim is not None and r.value]
    if sub:
        out.append(f"In random subspaces ({space_label(sub[0].eps, sub[0].subspace_dim)}) "
                   f"LB/SB = {text.ratio_text(sub[0])}: "
                   f"{text.verdict(sub[0], 'sharper', 'flatter')}.")
    for name, label in (("hessian_top_eigenvalue", "top Hessian eigenvalue"), ("hessian_trace", "Hessian trace")):
        if (r := comp.ratio_of(name)) and r.value:
            out.append(f"The {label} of {lb} over that of {sb}: {text.ratio_text(r)}, "
                       f"{text.verdict(r, 'larger', 'smaller')}.")
    if (r := comp.ratio_of("adaptive_sharpness")) and r.value:
        scale = text.verdict(r, "sharper", "flatter")
        decided = {"sharper", "flatter", "about the same"}
        agree = ("is not decisive" if scale not in decided else
                 f"finds them {scale} where the raw measure is not decisive" if raw not in decided else
                 "agrees with the raw measure" if raw == scale else
                 f"disagrees with the raw measure (finds them {scale})")
        out.append(f"The scale-aware measure, adaptive sharpness ({_adaptive_label(_first_geometry(res))}), {agree}: "
                   f"LB/SB = {text.ratio_text(r)} ({scale}).")
    noise = {n: res.regime(n).noise_scale for n in (sb, lb)}
    if all(v and v.mean for v in noise.values()):
        b = noise[sb].mean
        lb_size = res.regime(lb).batch_size
        unit = ((_first_geometry(res) or {}).get("noise_scale") or {}).get("unit", "example")
        rows, units = res.data.get("train_examples"), next((r.train.n for r in res.runs if r.train), None)
        if unit != "example" and rows and units:  # B_simple counts units (tokens): the batch in units too
            lb_units = lb_size * units / rows
            size = f"{lb_size} rows ({lb_units:.0f} {unit}s) is {lb_units / b:.2g}× it"
        else:
            size = f"{lb_size} is {lb_size / b:.2g}× it"
        out.append(f"The gradient noise scale at the {sb} solutions is B_simple ≈ {b:.0f} "
                   f"{unit + 's ' if unit != 'example' else ''}(at {lb}: {noise[lb].mean:.0f}): "
                   f"McCandlish et al. predict that batches much larger than that stop paying in steps saved; "
                   f"{lb}'s batch of {size}."
                   + (f" (Batch statistics: measured over ghost batches of {g}, normalized each by its own statistics.)"
                      if (g := ((_first_geometry(res) or {}).get("noise_scale") or {}).get("ghost_batch")) else ""))
    elif unset := [name for name, v in noise.items() if v is not None and v.mean is None]:
        why = next((r.geometry["noise_scale"].get("reason") for r in res.runs if r.regime in unset and r.geometry
                    and (r.geometry.get("noise_scale") or {}).get("b_simple", 0) is None), None)
        out.append(f"The gradient noise scale B_simple is not estimated at the {' and '.join(unset)} solutions"
                   + (f" ({why})." if why else "."))
    if dist := comp.distance_ratio:
        out.append(f"{sb} travels {dist:.2f}× as far from x0 as {lb} "
                   f"({text.interval(comp.distance_interval, '.2f', '×')}; "
                   "the paper: 3 to 10).")
    return [" ".join(out)]
