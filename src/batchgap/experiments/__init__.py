"""Built-in studies that are not "regimes x seeds of one training recipe": each is a module here.

A study file with a top-level key ``experiment = "KIND"`` is run by the module ``batchgap.experiments.KIND``
(dashes as underscores) instead of :func:`batchgap.study.run_study`. The module provides

* ``run(path, out, *, quick, sets, jobs, progress, log, force) -> Path``: runs the study file ``path``
  (``--quick``, ``--set`` assignments, ``--jobs``), resumes what ``out`` already holds, writes
  ``out/results.json`` (with ``"experiment": KIND`` at its top level) and the report, and returns the
  report's path;
* ``report(out) -> Path``: redraws the report from ``out/results.json``;
* ``show(path, *, quick, sets) -> dict``: the validated settings as plain data (``batchgap show``).

Each module parses its own settings from the study file (the ``[data]`` and ``[model]`` tables mean what
they mean in every study), so :mod:`batchgap.config` does not grow with each experiment; what the modules share
(the study file read with ``--quick`` and ``--set``, the checks before a run, resuming finished jobs, the worker
pool, the reports' reading and writing) is written once in :mod:`batchgap.experiments.common`.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from ..config import read_toml
from ..errors import UserError, closest

KINDS = ("critical-batch", "edge-of-stability", "reparametrization")


def _module(kind: str):
    return importlib.import_module(f"{__name__}.{kind.replace('-', '_')}")


def kind_of(path: str | Path) -> str | None:
    """The experiment a study file names (``experiment = "..."``), or None for a regimes-and-seeds study."""
    kind = read_toml(Path(path)).get("experiment")
    if kind is None:
        return None
    if kind not in KINDS:
        raise UserError(f"{path}: experiment: unknown kind {kind!r}{closest(str(kind), KINDS)}; "
                        f"allowed: {', '.join(KINDS)}")
    return kind


def kind_of_output(out: str | Path) -> str | None:
    """The experiment whose ``results.json`` lies in ``out``, or None (a regimes-and-seeds study, or none yet)."""
    path = Path(out) / "results.json"
    try:
        doc = json.loads(path.read_text(encoding="utf8"))
    except (OSError, ValueError):
        return None
    kind = doc.get("experiment") if isinstance(doc, dict) else None
    return kind if kind in KINDS else None


def run(kind: str, path: Path, out: Path, **options) -> Path:
    """Run the experiment ``kind`` from the study file ``path`` into ``out``; the report's path."""
    return _module(kind).run(path, out, **options)


def report(kind: str, out: Path) -> Path:
    """Redraw the experiment's report from ``out/results.json``; the report's path."""
    return _module(kind).report(out)


def show(kind: str, path: Path, **options) -> dict:
    """The experiment's validated settings as plain data."""
    return _module(kind).show(path, **options)
