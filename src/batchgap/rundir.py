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

Every checkpoint (``*.pt``) has a sidecar ``NAME.pt.sha256`` (``sha256sum`` format), written right after it,
and is verified against it whenever it is read back: a damaged file is never used, and a finished run whose
``model.pt`` (or a kept iterate) is damaged counts as unfinished again, so that ``batchgap run`` recovers it
from what is intact (``state.pt``, or training from scratch; the same numbers). Checkpoints are loaded
weights-only: batchgap never unpickles a file it reads back (a file with pickled objects is refused).
What is found damaged is said in one line on stderr (the ``batchgap`` logger).

:func:`batchgap.train.train`, :mod:`batchgap.study` and :mod:`batchgap.report` all go through here.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .results import SCHEMA, RunResult, from_dict, to_dict
from .util import atomic_save_torch, atomic_write_json, atomic_write_text, sha256_file

logger = logging.getLogger("batchgap")  # without a handler of the user's, Python prints its warnings to stderr
_told: set = set()  # (path, size, mtime) already reported in this process: one line per damaged file


class DamagedFile(UserError):
    """A checkpoint that cannot be trusted: missing, unreadable, not the bytes recorded when it was written,
    or holding pickled objects (never unpickled). One line naming the file and why."""


def tell(path: Path, message: str) -> None:
    """Say ``message`` once per state of the file at ``path`` (a warning of the ``batchgap`` logger)."""
    try:
        st = os.stat(path)
        key = (str(path), st.st_size, st.st_mtime_ns, message)
    except OSError:
        key = (str(path), None, None, message)
    if key not in _told:
        _told.add(key)
        logger.warning(message)


def checksum_path(path: Path) -> Path:
    """The sidecar holding the sha256 recorded when ``path`` was written (``sha256sum -c`` reads it)."""
    return path.with_name(path.name + ".sha256")


def recorded_checksums(path: Path) -> list[str]:
    """The sha256s the sidecar of ``path`` records (one, or two while a new version replaces the old); [] if none."""
    try:
        return [line.split()[0] for line in checksum_path(path).read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def save_checkpoint(obj: Any, path: str | Path) -> None:
    """``torch.save`` ``obj`` atomically into ``path``, its sha256 recorded in ``path.sha256``.

    The record names the new sha256 beside the old one before the rename and the new one alone after it, so a
    kill at any moment leaves a file its record names (never a false "damaged").

    Args:
        obj: tensors and plain data only (dicts, lists, tuples, numbers, strings, None): it is read back with
            ``weights_only``.
        path: the checkpoint file.

    Cost: one serialization, three atomic writes (the file and twice its sidecar of under 200 bytes), one
    sha256 pass.
    """
    path = Path(path)
    side = checksum_path(path)
    old = recorded_checksums(path) if path.is_file() else []
    if len(old) > 1:  # a kill between the two records left both: keep the one of the file that is there
        current = sha256_file(path)
        old = [h for h in old if h == current]

    def record(sha: str) -> None:
        atomic_write_text(side, "".join(f"{h}  {path.name}\n" for h in dict.fromkeys([sha, *old])))

    sha = atomic_save_torch(obj, path, before_replace=record)
    if old:
        atomic_write_text(side, f"{sha}  {path.name}\n")


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be used, or None when it can.

    The sha256 of the file must be one its sidecar recorded at writing. Without a sidecar (written by an
    older batchgap) a weights-only load decides.

    Args:
        path: the checkpoint file.

    Returns:
        None, or a short reason ("missing", "damaged: ...", "unreadable (...)").

    Cost: one read of the file (a load of it when no sidecar is there).
    """
    path = Path(path)
    if not path.is_file():
        return "missing"
    recorded = recorded_checksums(path)
    if recorded:
        try:
            actual = sha256_file(path)
        except OSError as e:
            return f"unreadable ({e.strerror})"
        return None if actual in recorded else "damaged: its sha256 is not the one recorded when it was written"
    try:
        _load(path)
    except DamagedFile as e:
        return str(e).split(": ", 1)[-1]
    return None


def _load(path: Path) -> Any:
    """``torch.load`` weights-only; every failure a :class:`DamagedFile` (a pickle is refused, never run)."""
    try:
        with warnings.catch_warnings():  # torch warns of pickle protocols in files that are not its own
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise DamagedFile(f"{path}: unreadable ({e.strerror})") from None
    except Exception as e:
        if "Weights only load failed" in str(e) and "Unsupported global" in str(e):
            raise DamagedFile(f"{path}: holds pickled Python objects, which batchgap will not unpickle "
                              "(unpickling runs whatever code the file carries)") from None
        raise DamagedFile(f"{path}: unreadable, not a checkpoint batchgap wrote ({type(e).__name__})") from None


def load_checkpoint(path: str | Path) -> Any:
    """A checkpoint written by :func:`save_checkpoint`, verified against its recorded sha256, loaded weights-only.

    Args:
        path: the checkpoint file.

    Returns:
        What was saved (tensors and plain data).

    Raises:
        DamagedFile: missing, damaged, unreadable, or holding pickled objects (one line; nothing is run).

    Cost: one read for the hash, one load.
    """
    path = Path(path)
    why = checkpoint_problem(path)
    if why is not None:
        raise DamagedFile(f"{path}: {why}")
    return _load(path)


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


# what train() puts in state.pt (batchgap.train): a file without them is not a training checkpoint
STATE_KEYS = frozenset({"model", "optimizer", "generator", "rng", "result"})


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

    def finished(self, run_id: str, measure_hash: str | None = None, say: bool = True) -> RunResult | None:
        """The result when the run is trained (and, given ``measure_hash``, measured with those settings) and its
        checkpoints are intact: a damaged ``model.pt`` or kept iterate makes it unfinished (said in one line,
        unless ``say`` is False). Cost: a read of result.json and of each checkpoint (:meth:`damaged`)."""
        done = self.read_result(run_id)
        if done is None:
            return None
        damaged = self.damaged()
        if damaged:
            path, why = damaged
            if say:
                tell(path, f"{path}: {why}; run {run_id} is not finished any more: `batchgap run` trains it again "
                           "from its intact files")
            return None
        if measure_hash is None or done.measure_hash == measure_hash or done.diverged_epoch:
            return done
        return None

    def damaged(self) -> tuple[Path, str] | None:
        """The first of the finished run's checkpoints (``model.pt``, the kept iterates) that cannot be used,
        with why; None when all are intact. Cost: one read of each."""
        for path in [self.model, *sorted(self.path.glob("iterates/*.pt"))]:
            why = checkpoint_problem(path)
            if why is not None:
                return path, why
        return None

    def write_result(self, result: RunResult) -> None:
        atomic_write_json(self.result, to_dict(result))

    # ---------------------------------------------------------------- training files
    def save_state(self, state: dict) -> None:
        """Save the resumable checkpoint: tensors and plain data only (it is loaded weights-only)."""
        save_checkpoint(state, self.state)

    def load_state(self) -> dict | None:
        """The resumable checkpoint; None when there is none, or (said in one line) when it is damaged, unreadable,
        not batchgap's or holds pickled objects, which are never unpickled: training then starts over."""
        if not self.state.exists():
            return None
        try:
            state = load_checkpoint(self.state)
        except DamagedFile as e:
            tell(self.state, f"{e}; not resumed from it: the run trains from scratch")
            return None
        if not isinstance(state, dict) or not STATE_KEYS <= set(state):
            tell(self.state, f"{self.state}: not a batchgap training checkpoint; the run trains from scratch")
            return None
        return state

    def write_history(self, rows: list[dict]) -> None:
        # the whole history, rewritten atomically: never a duplicate or missing epoch after a resume
        atomic_write_text(self.history, "".join(json.dumps(r) + "\n" for r in rows))

    def read_history(self) -> list[dict]:
        """The per-epoch rows; [] when there is no history. Raises :class:`DamagedFile` for an unreadable one."""
        if not self.history.exists():
            return []
        try:
            rows = [json.loads(line) for line in self.history.read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as e:
            raise DamagedFile(f"{self.history}: unreadable ({getattr(e, 'strerror', None) or 'not JSON lines'}); "
                              "`batchgap run` rewrites it when the run trains again") from None
        if not all(isinstance(r, dict) for r in rows):
            raise DamagedFile(f"{self.history}: unreadable (not one JSON object a line)")
        return rows

    def save_model(self, state_dict: dict) -> None:
        save_checkpoint(state_dict, self.model)

    def load_model(self) -> dict:
        """The final state dict, verified (:func:`load_checkpoint`; :class:`DamagedFile` when it cannot be used)."""
        return load_checkpoint(self.model)

    def save_iterate(self, epoch: int, state_dict: dict) -> None:
        save_checkpoint(state_dict, self.iterate(epoch))

    def load_iterate(self, epoch: int) -> dict:
        """The kept iterate of ``epoch``, verified as :meth:`load_model`."""
        return load_checkpoint(self.iterate(epoch))


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
        save_checkpoint(state, self.init(model_tag, seed))

    def load_x0(self, model_tag: str, seed: int) -> dict | None:
        """x0 of a seed when saved and intact (a damaged file is said and rebuilt: x0 is a function of the seed)."""
        path = self.init(model_tag, seed)
        if not path.exists():
            return None
        try:
            return load_checkpoint(path)
        except DamagedFile as e:
            tell(path, f"{e}; rebuilt from its seed")
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
