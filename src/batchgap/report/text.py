"""How the report words numbers: mean ± std, p-values, intervals, and verdicts that never claim more than
the interval allows."""
from __future__ import annotations

from ..results import Interval, Ratio, Stat

# "about the same" needs the whole interval inside this band around 1
SAME = (0.8, 1.25)


def pm(stat: Stat | None, scale: float = 1.0, digits: int = 3, fixed: bool = False) -> str:
    """``mean ± std`` over seeds; ``± n/a`` for one seed (no spread to show), ``n/a`` for none."""
    if stat is None or stat.mean is None:
        return "n/a"
    f = (lambda v: f"{v * scale:.{digits}f}") if fixed else (lambda v: f"{v * scale:.{digits}g}")
    return f"{f(stat.mean)} ± {f(stat.std) if stat.n > 1 else 'n/a'}"


def p_value(p: float) -> str:
    """Two significant digits: five seeds do not support more."""
    return f"{p:.2g}"


def interval(iv: Interval | None, fmt: str = ".3g", unit: str = "") -> str:
    if iv is None or iv.lo is None:
        return f"no interval: {iv.method.removesuffix(': no interval')}" if iv is not None else "no interval"
    return f"{int(100 * iv.level)}% interval [{iv.lo:{fmt}}{unit}, {iv.hi:{fmt}}{unit}]"


def verdict(r: Ratio | None, higher: str = "higher", lower: str = "lower") -> str:
    """What the LB/SB ratio's interval allows: ``higher`` only when it excludes 1 from above, ``lower``
    from below, "about the same" only when it lies within :data:`SAME`, else undetermined."""
    iv = r.interval if r is not None else None
    n = iv.n if iv is not None else 0
    if iv is None or iv.lo is None:
        return f"undetermined with {n} seed{'s' if n != 1 else ''}"
    if iv.lo > 1:
        return higher
    if iv.hi < 1:
        return lower
    if SAME[0] <= iv.lo and iv.hi <= SAME[1]:
        return "about the same"
    return f"undetermined with {n} seeds"


def ratio_text(r: Ratio | None) -> str:
    """``55.6× (95% interval [38.2×, 80.1×])``."""
    if r is None or r.value is None:
        return "n/a"
    return f"{r.value:.3g}× ({interval(r.interval, '.3g', '×')})"
