"""The ``reparametrization`` study (Dinh et al. 2017, "Sharp minima can generalize for deep nets"): which of
batchgap's measures survive a change of parametrization that leaves the network's function unchanged, and does
the small-batch / large-batch ordering survive it?

The regimes of the study file (its ``compare`` pair: small batch, large batch) are trained for each seed by the
regular study machinery (:func:`batchgap.study.execute_runs`: the same run ids, x0, checkpoints and resumption;
no measurement there). Each trained solution is then measured by :func:`batchgap.measure.geometry` (every measure
``[measure]`` asks for, on the measure's BatchNorm protocol) as trained and after each transform of
``reparam.transforms`` (:mod:`batchgap.landscape.rescale`) at each factor of ``reparam.factors``:

* ``layers``: Dinh et al.'s alpha-scale transformation around the ``reparam.layer``-th ReLU;
* ``batchnorm``: the layer before the ``reparam.layer``-th BatchNorm times alpha (BatchNorm cancels it).

Before measuring, every output on the training and test inputs is checked unchanged to ``reparam.output_rtol``
under the measure's BN protocol; a transform that changes them stops the study (a one-line error). Each
measurement is one file ``OUT/reparam/ID.json`` (ID the hash of the run, transform, factor, layer and measure
settings), so a killed study resumes; :mod:`reparam_table` turns them into ratios, the invariance table and the
ordering, :mod:`reparam_report` into the report.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import devices
from ..config import config_hash, from_dict
from ..errors import UserError, closest
from ..lifecycle import orphaned
from ..typed import build
from ..util import atomic_write_json
from .common import finished, load_study, pool_map, results_head, start_run, study_data
from .reparam_table import summarize

KIND = "reparametrization"
SCHEMA = 1
STUDY_KEYS = ("name", "description", "seeds", "compare", "data", "model", "train", "measure", "regimes")
TOP_KEYS = ("experiment", *STUDY_KEYS, "reparam", "quick")
TRANSFORMS = ("layers", "batchnorm")
# the measure settings of the training runs: none (every measure is taken here, as trained and transformed)
NO_MEASURES = dict(interpolation=False, sharpness_eps=[], adaptive_rho=0.0, hessian_top_k=0, hessian_trace_probes=0,
                   curve_directions=0, surface_points=0, noise_scale_batches=0, norms=False, average_sigma=0.0,
                   average_sigma_relative=0.0, pac_bayes_delta=0.0, worst_case_delta=0.0, density_vectors=0)


@dataclass
class ReparamSettings:
    """The study file's ``[reparam]`` table."""

    factors: list = field(default_factory=lambda: [0.1, 0.5, 2.0, 10.0],
                          metadata={"doc": "alpha: distinct positive numbers other than 1"})
    transforms: list = field(default_factory=lambda: list(TRANSFORMS), metadata={"doc": "layers and/or batchnorm"})
    layer: int = field(default=1, metadata={"min": 1, "doc": "which ReLU (layers) / BatchNorm (batchnorm), 1-based"})
    tolerance: float = field(default=1e-3, metadata={
        "gt": 0, "doc": "a measure is invariant when |ratio - 1| <= tolerance at every factor, run and seed"})
    output_rtol: float = field(default=1e-4, metadata={
        "gt": 0, "doc": "outputs unchanged: max |f'(x) - f(x)| <= output_rtol x max(1, max |f(x)|)"})


def _check_settings(s: ReparamSettings) -> None:
    ok = all(isinstance(a, (int, float)) and not isinstance(a, bool) and 0 < a < float("inf") and a != 1
             for a in s.factors)
    if not s.factors or not ok or len(set(s.factors)) != len(s.factors):
        raise UserError("reparam.factors: expected a list of distinct positive numbers other than 1, "
                        f"got {s.factors!r}")
    s.factors = sorted(float(a) for a in s.factors)
    bad = next((t for t in s.transforms if t not in TRANSFORMS), None)
    if not s.transforms or bad is not None or len(set(s.transforms)) != len(s.transforms):
        hint = closest(str(bad), TRANSFORMS) if bad is not None else ""
        raise UserError(f"reparam.transforms: expected distinct values from {', '.join(TRANSFORMS)}, "
                        f"got {s.transforms!r}{hint}")


def load(path: str | Path, quick: bool = False, sets=()) -> tuple[dict, object, ReparamSettings]:
    """The study file checked as written, then with ``--quick`` (its ``[quick]`` table) and ``--set`` applied.

    Returns:
        ``(raw dict, the study as a StudyConfig, ReparamSettings)``; a mistake raises a one-line UserError."""
    return load_study(path, quick, sets, TOP_KEYS, check)


def check(raw: dict, where: str):
    """The study tables and ``[reparam]`` checked: ``(StudyConfig, ReparamSettings)`` or a one-line UserError."""
    cfg = from_dict({k: raw[k] for k in STUDY_KEYS if k in raw}, where)
    if len(cfg.compare) != 2:
        raise UserError(f"{where}: compare: expected [small-batch regime, large-batch regime] (two regimes)")
    settings = build(ReparamSettings, raw.get("reparam", {}), "reparam")
    _check_settings(settings)
    if cfg.measure.bn not in ("eval", "batch", "recompute"):
        raise UserError(f"measure.bn: {cfg.measure.bn!r} is not a protocol the outputs can be checked under")
    return cfg, settings


def check_model(cfg, s: ReparamSettings) -> None:
    """Refuse (UserError) a model a transform does not apply to or does not preserve, tried at alpha = 2 on x0."""
    from ..build import fresh
    from ..landscape.rescale import checked

    ds = study_data(cfg)
    net = fresh(cfg, ds, cfg.seeds[0])
    for kind in s.transforms:
        try:
            checked(net, kind, 2.0, ds.train.x[:256].float(), s.layer, cfg.measure.bn,
                    cfg.measure.eval_batch_size, s.output_rtol)
        except ValueError as e:
            raise UserError(f"model {cfg.model.name}: reparam.transforms {kind!r}: {e}") from None


def _training_cfg(cfg):
    """The study as trained: every measurement off (the runs are measured here, transformed and not)."""
    t = copy.deepcopy(cfg)
    t.measure = dataclasses.replace(cfg.measure, **NO_MEASURES)
    return t


def measure_one(job: dict) -> dict:
    """One measurement (in this process or a worker): the run's solution, transformed and checked, measured.

    Args:
        job: ``cfg``, ``settings``, ``run`` (id, seed, regime, checkpoint), ``kind`` ("none", "layers",
            "batchnorm"), ``alpha``, ``id``, ``path`` (its record's file).

    Returns:
        The record: the job's spec, the outputs' change, the train and test metrics and the geometry."""
    from .. import build as builder
    from ..landscape.rescale import max_output_change, transform
    from ..measure import endpoint_metrics, geometry
    from ..rundir import load_checkpoint

    torch.set_num_threads(1)
    cfg, s, run = job["cfg"], job["settings"], job["run"]
    ds = study_data(cfg)
    model = builder.model(cfg, ds, load_checkpoint(Path(run["checkpoint"])))
    change = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    if job["kind"] != "none":
        new = transform(model, job["kind"], job["alpha"], s.layer)
        m = cfg.measure
        change = max(max_output_change(model, new, split.x.float(), m.bn, m.eval_batch_size)
                     for split in (ds.train, ds.test))
        if not change <= s.output_rtol:
            raise UserError(f"run {run['id']}: the {job['kind']} rescaling by {job['alpha']:g} changed the outputs "
                            f"by {change:.3g} (relative; reparam.output_rtol = {s.output_rtol:g}): stopped")
        model = new
    metrics = endpoint_metrics(model, ds, cfg.measure)
    geo = geometry(model, ds, cfg.measure, run["seed"])
    record = {"id": job["id"], "run": run["id"], "seed": run["seed"], "regime": run["regime"], "kind": job["kind"],
              "alpha": job["alpha"], "layer": s.layer, "output_change": change,
              "train": metrics["train"], "test": metrics["test"], "geometry": geo,
              "wall_time_s": time.perf_counter() - t0, "cpu_time_s": time.process_time() - c0}
    if not orphaned():
        atomic_write_json(job["path"], record)
    return record


def run(path, out, *, quick=False, sets=(), jobs=None, progress=None, log=print, force=False) -> Path:
    """Run the study file ``path`` into ``out`` (resuming what it holds); write results.json and the report.

    Args:
        path: the study file.
        out: the output directory.
        quick: apply the study's ``[quick]`` table.
        sets: ``--set`` assignments.
        jobs: processes at once (None: the cores available).
        progress: a progress bar (None: when stderr is a terminal).
        log: called with one line of progress news.
        force: run into a directory that holds another study.

    Returns:
        The path of ``out/report.md``.

    Cost:
        Training every regime x seed, then (1 + transforms x factors) x runs calls of measure.geometry.
    """
    from ..rundir import Output
    from ..study import check_study, execute_runs

    raw, cfg, s, out = start_run(KIND, load, path, out, quick, sets, jobs, force)
    check_model(cfg, s)
    t0 = time.perf_counter()
    tcfg = _training_cfg(cfg)
    ds, runs = check_study(tcfg)  # the regular study's checks and run plan
    jobs = jobs or devices.cores()
    log(f"{KIND}: training {len(runs)} runs into {out}")
    trained = execute_runs(Output(out), tcfg, ds, runs, jobs=min(jobs, len(runs)), progress=progress, log=log)
    ident = {"measure": asdict(cfg.measure), "layer": s.layer, "output_rtol": s.output_rtol, "threads": 1}
    specs, todo, records = [], [], {}
    for r in trained:
        if not r.ok:
            log(f"{r.id} diverged: not measured")
            continue
        info = {"id": r.id, "seed": r.seed, "regime": r.regime, "checkpoint": str(out / r.checkpoint)}
        for kind, alpha in [("none", 1.0)] + [(k, a) for k in s.transforms for a in s.factors]:
            spec_id = config_hash({**ident, "run": r.id, "kind": kind, "alpha": alpha})
            specs.append(spec_id)
            done = finished(out / "reparam" / f"{spec_id}.json", spec_id)
            if done is not None:
                records[spec_id] = done
            else:
                todo.append({"cfg": cfg, "settings": s, "run": info, "kind": kind, "alpha": alpha, "id": spec_id,
                             "path": str(out / "reparam" / f"{spec_id}.json")})
    (out / "reparam").mkdir(parents=True, exist_ok=True)
    log(f"{KIND}: {len(specs)} measurements, {len(specs) - len(todo)} already finished")
    for rec in pool_map(measure_one, todo, jobs, progress, KIND):
        records[rec["id"]] = rec
    recs = [records[i] for i in specs]
    doc = {**results_head(KIND, SCHEMA, cfg, quick, s), "compare": list(cfg.compare), "seeds": list(cfg.seeds),
           "data": asdict(cfg.data), "model": asdict(cfg.model), "measure": asdict(cfg.measure),
           "environment": devices.environment(), "protocol": PROTOCOL,
           "runs": [{"id": r.id, "regime": r.regime, "seed": r.seed, "batch_size": r.batch_size, "lr": r.lr,
                     "ok": r.ok} for r in trained],
           "records": recs, "summary": summarize(recs, s, list(cfg.compare)),
           "wall_time_s": time.perf_counter() - t0}
    atomic_write_json(out / "results.json", doc)
    return report(out)


PROTOCOL = {
    "training": "the study's regimes x seeds by batchgap.study.execute_runs (x0 per seed, run ids as any study)",
    "layers": "Dinh et al. 2017's alpha-scale transformation: the affine step feeding the layer-th ReLU (its "
              "BatchNorm's weight and bias when it has one, else the Linear's) times alpha, the next layer's "
              "weight times 1/alpha (batchgap.landscape.rescale.rescale_layers)",
    "batchnorm": "the Linear before the layer-th BatchNorm times alpha (weight and bias), that BatchNorm's running "
                 "mean times alpha, running variance and eps times alpha^2 (rescale_before_bn)",
    "check": "every output on the training and test inputs under measure.bn, max |f'(x) - f(x)| / max(1, max "
             "|f(x)|) <= reparam.output_rtol, else the study stops",
    "measures": "batchgap.measure.geometry with the study's [measure] settings and the run's seed, on the "
                "transformed model exactly as on the trained one; ratio = value at alpha / value as trained",
    "threads": "1 torch thread per measurement",
}


def report(out) -> Path:
    """Redraw ``out/report.md`` and its figure from ``out/results.json``; the report's path."""
    from .reparam_report import write_report

    return write_report(Path(out))


def show(path, *, quick=False, sets=()) -> dict:
    """The validated settings and the measurements they make, as plain data (``batchgap show``)."""
    raw, cfg, s = load(path, quick, sets)
    return {"experiment": KIND, "name": cfg.name, "description": cfg.description, "seeds": cfg.seeds,
            "compare": cfg.compare, "data": asdict(cfg.data), "model": asdict(cfg.model),
            "train": asdict(cfg.train), "measure": asdict(cfg.measure), "reparam": asdict(s),
            "regimes": [r.name for r in cfg.regimes],
            "measurements_per_run": 1 + len(s.transforms) * len(s.factors)}

