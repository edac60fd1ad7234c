"""``batchgap measure``: the geometry of one saved model, without a study.

A checkpoint (a ``state_dict`` saved with ``torch.save``, a whole pickled ``nn.Module`` with
``trust_pickle``, or a study's run directory ``OUT/runs/ID``), the model it belongs to (a factory
``MODULE:CALLABLE`` or a built-in model) and a data set (an npz/pt file, a loader ``MODULE:CALLABLE`` or a
built-in data set) in; ``DIR/measures.json`` out: every measurement a study's run gets
(:func:`batchgap.measure.geometry`, the 2-D surface included, and the full-set train/test metrics), each
with its protocol, and with a second checkpoint the parametric plot between the two.

:func:`prepare` checks everything (loads both checkpoints, builds the model, loads the data, loads the
weights, runs one forward pass) before anything is written: bad input is one :class:`UserError` line and
``DIR`` is not created. :func:`measure` then computes and writes ``measures.json``; the report
(:mod:`batchgap.report.measures`) draws the figures and ``report.md`` from that file alone.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import build, devices, distributed, plugins
from .config import DataConfig, MeasureConfig, ModelConfig, StudyConfig, from_dict, parse_set
from .data import DATASETS
from .landscape import ranks
from .data.base import Dataset
from .errors import UserError, closest
from .measure import data_protocol, endpoint_metrics, eval_batches, geometry, parametric_plot
from .models import BN_MODES, MODELS, bn_mode
from .rundir import DamagedFile, RunDir, read_json
from .typed import build as typed_build
from .util import atomic_write_json

SCHEMA = 1  # of measures.json
MEASURES = "measures.json"
NAMES = ("A", "B")  # the checkpoint and --compare's, in the parametric plot's formula
UNUSED = {"trajectory_epochs": "needs the iterates kept along a training run; batchgap measure has one checkpoint"}


@dataclass
class Checkpoint:
    """Weights read from a file: a state dict, the pickled module it came from, or a study's run."""
    source: Path  # as given (a file, or a run directory)
    file: Path  # the file the weights were read from
    sha256: str
    format: str  # "state_dict", "pickled module" or "run directory"
    state: dict
    module: nn.Module | None = None
    run: dict | None = None  # a run directory's config.json (and its id)

    def describe(self) -> dict:
        d = {"path": str(self.file), "resolved": str(self.file.resolve()), "sha256": self.sha256, "format": self.format}
        if self.run is not None:
            d["run"] = {"dir": str(self.source), "id": self.run["id"], "seed": self.run.get("seed"),
                        "regime": self.run.get("regime"), "batch_size": self.run.get("batch_size")}
        return d


@dataclass
class Job:
    """A checked measurement, ready to run: nothing of it has been written yet."""
    out: Path
    a: Checkpoint
    b: Checkpoint | None
    model_a: nn.Module
    model_b: nn.Module | None
    ds: Dataset
    mcfg: MeasureConfig
    seed: int
    threads: int
    device: torch.device
    model_identity: dict


# ------------------------------------------------------------------------------------ checkpoints

def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else "no message"


def _tensors_only(obj) -> bool:
    return (isinstance(obj, dict) and bool(obj)
            and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()))


def read_checkpoint(source: str | Path, trust_pickle: bool = False, where: str = "CHECKPOINT") -> Checkpoint:
    """A state dict from ``source``: a ``torch.save``d state dict (read with ``weights_only``), a whole
    pickled module (only with ``trust_pickle``: unpickling runs the file's code) or a run directory."""
    source = Path(source)
    if source.is_dir():
        return _read_run(source, where)
    if not source.is_file():
        raise UserError(f"{where} {source}: no such file or run directory")
    sha = plugins.sha256_file(source)
    try:
        with warnings.catch_warnings():  # torch warns of pickle protocols in files that are not its own
            warnings.simplefilter("ignore")
            obj, fmt = torch.load(source, map_location="cpu", weights_only=True), "state_dict"
    except Exception as e:
        if "Unsupported global" not in str(e):  # damaged, truncated or not torch's: torch's advice is not ours
            raise UserError(f"{where} {source}: not a torch checkpoint, or a damaged one (truncated, altered or "
                            f"another format; {type(e).__name__}); nothing in it was unpickled") from None
        if not trust_pickle:
            raise UserError(f"{where} {source}: holds pickled Python objects (a whole nn.Module?), and unpickling runs "
                            "code from the file; pass --trust-pickle to load it if you trust its source, or save "
                            "model.state_dict() instead") from None
        try:  # the user asked for it by name (--trust-pickle): a whole pickled module, its code run
            obj, fmt = torch.load(source, map_location="cpu", weights_only=False), "pickled module"
        except Exception as e:
            raise UserError(f"{where} {source}: --trust-pickle: unpickling it failed ({type(e).__name__}: "
                            f"{_line(e)})") from None
    if isinstance(obj, nn.Module):
        return Checkpoint(source, source, sha, "pickled module", dict(obj.state_dict()), module=obj)
    if not _tensors_only(obj):
        if isinstance(obj, dict) and obj:
            keys = ", ".join(repr(k) for k, v in obj.items() if not torch.is_tensor(v))
            what = f"a dict with non-tensor entries ({keys[:120]})"
        else:
            what = f"a {type(obj).__name__}" + (" (empty)" if isinstance(obj, dict) else "")
        raise UserError(f"{where} {source}: expected a state_dict (a dict of tensors) or an nn.Module, got {what}")
    return Checkpoint(source, source, sha, fmt, dict(obj))


def _read_run(path: Path, where: str) -> Checkpoint:
    rd = RunDir(path)
    cfg = read_json(rd.config)
    if cfg is None or not isinstance(cfg.get("model"), dict) or not isinstance(cfg.get("data"), dict):
        raise UserError(f"{where} {path}: a directory, but not a study's run directory (no readable config.json "
                        "with model and data); expected OUT/runs/ID")
    if not rd.model.is_file():
        raise UserError(f"{where} {path}: has no model.pt: the run has not finished training (resume it with batchgap "
                        "run)")
    try:
        state = rd.load_model()  # verified against the sha256 recorded when it was written; weights-only
    except DamagedFile as e:
        raise UserError(f"{where} {e}; `batchgap run` on its study trains the run again") from None
    if not _tensors_only(state):
        raise UserError(f"{where} {rd.model}: expected a state_dict (a dict of tensors)")
    return Checkpoint(path, rd.model, plugins.sha256_file(rd.model), "run directory", dict(state),
                      run={**cfg, "id": path.name})


def _run_config(ck: Checkpoint, where: str) -> StudyConfig:
    """The model and data of a run directory, with the study's folder (``OUT/study.json``'s root)."""
    cfg = ck.run
    model = typed_build(ModelConfig, cfg["model"], f"{ck.source}/config.json: model")
    data = typed_build(DataConfig, cfg["data"], f"{ck.source}/config.json: data")
    study_json = ck.source.resolve().parent.parent / "study.json"  # OUT/runs/ID -> OUT/study.json
    study = read_json(study_json)
    root = (study or {}).get("root")
    users = plugins.is_spec(model.name) or plugins.is_spec(data.name) or data.name in plugins.FILE_FORMATS
    if users and not isinstance(root, str):
        raise UserError(f"{where} {ck.source}: the run uses your own model or data, and the study's folder comes from "
                        f"{study_json} (key root), which is missing or unreadable")
    return StudyConfig(name="measure", model=model, data=data, root=root if isinstance(root, str) else "")


def load_weights(model: nn.Module, state: dict, what: str, where: str) -> None:
    """``model.load_state_dict(state)``, a mismatch named (the first few missing, unexpected, mis-shaped keys)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            problems.append(f"{label}: {', '.join(keys[:3])}{more}")
    if problems:
        raise UserError(f"{where}: the state_dict does not fit {what}: {'; '.join(problems)}")
    try:
        model.load_state_dict(state)
    except Exception as e:
        raise UserError(f"{where}: the state_dict does not fit {what} ({type(e).__name__}: {_line(e)})") from None


# ------------------------------------------------------------------------------------ settings

def measure_settings(sets: list[str] | tuple[str, ...] = ()) -> MeasureConfig:
    """:class:`MeasureConfig` defaults with ``--set measure.KEY=VALUE`` overrides, each checked as in a study file."""
    fields = [f.name for f in dataclasses.fields(MeasureConfig)]
    raw = {}
    for assignment in sets:
        key, value = parse_set(assignment)
        section, _, name = key.partition(".")
        if section != "measure" or not name:
            raise UserError(f"--set {key}: batchgap measure takes only measure.KEY settings, e.g. "
                            "measure.sharpness_max_iter=5")
        if name not in fields:
            raise UserError(f"--set {key}: unknown key{closest(name, fields)}; allowed: "
                            f"measure.{', measure.'.join(fields)}")
        if name in UNUSED:
            raise UserError(f"--set {key}: {UNUSED[name]}")
        raw[name] = value
    typed_build(MeasureConfig, raw, "measure", base=MeasureConfig())
    # the cross-field rules of a study file's [measure] (range, eps, probes): config.from_dict's, not a copy
    return from_dict({"name": "measure", "regimes": [{"name": "A", "batch_size": 2}], "measure": raw}, "--set").measure


def _check_fits(mcfg: MeasureConfig, model: nn.Module, ds: Dataset) -> None:
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for key, value in (("sharpness_subspace_dim", mcfg.sharpness_subspace_dim), ("hessian_top_k", mcfg.hessian_top_k)):
        if value > n:
            hint = " (0 = full space only)" if key.startswith("sharp") else ""
            raise UserError(f"measure.{key}: {value} is more than the model's {n} trainable parameters; "
                            f"--set measure.{key}=N with N <= {n}{hint}")
    if mcfg.noise_scale_batches and len(ds.train) < 2:
        raise UserError("measure.noise_scale_batches: the noise scale needs at least 2 training examples; set it to 0")


# ------------------------------------------------------------------------------------ model and data

def _data(data: str, num_classes: int) -> DataConfig:
    if data.endswith((".npz", ".pt")):
        return DataConfig(name=data.rsplit(".", 1)[1], path=data, num_classes=num_classes)
    if plugins.is_spec(data):
        return DataConfig(name=data, num_classes=num_classes)
    if data not in DATASETS:
        raise UserError(f"--data: unknown data set {data!r}{closest(data, DATASETS)}; expected an .npz or .pt file, "
                        f"a loader MODULE:CALLABLE or a built-in data set: {', '.join(DATASETS)}")
    if num_classes:
        raise UserError(f"--num-classes: only for your own data; {data} has its own")
    return DataConfig(name=data)


def _model(model: str, options, bn: str | None) -> ModelConfig:
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except ValueError as e:
            raise UserError(f"--options: not JSON ({e.msg} at character {e.pos}); "
                            "expected an object like '{\"width\": 64}'") from None
    if not isinstance(options or {}, dict):
        raise UserError(f"--options: expected a JSON object of the model's keyword arguments, got {options!r}")
    if bn is not None and bn not in BN_MODES:
        raise UserError(f"--bn: unknown value {bn!r}{closest(bn, BN_MODES)}; allowed: {', '.join(BN_MODES)}")
    if not plugins.is_spec(model):
        if model not in MODELS:
            raise UserError(f"--model: unknown model {model!r}{closest(model, MODELS)}; expected a factory "
                            f"MODULE:CALLABLE or FILE.py:CALLABLE, or a built-in model: {', '.join(MODELS)}")
        return ModelConfig(name=model, bn=bn or "running", options=options or {})
    return ModelConfig(name=model, bn=bn or "auto", options=options or {})  # a user's model: as built


def _identity(cfg: StudyConfig | None, net: nn.Module, ck: Checkpoint) -> dict:
    if cfg is None:  # the pickled module is the model
        cls = type(ck.module)
        return {"name": f"{cls.__module__}.{cls.__qualname__}", "source": "pickled module in the checkpoint",
                "bn": bn_mode(net)}
    m = cfg.model
    out = {"name": m.name, "options": m.options, "bn": bn_mode(net)}
    if plugins.is_spec(m.name):
        out.update(plugins.resolve(m.name, cfg.root, "--model")[1])
    return out


def _check_writable(out: Path) -> None:
    """``--out`` is a directory (or can be made one) we may write in: found before hours of measuring."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a directory")
    folder = out
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {folder} is not a writable directory")


def prepare(
    checkpoint: str | Path, out: str | Path, model: str | None = None, options: dict | str | None = None,
    bn: str | None = None, data: str | None = None, num_classes: int = 0, data_dir=None, download: bool = False,
    compare: str | Path | None = None, sets: list[str] | tuple[str, ...] = (), seed: int | None = None,
    trust_pickle: bool = False, threads: int = 1, device: str | torch.device | None = "cpu",
    root: str | Path | None = None,
) -> Job:
    """Everything :func:`measure` needs, every input checked; nothing is written. ``root`` is where
    ``MODULE:CALLABLE`` specs and data paths are found (default: the current directory)."""
    out = Path(out)
    if not isinstance(threads, int) or threads < 1:
        raise UserError(f"--threads: must be at least 1, got {threads}")
    if seed is not None and seed < 0:
        raise UserError(f"--seed: must be a non-negative integer, got {seed}")
    root = str(Path(root or Path.cwd()).resolve())
    mcfg = measure_settings(sets)
    if compare is not None and not mcfg.interpolation:
        raise UserError("--compare asks for the parametric plot, which measure.interpolation=false turns off; drop one")
    if model is None and (options is not None or bn is not None):
        raise UserError(f"--{'options' if options is not None else 'bn'}: only with --model")
    _check_writable(out)
    device = devices.resolve(device)
    a = read_checkpoint(checkpoint, trust_pickle, "CHECKPOINT")
    b = read_checkpoint(compare, trust_pickle, "--compare") if compare is not None else None
    run = _run_config(a, "CHECKPOINT") if a.run is not None else None
    if b is not None and b.run is not None and a.run is not None:
        for key in ("model", "data"):
            if b.run[key] != a.run[key]:
                raise UserError(f"--compare {b.source}: its {key} differs from CHECKPOINT {a.source}'s "
                                f"({json.dumps(b.run[key])} against {json.dumps(a.run[key])}); "
                                "compare runs of one model and data")
    # the model and the data each come from the command line (relative to root) or from the run (the study's folder)
    if model is not None:
        model_cfg = StudyConfig(name="measure", model=_model(model, options, bn), root=root)
    elif run is not None or a.module is not None:
        model_cfg = run  # None: the pickled module is the model
    else:
        raise UserError(f"--model: missing; CHECKPOINT {a.source} is a state_dict, so name the model it belongs to: a "
                        f"factory MODULE:CALLABLE (or FILE.py:CALLABLE) or a built-in model ({', '.join(MODELS)})")
    if data is not None:
        data_cfg = StudyConfig(name="measure", data=_data(data, num_classes), root=root)
    elif run is not None:
        if num_classes:
            raise UserError("--num-classes: only with --data (a run directory's data come with their classes)")
        data_cfg = run
    else:
        raise UserError("--data: missing; expected an .npz or .pt file, a loader MODULE:CALLABLE or a built-in data "
                        "set "
                        f"({', '.join(DATASETS)})")
    ds = build.prepare_data(data_cfg, data_dir, download)
    if not hasattr(ds.train, "x"):  # a loader of dict batches' columns (DictData)
        raise UserError("--data: a loader of dict batches needs an objective, which batchgap measure does not "
                        "take yet: run it as a study with [objective] (docs/own-model.md)")
    if model_cfg is None:
        fresh, named = (lambda: copy.deepcopy(a.module)), f"the pickled {type(a.module).__name__}"
    else:
        fresh, named = (lambda: build.fresh(model_cfg, ds, 0)), f"model {model_cfg.model.name}"
    nets = []
    for ck, where in ((a, "CHECKPOINT"), (b, "--compare")):
        if ck is None:
            continue
        net = fresh()
        load_weights(net, ck.state, named, f"{where} {ck.source}")
        net = devices.fast_layout(net.to(device))
        nets.append(net)
    ds = devices.place(ds, device)
    for net in nets:
        plugins.check_output(net, ds.train.x[:2], ds.num_classes, named)
    _check_fits(mcfg, nets[0], ds)
    if seed is None:
        seed = int(a.run.get("seed", 0)) if a.run is not None else 0
    identity = _identity(model_cfg, nets[0], a)
    return Job(out, a, b, nets[0], nets[1] if b is not None else None, ds, mcfg, seed, threads, device, identity)


# ------------------------------------------------------------------------------------ measuring

def check_nproc(job: Job, nproc: int | None) -> None:
    """Refuse (one line) more processes than the smallest data pass has batches of ``eval_batch_size``."""
    if (nproc or 1) < 2:
        return
    smallest, count = eval_batches(job.ds, job.mcfg)
    if nproc > count:
        raise UserError(f"--nproc {nproc}: the smallest data pass ({smallest} examples) makes {count} batch(es) of "
                        f"measure.eval_batch_size={job.mcfg.eval_batch_size}, one at least per process; use at most "
                        f"{count} processes or a smaller measure.eval_batch_size")


def measure(job: Job, command: str | None = None) -> Path | None:
    """Compute every measurement of ``job`` in its thread count and write ``OUT/measures.json``; its path.

    Under a process group (``--nproc``, torchrun) every rank measures its share of each full-data pass
    (:mod:`batchgap.landscape.ranks`) and rank 0 alone writes; the others return None."""
    t0 = time.perf_counter()
    with devices.num_threads(job.threads):
        metrics = endpoint_metrics(job.model_a, job.ds, job.mcfg)
        geo = geometry(job.model_a, job.ds, job.mcfg, job.seed, surface=True)
        pair = parametric_plot(job.model_a, job.model_b, job.ds, job.mcfg, NAMES) if job.model_b is not None else None
    ds = job.ds
    doc = {
        "schema": SCHEMA,
        "kind": "batchgap measure",
        "command": command,
        "checkpoint": job.a.describe(),
        "compare": job.b.describe() if job.b is not None else None,
        "model": job.model_identity,
        "data": {**data_protocol(ds), "input_shape": list(ds.input_shape), "num_classes": ds.num_classes,
                 "info": ds.info},
        "measure": dataclasses.asdict(job.mcfg),
        "seed": job.seed,
        "threads": job.threads,
        "device": devices.describe(job.device),
        "environment": {**devices.environment(job.device), "torch_threads": job.threads},
        "train": metrics["train"],
        "test": metrics["test"],
        "eval_protocol": metrics["protocol"],
        "geometry": geo,
        "parametric": pair,
        "names": dict(zip(NAMES, ["CHECKPOINT", "--compare"])),
        "wall_time_s": time.perf_counter() - t0,
        "processes": ranks.fields(),
    }
    if not distributed.is_main():
        distributed.finish()
        return None
    distributed.finish()
    try:
        job.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {job.out}: cannot create the output directory ({e.strerror})") from None
    path = job.out / MEASURES
    atomic_write_json(path, doc)
    return path


def measure_checkpoint(checkpoint: str | Path, out: str | Path, command: str | None = None, **kwargs) -> Path:
    """:func:`prepare` then :func:`measure`: ``OUT/measures.json`` for one checkpoint (and ``compare``)."""
    return measure(prepare(checkpoint, out, **kwargs), command)
