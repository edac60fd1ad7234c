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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError, closest
from .landscape.evaluate import BN_MODES as EVAL_BN
from .models import BN_MODES
from .objectives import ObjectiveConfig, check as check_objective, is_default as default_objective
from .validate import (check_augment_name, check_dependencies, check_range, check_registered, check_remedy,
                       is_int)
from .overrides import GENERIC_QUICK, apply_set, parse_set, quick_overrides, read_toml  # noqa: F401
from .remedies import STEPS
from .results import FIGURES
from .typed import build as _build, choice as _choice, plain

OPTIMIZERS = ("adam", "sgd")
LR_RULES = ("none", "sqrt", "linear")
PATHS = ("linear", "curvilinear")


def _positive() -> dict:
    return {"min": 1}


@dataclass
class DataConfig:
    """The study's data set: a study file's ``[data]`` table."""

    # a built-in data set, "npz" or "pt" (with path), or a loader "MODULE:CALLABLE"
    name: str = "mnist1d"
    augment: str = field(default="none", metadata={"doc": "a built-in augmentation or MODULE:CALLABLE"})
    path: str = field(default="", metadata={"doc": "the npz/pt file, relative to the study file"})
    num_classes: int = field(default=0, metadata={"min": 0, "doc": "user data: 0 = inferred from the labels"})
    train_subset: int = field(default=0, metadata={"min": 0, "doc": "0 = the whole training set"})
    test_subset: int = field(default=0, metadata={"min": 0, "doc": "0 = the whole test set"})
    subset_seed: int = 0


@dataclass
class ModelConfig:
    """The study's model: a study file's ``[model]`` table."""

    # a built-in model, or a factory "MODULE:CALLABLE" / "FILE.py:CALLABLE" of the user's
    name: str = "mlp"
    # BatchNorm at evaluation; "auto": running statistics for a built-in model, a user's model as built
    bn: str = field(default="auto", metadata=_choice("auto", *BN_MODES))
    options: dict = field(default_factory=dict)


@dataclass
class BatchSchedule:
    """A batch size that grows to the regime's: ``switch`` from ``small`` at ``switch_epoch``, or
    ``geometric`` from ``small`` over ``epochs`` epochs (:mod:`batchgap.remedies.schedules`)."""
    kind: str = field(metadata=_choice("switch", "geometric"))
    small: int = field(metadata={"min": 2})
    switch_epoch: int | None = field(default=None, metadata={"min": 0})
    epochs: int | None = field(default=None, metadata={"min": 0})


@dataclass
class InitFrom:
    """Start from the iterate another regime's run (same seed) kept after ``epoch`` epochs."""
    regime: str
    epoch: int = field(metadata={"min": 0})


@dataclass
class TrainConfig:
    """The settings of one training run: a study file's ``[train]`` table, or built directly for :func:`train`.

    ``optimizer`` ("adam" or "sgd") at ``lr``, scaled with the batch size by ``lr_rule`` ("none", "sqrt" or
    "linear", relative to ``base_batch_size``) after ``warmup_epochs`` of linear warmup; ``epochs`` epochs,
    evaluated every ``eval_every`` and checkpointed every ``checkpoint_every``; ``remedy`` and its options,
    ``ghost_batch``, ``augment`` and ``batch_schedule`` for the large-batch remedies. A study validates every
    field against its allowed values (:class:`UserError`, one line).
    """

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
    # torch intra-op threads of the process that trains and measures the run: float rounding, and so
    # every number, depends on it; set by the study runner, part of the run's id (--threads)
    threads: int = field(default=1, metadata=_positive())
    # remedies (batchgap.remedies): the step, ghost batch normalization, augmentation, batch schedules
    remedy: str = field(default="plain", metadata=_choice(*STEPS))
    remedy_options: dict = field(default_factory=dict)  # the remedy's keyword arguments, checked by it
    ghost_batch: int = field(
        default=0, metadata={"min": 0, "doc": "0 = off; else BN statistics per chunk of this size"})
    augment: str = field(default="", metadata={"doc": "'' = the study's data.augment"})
    batch_schedule: BatchSchedule | None = None
    init_from: InitFrom | None = None
    bn_sync: bool = field(
        default=False, metadata={"doc": "data-parallel: BN statistics of the global batch, not per worker"})


@dataclass
class Regime:
    """One regime of a study: a batch size and its overrides of ``[train]``."""

    name: str
    batch_size: int | str  # an absolute size, or "P%" of the training set (batchgap.plan resolves it)
    train: TrainConfig = field(default_factory=TrainConfig)  # the study's [train] with this regime's overrides


@dataclass
class MeasureConfig:
    """The measurements each run gets: a study file's ``[measure]`` table."""

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
    sharpness_subspace_columns: str = field(default="normal", metadata=_choice(
        "normal", "unit",
        doc="A's column scale (landscape.sharpness.SUBSPACE_COLUMNS): N(0,1) entries, or those columns at norm 1"))
    adaptive_rho: float = field(default=0.01, metadata={"min": 0.0, "doc": "0 = no adaptive sharpness"})
    adaptive_m: int = field(default=0, metadata={
        "min": 0, "doc": "0 = n-sharpness (one maximum over the data); m = m-sharpness: mean of the maxima of "
        "disjoint batches of m"})
    adaptive_points: int = field(default=1024, metadata={
        "min": 1, "doc": "m-sharpness: examples drawn with the run's seed, cut into batches of adaptive_m"})
    hessian_top_k: int = field(default=1, metadata={"min": 0})
    hessian_max_hvp: int = field(
        default=100, metadata={"min": 1, "doc": "cap on Lanczos steps (HVPs) for the top eigenvalues"})
    hessian_trace_probes: int = field(default=10, metadata={
        "min": 0, "doc": "Hessian trace: HVPs of its own; 0 = off. With the spectral density on (density_vectors "
        ">= 2) the trace shares the density's HVPs (density_and_trace) and adds these as residual probes; else "
        "hessian_trace, Lanczos-deflated from 4, plain Hutchinson below"})
    curve_directions: int = field(default=5, metadata={"min": 0})
    curve_points: int = field(default=21, metadata={"min": 3})
    curve_range: float = field(default=1.0, metadata={"gt": 0.0})
    surface_points: int = field(
        default=21, metadata={"min": 0, "doc": "0 = no 2-D surface; drawn for the first seed"})
    trajectory_epochs: list = field(default_factory=list)  # epochs at which to measure sharpness along training
    noise_scale_batches: int = field(default=200, metadata={
        "min": 0, "doc": "the gradient noise scale B_simple; 0 = off. Exact (every example's gradient) where "
        "per-example gradients exist (no BN, running statistics); under batch statistics the number of sampled "
        "batches of 32 ghost-batch units"})
    # generalization measures (Jiang et al. 2019; batchgap.landscape.norms, flatness, density)
    norms: bool = field(
        default=True, metadata={"doc": "norm and margin measures (one jvp pass over the geometry data)"})
    average_sigma: float = field(
        default=0.01, metadata={"min": 0.0, "doc": "average sharpness, u ~ N(0, sigma^2 I); 0 = off"})
    average_sigma_relative: float = field(default=0.1, metadata={
        "min": 0.0, "doc": "magnitude-aware average sharpness, u_i ~ N(0, sigma^2 w_i^2); 0 = off"})
    flatness_samples: int = field(default=8, metadata={
        "min": 2, "doc": "Monte Carlo draws of the average sharpness and PAC-Bayes flatness"})
    pac_bayes_delta: float = field(default=0.1, metadata={
        "min": 0.0, "doc": "PAC-Bayes flatness: the largest sigma whose expected rise (pac_bayes_target) is <= delta; "
        "0 = off"})
    pac_bayes_target: str = field(default="loss", metadata=_choice(
        "loss", "error", "both", doc="what PAC-Bayes flatness bounds: loss = the training-loss rise E[L(w+u)] - L(w) "
        "(batchgap's variant), error = the training-accuracy drop (Jiang et al. 2019's pacbayes.flatness), both"))
    worst_case_delta: float = field(default=0.0, metadata={
        "min": 0.0, "doc": "worst-case flatness: the largest box alpha whose maximum rise is <= delta; 0 = off "
        "(8 box maximizations per variant)"})
    worst_case_max_iter: int = field(default=5, metadata={"min": 1})
    density_vectors: int = field(default=4, metadata={
        "min": 0, "doc": "Hessian spectral density (SLQ): start vectors, >= 2 for its trace's interval (1: no "
        "trace); 0 = off. Cost: vectors x steps HVPs in steps block calls"})
    density_steps: int = field(
        default=20, metadata={"min": 2, "doc": "Lanczos steps per start vector (HVPs = vectors x steps)"})


@dataclass
class StudyConfig:
    """A validated study (:func:`load_study`): data, model, training, the regimes x seeds, measures, report.

    Each run is one regime (batch size and its overrides of ``train``) with one seed; ``compare`` names the
    small- and large-batch regimes the report sets side by side; ``measure`` says which measurements each
    run gets. Plain dataclasses: read them, or change them with ``--set``-style assignments in ``load_study``.
    """

    name: str
    description: str = ""
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # how a batch becomes a loss
    train: TrainConfig = field(default_factory=TrainConfig)
    regimes: list = field(default_factory=list)  # list[Regime]
    compare: list = field(default_factory=list)  # [small-batch regime, large-batch regime]
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    figures: list = field(default_factory=list)  # extra report sections: batch-sweep, warm-start, trajectory, remedies
    quick: dict = field(default_factory=dict)  # dotted key -> value, applied by --quick
    paper_scale: dict = field(default_factory=dict)  # dotted key -> value, applied by --paper-scale
    paper: dict = field(default_factory=dict)  # the paper's numbers for context in the report
    root: str = ""  # the folder the user's files and modules are relative to: the study file's ('' = cwd)

    def regime(self, name: str) -> Regime:
        for r in self.regimes:
            if r.name == name:
                return r
        raise UserError(f"regime {name!r} not in the study{closest(name, self.regime_names())}")

    def regime_names(self) -> list[str]:
        return [r.name for r in self.regimes]

    def to_dict(self) -> dict:
        out = plain(self)
        if default_objective(self.objective):  # the default study's study.json as before objectives
            del out["objective"]
        out["regimes"] = [
            {"name": r.name, "batch_size": r.batch_size, **_train_overrides(r.train, self.train)}
            for r in self.regimes
        ]
        return out


def _train_overrides(regime_train: TrainConfig, base: TrainConfig) -> dict:
    a, b = plain(regime_train), plain(base)
    return {k: v for k, v in a.items() if v != b[k]}


# ---------------------------------------------------------------- batch sizes

PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_batch_size(value: Any, where: str) -> int | str:
    """Check a batch size as written: a positive int or a string "P%" with 0 < P <= 100
    (:func:`batchgap.plan.resolve_batch_size` turns it into a number)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise UserError(f"{where}: must be at least 1, got {value}")
        return value
    if isinstance(value, str):
        m = PERCENT.match(value)
        if m and 0 < float(m.group(1)) <= 100:
            return value.strip()
    raise UserError(f"{where}: expected a positive integer or a percentage like \"10%\", got {value!r}")


# ---------------------------------------------------------------- validation

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
    check_remedy(regime.train, where)
    return regime


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
    if not isinstance(description := raw.get("description", ""), str):
        raise UserError(f"description: expected a string, got {description!r}")
    seeds = raw.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(is_int(s) and s >= 0 for s in seeds):
        raise UserError(f"seeds: expected a non-empty list of non-negative integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"seeds: repeated seed in {seeds!r}")
    data = _build(DataConfig, raw.get("data", {}), "data", base=DataConfig())
    model = _build(ModelConfig, raw.get("model", {}), "model", base=ModelConfig())
    check_registered(data, model)
    check_objective(objective := _build(ObjectiveConfig, raw.get("objective", {}), "objective", base=ObjectiveConfig()))
    check_augment_name(data.augment, "data.augment")
    train = _build(TrainConfig, raw.get("train", {}), "train", base=TrainConfig())
    check_remedy(train, "train")
    measure = _build(MeasureConfig, raw.get("measure", {}), "measure", base=MeasureConfig())
    check_range(measure.interpolation_range)
    eps = measure.sharpness_eps
    if not all(isinstance(e, (int, float)) and not isinstance(e, bool) and 0 < e < 1 for e in eps):
        raise UserError(f"measure.sharpness_eps: expected a list of numbers in (0, 1), got {eps!r}")
    measure.sharpness_eps = [float(e) for e in eps]
    if measure.hessian_trace_probes == 1:  # Hutchinson's interval needs a sample variance
        raise UserError("measure.hessian_trace_probes: expected 0 (off) or at least 2, got 1")
    if not isinstance(raw_regimes := raw.get("regimes"), list) or not raw_regimes:
        raise UserError("regimes: expected at least one [[regimes]] table with name and batch_size")
    regimes = [_regime(r, i, train) for i, r in enumerate(raw_regimes)]
    names = [r.name for r in regimes]
    if len(set(names)) != len(names):
        raise UserError(f"regimes: repeated regime name in {names!r}")
    check_dependencies(regimes)
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
    if not all(is_int(e) and 0 <= e <= max(r.train.epochs for r in regimes) for e in traj):
        raise UserError(f"measure.trajectory_epochs: expected epochs between 0 and the regimes' epochs, got {traj!r}")
    if not isinstance(paper := raw.get("paper", {}), dict):
        raise UserError(f"paper: expected a table, got {paper!r}")
    if not isinstance(root := raw.get("root", ""), str):
        raise UserError(f"root: expected a folder, got {root!r}")
    return StudyConfig(
        name=name, description=description, seeds=seeds, data=data, model=model, objective=objective, train=train,
        regimes=regimes, compare=compare, measure=measure, quick=quick, paper_scale=paper_scale, paper=paper,
        figures=figures, root=root,
    )


# ---------------------------------------------------------------- the study file, --quick, --set

def load_study(
    source: dict | str | Path, sets: list[str] | tuple[str, ...] = (), quick: bool = False,
    paper_scale: bool = False,
) -> StudyConfig:
    """Read a study (a dict, or a TOML path), validate it as written, apply ``--quick`` or
    ``--paper-scale``, then ``--set``, and validate the result: a mistake in the file is refused even where
    ``--quick`` would override the value (a smoke test passes only what the full run accepts).

    ``--paper-scale`` applies the study's ``[paper_scale]`` table: the paper's data set, network and budget
    (hours of GPU time). A key ``regimes`` there replaces the whole list of regimes. The two profiles
    shrink and grow the same study, so they do not combine; shrink a paper-scale study with ``--set``.

    Args:
        source: the study as a dict (the TOML's tables), or the path of a study file (relative paths of the
            user's own files in it are read from the file's directory).
        sets: ``"key=value"`` assignments applied last, as ``--set`` (e.g. ``"train.epochs=5"``).
        quick: apply the study's smoke-test shrink (``--quick``).
        paper_scale: apply the study's ``[paper_scale]`` table (``--paper-scale``); not with ``quick``.

    Returns:
        The validated :class:`StudyConfig` (typed dataclasses), ready for :func:`run_study`.

    Cost:
        Parsing and validation only (no data, no model); a mistake raises :class:`UserError` with one line
        naming the field and the allowed values.
    """
    if isinstance(source, dict):
        raw = copy.deepcopy(source)
        where = "study"
    else:
        raw = read_toml(Path(source))
        where = str(source)
        raw.setdefault("root", str(Path(source).resolve().parent))  # the user's files sit beside the study file
    if quick and paper_scale:
        raise UserError("--quick and --paper-scale: choose one (shrink a paper-scale study with --set)")
    from_dict(raw, where)  # the file as written
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
