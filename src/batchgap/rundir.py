"""The output directory of a study and the directory of one run: every file in them, written atomically.

Layout::

    OUT/results.json              everything the report is drawn from (written last)
    OUT/report.md, OUT/figures/   the report (batchgap.report)
    OUT/study.json, OUT/plan.json the settings and the planned run ids of the last `batchgap run`
    OUT/init/<model>-<hash>-s<seed>.pt   x0: the start point shared by every regime of one seed
    OUT/runs/<run id>/            a run (:class:`RunDir`)
    OUT/pairs/<sb>__<lb>.json     pairwise measures (parametric plot) of one seed

    OUT/runs/<run id>/config.json     everything that determines the run (hashed into its id)
    OUT/runs/<run id>/history.jsonl   one line per evaluated epoch
    OUT/runs/<run id>/state.pt        resumable checkpoint (model, optimizer, generators, progress)
    OUT/runs/<run id>/model.pt        the final state dict
    OUT/runs/<run id>/iterates/epoch-K.pt   iterates kept for warm starts and trajectory measures
    OUT/runs/<run id>/result.json     written last: a run with a complete result.json is finished

:func:`batchgap.train.train`, :mod:`batchgap.study` and :mod:`batchgap.report` all go through here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .results import SCHEMA, RunResult, from_dict, to_dict
from .util import atomic_save_torch, atomic_write_json, atomic_write_text


def read_json(path: Path) -> dict | None:
    """A JSON object from ``path``; None when missing, unreadable or not an object."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def remove_temp_files(directory: Path, names: tuple[str, ...] = ("*",)) -> None:
    """Temporary files an atomic write left when its process was killed (only where we are the writer)."""
    for name in names:
        for tmp in Path(directory).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


class RunDir:
    """One run's directory (it need not exist yet)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.json")
    result = property(lambda self: self.path / "result.json")
    state = property(lambda self: self.path / "state.pt")
    history = property(lambda self: self.path / "history.jsonl")
    model = property(lambda self: self.path / "model.pt")

    def iterate(self, epoch: int) -> Path:
        return self.path / "iterates" / f"epoch-{epoch}.pt"

    def clean(self) -> None:
        if self.path.is_dir():
            remove_temp_files(self.path)

    def write_config(self, config: dict) -> None:
        atomic_write_json(self.config, config)

    # ---------------------------------------------------------------- the result
    def read_result(self, run_id: str) -> RunResult | None:
        """The finished run's result; None for a missing, half-written, foreign or older-schema file."""
        doc = read_json(self.result)
        if doc is None or doc.get("id") != run_id or not doc.get("complete") or doc.get("schema") != SCHEMA:
            return None
        try:
            return from_dict(RunResult, doc, str(self.result))
        except UserError:
            return None

    def finished(self, run_id: str, measure_hash: str | None = None) -> RunResult | None:
        """The result when the run is trained (and, given ``measure_hash``, measured with those settings)."""
        done = self.read_result(run_id)
        if done is None or measure_hash is None or done.measure_hash == measure_hash or done.diverged_epoch:
            return done
        return None

    def write_result(self, result: RunResult) -> None:
        atomic_write_json(self.result, to_dict(result))

    # ---------------------------------------------------------------- training files
    def save_state(self, state: dict) -> None:
        atomic_save_torch(state, self.state)

    def load_state(self) -> dict | None:
        """The resumable checkpoint; None when there is none or it cannot be read (training starts over)."""
        if not self.state.exists():
            return None
        try:
            return torch.load(self.state, map_location="cpu", weights_only=False)
        except Exception:
            return None

    def write_history(self, rows: list[dict]) -> None:
        # the whole history, rewritten atomically: never a duplicate or missing epoch after a resume
        atomic_write_text(self.history, "".join(json.dumps(r) + "\n" for r in rows))

    def read_history(self) -> list[dict]:
        if not self.history.exists():
            return []
        return [json.loads(line) for line in self.history.read_text().splitlines() if line.strip()]

    def save_model(self, state_dict: dict) -> None:
        atomic_save_torch(state_dict, self.model)

    def load_model(self) -> dict:
        return torch.load(self.model, map_location="cpu", weights_only=True)

    def save_iterate(self, epoch: int, state_dict: dict) -> None:
        atomic_save_torch(state_dict, self.iterate(epoch))

    def load_iterate(self, epoch: int) -> dict:
        return torch.load(self.iterate(epoch), map_location="cpu", weights_only=True)


def read_history(run_dir: str | Path) -> list[dict]:
    """The per-epoch rows of a run directory (``history.jsonl``)."""
    return RunDir(run_dir).read_history()


class Output:
    """A study's output directory."""

    def __init__(self, out: str | Path):
        self.path = Path(out)

    results = property(lambda self: self.path / "results.json")
    plan = property(lambda self: self.path / "plan.json")
    study = property(lambda self: self.path / "study.json")

    def run(self, run_id: str) -> RunDir:
        return RunDir(self.path / "runs" / run_id)

    def init(self, model_tag: str, seed: int) -> Path:
        return self.path / "init" / f"{model_tag}-s{seed}.pt"

    def pair(self, sb: str, lb: str) -> Path:
        return self.path / "pairs" / f"{sb}__{lb}.json"

    def relative(self, path: Path) -> str:
        return str(Path(path).relative_to(self.path))

    def save_x0(self, model_tag: str, seed: int, state: dict) -> None:
        atomic_save_torch(state, self.init(model_tag, seed))

    def load_x0(self, model_tag: str, seed: int) -> dict | None:
        """x0 of a seed when saved and readable (a damaged file is rebuilt: x0 is a function of the seed)."""
        path = self.init(model_tag, seed)
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return None

    def write(self, path: Path, doc: Any) -> None:
        atomic_write_json(path, to_dict(doc))

    def check(self) -> None:
        """The directory exists (created) and is writable; a results.json in it is batchgap's."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out}: is a file, not a directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {out}: cannot create the output directory ({e.strerror})") from None
        if not os.access(out, os.W_OK | os.X_OK):
            raise UserError(f"--out {out}: the output directory is not writable")
        if self.results.exists():
            prior = read_json(self.results)
            if prior is None or not isinstance(prior.get("runs"), list):
                raise UserError(f"{self.results}: not a batchgap results file (unreadable or edited); "
                                "move it away or use another --out")


def _first_difference(a: Any, b: Any, path: str) -> str | None:
    """The dotted path of the first leaf where ``a`` and ``b`` differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
            if d:
                return d
        return None
    return None if a == b else f"{path}: {json.dumps(a)} here, {json.dumps(b)} now"


def other_study(before: dict, now: dict) -> str | None:
    """Why the study ``now`` (``StudyConfig.to_dict()``) is not the study ``before`` recorded in an output
    directory, or None when it is the same one. The same study may add seeds and regimes and change its
    measure settings (its runs are then measured again); anything that changes the runs already there (the
    data, the model, the training settings, a regime's settings) or another study name makes another."""
    if before.get("name") != now["name"]:
        return f"study {before.get('name')!r} is there, this is {now['name']!r}"
    for key in ("data", "model", "train"):
        d = _first_difference(before.get(key), now[key], key)
        if d:
            return d
    old = {r.get("name"): r for r in before.get("regimes", []) if isinstance(r, dict)}
    for r in now["regimes"]:
        if r["name"] in old:
            d = _first_difference(old[r["name"]], r, f"regimes.{r['name']}")
            if d:
                return d
    return None
