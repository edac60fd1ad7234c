"""A study's runs: regimes x seeds, each with its batch size, its settings and a stable id.

This is the one place that turns a batch size as written ("10%", 32) into the number a run trains with
and checks it (against the training set, BatchNorm, the data-parallel workers and the batch schedule),
and the one place that decides what makes two runs the same: a run id is ``<regime>-s<seed>-<hash>``,
the hash over everything that determines the run's numbers (data, model, training settings, batch
size, seed, the torch thread count, the device kind, the number of data-parallel workers, the run a
warm start begins from). Changing any of them makes new runs; re-running the same study skips the
finished ones.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import PERCENT, Regime, StudyConfig, TrainConfig, config_hash
from .errors import UserError
from .objectives import identity as objective_identity
from .plugins import is_spec, resolve
from .remedies import geometric_schedule, switch_schedule


@dataclass
class Run:
    id: str
    regime: Regime
    seed: int
    batch_size: int
    config: dict  # everything that determines the run (hashed into the id)
    keep_epochs: tuple = ()  # iterates kept for warm starts and trajectory measures
    depends_on: str | None = None  # the id of the run whose iterate this one starts from

    @property
    def threads(self) -> int:
        return self.regime.train.threads


def resolve_batch_size(value: int | str, n_train: int, where: str = "batch_size") -> int:
    """An absolute batch size for a training set of ``n_train`` examples (``value`` as config parsed it)."""
    size = max(1, round(n_train * float(PERCENT.match(value).group(1)) / 100)) if isinstance(value, str) else value
    if size > n_train:
        raise UserError(f"{where}: {size} is larger than the training set ({n_train} examples)")
    return size


def batch_schedule(t: TrainConfig, large: int):
    """The regime's batch-size schedule ending at ``large`` (its batch size), or None for a fixed size."""
    s = t.batch_schedule
    if s is None:
        return None
    if s.kind == "switch":
        return switch_schedule(s.small, large, s.switch_epoch)
    return geometric_schedule(s.small, large, s.epochs)


def model_tag(cfg: StudyConfig) -> str:
    """Names x0's file: the model and a hash of its settings and, for the user's factory, of its source
    (x0 is a function of these and the seed)."""
    m = cfg.model
    if not is_spec(m.name):
        return f"{m.name}-{config_hash(dataclasses.asdict(m))}"
    source = resolve(m.name, cfg.root, "model.name")[1]
    return f"user-{config_hash([dataclasses.asdict(m), source])}"


def kept_epochs(cfg: StudyConfig, regime: Regime) -> tuple[int, ...]:
    """Epochs after which a regime's runs keep their iterate: for the trajectory measures and for the
    regimes that warm-start from it."""
    keep = set(cfg.measure.trajectory_epochs)
    keep |= {r.train.init_from.epoch for r in cfg.regimes
             if r.train.init_from and r.train.init_from.regime == regime.name}
    return tuple(sorted(e for e in keep if e <= regime.train.epochs))


def _check_batches(cfg: StudyConfig, regime: Regime, bs: int, world_size: int) -> None:
    """Every batch of the regime (its schedule's too) fits BatchNorm and divides among the workers."""
    where, t = f"regimes.{regime.name}.batch_size", regime.train
    bn = cfg.model.bn != "none"
    if bs < 2 and bn:
        raise UserError(f"{where}: BatchNorm needs at least 2 examples per batch, got {bs}")
    if world_size == 1:
        return
    schedule = batch_schedule(t, bs)
    for size in sorted({schedule(e) for e in range(t.epochs)} if schedule else {bs}):
        if size % world_size:
            raise UserError(f"{where}: the global batch {size} does not divide among {world_size} workers; "
                            f"use a multiple of {world_size}")
        if size // world_size < 2 and bn and not t.bn_sync:
            raise UserError(f"{where}: {size // world_size} example(s) per worker; per-worker BatchNorm needs "
                            "at least 2 (or set train.bn_sync = true)")
    if t.bn_sync and t.ghost_batch:
        raise UserError(f"regimes.{regime.name}: train.bn_sync and train.ghost_batch exclude each other "
                        "(global-batch statistics or ghost batches)")


def plan(cfg: StudyConfig, n_train: int, world_size: int = 1, device: str = "cpu",
         user: dict | None = None) -> list[Run]:
    """Every (regime, seed) run of the study in a stable order: the runs that start from x0 (seeds outer,
    regimes inner), then the runs that warm-start from another run's iterate.

    ``world_size`` > 1 workers share each run (data-parallel); ``device`` is the kind of device that
    trains and measures ("cpu", "cuda"). Both are part of a run, as its thread count is, and so is
    ``user``: the identity of the user's code and data the run depends on (:func:`plugins.identity`).
    """
    runs, ids = [], {}
    objective = objective_identity(cfg.objective, cfg.root)
    for seed in cfg.seeds:
        for regime in sorted(cfg.regimes, key=lambda r: r.train.init_from is not None):
            bs = resolve_batch_size(regime.batch_size, n_train, f"regimes.{regime.name}.batch_size")
            _check_batches(cfg, regime, bs, world_size)
            train = dataclasses.asdict(regime.train)
            if not train["bn_sync"]:  # the default stays out of the hash
                del train["bn_sync"]
            run_cfg = {
                "data": dataclasses.asdict(cfg.data),
                "model": dataclasses.asdict(cfg.model),
                "train": train,
                "regime": regime.name,
                "batch_size": bs,
                "seed": seed,
                "keep_epochs": list(kept_epochs(cfg, regime)),
                "device": device,
            }
            if world_size > 1:
                run_cfg["world_size"] = world_size
            if objective:  # the default objective stays out of the hash
                run_cfg["objective"] = objective
            if user:
                run_cfg["user"] = user
            init = regime.train.init_from
            depends = ids[(init.regime, seed)] if init else None
            if depends:
                run_cfg["init_from_run"] = depends  # a changed source run makes a new warm-started run
            run_id = f"{regime.name}-s{seed}-{config_hash(run_cfg)}"
            ids[(regime.name, seed)] = run_id
            runs.append(Run(run_id, regime, seed, bs, run_cfg, tuple(run_cfg["keep_epochs"]), depends))
    return sorted(runs, key=lambda r: r.depends_on is not None)
