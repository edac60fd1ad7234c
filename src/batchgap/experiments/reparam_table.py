"""The ``reparametrization`` study's numbers: each measure's ratio to its untransformed value at every factor,
whether it is invariant (to a stated tolerance), and whether the large-batch / small-batch ordering holds.

A measure is read from a record's geometry as :mod:`batchgap.correlate` reads it from a run (the same keys,
labels and orientation: a flatness enters as 1/sigma^2), plus the gradient noise scale, the spectral density's
lambda_max, the filter-normalized loss curves (the mean of their points, and every point for the invariance
verdict) and the training loss and test accuracy (the function itself: invariant by construction).

* ratio(run, transform, alpha) = value after the transform / value as trained (for a measure that is a log of a
  product of norms, :data:`LOG_KEYS`, the ratio of the products: exp(difference));
* invariant under a transform: |ratio - 1| <= tolerance for every factor and run (for the curves, every point's
  loss within tolerance x the curve's largest loss);
* ordering: per seed, the sign of value(large batch) - value(small batch) as trained; "holds at every factor"
  when both solutions transformed by the same alpha keep that sign at every factor and seed; "holds across
  factors" when it also survives transforming the two solutions by different factors (SB at alpha, LB at beta,
  for every pair of the factors and 1): Dinh et al.'s point is that a reparametrization of one solution alone
  can reverse a sharpness comparison.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

from ..correlate import measures_of

EXTRA = (
    ("noise_scale", "gradient noise scale B_simple", lambda g: (g.get("noise_scale") or {}).get("b_simple")),
    ("density_lambda_max", "spectral density λ_max (SLQ)", lambda g: (g.get("density") or {}).get("lambda_max")),
    ("curves", "filter-normalized loss curves (mean loss over their points)",
     lambda g: _mean_curve(g.get("curves"))),
)


def _mean_curve(c):
    if not c:
        return None
    values = [v for row in c["loss"] for v in row]
    return sum(values) / len(values)


class _Run(SimpleNamespace):
    """A record seen as :mod:`batchgap.correlate` sees a run."""

    def sharpness(self, eps, subspace_dim=None):
        for e in (self.geometry or {}).get("sharpness", []):
            if e["eps"] == eps and e.get("subspace_dim") == subspace_dim:
                return e["value"]
        return None


def values(records: list[dict]) -> tuple[list[tuple[str, str, str]], list[dict]]:
    """Every measure the records carry: ``([(key, label, source)], [{key: value} per record])``."""
    runs = [_Run(geometry=r["geometry"], distance_from_init=None) for r in records]
    measures = measures_of(runs)
    keys = [("train_loss", "training loss (the function: invariant by construction)", "the check"),
            ("test_accuracy", "test accuracy (the function)", "the check")]
    keys += [(m.key, m.label, m.source) for m in measures]
    keys += [(k, label, "batchgap.measure.geometry") for k, label, pick in EXTRA
             if any(pick(r["geometry"]) is not None for r in records)]
    out = []
    for rec, run in zip(records, runs):
        v = {"train_loss": rec["train"]["loss"], "test_accuracy": rec["test"]["accuracy"]}
        v.update({m.key: m.pick(run) for m in measures})
        v.update({k: pick(rec["geometry"]) for k, _, pick in EXTRA})
        out.append(v)
    return keys, out


# measures that are logarithms (of products of norms): their ratio is that of the products, exp(value - base)
LOG_KEYS = ("log_prod_of_fro", "log_prod_of_spec", "spectral_margin")


def ratio(value, base, log: bool = False) -> float | None:
    """value / base (``log``: exp(value - base)); 1 when both are 0; None when either is missing or not finite,
    or base alone is 0."""
    if value is None or base is None or not math.isfinite(value) or not math.isfinite(base):
        return None
    if log:
        return math.exp(value - base)
    if base == 0:
        return 1.0 if value == 0 else None
    return value / base


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _curve_deviation(rec: dict, base: dict) -> float | None:
    a, b = (rec["geometry"].get("curves"), base["geometry"].get("curves"))
    if not a or not b:
        return None
    scale = max(abs(v) for row in b["loss"] for v in row) or 1.0
    return max(abs(x - y) for ra, rb in zip(a["loss"], b["loss"]) for x, y in zip(ra, rb)) / scale


def summarize(records: list[dict], settings, compare: list) -> dict:
    """The ratios, the invariance verdicts and the orderings (module docstring) as plain data for results.json.

    Args:
        records: the measurement records (``kind`` "none" at alpha 1 for each run, then the transforms).
        settings: the study's ReparamSettings (factors, transforms, tolerance).
        compare: [small-batch regime, large-batch regime].

    Returns:
        ``{"tolerance", "factors", "transforms", "output_change_max", "rows": [...]}``; a row per measure:
        key, label, source, ``ratios[transform][alpha]`` (one per run), ``max_deviation[transform]``,
        ``invariant[transform]``, ``ordering``: the untransformed sign per seed, ``same_factor[transform]``,
        ``across_factors[transform]`` (True, False, or None when undetermined)."""
    keys, vals = values(records)
    base = {(r["run"]): i for i, r in enumerate(records) if r["kind"] == "none"}
    by = {(r["run"], r["kind"], r["alpha"]): i for i, r in enumerate(records)}
    runs = {r["run"]: (r["seed"], r["regime"]) for r in records}
    sb_lb = {}
    for run_id, (seed, regime) in runs.items():
        if regime in compare:
            sb_lb.setdefault(seed, {})[compare.index(regime)] = run_id
    pairs = {seed: (d[0], d[1]) for seed, d in sb_lb.items() if len(d) == 2}
    alphas = [1.0, *settings.factors]
    rows = []
    for key, label, source in keys:
        row = {"key": key, "label": label, "source": source, "ratios": {}, "max_deviation": {}, "invariant": {},
               "same_factor": {}, "across_factors": {}}
        for kind in settings.transforms:
            row["ratios"][kind], devs = {}, []
            for a in settings.factors:
                rs = []
                for run_id, i0 in base.items():
                    i = by.get((run_id, kind, a))
                    rs.append(None if i is None else ratio(vals[i][key], vals[i0][key], key in LOG_KEYS))
                    if key == "curves" and i is not None:
                        devs.append(_curve_deviation(records[i], records[i0]))
                row["ratios"][kind][f"{a:g}"] = rs
                devs += [None if x is None else abs(x - 1) for x in rs] if key != "curves" else []
            complete = devs and all(d is not None for d in devs)
            row["max_deviation"][kind] = max(devs) if complete else None
            row["invariant"][kind] = None if not complete else max(devs) <= settings.tolerance
            row["same_factor"][kind], row["across_factors"][kind] = _ordering(vals, by, pairs, key, kind, alphas)
        row["ordering"] = {str(seed): _sign(vals[by[(lb, "none", 1.0)]][key] - vals[by[(sb, "none", 1.0)]][key])
                           if _known(vals, by, [(sb, "none", 1.0), (lb, "none", 1.0)], key) else None
                           for seed, (sb, lb) in pairs.items()}
        rows.append(row)
    return {"tolerance": settings.tolerance, "factors": settings.factors, "transforms": settings.transforms,
            "output_change_max": max((r["output_change"] for r in records), default=0.0), "rows": rows,
            "pairs": {str(seed): list(p) for seed, p in pairs.items()}}


def _known(vals, by, where, key) -> bool:
    return all(w in by and vals[by[w]][key] is not None and math.isfinite(vals[by[w]][key]) for w in where)


def _ordering(vals, by, pairs, key, kind, alphas) -> tuple[bool | None, bool | None]:
    """(same factor, across factors) for one measure and transform over every seed's pair; None when a value is
    missing or the untransformed values tie."""
    same, across = True, True
    for sb, lb in pairs.values():
        at = {a: (sb, "none" if a == 1.0 else kind, a) for a in alphas}
        lb_at = {a: (lb, "none" if a == 1.0 else kind, a) for a in alphas}
        if not _known(vals, by, list(at.values()) + list(lb_at.values()), key):
            return None, None
        v_sb = {a: vals[by[w]][key] for a, w in at.items()}
        v_lb = {a: vals[by[w]][key] for a, w in lb_at.items()}
        s0 = _sign(v_lb[1.0] - v_sb[1.0])
        if s0 == 0:
            return None, None
        same &= all(_sign(v_lb[a] - v_sb[a]) == s0 for a in alphas)
        across &= all(_sign(v_lb[b] - v_sb[a]) == s0 for a in alphas for b in alphas)
    if not pairs:
        return None, None
    return same, across
