"""Fan a study out over a scheduler: ``batchgap run STUDY --shard I/N``, then ``batchgap report OUT``.

The rule: shard I of N (0-based, 0 <= I < N, as ``$SLURM_ARRAY_TASK_ID`` with ``--array=0-(N-1)``)
runs the runs whose index in the study's plan order (as :func:`batchgap.plan.plan` lists them) is
I modulo N; a run that warm-starts from another run's iterate goes with the run it starts from. The N
shards cover every run exactly once, whatever ran before, and may run at once into the same ``--out``
on a shared file system.

A sharded run trains and measures its runs into ``OUT/runs/<id>/`` (a run with ``result.json`` is
finished) and writes no ``results.json``: the pairwise measures (the parametric plot of a seed needs
both of its runs) and the merged ``results.json`` and report come from ``batchgap report OUT``, which
gathers whatever has finished by then and lists the runs that have not.

Locks, each a file holding the pid of its process and what it does, then one line ``proc PID START`` for
each process of the holder (itself and its ``--jobs`` workers, with their start times from /proc)::

    OUT/.lock                  an unsharded ``batchgap run``, or ``batchgap report`` merging
    OUT/.lock-shard-I-of-N     shard I of N (with a hash of the runs it plans)

A lock is stale, and taken over, only when every process it names is gone: a worker that outlived its
parent holds it too; a pid given to a new process since counts as gone (its start time differs).
Refused, with one line: a second process for the same lock; a shard while an unsharded run writes there
(it would train the same runs); an unsharded run while shards are running; shards splitting the study a
different number of ways or planning other runs (another study, other ``--set`` or ``--nproc``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Hashable, Sequence, TypeVar

from . import lifecycle
from .errors import UserError

T = TypeVar("T")

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str) -> tuple[int, int]:
    """``"1/4"`` -> ``(1, 4)``; a UserError unless 0 <= I < N."""
    m = _SHARD.match(text)
    if m:
        i, n = int(m.group(1)), int(m.group(2))
        if 0 <= i < n:
            return i, n
    raise UserError(f"--shard: expected I/N with 0 <= I < N (0-based: 0/4 to 3/4 for 4 shards), got {text!r}")


def select(runs: Sequence[T], shard: tuple[int, int] | None,
           depends_on: Callable[[T], Hashable | None] = lambda run: None,
           id_of: Callable[[T], Hashable] = lambda run: run) -> list[T]:
    """The share of ``runs`` (in plan order) that shard ``(I, N)`` runs; all of them for ``None``.

    A run that starts from another run's iterate (``depends_on`` gives that run's id) goes with the
    run its chain starts from, so no shard waits for another.
    """
    if shard is None:
        return list(runs)
    i, n = shard
    index = {id_of(run): k for k, run in enumerate(runs)}
    by_id = {id_of(run): run for run in runs}

    def root(run: T) -> int:
        while depends_on(run) in by_id:
            run = by_id[depends_on(run)]
        return index[id_of(run)]

    return [run for run in runs if root(run) % n == i]


def lock_name(shard: tuple[int, int] | None) -> str:
    return ".lock" if shard is None else f".lock-shard-{shard[0]}-of-{shard[1]}"


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is no zombie (:func:`batchgap.lifecycle.alive` without a start time).

    Args:
        pid: a process id.

    Returns:
        True or False. Cost: one system call and one small file read."""
    return lifecycle.alive(pid)


def read_lock(path: Path) -> tuple[int, list[str]] | None:
    """The holder of a lock file: its first line, ``PID WHAT...`` (a bare pid means "run").

    Args:
        path: the lock file.

    Returns:
        (pid, what it does as words), or None when unreadable. Cost: one small file read."""
    try:
        words = path.read_text().splitlines()[0].split()
        return int(words[0]), words[1:] or ["run"]
    except (OSError, ValueError, IndexError):
        return None


def lock_processes(path: Path) -> list[tuple[int, int | None]]:
    """Every process a lock file names: its holder, then each ``proc PID START`` line (its workers).

    Args:
        path: the lock file.

    Returns:
        [(pid, start time or None)], the holder first; [] when unreadable. Cost: one small file read."""
    try:
        lines = path.read_text().splitlines()
        procs = [(int(lines[0].split()[0]), None)]
        for line in lines[1:]:
            word = line.split()
            if len(word) == 3 and word[0] == "proc":
                procs.append((int(word[1]), None if word[2] == "-" else int(word[2])))
    except (OSError, ValueError, IndexError):
        return []
    return procs


def live_process(path: Path) -> int | None:
    """A live process among those the lock at ``path`` names, each checked with its start time
    (:func:`batchgap.lifecycle.alive`), so a reused pid does not hold the lock.

    Args:
        path: the lock file.

    Returns:
        the first live pid (the holder's when it lives), or None: the lock is stale. Cost: two small file
        reads per process named."""
    procs = lock_processes(path)
    started = {pid: start for pid, start in procs if start is not None}
    for pid, _ in procs:
        if lifecycle.alive(pid, started.get(pid)):
            return pid
    return None


def _lock_text(what: str, pids: list[int]) -> str:
    lines = [f"{os.getpid()} {what}"]
    for pid in [os.getpid(), *pids]:
        start = lifecycle.start_time(pid)
        lines.append(f"proc {pid} {'-' if start is None else start}")
    return "\n".join(lines) + "\n"


_HELD: list["OutputLock"] = []  # the locks this process holds


def record_processes(pids) -> None:
    """Name the processes ``pids`` (the workers this process started) in every lock this process holds,
    beside itself, so that no lock is taken over while one of them lives (a worker outliving its parent).

    Args:
        pids: process ids; they replace the workers any earlier call named.

    Returns:
        None. Cost: one small atomic file write per lock held."""
    pids = list(pids)
    for lock in _HELD:
        tmp = lock.path.with_name(f"{lock.path.name}.{os.getpid()}.tmp")
        tmp.write_text(_lock_text(lock.what, pids))
        os.replace(tmp, lock.path)


def describe(what: list[str]) -> str:
    """"run", "report" or "run --shard I/N", for messages."""
    return f"run --shard {what[1]}" if what[0] == "shard" and len(what) > 1 else what[0]


def check_conflicts(out: Path, shard: tuple[int, int] | None, key: str) -> None:
    """Refuse to run (shard or not) into ``out`` beside a live process it would collide with.

    ``key`` identifies the runs a shard plans; shards of one study must all have the same.
    Our own lock, if taken already, is no conflict.
    """
    own = out / lock_name(shard)
    for path in sorted(out.glob(".lock*")):
        lock = read_lock(path)
        if path == own or path.suffix == ".tmp" or lock is None or lock[0] == os.getpid() or live_process(path) is None:
            continue
        pid, what = lock
        if shard is None:
            if what[0] == "shard":
                raise UserError(f"{out}: batchgap {describe(what)} (pid {pid}) is running there; run the other shards "
                                "with --shard, or wait for it and run again")
            continue
        if what[0] == "run":
            raise UserError(f"{out}: another batchgap run (pid {pid}) is writing there; wait for it or use "
                            "another --out")
        if what[0] == "shard":
            other = parse_shard(what[1]) if len(what) > 1 else None
            if other is not None and other[1] != shard[1]:
                raise UserError(f"{out}: batchgap {describe(what)} (pid {pid}) splits the study {other[1]} ways; "
                                f"use --shard I/{other[1]} there, or another --out")
            if len(what) > 2 and what[2] != key:
                raise UserError(f"{out}: batchgap {describe(what)} (pid {pid}) runs other settings there; every shard "
                                "of one --out needs the same study, --set and --nproc")


class OutputLock:
    """``OUT/.lock`` holds the pid of the one ``batchgap run`` writing there; a second one refuses.

    ``name`` and ``what`` make the other locks (a shard's, a report's). The file appears with its content
    at once (hard-linked from a written temporary file), so a reader never sees a lock without its pid.
    """

    def __init__(self, out: Path, name: str = ".lock", what: str = "run"):
        self.path = Path(out) / name
        self.what = what

    def __enter__(self) -> "OutputLock":
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(_lock_text(self.what, []))
        try:
            for _ in range(2):
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    refuse(self.path)
                    self.path.unlink(missing_ok=True)  # stale: every process it names is gone
                    continue
                _HELD.append(self)
                return self
        finally:
            tmp.unlink(missing_ok=True)
        raise UserError(f"{self.path}: cannot take the output lock")

    def __exit__(self, *exc) -> None:
        if self in _HELD:
            _HELD.remove(self)
        self.path.unlink(missing_ok=True)


def refuse(path: Path) -> None:
    """Refuse a lock held by a live process, its holder or one of its workers (:func:`live_process`).

    Args:
        path: the lock file (absent: nothing to refuse).

    Returns:
        None; raises a one-line :class:`UserError` naming the holder (and the live worker). Cost: as
        :func:`live_process`."""
    lock, pid = read_lock(path), live_process(path)
    if lock is not None and pid is not None:
        who = "" if pid == lock[0] else f", its worker process {pid} still running"
        raise UserError(f"{path.parent}: another batchgap {describe(lock[1])} (pid {lock[0]}{who}) "
                        "is writing there; wait for it or use another --out")


def check_free(out: Path, shard: tuple[int, int] | None, key: str) -> None:
    """What :func:`take` would refuse, checked without taking the lock (before launching workers).
    ``key`` identifies the planned runs."""
    refuse(Path(out) / lock_name(shard))
    check_conflicts(Path(out), shard, key)


def take(held, out: Path, shard: tuple[int, int] | None, key: str) -> None:
    """Take ``out``'s lock (for a shard, the shard's) into the ExitStack ``held``, refusing conflicts."""
    what = "run" if shard is None else f"shard {shard[0]}/{shard[1]} {key}"
    held.enter_context(OutputLock(Path(out), lock_name(shard), what))
    check_conflicts(Path(out), shard, key)
