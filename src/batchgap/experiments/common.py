"""What the three experiments (critical-batch, edge-of-stability, reparametrization) share, written once.

Each experiment's ``load`` reads its study file through :func:`load_study`: checked as written, then with
``--quick`` and ``--set``. Its ``run`` makes the checks before anything is written with :func:`start_run`
(``--jobs``, one study per output directory: :func:`check_output`), takes a job's record back when the job
already finished (:func:`finished`), runs the rest here or in worker processes that die with this one
(:func:`pool_map`) and begins ``results.json`` with :func:`results_head`; every job loads the data set once per
process (:func:`study_data`). Its report module reads ``results.json`` back with :func:`load_results` and
writes its figures with :func:`save_png` and ``report.md`` with :func:`write_markdown`. What differs (each
study's settings, jobs, numbers and the report's contents) stays in its own modules.
"""
from __future__ import annotations

import copy
import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

from ..config import read_toml
from ..errors import UserError, closest
from ..lifecycle import die_with_parent
from ..overrides import apply_set, parse_set
from ..util import atomic_write_bytes, atomic_write_text, progress_bar


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


def read_json(file: Path) -> dict | None:
    """The JSON object in ``file``, or None when it is missing, unreadable or not an object.

    Args:
        file: the file.

    Returns:
        The dict, or None.
    """
    try:
        doc = json.loads(file.read_text(encoding="utf8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def check_output(out: Path, kind: str, name: str, force: bool) -> None:
    """One directory holds one study: refuse (UserError) another study's output unless ``force``.

    Args:
        out: the output directory.
        kind: the experiment about to run into it.
        name: its study's name.
        force: run into it whatever it holds.

    Returns:
        None.
    """
    doc = read_json(out / "results.json")
    if doc is None or force:
        return
    if doc.get("experiment") != kind or doc.get("name") != name:
        other = doc.get("experiment") or "a regimes-and-seeds study"
        raise UserError(f"{out}: holds {other} {doc.get('name', doc.get('study', {}).get('name', ''))!r}, not "
                        f"{kind} {name!r}; choose another --out, or --force to make it this study's")


def start_run(kind: str, load, path, out, quick: bool, sets, jobs, force: bool) -> tuple:
    """What every experiment's ``run`` checks before it writes anything, in this order: the study file
    (``load``), ``--jobs``, the output directory (:func:`check_output`).

    Args:
        kind: the experiment.
        load: the experiment's ``load(path, quick, sets) -> (raw, cfg, settings)``.
        path: the study file.
        out: the output directory.
        quick: apply the study's ``[quick]`` table.
        sets: ``--set`` assignments.
        jobs: ``--jobs`` (None: not given).
        force: run into a directory that holds another study.

    Returns:
        ``(raw, cfg, settings, out as a Path)``.
    """
    raw, cfg, settings = load(path, quick, sets)
    out = Path(out)
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs: must be at least 1, got {jobs}")
    check_output(out, kind, cfg.name, force)
    return raw, cfg, settings, out


def results_head(kind: str, schema: int, cfg, quick: bool, settings) -> dict:
    """The first keys of every experiment's ``results.json``, in their order.

    Args:
        kind: the experiment.
        schema: its results schema.
        cfg: the study (its name and description).
        quick: whether ``--quick`` was given.
        settings: the experiment's settings dataclass.

    Returns:
        ``{"experiment", "schema", "name", "description", "quick", "settings"}``.
    """
    return {"experiment": kind, "schema": schema, "name": cfg.name, "description": cfg.description,
            "quick": quick, "settings": asdict(settings)}


_DATA: dict = {}


def study_data(cfg, convert=None):
    """The study's data set, loaded once per process whatever number of jobs it runs (the last one asked for is
    kept).

    Args:
        cfg: the data (and its root).
        convert: called once on the data set; its result is what is kept and returned (None: the data set).

    Returns:
        The data set, or ``convert(data set)``.
    """
    from ..build import prepare_data

    key = (json.dumps(asdict(cfg.data), sort_keys=True) + str(cfg.root), convert)
    if key not in _DATA:
        _DATA.clear()
        ds = prepare_data(cfg)
        _DATA[key] = ds if convert is None else convert(ds)
    return _DATA[key]


def finished(file: Path, ident: str) -> dict | None:
    """The record of a job that already finished: ``file``'s when it is the job ``ident``'s, else None.

    Args:
        file: where the job writes its record.
        ident: the job's id (the hash of what makes its numbers).

    Returns:
        The record, or None (the job is to run).
    """
    done = read_json(file)
    return done if done is not None and done.get("id") == ident else None


def pool_map(fn, todo: list, jobs: int, progress, desc: str):
    """``fn`` over ``todo`` in this process (``jobs`` 1) or in spawned worker processes that die with this one
    (Ctrl-C, SIGTERM, SIGKILL: none finishes or writes a job after it); yields the results in order.

    Args:
        fn: a module-level function of one job.
        todo: the jobs.
        jobs: processes at once (at most ``len(todo)`` are started).
        progress: a progress bar (None: when stderr is a terminal).
        desc: the progress bar's label.

    Returns:
        A generator of ``fn(job)`` for each job of ``todo``.
    """
    jobs = min(jobs, max(1, len(todo)))
    if jobs == 1:
        yield from progress_bar(map(fn, todo), desc=desc, enabled=progress, total=len(todo))
        return
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=die_with_parent,
                               initargs=(os.getpid(),))
    try:
        yield from progress_bar(pool.map(fn, todo), desc=desc, enabled=progress, total=len(todo))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def load_results(out: Path, kind: str) -> dict:
    """``out/results.json`` for a report, refused (UserError) when unreadable or another study's.

    Args:
        out: the output directory.
        kind: the experiment whose report is drawn.

    Returns:
        The results.
    """
    try:
        doc = json.loads((out / "results.json").read_text(encoding="utf8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{out}: no readable results.json ({e})") from None
    if doc.get("experiment") != kind:
        article = "an" if kind[0] in "aeiou" else "a"
        raise UserError(f"{out}: results.json is not {article} {kind} study's")
    return doc


def save_png(fig, path: Path, dpi: int) -> Path:
    """Write a matplotlib figure, laid out already, to ``path`` as PNG (atomically) and close it.

    Args:
        fig: the figure.
        path: the PNG file; its directory is created when missing.
        dpi: its resolution.

    Returns:
        ``path``.
    """
    import matplotlib.pyplot as plt  # the report modules import it first, with the Agg backend

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_markdown(out: Path, lines: list[str]) -> Path:
    """Write ``out/report.md`` (atomically): the lines joined by newlines.

    Args:
        out: the output directory.
        lines: the report's lines.

    Returns:
        The report's path.
    """
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
