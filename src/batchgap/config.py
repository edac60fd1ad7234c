"""Study configuration: TOML in, validated dataclasses out.

A study file looks like this (every table but ``[[regimes]]`` is optional; defaults below)::

    name = "default"
    seeds = [0, 1, 2]

    [data]
    name = "mnist1d"

    [model]
    name = "mlp"
    bn = "running"
    options = { width = 256, depth = 3 }

    [train]
    optimizer = "adam"
    lr = 1e-3
    epochs = 40

    [[regimes]]
    name = "SB"
    batch_size = 32

    [[regimes]]
    name = "LB"
    batch_size = "10%"        # a share of the training set, as the paper's LB
    lr_rule = "sqrt"          # any [train] key can be overridden per regime

    [quick]                   # what --quick sets, as dotted keys (merged over generic defaults)
    "train.epochs" = 2

    [paper_scale]             # what --paper-scale sets: the paper's data, model and budget (a GPU's work)
    "data.name" = "cifar10"

Every mistake is a :class:`~batchgap.errors.UserError` that names the field, e.g.
``train.epoch: unknown key (did you mean "epochs"?)``.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from .errors import UserError, closest

OPTIMIZERS = ("adam", "sgd")
LR_RULES = ("none", "sqrt", "linear")
BN_CHOICES = ("running", "batch", "none")
EVAL_BN = ("eval", "batch", "recompute")
PATHS = ("linear", "curvilinear")
AUGMENT_CHOICES = ("none", "paper", "crop-flip", "shift-1d")
REMEDIES = ("plain", "sam", "asam", "proximal", "fgsm")
FIGURES = ("batch-sweep", "warm-start", "trajectory", "remedies", "noise-scale")


def _choice(*values: str) -> dict:
    return {"choices": values}


def _positive() -> dict:
    return {"min": 1}


@dataclass
class DataConfig:
    name: str = "mnist1d"
    augment: str = field(default="none", metadata=_choice(*AUGMENT_CHOICES))
    train_subset: int = field(default=0, metadata={"min": 0, "doc": "0 = the whole training set"})
    test_subset: int = field(default=0, metadata={"min": 0, "doc": "0 = the whole test set"})
    subset_seed: int = 0


@dataclass
class ModelConfig:
    name: str = "mlp"
    bn: str = field(default="running", metadata=_choice(*BN_CHOICES))
    options: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    optimizer: str = field(default="adam", metadata=_choice(*OPTIMIZERS))
    lr: float = field(default=1e-3, metadata={"gt": 0.0})
    momentum: float = field(default=0.9, metadata={"min": 0.0})
    weight_decay: float = field(default=0.0, metadata={"min": 0.0})
    epochs: int = field(default=40, metadata=_positive())
    lr_rule: str = field(default="none", metadata=_choice(*LR_RULES))
    base_batch_size: int = field(default=256, metadata=_positive())
    warmup_epochs: float = field(default=0.0, metadata={"min": 0.0})
    eval_batch_size: int = field(default=1000, metadata=_positive())
    eval_every: int = field(default=1, metadata=_positive())
    checkpoint_every: int = field(default=1, metadata={"min": 0, "doc": "0 = only at the end"})
    # remedies (batchgap.remedies): the step, ghost batch normalization, augmentation, batch schedules
    remedy: str = field(default="plain", metadata=_choice(*REMEDIES))
    remedy_options: dict = field(default_factory=dict)
    ghost_batch: int = field(default=0, metadata={"min": 0, "doc": "0 = off; else BN statistics per chunk of this size"})
    augment: str = field(default="", metadata={**_choice("", *AUGMENT_CHOICES), "doc": "'' = the study's data.augment"})
    batch_schedule: dict = field(default_factory=dict)  # {kind = "switch"|"geometric", small = ..., ...}
    init_from: dict = field(default_factory=dict)  # {regime = "SB", epoch = k}: start from that run's iterate
    bn_sync: bool = field(default=False, metadata={"doc": "data-parallel: BN statistics of the global batch, not per worker"})


@dataclass
class Regime:
    name: str
    batch_size: int | str  # an absolute size, or "P%" of the training set
    train: TrainConfig = field(default_factory=TrainConfig)  # the study's [train] with this regime's overrides

    def resolved_batch_size(self, n_train: int) -> int:
        return resolve_batch_size(self.batch_size, n_train, f"regimes.{self.name}.batch_size")


@dataclass
class MeasureConfig:
    eval_batch_size: int = field(default=1000, metadata=_positive())
    bn: str = field(default="eval", metadata=_choice(*EVAL_BN))
    interpolation: bool = True
    interpolation_points: int = field(default=25, metadata={"min": 2})
    interpolation_range: list = field(default_factory=lambda: [-1.0, 2.0])
    interpolation_path: str = field(default="linear", metadata=_choice(*PATHS))
    interpolation_bn: str = field(
        default="auto",
        metadata={
            **_choice("auto", *EVAL_BN),
            "doc": "auto = recompute statistics on the training set for running-statistics models",
        },
    )
    # geometry of each solution, on the training set (or a seeded subset of it)
    geometry_examples: int = field(default=0, metadata={"min": 0, "doc": "0 = the whole training set"})
    sharpness_eps: list = field(default_factory=lambda: [1e-3, 5e-4])  # [] = no eps-sharpness
    sharpness_subspace_dim: int = field(default=100, metadata={"min": 0, "doc": "0 = full space only"})
    sharpness_max_iter: int = field(default=10, metadata={"min": 1})
    adaptive_rho: float = field(default=0.01, metadata={"min": 0.0, "doc": "0 = no adaptive sharpness"})
    hessian_top_k: int = field(default=1, metadata={"min": 0})
    hessian_max_hvp: int = field(default=100, metadata={"min": 1, "doc": "cap on Lanczos steps (HVPs) for the top eigenvalues"})
    hessian_trace_probes: int = field(default=10, metadata={"min": 0})
    curve_directions: int = field(default=5, metadata={"min": 0})
    curve_points: int = field(default=21, metadata={"min": 3})
    curve_range: float = field(default=1.0, metadata={"gt": 0.0})
    surface_points: int = field(default=15, metadata={"min": 0, "doc": "0 = no 2-D surface; drawn for the first seed"})
    trajectory_epochs: list = field(default_factory=list)  # epochs at which to measure sharpness along training
    noise_scale_batches: int = field(default=200, metadata={"min": 0, "doc": "batches of 32 for B_simple; 0 = off"})


@dataclass
class StudyConfig:
    name: str
    description: str = ""
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    regimes: list = field(default_factory=list)  # list[Regime]
    compare: list = field(default_factory=list)  # [small-batch regime, large-batch regime]
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    figures: list = field(default_factory=list)  # extra report sections: batch-sweep, warm-start, trajectory, remedies
    quick: dict = field(default_factory=dict)  # dotted key -> value, applied by --quick
    paper_scale: dict = field(default_factory=dict)  # dotted key -> value, applied by --paper-scale
    paper: dict = field(default_factory=dict)  # the paper's numbers for context in the report

    def regime(self, name: str) -> Regime:
        for r in self.regimes:
            if r.name == name:
                return r
        raise UserError(f"regime {name!r} not in the study{closest(name, self.regime_names())}")

    def regime_names(self) -> list[str]:
        return [r.name for r in self.regimes]

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["regimes"] = [
            {"name": r.name, "batch_size": r.batch_size, **_train_overrides(r.train, self.train)}
            for r in self.regimes
        ]
        return out


def _train_overrides(regime_train: TrainConfig, base: TrainConfig) -> dict:
    a, b = dataclasses.asdict(regime_train), dataclasses.asdict(base)
    return {k: v for k, v in a.items() if v != b[k]}


# ---------------------------------------------------------------- batch sizes

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_batch_size(value: Any, where: str) -> int | str:
    """Check a batch size as written: a positive int or a string "P%" with 0 < P <= 100."""
    if isinstance(value, bool):
        raise UserError(f"{where}: expected a positive integer or a percentage like \"10%\", got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise UserError(f"{where}: must be at least 1, got {value}")
        return value
    if isinstance(value, str):
        m = _PERCENT.match(value)
        if m and 0 < float(m.group(1)) <= 100:
            return value.strip()
    raise UserError(f"{where}: expected a positive integer or a percentage like \"10%\", got {value!r}")


def resolve_batch_size(value: int | str, n_train: int, where: str = "batch_size") -> int:
    """An absolute batch size for a training set of ``n_train`` examples."""
    if isinstance(value, str):
        pct = float(_PERCENT.match(value).group(1))
        size = max(1, round(n_train * pct / 100))
    else:
        size = value
    if size > n_train:
        raise UserError(f"{where}: {size} is larger than the training set ({n_train} examples)")
    return size


# ---------------------------------------------------------------- generic dataclass loading

def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            list: "a list", dict: "a table"}.get(tp, str(tp))


def _check_value(value: Any, f: dataclasses.Field, where: str) -> Any:
    tp = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}.get(
        f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""), None
    )
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is not None and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise UserError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is float and not math.isfinite(value):
        raise UserError(f"{where}: must be a finite number, got {value!r}")
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise UserError(
            f"{where}: unknown value {value!r}{closest(str(value), meta['choices'])}; "
            f"allowed: {', '.join(meta['choices'])}"
        )
    if "min" in meta and value < meta["min"]:
        raise UserError(f"{where}: must be at least {meta['min']}, got {value!r}")
    if "gt" in meta and value <= meta["gt"]:
        raise UserError(f"{where}: must be greater than {meta['gt']}, got {value!r}")
    return value


def _build(cls: type, raw: Any, where: str, base: Any = None) -> Any:
    """``cls(**raw)`` with every key and value checked; fields missing from raw come from ``base``."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise UserError(f"{where}.{key}: unknown key{closest(key, fields)}; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _check_value(raw[name], f, f"{where}.{name}")
        elif base is not None:
            kwargs[name] = copy.deepcopy(getattr(base, name))
    return cls(**kwargs)


def _regime(raw: Any, i: int, base: TrainConfig) -> Regime:
    where = f"regimes[{i}]"
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a table with name and batch_size, got {raw!r}")
    raw = dict(raw)
    name = raw.pop("name", None)
    if not isinstance(name, str) or not name.strip() or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise UserError(f"{where}.name: expected a name of letters, digits, '_', '-', '.', '+', got {name!r}")
    where = f"regimes.{name}"
    if "batch_size" not in raw:
        raise UserError(f"{where}.batch_size: missing (an integer, or a percentage like \"10%\")")
    batch_size = parse_batch_size(raw.pop("batch_size"), f"{where}.batch_size")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in raw:
        if key not in train_fields:
            allowed = ["name", "batch_size", *train_fields]
            raise UserError(f"{where}.{key}: unknown key{closest(key, allowed)}; allowed: {', '.join(allowed)}")
    regime = Regime(name=name, batch_size=batch_size, train=_build(TrainConfig, raw, where, base=base))
    _check_remedy(regime.train, where)
    return regime


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_remedy(t: TrainConfig, where: str) -> None:
    """Validate the remedy options, the batch schedule and init_from of one regime (or of [train])."""
    from .remedies import make_step

    try:
        make_step(t.remedy, **t.remedy_options)
    except UserError as e:
        raise UserError(f"{where}.remedy_options: {e}") from None
    if t.ghost_batch == 1:
        raise UserError(f"{where}.ghost_batch: must be 0 (off) or at least 2, got 1")
    sched = t.batch_schedule
    if sched:
        kinds = {"switch": {"kind", "small", "switch_epoch"}, "geometric": {"kind", "small", "epochs"}}
        kind = sched.get("kind")
        if kind not in kinds:
            raise UserError(f"{where}.batch_schedule.kind: expected one of switch, geometric, got {kind!r}")
        if set(sched) != kinds[kind]:
            raise UserError(f"{where}.batch_schedule: a {kind} schedule takes exactly {', '.join(sorted(kinds[kind]))}, got {', '.join(sorted(sched))}")
        for key in kinds[kind] - {"kind"}:
            if not _int(sched[key]) or sched[key] < (2 if key == "small" else 0):
                raise UserError(f"{where}.batch_schedule.{key}: expected a non-negative integer (small >= 2), got {sched[key]!r}")
    init = t.init_from
    if init:
        if set(init) != {"regime", "epoch"} or not isinstance(init.get("regime"), str) or not _int(init.get("epoch")) or init["epoch"] < 0:
            raise UserError(f"{where}.init_from: expected {{regime = NAME, epoch = K >= 0}}, got {init!r}")


def from_dict(raw: dict, source: str = "study") -> StudyConfig:
    """Validate a study given as plain data (as parsed from TOML)."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a table")
    top = {f.name for f in dataclasses.fields(StudyConfig)}
    for key in raw:
        if key not in top:
            raise UserError(f"{key}: unknown key{closest(key, top)}; allowed: {', '.join(sorted(top))}")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name or ""):
        raise UserError(f"name: expected a study name of letters, digits, '_', '-', '.', '+', got {name!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise UserError(f"description: expected a string, got {description!r}")
    seeds = raw.get("seeds", [0, 1, 2])
    if (
        not isinstance(seeds, list) or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise UserError(f"seeds: expected a non-empty list of non-negative integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"seeds: repeated seed in {seeds!r}")
    data = _build(DataConfig, raw.get("data", {}), "data", base=DataConfig())
    model = _build(ModelConfig, raw.get("model", {}), "model", base=ModelConfig())
    _check_registered(data, model)
    train = _build(TrainConfig, raw.get("train", {}), "train", base=TrainConfig())
    _check_remedy(train, "train")
    measure = _build(MeasureConfig, raw.get("measure", {}), "measure", base=MeasureConfig())
    _check_range(measure.interpolation_range)
    eps = measure.sharpness_eps
    if not all(isinstance(e, (int, float)) and not isinstance(e, bool) and 0 < e < 1 for e in eps):
        raise UserError(f"measure.sharpness_eps: expected a list of numbers in (0, 1), got {eps!r}")
    measure.sharpness_eps = [float(e) for e in eps]
    if measure.hessian_trace_probes == 1:  # Hutchinson's interval needs a sample variance
        raise UserError("measure.hessian_trace_probes: expected 0 (off) or at least 2, got 1")
    raw_regimes = raw.get("regimes")
    if not isinstance(raw_regimes, list) or not raw_regimes:
        raise UserError("regimes: expected at least one [[regimes]] table with name and batch_size")
    regimes = [_regime(r, i, train) for i, r in enumerate(raw_regimes)]
    names = [r.name for r in regimes]
    if len(set(names)) != len(names):
        raise UserError(f"regimes: repeated regime name in {names!r}")
    _check_dependencies(regimes)
    compare = raw.get("compare", names[:2] if len(names) >= 2 else [])
    if not isinstance(compare, list) or (compare and len(compare) != 2):
        raise UserError(f"compare: expected [small-batch regime, large-batch regime], got {compare!r}")
    for c in compare:
        if c not in names:
            raise UserError(f"compare: unknown regime {c!r}{closest(str(c), names)}; regimes: {', '.join(names)}")
    quick, paper_scale = raw.get("quick", {}), raw.get("paper_scale", {})
    for key, table in (("quick", quick), ("paper_scale", paper_scale)):
        if not isinstance(table, dict):
            raise UserError(f"{key}: expected a table of dotted keys, got {table!r}")
    figures = raw.get("figures", [])
    if not isinstance(figures, list) or any(f not in FIGURES for f in figures):
        raise UserError(f"figures: expected a list from {', '.join(FIGURES)}, got {figures!r}")
    traj = measure.trajectory_epochs
    if not all(_int(e) and 0 <= e <= max(r.train.epochs for r in regimes) for e in traj):
        raise UserError(f"measure.trajectory_epochs: expected epochs between 0 and the regimes' epochs, got {traj!r}")
    paper = raw.get("paper", {})
    if not isinstance(paper, dict):
        raise UserError(f"paper: expected a table, got {paper!r}")
    return StudyConfig(
        name=name, description=description, seeds=seeds, data=data, model=model, train=train,
        regimes=regimes, compare=compare, measure=measure, quick=quick, paper_scale=paper_scale, paper=paper,
        figures=figures,
    )


def _check_dependencies(regimes: list[Regime]) -> None:
    """init_from must name another regime that trains at least that many epochs and starts from x0."""
    by_name = {r.name: r for r in regimes}
    for r in regimes:
        init = r.train.init_from
        if not init:
            continue
        where = f"regimes.{r.name}.init_from"
        src = by_name.get(init["regime"])
        if src is None or src is r:
            raise UserError(f"{where}.regime: expected another regime of the study{closest(init['regime'], by_name)}; regimes: {', '.join(by_name)}")
        if src.train.init_from:
            raise UserError(f"{where}.regime: {src.name} itself starts from another regime; chains are not supported")
        if init["epoch"] > src.train.epochs:
            raise UserError(f"{where}.epoch: {init['epoch']} is beyond the {src.train.epochs} epochs of {src.name}")


def _check_registered(data: DataConfig, model: ModelConfig) -> None:
    from .data import DATASETS
    from .models import MODELS

    for field_name, value, registry in (("data.name", data.name, DATASETS), ("model.name", model.name, MODELS)):
        if value not in registry:
            raise UserError(f"{field_name}: unknown value {value!r}{closest(value, registry)}; allowed: {', '.join(registry)}")


def _check_range(r: Any) -> None:
    if (
        not isinstance(r, list) or len(r) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r) or r[0] >= r[1]
    ):
        raise UserError(f"measure.interpolation_range: expected [low, high] with low < high, got {r!r}")


# ---------------------------------------------------------------- files, --set, --quick

def read_toml(path: Path) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such study file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read study file ({e})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None


def parse_set(assignment: str) -> tuple[str, Any]:
    """``"train.epochs=5"`` -> ``("train.epochs", 5)``; the value is read as TOML, else as a bare string."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9_+-]+(\.[A-Za-z0-9_.+-]+)*", key):
        raise UserError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.epochs=5 or regimes.LB.batch_size=\"5%\"")
    text = text.strip()
    if not text:
        raise UserError(f"--set {assignment!r}: missing value after '='")
    try:
        return key, tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if re.fullmatch(r"[A-Za-z0-9_.%+/-]+", text):
            return key, text  # a bare word: a name, a path, a percentage
        raise UserError(f"--set {assignment!r}: cannot read the value {text!r} (use TOML syntax, e.g. \"text\", 3, [1, 2])") from None


def apply_set(raw: dict, key: str, value: Any) -> None:
    """Set a dotted key in the raw study dict; ``regimes.NAME.field`` addresses a regime by name."""
    parts = key.split(".")
    if parts[0] == "regimes" and len(parts) >= 3:
        regimes = raw.get("regimes") or []
        names = [r.get("name") for r in regimes if isinstance(r, dict)]
        for r in regimes:
            if isinstance(r, dict) and r.get("name") == parts[1]:
                _set_path(r, parts[2:], value, key)
                return
        raise UserError(f"--set {key}: no regime named {parts[1]!r}{closest(parts[1], names)}; regimes: {', '.join(map(str, names))}")
    _set_path(raw, parts, value, key)


def _set_path(d: dict, parts: list[str], value: Any, key: str) -> None:
    for p in parts[:-1]:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise UserError(f"--set {key}: {p!r} is not a table")
        d = nxt
    d[parts[-1]] = value


GENERIC_QUICK = {
    "train.epochs": 2, "data.train_subset": 512, "data.test_subset": 256,
    "measure.sharpness_eps": [1e-3], "measure.sharpness_max_iter": 3, "measure.sharpness_subspace_dim": 10,
    "measure.hessian_trace_probes": 3, "measure.curve_directions": 2, "measure.curve_points": 7,
    "measure.surface_points": 5, "measure.noise_scale_batches": 20, "measure.hessian_max_hvp": 10,
}


def quick_overrides(raw: dict) -> dict:
    """What --quick sets: a few epochs, a slice of the data, two seeds; the study's [quick] table wins."""
    out = dict(GENERIC_QUICK)
    seeds = raw.get("seeds", [0, 1, 2])
    if isinstance(seeds, list) and len(seeds) > 2:
        out["seeds"] = seeds[:2]
    quick = raw.get("quick", {})
    if isinstance(quick, dict):
        out.update(quick)
    return out


def load_study(
    source: dict | str | Path, sets: list[str] | tuple[str, ...] = (), quick: bool = False,
    paper_scale: bool = False,
) -> StudyConfig:
    """Read a study (a dict, or a TOML path), apply ``--quick`` or ``--paper-scale``, then ``--set``, validate.

    ``--paper-scale`` applies the study's ``[paper_scale]`` table: the paper's data set, network and budget
    (hours of GPU time). A key ``regimes`` there replaces the whole list of regimes. The two profiles
    shrink and grow the same study, so they do not combine; shrink a paper-scale study with ``--set``.
    """
    if isinstance(source, dict):
        raw = copy.deepcopy(source)
        where = "study"
    else:
        raw = read_toml(Path(source))
        where = str(source)
    if quick and paper_scale:
        raise UserError("--quick and --paper-scale: choose one (shrink a paper-scale study with --set)")
    if quick:
        for key, value in quick_overrides(raw).items():
            apply_set(raw, key, value)
    if paper_scale:
        table = raw.get("paper_scale")
        if not isinstance(table, dict) or not table:
            raise UserError(f"--paper-scale: {where} has no [paper_scale] table")
        for key, value in table.items():
            try:
                apply_set(raw, key, value)
            except UserError as e:
                raise UserError(f"{where}: [paper_scale] {str(e).removeprefix('--set ')}") from None
    for assignment in sets:
        apply_set(raw, *parse_set(assignment))
    return from_dict(raw, where)


def config_hash(obj: Any) -> str:
    """A stable short hash of JSON-able data (sorted keys)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]
