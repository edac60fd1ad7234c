"""What ``--set KEY=VALUE``, ``--quick`` and ``--paper-scale`` do to a study as parsed from its TOML file:
dotted keys set in the plain data, before :func:`batchgap.config.from_dict` validates it."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from .errors import UserError, closest


def read_toml(path: Path) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such study file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read study file ({e})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None


def parse_set(assignment: str) -> tuple[str, Any]:
    """``"train.epochs=5"`` -> ``("train.epochs", 5)``; the value is read as TOML, else as a bare string."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9_+-]+(\.[A-Za-z0-9_.+-]+)*", key):
        raise UserError(f"--set {assignment!r}: expected KEY=VALUE, "
                        "e.g. train.epochs=5 or regimes.LB.batch_size=\"5%\"")
    text = text.strip()
    if not text:
        raise UserError(f"--set {assignment!r}: missing value after '='")
    try:
        return key, tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if re.fullmatch(r"[A-Za-z0-9_.%+/-]+", text):
            return key, text  # a bare word: a name, a path, a percentage
        raise UserError(f"--set {assignment!r}: cannot read the value {text!r} "
                        "(use TOML syntax, e.g. \"text\", 3, [1, 2])") from None


def apply_set(raw: dict, key: str, value: Any) -> None:
    """Set a dotted key in the raw study dict; ``regimes.NAME.field`` addresses a regime by name."""
    parts = key.split(".")
    if parts[0] == "regimes" and len(parts) >= 3:
        regimes = raw.get("regimes") or []
        names = [r.get("name") for r in regimes if isinstance(r, dict)]
        for r in regimes:
            if isinstance(r, dict) and r.get("name") == parts[1]:
                _set_path(r, parts[2:], value, key)
                return
        raise UserError(f"--set {key}: no regime named {parts[1]!r}{closest(parts[1], names)}; "
                        f"regimes: {', '.join(map(str, names))}")
    _set_path(raw, parts, value, key)


def _set_path(d: dict, parts: list[str], value: Any, key: str) -> None:
    for p in parts[:-1]:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise UserError(f"--set {key}: {p!r} is not a table")
        d = nxt
    d[parts[-1]] = value


GENERIC_QUICK = {
    "train.epochs": 2, "data.train_subset": 512, "data.test_subset": 256,
    "measure.sharpness_eps": [1e-3], "measure.sharpness_max_iter": 3, "measure.sharpness_subspace_dim": 10,
    "measure.hessian_trace_probes": 3, "measure.curve_directions": 2, "measure.curve_points": 7,
    "measure.surface_points": 5, "measure.noise_scale_batches": 20, "measure.hessian_max_hvp": 10,
    "measure.density_steps": 6, "measure.density_vectors": 2, "measure.flatness_samples": 4,
}


def quick_overrides(raw: dict) -> dict:
    """What --quick sets: a few epochs, a slice of the data, two seeds; the study's [quick] table wins."""
    out = dict(GENERIC_QUICK)
    seeds = raw.get("seeds", [0, 1, 2])
    if isinstance(seeds, list) and len(seeds) > 2:
        out["seeds"] = seeds[:2]
    quick = raw.get("quick", {})
    if isinstance(quick, dict):
        out.update(quick)
    return out
