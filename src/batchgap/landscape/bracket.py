"""The bracket search of the flatness measures: the largest x in a range with g(x) <= delta, for an estimate g
that is deterministic in x (common random numbers) and roughly a power of x near a minimum."""
from __future__ import annotations

import math
from typing import Callable


def crossing(estimate: Callable[[float], float], start: float, bounds: tuple[float, float], delta: float,
             rtol: float, name: str, power: float = 2.0):
    """The largest x tried with estimate(x) <= delta, bracketed to hi / lo <= 1 + rtol.

    Args:
        estimate: g(x); a non-finite value counts as above delta.
        start: the first x (clipped to ``bounds``).
        bounds: (low, high), the range searched.
        delta: the level.
        rtol: the bracket's relative width at the end.
        name: the variable's name in the reason ("sigma", "alpha").
        power: the local power law that guides the steps.

    Returns:
        ``(lo, hi, trace, reason)``: lo the largest x tried with g <= delta, hi the smallest tried above it,
        trace every (x, g) in order; lo = hi = None and a reason when there is no crossing inside ``bounds``.
        If g is not monotone the bracket holds one crossing, not necessarily the first.

    Cost: at most about twice bisection's evaluations of ``estimate`` whatever g is (below).

    Steps are guided by the local power law g ~ x^power (a minimum: the rise is quadratic in the
    perturbation's size): from a point (x, g) the predicted crossing is x (delta / g)^(1/power), and
    inside a bracket [lo, hi] the log-log interpolation of the endpoints. Each proposal aims a factor
    (1 + rtol)^(1/2) past the prediction, to the side of the bracket's end it should replace, so an
    accurate prediction closes the bracket to hi / lo <= 1 + rtol in two evaluations; after a step that did
    not halve the bracket's log-width the next is the bisection point sqrt(lo hi), so the search takes
    at most about twice bisection's steps whatever g is."""
    low, high = bounds
    trace: list[tuple[float, float]] = []
    lo = hi = None
    g_lo = g_hi = None
    half = math.sqrt(1 + rtol)

    def below(x: float) -> bool:
        v = float(estimate(x))
        trace.append((x, v))
        return math.isfinite(v) and v <= delta

    def predicted(x: float, v: float) -> float | None:
        return x * (delta / v) ** (1 / power) if math.isfinite(v) and v > 0 else None

    x = min(max(start, low), high)
    while lo is None or hi is None:  # bracket: move toward the predicted crossing, at most 4x per step
        if below(x):
            lo, g_lo = x, trace[-1][1]
            if lo >= high:
                return None, None, trace, (f"the rise stays at or below delta = {delta:g} up to the largest {name} "
                                           f"of the range, {high:g} ({trace[-1][1]:.6g}): no crossing in range")
            r = predicted(x, g_lo)
            x = min(max(r * half if r else 4 * x, x * (1 + rtol)), 4 * x, high)
        else:
            hi, g_hi = x, trace[-1][1]
            if hi <= low:
                return None, None, trace, (f"the rise exceeds delta = {delta:g} already at the smallest {name} of "
                                           f"the range, {low:g} ({trace[-1][1]:.6g}): no crossing in range")
            r = predicted(x, g_hi)
            x = max(min(r / half if r else x / 4, x / (1 + rtol)), x / 4, low)
    bisect_next = False
    while hi / lo > 1 + rtol:  # close: interpolate in log-log, aim past the prediction, bisect as a safeguard
        width = math.log(hi / lo)
        if not bisect_next and g_lo > 0 and math.isfinite(g_hi) and g_hi > g_lo:
            t = (math.log(delta) - math.log(g_lo)) / (math.log(g_hi) - math.log(g_lo))
            r = math.exp(math.log(lo) + t * width)
            # aim past the prediction, away from the bracket's nearer end, which then stays
            x = r * half if math.log(r / lo) < math.log(hi / r) else r / half
            x = min(max(x, lo * (1 + 1e-9)), hi / (1 + 1e-9))
        else:
            x = math.sqrt(lo * hi)
        if below(x):
            lo, g_lo = x, trace[-1][1]
        else:
            hi, g_hi = x, trace[-1][1]
        bisect_next = math.log(hi / lo) > width / 2  # an interpolation that did not halve the bracket
    return lo, hi, trace, None


def is_monotone(trace) -> bool:
    """Whether g was nondecreasing over the x tried, in increasing x (a non-finite g as +inf)."""
    values = [v if math.isfinite(v) else math.inf for _, v in sorted(trace)]
    return all(a <= b for a, b in zip(values, values[1:]))
