"""Execute a study's plan: train and measure each run resumably, then gather ``OUT/results.json``.

The plan (:mod:`batchgap.plan`) says which runs there are and what makes each one; the output
directory and every file in it are :mod:`batchgap.rundir`'s; the results are :mod:`batchgap.results`
types and the statistics :mod:`batchgap.stats`'. This module only schedules: the runs one after the
other or ``jobs`` at a time in worker processes, every finished run skipped, every interrupted one
resumed, each run in its own torch thread count (a setting of the run, part of its id).

Data-parallel (torchrun, ``--nproc``): every worker trains each unfinished run together (:mod:`batchgap.distributed`)
and measures it together (each full-data pass shared: :mod:`batchgap.landscape.ranks`), rank 0 writing; then the
others leave and rank 0 alone draws the pairwise measures and the results. Shards (``--shard I/N``):
:mod:`batchgap.sharding`; :func:`merge_results` gathers what they finished.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from pathlib import Path
from typing import Callable

import torch

from . import build, devices, distributed, lifecycle, machine, plugins, sharding
from .build import check_study as check_study, prepare_data, start_point
from .config import StudyConfig, config_hash, from_dict
from .data.base import Dataset
from .errors import UserError
from .measure import data_protocol, eval_batches, geometry, measure_trained, parametric_plot
from .plan import Run, batch_schedule, model_tag
from .remedies import ghost_bn, make_step
from .results import SCHEMA, TRAINING_FIELDS, Metrics, Pair, Results, RunResult, from_dict as load
from .rundir import Output, other_study, read_json, remove_temp_files
from .stats import compare, summarize
from .train import train

Log = Callable[[str], None]


# Bumped when a measure's method changes its numbers under the same settings (a resumed study re-measures): 2 the
# exact noise scale; 3 issue 24's labels; 4 the Lanczos-deflated trace and antithetic flatness draws (issue 27); 5 the
# trace shares the spectral density's HVPs (density_and_trace) where both are measured.
MEASURE_METHODS = 5


def _measure_hash(cfg: StudyConfig) -> str:
    return config_hash([dataclasses.asdict(cfg.measure), MEASURE_METHODS])


def _train_run(out: Output, cfg: StudyConfig, ds: Dataset, run: Run, progress: bool | None):
    """Train one run, or pick up its finished or interrupted training: (model, x0, TrainResult, step,
    schedule). Data-parallel workers but rank 0 read no file: DDP starts them from rank 0's weights."""
    rd = out.run(run.id)
    main = distributed.is_main()
    if main:
        rd.clean()
        rd.write_config(run.config)
    x0 = start_point(out, cfg, ds, run.seed)
    t = run.regime.train
    start = out.run(run.depends_on).load_iterate(t.init_from.epoch) if run.depends_on and main else x0
    model = build.model(cfg, ds, start)
    if t.ghost_batch:
        ghost_bn(model, t.ghost_batch)
    step = make_step(t.remedy, **t.remedy_options)
    schedule = batch_schedule(t, run.batch_size)
    res = train(
        model, ds.train, ds.test, t, schedule or run.batch_size, seed=run.seed,
        augment=build.augment(cfg, t.augment or cfg.data.augment), run_dir=rd.path, step=step, progress=progress,
        desc=f"{run.regime.name} seed {run.seed}", keep_epochs=run.keep_epochs, objective=build.objective(cfg),
    )
    return model, x0, res, step, schedule


def _trained(out: Output, cfg: StudyConfig, ds: Dataset, run: Run, res, step, schedule) -> RunResult:
    t = run.regime.train
    rd = out.run(run.id)
    return RunResult(
        id=run.id, regime=run.regime.name, batch_size=run.batch_size, seed=run.seed, lr=res.lr, lr_rule=t.lr_rule,
        optimizer=t.optimizer, epochs=res.epochs_done, steps=res.steps, steps_per_epoch=res.steps_per_epoch,
        diverged_epoch=res.diverged_epoch, wall_time_s=res.wall_time_s,
        x0=out.relative(out.init(model_tag(cfg), run.seed)), checkpoint=out.relative(rd.model),
        history=out.relative(rd.history), remedy=getattr(step, "protocol", lambda: {"name": "plain"})(),
        ghost_batch=t.ghost_batch or None, augment=t.augment or cfg.data.augment,
        batch_schedule=schedule.protocol() if schedule else None,
        init_from={**dataclasses.asdict(t.init_from), "run": run.depends_on} if run.depends_on else None,
        device=devices.describe(devices.of(ds)), threads=run.threads, distributed=res.distributed,
        cpu=machine.cpu_model(), kernels=machine.kernels(devices.of(ds)), train_step="+".join(res.step_kinds) or None,
    )


def execute_run(out: Output, cfg: StudyConfig, ds: Dataset, run: Run, progress: bool | None = None) -> RunResult:
    """Train and measure one run in its thread count; a finished run is returned as it is, or only
    re-measured when the measure settings changed since (training is never repeated)."""
    rd = out.run(run.id)
    measure_key = _measure_hash(cfg)
    with devices.num_threads(run.threads):
        done = rd.finished(run.id, say=False)  # a damaged checkpoint was said by execute_runs
        if done is not None:
            if done.measure_hash == measure_key or done.diverged_epoch:
                return done
            model = build.model(cfg, ds, rd.load_model())
            x0 = start_point(out, cfg, ds, run.seed)
            result = RunResult(**{k: getattr(done, k) for k in TRAINING_FIELDS})
        else:
            model, x0, res, step, schedule = _train_run(out, cfg, ds, run, progress)
            model = build.model(cfg, ds, model.state_dict())  # measured as the plain architecture (ghost BN: same keys)
            result = _trained(out, cfg, ds, run, res, step, schedule)
        _measure_run(cfg, ds, run, rd, model, x0, result)
    if lifecycle.orphaned():  # a --jobs worker whose parent died: a rerun may own the directory now
        os._exit(lifecycle.EXIT_TERMINATED)
    rd.write_result(result)
    return result


def _measure_run(cfg: StudyConfig, ds: Dataset, run: Run, rd, model, x0: dict, result: RunResult) -> None:
    """A trained run's measurements into ``result``, which is then complete. Under a process group every worker
    calls it and shares each full-data pass (landscape/ranks.py); the iterates of a trajectory are files."""
    if result.ok:
        epochs = cfg.measure.trajectory_epochs
        iterates = {e: rd.load_iterate(e) for e in epochs if e <= result.epochs} if epochs else None
        m = measure_trained(model, x0, ds, cfg.measure, run.seed, run.seed == cfg.seeds[0] and run.regime.name in
                            cfg.compare, iterates, lambda st: build.model(cfg, ds, st), geometry,
                            objective=build.objective(cfg))
        result.train, result.test = Metrics(**m.pop("train")), Metrics(**m.pop("test"))
        for key, value in m.items():
            setattr(result, key, value)
    result.measure_hash, result.complete = _measure_hash(cfg), True


def _log_result(log: Log, r: RunResult) -> None:
    log(f"    {r.id}: diverged at epoch {r.diverged_epoch}" if r.diverged_epoch else
        f"    {r.id}: train {r.train.accuracy:.4f}  test {r.test.accuracy:.4f}  "
        f"({r.wall_time_s:.1f} s training, {r.measure_time_s or 0:.1f} s measures)")


_WORKER: dict = {}


def _worker_init(cfg: StudyConfig, data_dir, device: torch.device, parent: int) -> None:
    lifecycle.die_with_parent(parent)  # the parent killed (OOM, SIGKILL) or gone: this worker ends with it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to answer: it stops the workers
    try:  # a worker loads the data itself (the parent's tensors are not shipped to it)
        _WORKER["cfg"], _WORKER["ds"] = cfg, devices.place(prepare_data(cfg, data_dir), device)
    except UserError as e:  # raised by its first task: one line, not a broken pool
        _WORKER["error"] = str(e)


def _worker_run(out: str, run: Run) -> RunResult:
    if "error" in _WORKER:
        raise UserError(f"a --jobs worker process could not load the data the study loaded: {_WORKER['error']}")
    return execute_run(Output(out), _WORKER["cfg"], _WORKER["ds"], run, progress=False)


def default_jobs(runs: list[Run]) -> int:
    """As many runs side by side as the cores hold at the runs' thread counts."""
    return max(1, min(len(runs), devices.cores() // max((r.threads for r in runs), default=1)))


def execute_runs(out: Output, cfg: StudyConfig, ds: Dataset, runs: list[Run], jobs: int = 1, data_dir=None,
                 progress: bool | None = None, log: Log = lambda s: None) -> list[RunResult]:
    """Every run, in plan order: the finished ones read back, the others executed one after the other or,
    with ``jobs`` > 1, in a pool of worker processes (spawned, not forked: forking a process that already
    runs OpenMP threads can hang). Warm-started runs wait for the runs they start from. The numbers do not
    depend on ``jobs``: each run sets its own thread count."""
    key = _measure_hash(cfg)
    by_id = {r.id: done for r in runs if (done := out.run(r.id).finished(r.id, key)) is not None}
    todo = [r for r in runs if r.id not in by_id]
    if by_id:
        log(f"{len(by_id)} of {len(runs)} runs found finished in {out.path}; {len(todo)} to do")
    waves = [[r for r in todo if not r.depends_on], [r for r in todo if r.depends_on]]
    if jobs > 1 and all(waves):  # the warm-started wave after the runs it starts from
        for wave in waves:
            by_id.update({r.id: r for r in execute_runs(out, cfg, ds, wave, jobs, data_dir, progress, log)})
        return [by_id[run.id] for run in runs]
    if jobs <= 1 or len(todo) <= 1:
        for i, run in enumerate(todo, 1):
            log(f"[{i}/{len(todo)}] {run.id}: batch {run.batch_size}, {run.regime.train.epochs} epochs, "
                f"{run.threads} thread(s)")
            by_id[run.id] = execute_run(out, cfg, ds, run, progress=progress)
            _log_result(log, by_id[run.id])
        return [by_id[run.id] for run in runs]
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = ", ".join(sorted({str(r.threads) for r in todo}))
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(cfg, data_dir, devices.of(ds), os.getpid()))
    finished = 0
    try:
        pending = {pool.submit(_worker_run, str(out.path), run) for run in todo}
        sharding.record_processes(p.pid for p in getattr(pool, "_processes", {}).values())  # the lock names them
        log(f"{len(todo)} runs on {min(jobs, len(todo))} worker processes, {threads} thread(s) each")
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                r = fut.result()
                by_id[r.id], finished = r, finished + 1
                log(f"[{finished}/{len(todo)}] done")
                _log_result(log, r)
    except BaseException as e:  # Ctrl-C, SIGTERM or a failed run: stop the other workers now, not after their runs
        _stop(pool)
        if not isinstance(e, UserError):  # a worker's UserError (a full disk, ...) is one line of its own
            log(f"stopped: {finished} of {len(todo)} runs finished and kept; the others resume where their last "
                "checkpoint left them when the same command runs again")
        raise
    pool.shutdown()
    return [by_id[run.id] for run in runs]


def _stop(pool) -> None:
    """Terminate a pool's worker processes at once (their files are written atomically: a killed run
    resumes from its last checkpoint) and wait for them to be gone."""
    procs = list(getattr(pool, "_processes", {}).values())  # CPython's executor keeps them here
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.terminate()
    for p in procs:
        p.join(timeout=10)


def _train_data_parallel(out: Output, cfg: StudyConfig, ds: Dataset, runs: list[Run], progress, log: Log) -> bool:
    """All workers train, then measure (landscape/ranks.py; rank 0 reads and writes the files), each run not trained
    yet, and measure again each trained run measured under other settings; True unless a pass has fewer batches than
    workers or the study measures a trajectory (rank 0's files): then rank 0 measures alone, after."""
    key, main, world = _measure_hash(cfg), distributed.is_main(), distributed.world_size()
    shared = not cfg.measure.trajectory_epochs and eval_batches(ds, cfg.measure)[1] >= world
    done = {r.id: out.run(r.id).finished(r.id) for r in runs} if main else {}
    again = {i: {k: getattr(d, k) for k in TRAINING_FIELDS} for i, d in done.items()
             if d is not None and shared and d.measure_hash != key and not d.diverged_epoch}
    todo, again = distributed.broadcast(([i for i, d in done.items() if d is None or i in again], again))
    for i, run in enumerate([r for r in runs if r.id in todo], 1):
        log(f"[{i}/{len(todo)}] {run.id}: " + (f"measured again on {world} workers" if run.id in again else
            f"global batch {run.batch_size} on {world} workers ({run.batch_size // world} each), "
            f"{run.regime.train.epochs} epochs"))
        with devices.num_threads(run.threads):
            if run.id in again:  # trained: rank 0's model on every worker
                state = distributed.broadcast(out.run(run.id).load_model() if main else None)
                x0, result = start_point(out, cfg, ds, run.seed), RunResult(**again[run.id])
            else:
                model, x0, res, step, schedule = _train_run(out, cfg, ds, run, progress)
                state, result = model.state_dict(), _trained(out, cfg, ds, run, res, step, schedule)
            if shared:
                _measure_run(cfg, ds, run, None, build.model(cfg, ds, state), x0, result)
                if main:
                    out.run(run.id).write_result(result)
    distributed.finish()
    return shared


def execute_pair(out: Output, cfg: StudyConfig, ds: Dataset, sb: RunResult, lb: RunResult) -> Pair | None:
    """The parametric plot between the SB and LB solutions of one seed (cached by the two run ids)."""
    if not cfg.measure.interpolation or not sb.ok or not lb.ok:
        return None
    path, key = out.pair(sb.id, lb.id), _measure_hash(cfg)
    cached = read_json(path)
    if cached is not None and cached.get("measure_hash") == key and cached.get("schema") == SCHEMA:
        return load(Pair, cached, str(path))
    with devices.num_threads(sb.threads):
        models = [build.model(cfg, ds, out.run(r.id).load_model()) for r in (sb, lb)]
        pair = Pair(sb.seed, sb.id, lb.id, key, parametric_plot(models[0], models[1], ds, cfg.measure,
                                                                (sb.regime, lb.regime), build.objective(cfg)))
    out.write(path, pair)
    return pair


def _pairs(out: Output, cfg: StudyConfig, ds: Dataset, results: list[RunResult]) -> list[Pair]:
    """The pairwise measures of every seed whose two compared runs are among ``results``."""
    pairs = []
    if cfg.compare:
        by = {(r.regime, r.seed): r for r in results}
        for seed in cfg.seeds:
            sb, lb = by.get((cfg.compare[0], seed)), by.get((cfg.compare[1], seed))
            pair = execute_pair(out, cfg, ds, sb, lb) if sb and lb else None
            if pair is not None:
                pairs.append(pair)
    return pairs


def _results(cfg: StudyConfig, ds: Dataset, runs: list[RunResult], pairs: list[Pair], command, t0: float,
             unfinished: list[str] = (), user: dict | None = None) -> Results:
    summary = summarize(cfg.regime_names(), runs)
    return Results(
        study=cfg.to_dict(), data={**data_protocol(ds), "info": ds.info},
        environment=devices.environment(devices.of(ds)),
        command=command, runs=runs, pairs=pairs, summary=summary,
        comparison=compare(cfg.compare[0], cfg.compare[1], runs, summary) if cfg.compare else None,
        wall_time_s=time.perf_counter() - t0, unfinished=list(unfinished), user=user or {},
    )


def check_one_study(out: Output, cfg: StudyConfig, force: bool = False, world_size: int = 1) -> None:
    """Refuse to run ``cfg`` into an output directory that holds another study (see :func:`run_study`), or
    this one on another number of data-parallel workers (its runs would be other runs)."""
    if not out.study.exists():
        return
    before = read_json(out.study)
    why = "its study.json is unreadable" if before is None else other_study(before, cfg.to_dict())
    planned = (read_json(out.plan) or {}).get("world_size", world_size)
    if not why and planned != world_size:
        why = f"trained on {planned} data-parallel worker(s) there, {world_size} now"
    if why and not force:
        raise UserError(f"{out.path} holds another study ({why}); one output directory holds one study: "
                        "use another --out, or --force to make this directory the new study's")


def _plan_doc(cfg: StudyConfig, runs: list[Run], world_size: int) -> dict:
    return {"study": cfg.to_dict(), "world_size": world_size,
            "runs": [{"id": r.id, "regime": r.regime.name, "seed": r.seed} for r in runs]}


def run_study(cfg: StudyConfig, out: str | Path, data_dir: str | Path | None = None, download: bool = False,
              progress: bool | None = None, log: Log = lambda s: None, command: str | None = None,
              jobs: int | None = None, shard: tuple[int, int] | None = None,
              device: str | torch.device | None = None, force: bool = False) -> Results | dict | None:
    """Run every run of ``cfg`` that has not finished in ``out``, measure, write ``out/results.json``.

    ``jobs`` runs go side by side in worker processes (default: the cores available divided by the
    runs' thread count, ``train.threads``); a run's numbers do not depend on it.

    ``device`` (:func:`devices.resolve`: default ``$BATCHGAP_DEVICE``, else a GPU when torch sees one, else
    the CPU) holds the data, and every model and measurement follows it.

    An output directory holds one study: a run of another study into it (or of this one with settings
    that change its runs: :func:`rundir.other_study`) is refused, unless ``force``, which makes ``out``
    this study's (the other's runs stay under ``runs/`` and are reused if their settings come back).

    ``shard=(I, N)`` runs only shard I of N (:mod:`batchgap.sharding`) and returns ``{"shard", "runs"}``
    without writing results.json (:func:`merge_results` does). In a data-parallel process group every
    worker calls this; rank 0 returns the results, the others None.

    Args:
        cfg: the study (:func:`load_study`).
        out: the output directory (created; a killed study resumes in it where it stopped).
        data_dir: where the data sets' files live; None for ``$BATCHGAP_DATA``, else ``~/.cache/batchgap/data``.
        download: fetch missing data files first.
        progress: show progress bars; None for only when output is a terminal.
        log: called with each line of progress text (default: nothing).
        command: the command line to record in the results (None: not recorded).
        jobs: runs side by side in worker processes; None for the cores available over ``train.threads``.
        shard: ``(I, N)`` to run only shard I of N, or None for all runs.
        device: where the data, models and measurements live; None for ``$BATCHGAP_DEVICE``, else a GPU when
            torch sees one, else the CPU.
        force: make ``out`` this study's even when it holds another study's runs.

    Returns:
        The :class:`Results` written to ``out/results.json``; with ``shard``, ``{"shard", "runs"}`` instead;
        None on the ranks other than 0 of a data-parallel group.

    Cost:
        One training (``cfg.train.epochs`` epochs) and one set of ``measure.*`` measurements per run not yet
        finished in ``out`` (regimes x seeds); finished runs are read back, not recomputed.
    """
    out = Output(out)
    t0 = time.perf_counter()
    world = distributed.world_size()
    if world > 1 and (jobs or 1) > 1:
        raise UserError("--jobs: whole runs side by side (--jobs) and workers sharing each run (--nproc, torchrun) "
                        "do not mix; use one of them")
    main = distributed.is_main()  # kept: the process group is closed before rank 0 measures
    if not main:
        log, progress = (lambda s: None), False
    # everything that can be wrong with the input is found before the output directory is touched
    device = devices.resolve(device)
    ds, runs = check_study(cfg, data_dir, download, world, device)
    ds = devices.place(ds, device)
    mine = sharding.select(runs, shard, depends_on=lambda r: r.depends_on, id_of=lambda r: r.id)
    jobs = 1 if world > 1 else jobs or default_jobs(mine)
    key = config_hash([r.id for r in runs])
    with contextlib.ExitStack() as held:
        def take() -> None:
            out.check()
            sharding.take(held, out.path, shard, key)
            check_one_study(out, cfg, force, world)
            if shard is None:
                remove_temp_files(out.path, ("results.json", "report.md"))  # ours alone: left by a killed run
        distributed.agree(take)
        part = "" if shard is None else f" (shard {shard[0]}/{shard[1]}: {len(mine)} of {len(runs)} runs)"
        log(f"study {cfg.name}: {len(cfg.seeds)} seeds x {len(cfg.regimes)} regimes{part}, "
            f"{len(ds.train)} train / {len(ds.test)} test examples -> {out.path}")
        if main:
            out.write(out.study, cfg.to_dict())
            out.write(out.plan, _plan_doc(cfg, runs, world))
        if world > 1:
            shared = _train_data_parallel(out, cfg, ds, mine, progress, log)
            if not main:
                return None
            log("trained and measured on every worker" if shared else "trained on every worker; rank 0 measures "
                "alone (a pass has fewer evaluation batches than workers: measure.eval_batch_size at most the "
                "smallest set over the workers measures on all; or the study measures a trajectory)")
        results = execute_runs(out, cfg, ds, mine, jobs=jobs, data_dir=data_dir, progress=progress, log=log)
        if line := machine.note(results):  # a resume on another machine: its runs' last digits may differ
            log(line)
        if shard is not None:
            return {"shard": f"{shard[0]}/{shard[1]}", "runs": results}
        doc = _results(cfg, ds, results, _pairs(out, cfg, ds, results), command, t0, user=runs[0].config.get("user"))
        out.write(out.results, doc)
    return doc


def merge_results(out: str | Path, data_dir: str | Path | None = None, download: bool = False,
                  command: str | None = None, device: str | torch.device | None = None) -> Results | None:
    """Gather every finished run of the study last started in ``out`` (``OUT/plan.json``) into
    ``OUT/results.json``, with the pairwise measures of each seed whose two runs have finished
    (computed here once, then cached in ``OUT/pairs/``); runs not finished yet are listed under
    ``"unfinished"``. Returns the results, or None when there is nothing to merge: no plan.json
    (an output directory of an older version), or results.json already holds exactly the finished runs.
    """
    out = Output(out)
    t0 = time.perf_counter()
    plan_doc = read_json(out.plan)
    if plan_doc is None:
        return None
    if not isinstance(plan_doc.get("study"), dict) or not isinstance(plan_doc.get("runs"), list):
        raise UserError(f"{out.plan}: not a batchgap plan (edited?); run the study again to rewrite it")
    cfg = from_dict(plan_doc["study"], str(out.plan))
    measure_key = _measure_hash(cfg)
    finished, unfinished, stale = [], [], []
    for entry in plan_doc["runs"]:
        rd = out.run(entry["id"])
        done = rd.finished(entry["id"], measure_key)
        if done is None and rd.finished(entry["id"]) is not None:
            stale.append(entry["id"])  # trained, but measured with other settings than the plan's
        (finished.append(done) if done is not None else unfinished.append(entry["id"]))
    if stale:  # a report does not measure: merging would drop them and overwrite results.json with fewer runs
        raise UserError(f"{out.path}: {len(stale)} run(s) were measured with other measure settings than the plan's "
                        f"(e.g. {stale[0]}); run the same `batchgap run` again to measure them, then report")
    out.check()
    current = read_json(out.results)
    if current is not None:
        load(Results, current, str(out.results))  # one line for results of another schema: not merged over
        why = other_study(current["study"], cfg.to_dict())
        if why:
            raise UserError(f"{out.path}: results.json and plan.json are of different studies ({why}); the directory "
                            "mixes studies: run the study again there with --force, or report another directory")
    if current is not None and current.get("schema") == SCHEMA and current.get("unfinished", []) == unfinished \
            and [r.get("id") for r in current["runs"]] == [r.id for r in finished]:
        return None
    ds = devices.place(prepare_data(cfg, data_dir, download), devices.resolve(device))
    with sharding.OutputLock(out.path, what="report"):
        remove_temp_files(out.path, ("results.json", "report.md"))
        user = plugins.identity(cfg.model.name, ds, [r.train.augment or cfg.data.augment for r in cfg.regimes],
                                cfg.root)
        doc = _results(cfg, ds, finished, _pairs(out, cfg, ds, finished), command, t0, unfinished, user)
        out.write(out.results, doc)
    return doc
