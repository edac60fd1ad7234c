"""batchgap benchmarks: one command, a table of measurements against targets.

    python benchmarks/run.py                 # everything
    python benchmarks/run.py default-study   # one benchmark by name

Each benchmark measures in this process (or in child processes it starts) and prints one row:
what was measured, the value, the target, and whether it is met. Results belong in
docs/performance.md together with this command. Never a timed unit test: run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _child_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB


def default_study(settings: list[tuple[int, int]]) -> list[dict]:
    """The whole `batchgap run default` (data cached, report included) in a fresh process, per (jobs, threads)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        # generate MNIST-1D once so the timing is the study's, as on every run after the first
        subprocess.run([sys.executable, "-c", f"from batchgap.data import load_dataset; load_dataset('mnist1d', data_dir={str(data_dir)!r})"], check=True)
        for jobs, t in settings:
            out = Path(tmp) / f"out-{jobs}-{t}"
            env = {**os.environ, "BATCHGAP_DATA": str(data_dir)}
            start = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "batchgap", "run", "default", "--out", str(out), "--jobs", str(jobs), "--threads", str(t)],
                env=env, capture_output=True, text=True,
            )
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr)
            doc = json.loads((out / "results.json").read_text())
            comp = doc["comparison"]
            rss = _child_peak_rss_mib()  # the largest single process so far (the parent, or one worker)
            rows.append({
                "benchmark": f"default study, --jobs {jobs} --threads {t}",
                "value": f"{wall:.1f} s wall, peak RSS {rss:.0f} MiB per process",
                "target": "<= 180 s, <= 2048 MiB",
                "met": wall <= 180 and rss * jobs <= 2048,
                "note": f"gap {100 * comp['test_accuracy_gap']:+.2f} points, p = {comp['p_value']:.2g}",
            })
    return rows


BENCHMARKS = {
    "default-study": lambda: default_study([(2, 1), (1, 1)]),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", choices=[*BENCHMARKS, []], metavar="NAME",
                   help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    args = p.parse_args()
    names = args.names or list(BENCHMARKS)
    import torch

    print(f"# {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}")
    print("| benchmark | measured | target | met | note |")
    print("|---|---|---|---|---|")
    ok = True
    for name in names:
        for row in BENCHMARKS[name]():
            ok &= bool(row["met"])
            print(f"| {row['benchmark']} | {row['value']} | {row['target']} | {'yes' if row['met'] else 'NO'} | {row.get('note', '')} |", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
