"""The study's shared trace against a separate one, per run (issue 27): each finished run of a default-study output
directory, its results.json trace (``density_and_trace``: measure methods >= 5) beside ``hessian_trace(n_probes=
hessian_trace_probes)`` (Lanczos-deflated, the study's trace before methods 5) on the same model, geometry data,
seed and protocol: both estimates and their 95% half-widths relative to the trace, and the medians.

    batchgap run default --out runs/default
    python benchmarks/shared_trace.py runs/default
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def rows(out: Path) -> list[tuple]:
    import torch

    import batchgap
    from batchgap.build import model as study_model, prepare_data
    from batchgap.config import from_dict
    from batchgap.measure import geometry_data
    from batchgap.rundir import Output

    torch.set_num_threads(1)
    doc = json.loads((out / "results.json").read_text())
    cfg = from_dict(doc["study"], str(out / "results.json"))
    ds, m = prepare_data(cfg), cfg.measure
    found = []
    for r in doc["runs"]:
        model = study_model(cfg, ds, Output(out).run(r["id"]).load_model())
        data, _ = geometry_data(ds, m, r["seed"])
        alone = batchgap.hessian_trace(model, data, n_probes=m.hessian_trace_probes, seed=r["seed"],
                                       batch_size=m.eval_batch_size, bn=m.bn)
        shared = r["geometry"]["hessian_trace"]
        found.append((r["id"], shared["value"], (shared["ci_high"] - shared["value"]) / shared["value"],
                      alone.value, (alone.ci_high - alone.value) / alone.value))
    return found


if __name__ == "__main__":
    got = rows(Path(sys.argv[1]))
    for run, v, w, a, wa in got:
        print(f"{run}: shared {v:.1f} ±{w:.1%}, separate {a:.1f} ±{wa:.1%}")
    medians = [np.median([g[k] for g in got]) for k in (2, 4)]
    print(f"median half-width: shared {medians[0]:.1%}, separate {medians[1]:.1%}")
