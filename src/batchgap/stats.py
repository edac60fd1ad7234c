"""Statistics over seeds: mean and standard deviation, Welch's t-test, the per-regime summaries and
the SB/LB comparison of a study (as :mod:`batchgap.results` types)."""
from __future__ import annotations

import numpy as np
from scipy import stats

from .results import MEASURES, Comparison, Interval, Ratio, RegimeSummary, RunResult, SharpnessStat, Stat


def mean_std(values) -> Stat:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value) with the count; None values
    are left out."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return Stat()
    return Stat(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size))


def welch(a: list[float], b: list[float]) -> tuple[float | None, float | None, str | None]:
    """(t, two-sided p, what was done) of Welch's unequal-variance t-test; no test for fewer than two
    values a side, or when neither side varies (t is 0/0 or x/0 there: scipy warns and returns nan)."""
    if len(a) < 2 or len(b) < 2:
        return None, None, None
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return None, None, "none: every seed of both regimes has the same test accuracy (no variance to test against)"
    t = stats.ttest_ind(a, b, equal_var=False)
    return float(t.statistic), float(t.pvalue), "Welch's two-sided t-test, unequal variances, one value per seed"


def _geometry(runs: list[RunResult]) -> dict:
    """Mean and std over seeds of each geometric quantity the runs carry."""
    geo = [r.geometry for r in runs if r.geometry]
    if not geo:
        return {}
    out: dict = {"sharpness": [
        SharpnessStat(e["eps"], e.get("subspace_dim"),
                      mean_std([r.sharpness(e["eps"], e.get("subspace_dim")) for r in runs if r.geometry]))
        for e in geo[0].get("sharpness", [])]}
    picks = {"adaptive_sharpness": lambda g: g["value"], "hessian_eigenvalues": lambda g: g["eigenvalues"][0],
             "hessian_trace": lambda g: g["value"], "noise_scale": lambda g: g["b_simple"]}
    names = {"hessian_eigenvalues": "hessian_top_eigenvalue"}
    for key, pick in picks.items():
        if key in geo[0]:
            out[names.get(key, key)] = mean_std([pick(g[key]) for g in geo])
    return out


def summarize(regimes: list[str], runs: list[RunResult]) -> list[RegimeSummary]:
    """One :class:`RegimeSummary` per regime, over its runs that did not diverge."""
    summary = []
    for name in regimes:
        rs = [r for r in runs if r.regime == name]
        ok = [r for r in rs if r.ok]
        summary.append(RegimeSummary(
            name=name,
            batch_size=rs[0].batch_size if rs else None,
            lr=rs[0].lr if rs else None,
            runs=len(rs),
            diverged=len(rs) - len(ok),
            train_accuracy=mean_std([r.train.accuracy for r in ok]),
            test_accuracy=mean_std([r.test.accuracy for r in ok]),
            train_loss=mean_std([r.train.loss for r in ok]),
            test_loss=mean_std([r.test.loss for r in ok]),
            distance_from_init=mean_std([r.distance_from_init["value"] for r in ok]),
            wall_time_s=mean_std([r.wall_time_s for r in rs]),
            **_geometry(ok),
        ))
    return summary


def _ratio(a: Stat | None, b: Stat | None) -> float | None:
    return a.mean / b.mean if a and b and a.mean is not None and b.mean else None


N_BOOT = 10_000
LEVEL = 0.95


def ratio_interval(top: dict, bottom: dict, n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """A percentile bootstrap interval of mean(top) / mean(bottom) over seeds (``{seed: value}``).

    Paired (seeds resampled together) when both hold the same seeds, as a study's regimes do: the SB and
    LB runs of one seed start from the same x0. Otherwise each side is resampled on its own."""
    paired = set(top) == set(bottom)
    a = np.array([top[s] for s in sorted(top)], dtype=float)
    b = np.array([bottom[s] for s in sorted(bottom)], dtype=float)
    n = min(len(a), len(b))
    if n < 2:
        return Interval(None, None, LEVEL, "one seed: no interval", n)
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, len(a), (n_boot, len(a)))
    ib = ia if paired else rng.integers(0, len(b), (n_boot, len(b)))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = a[ia].mean(1) / b[ib].mean(1)
    r = r[np.isfinite(r)]
    if r.size < n_boot // 2:
        return Interval(None, None, LEVEL, "undefined: the denominator's mean is 0 in most resamples", n)
    lo, hi = np.percentile(r, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    how = (f"paired percentile bootstrap over {n} seeds (each seed's runs share x0)" if paired
           else f"percentile bootstrap, {len(a)} and {len(b)} seeds resampled independently")
    return Interval(float(lo), float(hi), LEVEL, f"{how}, {n_boot} resamples", n)


def _per_seed(runs: list[RunResult], value) -> dict:
    return {r.seed: v for r in runs if (v := value(r)) is not None}


def _geometry_value(key: str, eps: float | None = None, subspace_dim: int | None = None):
    pick = {"sharpness": lambda r: r.sharpness(eps, subspace_dim),
            "adaptive_sharpness": lambda r: r.geometry["adaptive_sharpness"]["value"],
            "hessian_top_eigenvalue": lambda r: r.geometry["hessian_eigenvalues"]["eigenvalues"][0],
            "hessian_trace": lambda r: r.geometry["hessian_trace"]["value"],
            "noise_scale": lambda r: r.geometry["noise_scale"]["b_simple"]}[key]
    return lambda r: pick(r) if r.geometry else None


def compare(small: str, large: str, runs: list[RunResult], summary: list[RegimeSummary]) -> Comparison:
    """The SB - LB test-accuracy gap with Welch's t-test, LB/SB ratios of the geometric measures, and
    the SB/LB distance ratio."""
    by = {s.name: s for s in summary}
    sb_runs = [r for r in runs if r.regime == small and r.ok]
    lb_runs = [r for r in runs if r.regime == large and r.ok]
    out = Comparison(small, large, n_small=len(sb_runs), n_large=len(lb_runs))
    sb, lb = [r.test.accuracy for r in sb_runs], [r.test.accuracy for r in lb_runs]
    if sb and lb:
        out.test_accuracy_gap = float(np.mean(sb) - np.mean(lb))
        out.welch_t, out.p_value, out.test = welch(sb, lb)
        if out.p_value is not None:
            ci = stats.ttest_ind(sb, lb, equal_var=False).confidence_interval(LEVEL)
            out.gap_interval = Interval(float(ci.low), float(ci.high), LEVEL, "Welch's t interval", len(sb) + len(lb))
    s, lg = by.get(small), by.get(large)

    def ratio(key: str, mine: Stat | None, theirs: Stat | None, eps=None, dim=None) -> Ratio:
        value = _geometry_value(key, eps, dim)
        return Ratio(key, _ratio(mine, theirs), eps, dim,
                     ratio_interval(_per_seed(lb_runs, value), _per_seed(sb_runs, value)))

    if s and lg:
        for key in MEASURES:
            if key == "sharpness":
                for ls in lg.sharpness:
                    out.large_over_small.append(
                        ratio(key, ls.stat, s.sharp(ls.eps, ls.subspace_dim), ls.eps, ls.subspace_dim))
            elif getattr(s, key) and getattr(lg, key):
                out.large_over_small.append(ratio(key, getattr(lg, key), getattr(s, key)))
    d_sb = _per_seed(sb_runs, lambda r: r.distance_from_init["value"])
    d_lb = _per_seed(lb_runs, lambda r: r.distance_from_init["value"])
    if d_sb and d_lb:
        out.distance_ratio = float(np.mean(list(d_sb.values())) / np.mean(list(d_lb.values())))
        out.distance_interval = ratio_interval(d_sb, d_lb)
    return out
