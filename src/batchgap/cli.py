"""Command line: parse arguments, call the library. Bad input -> one line on stderr, exit code 2."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from .errors import UserError

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line (no usage dump) with exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .studies import builtin_names
    from .version import __version__

    studies = ", ".join(builtin_names())
    p = _Parser(prog="batchgap", description="The large-batch generalization gap and sharp minima, measured.")
    p.add_argument("--version", action="version", version=f"batchgap {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    run = sub.add_parser("run", help="run a study (train, measure, report)")
    run.add_argument("study", nargs="?", default="default",
                     help=f"a built-in study ({studies}) or a study file FILE.toml (default: default)")
    run.add_argument("--out", type=Path, help="output directory (default: runs/STUDY, runs/STUDY-quick with --quick, "
                                                "runs/STUDY-paper with --paper-scale)")
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                     help="override a setting, e.g. train.epochs=5 or regimes.LB.batch_size=\"5%%\" (repeatable)")
    run.add_argument("--quick", action="store_true",
                     help="shrink the study (few epochs, a slice of the data) for a smoke test")
    run.add_argument("--paper-scale", action="store_true",
                     help="the study at the paper's scale (its [paper_scale] table: CIFAR-10, network C1, 100 epochs; "
                          "a GPU's work)")
    run.add_argument("--data-dir", type=Path,
                     help="where data files live (default: $BATCHGAP_DATA or ~/.cache/batchgap/data)")
    run.add_argument("--download", action="store_true", help="download missing data files first")
    run.add_argument("--no-report", action="store_true", help="write results.json only")
    run.add_argument("--force", action="store_true",
                     help="run into an output directory that holds another study, making it this study's (the "
                          "other's runs stay in runs/); without it that is refused: one directory holds one study")
    run.add_argument("--jobs", type=int, metavar="K",
                     help="run K runs at once in worker processes (default: the cores available divided by the "
                          "runs' threads); the numbers do not depend on it")
    run.add_argument("--nproc", type=int, metavar="N",
                     help="train each run data-parallel on N processes (relaunches itself under torchrun)")
    run.add_argument("--shard", metavar="I/N",
                     help="run only shard I of N (0-based) of the study's runs; merge with `batchgap report OUT`")
    run.add_argument("--threads", type=int, metavar="N",
                     help="torch intra-op threads of each run, as --set train.threads=N: part of a run's id, since "
                          "float rounding depends on it (default: $BATCHGAP_THREADS, else the study's, 1)")
    run.add_argument("--device", metavar="DEVICE",
                     help="auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda or cuda:N "
                          "(default: $BATCHGAP_DEVICE, else auto); under torchrun, cuda means each worker's GPU "
                          "LOCAL_RANK")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bars (default: when stderr is a terminal)")

    rep = sub.add_parser("report", help="merge the finished runs in OUT into OUT/results.json; (re)write the report; "
                                        "or draw TRACK.jsonl files of batchgap.track along training")
    rep.add_argument("out", type=Path, nargs="+", metavar="OUT|TRACK.jsonl",
                     help="a study's output directory (the --out of `batchgap run`), or one or more .jsonl files "
                          "written by batchgap.track (one line per run in the figure)")
    rep.add_argument("--out", dest="to", type=Path, metavar="DIR",
                     help="with .jsonl files: where the figure and markdown go (default: beside the first file)")
    rep.add_argument("--data-dir", type=Path, help="where data files live (for the pairwise measures of a merge)")
    rep.add_argument("--download", action="store_true", help="download missing data files first")

    show = sub.add_parser("show", help="print a study's resolved settings as JSON")
    show.add_argument("study", nargs="?", default="default",
                      help=f"a built-in study ({studies}) or a study file FILE.toml (default: default)")
    show.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                      help="override a setting, as for `batchgap run` (repeatable)")
    show.add_argument("--quick", action="store_true", help="the settings --quick runs")
    show.add_argument("--paper-scale", action="store_true", help="the settings --paper-scale runs")

    meas = sub.add_parser("measure",
                          help="the geometry of a saved model (a checkpoint or a study's run), without a study")
    meas.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                      help="a state_dict saved with torch.save, a whole pickled nn.Module (with --trust-pickle), "
                           "or a study's run directory OUT/runs/ID (its model and data then come from the run)")
    meas.add_argument("--model", metavar="SPEC", help="a factory MODULE:CALLABLE or FILE.py:CALLABLE (called as in a "
                                                      "study file), or a built-in model name")
    meas.add_argument("--options", metavar="JSON", help="the model's keyword arguments as a JSON object")
    meas.add_argument("--bn", metavar="MODE", help="a built-in model's BatchNorm: running (default), batch or none; "
                                                   "a factory's model is measured as built")
    meas.add_argument("--data", metavar="DATA",
                      help="an .npz or .pt file with x_train, y_train, x_test, y_test; a loader MODULE:CALLABLE; or a "
                           "built-in data set name")
    meas.add_argument("--num-classes", type=int, default=0, metavar="K",
                      help="your data's number of classes (default: inferred from the labels)")
    meas.add_argument("--data-dir", type=Path, help="where the built-in data sets' files live")
    meas.add_argument("--download", action="store_true", help="download a built-in data set's missing files first")
    meas.add_argument("--out", type=Path, required=True, metavar="DIR",
                      help="writes DIR/measures.json, DIR/report.md, DIR/figures/ (nothing on bad input)")
    meas.add_argument("--compare", type=Path, metavar="CHECKPOINT2",
                      help="a second checkpoint of the same model and data: adds the parametric plot between the two")
    meas.add_argument("--set", dest="sets", action="append", default=[], metavar="measure.KEY=VALUE",
                      help="override a measure setting, e.g. measure.sharpness_max_iter=5 (repeatable)")
    meas.add_argument("--seed", type=int, help="the measurements' seed (default: a run directory's seed, else 0)")
    meas.add_argument("--trust-pickle", action="store_true",
                      help="allow a checkpoint holding pickled Python objects (unpickling runs code from the file)")
    meas.add_argument("--threads", type=int, default=1, metavar="N",
                      help="torch intra-op threads (default 1; recorded)")
    meas.add_argument("--device", metavar="DEVICE",
                      help="auto, cpu, cuda or cuda:N (default: $BATCHGAP_DEVICE, else auto)")
    meas.add_argument("--no-report", action="store_true", help="write measures.json only")
    meas.add_argument("--nproc", type=int, metavar="N",
                      help="measure data-parallel on N processes of this machine (torchrun; each full-data pass "
                           "split over them, every value as one process's up to float rounding)")

    cor = sub.add_parser("correlate", help="which measure ranks the runs of finished studies by their generalization "
                                           "gap: Kendall's tau and Psi with bootstrap intervals")
    cor.add_argument("outs", type=Path, nargs="+", metavar="OUT", help="finished study output directories")
    cor.add_argument("--out", type=Path, metavar="DIR",
                     help="writes DIR/correlation.md, DIR/correlation.json, DIR/figures/ (default: OUT when one is "
                          "given)")

    sub.add_parser("list", help="list models, data sets and built-in studies")

    data = sub.add_parser("data", help="data set files")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    data_sub.required = True
    dl = data_sub.add_parser("download", help="download a data set's official files and verify their checksums")
    dl.add_argument("name", help=f"a data set: {', '.join(d for d in DATASETS if DATASETS[d].needs_files)} "
                                  "(mnist1d is generated offline)")
    dl.add_argument("--data-dir", type=Path, help="where data files live (default: $BATCHGAP_DATA or "
                                                  "~/.cache/batchgap/data)")
    return p


def _threads(args) -> list[str]:
    """``--threads N`` (else ``$BATCHGAP_THREADS``) as the setting it is: ``train.threads=N``; each refusal
    names the one the user gave."""
    n, name = args.threads, "--threads"
    if n is None:
        env = os.environ.get("BATCHGAP_THREADS", "").strip()
        if not env:
            return []
        if not env.isdigit():
            raise UserError(f"BATCHGAP_THREADS: expected a positive integer, got {env!r}")
        n, name = int(env), "BATCHGAP_THREADS"
    if n < 1:
        raise UserError(f"{name}: must be at least 1, got {n}")
    return [f"train.threads={n}"]


def _warn_threads(threads: int, log) -> None:
    """One line when a run's torch threads outnumber the cores this process may use: they then share
    cores and spin-wait on each other (BATCHGAP_THREADS=999 on 2 cores trained 31 times slower). A warning,
    not a refusal: the thread count is part of a run's id and its float rounding, so reproducing or resuming
    a run made on a larger machine needs that count, slow or not."""
    from .devices import cores

    if threads > cores():
        log(f"batchgap: warning: {threads} torch threads per run on {cores()} available core(s): usually far slower "
            f"than {cores()} (set by --threads, BATCHGAP_THREADS or train.threads; part of each run's id, so kept)")


def _run_experiment(kind: str, path: Path, args) -> int:
    from . import experiments

    if args.paper_scale or (args.nproc or 1) > 1 or args.shard is not None:
        raise UserError(f"{args.study}: --paper-scale, --nproc and --shard are for regimes-and-seeds studies, "
                        f"not the {kind} experiment")
    out = args.out or Path("runs") / (path.stem + ("-quick" if args.quick else ""))
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.download:
        raise UserError(f"--download: the {kind} experiment trains on data generated offline; nothing to download")
    if args.data_dir is not None:  # the experiments read the data directory as every data set does, from here
        os.environ["BATCHGAP_DATA"] = str(args.data_dir)
    print(experiments.run(kind, path, out, quick=args.quick, sets=args.sets, jobs=args.jobs,
                          progress=args.progress, log=log, force=args.force))
    return 0


def _cmd_run(args) -> int:
    from . import devices, distributed, experiments
    from .config import config_hash, load_study
    from .sharding import check_free, parse_shard
    from .studies import find_study
    from .rundir import Output
    from .study import check_one_study, check_study, run_study

    path = find_study(args.study)
    if (kind := experiments.kind_of(path)) is not None:
        return _run_experiment(kind, path, args)
    cfg = load_study(path, [*args.sets, *_threads(args)], quick=args.quick, paper_scale=args.paper_scale)
    out = args.out or Path("runs") / (cfg.name + ("-quick" if args.quick else "-paper" if args.paper_scale else ""))
    command = "batchgap " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else None
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if os.environ.get("RANK", "0") == "0" and "BATCHGAP_PARENT_PID" not in os.environ:  # once, not per rank
        _warn_threads(max(r.train.threads for r in cfg.regimes), log)
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs: must be at least 1, got {args.jobs}")
    shard = parse_shard(args.shard) if args.shard is not None else None
    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc: must be at least 1, got {args.nproc}")
    if (args.nproc or 1) > 1 and (args.jobs or 1) > 1:
        raise UserError("--jobs and --nproc: whole runs side by side (--jobs) and processes sharing each run "
                        "(--nproc) do not mix; use one of them")
    device = devices.resolve(args.device)
    if not distributed.launched() and (args.nproc or 1) > 1:
        # the input is checked here (one line, not N tracebacks), then the command runs under torchrun
        _, runs = check_study(cfg, args.data_dir, args.download, world_size=args.nproc, device=device)
        check_free(out, shard, config_hash([r.id for r in runs]))
        check_one_study(Output(out), cfg, args.force, args.nproc)
        return distributed.launch(args.argv, args.nproc)
    device, launcher = distributed.start_worker(device)
    if launcher and command:
        command = f"{launcher} {command}"
    doc = run_study(cfg, out, data_dir=args.data_dir, download=args.download, progress=args.progress,
                    log=log, command=command, jobs=args.jobs, shard=shard, device=device, force=args.force)
    if doc is None:  # a data-parallel worker other than rank 0, which writes and reports
        return 0
    if shard is not None:
        log(f"shard {doc['shard']}: {len(doc['runs'])} run(s) finished; `batchgap report {out}` merges every "
            "finished run into results.json and the report")
        print(out)
        return 0
    comp = doc.comparison
    if comp is not None and comp.test_accuracy_gap is not None:
        p = f", p = {comp.p_value:.3g}" if comp.p_value is not None else ""
        log(f"test accuracy gap {comp.small} - {comp.large}: {100 * comp.test_accuracy_gap:+.2f} points{p}")
    if not args.no_report:
        from .report import write_report  # matplotlib: only when drawing

        print(write_report(out))
    else:
        print(out / "results.json")
    return 0


def _cmd_show(args) -> int:
    import json

    from .config import load_study
    from .studies import find_study

    from . import experiments

    path = find_study(args.study)
    if (kind := experiments.kind_of(path)) is not None:
        print(json.dumps(experiments.show(kind, path, quick=args.quick, sets=args.sets), indent=2))
        return 0
    cfg = load_study(path, args.sets, quick=args.quick, paper_scale=args.paper_scale)
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def _cmd_measure(args) -> int:
    from . import devices, distributed
    from .measure_cmd import check_nproc, measure, prepare

    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc: must be at least 1, got {args.nproc}")
    if os.environ.get("RANK", "0") == "0":  # once, not per rank
        _warn_threads(args.threads, lambda s: print(s, file=sys.stderr, flush=True))
    launching = not distributed.launched() and (args.nproc or 1) > 1
    device, launcher = args.device, None
    if distributed.launched():  # a torchrun worker: join the group, every full-data pass is shared
        device, launcher = distributed.start_worker(devices.resolve(args.device))
    job = prepare(args.checkpoint, args.out, model=args.model, options=args.options, bn=args.bn, data=args.data,
                  num_classes=args.num_classes, data_dir=args.data_dir, download=args.download, compare=args.compare,
                  sets=args.sets, seed=args.seed, trust_pickle=args.trust_pickle, threads=args.threads,
                  device=device)
    check_nproc(job, args.nproc if launching else distributed.world_size())
    if launching:  # everything checked here (one line, not N tracebacks); the same command under torchrun
        return distributed.launch(args.argv, args.nproc)
    command = "batchgap " + " ".join(shlex.quote(a) for a in args.argv)
    path = measure(job, command=f"{launcher} {command}" if launcher else command)
    if path is None:  # a data-parallel worker other than rank 0, which writes and reports
        return 0
    if args.no_report:
        print(path)
        return 0
    from .report.measures import write_measures_report  # matplotlib: only when drawing

    print(write_measures_report(args.out))
    return 0


def _cmd_correlate(args) -> int:
    from .correlate import TARGETS, correlate
    from .results import load_results

    if args.out is None and len(args.outs) > 1:
        raise UserError("correlate: several outputs need --out DIR for the correlation files")
    loaded = [(str(o), load_results(o)) for o in args.outs]  # each a one-line error when it is not a study output
    unfinished = {name: list(res.unfinished) for name, res in loaded if res.unfinished}
    for name, ids in unfinished.items():
        print(f"batchgap: {name}: {len(ids)} unfinished run(s) left out of the correlation ({', '.join(ids)}); "
              f"finish them and run `batchgap report {name}` to include them", file=sys.stderr)
    tables = [correlate(loaded, target) for target in TARGETS]
    if tables[0].runs_used < 3:
        left = ", ".join(f"{k}: {v}" for k, v in tables[0].left_out.items()) or "none left out"
        raise UserError(f"correlate: {tables[0].runs_used} fitted run(s) of {tables[0].runs_total} ({left}); "
                        "a rank correlation needs at least 3")
    from .report.correlation import write  # matplotlib: only when drawing

    print(write(tables, args.out or args.outs[0], command="batchgap " + " ".join(shlex.quote(a) for a in args.argv),
                unfinished=unfinished))
    return 0


def _cmd_list(args) -> int:
    from .data import list_datasets
    from .models import list_models
    from .studies import list_studies

    print("models:")
    for name, desc, paper in list_models():
        print(f"  {name:<12} {('[' + paper + '] ') if paper else ''}{desc}")
    print("data sets:")
    for name, desc, needs_files in list_datasets():
        print(f"  {name:<12} {desc}{'' if needs_files else ' (generated offline, no download)'}")
    print("studies:")
    for name, desc in list_studies():
        print(f"  {name:<16} {desc}")
    return 0


def _cmd_data(args) -> int:
    from .data import download

    paths = download(args.name, data_dir=args.data_dir)
    if not paths:
        print(f"{args.name}: generated offline on first use, nothing to download", file=sys.stderr)
    for path in paths:
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    handler = {"run": _cmd_run, "report": _report, "show": _cmd_show, "measure": _cmd_measure,
               "correlate": _cmd_correlate,
               "list": _cmd_list,
               "data": _cmd_data}[args.command]
    from .lifecycle import EXIT_TERMINATED, Terminated, terminate_as_interrupt

    try:
        with terminate_as_interrupt():  # SIGTERM (Slurm's time limit, scancel) stops as Ctrl-C does
            return handler(args)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # data-parallel workers all stop; rank 0 says why
            print(f"batchgap: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except Terminated:
        print("batchgap: terminated (SIGTERM); run the same command again to resume", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("batchgap: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except OSError as e:  # the environment (disk full, permissions, read-only, quota) outside an atomic write
        from .util import ENVIRONMENT_ERRNOS

        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"batchgap: error: {e.filename or 'a file'}: {e.strerror}; the same command resumes once that is "
                  "fixed", file=sys.stderr)
        return USAGE_ERROR


def _report(args) -> int:
    if any(p.suffix == ".jsonl" for p in args.out):
        import warnings

        from .report.track import write_track_report  # matplotlib: only when drawing

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            md = write_track_report(args.out, args.to)
        for w in caught:  # a partial last line (a killed run): one line each, not a warning's source listing
            if issubclass(w.category, UserWarning):
                print(f"batchgap: warning: {w.message}", file=sys.stderr)
        print(md)
        return 0
    if len(args.out) > 1 or args.to is not None:
        raise UserError("report: give one study output directory (without --out), or .jsonl files of batchgap.track")
    args.out = args.out[0]
    from . import experiments
    from .report import write_report

    if (kind := experiments.kind_of_output(args.out)) is not None:
        print(experiments.report(kind, Path(args.out)))
        return 0
    from .study import merge_results

    command = "batchgap " + " ".join(shlex.quote(a) for a in args.argv)
    merge_results(args.out, data_dir=args.data_dir, download=args.download, command=command)
    print(write_report(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
