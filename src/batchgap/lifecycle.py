"""Processes that end with the process that started them, and SIGTERM answered as Ctrl-C is.

A ``batchgap run --jobs K`` parent starts K worker processes; ``--nproc N`` starts torchrun, which starts N
ranks. Whatever ends the parent (Ctrl-C, SIGTERM from Slurm's time limit or ``scancel``, SIGKILL from the
OOM killer), its workers must not go on training and writing into an output directory that a rerun may
already be writing:

- :func:`die_with_parent`, called by a worker as it starts: on Linux the kernel sends it a signal when its
  parent dies (``prctl(PR_SET_PDEATHSIG)``), then it checks that its parent is still the one expected (the
  parent may have died before the call); elsewhere a thread polls ``os.getppid()``.
- :func:`orphaned`: whether the parent a worker started under is gone; a worker checks it before it writes
  a finished run, so none is written after the parent's death even in the instant before the signal.
- :func:`terminate_as_interrupt`: inside, SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``), so the parent
  stops its workers, says what it kept, and exits with 143 (128 + SIGTERM), as a shell reports it.
- :func:`start_time`: a process's start time, so that a lock naming a pid is not fooled by the pid's reuse.

:func:`trampoline` (``PARENT_PID PROGRAM ARGS...``; :data:`distributed.BIND` calls it) runs PROGRAM (torchrun)
bound to PARENT_PID the same way, with ``$BATCHGAP_PARENT_PID`` set to its own pid for the processes it starts
(the ranks).
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading

PR_SET_PDEATHSIG = 1
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143
PARENT_ENV = "BATCHGAP_PARENT_PID"  # set for torchrun's ranks: the pid of the agent that started them

_expected_parent: int | None = None


class Terminated(KeyboardInterrupt):
    """SIGTERM received: handled wherever an interrupt is (workers stopped, kept runs said), exit 143."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def terminate_as_interrupt():
    """Inside, SIGTERM to this process raises :class:`Terminated` in its main thread (as SIGINT raises
    ``KeyboardInterrupt``); the handler before is restored after. Outside the main thread: nothing changes.

    Returns:
        a context manager. Cost: two ``signal.signal`` calls."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _prctl_pdeathsig(sig: int) -> bool:
    """Ask the kernel for ``sig`` when this process's parent dies; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int, sig: int, every_s: float) -> None:
    while not threading.Event().wait(every_s):
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)
            return


def die_with_parent(parent: int, sig: int = signal.SIGKILL, every_s: float = 0.5) -> None:
    """End this process with ``sig`` as soon as its parent ``parent`` (a pid) is gone.

    Linux: ``prctl(PR_SET_PDEATHSIG, sig)``, then ``os.getppid() == parent`` is checked (a parent that died
    before the call reparented this process, and the kernel would never signal it). Elsewhere (or where
    prctl fails) a daemon thread checks ``os.getppid()`` every ``every_s`` seconds. Either way
    :func:`orphaned` answers from then on.

    Args:
        parent: the pid of the process this one must not outlive (read by the parent itself, not here).
        sig: the signal to end with (SIGKILL: no handler runs; batchgap's files are written atomically).
        every_s: the polling interval where no parent-death signal is available.

    Returns:
        None; the process ends at once when ``parent`` is already gone. Cost: one system call (Linux), or
        a thread waking every ``every_s`` seconds.
    """
    global _expected_parent
    _expected_parent = parent
    if not _prctl_pdeathsig(sig):
        threading.Thread(target=_watch, args=(parent, sig, every_s), daemon=True, name="batchgap-parent").start()
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def orphaned() -> bool:
    """Whether this process was bound to a parent by :func:`die_with_parent` and that parent is gone.

    Returns:
        ``os.getppid() != parent`` after :func:`die_with_parent`; False in a process never bound. Cost: one
        system call."""
    return _expected_parent is not None and os.getppid() != _expected_parent


def start_time(pid: int) -> int | None:
    """The start time of process ``pid``: field 22 of ``/proc/PID/stat``, in clock ticks since boot. Two
    processes given one pid in turn never share it.

    Args:
        pid: a process id.

    Returns:
        the start time, or None where there is no /proc or no such process. Cost: one small file read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int, started: int | None = None) -> bool:
    """Whether process ``pid`` lives: it exists, is no zombie, and (when ``started`` is given and /proc can
    say) :func:`start_time` of it equals ``started``, so a later process given the same pid is not taken for it.

    Args:
        pid: a process id.
        started: its start time when it was recorded, or None (then the pid alone decides).

    Returns:
        True or False; a process of another user counts as alive. Cost: ``kill(pid, 0)`` and one file read."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        if fields[0] == b"Z":
            return False
        return started is None or int(fields[19]) == started
    except (OSError, ValueError, IndexError):
        return True


def trampoline(argv: list[str]) -> int:
    """``PARENT_PID PROGRAM ARGS...``: become PROGRAM, bound to PARENT_PID (see the module docstring)."""
    parent, cmd = int(argv[0]), argv[1:]
    if _prctl_pdeathsig(signal.SIGTERM):  # survives exec: torchrun ends its ranks on SIGTERM
        if os.getppid() != parent:
            return EXIT_TERMINATED
        os.environ[PARENT_ENV] = str(os.getpid())  # exec keeps the pid: the ranks' parent
        os.execv(cmd[0], cmd)
    os.environ.pop(PARENT_ENV, None)
    child = subprocess.Popen(cmd)  # elsewhere: stay between, watch the parent, pass SIGTERM on
    while True:
        try:
            return child.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if os.getppid() != parent:
                child.terminate()
                return child.wait()


if __name__ == "__main__":
    sys.exit(trampoline(sys.argv[1:]))
