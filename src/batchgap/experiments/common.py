"""What the three experiments (critical-batch, edge-of-stability, reparametrization) share, written once.

Each experiment's ``load`` reads its study file through :func:`load_study`: checked as written, then with
``--quick`` and ``--set``. What differs (each study's settings, jobs, numbers and report) stays in its own modules.
"""
from __future__ import annotations

import copy
from pathlib import Path

from ..config import read_toml
from ..errors import UserError, closest
from ..overrides import apply_set, parse_set


def load_study(path, quick: bool, sets, top_keys: tuple, check) -> tuple:
    """The study file checked as written, then with ``--quick`` (its ``[quick]`` table) and ``--set`` applied.

    Args:
        path: the study file.
        quick: apply its ``[quick]`` table.
        sets: ``"key=value"`` assignments, applied last.
        top_keys: the top-level keys the study's file may hold.
        check: the study's ``check(raw, where) -> (StudyConfig, settings)``.

    Returns:
        ``(raw dict, StudyConfig, settings)``, the StudyConfig's ``root`` the study file's directory unless the
        file sets one; a mistake raises a one-line UserError.
    """
    path = Path(path)
    raw = read_toml(path)
    for key in raw:
        if key not in top_keys:
            raise UserError(f"{path}: {key}: unknown key{closest(key, top_keys)}; allowed: {', '.join(top_keys)}")
    check(raw, str(path))  # as written: a mistake is refused even where --quick overrides it
    raw = copy.deepcopy(raw)
    if quick:
        table = raw.get("quick", {})
        if not isinstance(table, dict):
            raise UserError(f"{path}: quick: expected a table of dotted keys, got {table!r}")
        for key, value in table.items():
            apply_set(raw, key, value)
    for assignment in sets:
        apply_set(raw, *parse_set(assignment))
    cfg, settings = check(raw, str(path))
    raw.setdefault("root", str(path.resolve().parent))
    cfg.root = raw["root"]
    return raw, cfg, settings
