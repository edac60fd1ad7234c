"""The rules across a study's fields that their types alone do not catch (called by
:func:`batchgap.config.from_dict`); each mistake a one-line UserError naming the field."""
from __future__ import annotations

from typing import Any

from .data.augment import AUGMENTATIONS
from .errors import UserError, closest
from .plugins import FILE_FORMATS, is_spec

SCHEDULE_KEYS = {"switch": "switch_epoch", "geometric": "epochs"}  # the key each batch-schedule kind needs


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_remedy(t, where: str) -> None:
    """The remedy's options (checked by the remedy itself), ghost batches and the batch schedule."""
    from .remedies import make_step

    try:
        make_step(t.remedy, **t.remedy_options)
    except UserError as e:
        raise UserError(f"{where}.remedy_options: {e}") from None
    check_augment_name(t.augment, f"{where}.augment")
    if t.ghost_batch == 1:
        raise UserError(f"{where}.ghost_batch: must be 0 (off) or at least 2, got 1")
    s = t.batch_schedule
    if s is not None:
        need = SCHEDULE_KEYS[s.kind]
        other = next(k for k in SCHEDULE_KEYS.values() if k != need)
        if getattr(s, need) is None or getattr(s, other) is not None:
            raise UserError(f"{where}.batch_schedule: a {s.kind} schedule takes exactly kind, small, {need}")


def check_dependencies(regimes: list) -> None:
    """init_from must name another regime that trains at least that many epochs and starts from x0."""
    by_name = {r.name: r for r in regimes}
    for r in regimes:
        init = r.train.init_from
        if not init:
            continue
        where = f"regimes.{r.name}.init_from"
        src = by_name.get(init.regime)
        if src is None or src is r:
            raise UserError(f"{where}.regime: expected another regime of the study{closest(init.regime, by_name)}; "
                            f"regimes: {', '.join(by_name)}")
        if src.train.init_from:
            raise UserError(f"{where}.regime: {src.name} itself starts from another regime; chains are not supported")
        if init.epoch > src.train.epochs:
            raise UserError(f"{where}.epoch: {init.epoch} is beyond the {src.train.epochs} epochs of {src.name}")


def check_registered(data, model) -> None:
    """Names from the registries, or the user's code and files (imported when the study runs)."""
    from .data import DATASETS
    from .models import MODELS

    user_data = ", npz, pt (with data.path) or a loader MODULE:CALLABLE"
    for field_name, value, registry, more in (("data.name", data.name, DATASETS, user_data),
                                              ("model.name", model.name, MODELS, " or a factory MODULE:CALLABLE")):
        if value not in registry and not is_spec(value) and not (field_name == "data.name" and value in FILE_FORMATS):
            raise UserError(f"{field_name}: unknown value {value!r}{closest(value, registry)}; "
                            f"allowed: {', '.join(registry)}{more}")
    if (data.name in FILE_FORMATS) != bool(data.path):
        raise UserError(f"data.path: set it exactly when data.name is npz or pt (data.name = {data.name!r}, "
                        f"path = {data.path!r})")
    if data.num_classes and data.name in DATASETS:
        raise UserError(f"data.num_classes: only for the user's data; {data.name} has its own")
    if model.bn == "auto" and not is_spec(model.name):
        model.bn = "running"  # the built-in models' default


def check_augment_name(value: str, where: str) -> None:
    if value and value not in AUGMENTATIONS and not is_spec(value):
        raise UserError(f"{where}: unknown value {value!r}{closest(value, AUGMENTATIONS)}; "
                        f"allowed: {', '.join(AUGMENTATIONS)} or an augmentation MODULE:CALLABLE")


def check_range(r: Any) -> None:
    if (
        not isinstance(r, list) or len(r) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r) or r[0] >= r[1]
    ):
        raise UserError(f"measure.interpolation_range: expected [low, high] with low < high, got {r!r}")
