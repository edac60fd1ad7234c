"""Each edge-of-stability run against its stability threshold, and the findings stated from those numbers.

For a run with step size eta the threshold is 2/eta for GD and SGD (the largest lambda_max at which gradient
descent on a quadratic does not diverge) and (2 + 2 beta1) / ((1 - beta1) eta) for Adam's preconditioned
sharpness (Cohen et al. 2022). With r_t = (tracked sharpness at step t) / threshold:

* ``reached_at``: the first measured step with r_t >= REACH (0.9), else None;
* ``peak``: max r_t;
* ``median_after``, ``within_after``: the median of r_t over the measurements from ``reached_at`` on, and the
  fraction of them in [HOVER_LOW, HOVER_HIGH] = [0.8, 1.25];
* ``hovers``: reached, and at least 3/4 of the measurements from then on within that band;
* ``left_at``, ``left_loss``: after reaching, the first measured step from which every r_t is below HOVER_LOW
  (the sharpness left the edge for good, as with cross-entropy when the loss goes to zero), and the loss there;
* ``settled``: the median r_t over the last quarter of the measurements, ``settled_range`` their min and max
  (one seed: the spread along the run, not an interval over seeds).
"""
from __future__ import annotations

import statistics

REACH = 0.9
HOVER_LOW, HOVER_HIGH = 0.8, 1.25
HOVER_SHARE = 0.75


def threshold(spec: dict, beta1: float) -> float:
    """The stability threshold: 2/eta for GD and SGD, (2 + 2 beta1) / ((1 - beta1) eta) for Adam.

    Args:
        spec: a run (``optimizer``, ``lr`` = eta).
        beta1: Adam's first-moment decay.

    Returns:
        The threshold.
    """
    if spec["optimizer"] == "adam":
        return (2 + 2 * beta1) / ((1 - beta1) * spec["lr"])
    return 2 / spec["lr"]


def summarize(record: dict, beta1: float) -> dict:
    """A run's record with ``threshold``, ``tracked`` (the sharpness held against it) and ``summary`` (the module
    docstring's numbers) added.

    Args:
        record: a run's record (:func:`edge_of_stability.run_one`).
        beta1: Adam's first-moment decay.

    Returns:
        A new dict.
    """
    thr = threshold(record, beta1)
    tr = record["trace"]
    tracked = "preconditioned_sharpness" if record["optimizer"] == "adam" else "sharpness"
    pairs = [(t, v / thr) for t, v in zip(tr["steps"], tr[tracked]) if v is not None]
    summary = {"peak": None, "reached_at": None, "median_after": None, "within_after": None, "hovers": False,
               "left_at": None, "left_loss": None, "settled": None, "settled_range": None, "final_loss": tr["loss"][-1],
               "final_accuracy": tr["accuracy"][-1], "diverged_at": tr["diverged_at"],
               "unconverged_lanczos": sum(1 for c in tr["converged"] if not c)}
    if pairs:
        ratios = [r for _, r in pairs]
        summary["peak"] = max(ratios)
        first = next((i for i, r in enumerate(ratios) if r >= REACH), None)
        if first is not None:
            after = ratios[first:]
            summary["reached_at"] = pairs[first][0]
            summary["median_after"] = statistics.median(after)
            summary["within_after"] = sum(HOVER_LOW <= r <= HOVER_HIGH for r in after) / len(after)
            summary["hovers"] = summary["within_after"] >= HOVER_SHARE
            below = len(ratios)
            while below > first and ratios[below - 1] < HOVER_LOW:
                below -= 1
            if below < len(ratios):
                summary["left_at"] = pairs[below][0]
                summary["left_loss"] = tr["loss"][tr["steps"].index(pairs[below][0])]
        last = ratios[-max(1, len(ratios) // 4):]
        summary["settled"], summary["settled_range"] = statistics.median(last), [min(last), max(last)]
    return {**record, "threshold": thr, "tracked": tracked, "summary": summary}


def _run_sentence(r: dict, line: str) -> str:
    s = r["summary"]
    if s["diverged_at"] is not None:
        return f"{r['label']}: diverged at step {s['diverged_at']}"
    if s["peak"] is None:
        return f"{r['label']}: no sharpness measured"
    if s["reached_at"] is None:
        return f"{r['label']}: never reached {line} (peak {s['peak']:.2f}x, last quarter {s['settled']:.2f}x)"
    verb = "hovered" if s["hovers"] else "did not stay"
    left = (f"; below {HOVER_LOW}x for good from step {s['left_at']} (training loss {s['left_loss']:.3g})"
            if s["left_at"] is not None else "")
    return (f"{r['label']}: reached {line} at step {s['reached_at']} (peak {s['peak']:.2f}x) and {verb} there: "
            f"median {s['median_after']:.2f}x from then on, {100 * s['within_after']:.0f}% of the measurements "
            f"within [{HOVER_LOW}, {HOVER_HIGH}]x{left}; last quarter {s['settled']:.2f}x")


def findings(doc: dict) -> dict:
    """The finding in words, every word from the numbers of the summarized runs.

    Args:
        doc: the study's results (``settings`` and summarized ``runs``).

    Returns:
        ``{loss: [sentence, ...]}``.
    """
    out = {}
    for loss in doc["settings"]["losses"]:
        runs = [r for r in doc["runs"] if r["loss"] == loss]
        gd = [r for r in runs if r["optimizer"] == "gd"]
        sgd = sorted((r for r in runs if r["optimizer"] == "sgd"), key=lambda r: r["batch_size"])
        adam = [r for r in runs if r["optimizer"] == "adam"]
        lines = [_run_sentence(r, "2/eta") for r in gd]
        hovered = sum(r["summary"]["hovers"] for r in gd)
        lines.append(f"GD: {hovered} of {len(gd)} step sizes reached 2/eta and hovered there.")
        lines += [_run_sentence(r, "2/eta") for r in sgd]
        settled = [r["summary"]["settled"] for r in sgd if r["summary"]["settled"] is not None]
        spans = [r["summary"]["settled_range"] for r in sgd if r["summary"]["settled"] is not None]
        gd_same = [r["summary"]["settled"] for r in gd if r["lr"] == (sgd[0]["lr"] if sgd else None)]
        if len(settled) == len(sgd) >= 2:
            order = ("rising with the batch size" if all(a < b for a, b in zip(settled, settled[1:]))
                     else "not monotone in the batch size")
            order += "".join(f"; batch {p['batch_size']}'s range {'below' if a[1] < b[0] else 'overlapping'} "
                             f"batch {q['batch_size']}'s" for a, b, p, q in zip(spans, spans[1:], sgd, sgd[1:]))
            ref = f"; GD at the same step size: {gd_same[0]:.2f}x" if gd_same and gd_same[0] is not None else ""
            lines.append(f"SGD (eta = {sgd[0]['lr']:g}) settles at "
                         + ", ".join(f"{v:.2f}x [{lo:.2f}, {hi:.2f}] (batch {r['batch_size']})"
                                     for v, (lo, hi), r in zip(settled, spans, sgd))
                         + f" of 2/eta over the last quarter (median [min, max]): {order}{ref}.")
        for r in adam:
            lines.append(_run_sentence(r, "(2 + 2 beta1)/((1 - beta1) eta)").replace(r["label"], r["label"]
                         + " (preconditioned sharpness)", 1))
            raw = [v for v in r["trace"]["sharpness"] if v is not None]
            if raw:
                lines.append(f"{r['label']}: the raw lambda_max peaks at {max(raw):.3g}, "
                             f"{max(raw) * r['lr'] / 2:.3g}x 2/eta.")
        out[loss] = lines
    return out
