"""The report's "What the measures are": each measure in words, its units and every parameter, read from
the protocols stored beside the numbers; and whether the eps-box reaches beyond the quadratic regime."""
from __future__ import annotations

from ..results import Results


def _first(res: Results) -> dict:
    return next((r.geometry for r in res.runs if r.geometry), {}) or {}


def definitions(res: Results) -> list[str]:
    g = _first(res)
    if not g:
        return []
    out = [f"All on the training loss f (mean cross-entropy) over the {g.get('data', 'training set')}; the model is "
           "restored bit for bit after each measure; dropout off."]
    sharp = g.get("sharpness") or []
    if sharp:
        s = sharp[0]
        eps = ", ".join(f"{e:g}" for e in sorted({e['eps'] for e in sharp}))
        out.append(f"- **ε-sharpness φ** (Keskar et al. 2017, eq. 3-4), ε = {eps}: the largest rise of f over the box "
                   "|y_i| ≤ ε(|x_i| + 1) around the solution x, in percent of 1 + f(x): "
                   "φ = 100 (max f(x + y) − f(x)) / (1 + f(x)). Parameters: "
                   f"{s.get('params_measured') or s['params']}. BatchNorm: {s['bn_description']}. Solver: at most "
                   f"{s['max_iter']} iterations and {s['max_fun']} evaluations; "
                   f"{s.get('start', 'L-BFGS-B from y = 0')}; "
                   "the best value seen is reported, a lower bound of the true maximum.")
        sub = next((e for e in sharp if e.get("subspace_dim")), None)
        if sub:
            columns = sub.get("subspace_columns") or "normal"
            out.append(f"- **Random-subspace φ**: y = A z with A of {sub['subspace_dim']} random columns "
                       f"({columns}: {'N(0, 1) entries' if columns == 'normal' else 'unit-norm columns'}), "
                       "the box |z_i| ≤ ε(|(A⁺x)_i| + 1). Its level depends on the columns' scale, which the paper "
                       "does not give: compare LB/SB ratios, not levels, with the paper's Table 4.")
    if a := g.get("adaptive_sharpness"):
        variant = ("n-sharpness: one maximum over the whole training set"
                   if a.get("variant", "n-sharpness") == "n-sharpness"
                   else f"m-sharpness: the mean over {a.get('n_batches')} batches of m = {a.get('m')} "
                        f"of each batch's maximum ({a.get('sampling')})")
        out.append(f"- **Adaptive sharpness** (Andriushchenko et al. 2023), ρ = {a['rho']:g}: max L(w + δ) − L(w) over "
                   f"|δ_i| ≤ ρ|w_i|, in loss units (nats), {variant}; invariant to rescaling a ReLU layer by c and the "
                   f"next by 1/c. BatchNorm: {a['bn_description']}.")
    if e := g.get("hessian_eigenvalues"):
        out.append(f"- **Top Hessian eigenvalue** of ∇²f at x: {e['method']}; tolerance {e['tol']} on the residual; "
                   f"BatchNorm: {e['bn_description']}; in loss units per squared parameter unit.")
    if t := g.get("hessian_trace"):
        out.append(f"- **Hessian trace**: {t['method']}, {t['n_probes']} probes, {int(100 * t['confidence'])}% "
                   f"interval per run ({t['interval']}); BatchNorm: {t['bn_description']}.")
    if n := g.get("noise_scale"):
        out.append(f"- **Gradient noise scale** B_simple = tr(Σ)/|G|² (McCandlish et al. 2018), in examples: "
                   f"{n['method']}; BatchNorm: {n['bn_description']}.")
    out += _jiang(g)
    if c := g.get("curves"):
        out.append(f"- **Loss curves**: f(x + α d) along {c['protocol']['directions']} filter-normalized random "
                   "directions d per run (Li et al. 2018), α in units of the filters' norms; the figure draws the "
                   "geometric mean of all curves of a regime and, as its band, their range (min-max).")
    out.append("- **Over seeds**: tables give mean ± sample standard deviation (± n/a for one seed); each LB/SB ratio "
               "comes with a 95% Fieller interval over seeds, paired by seed (the SB and LB runs of a seed share "
               "x0; exact for normal per-seed values, none for one seed); the gap with Welch's t interval and test.")
    out += _second_order(res)
    return out


def _jiang(g: dict) -> list[str]:
    """Which of Jiang et al. 2019's measures (appendix C, their equation numbers) the generalization rows are."""
    out = []
    if nm := g.get("norms"):
        out.append(f"- **Norm measures** over the weight matrices W_i of the d = {len(nm['layers'])} "
                   "Linear/Conv layers (Jiang et al. 2019's equation numbers): params.norm Σ‖W_i‖_F² (eq. 42); "
                   "log.prod.of.spec Σ log ‖W_i‖_2² (eq. 32); sum.of.spec d (∏ ‖W_i‖_2²)^(1/d) (eq. 35 is its log); "
                   "log.prod.of.fro and sum.of.fro the same with Frobenius norms (eqs. 37, 39); inverse.margin 1/γ², "
                   f"γ the {nm['percentile']:g}th-percentile margin (eq. 22); log.prod.of.spec.over.margin (eq. 31); "
                   "path.norm, the squared network's output sum (eq. 44), where defined. ‖w‖ over all parameters "
                   "(biases and normalization included) is batchgap's, not params.norm.")
    for key, words in (("pac_bayes", "u ~ N(0, σ²I)"), ("pac_bayes_mag", "u_i ~ N(0, σ²w_i²)"),
                       ("pac_bayes_error", "u ~ N(0, σ²I)"), ("pac_bayes_mag_error", "u_i ~ N(0, σ²w_i²)")):
        if p := g.get(key):
            jiang = {"pac_bayes_error": "Jiang et al. 2019's pacbayes.flatness (eq. 53)",
                     "pac_bayes_mag_error": "Jiang et al. 2019's pacbayes.mag.flatness (eq. 61) without its ε floor",
                     }.get(key, "a loss-target variant of Jiang et al. 2019's pacbayes measures")
            bound = ("E[acc(w) − acc(w + u)], the training-accuracy drop" if p.get("target", "loss") == "error"
                     else "E[L(w + u)] − L(w), the training-loss rise")
            kind = " (magnitude-aware)" if "mag" in key else ""
            out.append(f"- **PAC-Bayes flatness{kind}, {p.get('target', 'loss')} target** ({jiang}): 1/σ² for the "
                       f"largest σ with {bound} ≤ δ = {p['delta']:g}, {words}, {p['n_samples']} draws "
                       "shared by every σ.")
    if d := g.get("density"):
        trace = ("its trace with a Student-t interval over the start vectors" if d.get("trace_ci_low") is not None
                 else "no trace (one start vector gives no interval)")
        out.append(f"- **Hessian spectral density** (Ghorbani et al. 2019): {d['n_vectors']} start vector(s) x "
                   f"{d['steps']} Lanczos steps; {trace}.")
    return out


def _second_order(res: Results) -> list[str]:
    """Per regime: the quadratic model's bound on φ against the measured φ (full space, smallest ε)."""
    lines = []
    for row in res.summary:
        rows = [(r.geometry or {}).get("second_order") or [] for r in res.runs_of(row.name)]
        rows = [min(x, key=lambda e: e["eps"]) for x in rows if x]
        if not rows:
            continue
        beyond = sum(e["beyond_quadratic"] for e in rows)
        est = sorted(e["estimate"] for e in rows)[len(rows) // 2]
        got = sorted(e["measured"] for e in rows)[len(rows) // 2]
        lam = sorted(e["lambda_max"] for e in rows)[len(rows) // 2]
        where = ("beyond the quadratic regime: the loss rises faster than its second-order model within the box"
                 if beyond == len(rows) else "within what the quadratic model allows" if beyond == 0
                 else f"beyond the quadratic regime in {beyond} of {len(rows)} seeds")
        lines.append(f"- **Second order, {row.name}** (ε = {rows[0]['eps']:g}, medians over seeds): "
                     "the quadratic model "
                     f"with the top eigenvalue {lam:.3g} bounds φ by 100 ε² Σ(|x_i| + 1)² λ_max / 2 / (1 + f) = "
                     f"{est:.3g}; measured φ = {got:.3g}: the box reaches {where}.")
    return lines
