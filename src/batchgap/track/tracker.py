"""Geometry measured from inside the user's own training loop: :func:`track` and its :class:`Tracker`."""
from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..landscape.evaluate import BN_MODES
from ..landscape.objective import as_objective
from ..landscape.params import PARAM_SELECTIONS, preserved
from ..tracklog import SCHEMA, RecordWriter
from .dataset import measurement_set
from .measures import MEASURES, Context, check_options, fewest_hvps
from .sinks import make_sinks

BUDGET_KEYS = ("hvps", "seconds")


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """The body leaves the user's training as it was: the global RNG streams (torch CPU and, where initialized,
    CUDA; numpy; Python's ``random``), the model bit for bit (parameters, buffers, modes) and each parameter's
    ``.grad``; gradients enabled inside."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    np_state, py_state = np.random.get_state(), random.getstate()
    grads = [(p, p.grad) for p in model.parameters()]
    try:
        with preserved(model), torch.enable_grad():
            yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)
        for p, g in grads:
            if p.grad is not g:
                p.grad = g


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive whole number, got {value!r}")
    return value


def check_budget(budget) -> dict:
    """``{"hvps": int | None, "seconds": float | None}`` from ``budget`` (None, or a dict with either key)."""
    if budget is None:
        return dict(hvps=None, seconds=None)
    if not isinstance(budget, dict):
        raise TypeError(f"budget must be None or a dict such as {{'hvps': 200}} or {{'seconds': 5.0}} (per "
                        f"measurement), not {type(budget).__name__}")
    if not budget or (bad := [k for k in budget if k not in BUDGET_KEYS]):
        raise ValueError(f"budget: unknown key(s) {bad if budget else '(none given)'}; allowed: "
                         f"{', '.join(BUDGET_KEYS)}")
    out = dict(hvps=None, seconds=None)
    if "hvps" in budget:
        out["hvps"] = _positive_int("budget['hvps']", budget["hvps"])
    if "seconds" in budget:
        s = budget["seconds"]
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0:
            raise ValueError(f"budget['seconds'] must be a positive number, got {s!r}")
        out["seconds"] = float(s)
    return out


class Tracker:
    """Measures the model every ``every`` training steps (see :func:`track`); ``records`` holds what it wrote.

    Use ``tracker.step()`` once per training step, or ``tracker.maybe_measure(step)`` with your own step count;
    ``tracker.measure(step)`` measures now. ``close()`` (or ``with track(...) as tracker:``) closes the sinks.
    """

    def __init__(self, model, ctx: Context, names: list[str], options: dict, every: int, budget: dict,
                 info: dict, label: str, writer: RecordWriter | None, sinks: list):
        self.model, self.ctx, self.names, self.options = model, ctx, names, options
        self.every, self.budget, self.info, self.label = every, budget, info, label
        self.writer, self.sinks = writer, sinks
        self.steps = 0
        self.records: list[dict] = []
        self.last_seconds: dict[str, float] = {}

    def step(self) -> dict | None:
        """Count one training step; measure when the count is a multiple of ``every``. Returns the record or None."""
        self.steps += 1
        return self.maybe_measure(self.steps)

    def maybe_measure(self, step: int) -> dict | None:
        """Measure when ``step`` is a positive multiple of ``every``; returns the record or None."""
        return self.measure(step) if step > 0 and step % self.every == 0 else None

    def _skip(self, name: str, start: float, used: int) -> str | None:
        """Why ``name`` does not run within the budget now, or None."""
        secs, hvps = self.budget["seconds"], self.budget["hvps"]
        if secs is not None:
            elapsed, last = time.perf_counter() - start, self.last_seconds.get(name)
            if elapsed >= secs:
                return f"seconds budget spent: {elapsed:.3g} s of {secs:.3g} s before it"
            if last is not None and elapsed + last > secs:
                return (f"seconds budget: {elapsed:.3g} s of {secs:.3g} s used and its last measurement took "
                        f"{last:.3g} s")
        if hvps is not None and (need := fewest_hvps(name, self.options.get(name, {}))):
            if hvps - used < need:
                return f"HVP budget: {hvps - used} of {hvps} HVPs left, it needs at least {need}"
        return None

    def measure(self, step: int) -> dict:
        """Measure every asked measure now (within the budget), write the record to the file and the sinks."""
        start, used, measures, skipped = time.perf_counter(), 0, {}, {}
        for name in self.names:
            if (why := self._skip(name, start, used)) is not None:
                skipped[name] = why
                continue
            cap = None if self.budget["hvps"] is None or not fewest_hvps(name, self.options.get(name, {})) \
                else self.budget["hvps"] - used
            t = time.perf_counter()
            with untouched(self.model):
                outcome = MEASURES[name][0](self.ctx, self.options.get(name, {}), cap)
            self.last_seconds[name] = time.perf_counter() - t
            used += outcome.hvps
            measures[name] = {**outcome.result, "value": outcome.value, "hvps": outcome.hvps,
                              "seconds": self.last_seconds[name]}
        elapsed = time.perf_counter() - start
        over = self.budget["seconds"] is not None and elapsed > self.budget["seconds"]
        record = dict(
            schema=SCHEMA, run=self.label, step=int(step), measurement_set=self.info, every=self.every,
            seed=self.ctx.seed, measures=measures, skipped=skipped,
            budget=dict(self.budget, hvps_used=used, seconds_used=elapsed, over=over,
                        note=("ran past the seconds budget: a measure is never interrupted, and this one's time was "
                              "not known beforehand or grew") if over else None),
        )
        if self.writer is not None:
            self.writer.write(record)
        for sink in self.sinks:
            sink.write(record)
        self.records.append(record)
        return record

    def close(self) -> None:
        """Close the JSONL file and the sinks."""
        if self.writer is not None:
            self.writer.close()
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(model: nn.Module, data, objective=None, loss_fn=None, every: int = 100, measures=("loss", "lambda_max"),
          budget: dict | None = None, out: str | Path | None = None, sinks=(), subset: int | None = None,
          seed: int = 0, bn: str = "eval", params: str = "all", batch_size: int = 1000, options: dict | None = None,
          label: str | None = None, append: bool = False) -> Tracker:
    """Geometry from inside your own training loop: every ``every`` steps, the asked measures of ``model`` on a
    fixed measurement set, one JSONL record each time.

        record_t = {step: t, measures: {name: {value, ...protocol}}, budget: {...}},   t = every, 2 every, ...

    Each measure is the library's (``"loss"``: :func:`batchgap.evaluate`; ``"lambda_max"``/``"hessian_top"``: the
    top 1 / k eigenvalues of the full-data Hessian by Lanczos, warm-started from the previous measurement's
    eigenvectors; ``"trace"``: :func:`batchgap.hessian_trace`; ``"eps_sharpness"``: :func:`batchgap.eps_sharpness`;
    ``"noise_scale"``: :func:`batchgap.exact_gradient_noise_scale`) on the measurement set, with its protocol.
    Training is untouched: the model is restored bit for bit, ``.grad`` kept, and the global RNG streams (torch CPU
    and CUDA, numpy, ``random``) saved and restored; every draw uses a ``torch.Generator`` seeded with ``seed``.

    Args:
        model: the model being trained (any ``nn.Module``; measured at its current parameters).
        data: the measurement data: a tensor pair, TensorData, dataset, DataLoader or re-iterable of batches.
        objective: how a batch becomes a loss (``batchgap.huggingface_objective()``, ..., or a callable
            ``objective(model, batch) -> (loss_sum, weight)``); None for pairs and ``loss_fn``.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean; None for cross-entropy.
        every: measure when the step count is a multiple of this (a positive whole number).
        measures: names from ``loss``, ``lambda_max``, ``hessian_top``, ``trace``, ``eps_sharpness``,
            ``noise_scale``, measured in this order.
        budget: per measurement, ``{"hvps": N}`` (Hessian-vector products: Lanczos steps and trace probes are
            capped to what is left; a measure that cannot run on the rest is skipped, and the record says so) and/or
            ``{"seconds": S}`` (checked between measures: the next is skipped when the time is spent or its last
            duration would pass S; a measure is never interrupted, and a record that ran over says so).
        out: the JSONL file (None: records only in ``tracker.records`` and the sinks).
        sinks: besides ``out`` (written whenever given): ``"tensorboard"``, ``"wandb"``, ``"jsonl"`` (``out``
            itself), or objects with ``write(record)`` and ``close()``.
        subset: None to measure on all of ``data``, or the number of rows of a seeded subset drawn once.
        seed: seeds the subset, the Lanczos start, the trace probes and the sharpness subspace: the same draws at
            every measurement, so what changes along training is the model.
        bn: the BatchNorm protocol of every measure: ``"eval"``, ``"batch"`` or ``"recompute"``.
        params: the measured parameters: ``"all"`` trainable, or ``"no-bn"``.
        batch_size: rows per evaluation batch for tensor data (memory only).
        options: per-measure settings, e.g. ``{"trace": {"n_probes": 10}, "hessian_top": {"k": 3}}``.
        label: the run's name in the records and the report (default: the ``out`` file's stem, else "run").
        append: add to an existing ``out`` (a resumed run); otherwise an existing file is refused.

    Returns:
        A :class:`Tracker`: ``step()``, ``maybe_measure(step)``, ``measure(step)``, ``records``, ``close()``.

    Cost:
        Per measurement, the measures' own costs on the measurement set (see each function), e.g. ``"loss"`` one
        forward pass, ``"lambda_max"`` at most ``max_hvp + 1`` HVPs (fewer when warm-started); none between.
    """
    every = _positive_int("every", every)
    budget = check_budget(budget)
    if isinstance(measures, str) or not measures:
        raise TypeError(f"measures must be a non-empty list of names from: {', '.join(MEASURES)}")
    names = list(measures)
    for name in names:
        if name not in MEASURES:
            raise ValueError(f"measures: unknown measure {name!r}; allowed: {', '.join(MEASURES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"measures: a measure is named twice in {names}")
    opts = check_options(options, names)
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {', '.join(BN_MODES)}, not {bn!r}")
    if params not in PARAM_SELECTIONS:
        raise ValueError(f"params must be one of {', '.join(PARAM_SELECTIONS)}, not {params!r}")
    batch_size = _positive_int("batch_size", batch_size)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    as_objective(objective, loss_fn)  # refused here, not at the first measurement
    out = None if out is None else Path(out)
    if out is not None and out.exists() and not append:
        raise ValueError(f"{out} exists: pass append=True to add to it (a resumed run), or choose another out path")
    with untouched(model):
        mdata, info = measurement_set(data, subset, seed)
    ctx = Context(model, mdata, objective, loss_fn, bn, batch_size, params, seed, {})
    made = make_sinks(sinks, out)
    writer = None
    if out is not None:
        try:
            writer = RecordWriter(out, append=append)
        except BaseException:
            for s in made:
                s.close()
            raise
    return Tracker(model, ctx, names, opts, every, budget, info, label or (out.stem if out else "run"), writer, made)
