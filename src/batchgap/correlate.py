"""Which measure ranks trained models by their generalization gap: Kendall's tau and Jiang et al.'s
granulated coefficient Psi over finished studies, with bootstrap intervals over seeds.

Jiang et al. 2019 ("Fantastic generalization measures and where to find them", section 4):

* Kendall's rank correlation between a measure and the gap over all models (tau-b here: ties in either
  variable are corrected for, as :func:`scipy.stats.kendalltau` does by default);
* the granulated coefficient: for each hyperparameter axis i, psi_i is the mean of tau over the sets of
  models in which only axis i varies (every other axis held fixed: here also the seed, so each set is
  one seed's models along axis i); Psi = the mean of psi_i over the axes that vary. Psi asks whether the
  measure follows the gap when ONE training choice changes, which a tau over everything can get right
  for the wrong reason (a measure that tracks only the batch size ranks a batch-size-driven gap well).

* beside them, each measure's tau against the learning rate and against the batch size of the same runs
  (with the same interval), so a reader sees whether a measure tracks the gap or only a training choice
  (Andriushchenko et al. 2023, "A modern look at the relationship between sharpness and generalization",
  found sharpness follows the learning rate more than the gap).

Every measure is oriented as a complexity, larger predicting a LARGER gap, as its theory says (a
margin enters as 1/margin^2, PAC-Bayes flatness as 1/sigma^2), so a positive tau or Psi means "ranks
the gap as its theory predicts". Runs that do not fit the training set (train accuracy below
:data:`results.FITTED`) are left out and counted, as Jiang et al. train every model to the same low
training loss: a gap among unfitted models is partly an optimization gap. Diverged and unmeasured runs
are counted too.

Intervals: an expanded percentile bootstrap over seeds (a seed's runs are resampled together: each shares
its x0 and data order), tau and Psi recomputed on every resample as :mod:`batchgap.rank_bootstrap` says;
from :data:`~batchgap.rank_bootstrap.MIN_SEEDS` seeds on, and with fewer seeds "no interval with S seeds".
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .rank_bootstrap import (
    LEVEL, MIN_SEEDS, N_BOOT, PSI_RESAMPLED, TAU_RESAMPLED, expanded_percentile_interval, kendall_tau_b,
    no_interval, psi_of_counts, seed_pair_sums, seed_resamples, tau_b_of_counts,
)
from .results import FITTED, Interval, Results, RunResult, space_label

# the training choices a grid can vary; the seed is held fixed inside a group, never an axis. "settings":
# every other override a regime makes (momentum, weight_decay, warmup_epochs, ...), so that a group never
# mixes runs that differ in a choice the run record does not carry; "study": the output a run came from
AXES = ("batch_size", "lr", "optimizer", "epochs", "remedy", "ghost_batch", "augment", "batch_schedule",
        "init_from", "settings", "study")

TARGETS = {
    "gap": ("generalization gap (train − test accuracy, points)",
            lambda r: 100 * (r.train.accuracy - r.test.accuracy)),
    "test_error": ("test error (%)", lambda r: 100 * (1 - r.test.accuracy)),
    "loss_gap": ("loss gap (test − train loss)", lambda r: r.test.loss - r.train.loss),
}


@dataclass(frozen=True)
class Measure:
    """A measure read from a run's geometry, oriented as a complexity (larger predicts a larger gap)."""
    key: str
    label: str
    pick: Callable[[RunResult], float | None]
    source: str  # where the measure and its direction come from


def _geo(key: str, field_: str = "value"):
    def pick(r: RunResult):
        g = (r.geometry or {}).get(key)
        return None if g is None else g.get(field_)
    return pick


def _inverse_square(key: str, field_: str):
    def pick(r: RunResult):
        g = (r.geometry or {}).get(key)
        v = None if g is None else g.get(field_)
        return None if v is None or v <= 0 else 1.0 / v**2
    return pick


def _spectral_complexity(r: RunResult):
    """log(prod_i ||W_i||_2^2 / margin^2) = 2 log_prod_spectral - 2 log margin: Jiang et al. 2019's
    log.prod.of.spec.over.margin (eq. 31), Bartlett et al. 2017's product term without its reference-matrix
    factor."""
    g = (r.geometry or {}).get("norms")
    if not g or g.get("margin") is None or g["margin"] <= 0:
        return None
    return 2 * g["log_prod_spectral"] - 2 * math.log(g["margin"])


def _twice(key: str, field_: str):
    """2 x a stored log of a product of norms: the log of the product of the SQUARED norms (Jiang et al.'s
    eqs. 32 and 37), for results measured before those were stored."""
    def pick(r: RunResult):
        g = (r.geometry or {}).get(key)
        if not g:
            return None
        jiang = {"log_prod_spectral": "log_prod_of_spec", "log_prod_frobenius": "log_prod_of_fro"}[field_]
        if g.get(jiang) is not None:
            return g[jiang]
        return None if g.get(field_) is None else 2 * g[field_]
    return pick


def _squared(key: str, field_: str):
    def pick(r: RunResult):
        g = (r.geometry or {}).get(key)
        v = None if g is None else g.get(field_)
        return None if v is None else v * v
    return pick


def _eig(r: RunResult):
    g = (r.geometry or {}).get("hessian_eigenvalues")
    return None if g is None else g["eigenvalues"][0]


def _distance(r: RunResult):
    return None if r.distance_from_init is None else r.distance_from_init["value"]


def _sharp(eps: float, dim: int | None):
    def pick(r: RunResult):
        return r.sharpness(eps, dim)
    return pick


# Sources: Jiang et al. 2019 ("Fantastic generalization measures"), their appendix C equation numbers (as carried
# by the reference code of Dziugaite et al. 2020); where batchgap's quantity differs from theirs, the label says so.
FIXED_MEASURES = (
    Measure("adaptive_sharpness", "adaptive sharpness (worst case, ρ|w|)", _geo("adaptive_sharpness"),
            "Andriushchenko et al. 2023"),
    Measure("hessian_top_eigenvalue", "Hessian λ_max", _eig, "Keskar et al. 2017; Jastrzębski et al."),
    Measure("hessian_trace", "Hessian trace", _geo("hessian_trace"),
            "Hessian-based flatness (randomized estimate, method recorded); not one of Jiang et al. 2019's measures"),
    Measure("average_sharpness", "average sharpness σ", _geo("average_sharpness"),
            "Neyshabur et al. 2017 (expected sharpness, loss rise at fixed σ); "
            "not one of Jiang et al. 2019's measures"),
    Measure("average_sharpness_mag", "average sharpness σ|w|", _geo("average_sharpness_mag"),
            "Neyshabur et al. 2017's expected sharpness with Jiang et al. 2019's magnitude-aware noise (no ε floor)"),
    Measure("pac_bayes", "PAC-Bayes flatness 1/σ², loss target", _geo("pac_bayes"),
            "loss-target variant of Jiang et al. 2019's pacbayes.flatness (eq. 53): E[L(w+u)] − L(w) ≤ δ"),
    Measure("pac_bayes_error", "PAC-Bayes flatness 1/σ², error target", _geo("pac_bayes_error"),
            "Jiang et al. 2019 (pacbayes.flatness, eq. 53): training-accuracy drop ≤ δ"),
    Measure("pac_bayes_mag", "PAC-Bayes flatness 1/σ'² (magnitude-aware), loss target", _geo("pac_bayes_mag"),
            "loss-target variant of Jiang et al. 2019's pacbayes.mag.flatness (eq. 61), without its ε floor"),
    Measure("pac_bayes_mag_error", "PAC-Bayes flatness 1/σ'² (magnitude-aware), error target",
            _geo("pac_bayes_mag_error"),
            "Jiang et al. 2019 (pacbayes.mag.flatness, eq. 61, without its ε = 1e-3 noise floor): "
            "accuracy drop ≤ δ"),
    Measure("worst_case", "worst-case flatness 1/α², loss target", _geo("worst_case"),
            "loss-target variant of Jiang et al. 2019's sharpness.flatness"),
    Measure("worst_case_mag", "worst-case flatness 1/α'² (magnitude-aware), loss target", _geo("worst_case_mag"),
            "loss-target variant of Jiang et al. 2019's sharpness.mag.flatness, without its ε noise floor"),
    Measure("params_norm", "Σ ‖W_i‖_F² (weight matrices)", _geo("norms", "params_norm"),
            "Jiang et al. 2019 (params.norm, eq. 42)"),
    Measure("param_norm_all", "‖w‖ (all parameters: weights, biases, normalization)",
            _geo("norms", "param_norm_all"),
            "ℓ2 norm of every trained parameter; not Jiang et al. 2019's params.norm (weight matrices only)"),
    Measure("log_prod_of_fro", "log ∏ ‖W_i‖_F²", _twice("norms", "log_prod_frobenius"),
            "Jiang et al. 2019 (log.prod.of.fro, eq. 37)"),
    Measure("sum_of_fro", "d (∏ ‖W_i‖_F²)^(1/d)", _geo("norms", "sum_of_fro"),
            "Jiang et al. 2019 (sum.of.fro; eq. 39 is its log)"),
    Measure("log_prod_of_spec", "log ∏ ‖W_i‖_2²", _twice("norms", "log_prod_spectral"),
            "Jiang et al. 2019 (log.prod.of.spec, eq. 32)"),
    Measure("sum_of_spec", "d (∏ ‖W_i‖_2²)^(1/d)", _geo("norms", "sum_of_spec"),
            "Jiang et al. 2019 (sum.of.spec; eq. 35 is its log)"),
    Measure("path_norm", "path norm² (Σ over paths of ∏ w²)", _squared("norms", "path_norm"),
            "Jiang et al. 2019 (path.norm, eq. 44); Neyshabur et al. 2015's path norm squared"),
    Measure("fisher_rao_norm", "Fisher–Rao norm", _geo("norms", "fisher_rao_norm"),
            "Liang et al. 2019, without the depth constant of Jiang et al. 2019's fisher.rao (eq. 45)"),
    Measure("inverse_margin", "1 / margin² (10th percentile)", _inverse_square("norms", "margin"),
            "Jiang et al. 2019 (inverse.margin, eq. 22)"),
    Measure("spectral_margin", "log ∏‖W_i‖_2² / margin²", _spectral_complexity,
            "Jiang et al. 2019 (log.prod.of.spec.over.margin, eq. 31); Bartlett et al. 2017"),
    Measure("distance", "‖x* − x0‖ (all parameters)", _distance,
            "Nagarajan & Kolter 2019; not Jiang et al. 2019's frob.distance "
            "(eq. 40: Σ ‖W_i − W_i⁰‖_F², weights)"),
)


def measures_of(runs: list[RunResult]) -> list[Measure]:
    """The measures these runs carry: every eps-sharpness setting they hold, then :data:`FIXED_MEASURES`."""
    settings = []
    for r in runs:
        for e in (r.geometry or {}).get("sharpness", []):
            if (e["eps"], e.get("subspace_dim")) not in settings:
                settings.append((e["eps"], e.get("subspace_dim")))
    sharp = [Measure(f"sharpness_{'full' if d is None else f'sub{d}'}_{eps:g}", f"ε-sharpness, {space_label(eps, d)}",
                     _sharp(eps, d), "Keskar et al. 2017") for eps, d in settings]
    return [m for m in sharp + list(FIXED_MEASURES) if any(m.pick(r) is not None for r in runs)]


# ------------------------------------------------------------------ rank statistics

@dataclass(frozen=True)
class Point:
    """One fitted run as the statistics see it."""
    run: str
    seed: int
    hyper: dict  # axis -> value (a string for tables: json of dicts)
    batch_size: int
    lr: float
    target: float
    value: float


def _groups(points: list[Point], axis: str, axes: list[str]) -> list[list[int]]:
    """The sets of points in which only ``axis`` varies: every other axis and the seed held fixed."""
    by: dict = {}
    for i, p in enumerate(points):
        key = (p.seed, *(p.hyper[a] for a in axes if a != axis))
        by.setdefault(key, []).append(i)
    return [idx for idx in by.values() if len({points[i].hyper[axis] for i in idx}) >= 2]


def _psi_parts(points: list[Point], axes: list[str]) -> dict[str, list[tuple[int, float]]]:
    """Per axis, each group's (seed, tau) with tau defined."""
    out = {}
    for axis in axes:
        parts = []
        for idx in _groups(points, axis, axes):
            tau = kendall_tau_b([points[i].value for i in idx], [points[i].target for i in idx])
            if not math.isnan(tau):
                parts.append((points[idx[0]].seed, tau))
        out[axis] = parts
    return out


def _tau_with_interval(x, y, point_seeds, seeds, draws) -> tuple[float | None, Interval | None]:
    """Kendall's tau-b of x against y over these points, with the seed bootstrap's interval (the one the
    gap's tau has); (None, None) when either is constant (a training choice the runs do not vary)."""
    tau = kendall_tau_b(x, y)
    if math.isnan(tau):
        return None, None
    if draws is None:
        return tau, Interval(None, None, LEVEL, no_interval(len(seeds)), len(seeds))
    sums = seed_pair_sums(x, y, point_seeds, seeds)
    return tau, expanded_percentile_interval(tau_b_of_counts(sums, draws), len(seeds), TAU_RESAMPLED)


# ------------------------------------------------------------------ the table

@dataclass
class Row:
    measure: str
    label: str
    source: str
    n: int  # fitted runs with this measure
    tau: float | None
    tau_interval: Interval | None
    psi: float | None
    psi_interval: Interval | None
    psi_axes: dict = field(default_factory=dict)  # axis -> psi_i (None: no group varies it alone)
    groups: dict = field(default_factory=dict)  # axis -> groups with a defined tau
    # tau of the measure against a training choice over the same runs (Andriushchenko et al. 2023: a measure
    # can follow the learning rate, not the gap); None where that choice does not vary among the runs
    tau_lr: float | None = None
    tau_lr_interval: Interval | None = None
    tau_batch: float | None = None
    tau_batch_interval: Interval | None = None


@dataclass
class Correlation:
    target: str
    target_label: str
    axes: list  # the axes that vary among the runs used
    seeds: list
    runs_total: int
    runs_used: int
    left_out: dict  # reason -> count
    sources: list  # the studies read
    rows: list  # list[Row], ranked by Psi (largest first, undefined last)
    method: str
    points: dict = field(default_factory=dict)  # measure -> [[run, seed, batch_size, lr, value, target], ...]


def _hyper(r: RunResult, study: str, regimes: dict) -> dict:
    values = {a: getattr(r, a) for a in AXES if a not in ("settings", "study")}
    values["settings"] = {k: v for k, v in regimes.get(r.regime, {}).items()
                          if k not in ("name", "batch_size", *AXES)}
    values["study"] = study
    return {a: v if isinstance(v, (int, float, str)) or v is None else json.dumps(v, sort_keys=True)
            for a, v in values.items()}


def correlate(results: list[tuple[str, Results]], target: str = "gap", n_boot: int = N_BOOT) -> Correlation:
    """Tau and Psi of every measure the runs carry against ``target`` (a key of :data:`TARGETS`).

    ``results``: ``(name, Results)`` per study output. Runs with the same id in several outputs count once."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, not {target!r}")
    label, value_of = TARGETS[target]
    seen, runs, left = set(), [], Counter()
    for name, res in results:
        for r in res.runs:
            if r.id in seen:
                continue
            seen.add(r.id)
            if not r.ok:
                left["diverged"] += 1
            elif r.train is None or r.test is None:
                left["not measured"] += 1
            elif r.train.accuracy < FITTED:
                left[f"not fitted (train accuracy < {100 * FITTED:.0f}%)"] += 1
            else:
                runs.append((name, r))
    regimes = {name: {g.get("name"): g for g in res.study.get("regimes", [])} for name, res in results}
    all_hyper = [_hyper(r, name, regimes[name]) for name, r in runs]
    axes = [a for a in AXES if len({h[a] for h in all_hyper}) >= 2]
    seeds = sorted({r.seed for _, r in runs})
    draws = seed_resamples(len(seeds), n_boot) if len(seeds) >= MIN_SEEDS else None
    rows, points_out = [], {}
    for m in measures_of([r for _, r in runs]):
        pts = [Point(r.id, r.seed, h, r.batch_size, r.lr, float(value_of(r)), float(v))
               for (name, r), h in zip(runs, all_hyper) if (v := m.pick(r)) is not None and math.isfinite(v)]
        points_out[m.key] = [[p.run, p.seed, p.batch_size, p.lr, p.value, p.target] for p in pts]
        if len(pts) < 3:
            rows.append(Row(m.key, m.label, m.source, len(pts), None, None, None, None))
            continue
        tau = kendall_tau_b([p.value for p in pts], [p.target for p in pts])
        parts = _psi_parts(pts, axes)
        psi_point, axes_point = psi_of_counts(parts, seeds, np.ones(len(seeds)))
        psi = None if math.isnan(psi_point[0]) else float(psi_point[0])
        per_axis = {a: None if math.isnan(v) else float(v) for a, v in zip(parts, axes_point[0])}
        if draws is None:
            tau_iv = psi_iv = Interval(None, None, LEVEL, no_interval(len(seeds)), len(seeds))
        else:
            # every seed of the fitted runs is a column, also one where this measure is missing on every run
            sums = seed_pair_sums([p.value for p in pts], [p.target for p in pts], [p.seed for p in pts], seeds)
            tau_iv = expanded_percentile_interval(tau_b_of_counts(sums, draws), len(seeds), TAU_RESAMPLED)
            psi_iv = expanded_percentile_interval(psi_of_counts(parts, seeds, draws)[0], len(seeds), PSI_RESAMPLED)
        (tau_lr, tau_lr_iv), (tau_b, tau_b_iv) = (
            _tau_with_interval([p.value for p in pts], [choice(p) for p in pts], [p.seed for p in pts], seeds, draws)
            for choice in (lambda p: p.lr, lambda p: p.batch_size))
        rows.append(Row(m.key, m.label, m.source, len(pts), None if math.isnan(tau) else tau,
                        tau_iv if not math.isnan(tau) else None, psi, psi_iv if psi is not None else None,
                        per_axis, {a: len(g) for a, g in parts.items()}, tau_lr, tau_lr_iv, tau_b, tau_b_iv))
    rows.sort(key=lambda row: (row.psi is None, -(row.psi if row.psi is not None else 0.0)))
    return Correlation(
        target=target, target_label=label, axes=axes, seeds=seeds, runs_total=len(seen), runs_used=len(runs),
        left_out=dict(left), sources=[name for name, _ in results], rows=rows, points=points_out,
        method=("Kendall's tau-b over the fitted runs; Psi (Jiang et al. 2019): the mean over the varying axes "
                "of the mean tau within the sets of runs where only that axis varies (the seed held fixed); "
                "measures oriented as complexities (positive = ranks the gap as the measure's theory predicts); "
                "τ lr and τ batch: Kendall's tau-b of the measure against the run's learning rate and batch size "
                "over the same runs, with the same seed bootstrap (a measure whose τ against a training choice is "
                "as large as its τ against the gap may follow that choice rather than generalization, as "
                "Andriushchenko et al. 2023 found for sharpness and the learning rate)"),
    )
