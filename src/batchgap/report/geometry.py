"""The geometry sections of the report: Tables 3-4 analogs, Hessian, and "Reading the numbers"."""
from __future__ import annotations

from ..results import Ratio, Results, Stat, space_label

# LB/SB ratios of full-space eps-sharpness at eps = 1e-3 in the paper's Table 3, per network
PAPER_RATIOS = {"F1": 205.14 / 1.23, "F2": 310.64 / 1.39, "C1": 707.23 / 28.58, "C2": 925.32 / 8.68,
                "C3": 258.75 / 29.85, "C4": 421.84 / 12.83}


def _pm(stat: Stat | None, digits: int = 3) -> str:
    if stat is None or stat.mean is None:
        return "n/a"
    return f"{stat.mean:.{digits}g} ± {stat.std:.{digits}g}"


def _first_geometry(res: Results) -> dict | None:
    return next((r.geometry for r in res.runs if r.geometry), None)


def _ratios(res: Results) -> list[Ratio]:
    return res.comparison.large_over_small if res.comparison else []


def _ratio(res: Results, measure: str, eps: float | None = None, subspace_dim: int | None = None) -> float | None:
    return res.comparison.ratio(measure, eps=eps, subspace_dim=subspace_dim) if res.comparison else None


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
    head = "| measure | " + " | ".join(row.name for row in regimes) + " | LB/SB |" + (" paper SB | paper LB |" if paper else "")
    lines = [head, "|" + "---|" * (len(regimes) + 2 + (2 if paper else 0))]
    for eps, dim in settings:
        ratio = _ratio(res, "sharpness", eps, dim)
        row = f"| ε-sharpness, {space_label(eps, dim)} | " + " | ".join(_pm(r.sharp(eps, dim)) for r in regimes)
        row += f" | {ratio:.3g}× |" if ratio else " | n/a |"
        if paper:
            sb, lb = _paper(paper, eps, dim)
            row += f" {sb} | {lb} |"
        lines.append(row)
    s0 = geo["sharpness"][0]
    sub = next((e for e in geo["sharpness"] if e.get("subspace_dim")), None)
    lines += ["", f"Keskar's φ (paper eq. 3-4, in the paper's units): {s0['solver']}, at most {s0['max_iter']} iterations "
              f"and {s0['max_fun']} evaluations; data: {geo['data']}; BN: {s0['bn_description']}; parameters: {s0['params']} "
              f"({s0['num_params']} entries)." + (f" Random subspace: {sub['space']}, drawn from the run's seed." if sub else "")]
    if paper:
        lines.append(f"Paper columns: {paper_all.get('network', 'the paper')}, mean ± std over 5 trials (Tables 3 and 4).")
    return lines


def hessian_table(res: Results) -> list[str]:
    geo = _first_geometry(res)
    if not geo:
        return []
    rows = [("top Hessian eigenvalue", "hessian_top_eigenvalue", "hessian_eigenvalues"),
            ("Hessian trace", "hessian_trace", "hessian_trace"),
            ("adaptive sharpness", "adaptive_sharpness", "adaptive_sharpness"),
            ("gradient noise scale B_simple", "noise_scale", "noise_scale")]
    rows = [r for r in rows if r[2] in geo]
    if not rows:
        return []
    regimes = [row for row in res.summary if getattr(row, rows[0][1]) is not None]
    lines = ["| measure | " + " | ".join(row.name for row in regimes) + " | LB/SB |", "|" + "---|" * (len(regimes) + 2)]
    for label, key, _ in rows:
        ratio = _ratio(res, key)
        lines.append(f"| {label} | " + " | ".join(_pm(getattr(row, key)) for row in regimes) + (f" | {ratio:.3g}× |" if ratio else " | n/a |"))
    notes = []
    if "hessian_eigenvalues" in geo:
        e = geo["hessian_eigenvalues"]
        notes.append(f"Eigenvalue: {e['method']}, tolerance {e['tol']}, residual ‖Hv − λv‖ reported per run")
    if "hessian_trace" in geo:
        t = geo["hessian_trace"]
        notes.append(f"trace: {t['method']} with {t['n_probes']} probes, {int(100 * t['confidence'])}% interval per run ({t['interval']})")
    if "adaptive_sharpness" in geo:
        a = geo["adaptive_sharpness"]
        notes.append(f"adaptive sharpness: max L(w + δ) − L(w) over {a['perturbation_set']} (Andriushchenko et al. 2023), "
                     "invariant to rescaling a ReLU layer by c and the next by 1/c")
    if "noise_scale" in geo:
        n = geo["noise_scale"]
        notes.append(f"noise scale: B_simple = tr(Σ)/|G|² (McCandlish et al. 2018) from {n['n_batches_small']} batches of "
                     f"{n['small']} and the full gradient, {n['sampling']}")
    lines += ["", "; ".join(notes) + f". Data: {geo['data']}."]
    return lines


def _verdict(ratio: float) -> str:
    if ratio >= 10:
        return "within the paper's 1-2 orders of magnitude" if ratio <= 250 else "above even the paper's largest ratios"
    if ratio >= 2:
        return "sharper, but by less than the paper's order of magnitude"
    if ratio > 0.5:
        return "no clear difference, unlike the paper"
    return "flatter, the opposite of the paper's finding"


def reading(res: Results) -> list[str]:
    comp = res.comparison
    ratios = _ratios(res)
    if not ratios or not comp.small:
        return []
    sb, lb = comp.small, comp.large
    out = []
    sharp = [r for r in ratios if r.measure == "sharpness"]
    full = [r for r in sharp if r.subspace_dim is None]
    main = next((r for r in full if r.eps == 0.001), full[0] if full else None)
    paper_range = f"{min(PAPER_RATIOS.values()):.0f}× to {max(PAPER_RATIOS.values()):.0f}×"
    if main and main.value:
        r = main.value
        out.append(f"By Keskar's ε-sharpness ({space_label(main.eps, None)}), the {lb} solutions are **{r:.3g}× as sharp** as the "
                   f"{sb} ones ({_pm(res.regime(lb).sharp(main.eps))} against {_pm(res.regime(sb).sharp(main.eps))}): {_verdict(r)} "
                   f"(the paper's Table 3 ratios at ε = 1e-3 run from {paper_range} across its six networks).")
    sub = [r for r in sharp if r.subspace_dim is not None and r.value]
    if sub:
        out.append(f"In random subspaces the ratio is {sub[0].value:.3g}× ({space_label(sub[0].eps, sub[0].subspace_dim)}).")
    for name, label in (("hessian_top_eigenvalue", "top Hessian eigenvalue"), ("hessian_trace", "Hessian trace")):
        if value := comp.ratio(name):
            out.append(f"The {label} of {lb} is {value:.3g}× that of {sb}.")
    if r := comp.ratio("adaptive_sharpness"):
        agrees = "agrees" if r > 1 else "disagrees"
        out.append(f"The scale-aware measure {agrees}: adaptive sharpness of {lb} is {r:.3g}× that of {sb}. "
                   + ("Raw sharpness is not invariant to reparameterization (Dinh et al. 2017), so the scale-aware number "
                      "is the one to weigh against the raw ones." if r <= 1 else
                      "Both the raw and the scale-aware measures point the same way."))
    noise = {n: res.regime(n).noise_scale for n in (sb, lb)}
    if all(v and v.mean for v in noise.values()):
        b = noise[sb].mean
        lb_size = res.regime(lb).batch_size
        out.append(f"The gradient noise scale at the {sb} solutions is B_simple ≈ {b:.0f} (at {lb}: {noise[lb].mean:.0f}): "
                   f"McCandlish et al. predict that batches much larger than that stop paying in steps saved; "
                   f"{lb}'s batch of {lb_size} is {lb_size / b:.2g}× it.")
    if dist := comp.distance_ratio:
        out.append(f"{sb} travels {dist:.2f}× as far from x0 as {lb} (the paper: 3 to 10).")
    return [" ".join(out)]
