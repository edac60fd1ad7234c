"""The ``critical-batch`` study (McCandlish et al. 2018, Shallue et al. 2019, Merrill et al. 2025).

On the study's training set (``[data]``, n examples) and model (``[model]``, no BatchNorm or dropout):

1. **Steps to target.** For each seed of ``critical.seeds`` (the initialization and the batch order), batch size
   on the log grid ``min_batch x grid_factor^k`` below n, then n itself, and learning rate of ``critical.lrs``:
   plain SGD (:func:`critical_train.sgd_to_targets`) until the full-data training loss reaches every target of
   ``critical.targets`` (or ``max_steps``).
2. **The trade-off.** Per target, the learning rate with the fewest steps (mean over seeds) per batch size, and the
   fit of S(B) = S_min (1 + B_crit / B), i.e. (S/S_min - 1)(E/E_min - 1) = 1, with a bootstrap over seeds
   (:mod:`critical_fit`).
3. **Noise scales.** At the iterates where the reference run (the smallest batch size at its best learning rate
   for the lowest target reached) reaches each target, and at initialization: B_simple exactly and B_noise with a
   Student-t interval from ``probes`` sampled examples (:func:`critical_train.noise_scales`), per seed.
4. **Branching.** From the first seed's reference run at the same checkpoints: SGD branches at every batch size
   of the grid for ``branch_examples`` examples, each at its best learning rate of the grid; the local critical
   batch is the largest B such that every batch size up to it keeps at least (1 - ``branch_tol``) of the loss
   decrease of the smallest batch's branch (Merrill et al. compare the final losses within a tolerance; this
   tolerance is relative to the small batch's progress so that it means the same early and late).

Every job writes ``OUT/jobs/ID.json`` (and its iterates ``ID.pt``), ID the hash of what makes its numbers, so a
killed study resumes with the jobs it finished; ``results.json`` holds every number and the report is drawn
from it (:mod:`critical_report`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import devices
from ..config import config_hash, from_dict
from ..errors import UserError
from ..lifecycle import orphaned
from ..typed import build
from ..util import atomic_save_torch, atomic_write_json
from .common import finished, load_study, pool_map, results_head, start_run, study_data
from .critical_fit import bootstrap_fit, fit_table
from .critical_summary import PROTOCOL, summarize
from .critical_train import branch, noise_scales, sgd_to_targets

KIND = "critical-batch"
SCHEMA = 1
TOP_KEYS = ("experiment", "name", "description", "data", "model", "critical", "quick")


@dataclass
class CriticalSettings:
    """The study file's ``[critical]`` table."""

    min_batch: int = field(default=16, metadata={"min": 1, "doc": "the smallest batch size of the grid"})
    grid_factor: float = field(default=2.0, metadata={"gt": 1, "doc": "batch sizes min_batch x factor^k, then n"})
    lrs: list = field(default_factory=lambda: [0.1, 0.2, 0.4, 0.8, 1.6, 3.2])
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    targets: list = field(default_factory=lambda: [1.2, 0.8, 0.5])
    max_steps: int = field(default=3000, metadata={"min": 1})
    check_ratio: float = field(default=1.05, metadata={"gt": 1, "doc": "the loss is checked on this step grid"})
    blowup: float = field(default=10.0, metadata={"gt": 1})
    probes: int = field(default=64, metadata={"min": 2, "doc": "examples sampled for tr(H Sigma)"})
    confidence: float = field(default=0.95, metadata={"gt": 0})
    resamples: int = field(default=500, metadata={"min": 10, "doc": "bootstrap resamples over seeds"})
    branch_examples: int = field(default=16000, metadata={"min": 1})
    branch_tol: float = field(default=0.1, metadata={"gt": 0})


def _numbers(key: str, values, ints: bool = False, minimum: float = 0.0) -> list:
    ok = isinstance(values, list) and values and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and (isinstance(v, int) or not ints)
        and math.isfinite(v) and (v >= minimum if ints else v > minimum) for v in values)
    if not ok or len(set(values)) != len(values):
        what = "non-negative integers" if ints else "positive numbers"
        raise UserError(f"critical.{key}: expected a non-empty list of distinct {what}, got {values!r}")
    return [int(v) for v in values] if ints else sorted(float(v) for v in values)


def load(path, quick: bool = False, sets=()):
    """The study file checked as written, then with ``--quick`` (its ``[quick]`` table) and ``--set`` applied.

    Args:
        path: the study file.
        quick: apply its ``[quick]`` table.
        sets: ``"key=value"`` assignments, applied last.

    Returns:
        ``(raw dict, the data and model as a StudyConfig, CriticalSettings)``; a mistake raises a UserError.
    """
    return load_study(path, quick, sets, TOP_KEYS, check)


def check(raw: dict, where: str):
    """The data, model and ``[critical]`` tables checked.

    Args:
        raw: the study as plain data.
        where: the study's name in messages.

    Returns:
        ``(StudyConfig holding the data and model, CriticalSettings)``; a mistake raises a one-line UserError.
    """
    study = {"name": raw.get("name", KIND), "data": raw.get("data", {}), "model": raw.get("model", {}),
             "regimes": [{"name": "critical", "batch_size": 1}], "description": raw.get("description", "")}
    cfg = from_dict(study, where)
    s = build(CriticalSettings, raw.get("critical", {}), "critical")
    s.lrs, s.targets = _numbers("lrs", s.lrs), _numbers("targets", s.targets)
    s.seeds = _numbers("seeds", s.seeds, ints=True)
    if not s.confidence < 1:
        raise UserError(f"critical.confidence: expected a number in (0, 1), got {s.confidence!r}")
    if cfg.data.train_subset and s.min_batch > cfg.data.train_subset:
        raise UserError(f"critical.min_batch: {s.min_batch} exceeds data.train_subset = {cfg.data.train_subset}")
    return cfg, s


def batch_grid(n: int, s: CriticalSettings) -> list[int]:
    """The batch sizes: round(min_batch x grid_factor^k) while below n, then n (the full training set).

    Args:
        n: the training set's size.
        s: the settings.

    Returns:
        The increasing list of distinct batch sizes.
    """
    sizes, k = [], 0
    while (b := int(round(s.min_batch * s.grid_factor ** k))) < n:
        if not sizes or b > sizes[-1]:
            sizes.append(b)
        k += 1
    return sizes + [n]


def _float_inputs(ds) -> tuple:
    """The data set, its training inputs as float and its training labels."""
    return ds, ds.train.x.float(), ds.train.y


def _data(cfg):
    """The study's data set (float inputs), loaded once per process."""
    return study_data(cfg, _float_inputs)


def check_model(cfg, s: CriticalSettings) -> int:
    """Refuse (UserError) a model with BatchNorm or dropout or without one logit per class, and a smallest batch
    larger than the training set.

    Args:
        cfg: the data and model.
        s: the settings.

    Returns:
        n, the number of training examples.
    """
    from ..build import fresh
    from ..plugins import check_output

    ds, x, y = _data(cfg)
    net = fresh(cfg, ds, s.seeds[0])
    if any(isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.Dropout)) for m in net.modules()):
        raise UserError(f"model {cfg.model.name}: critical-batch needs a network without BatchNorm or dropout "
                        "(per-example gradients and one loss of the parameters); set model.bn = \"none\"")
    check_output(net, x[:2].cpu(), ds.num_classes, f"model {cfg.model.name}")
    if s.min_batch > len(y):
        raise UserError(f"critical.min_batch: {s.min_batch} exceeds the {len(y)} training examples")
    return len(y)


def run_job(job: dict) -> dict:
    """One job (in this process or a worker): ``train`` (a run to the targets), ``noise`` (B_simple and B_noise
    at a checkpoint) or ``branch`` (branches at one batch size over the learning rates); written atomically.

    Args:
        job: ``cfg``, ``settings``, ``spec`` (the job's own settings, ``kind`` among them), ``id`` and ``path``.

    Returns:
        The job's record (its spec, ``id`` and its numbers).
    """
    from ..build import fresh

    torch.set_num_threads(1)
    cfg, s, spec = job["cfg"], job["settings"], job["spec"]
    ds, x, y = _data(cfg)
    net = fresh(cfg, ds, spec["seed"])
    record = {**spec, "id": job["id"]}
    if spec["kind"] == "train":
        out = sgd_to_targets(net, x, y, spec["batch"], spec["lr"], s.targets, s.max_steps, spec["seed"],
                             s.check_ratio, s.blowup)
        iterates = out.pop("iterates")
        record.update(out, steps=[out["steps"][t] for t in s.targets])
        if spec["keep"] and not orphaned():
            atomic_save_torch({t: v for t, v in iterates.items()}, Path(job["path"]).with_suffix(".pt"))
    else:
        theta = _checkpoint(job, net)
        if spec["kind"] == "noise":
            record.update(noise_scales(net, theta, x, y, s.probes, spec["seed"], s.confidence))
        else:
            losses = [branch(net, theta, x, y, spec["batch"], lr, s.branch_examples, spec["seed"]) for lr in s.lrs]
            record["losses"] = losses
    if not orphaned():
        atomic_write_json(job["path"], record)
    return record


def _checkpoint(job: dict, net) -> torch.Tensor:
    """The parameters a noise or branch job starts from: the initialization or a reference run's iterate."""
    from torch.nn.utils import parameters_to_vector

    if job["spec"]["target"] is None:
        return parameters_to_vector(net.parameters()).detach().clone()
    return torch.load(job["iterates"], weights_only=True)[job["spec"]["target"]]


def _gather(out: Path, cfg, s, ident: dict, specs: list[dict], jobs: int, progress, desc: str, extra=None):
    """Each spec's record: read back where finished, else run (``extra(spec)`` adds job fields)."""
    records, todo = {}, []
    for spec in specs:
        spec["id"] = config_hash({**ident, **spec})
        file = out / "jobs" / f"{spec['id']}.json"
        done = finished(file, spec["id"])
        if done is not None:
            records[spec["id"]] = done
        else:
            todo.append({"cfg": cfg, "settings": s, "spec": spec, "id": spec["id"], "path": str(file),
                         **(extra(spec) if extra else {})})
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    for rec in pool_map(run_job, todo, jobs, progress, desc) if todo else ():  # none to run: no progress bar
        records[rec["id"]] = rec
    return [records[sp["id"]] for sp in specs], len(todo)


def run(path, out, *, quick=False, sets=(), jobs=None, progress=None, log=print, force=False) -> Path:
    """Run the study file ``path`` into ``out``, resuming the jobs it already holds; write results.json and the
    report.

    Args:
        path: the study file.
        out: the output directory.
        quick: apply the study's ``[quick]`` table.
        sets: ``--set`` assignments.
        jobs: jobs at once in worker processes (None: the cores available).
        progress: a progress bar (None: when stderr is a terminal).
        log: called with one line of progress news.
        force: run into a directory that holds another study.

    Returns:
        The path of ``out/report.md``.

    Cost:
        seeds x batch sizes x learning rates SGD runs, seeds x (targets + 1) noise measurements, (targets + 1) x
        batch sizes x learning rates branches of ``branch_examples`` examples.
    """
    raw, cfg, s, out = start_run(KIND, load, path, out, quick, sets, jobs, force)
    n = check_model(cfg, s)
    jobs = jobs or devices.cores()
    sizes = batch_grid(n, s)
    ident = {"data": asdict(cfg.data), "model": asdict(cfg.model), "threads": 1,
             **{k: getattr(s, k) for k in ("targets", "max_steps", "check_ratio", "blowup")}}
    train_specs = [{"kind": "train", "seed": seed, "batch": b, "lr": lr, "keep": b == sizes[0]}
                   for seed in s.seeds for b in sizes for lr in s.lrs]
    runs, fresh_jobs = _gather(out, cfg, s, ident, train_specs, jobs, progress, f"{KIND} runs")
    log(f"{KIND}: {len(runs)} SGD runs ({len(runs) - fresh_jobs} already finished in {out})")
    table = _table(runs, s, sizes)
    fits = [_fit(sizes, table[..., k], s) for k in range(len(s.targets))]
    ref = reference(table, s, sizes)
    noise, branches = [], []
    if ref is not None:
        points = [None] + [t for t in sorted(s.targets, reverse=True) if _reached(runs, ref, t, s)]
        run_ids = {(r["seed"], r["lr"]): r["id"] for r in runs if r["batch"] == sizes[0]}

        def iterates(spec):
            return {"iterates": str(out / "jobs" / f"{run_ids[(spec['seed'], ref['lr'])]}.pt")}

        noise_specs = [{"kind": "noise", "seed": seed, "target": t, "lr": ref["lr"], "batch": sizes[0],
                        "probes": s.probes, "confidence": s.confidence}
                       for seed in s.seeds for t in points if t is None or _reached(runs, ref, t, s, seed)]
        noise, _ = _gather(out, cfg, s, ident, noise_specs, jobs, progress, f"{KIND} noise", iterates)
        seed0 = s.seeds[0]
        branch_specs = [{"kind": "branch", "seed": seed0, "target": t, "lr": ref["lr"], "batch": b, "lrs": s.lrs,
                         "examples": s.branch_examples} for t in points if t is None
                        or _reached(runs, ref, t, s, seed0) for b in sizes]
        branches, _ = _gather(out, cfg, s, ident, branch_specs, jobs, progress, f"{KIND} branches",
                              lambda spec: iterates({**spec, "lr": ref["lr"]}))
    doc = {**results_head(KIND, SCHEMA, cfg, quick, s), "data": asdict(cfg.data), "model": asdict(cfg.model), "n": n,
           "environment": devices.environment(), "protocol": PROTOCOL, "batch_sizes": sizes,
           "runs": [{k: v for k, v in r.items() if k != "keep"} for r in runs], "fits": fits, "reference": ref,
           **summarize(noise, branches, s, sizes)}
    atomic_write_json(out / "results.json", doc)
    return report(out)


def _table(runs: list[dict], s: CriticalSettings, sizes: list[int]) -> np.ndarray:
    """Steps to each target, shape (seeds, batch sizes, lrs, targets), inf where not reached."""
    table = np.full((len(s.seeds), len(sizes), len(s.lrs), len(s.targets)), np.inf)
    for r in runs:
        i, j, k = s.seeds.index(r["seed"]), sizes.index(r["batch"]), s.lrs.index(r["lr"])
        table[i, j, k] = [np.inf if v is None else v for v in r["steps"]]
    return table


def _fit(sizes: list[int], table: np.ndarray, s: CriticalSettings) -> dict:
    fit = fit_table(sizes, table)
    if fit is None:
        return {"fit": None, "reason": "fewer than 3 batch sizes reached this target at any learning rate"}
    interval = bootstrap_fit(sizes, table, s.resamples, 0, s.confidence) if len(s.seeds) > 1 else None
    return {"fit": fit, "interval": interval, "lr": [s.lrs[j] if j >= 0 else None for j in fit["lr_index"]],
            "reason": None}


def reference(table: np.ndarray, s: CriticalSettings, sizes: list[int]) -> dict | None:
    """The reference run: the smallest batch size at its best learning rate (fewest mean steps) for the lowest
    target it reaches in every seed.

    Args:
        table: steps, shape (seeds, batch sizes, lrs, targets), inf for a miss.
        s: the settings.
        sizes: the batch sizes.

    Returns:
        ``{"batch", "lr", "target"}``, or None when the smallest batch reaches no target.
    """
    mean = table[:, 0].mean(axis=0)  # (lrs, targets)
    for k in np.argsort(s.targets):  # the lowest target first
        if np.isfinite(mean[:, k]).any():
            return {"batch": sizes[0], "lr": s.lrs[int(np.argmin(mean[:, k]))], "target": s.targets[k]}
    return None


def _reached(runs, ref, target, s, seed=None) -> bool:
    k = s.targets.index(target)
    return all(r["steps"][k] is not None for r in runs if r["batch"] == ref["batch"] and r["lr"] == ref["lr"]
               and (seed is None or r["seed"] == seed))


def report(out) -> Path:
    """Redraw ``out/report.md`` and its figures from ``out/results.json``.

    Args:
        out: the output directory.

    Returns:
        The report's path.
    """
    from .critical_report import write_report

    return write_report(Path(out))


def show(path, *, quick=False, sets=()) -> dict:
    """The validated settings as plain data (``batchgap show``).

    Args:
        path: the study file.
        quick: apply its ``[quick]`` table.
        sets: ``--set`` assignments.

    Returns:
        A JSON-able dict.
    """
    raw, cfg, s = load(path, quick, sets)
    n = cfg.data.train_subset or None
    return {"experiment": KIND, "name": cfg.name, "description": cfg.description, "data": asdict(cfg.data),
            "model": asdict(cfg.model), "critical": asdict(s), "batch_sizes": batch_grid(n, s) if n else None}
