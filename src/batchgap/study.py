"""Expand a study into runs, execute them resumably, gather results.json.

Layout of an output directory::

    OUT/results.json              everything the report is drawn from (written atomically, last)
    OUT/report.md, OUT/figures/   the report (batchgap.report)
    OUT/study.json, OUT/plan.json the settings and the planned run ids of the last `batchgap run`
    OUT/init/<model>-s<seed>.pt   x0: the start point shared by every regime of one seed
    OUT/runs/<run id>/            config.json, history.jsonl, state.pt (resumable), model.pt,
                                  result.json (written last: a run with it is finished)
    OUT/pairs/<sb>__<lb>.json     pairwise measures (parametric plot) of one seed

A run id is ``<regime>-s<seed>-<hash>``, the hash over everything that determines the run, so changing
a setting makes new runs and re-running the same study skips the finished ones.

Data-parallel (torchrun, ``--nproc``): every worker trains each unfinished run together
(:mod:`batchgap.distributed`), then the others leave and rank 0 alone measures and writes, as a
single process would. Shards (``--shard I/N``): :mod:`batchgap.sharding`; :func:`merge_results`
gathers what they finished.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import stats

from . import __version__, devices, distributed, sharding
from .config import Regime, StudyConfig, TrainConfig, config_hash, from_dict, resolve_batch_size
from .data import load_dataset, make_augment, check_augment
from .data.base import Dataset
from .errors import UserError
from .measure import data_protocol, distance_from_init, endpoint_metrics, geometry, parametric_plot, trajectory
from .remedies import geometric_schedule, ghost_bn, make_step, switch_schedule
from .models import init_model
from .stacked import exact_layers, stackable, train_stacked
from .train import _load_state, train
from .util import atomic_save_torch, atomic_write_json

Log = Callable[[str], None]


@dataclass
class Run:
    id: str
    regime: Regime
    seed: int
    batch_size: int
    config: dict  # everything that determines the run (hashed into the id)
    keep_epochs: tuple = ()  # iterates kept for warm starts and trajectory measures
    depends_on: str | None = None  # the id of the run whose iterate this one starts from


def kept_epochs(cfg: StudyConfig, regime: Regime) -> tuple[int, ...]:
    """Epochs after which a regime's runs keep their iterate: for the trajectory measures and for the
    regimes that warm-start from it."""
    keep = set(cfg.measure.trajectory_epochs)
    keep |= {r.train.init_from["epoch"] for r in cfg.regimes if r.train.init_from.get("regime") == regime.name}
    return tuple(sorted(e for e in keep if e <= regime.train.epochs))


def plan(cfg: StudyConfig, n_train: int, world_size: int = 1) -> list[Run]:
    """Every (regime, seed) run of the study in a stable order: the runs that start from x0 (seeds outer,
    regimes inner), then the runs that warm-start from another run's iterate.

    With ``world_size`` > 1 workers sharing each run (data-parallel), each batch size must divide among
    them, and the world size is part of the run (per-worker BatchNorm statistics depend on it).
    """
    runs, ids = [], {}
    for seed in cfg.seeds:
        for regime in sorted(cfg.regimes, key=lambda r: bool(r.train.init_from)):
            where = f"regimes.{regime.name}.batch_size"
            bs = resolve_batch_size(regime.batch_size, n_train, where)
            if bs < 2 and cfg.model.bn != "none":
                raise UserError(f"{where}: BatchNorm needs at least 2 examples per batch, got {bs}")
            train = dataclasses.asdict(regime.train)
            if not train["bn_sync"]:  # the default stays out of the hash: earlier runs keep their ids
                del train["bn_sync"]
            run_cfg = {
                "data": dataclasses.asdict(cfg.data),
                "model": dataclasses.asdict(cfg.model),
                "train": train,
                "regime": regime.name,
                "batch_size": bs,
                "seed": seed,
                "keep_epochs": list(kept_epochs(cfg, regime)),
            }
            if world_size > 1:
                _check_data_parallel(cfg, regime, bs, world_size)
                run_cfg["world_size"] = world_size
            init = regime.train.init_from
            depends = ids[(init["regime"], seed)] if init else None
            if depends:
                run_cfg["init_from_run"] = depends  # a changed source run makes a new warm-started run
            run_id = f"{regime.name}-s{seed}-{config_hash(run_cfg)}"
            ids[(regime.name, seed)] = run_id
            runs.append(Run(run_id, regime, seed, bs, run_cfg, tuple(run_cfg["keep_epochs"]), depends))
    return sorted(runs, key=lambda r: r.depends_on is not None)


def _check_data_parallel(cfg: StudyConfig, regime: Regime, bs: int, world_size: int) -> None:
    """Every batch of the regime (its schedule's too) divides among the workers, and per-worker
    BatchNorm gets at least 2 examples."""
    where, t = f"regimes.{regime.name}.batch_size", regime.train
    schedule = batch_schedule(t, bs)
    for size in sorted({schedule(e) for e in range(t.epochs)} if schedule else {bs}):
        if size % world_size:
            raise UserError(f"{where}: the global batch {size} does not divide among {world_size} workers; "
                            f"use a multiple of {world_size}")
        if size // world_size < 2 and cfg.model.bn != "none" and not t.bn_sync:
            raise UserError(f"{where}: {size // world_size} example(s) per worker; per-worker BatchNorm needs "
                            "at least 2 (or set train.bn_sync = true)")
    if t.bn_sync and t.ghost_batch:
        raise UserError(f"regimes.{regime.name}: train.bn_sync and train.ghost_batch exclude each other "
                        "(global-batch statistics or ghost batches)")


def prepare_data(cfg: StudyConfig, data_dir: str | Path | None = None, download: bool = False) -> Dataset:
    """Load the study's data set and cut the seeded subsets it asks for (indices recorded in info)."""
    ds = load_dataset(cfg.data.name, data_dir=data_dir, download=download)
    subset = {}
    for split, k in (("train", cfg.data.train_subset), ("test", cfg.data.test_subset)):
        part = getattr(ds, split)
        if k and k < len(part):
            gen = torch.Generator().manual_seed(cfg.data.subset_seed + (0 if split == "train" else 1))
            idx = torch.randperm(len(part), generator=gen)[:k].sort().values
            setattr(ds, split, part.subset(idx))
            subset[split] = {"n": k, "of": len(part), "seed": cfg.data.subset_seed, "indices_sha": config_hash(idx.tolist())}
    if subset:
        ds.info = {**ds.info, "subset": subset}
    check_augment(cfg.data.augment, ds.input_shape)
    return ds


def environment(device: torch.device | None = None) -> dict:
    import scipy

    return {
        "batchgap": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": devices.describe(device or torch.device("cpu")),
    }


def _init_path(out: Path, cfg: StudyConfig, seed: int) -> Path:
    return out / "init" / f"{cfg.model.name}-{config_hash(dataclasses.asdict(cfg.model))}-s{seed}.pt"


def start_point(out: Path, cfg: StudyConfig, ds: Dataset, seed: int) -> dict:
    """x0 for a seed: built once from the seed, saved, and shared by every regime of that seed.
    Data-parallel workers other than rank 0 build it in memory (DDP starts every worker from rank 0's)."""
    path = _init_path(out, cfg, seed)
    if distributed.is_main() and path.exists():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            pass  # a damaged file is rebuilt: x0 is a pure function of the seed
    model = init_model(cfg.model.name, ds.input_shape, ds.num_classes, seed, bn=cfg.model.bn, **cfg.model.options)
    state = model.state_dict()
    if distributed.is_main():
        atomic_save_torch(state, path)
    return state


def build(cfg: StudyConfig, ds: Dataset, state: dict | None = None) -> torch.nn.Module:
    """The study's model on the device of its data, holding ``state`` when given."""
    model = init_model(cfg.model.name, ds.input_shape, ds.num_classes, 0, bn=cfg.model.bn, **cfg.model.options)
    model = devices.fast_layout(model.to(devices.of(ds)))
    if state is not None:
        model.load_state_dict(state)
    return model


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _finished(done: dict | None, run_id: str, measure_key: str | None = None) -> bool:
    """A run's result.json marks it trained (and, given ``measure_key``, measured with those settings).
    A half-written or foreign file marks nothing."""
    if done is None or done.get("id") != run_id or not done.get("complete"):
        return False
    return measure_key is None or done.get("measure_hash") == measure_key or bool(done.get("diverged_epoch"))


def _remove_temp_files(directory: Path, names: tuple[str, ...] = ("*",)) -> None:
    """Temporary files an atomic write left when its process was killed (only where we are the writer)."""
    for name in names:
        for tmp in directory.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def _train_run(out: Path, cfg: StudyConfig, ds: Dataset, run: Run, progress: bool | None):
    """Train one run, or pick up its finished or interrupted training: (model, x0, TrainResult, step,
    schedule). Data-parallel workers but rank 0 read no file: DDP starts them from rank 0's weights."""
    run_dir = out / "runs" / run.id
    main = distributed.is_main()
    if main:
        if run_dir.is_dir():
            _remove_temp_files(run_dir)
        atomic_write_json(run_dir / "config.json", run.config)
    x0 = start_point(out, cfg, ds, run.seed)
    t = run.regime.train
    start = x0
    if run.depends_on and main:
        start = torch.load(out / "runs" / run.depends_on / "iterates" / f"epoch-{t.init_from['epoch']}.pt",
                           map_location="cpu", weights_only=True)
    model = build(cfg, ds, start)
    if t.ghost_batch:
        ghost_bn(model, t.ghost_batch)
    step = make_step(t.remedy, **t.remedy_options)
    schedule = batch_schedule(t, run.batch_size)
    res = train(
        model, ds.train, ds.test, t, schedule or run.batch_size, seed=run.seed,
        augment=make_augment(t.augment or cfg.data.augment), run_dir=run_dir, step=step, progress=progress,
        desc=f"{run.regime.name} seed {run.seed}", keep_epochs=run.keep_epochs,
    )
    return model, x0, res, step, schedule


def execute_run(out: Path, cfg: StudyConfig, ds: Dataset, run: Run, progress: bool | None = None) -> dict:
    """Train and measure one run; a finished run is returned as it is, or only re-measured when the
    measure settings changed since (training is never repeated)."""
    run_dir = out / "runs" / run.id
    measure_key = config_hash(dataclasses.asdict(cfg.measure))
    done = _read_json(run_dir / "result.json")
    if _finished(done, run.id):
        if _finished(done, run.id, measure_key):
            return done
        model = build(cfg, ds, torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True))
        x0 = start_point(out, cfg, ds, run.seed)
        result = {k: v for k, v in done.items() if k in TRAINING_KEYS}
    else:
        model, x0, res, step, schedule = _train_run(out, cfg, ds, run, progress)
        t = run.regime.train
        model = build(cfg, ds, model.state_dict())  # measured as the plain architecture (ghost BN: same keys)
        result = {
            "id": run.id,
            "regime": run.regime.name,
            "batch_size": run.batch_size,
            "seed": run.seed,
            "lr": res.lr,
            "lr_rule": run.regime.train.lr_rule,
            "optimizer": run.regime.train.optimizer,
            "epochs": res.epochs_done,
            "steps": res.steps,
            "steps_per_epoch": res.steps_per_epoch,
            "diverged_epoch": res.diverged_epoch,
            "wall_time_s": res.wall_time_s,
            "x0": str(_init_path(out, cfg, run.seed).relative_to(out)),
            "checkpoint": str((run_dir / "model.pt").relative_to(out)),
            "history": str((run_dir / "history.jsonl").relative_to(out)),
            "remedy": getattr(step, "protocol", lambda: {"name": "plain"})(),
            "ghost_batch": t.ghost_batch or None,
            "augment": t.augment or cfg.data.augment,
            "batch_schedule": schedule.protocol() if schedule else None,
            "init_from": {**t.init_from, "run": run.depends_on} if run.depends_on else None,
            "device": devices.describe(devices.of(ds)),
        }
        if res.distributed is not None:
            result["distributed"] = res.distributed
    stacked = _read_json(run_dir / "stacked.json")
    if stacked is not None:
        result["stacked"] = stacked
    if result["diverged_epoch"] is None:
        t0 = time.perf_counter()
        metrics = endpoint_metrics(model, ds, cfg.measure)
        result.update(train=metrics["train"], test=metrics["test"], eval_protocol=metrics["protocol"])
        result["distance_from_init"] = distance_from_init(model, x0)
        surface = run.seed == cfg.seeds[0] and run.regime.name in cfg.compare
        result["geometry"] = geometry(model, ds, cfg.measure, run.seed, surface=surface)
        if cfg.measure.trajectory_epochs:
            iterates = {e: torch.load(run_dir / "iterates" / f"epoch-{e}.pt", map_location="cpu", weights_only=True)
                        for e in cfg.measure.trajectory_epochs if e <= result["epochs"]}
            result["trajectory"] = trajectory(lambda st: build(cfg, ds, st), iterates, ds, cfg.measure, run.seed)
        result["measure_time_s"] = time.perf_counter() - t0
    result["measure_hash"] = measure_key
    result["complete"] = True
    atomic_write_json(run_dir / "result.json", result)
    return result


def _log_result(log: Log, r: dict) -> None:
    if r.get("diverged_epoch"):
        log(f"    {r['id']}: diverged at epoch {r['diverged_epoch']}")
    else:
        log(f"    {r['id']}: train {r['train']['accuracy']:.4f}  test {r['test']['accuracy']:.4f}  "
            f"({r['wall_time_s']:.1f} s training, {r.get('measure_time_s', 0):.1f} s measures)")


def stack_groups(out: Path, cfg: StudyConfig, ds: Dataset, runs: list[Run]) -> list[list[Run]]:
    """Runs to train stacked (:mod:`stacked`): per regime, the unfinished seeds whose checkpoints are at
    the same epoch, two or more of them, when the model is small and every layer of it runs stacked
    bitwise as in a single model (so results do not depend on the grouping)."""
    model = build(cfg, ds)
    if devices.of(ds).type != "cpu" or stackable(model) is not None or not exact_layers(model):
        return []  # stacking pays for a small model's per-operation overhead on a CPU
    pending: dict = {}
    for run in runs:
        run_dir = out / "runs" / run.id
        done = _read_json(run_dir / "result.json")
        if done is not None and done.get("id") == run.id and done.get("complete"):
            continue
        state = _load_state(run_dir / "state.pt")
        epochs = 0 if state is None else state["result"]["epochs_done"]
        if state is not None and (state["result"]["diverged_epoch"] is not None or epochs >= run.regime.train.epochs):
            continue  # trained: only measuring is left
        pending.setdefault((run.regime.name, epochs), []).append(run)
    return [group for group in pending.values() if len(group) > 1 and _plain(group[0])]


def _plain(run: Run) -> bool:
    """A run trained by the plain step on a fixed batch size from x0: what :mod:`stacked` reproduces."""
    t = run.regime.train
    return t.remedy == "plain" and not t.ghost_batch and not t.batch_schedule and not run.depends_on


def train_group(out: Path, cfg: StudyConfig, ds: Dataset, runs: list[Run], progress: bool | None = None) -> list[str]:
    """Train the runs of one stack group at once, writing each run directory as :func:`train.train`
    would; :func:`execute_run` then finds them trained and measures them."""
    dirs = [out / "runs" / run.id for run in runs]
    for run, d in zip(runs, dirs):
        atomic_write_json(d / "config.json", run.config)
    models = [build(cfg, ds, start_point(out, cfg, ds, run.seed)) for run in runs]
    regime = runs[0].regime
    train_stacked(models, ds.train, ds.test, regime.train, runs[0].batch_size, [run.seed for run in runs],
                  augment=make_augment(regime.train.augment or cfg.data.augment), run_dirs=dirs,
                  keep_epochs=runs[0].keep_epochs, progress=progress,
                  desc=f"{regime.name} seeds {','.join(str(run.seed) for run in runs)} stacked")
    info = {"k": len(runs), "runs": [run.id for run in runs],
            "note": ("trained at once as one stacked model (batchgap.stacked), bitwise as one at a time; "
                     "wall_time_s is the group's")}
    for d in dirs:
        atomic_write_json(d / "stacked.json", info)
    return [run.id for run in runs]


_WORKER: dict = {}


def _worker_init(cfg: StudyConfig, data_dir, threads: int, device: torch.device) -> None:
    torch.set_num_threads(threads)
    _WORKER["cfg"], _WORKER["ds"] = cfg, devices.place(prepare_data(cfg, data_dir), device)


def _worker_run(out: str, run: Run) -> dict:
    return execute_run(Path(out), _WORKER["cfg"], _WORKER["ds"], run, progress=False)


def _worker_group(out: str, runs: list[Run]) -> list[str]:
    return train_group(Path(out), _WORKER["cfg"], _WORKER["ds"], runs, progress=False)


def execute_runs(out: Path, cfg: StudyConfig, ds: Dataset, runs: list[Run], jobs: int = 1, threads: int | None = None,
                 data_dir=None, progress: bool | None = None, log: Log = lambda s: None,
                 stack_seeds: bool = False) -> list[dict]:
    """Every run, in plan order; with ``jobs`` > 1 in a pool of worker processes (spawned, not forked:
    forking a process that already runs OpenMP threads can hang).

    With ``stack_seeds``, the seeds of a regime that :func:`stack_groups` picks are first trained
    together as one stacked model (one group per worker task), then each run is measured on its own.
    """
    waves = [[r for r in runs if not r.depends_on], [r for r in runs if r.depends_on]]
    if waves[0] and waves[1] and jobs > 1:  # warm-started runs wait for the runs they start from
        return [r for wave in waves for r in execute_runs(out, cfg, ds, wave, jobs, threads, data_dir, progress, log,
                                                          stack_seeds)]
    groups = stack_groups(out, cfg, ds, runs) if stack_seeds else []
    for group in groups:
        log(f"stacking {len(group)} seeds of {group[0].regime.name} ({', '.join(r.id for r in group)})")
    if jobs <= 1:
        for group in groups:
            train_group(out, cfg, ds, group, progress=progress)
        results = []
        for i, run in enumerate(runs, 1):
            log(f"[{i}/{len(runs)}] {run.id}: batch {run.batch_size}, {run.regime.train.epochs} epochs")
            results.append(execute_run(out, cfg, ds, run, progress=progress))
            _log_result(log, results[-1])
        return results
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = threads or max(1, torch.get_num_threads() // jobs)
    log(f"{len(runs)} runs on {jobs} worker processes, {threads} thread(s) each")
    by_id, grouped = {}, {run.id for group in groups for run in group}
    with ProcessPoolExecutor(max_workers=min(jobs, len(runs)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(cfg, data_dir, threads, devices.of(ds))) as pool:
        pending = {pool.submit(_worker_group, str(out), group): group for group in groups}
        pending.update({pool.submit(_worker_run, str(out), run): run for run in runs if run.id not in grouped})
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                task = pending.pop(fut)
                if isinstance(task, list):  # a trained group: measure its runs
                    log(f"trained {len(task)} {task[0].regime.name} seeds stacked")
                    pending.update({pool.submit(_worker_run, str(out), run): run for run in task})
                    continue
                r = fut.result()
                by_id[r["id"]] = r
                log(f"[{len(by_id)}/{len(runs)}] done")
                _log_result(log, r)
    return [by_id[run.id] for run in runs]


TRAINING_KEYS = (
    "id", "regime", "batch_size", "seed", "lr", "lr_rule", "optimizer", "epochs", "steps", "steps_per_epoch",
    "diverged_epoch", "wall_time_s", "x0", "checkpoint", "history", "remedy", "ghost_batch", "augment",
    "batch_schedule", "init_from", "distributed", "device",
)


def batch_schedule(t: TrainConfig, large: int):
    """The regime's batch-size schedule ending at ``large`` (its batch size), or None for a fixed size."""
    s = t.batch_schedule
    if not s:
        return None
    if s["kind"] == "switch":
        return switch_schedule(s["small"], large, s["switch_epoch"])
    return geometric_schedule(s["small"], large, s["epochs"])


def execute_pair(out: Path, cfg: StudyConfig, ds: Dataset, sb: dict, lb: dict) -> dict | None:
    """The parametric plot between the SB and LB solutions of one seed (cached by the two run ids)."""
    if not cfg.measure.interpolation or sb.get("diverged_epoch") or lb.get("diverged_epoch"):
        return None
    path = out / "pairs" / f"{sb['id']}__{lb['id']}.json"
    key = config_hash(dataclasses.asdict(cfg.measure))
    cached = _read_json(path)
    if cached is not None and cached.get("measure_hash") == key:
        return cached
    models = [build(cfg, ds, torch.load(out / r["checkpoint"], map_location="cpu", weights_only=True)) for r in (sb, lb)]
    result = {"seed": sb["seed"], "sb": sb["id"], "lb": lb["id"], "measure_hash": key,
              "parametric": parametric_plot(models[0], models[1], ds, cfg.measure, (sb["regime"], lb["regime"]))}
    atomic_write_json(path, result)
    return result


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value) with the count."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def summarize(cfg: StudyConfig, runs: list[dict]) -> dict:
    summary = {}
    for regime in cfg.regimes:
        rs = [r for r in runs if r["regime"] == regime.name]
        ok = [r for r in rs if not r.get("diverged_epoch")]
        summary[regime.name] = {
            "batch_size": rs[0]["batch_size"] if rs else None,
            "lr": rs[0]["lr"] if rs else None,
            "runs": len(rs),
            "diverged": len(rs) - len(ok),
            "train_accuracy": mean_std([r["train"]["accuracy"] for r in ok]),
            "test_accuracy": mean_std([r["test"]["accuracy"] for r in ok]),
            "train_loss": mean_std([r["train"]["loss"] for r in ok]),
            "test_loss": mean_std([r["test"]["loss"] for r in ok]),
            "distance_from_init": mean_std([r["distance_from_init"]["value"] for r in ok]),
            "wall_time_s": mean_std([r["wall_time_s"] for r in rs]),
            **geometry_summary(ok),
        }
    return summary


def sharpness_key(entry: dict) -> str:
    """'full eps=0.001' or 'subspace-100 eps=0.001': one key per (space, eps) measured."""
    space = "full" if entry.get("subspace_dim") is None else f"subspace-{entry['subspace_dim']}"
    return f"{space} eps={entry['eps']:g}"


def geometry_summary(runs: list[dict]) -> dict:
    """Mean and std over seeds of each geometric quantity the runs carry."""
    geo = [r["geometry"] for r in runs if r.get("geometry")]
    if not geo:
        return {}
    out: dict = {}
    keys = [sharpness_key(e) for e in geo[0].get("sharpness", [])]
    out["sharpness"] = {k: mean_std([next(e["value"] for e in g["sharpness"] if sharpness_key(e) == k) for g in geo]) for k in keys}
    if "adaptive_sharpness" in geo[0]:
        out["adaptive_sharpness"] = mean_std([g["adaptive_sharpness"]["value"] for g in geo])
    if "hessian_eigenvalues" in geo[0]:
        out["hessian_top_eigenvalue"] = mean_std([g["hessian_eigenvalues"]["eigenvalues"][0] for g in geo])
    if "hessian_trace" in geo[0]:
        out["hessian_trace"] = mean_std([g["hessian_trace"]["value"] for g in geo])
    if "noise_scale" in geo[0]:
        out["noise_scale"] = mean_std([g["noise_scale"]["b_simple"] for g in geo])
    return out


def _ratio(a: dict, b: dict) -> float | None:
    return a["mean"] / b["mean"] if a.get("mean") is not None and b.get("mean") else None


def compare(cfg: StudyConfig, runs: list[dict], summary: dict) -> dict | None:
    """The SB - LB test-accuracy gap with Welch's t-test, LB/SB ratios of the geometric measures, and
    the SB/LB distance ratio."""
    if not cfg.compare:
        return None
    sb_name, lb_name = cfg.compare
    def values(name: str, key) -> list[float]:
        return [key(r) for r in runs if r["regime"] == name and not r.get("diverged_epoch")]
    sb = values(sb_name, lambda r: r["test"]["accuracy"])
    lb = values(lb_name, lambda r: r["test"]["accuracy"])
    out = {"small": sb_name, "large": lb_name}
    if sb and lb:
        out["test_accuracy_gap"] = float(np.mean(sb) - np.mean(lb))
        if len(sb) > 1 and len(lb) > 1:
            if np.ptp(sb) == 0 and np.ptp(lb) == 0:
                # Welch's t is 0/0 or x/0 here (scipy warns and returns nan or inf): no p-value to give
                out["test"] = "none: every seed of both regimes has the same test accuracy (no variance to test against)"
            else:
                t = stats.ttest_ind(sb, lb, equal_var=False)
                out["welch_t"], out["p_value"] = float(t.statistic), float(t.pvalue)
                out["test"] = "Welch's two-sided t-test, unequal variances, one value per seed"
    ratios = {}
    for key in ("sharpness", "adaptive_sharpness", "hessian_top_eigenvalue", "hessian_trace", "noise_scale"):
        sb_stat, lb_stat = summary[sb_name].get(key), summary[lb_name].get(key)
        if key == "sharpness" and sb_stat and lb_stat:
            for k in sb_stat:
                ratios[f"sharpness {k}"] = _ratio(lb_stat[k], sb_stat[k])
        elif sb_stat and lb_stat:
            ratios[key] = _ratio(lb_stat, sb_stat)
    if ratios:
        out["large_over_small"] = ratios
    d_sb = values(sb_name, lambda r: r["distance_from_init"]["value"])
    d_lb = values(lb_name, lambda r: r["distance_from_init"]["value"])
    if d_sb and d_lb:
        out["distance_ratio"] = float(np.mean(d_sb) / np.mean(d_lb))
    return out


class OutputLock:
    """``OUT/.lock`` holds the pid of the one ``batchgap run`` writing there; a second one refuses.

    ``name`` and ``what`` make the other locks of :mod:`batchgap.sharding` (a shard's, a report's).
    The file appears with its content at once (hard-linked from a written temporary file), so a
    reader never sees a lock without its pid.
    """

    def __init__(self, out: Path, name: str = ".lock", what: str = "run"):
        self.path = out / name
        self.what = what

    def __enter__(self) -> "OutputLock":
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(f"{os.getpid()} {self.what}")
        try:
            for _ in range(2):
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    held = sharding.read_lock(self.path)
                    if held is not None and sharding.alive(held[0]):
                        raise UserError(f"{self.path.parent}: another batchgap {sharding.describe(held[1])} (pid {held[0]}) "
                                        "is writing there; wait for it or use another --out") from None
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                return self
        finally:
            tmp.unlink(missing_ok=True)
        raise UserError(f"{self.path}: cannot take the output lock")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def check_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the output directory ({e.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: the output directory is not writable")
    existing = out / "results.json"
    if existing.exists():
        prior = _read_json(existing)
        if not isinstance(prior, dict) or not isinstance(prior.get("runs"), list):
            raise UserError(f"{existing}: not a batchgap results file (unreadable or edited); move it away or use another --out")


def check_study(cfg: StudyConfig, data_dir: str | Path | None = None, download: bool = False,
                world_size: int = 1) -> tuple[Dataset, list[Run]]:
    """Everything that can be wrong with the input, found before the output directory is touched:
    the data set and its runs."""
    ds = prepare_data(cfg, data_dir, download)
    runs = plan(cfg, len(ds.train), world_size)
    build(cfg, ds)  # model name, options and input shape
    for regime in cfg.regimes:
        check_augment(regime.train.augment or cfg.data.augment, ds.input_shape)
        batch_schedule(regime.train, 2)  # schedule arguments
    return ds, runs


def _plan_doc(cfg: StudyConfig, runs: list[Run], world_size: int) -> dict:
    return {"study": cfg.to_dict(), "world_size": world_size,
            "runs": [{"id": r.id, "regime": r.regime.name, "seed": r.seed} for r in runs]}


def check_free(out: Path, runs: list[Run], shard: tuple[int, int] | None) -> None:
    """What taking the output would refuse, checked without taking it (before launching workers)."""
    check_output_dir(out)
    held = sharding.read_lock(out / sharding.lock_name(shard))
    if held is not None and sharding.alive(held[0]):
        raise UserError(f"{out}: another batchgap {sharding.describe(held[1])} (pid {held[0]}) is writing there; "
                        "wait for it or use another --out")
    sharding.check_conflicts(out, shard, config_hash([r.id for r in runs]))


def _take_output(held: contextlib.ExitStack, out: Path, runs: list[Run], shard: tuple[int, int] | None) -> None:
    check_output_dir(out)
    what = "run" if shard is None else f"shard {shard[0]}/{shard[1]} {config_hash([r.id for r in runs])}"
    held.enter_context(OutputLock(out, sharding.lock_name(shard), what))
    sharding.check_conflicts(out, shard, config_hash([r.id for r in runs]))
    if shard is None:
        _remove_temp_files(out, ("results.json", "report.md"))  # ours alone: left by a killed run


def _train_data_parallel(out: Path, cfg: StudyConfig, ds: Dataset, runs: list[Run], progress, log: Log) -> None:
    """Every worker trains every run not trained yet, together; then the process group is closed."""
    todo = distributed.broadcast(
        [r.id for r in runs if not _finished(_read_json(out / "runs" / r.id / "result.json"), r.id)]
        if distributed.is_main() else None
    )
    world = distributed.world_size()
    for i, run in enumerate([r for r in runs if r.id in todo], 1):
        log(f"[{i}/{len(todo)}] {run.id}: global batch {run.batch_size} on {world} workers "
            f"({run.batch_size // world} each), {run.regime.train.epochs} epochs")
        _train_run(out, cfg, ds, run, progress)
    distributed.finish()


def _pairs(out: Path, cfg: StudyConfig, ds: Dataset, results: list[dict]) -> list[dict]:
    """The pairwise measures of every seed whose two compared runs are among ``results``."""
    pairs = []
    if cfg.compare:
        by = {(r["regime"], r["seed"]): r for r in results}
        for seed in cfg.seeds:
            sb, lb = by.get((cfg.compare[0], seed)), by.get((cfg.compare[1], seed))
            pair = execute_pair(out, cfg, ds, sb, lb) if sb and lb else None
            if pair is not None:
                pairs.append(pair)
    return pairs


def _results_doc(cfg: StudyConfig, ds: Dataset, results: list[dict], pairs: list[dict], command, t0: float) -> dict:
    summary = summarize(cfg, results)
    return {
        "study": cfg.to_dict(),
        "data": {**data_protocol(ds), "info": ds.info},
        "environment": environment(devices.of(ds)),
        "command": command,
        "runs": results,
        "pairs": pairs,
        "summary": summary,
        "comparison": compare(cfg, results, summary),
        "wall_time_s": time.perf_counter() - t0,
    }


def run_study(
    cfg: StudyConfig,
    out: str | Path,
    data_dir: str | Path | None = None,
    download: bool = False,
    progress: bool | None = None,
    log: Log = lambda s: None,
    command: str | None = None,
    jobs: int = 1,
    threads: int | None = None,
    stack_seeds: bool = False,
    shard: tuple[int, int] | None = None,
    device: str | torch.device | None = None,
) -> dict | None:
    """Run every run of ``cfg`` that has not finished in ``out``, measure, write ``out/results.json``.

    ``jobs`` > 1 runs that many runs at once in worker processes, each with ``threads`` torch threads
    (default: this process's threads divided among the jobs). A run's numbers do not depend on which
    process ran it, only on its settings and the thread count. ``stack_seeds`` trains the seeds of a
    small model's regime at once (:func:`stack_groups`); the results are the same either way.

    ``device`` (:func:`devices.resolve`: default ``$BATCHGAP_DEVICE``, else a GPU when torch sees one, else
    the CPU) holds the data, and every model and measurement follows it.

    ``shard=(I, N)`` runs only shard I of N (:mod:`batchgap.sharding`) and returns ``{"shard", "runs"}``
    without writing results.json (:func:`merge_results` does). In a data-parallel process group every
    worker calls this; rank 0 returns the results, the others None.
    """
    out = Path(out)
    t0 = time.perf_counter()
    world = distributed.world_size()
    if world > 1 and jobs > 1:
        raise UserError("--jobs: whole runs side by side (--jobs) and workers sharing each run (--nproc, torchrun) "
                        "do not mix; use one of them")
    main = distributed.is_main()  # kept: the process group is closed before rank 0 measures
    if not main:
        log, progress = (lambda s: None), False
    # everything that can be wrong with the input is found before the output directory is touched
    device = devices.resolve(device)
    ds, runs = check_study(cfg, data_dir, download, world)
    ds = devices.place(ds, device)
    mine = sharding.select(runs, shard, depends_on=lambda r: r.depends_on, id_of=lambda r: r.id)
    with contextlib.ExitStack() as held:
        distributed.agree(lambda: _take_output(held, out, runs, shard))
        part = "" if shard is None else f" (shard {shard[0]}/{shard[1]}: {len(mine)} of {len(runs)} runs)"
        log(f"study {cfg.name}: {len(cfg.seeds)} seeds x {len(cfg.regimes)} regimes{part}, "
            f"{len(ds.train)} train / {len(ds.test)} test examples -> {out}")
        if main:
            atomic_write_json(out / "study.json", cfg.to_dict())
            atomic_write_json(out / "plan.json", _plan_doc(cfg, runs, world))
        if world > 1:
            _train_data_parallel(out, cfg, ds, mine, progress, log)
            if not main:
                return None
            log("trained on every worker; rank 0 measures")
        results = execute_runs(out, cfg, ds, mine, jobs=jobs, threads=threads, data_dir=data_dir,
                               progress=progress, log=log, stack_seeds=stack_seeds)
        if shard is not None:
            return {"shard": f"{shard[0]}/{shard[1]}", "runs": results}
        doc = _results_doc(cfg, ds, results, _pairs(out, cfg, ds, results), command, t0)
        atomic_write_json(out / "results.json", doc)
    return doc


def merge_results(out: str | Path, data_dir: str | Path | None = None, download: bool = False,
                  command: str | None = None, device: str | torch.device | None = None) -> dict | None:
    """Gather every finished run of the study last started in ``out`` (``OUT/plan.json``) into
    ``OUT/results.json``, with the pairwise measures of each seed whose two runs have finished
    (computed here once, then cached in ``OUT/pairs/``); runs not finished yet are listed under
    ``"unfinished"``. Returns the document, or None when there is nothing to merge: no plan.json
    (an output directory of an older version), or results.json already holds exactly the finished runs.
    """
    out = Path(out)
    t0 = time.perf_counter()
    plan_doc = _read_json(out / "plan.json")
    if plan_doc is None:
        return None
    if not isinstance(plan_doc.get("study"), dict) or not isinstance(plan_doc.get("runs"), list):
        raise UserError(f"{out / 'plan.json'}: not a batchgap plan (edited?); run the study again to rewrite it")
    cfg = from_dict(plan_doc["study"], str(out / "plan.json"))
    measure_key = config_hash(dataclasses.asdict(cfg.measure))
    finished, unfinished = [], []
    for entry in plan_doc["runs"]:
        done = _read_json(out / "runs" / entry["id"] / "result.json")
        (finished if _finished(done, entry["id"], measure_key) else unfinished).append(done or entry)
    check_output_dir(out)
    current = _read_json(out / "results.json")
    if current is not None and [r.get("id") for r in current["runs"]] == [r["id"] for r in finished] \
            and current.get("unfinished", []) == [r["id"] for r in unfinished]:
        return None
    ds = devices.place(prepare_data(cfg, data_dir, download), devices.resolve(device))
    with OutputLock(out, what="report"):
        _remove_temp_files(out, ("results.json", "report.md"))
        doc = _results_doc(cfg, ds, finished, _pairs(out, cfg, ds, finished), command, t0)
        if unfinished:
            doc["unfinished"] = [r["id"] for r in unfinished]
        atomic_write_json(out / "results.json", doc)
    return doc
