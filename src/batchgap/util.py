"""Small shared helpers: atomic file writes, JSON, progress bars."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .errors import UserError


# OS errors that are the environment's, not batchgap's nor the input's: one line, exit code 2 (batchgap.cli)
ENVIRONMENT_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EACCES", "EPERM", "EROFS", "EDQUOT", "EIO",
                                                           "ENOTDIR", "EISDIR", "EEXIST", "EMFILE", "ENFILE")
                               if hasattr(errno, n))


class FileWriteError(UserError):
    """A file could not be written (no space, permission denied, read-only file system, quota, ...): the
    environment's fault, not the input's nor batchgap's. One line naming the path and the cause; the partial
    temporary file is gone and the file that was there before is untouched."""


def write_error(path: str | Path, e: OSError) -> FileWriteError:
    """A :class:`FileWriteError` for ``e`` raised while writing ``path``: ``PATH: cannot write (CAUSE)``."""
    name = Path(e.filename) if isinstance(e.filename, (str, os.PathLike)) else None
    where = name if name is not None and not name.name.startswith(f".{Path(path).name}.") else path  # not our temporary
    cause = e.strerror or str(e) or type(e).__name__
    return FileWriteError(f"{where}: cannot write ({cause}); nothing half-written was left, and the same command "
                          "resumes once that is fixed")


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new temporary file beside ``path``, created as ``open()`` creates a file: mode 0666 less the umask
    (``tempfile.mkstemp`` makes every file 0600, which colleagues sharing an output could not read)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path.parent))


def _atomic(path: Path, data: bytes, before_replace: Callable[[str], None] | None = None) -> str:
    """Write ``data`` to a temporary file beside ``path``, fsync, ``before_replace(sha256)``, rename; returns the
    sha256 of ``data``. Any OS error becomes a :class:`FileWriteError` (one line), the temporary file removed."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file where a directory should be (mkdir names no cause an error message can use)
        where = next((p for p in [path.parent, *path.parent.parents] if p.exists() and not p.is_dir()), path.parent)
        raise FileWriteError(f"{where}: cannot write {path.name} under it: it is a file, not a directory") from None
    except OSError as e:
        raise write_error(path, e) from None
    try:
        fd, tmp = _create_temp(path)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(hashlib.sha256(data).hexdigest())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> str:
    """Write ``data`` to a temporary file beside ``path``, then rename: readers see old or new, never half.

    The file gets the permissions ``open()`` would give a new file (0666 less the umask).

    Args:
        path: the file to (re)place; its directory is created when missing.
        data: the whole content.

    Returns:
        The hex sha256 of ``data`` (what :func:`sha256_file` gives for ``path`` as long as it is intact).

    Raises:
        FileWriteError: an OS error (no space, permission, read-only file system, quota): one line naming the
            path and the cause; the temporary file is removed and the previous ``path`` left as it was.

    Cost: one write and one fsync of ``len(data)`` bytes, one sha256 pass over them.
    """
    return _atomic(Path(path), data)


def atomic_write_text(path: str | Path, text: str) -> str:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.tolist()
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def _finite(obj: Any) -> Any:
    """NaN and infinities become null: results.json stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def to_json(obj: Any) -> str:
    plain = json.loads(json.dumps(obj, default=_json_default))
    return json.dumps(_finite(plain), indent=1, allow_nan=False) + "\n"


def atomic_write_json(path: str | Path, obj: Any) -> str:
    """:func:`atomic_write_text` of :func:`to_json` (strict JSON: NaN and infinities as null)."""
    return atomic_write_text(path, to_json(obj))


def atomic_save_torch(obj: Any, path: str | Path, before_replace: Callable[[str], None] | None = None) -> str:
    """``torch.save(obj)`` into ``path`` atomically, as :func:`atomic_write_bytes`; returns its sha256.

    ``before_replace(sha256)`` runs once the temporary file holds every byte, before it replaces ``path``
    (:func:`batchgap.rundir.save_checkpoint` records the new checksum there, so that no kill finds a file
    that its record does not name).

    Serialized in memory first, so that a full disk is one ``OSError`` from the write (torch's zip writer
    turns it into an ``unexpected pos`` RuntimeError) and the hash is of exactly the bytes written.

    Cost: the serialized size once more in memory, one write, one sha256 pass.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    return _atomic(Path(path), buf.getvalue(), before_replace)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes. Cost: one sequential read of the file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def progress_bar(iterable: Iterable, desc: str = "", enabled: bool | None = None, **kwargs):
    """tqdm on a terminal, the bare iterable otherwise (``enabled=None`` decides by stderr)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, **kwargs)
