"""The results schema: what a study writes (``OUT/runs/<id>/result.json``, ``OUT/results.json``) and
what the report reads, as versioned dataclasses.

The study builds these objects; :func:`to_dict` turns them into JSON-able data and :func:`load_results`
(or :func:`from_dict`) turns a file back into them, refusing a ``schema`` it does not know with one
line. Nothing outside this module builds a key from values or parses one: a sharpness summary is a
:class:`SharpnessStat` with its ``eps`` and ``subspace_dim``, an LB/SB ratio a :class:`Ratio` naming
its measure.

The per-measurement payloads (``RunResult.geometry``, ``eval_protocol``, ``Pair.parametric``, ...) are
the dicts the measurement functions return (each a value with its protocol, :mod:`batchgap.measure`);
their keys are the fields of the :mod:`batchgap.landscape` results.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

SCHEMA = 2  # 1: before the schema was versioned (string-keyed summaries); 2: this module

FITTED = 0.99  # training accuracy a solution must reach to count as fitted (the paper's networks: 99-100%, Table 2)

# the report sections of the paper's other experiments a study can ask for (``figures = [...]``)
FIGURES = ("batch-sweep", "warm-start", "trajectory", "remedies", "noise-scale", "correlation")


@dataclass
class Stat:
    """Mean and sample standard deviation (ddof = 1; 0 for one value) over ``n`` values."""
    mean: float | None = None
    std: float | None = None
    n: int = 0


@dataclass
class Metrics:
    loss: float
    accuracy: float
    n: int = 0


@dataclass
class SharpnessStat:
    """Keskar's eps-sharpness of one regime at one (eps, space): full space when ``subspace_dim`` is None."""
    eps: float
    subspace_dim: int | None
    stat: Stat

    @property
    def label(self) -> str:
        return space_label(self.eps, self.subspace_dim)


def space_label(eps: float, subspace_dim: int | None) -> str:
    """How the report names one eps-sharpness setting: "full ε = 0.001", "subspace-100 ε = 0.001"."""
    space = "full" if subspace_dim is None else f"subspace-{subspace_dim}"
    return f"{space} ε = {eps:g}"


@dataclass
class RegimeSummary:
    name: str
    batch_size: int | None
    lr: float | None
    runs: int
    diverged: int
    train_accuracy: Stat
    test_accuracy: Stat
    train_loss: Stat
    test_loss: Stat
    distance_from_init: Stat
    wall_time_s: Stat
    sharpness: list[SharpnessStat] = field(default_factory=list)
    adaptive_sharpness: Stat | None = None
    hessian_top_eigenvalue: Stat | None = None
    hessian_trace: Stat | None = None
    noise_scale: Stat | None = None

    def sharp(self, eps: float, subspace_dim: int | None = None) -> Stat | None:
        return next((s.stat for s in self.sharpness if s.eps == eps and s.subspace_dim == subspace_dim), None)


MEASURES = ("sharpness", "adaptive_sharpness", "hessian_top_eigenvalue", "hessian_trace", "noise_scale")


@dataclass
class Interval:
    """A confidence interval [lo, hi] at ``level``, how it was computed, and over how many values."""
    lo: float | None
    hi: float | None
    level: float
    method: str
    n: int


@dataclass
class Ratio:
    """LB mean / SB mean of one measure (``eps``/``subspace_dim`` set for eps-sharpness only), with a
    bootstrap interval over seeds."""
    measure: str
    value: float | None
    eps: float | None = None
    subspace_dim: int | None = None
    interval: Interval | None = None


@dataclass
class Comparison:
    """SB against LB: the test-accuracy gap, its test, the LB/SB ratios and the SB/LB distance ratio."""
    small: str
    large: str
    test_accuracy_gap: float | None = None
    welch_t: float | None = None
    p_value: float | None = None
    test: str | None = None
    large_over_small: list[Ratio] = field(default_factory=list)
    distance_ratio: float | None = None
    gap_interval: Interval | None = None  # of test_accuracy_gap (Welch's)
    distance_interval: Interval | None = None  # of distance_ratio (bootstrap)
    n_small: int = 0  # seeds of each regime in the comparison
    n_large: int = 0

    def ratio_of(self, measure: str, eps: float | None = None, subspace_dim: int | None = None) -> Ratio | None:
        return next((r for r in self.large_over_small
                     if r.measure == measure and r.eps == eps and r.subspace_dim == subspace_dim), None)

    def ratio(self, measure: str, eps: float | None = None, subspace_dim: int | None = None) -> float | None:
        r = self.ratio_of(measure, eps, subspace_dim)
        return r.value if r else None


@dataclass
class RunResult:
    """One run: how it was trained (``result.json`` holds this once it is finished) and what was measured.
    Paths (``x0``, ``checkpoint``, ``history``) are relative to the output directory. ``cpu``, ``kernels``,
    ``threads`` and ``device`` are the machine that trained it (:mod:`batchgap.machine`); a run re-measured
    elsewhere keeps them."""
    id: str
    regime: str
    batch_size: int
    seed: int
    lr: float
    lr_rule: str
    optimizer: str
    epochs: int
    steps: int
    steps_per_epoch: int
    diverged_epoch: int | None
    wall_time_s: float
    x0: str
    checkpoint: str
    history: str
    remedy: dict
    ghost_batch: int | None
    augment: str
    batch_schedule: dict | None
    init_from: dict | None
    device: str
    threads: int
    distributed: dict | None = None
    # the machine (batchgap.machine): not part of the run's id; None in the results of an earlier batchgap
    cpu: str | None = None  # CPU model, e.g. "Intel(R) Xeon(R) Processor @ 2.80GHz"
    kernels: str | None = None  # kernel family, e.g. "BLAS mkl (MKL 2024.2), ..., fp32 matmul on BLAS, ..."
    train_step: str | None = None  # the step that trained it: "chainstep", "autograd" (both: "chainstep+autograd")
    train: Metrics | None = None
    test: Metrics | None = None
    eval_protocol: dict | None = None
    distance_from_init: dict | None = None
    geometry: dict | None = None
    trajectory: list | None = None
    measure_time_s: float | None = None
    measure_hash: str | None = None
    complete: bool = False
    schema: int = SCHEMA

    @property
    def ok(self) -> bool:
        return not self.diverged_epoch

    def sharpness(self, eps: float, subspace_dim: int | None = None) -> float | None:
        for e in (self.geometry or {}).get("sharpness", []):
            if e["eps"] == eps and e.get("subspace_dim") == subspace_dim:
                return e["value"]
        return None


TRAINING_FIELDS = ("id", "regime", "batch_size", "seed", "lr", "lr_rule", "optimizer", "epochs", "steps",
                   "steps_per_epoch", "diverged_epoch", "wall_time_s", "x0", "checkpoint", "history", "remedy",
                   "ghost_batch", "augment", "batch_schedule", "init_from", "device", "threads", "distributed",
                   "cpu", "kernels", "train_step")


@dataclass
class Pair:
    """The measures of one seed's SB and LB solutions together (the parametric plot)."""
    seed: int
    sb: str
    lb: str
    measure_hash: str
    parametric: dict
    schema: int = SCHEMA


@dataclass
class Results:
    """``OUT/results.json``: the study as configured (``config.StudyConfig.to_dict``), its data and
    environment, every finished run, the pairwise measures, per-regime summaries and the comparison."""
    study: dict
    data: dict
    environment: dict
    command: str | None
    runs: list[RunResult]
    pairs: list[Pair]
    summary: list[RegimeSummary]
    comparison: Comparison | None
    wall_time_s: float
    unfinished: list[str] = field(default_factory=list)
    user: dict = field(default_factory=dict)  # the user's model, data and augmentation: specs and sha256s
    schema: int = SCHEMA

    def regime(self, name: str) -> RegimeSummary | None:
        return next((s for s in self.summary if s.name == name), None)

    def runs_of(self, regime: str, ok: bool = True) -> list[RunResult]:
        return [r for r in self.runs if r.regime == regime and (r.ok or not ok)]


# ------------------------------------------------------------------ dataclasses <-> plain data

def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def _load(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if value is None:
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", ())):
        inner = [a for a in args if a is not type(None)]
        return _load(inner[0], value, where) if len(inner) == 1 else value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list")
        return [_load(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a table")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        missing = [f.name for f in dataclasses.fields(tp)
                   if f.name not in value and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        return tp(**{k: _load(hints[k], v, f"{where}.{k}") for k, v in value.items() if k in names})
    return value


def from_dict(cls: type, doc: Any, source: str = "results") -> Any:
    """``cls`` (:class:`Results` or :class:`RunResult`) from plain data; a UserError for another schema
    or a document that does not fit."""
    if not isinstance(doc, dict):
        raise UserError(f"{source}: not a batchgap results file (not a JSON object)")
    schema = doc.get("schema", 1)
    if schema != SCHEMA:
        raise UserError(f"{source}: results schema {schema!r}, this batchgap ({SCHEMA}) reads only schema {SCHEMA}; "
                        "run `batchgap run` on the study again (finished training is kept, the measures are redone)")
    try:
        return _load(cls, doc, Path(source).name)
    except (ValueError, TypeError) as e:
        raise UserError(f"{source}: not a batchgap results file ({e})") from None


def load_results(out: str | Path) -> Results:
    """``OUT/results.json`` as :class:`Results`; one line (UserError) for a missing, unreadable or foreign file."""
    path = Path(out) / "results.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no results here; run `batchgap run STUDY --out {out}` first") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable results file ({e.__class__.__name__})") from None
    return from_dict(Results, doc, str(path))
