"""The geometry sections of the report: Tables 3-4 analogs, Hessian, and "Reading the numbers"."""
from __future__ import annotations

# LB/SB ratios of full-space eps-sharpness at eps = 1e-3 in the paper's Table 3, per network
PAPER_RATIOS = {"F1": 205.14 / 1.23, "F2": 310.64 / 1.39, "C1": 707.23 / 28.58, "C2": 925.32 / 8.68,
                "C3": 258.75 / 29.85, "C4": 421.84 / 12.83}


def _pm(stat: dict | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean']:.{digits}g} ± {stat['std']:.{digits}g}"


def _first_geometry(doc: dict) -> dict | None:
    return next((r["geometry"] for r in doc["runs"] if r.get("geometry")), None)


def sharpness_table(doc: dict) -> list[str]:
    geo = _first_geometry(doc)
    if not geo or not geo.get("sharpness"):
        return []
    regimes = [n for n, row in doc["summary"].items() if row.get("sharpness")]
    keys = list(doc["summary"][regimes[0]]["sharpness"])
    paper_all = doc["study"].get("paper", {})
    paper = paper_all.get("sharpness", {})
    head = "| measure | " + " | ".join(regimes) + " | LB/SB |" + (" paper SB | paper LB |" if paper else "")
    lines = [head, "|" + "---|" * (len(regimes) + 2 + (2 if paper else 0))]
    ratios = (doc.get("comparison") or {}).get("large_over_small", {})
    for key in keys:
        ratio = ratios.get(f"sharpness {key}")
        row = f"| ε-sharpness, {key.replace('eps=', 'ε = ')} | " + " | ".join(_pm(doc["summary"][n]["sharpness"][key]) for n in regimes)
        row += f" | {ratio:.3g}× |" if ratio else " | n/a |"
        if paper:
            sb, lb = paper.get(key, ["", ""])
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


def hessian_table(doc: dict) -> list[str]:
    geo = _first_geometry(doc)
    if not geo:
        return []
    rows = [("top Hessian eigenvalue", "hessian_top_eigenvalue", "hessian_eigenvalues"),
            ("Hessian trace", "hessian_trace", "hessian_trace"),
            ("adaptive sharpness", "adaptive_sharpness", "adaptive_sharpness"),
            ("gradient noise scale B_simple", "noise_scale", "noise_scale")]
    rows = [r for r in rows if r[2] in geo]
    if not rows:
        return []
    regimes = [n for n, row in doc["summary"].items() if row.get(rows[0][1])]
    ratios = (doc.get("comparison") or {}).get("large_over_small", {})
    lines = ["| measure | " + " | ".join(regimes) + " | LB/SB |", "|" + "---|" * (len(regimes) + 2)]
    for label, key, _ in rows:
        ratio = ratios.get(key)
        lines.append(f"| {label} | " + " | ".join(_pm(doc["summary"][n][key]) for n in regimes) + (f" | {ratio:.3g}× |" if ratio else " | n/a |"))
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


def reading(doc: dict) -> list[str]:
    comp = doc.get("comparison") or {}
    ratios = comp.get("large_over_small", {})
    sb, lb = comp.get("small"), comp.get("large")
    if not ratios or not sb:
        return []
    out = []
    full = [k for k in ratios if k.startswith("sharpness full")]
    key = "sharpness full eps=0.001" if "sharpness full eps=0.001" in ratios else (full[0] if full else None)
    paper_range = f"{min(PAPER_RATIOS.values()):.0f}× to {max(PAPER_RATIOS.values()):.0f}×"
    if key and ratios[key]:
        r = ratios[key]
        s = doc["summary"]
        k = key.removeprefix("sharpness ")
        out.append(f"By Keskar's ε-sharpness ({k.replace('eps=', 'ε = ')}), the {lb} solutions are **{r:.3g}× as sharp** as the "
                   f"{sb} ones ({_pm(s[lb]['sharpness'][k])} against {_pm(s[sb]['sharpness'][k])}): {_verdict(r)} "
                   f"(the paper's Table 3 ratios at ε = 1e-3 run from {paper_range} across its six networks).")
    sub = [k for k in ratios if k.startswith("sharpness subspace") and ratios[k]]
    if sub:
        out.append(f"In random subspaces the ratio is {ratios[sub[0]]:.3g}× ({sub[0].removeprefix('sharpness ')}).")
    for name, label in (("hessian_top_eigenvalue", "top Hessian eigenvalue"), ("hessian_trace", "Hessian trace")):
        if ratios.get(name):
            out.append(f"The {label} of {lb} is {ratios[name]:.3g}× that of {sb}.")
    if ratios.get("adaptive_sharpness"):
        r = ratios["adaptive_sharpness"]
        agrees = "agrees" if r > 1 else "disagrees"
        out.append(f"The scale-aware measure {agrees}: adaptive sharpness of {lb} is {r:.3g}× that of {sb}. "
                   + ("Raw sharpness is not invariant to reparameterization (Dinh et al. 2017), so the scale-aware number "
                      "is the one to weigh against the raw ones." if r <= 1 else
                      "Both the raw and the scale-aware measures point the same way."))
    noise = {n: doc["summary"][n].get("noise_scale") for n in (sb, lb)}
    if all(v and v.get("mean") for v in noise.values()):
        b = noise[sb]["mean"]
        lb_size = doc["summary"][lb]["batch_size"]
        out.append(f"The gradient noise scale at the {sb} solutions is B_simple ≈ {b:.0f} (at {lb}: {noise[lb]['mean']:.0f}): "
                   f"McCandlish et al. predict that batches much larger than that stop paying in steps saved; "
                   f"{lb}'s batch of {lb_size} is {lb_size / b:.2g}× it.")
    dist = comp.get("distance_ratio")
    if dist:
        out.append(f"{sb} travels {dist:.2f}× as far from x0 as {lb} (the paper: 3 to 10).")
    return [" ".join(out)]
