"""Statistics over seeds: mean and standard deviation, Welch's t-test, the per-regime summaries and
the SB/LB comparison of a study (as :mod:`batchgap.results` types)."""
from __future__ import annotations

import numpy as np
from scipy import stats

from .results import MEASURES, Comparison, Ratio, RegimeSummary, RunResult, SharpnessStat, Stat


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


def compare(small: str, large: str, runs: list[RunResult], summary: list[RegimeSummary]) -> Comparison:
    """The SB - LB test-accuracy gap with Welch's t-test, LB/SB ratios of the geometric measures, and
    the SB/LB distance ratio."""
    by = {s.name: s for s in summary}
    sb_runs = [r for r in runs if r.regime == small and r.ok]
    lb_runs = [r for r in runs if r.regime == large and r.ok]
    out = Comparison(small, large)
    sb, lb = [r.test.accuracy for r in sb_runs], [r.test.accuracy for r in lb_runs]
    if sb and lb:
        out.test_accuracy_gap = float(np.mean(sb) - np.mean(lb))
        out.welch_t, out.p_value, out.test = welch(sb, lb)
    s, l = by.get(small), by.get(large)
    if s and l:
        for key in MEASURES:
            if key == "sharpness":
                for ls in l.sharpness:
                    out.large_over_small.append(Ratio("sharpness", _ratio(ls.stat, s.sharp(ls.eps, ls.subspace_dim)),
                                                      ls.eps, ls.subspace_dim))
            elif getattr(s, key) and getattr(l, key):
                out.large_over_small.append(Ratio(key, _ratio(getattr(l, key), getattr(s, key))))
    d_sb = [r.distance_from_init["value"] for r in sb_runs]
    d_lb = [r.distance_from_init["value"] for r in lb_runs]
    if d_sb and d_lb:
        out.distance_ratio = float(np.mean(d_sb) / np.mean(d_lb))
    return out
