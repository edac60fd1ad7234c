"""``batchgap report TRACK.jsonl [TRACK2.jsonl ...]``: the measures of :func:`batchgap.track` along training.

One panel per measure, its value against the training step, one line per run (e.g. SB against LB), and under the
figure the protocol each value was measured on (the objective and its unit, the data, BN mode, parameters, the
method). Writes ``<first file's stem>.png`` and ``.md`` beside the first file, or into ``out``. Reads the files
through :mod:`batchgap.tracklog` alone (a partial last line is skipped with a warning).
"""
from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..errors import UserError  # noqa: E402
from ..tracklog import read_records  # noqa: E402
from ..util import atomic_write_bytes, atomic_write_text  # noqa: E402

PROTOCOL_KEYS = ("k", "tol", "n_probes", "eps", "subspace_dim", "max_iter", "seed", "loss_fn", "objective", "unit", "n",
                 "bn", "params", "attention")


def _runs(paths: list[Path]) -> list[tuple[str, list[dict]]]:
    runs, seen = [], set()
    for path in paths:
        try:
            records = read_records(path)
        except ValueError as e:
            raise UserError(str(e)) from None
        if not records:
            raise UserError(f"{path}: no records (a track file gets one line per measurement)")
        label = str(records[0].get("run") or path.stem)
        if label in seen:
            label = f"{label} ({path.stem})"
        seen.add(label)
        runs.append((label, records))
    return runs


def _measure_names(runs) -> list[str]:
    names: list[str] = []
    for _, records in runs:
        for rec in records:
            names += [n for n in rec.get("measures", {}) if n not in names]
    return names


def _protocol(name: str, records: list[dict]) -> str:
    """One line: how ``name`` was measured (from the run's first record that has it)."""
    m = next((r["measures"][name] for r in records if name in r.get("measures", {})), None)
    if m is None:
        return "not measured"
    parts = [f"{k}={m[k]}" for k in PROTOCOL_KEYS if m.get(k) is not None]
    method = str(m.get("method", "")).split(";")[0].split(" (this one")[0]
    return "; ".join(([method] if method else []) + parts)


def _series(name: str, records: list[dict]):
    pts = [(r["step"], r["measures"][name].get("value")) for r in records if name in r.get("measures", {})]
    pts = [(s, v) for s, v in pts if isinstance(v, (int, float)) and math.isfinite(v)]
    return [s for s, _ in pts], [v for _, v in pts]


def _protocol_lines(names, runs) -> list[str]:
    lines = []
    for name in names:
        texts = {label: _protocol(name, records) for label, records in runs}
        if len(set(texts.values())) == 1:
            lines.append(f"{name}: {next(iter(texts.values()))}")
        else:
            lines += [f"{name} [{label}]: {text}" for label, text in texts.items()]
    for label, records in runs:
        info = records[0].get("measurement_set", {})
        lines.append(f"data [{label}]: {info.get('rows')} rows, {info.get('selection')}; seed {records[0].get('seed')}")
    return lines


def write_track_report(paths, out: str | Path | None = None) -> Path:
    """Draw the measures of track JSONL files along training, one line per file (run); write a PNG and markdown.

    Args:
        paths: the JSONL files (``batchgap.track(..., out=...)``), one run each.
        out: the directory to write into; None for the first file's directory.

    Returns:
        The path of the markdown file (``<first stem>.md``; the figure is ``<first stem>.png`` beside it).

    Cost: reading the files and drawing one figure (seconds).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("report: give at least one .jsonl file written by batchgap.track")
    runs = _runs(paths)
    names = _measure_names(runs)
    if not names:
        raise UserError(f"{paths[0]}: its records hold no measured value (every measure skipped?)")
    folder = paths[0].parent if out is None else Path(out)
    png, md = folder / f"{paths[0].stem}.png", folder / f"{paths[0].stem}.md"
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    lines = _protocol_lines(names, runs)
    chars = int(4.2 * cols * 17)  # monospace 6.5 pt: about 17 characters an inch
    caption = [piece for line in lines for piece in textwrap.wrap(line, chars, subsequent_indent="    ")]
    below = 0.12 * len(caption) + 0.25
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows + below), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for label, records in runs:
            steps, values = _series(name, records)
            ax.plot(steps, values, marker="o", ms=3, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    bottom = below / fig.get_figheight()
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.text(0.01, bottom - 0.01, "\n".join(caption), fontsize=6.5, va="top", family="monospace")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(png, buf.getvalue())
    text = [f"# Geometry along training: {', '.join(label for label, _ in runs)}", "",
            f"![measures along training]({png.name})", "",
            "| run | measure | measurements | first (step) | last (step) | skipped |", "|---|---|---|---|---|---|"]
    for label, records in runs:
        for name in names:
            steps, values = _series(name, records)
            skipped = sum(name in r.get("skipped", {}) for r in records)
            if steps:
                text.append(f"| {label} | {name} | {len(steps)} | {values[0]:.4g} ({steps[0]}) | "
                            f"{values[-1]:.4g} ({steps[-1]}) | {skipped} |")
            else:
                text.append(f"| {label} | {name} | 0 | - | - | {skipped} |")
    over = sum(bool(r.get("budget", {}).get("over")) for _, records in runs for r in records)
    text += ["", "Protocol (each value is the library's measure on the run's fixed measurement set):", ""]
    text += [f"- {line}" for line in lines]
    text += ["", f"Measurements that ran past their seconds budget: {over}." if over else
             "No measurement ran past its budget.", "",
             "Files: " + ", ".join(f"`{p}`" for p in paths), ""]
    atomic_write_text(md, "\n".join(text))
    return md

