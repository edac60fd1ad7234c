"""Where data files live, how they are checked, and how they are fetched.

Data directory
    :func:`resolve_data_dir` picks, in order: the explicit ``data_dir`` argument (the CLI's
    ``--data-dir``), the environment variable ``BATCHGAP_DATA``, then ``~/.cache/batchgap/data``.

Layout
    Each data set keeps its files, under their official names, in a subdirectory named after the data
    set: ``DATA_DIR/mnist/train-images-idx3-ubyte.gz``, ``DATA_DIR/cifar10/cifar-10-python.tar.gz``,
    ``DATA_DIR/cifar100/cifar-100-python.tar.gz``, ``DATA_DIR/mnist1d/mnist1d-default.npz`` (a cache).

Checksums
    Every official file has its md5 in :data:`CHECKSUMS`, the one table tests may patch. A file that
    passed is recorded in a small marker beside it (``.NAME.verified``: size, mtime, md5) so later loads
    skip the hash until the file changes. A file modified less than a second before it was hashed gets no
    marker (its next modification might not change the mtime), so it is hashed again next time.

Downloads
    :func:`fetch` streams to a temporary file in the target directory, checks the md5 on the way, and
    renames it into place only when it matches: a failed or bad download leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import UserError

ENV_VAR = "BATCHGAP_DATA"
DEFAULT_DATA_DIR = Path("~/.cache/batchgap/data")

# Official md5 of every file a loader reads (as published by the data sets' authors and used by torchvision).
CHECKSUMS: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
}

_CHUNK = 1 << 20
_RACY_NS = 1_000_000_000  # a file younger than this when hashed gets no marker


@dataclass(frozen=True)
class Remote:
    """The files of one data set: its registry name (also its subdirectory), mirror and file names."""

    dataset: str
    base_url: str
    filenames: tuple[str, ...]

    def directory(self, data_dir: Path) -> Path:
        return Path(data_dir) / self.dataset


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: ``data_dir``, else ``$BATCHGAP_DATA``, else ``~/.cache/batchgap/data``."""
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(ENV_VAR) or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser()


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success rename it onto ``dest``, on error remove it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def missing(path: Path, dataset: str) -> UserError:
    """The one-line error for a data file that is not there."""
    return UserError(
        f"{dataset}: {path.name} not found in {path.parent}; get it with `batchgap data download {dataset}`, "
        f"or point --data-dir / ${ENV_VAR} at a directory that holds {dataset}/{path.name}"
    )


def corrupt(path: Path, dataset: str, why: str) -> UserError:
    """The one-line error for a data file that is there but unreadable or wrong."""
    return UserError(
        f"{dataset}: {path} is corrupt ({why}); delete it and re-download it with "
        f"`batchgap data download {dataset}`"
    )


def _marker(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified")


def _marker_matches(path: Path, expected: str) -> bool:
    try:
        record = json.loads(_marker(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    return record == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "md5": expected}


def _write_marker(path: Path, md5: str, hashed_at_ns: int) -> None:
    st = path.stat()
    if hashed_at_ns - st.st_mtime_ns < _RACY_NS:
        return  # too fresh: a modification within the same timestamp tick would go unseen
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "md5": md5}
    try:
        with atomic_path(_marker(path)) as tmp:
            tmp.write_text(json.dumps(record))
    except OSError:
        pass  # a read-only data directory just means hashing again next time


def verify(path: Path, dataset: str) -> str:
    """Check ``path`` against :data:`CHECKSUMS` (skipped when its marker still matches); return the md5."""
    expected = CHECKSUMS[path.name]
    if not path.is_file():
        raise missing(path, dataset)
    if _marker_matches(path, expected):
        return expected
    hashed_at = time.time_ns()
    actual = md5sum(path)
    if actual != expected:
        raise corrupt(path, dataset, f"md5 {actual}, expected {expected}")
    _write_marker(path, actual, hashed_at)
    return actual


def fetch(url: str, dest: Path, dataset: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically, checking the md5 from :data:`CHECKSUMS` on the way."""
    from tqdm import tqdm

    expected = CHECKSUMS[dest.name]
    with atomic_path(dest) as tmp:
        digest = hashlib.md5()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar:
                    while chunk := response.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        except urllib.error.HTTPError as e:
            raise UserError(f"{dataset}: could not download {url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise UserError(f"{dataset}: could not download {url}: {reason}") from None
        if digest.hexdigest() != expected:
            raise UserError(
                f"{dataset}: download of {url} has md5 {digest.hexdigest()}, expected {expected}; "
                f"nothing was saved (the mirror may serve a different file; try another --base-url)"
            )
    _write_marker(dest, expected, time.time_ns())
    return dest


def ensure(remote: Remote, data_dir: Path, download: bool = False, base_url: str | None = None) -> list[Path]:
    """The remote's files in ``data_dir``, verified; missing or corrupt ones are fetched when ``download``."""
    paths = []
    for name in remote.filenames:
        path = remote.directory(data_dir) / name
        if download:
            try:
                verify(path, remote.dataset)
            except UserError:
                fetch(join_url(base_url or remote.base_url, name), path, remote.dataset)
        else:
            verify(path, remote.dataset)
        paths.append(path)
    return paths


def join_url(base_url: str, name: str) -> str:
    return base_url.rstrip("/") + "/" + name
