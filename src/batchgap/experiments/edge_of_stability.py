"""The ``edge-of-stability`` study (Cohen et al. 2021, 2022): the sharpness along training against 2/eta.

On a seeded subset of the training set (``data.train_subset``), for each loss in ``eos.losses`` (cross-entropy,
squared error on one-hot targets), the model from the same x0 (``eos.seed``) is trained by

* full-batch gradient descent at each step size of ``eos.gd_lrs``,
* SGD at step size ``eos.sgd_lr`` with each batch size of ``eos.sgd_batch_sizes``,
* full-batch Adam at ``eos.adam_lr`` (betas, eps),

GD and SGD for ``eos.time / lr`` steps (the same time lr x steps for every step size), Adam for
``eos.adam_steps``, each measured ``eos.points`` times along the way (:func:`eos_trace.trace`): the full-data
training loss, lambda_max of its Hessian and, for Adam, lambda_max(P^-1 H). Each run is one file
``OUT/traces/ID.json`` (ID the hash of everything that makes its numbers), so a killed study resumes with the
runs it finished; ``results.json`` gathers them with each run's summary against its threshold
(:mod:`eos_summary`), and :mod:`eos_report` draws the report.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import devices
from ..config import from_dict
from ..errors import UserError, closest
from ..lifecycle import orphaned
from ..typed import build
from ..util import atomic_write_json
from .common import finished, load_study, pool_map, results_head, start_run, study_data
from .eos_summary import summarize, threshold
from .eos_trace import LOSSES, model_objective, trace

KIND = "edge-of-stability"
SCHEMA = 1
TOP_KEYS = ("experiment", "name", "description", "data", "model", "eos", "quick")


@dataclass
class EosSettings:
    """The study file's ``[eos]`` table."""

    losses: list = field(default_factory=lambda: list(LOSSES), metadata={"doc": "cross-entropy and/or mse"})
    gd_lrs: list = field(default_factory=lambda: [0.1, 0.2, 0.4])
    time: float = field(default=200.0, metadata={"gt": 0, "doc": "lr x steps of every GD and SGD run"})
    points: int = field(default=50, metadata={"min": 2, "doc": "measurements per run (every steps/points steps)"})
    sgd_lr: float = field(default=0.2, metadata={"gt": 0})
    sgd_batch_sizes: list = field(default_factory=lambda: [25, 100, 400])
    adam_lr: float = field(default=1e-3, metadata={"gt": 0})
    adam_steps: int = field(default=1000, metadata={"min": 1})
    beta1: float = field(default=0.9, metadata={"min": 0})
    beta2: float = field(default=0.999, metadata={"min": 0})
    eps: float = field(default=1e-8, metadata={"gt": 0})
    seed: int = field(default=0, metadata={"min": 0, "doc": "x0, SGD's batches, Lanczos start vectors"})
    tol: float = field(default=1e-3, metadata={"gt": 0, "doc": "Lanczos: relative residual estimate"})
    max_lanczos: int = field(default=60, metadata={"min": 2})
    blowup: float = field(default=100.0, metadata={"gt": 1, "doc": "diverged: loss above blowup x the first"})


def _check_lists(s: EosSettings) -> None:
    if not s.losses or any(v not in LOSSES for v in s.losses) or len(set(s.losses)) != len(s.losses):
        bad = next((v for v in s.losses if v not in LOSSES), None)
        hint = closest(str(bad), LOSSES) if bad is not None else ""
        raise UserError(f"eos.losses: expected distinct values from {', '.join(LOSSES)}, got {s.losses!r}{hint}")
    for key in ("gd_lrs", "sgd_batch_sizes"):
        values = getattr(s, key)
        ints = key == "sgd_batch_sizes"
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and (not ints or isinstance(v, int))
                 for v in values)
        if not ok or len(set(values)) != len(values):
            what = "positive integers" if ints else "positive numbers"
            raise UserError(f"eos.{key}: expected a list of distinct {what}, got {values!r}")
    s.gd_lrs = [float(v) for v in s.gd_lrs]
    if not s.beta1 < 1 or not s.beta2 < 1:
        raise UserError(f"eos.beta1, eos.beta2: expected numbers in [0, 1), got {s.beta1!r}, {s.beta2!r}")


def load(path: str | Path, quick: bool = False, sets=()) -> tuple[dict, object, EosSettings]:
    """The study file checked as written, then with ``--quick`` (its ``[quick]`` table) and ``--set`` applied.

    Args:
        path: the study file.
        quick: apply its ``[quick]`` table.
        sets: ``"key=value"`` assignments, applied last.

    Returns:
        ``(raw dict, the data and model as a StudyConfig, EosSettings)``; a mistake raises a one-line UserError.
    """
    return load_study(path, quick, sets, TOP_KEYS, check)


def check(raw: dict, where: str):
    """The data, model and ``[eos]`` tables checked.

    Args:
        raw: the study as plain data.
        where: the study's name in messages.

    Returns:
        ``(StudyConfig holding the data and model, EosSettings)``; a mistake raises a one-line UserError.
    """
    name = raw.get("name", KIND)
    study = {"name": name, "data": raw.get("data", {}), "model": raw.get("model", {}),
             "regimes": [{"name": "eos", "batch_size": 1}], "description": raw.get("description", "")}
    cfg = from_dict(study, where)
    settings = build(EosSettings, raw.get("eos", {}), "eos")
    _check_lists(settings)
    n = cfg.data.train_subset
    if n and max(settings.sgd_batch_sizes, default=0) > n:
        raise UserError(f"eos.sgd_batch_sizes: {max(settings.sgd_batch_sizes)} exceeds data.train_subset = {n}")
    return cfg, settings


def plan(cfg, s: EosSettings) -> list[dict]:
    """The runs: per loss, GD at each step size, SGD at each batch size, Adam.

    Args:
        cfg: the data and model (unused but for symmetry with the other stages).
        s: the settings.

    Returns:
        One dict per run: loss, optimizer, lr, batch_size (0: full batch), steps (time / lr for GD and SGD),
        every (steps // points), label.
    """
    runs = []
    for loss in s.losses:
        specs = [("gd", lr, 0) for lr in s.gd_lrs] + [("sgd", s.sgd_lr, b) for b in s.sgd_batch_sizes]
        specs.append(("adam", s.adam_lr, 0))
        for opt, lr, b in specs:
            steps = s.adam_steps if opt == "adam" else max(1, round(s.time / lr))
            label = {"gd": f"GD eta={lr:g}", "sgd": f"SGD eta={lr:g} batch {b}", "adam": f"Adam eta={lr:g}"}[opt]
            runs.append({"loss": loss, "optimizer": opt, "lr": lr, "batch_size": b, "steps": steps,
                         "every": max(1, steps // s.points), "label": label})
    return runs


def _identity(cfg, s: EosSettings) -> dict:
    """What, beside a run's own spec, makes its numbers: the data, the model, the settings every run shares."""
    keep = ("seed", "beta1", "beta2", "eps", "tol", "max_lanczos", "blowup")
    return {"data": asdict(cfg.data), "model": asdict(cfg.model), **{k: getattr(s, k) for k in keep},
            "threads": 1}


def check_model(cfg, s: EosSettings) -> None:
    """Refuse (UserError) a model with BatchNorm or dropout, one that does not map the inputs to one logit per
    class, and an SGD batch larger than the training set.

    Args:
        cfg: the data and model.
        s: the settings.

    Returns:
        None.
    """
    from ..build import fresh
    from ..plugins import check_output

    ds = study_data(cfg)
    net = fresh(cfg, ds, s.seed)
    if any(isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.Dropout)) for m in net.modules()):
        raise UserError(f"model {cfg.model.name}: edge-of-stability needs a network without BatchNorm or dropout "
                        "(the loss must be one function of the parameters); set model.bn = \"none\"")
    check_output(net, ds.train.x[:2].cpu(), ds.num_classes, f"model {cfg.model.name}")
    if max(s.sgd_batch_sizes, default=0) > len(ds.train.y):
        raise UserError(f"eos.sgd_batch_sizes: {max(s.sgd_batch_sizes)} exceeds the {len(ds.train.y)} "
                        "training examples")


def run_one(job: dict) -> dict:
    """One run of the plan (in this process or a worker): train and track it, write its record atomically.

    Args:
        job: ``cfg``, ``settings``, ``spec`` (a :func:`plan` entry), ``id`` and ``path`` (its record's file).

    Returns:
        The record: the spec, ``id``, ``n``, ``num_params`` and ``trace`` (:meth:`eos_trace.Trace.as_dict`).
    """
    from ..build import fresh

    torch.set_num_threads(1)
    cfg, s, spec = job["cfg"], job["settings"], job["spec"]
    ds = study_data(cfg)
    net = fresh(cfg, ds, s.seed)
    x, y = ds.train.x.float(), ds.train.y
    obj = model_objective(net, x, y, spec["loss"])
    tr = trace(obj, spec["optimizer"], spec["lr"], spec["steps"], spec["every"], batch_size=spec["batch_size"],
               beta1=s.beta1, beta2=s.beta2, eps=s.eps, seed=s.seed, tol=s.tol, max_lanczos=s.max_lanczos,
               blowup=s.blowup)
    record = {**spec, "id": job["id"], "n": obj.n, "num_params": obj.theta0.numel(), "trace": tr.as_dict()}
    if not orphaned():  # a worker whose study was stopped writes nothing
        atomic_write_json(job["path"], record)
    return record


def run(path, out, *, quick=False, sets=(), jobs=None, progress=None, log=print, force=False) -> Path:
    """Run the study file ``path`` into ``out``, resuming the runs it already holds; write results.json (every
    run's trace and summary) and the report.

    Args:
        path: the study file.
        out: the output directory.
        quick: apply the study's ``[quick]`` table.
        sets: ``--set`` assignments.
        jobs: runs at once in worker processes (None: the cores available).
        progress: a progress bar (None: when stderr is a terminal).
        log: called with one line of progress news.
        force: run into a directory that holds another study.

    Returns:
        The path of ``out/report.md``.

    Cost:
        Per run ``steps`` gradients and ``points`` Lanczos measurements (:func:`eos_trace.trace`); the default
        study: about 140 s of CPU time in all.
    """
    from ..config import config_hash

    raw, cfg, s, out = start_run(KIND, load, path, out, quick, sets, jobs, force)
    check_model(cfg, s)
    ident = _identity(cfg, s)
    specs, todo, records = plan(cfg, s), [], {}
    for spec in specs:
        spec["id"] = config_hash({**ident, **{k: v for k, v in spec.items() if k != "label"}})
        file = out / "traces" / f"{spec['id']}.json"
        done = finished(file, spec["id"])
        if done is not None:
            records[spec["id"]] = done
        else:
            todo.append({"cfg": cfg, "settings": s, "spec": spec, "id": spec["id"], "path": str(file)})
    (out / "traces").mkdir(parents=True, exist_ok=True)
    log(f"{KIND}: {len(specs)} runs, {len(specs) - len(todo)} already finished in {out}")
    for rec in pool_map(run_one, todo, jobs or devices.cores(), progress, KIND):
        records[rec["id"]] = rec
    doc = {**results_head(KIND, SCHEMA, cfg, quick, s), "data": asdict(cfg.data), "model": asdict(cfg.model),
           "environment": devices.environment(), "protocol": PROTOCOL,
           "runs": [summarize(records[sp["id"]], s.beta1) for sp in specs]}
    atomic_write_json(out / "results.json", doc)
    return report(out)


PROTOCOL = {
    "loss": "full-data training loss over the seeded subset (data.train_subset, data.subset_seed); "
            "cross-entropy: mean -log softmax; mse: mean over examples of (1/2)||f(x) - onehot(y)||^2",
    "sharpness": "lambda_max of the Hessian of that loss w.r.t. all trainable parameters, float32 HVPs "
                 "(reverse-over-reverse), Lanczos with full reorthogonalization warm-started from the previous "
                 "eigenvector plus 0.1 x a seeded random unit vector, stopped at relative residual estimate tol "
                 "(at least 4 steps) or max_lanczos steps",
    "preconditioned_sharpness": "Adam: lambda_max(P^-1 H), P = diag(sqrt(v_hat)) + eps at the measured step (Cohen "
                                "et al. 2022 without their bias factor (1 - beta1^t), which is kept in m_hat: the "
                                "same update), as lambda_max of P^-1/2 H P^-1/2",
    "thresholds": "GD and SGD: 2/eta; Adam: (2 + 2 beta1) / ((1 - beta1) eta)",
    "x0": "the model initialized from eos.seed, the same for every run",
    "sgd_batches": "a seeded permutation per epoch, the last partial batch dropped, no momentum",
    "threads": "1 torch thread per run",
}


def report(out) -> Path:
    """Redraw ``out/report.md`` and its figure from ``out/results.json``.

    Args:
        out: the output directory.

    Returns:
        The report's path.
    """
    from .eos_report import write_report

    return write_report(Path(out))


def show(path, *, quick=False, sets=()) -> dict:
    """The validated settings, the runs they make and each run's threshold, as plain data (``batchgap show``).

    Args:
        path: the study file.
        quick: apply its ``[quick]`` table.
        sets: ``--set`` assignments.

    Returns:
        A JSON-able dict.
    """
    raw, cfg, s = load(path, quick, sets)
    return {"experiment": KIND, "name": cfg.name, "description": cfg.description, "data": asdict(cfg.data),
            "model": asdict(cfg.model), "eos": asdict(s),
            "runs": [{k: v for k, v in r.items()} for r in plan(cfg, s)],
            "thresholds": {r["label"] + f" ({r['loss']})": threshold(r, s.beta1) for r in plan(cfg, s)}}
