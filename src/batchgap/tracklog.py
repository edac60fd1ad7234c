"""The JSONL records of :func:`batchgap.track`: one JSON object a line, one line per measurement.

A record is ``{"schema": SCHEMA, "run": label, "step": int, "measurement_set": {...}, "measures": {name:
{"value": number or null, ...the landscape result's as_dict (its protocol)...}}, "skipped": {name: why},
"budget": {...}}``. Lines are appended whole (one ``write`` of the line and its newline, then flush and
fsync), so a killed run leaves whole lines and at most a partial last one, which :func:`read_records`
skips with a warning and :class:`RecordWriter` cuts away before it appends. Written by ``track/``, read by
``report/track.py``; imports neither.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

SCHEMA = "batchgap-track/1"


def _finite(obj: Any) -> Any:
    """NaN and infinities as null, numpy scalars and arrays as plain JSON types: each line is strict JSON."""
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        obj = obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def record_line(record: dict) -> str:
    """``record`` as one line of strict JSON (NaN and infinities as null) with its newline."""
    return json.dumps(_finite(record), allow_nan=False, separators=(",", ":")) + "\n"


def _cut_partial_tail(path: Path) -> int:
    """Truncate ``path`` after its last newline (a line a killed writer left half-written); returns bytes cut."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        keep, pos = 0, size
        while pos > 0:
            step = min(1 << 16, pos)
            f.seek(pos - step)
            block = f.read(step)
            at = block.rfind(b"\n")
            if at >= 0:
                keep = pos - step + at + 1
                break
            pos -= step
        if keep < size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return size - keep


class RecordWriter:
    """Appends records to a JSONL file durably: one ``write`` per line, flush, fsync.

    Args:
        path: the JSONL file; its directory is created.
        append: add to an existing file (a resumed run); False refuses an existing file, so that two runs never
            mix in one file unasked.

    Cost: one write and one fsync per record.
    """

    def __init__(self, path: str | Path, append: bool = False):
        self.path = Path(path)
        if self.path.exists() and not append:
            raise ValueError(f"{self.path} exists: pass append=True to add to it (a resumed run), or choose another "
                             "out path")
        if self.path.exists() and self.path.is_dir():
            raise ValueError(f"{self.path} is a directory: out must name a .jsonl file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and (cut := _cut_partial_tail(self.path)):
            warnings.warn(f"{self.path}: cut a partial last line ({cut} bytes) left by a killed run before appending",
                          stacklevel=3)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(record_line(record))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_records(path: str | Path) -> list[dict]:
    """The records of a track JSONL file, in order.

    A partial last line (no newline: a killed writer) is skipped with a warning; any other line that is not a
    JSON object of this schema is refused with ValueError naming the file and line.

    Args:
        path: the JSONL file ``track(..., out=path)`` wrote.

    Returns:
        The list of record dicts.

    Cost: one read of the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file (a JSONL file written by batchgap.track)")
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not a JSON line ({e.msg}): not a file written by batchgap.track") from None
        if not isinstance(rec, dict) or rec.get("schema") != SCHEMA:
            raise ValueError(f"{path}:{i}: not a batchgap.track record (schema {SCHEMA!r} expected)")
        out.append(rec)
    if tail.strip():
        warnings.warn(f"{path}: skipped a partial last line ({len(tail)} characters; a killed run?)", stacklevel=2)
    return out
