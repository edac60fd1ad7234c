"""The critical-batch study's noise-scale and branching records gathered per checkpoint (plain data for
results.json and the report)."""
from __future__ import annotations

import math


PROTOCOL = {
    "loss": "mean cross-entropy over the whole training set (data.train_subset when set), float32",
    "training": "plain SGD, constant learning rate, no momentum or weight decay; a seeded permutation per epoch, "
                "the last partial batch dropped; the seed also draws the initialization",
    "steps_to_target": "the first checked step with full-data loss <= target; checked at steps 1, 2, ... then on a "
                       "geometric grid of ratio check_ratio (an upper bound within that factor); runs stop at "
                       "max_steps or when the loss exceeds blowup x its initial value (diverged)",
    "lr_retuning": "per batch size and target the learning rate of the grid with the fewest steps averaged over "
                   "seeds, counted only where every seed reached the target (Shallue et al. 2019)",
    "fit": "S(B) = S_min (1 + B_crit / B) by least squares on log S over the batch sizes that reached the target "
           "(at least 3); E_min = S_min B_crit; percentile bootstrap over seeds (lr re-chosen per resample)",
    "b_simple": "tr(Sigma) / |G|^2 exactly from every per-example gradient (population covariance), "
                "batchgap.landscape.noise.exact_gradient_noise_scale",
    "b_noise": "tr(H Sigma) / (G^T H G), H the full-data Hessian; G^T H G exact (one HVP); tr(H Sigma) = mean over "
               "`probes` examples drawn without replacement of (g_i - G)^T H (g_i - G), Student-t interval with "
               "the finite-population correction; per seed at the reference run's iterates",
    "branching": "from the first seed's reference run (init and where it reaches each target): plain SGD at each "
                 "batch size for branch_examples // B steps at each lr of the grid, the lowest final full-data "
                 "loss kept; local critical batch = the largest B such that every batch up to it keeps at least "
                 "(1 - branch_tol) of the smallest batch's loss decrease",
    "threads": "1 torch thread per job",
}


def _finite(v):
    return v is not None and math.isfinite(v)


def local_critical_batch(sizes: list[int], start: float, losses: list, tol: float) -> tuple[int | None, list]:
    """The largest batch size B such that every branch up to it keeps at least (1 - tol) of the smallest batch's
    loss decrease: L_B <= L_0 + tol (start - L_0), L_0 the smallest batch's final loss.

    Args:
        sizes: the batch sizes, increasing; ``losses[i]`` belongs to ``sizes[i]``.
        start: the loss at the checkpoint the branches start from.
        losses: each branch's final loss (None: diverged at every learning rate).
        tol: the tolerance, a fraction of the smallest batch's decrease.

    Returns:
        ``(B_local or None, keeps per batch size)``; None when the smallest batch's branch made no progress
        (its final loss not below ``start``) or diverged.
    """
    base = losses[0]
    if not _finite(base) or not base < start:
        return None, [None] * len(sizes)
    bound = base + tol * (start - base)
    keeps = [_finite(v) and v <= bound for v in losses]
    best = None
    for b, keep in zip(sizes, keeps):
        if not keep:
            break
        best = b
    return best, keeps


def summarize(noise: list[dict], branches: list[dict], s, sizes: list[int]) -> dict:
    """The noise scales and branches per checkpoint (None: initialization; else the target reached there).

    Args:
        noise: the noise jobs' records (seed, target, loss, b_simple, b_noise, ...).
        branches: the branch jobs' records (target, batch, losses per learning rate).
        s: the settings (seeds, lrs, branch_tol).
        sizes: the batch sizes.

    Returns:
        ``{"noise": the records, "scales": per checkpoint the per-seed values, their means and the envelope of
        the B_noise intervals, "branching": per checkpoint each batch size's best loss and lr, keeps, B_local and
        B_simple (first seed)}``.
    """
    points = []
    for rec in noise:
        if rec["target"] not in points:
            points.append(rec["target"])
    scales = []
    for t in points:
        recs = [r for r in noise if r["target"] == t]
        simple = [r["b_simple"] for r in recs]
        bn = [r["b_noise"] for r in recs]
        values = [v["b_noise"] for v in bn if v["b_noise"] is not None]
        lows = [v["ci_low"] for v in bn if v["ci_low"] is not None]
        highs = [v["ci_high"] for v in bn if v["ci_high"] is not None]
        scales.append({"checkpoint": t, "seeds": [r["seed"] for r in recs], "loss": [r["loss"] for r in recs],
                       "b_simple": simple, "b_noise": [v["b_noise"] for v in bn],
                       "b_simple_mean": _mean([v for v in simple if v is not None]), "b_noise_mean": _mean(values),
                       "b_noise_envelope": [min(lows), max(highs)] if lows and len(values) == len(bn) else None})
    branching = []
    for t in points:
        recs = {r["batch"]: r for r in branches if r["target"] == t}
        if len(recs) != len(sizes):
            continue
        start = next(r["loss"] for r in noise if r["target"] == t and r["seed"] == s.seeds[0])
        best, lrs = [], []
        for b in sizes:
            ok = [(v, lr) for v, lr in zip(recs[b]["losses"], s.lrs) if _finite(v)]
            v, lr = min(ok) if ok else (None, None)
            best.append(v)
            lrs.append(lr)
        b_local, keeps = local_critical_batch(sizes, start, best, s.branch_tol)
        simple = next(r["b_simple"] for r in noise if r["target"] == t and r["seed"] == s.seeds[0])
        branching.append({"checkpoint": t, "start_loss": start, "losses": best, "lr": lrs, "keeps": keeps,
                          "b_local": b_local, "b_simple": simple, "seed": s.seeds[0]})
    return {"noise": noise, "scales": scales, "branching": branching}


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None
