"""Gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish, Kaplan, Amodei et al. 2018, appendix A.1):
the batch size beyond which larger batches stop paying (their simplified "critical batch size").

A unit is one example (g = 1) with no BatchNorm or running statistics; under batch statistics it is a GHOST
BATCH of g examples (``ghost_batch``) from one seeded partition of the data. With h_j unit j's gradient,
G = (1/N) sum_j h_j and Sigma = g (1/N) sum_j (h_j - G)(h_j - G)^T, so B_simple is in examples for every g.
A batch of B examples (B/g distinct units, drawn without replacement) has

    E|G_B|^2 = |G|^2 + c(B) tr(Sigma),    c(B) = (n - B) / (B (n - g)),

and two batch sizes give unbiased estimates of |G|^2 and tr(Sigma) (:func:`two_batch_estimate`); B_simple is
their ratio when both are > 0, else None with a ``reason``. :func:`gradient_noise_scale` samples;
:func:`exact_gradient_noise_scale` enumerates every unit gradient (in closed form for Linear/BatchNorm-eval
models, :mod:`pergrad`). The full derivation, the ghost-batch units and the gradient paths:
docs/measures.md, "Notes by module". Dropout off; the model restored bit for bit, also on error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import grad, grad_and_value

from . import ranks
from .evaluate import bn_protocol, model_bn_semantics, my_batches
from .functional import FullDataLoss, objective_fields, session
from .objective import Bound, PairObjective, as_objective, mean_cross_entropy
from .params import describe_params, is_batchnorm
from .pergrad import (CLOSED_FORM_PATH, Mapper, NoClosedForm, closed_form_reason, mean_loss_error, objective_moments,
                      per_example_moments, summed_moments)
from .noise_estimate import (  # re-exported: the estimator's algebra lives there
    bootstrap_interval, mean_and_stderr,
    b_simple_stderr as b_simple_stderr,
    expected_batch_sq_norm as expected_batch_sq_norm,
    finite_population_factor as finite_population_factor,
    two_batch_estimate as two_batch_estimate,
)
from .protocol import Measured


def _sampling(g: int | None) -> str:
    if g is None:
        return ("batches: uniform random subsets of B distinct examples, independent across batches; E|G_B|^2 = "
                "|G|^2 + tr(Sigma) (n - B) / (B (n - 1)) (finite-population correction), Sigma the population "
                "covariance of per-example gradients")
    return (f"batches: B / {g} distinct ghost batches of {g} drawn uniformly from the fixed partition, independent "
            f"across batches; E|G_B|^2 = |G|^2 + tr(Sigma) (n - B) / (B (n - {g})) (finite-population correction), "
            f"Sigma = {g} x the population covariance of the ghost-batch gradients")


@dataclass(frozen=True)
class NoiseScaleResult(Measured):
    """What the noise-scale functions return: B_simple or why not, its errors, both estimates, the protocol."""

    b_simple: float | None  # tr(Sigma)_est / |G|^2_est; None when either estimate is <= 0 (see reason)
    params_measured: str  # the measured parameters in words: trainable of all, frozen, tied (params.describe_params)
    reason: str | None  # why b_simple is None; None when it is a number
    b_simple_stderr: float | None  # delta method from the two means' standard errors; 0 when exact
    ci_low: float  # percentile bootstrap interval for b_simple (may reach inf); = b_simple when exact
    ci_high: float
    confidence: float  # of [ci_low, ci_high]; 1.0 for the exact method (no sampling error)
    grad_norm_sq: float  # |G|^2 estimate (may be <= 0 from two sampled sizes)
    trace_sigma: float  # tr(Sigma) estimate, population covariance, in per-example units
    small: int  # B_small in examples (g for the exact method)
    big: int  # B_big (n: the full data set)
    n_batches_small: int  # batches measured at B_small (N for the exact method: every unit)
    n_batches_big: int  # 1 when B_big = n (the exact full gradient)
    sq_norm_small: float  # mean |G_B|^2 over the small batches
    sq_norm_small_stderr: float  # its standard error (0 when exact)
    sq_norm_big: float
    sq_norm_big_stderr: float
    ghost_batch: int | None  # g: the units are ghost batches of g (batch statistics); None: single examples
    grad_path: str  # "vmap", or "loop over ...: vmap could not trace the model (...)"
    sampling: str
    interval: str
    seed: int | None  # None for the exact per-example method (no randomness)
    method: str


def _defined(g2: float, trace: float) -> tuple[float | None, str | None]:
    """(B_simple, None) when both estimates are > 0, else (None, the reason)."""
    bad = [name for name, v in (("|G|^2", g2), ("tr(Sigma)", trace)) if not v > 0]
    if not bad:
        return trace / g2, None
    return None, (f"not estimated: the {' and the '.join(bad)} estimate came out <= 0 (|G|^2 = {g2:.3g}, "
                  f"tr(Sigma) = {trace:.3g}), so tr(Sigma)/|G|^2 is no noise scale (sampled: the mean gradient or "
                  "its noise is not resolved at these batch sizes; more batches, or B_big = n, may resolve it)")


def _couples(model: nn.Module, bn: str) -> bool:
    """Do the model's BN layers normalize a batch's examples together under ``bn``?"""
    return any(is_batchnorm(m) for m in model.modules()) and (bn == "batch" or model_bn_semantics(model) != "running")


def per_example_gradients_exist(model: nn.Module, bn: str, params: str = "all") -> str | None:
    """How :func:`exact_gradient_noise_scale` would measure every example's gradient under ``bn``: "closed form"
    (:mod:`pergrad`, one pass), "vmap" (the enumeration), or None (batch statistics couple the examples)."""
    if _couples(model, bn):
        return None
    with session(model, "eval"):  # the modes of "eval" and "recompute" (the statistics do not matter here)
        return "closed form" if closed_form_reason(model, params) is None else "vmap"


def _units(model: nn.Module, bn: str, n: int, ghost_batch: int | None, default: int | None,
           gen: torch.Generator) -> torch.Tensor | None:
    """The ghost batches (N, g) of the seeded partition under batch statistics; None: single examples."""
    if not _couples(model, bn):
        if ghost_batch not in (None, 1):
            raise ValueError(f"ghost_batch={ghost_batch} is only for BatchNorm with batch statistics; this model "
                             f"treats examples independently under bn={bn!r} (per-example units)")
        return None
    g = default if ghost_batch is None else ghost_batch
    if not 2 <= g <= n // 2:
        raise ValueError(f"ghost_batch must be in [2, n // 2 = {n // 2}] (at least 2 ghost batches), got {g}")
    return torch.randperm(n, generator=gen)[: n // g * g].reshape(-1, g)


def _tensor_pair(data) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        x, y = data
    elif hasattr(data, "x") and hasattr(data, "y"):
        x, y = data.x, data.y
    elif isinstance(data, torch.utils.data.TensorDataset) and len(data.tensors) == 2:
        x, y = data.tensors
    else:
        raise ValueError("batches and ghost batches are drawn by index: data must be a tensor pair (x, y), "
                         "a TensorData or a TensorDataset of (x, y), not an iterable of batches")
    if len(x) != len(y):
        raise ValueError(f"inputs have {len(x)} rows but targets have {len(y)}")
    return x, y


def _draw_batches(gen: torch.Generator, n: int, size: int, count: int) -> torch.Tensor:
    """``count`` independent uniformly random subsets of ``size`` distinct indices out of n, (count, size)."""
    return torch.stack([torch.randperm(n, generator=gen)[:size] for _ in range(count)])


def _sq_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """|g_j|^2 (float64) for each j of a stacked gradient {name: (k, *shape)}: each tensor's norm in its own
    dtype (``vector_norm``, no temporary), the sum over tensors in float64."""
    return sum(torch.linalg.vector_norm(g.reshape(len(g), -1), dim=1).double() ** 2 for g in grads.values())


def _functional(F: FullDataLoss):
    """The measured parameters as a dict of tensors, and ``loss(params, x, y)`` of the batch mean loss. Gradients
    with respect to the dict, not the flat vector: slices of a flat vector cost a full-size zero tensor per
    parameter tensor and per example under vmap."""
    params, obj = {name: t.detach() for name, t in F.as_dict(F.x0).items()}, F.objective

    def loss(p, x, y):
        return obj.loss_of(obj.forward(Bound(F.model, p), (x, y))[0], y)

    return params, loss


def _pairs_only(obj, what: str) -> None:
    if not isinstance(obj, PairObjective):
        raise ValueError(f"{what} draws batches of examples by index from a tensor pair; the objective {obj.name} "
                         "reads other batches: use exact_gradient_noise_scale (the objective's per-unit losses)")


@torch.no_grad()  # torch.func.grad still differentiates; no autograd graph to parameters left out of theta
def _batch_sq_norms(F: FullDataLoss, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, chunk: int,
                    mapper: Mapper | None = None, ghost: bool = False) -> torch.Tensor:
    """|G_B|^2 (float64, CPU) of each batch of ``index``: (k, B) examples or (k, B/g, g) units (the ghost batches'
    mean loss); ``vmap`` over ``max(1, chunk // B)`` batches, rank r its r-th share (:func:`ranks.spread`)."""
    mapper = mapper or Mapper("batches")
    index = (index[..., None] if index.dim() == 2 else index).to(x.device)
    theta, batch_loss = _functional(F)
    grad_fn = grad((lambda p, xb, yb: mapper.map(batch_loss, p, xb, yb).mean()) if ghost else
                   (lambda p, xb, yb: batch_loss(p, xb.flatten(0, 1), yb.flatten(0, 1))))
    per_call = max(1, chunk // (index.shape[1] * index.shape[2]))
    def norms(b):  # the batches b in one vmapped call
        return _sq_norms(mapper.run(lambda: mapper.map(grad_fn, theta, x[b], y[b]))).cpu()

    parts = ranks.spread(lambda part: [norms(b) for b in part.split(per_call) if len(b)],
                         index.tensor_split(ranks.world()[1]))
    return torch.cat([torch.zeros(0, dtype=torch.float64), *(t for part in parts for t in part)])


def _blocks(data, units: torch.Tensor | None, batch_size: int, chunk: int):
    """(c, g, ...) inputs and targets of consecutive units: single examples in data order (g = 1; any
    iterable of batches, ``chunk`` at a time), or the ghost batches of ``units`` (``chunk // g`` at a time)."""
    if units is None:
        for xb, yb in my_batches(data, batch_size):
            for s in range(0, len(yb), chunk):
                yield xb[s : s + chunk, None], yb[s : s + chunk, None]
        return
    x, y = _tensor_pair(data)
    units, per = units.to(x.device), max(1, chunk // units.shape[1])
    rank, size = ranks.world()  # this rank's share of the blocks: block i to rank i % size (all of them alone)
    for s in range(rank * per, len(units), size * per):
        yield x[units[s : s + per]], y[units[s : s + per]]


@torch.no_grad()  # no autograd graph: parameters outside ``params`` needing grad would keep each chunk's alive
def _unit_moments(F: FullDataLoss, blocks, mapper: Mapper, check: bool):
    """sum_j h_j ({name: float64}), sum_j |h_j|^2 (float64) and the number N of units in ``blocks``."""
    theta, batch_loss = _functional(F)
    per_unit = grad_and_value(batch_loss)
    grad_sum = {name: torch.zeros(t.shape, dtype=torch.float64, device=t.device) for name, t in theta.items()}
    sq_sum, count, checked = torch.zeros((), dtype=torch.float64), 0, not check
    for xu, yu in blocks:
        g, losses = mapper.run(lambda: mapper.map(per_unit, theta, xu, yu))
        if not checked and yu.numel() > 1:
            _check_mean_loss(F, batch_loss, theta, xu, yu, losses)
            checked = True
        for name, t in g.items():
            grad_sum[name] += t.sum(0).double()
        sq_sum += _sq_norms(g).sum().cpu()
        count += len(yu)
    return summed_moments(grad_sum, sq_sum, count)


def _bn_description(model: nn.Module, bn: str, batch_size: int, bn_data, units: torch.Tensor | None, n: int) -> str:
    if units is None:
        return bn_protocol(model, bn, batch_size, bn_data)
    (count, g) = units.shape
    return (f"batch statistics of each ghost batch of {g} examples: a fixed partition of the {n} examples "
            f"(randperm(n), the first draw of the seed's generator) into {count} ghost batches, "
            f"{n - count * g} examples left out")


def gradient_noise_scale(model: nn.Module, data, small: int = 32, big: int | None = None, n_batches: int = 200,
                         seed: int = 0, loss_fn: Callable | None = None, bn: str = "eval", params: str = "all",
                         batch_size: int = 1000, confidence: float = 0.95, n_boot: int = 2000, chunk: int = 1024,
                         bn_data=None, ghost_batch: int | None = None, _vmap: bool = True,
                         objective=None) -> NoiseScaleResult:
    """McCandlish et al.'s gradient noise scale B_simple from mean squared gradient norms at two batch sizes.

        B_simple = tr(Sigma) / |G|^2,    E|G_B|^2 = |G|^2 + c(B) tr(Sigma),    c(B) = (n - B) / (B (n - g))

    solved from the mean squared norms m_s, m_b at B_small < B_big (g <= small < big <= n; module docstring).
    ``n_batches`` random batches of ``small`` and of ``big``, or with ``big=None`` the exact full gradient (over
    eval batches of ``batch_size``; under batch statistics the mean of all ghost-batch gradients).
    Under batch statistics the units are ghost batches of ``ghost_batch`` (default ``small``; keep it fixed to
    compare batch-size pairs), ``small`` and ``big`` multiples of it. The partition, then each batch
    (``randperm(N)[:B/g]``), then the bootstrap, all from ``torch.Generator().manual_seed(seed)``; the global
    RNG untouched. ``chunk`` bounds the examples per vmapped call (memory: ``chunk // B`` gradients).

    Args:
        model: the trained model; restored bit for bit, also on error.
        data: a tensor pair ``(inputs, targets)`` or a TensorData (batches are drawn at random).
        small: B_small in examples (a multiple of the ghost batch under batch statistics).
        big: B_big in examples, or None for n: the exact full-data gradient.
        n_batches: random batches drawn at each sampled size (at least 2, for a standard error).
        seed: seeds the ``torch.Generator`` that draws the partition, the batches and the bootstrap.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch MEAN; None for cross-entropy on logits.
        bn: the BatchNorm protocol: ``"eval"``, ``"batch"`` or ``"recompute"``; batch statistics make the
            units ghost batches.
        params: the measured parameters: ``"all"`` trainable, or ``"no-bn"``.
        batch_size: examples per evaluation batch (memory only).
        confidence: the bootstrap interval's coverage, in (0, 1).
        n_boot: bootstrap resamples of each size's batch values.
        chunk: examples per vmapped call (memory only).
        bn_data: the data ``"recompute"`` recomputes the BatchNorm statistics on; None for ``data``.
        ghost_batch: under batch statistics, g, the ghost batch size; None for ``small``.
        objective: how a batch becomes a loss (:mod:`objective`); None for ``(inputs, targets)`` pairs and
            ``loss_fn``. Batches are drawn by index from a tensor pair, so only pair objectives
            (:func:`objective.pair_objective`, :func:`objective.tuple_objective`) are accepted here.

    Returns:
        A :class:`NoiseScaleResult`: ``b_simple`` (None with a ``reason`` when |G|^2_est or tr(Sigma)_est is
        <= 0), its delta-method ``b_simple_stderr`` and bootstrap ``ci_low``/``ci_high``, ``grad_norm_sq``,
        ``trace_sigma``, the two sizes' mean squared norms with standard errors, and the protocol.

    Cost:
        ``n_batches`` gradients at B_small and ``n_batches`` at B_big (or one full-data gradient pass), i.e.
        about ``n_batches (small + big) / n`` passes over the data, each batch's gradient by ``torch.func.grad``
        vmapped over ``chunk // B`` batches at a time; memory ``chunk // B`` gradients of P entries.
    """
    obj = as_objective(objective, loss_fn)
    _pairs_only(obj, "gradient_noise_scale")
    x, y = _tensor_pair(data)
    n_all = len(y)
    for bad, message in ((n_all < 2, f"need at least 2 examples, got {n_all}"),
                         (n_batches < 2, f"n_batches must be >= 2 (for a standard error), got {n_batches}"),
                         (not 0 < confidence < 1, f"confidence must be in (0, 1), got {confidence}"),
                         (n_boot < 1 or chunk < 1, f"n_boot and chunk must be >= 1, got {n_boot} and {chunk}")):
        if bad:
            raise ValueError(message)
    gen = torch.Generator().manual_seed(seed)
    ghosts = _units(model, bn, n_all, ghost_batch, small, gen)
    units, g = (torch.arange(n_all)[:, None], None) if ghosts is None else (ghosts, ghosts.shape[1])
    unit, n = units.shape[1], units.numel()
    big_size = n if big is None else big
    if not unit <= small < big_size <= n or small % unit or big_size % unit:
        whole = f", both multiples of ghost_batch = {g}" if g else ""
        raise ValueError(f"need {unit} <= small < big <= n = {n}{whole}, got small={small}, big={big}")
    mapper = Mapper("batches", _vmap)
    with session(model, bn, (x, y), bn_data, batch_size, obj):
        F = FullDataLoss(model, (x, y), None, batch_size, params, objective=obj)

        def sampled(size: int) -> torch.Tensor:  # |G_B|^2 of n_batches batches of ``size``, drawn from ``gen``
            index = units[_draw_batches(gen, len(units), size // unit, n_batches)]
            return _batch_sq_norms(F, x, y, index, chunk, mapper, ghost=g is not None)

        small_values = sampled(small)
        if big is not None:
            big_values = sampled(big)
        elif g is None:
            _, full_grad = F.value_and_grad(F.x0)
            big_values = (full_grad.double().norm() ** 2).reshape(1).cpu()
        else:
            grad_sum, _, count = _unit_moments(F, _blocks((x, y), units, batch_size, chunk), mapper, check=False)
            big_values = sum((t / count).pow(2).sum().cpu() for t in grad_sum.values()).reshape(1)
        bn_description = _bn_description(model, bn, batch_size, bn_data, ghosts, n_all)
        num_params = F.num_params
    (m_s, se_s), (m_b, se_b) = mean_and_stderr(small_values), mean_and_stderr(big_values)
    g2, trace = two_batch_estimate(m_s, m_b, small, big_size, n, unit)
    b, reason = _defined(g2, trace)
    ci_low, ci_high, clipped = bootstrap_interval(small_values, big_values, small, big_size, n, unit, n_boot,
                                                   confidence, gen)
    full = ("B_big = n: the exact full-data gradient (one batch-weighted pass)" if g is None else
            f"B_big = n: the exact mean of all {len(units)} ghost-batch gradients") if big is None else (
        f"{n_batches} random batches of B_big = {big}")
    return NoiseScaleResult(
        b_simple=b, reason=reason,
        b_simple_stderr=None if b is None else b_simple_stderr(m_s, se_s, m_b, se_b, small, big_size, n, unit),
        ci_low=ci_low, ci_high=ci_high, confidence=confidence, grad_norm_sq=g2, trace_sigma=trace,
        small=small, big=big_size, n_batches_small=n_batches, n_batches_big=len(big_values),
        sq_norm_small=m_s, sq_norm_small_stderr=se_s, sq_norm_big=m_b, sq_norm_big_stderr=se_b,
        ghost_batch=g, grad_path=mapper.path, sampling=_sampling(g),
        interval=(f"b_simple_stderr: delta method from the two means' standard errors (sample std, ddof 1, "
                  f"/ sqrt(k)); ci: percentile bootstrap, {n_boot} resamples of each size's batch values"
                  + (f"; {clipped} resamples had |G|^2_est <= 0 (counted as B_simple = inf) or tr(Sigma)_est "
                     "<= 0 (counted as 0)" if clipped else "")),
        seed=seed, n=n, bn=bn, bn_description=bn_description, params=params, num_params=num_params,
        params_measured=describe_params(model, params), batch_size=batch_size, **objective_fields(obj),
        method=(f"two batch sizes (McCandlish et al. 2018, app. A.1, with the finite-population correction): "
                f"{n_batches} random batches of B_small = {small}; {full}; torch.func.grad per batch"),
    )


def exact_gradient_noise_scale(model: nn.Module, data, loss_fn: Callable | None = None, bn: str = "eval",
                               params: str = "all", batch_size: int = 1000, chunk: int = 256, bn_data=None,
                               ghost_batch: int | None = None, seed: int = 0, _vmap: bool = True,
                               _fast: bool = True, objective=None) -> NoiseScaleResult:
    """The gradient noise scale B_simple from every unit gradient h_j, no sampling.

        |G|^2 = |(1/N) sum_j h_j|^2,    tr(Sigma) = g ((1/N) sum_j |h_j|^2 - |G|^2),    B_simple = tr(Sigma) / |G|^2
    (module docstring; g = 1 for single examples). Single examples on a Linear/BatchNorm(eval) model: the squared
    norms in closed form, one forward and backward pass per eval batch of ``batch_size`` (:mod:`pergrad`);
    ``_fast=False`` (or any other model, ``grad_path`` says why) ``vmap(grad_and_value)`` over chunks of
    ``chunk`` examples (memory ``chunk x P``); only the sums are kept. Batch statistics raise ValueError unless
    ``ghost_batch`` is given: the units are then the ghost batches of the partition drawn from ``seed``, as
    :func:`gradient_noise_scale` draws it. ``loss_fn`` must return the batch mean: checked on the first chunk.

    Args:
        model: the trained model; restored bit for bit, also on error.
        data: a tensor pair, a TensorData or (single examples only) an iterable of batches.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch MEAN; None for cross-entropy on logits.
        bn: the BatchNorm protocol: ``"eval"``, ``"batch"`` or ``"recompute"``; batch statistics make the
            units ghost batches.
        params: the measured parameters: ``"all"`` trainable, or ``"no-bn"``.
        batch_size: examples per evaluation batch (memory only).
        chunk: examples per vmapped call when the closed form does not apply (memory ``chunk x P``).
        bn_data: the data ``"recompute"`` recomputes the BatchNorm statistics on; None for ``data``.
        ghost_batch: under batch statistics, g, the ghost batch size (required there; refused otherwise).
        seed: seeds the ``torch.Generator`` that draws the ghost-batch partition (unused for single examples).
        objective: how a batch becomes a loss (:mod:`objective`); None for ``(inputs, targets)`` pairs and
            ``loss_fn``. Another objective must give per-unit losses (:meth:`objective.Objective.per_unit`):
            each unit's gradient is then a row of their Jacobian (batched backward passes of ``chunk`` units).

    Returns:
        A :class:`NoiseScaleResult`: ``b_simple`` (None with a ``reason`` when an estimate is <= 0),
        ``grad_norm_sq``, ``trace_sigma``, ``grad_path`` (closed form, vmap or loop), an interval of zero width
        (``confidence`` 1.0: no sampling error) and the protocol.

    Cost:
        Closed form (Linear/BatchNorm-eval models, single examples): one forward and backward pass over the
        data. Otherwise one gradient per unit by vmap: about the cost of n single-example backward passes,
        memory ``chunk x P``.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if (couples := _couples(model, bn)) and ghost_batch is None:
        why = ('bn="batch" couples the examples of a batch through its statistics; use bn="eval" or "recompute" '
               '(running statistics)' if bn == "batch" else "this model's BatchNorm uses batch statistics in eval "
               "mode (track_running_stats=False), which couples the examples of a batch")
        raise ValueError(f"exact_gradient_noise_scale needs per-example losses, but {why}; or pass ghost_batch=g "
                         "(and seed) to measure over the ghost batches of a seeded partition")
    obj = as_objective(objective, loss_fn)
    pairs = isinstance(obj, PairObjective)
    if couples:
        _pairs_only(obj, "exact_gradient_noise_scale with ghost batches")
    n_all = len(_tensor_pair(data)[1]) if couples else 0
    units = _units(model, bn, n_all, ghost_batch, None, torch.Generator().manual_seed(seed))
    unit = 1 if units is None else units.shape[1]
    mapper = Mapper("examples" if units is None else "ghost batches", _vmap)
    closed = units is None and _fast and pairs and obj.plain
    why_not = "per-example closed form off (forced)" if units is None and not _fast else None
    with session(model, bn, data, bn_data, batch_size, obj):
        if closed:  # the model itself, hooked: no FullDataLoss (its flat copy of theta) unless it falls back
            try:
                loss_fn = obj.loss_fn or mean_cross_entropy
                grad_sum, sq_sum, count = per_example_moments(model, data, loss_fn, batch_size, params)
            except NoClosedForm as err:
                closed, why_not = False, f"no per-example closed form: {err}"
        if not closed:
            F = FullDataLoss(model, data, None, batch_size, params, objective=obj)
            if pairs:
                grad_sum, sq_sum, count = _unit_moments(F, _blocks(data, units, batch_size, chunk), mapper, check=True)
            else:
                grad_sum, sq_sum, count = objective_moments(F, chunk)
                mapper.path = "batched backward (is_grads_batched) of the objective's per-unit losses"
        n = count * unit
        if count < 2:
            raise ValueError(f"need at least 2 examples, got {n}")
        bn_description = _bn_description(model, bn, batch_size, bn_data, units, n_all)
        num_params = sum(t.numel() for t in grad_sum.values())
    g2, m1 = float(sum((t / count).pow(2).sum().cpu() for t in grad_sum.values())), float(sq_sum) / count
    trace = (m1 - g2) * unit
    b, reason = _defined(g2, trace)
    g, what = (None, "per-example") if units is None else (unit, "ghost-batch")
    return NoiseScaleResult(
        b_simple=b, reason=reason, b_simple_stderr=None if b is None else 0.0,
        ci_low=math.nan if b is None else b, ci_high=math.nan if b is None else b,
        confidence=1.0, grad_norm_sq=g2, trace_sigma=trace, small=unit, big=n, n_batches_small=count,
        n_batches_big=1, sq_norm_small=m1, sq_norm_small_stderr=0.0, sq_norm_big=g2, sq_norm_big_stderr=0.0,
        ghost_batch=g, sampling=_sampling(g),
        grad_path=CLOSED_FORM_PATH if closed else mapper.path + (f"; {why_not}" if why_not else ""),
        interval=f"none: exact (every {what} gradient; B_small = {unit} enumerated, B_big = n)",
        seed=None if g is None else seed, n=n, bn=bn, bn_description=bn_description, params=params,
        num_params=num_params, params_measured=describe_params(model, params), batch_size=batch_size,
        **objective_fields(obj),
        method=((f"exact per-example gradients: squared norms in closed form from each Linear/BatchNorm layer's "
                 f"input and output gradient, G from the same backward (one pass, eval batches of {batch_size})")
                if closed else f"exact {what} gradients: torch.func.grad per unit, in chunks of {chunk} examples")
               + f"; |G|^2 = |mean h_j|^2, tr(Sigma) = {unit} (mean |h_j|^2 - |G|^2) (population covariance)",
    )


@torch.no_grad()
def _check_mean_loss(F: FullDataLoss, batch_loss: Callable, theta: dict, xu: torch.Tensor, yu: torch.Tensor,
                     losses: torch.Tensor) -> None:
    """The batch loss must be the mean of the per-example losses: for single examples the chunk's loss as one
    batch (this also catches a model that couples examples); for ghost batches (coupled on purpose) ``loss_fn``
    on one ghost batch's outputs, each against the mean of the rows' values."""
    if yu.shape[1] == 1:
        batch_value, per = float(batch_loss(theta, xu.flatten(0, 1), yu.flatten(0, 1))), losses
    else:
        out = F.objective.forward(Bound(F.model, theta), (xu[0], yu[0]))[0]
        batch_value = float(F.objective.loss_of(out, yu[0]))
        per = torch.stack([F.objective.loss_of(out[i : i + 1], yu[0][i : i + 1]) for i in range(len(out))])
    if (error := mean_loss_error(batch_value, per)) is not None:
        raise error
