"""Full-dataset loss and accuracy on an explicit protocol.

A full-dataset quantity is the batch-size weighted mean over every example: the sum of per-batch mean
losses times batch sizes, divided by the number of examples. Never a mean of batch means, never one batch.

BatchNorm at evaluation is one of:

* ``"eval"``: the module's own eval behaviour. Running statistics when the model tracks them; batch
  statistics when it was built with ``track_running_stats=False`` (the official Keras code's ``mode=2``).
* ``"batch"``: statistics of each evaluation batch, whatever the model tracks (results then depend on
  ``batch_size``, which the protocol records).
* ``"recompute"``: running statistics recomputed exactly over ``bn_data`` (default: the data evaluated):
  each layer's mean and unbiased variance over every example, layer by layer
  (:func:`recompute_bn_statistics`), then eval mode. Right for points the model never trained at
  (interpolations, perturbations). Costs one pass over ``bn_data`` per BN layer, each stopped at it.

Data: a tensor pair, a TensorData, a TensorDataset or other map-style dataset of (input, target)
pairs or of dicts, or an iterable of batches of any form (:func:`batches`); the objective
(:mod:`objective`, default ``(inputs, targets)`` pairs and cross-entropy) turns each batch into its loss.

Dropout is always off. The model comes back exactly as it was (:func:`params.preserved`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import IterableDataset, TensorDataset, default_collate

from .objective import as_objective, batch_rows, device_of, mean_cross_entropy, to_device  # noqa: F401
from . import ranks
from .params import is_batchnorm, preserved

BN_MODES = ("eval", "batch", "recompute")

Data = "tuple[torch.Tensor, torch.Tensor] | Iterable[tuple[torch.Tensor, torch.Tensor]]"
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Metrics:
    """Batch-weighted mean loss, top-1 accuracy (``nan`` when targets are not class indices) and example count."""

    loss: float
    accuracy: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def batches(data, batch_size: int = 1000, _skip=None) -> Iterator:
    """Yield batches from any accepted data form; the one place every measure reads data.

    Accepted, in this order of checks:

    * a pair of tensors ``(inputs, targets)`` (tuple or list) with equal first dimensions: sliced in
      order into ``batch_size`` rows;
    * a :class:`torch.utils.data.TensorDataset` of two tensors: its tensors, sliced the same way;
    * any other map-style :class:`torch.utils.data.Dataset` (``__len__`` and ``__getitem__``) whose
      items are ``(input, target)`` pairs or dicts of tensors: items ``0 .. len - 1`` in order,
      ``batch_size`` at a time, collated by ``torch.utils.data.default_collate`` (tensors stacked, Python
      numbers made tensors; dicts collated key by key);
    * a :class:`batchgap.TensorData` (anything else with tensor attributes ``x`` and ``y``): as a pair;
    * a :class:`batchgap.data.DictData` (``columns``), or a dict of column tensors with one row per example:
      sliced in order into dict batches of ``batch_size`` rows;
    * anything else is iterated as a sequence of batches of any form the objective reads (a DataLoader, a
      list of ``(inputs, targets)`` pairs or of dicts; an ``IterableDataset`` must yield batches). Measures
      that read the data more than once need it re-iterable (not a one-shot generator) and refuse it
      otherwise.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        x, y = data
        if len(x) != len(y):
            raise ValueError(f"inputs have {len(x)} rows but targets have {len(y)}")
        for start in range(0, len(y), batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
    elif isinstance(data, TensorDataset):
        if len(data.tensors) != 2:
            raise ValueError(f"a TensorDataset must hold two tensors (inputs, targets), this one holds "
                             f"{len(data.tensors)}")
        yield from batches(tuple(data.tensors), batch_size)
    elif isinstance(data, TorchDataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
        n = len(data)
        for start in range(0, n, batch_size):
            if _skip is not None and _skip(start // batch_size):
                yield None  # another rank's batch: not loaded
                continue
            items = [data[i] for i in range(start, min(start + batch_size, n))]
            if isinstance(items[0], Mapping):
                yield default_collate(items)
                continue
            if not (isinstance(items[0], (tuple, list)) and len(items[0]) == 2):
                raise ValueError(f"a map-style dataset must give (input, target) pairs or dicts of tensors; item "
                                 f"{start} is a {type(items[0]).__name__}")
            x, y = default_collate(items)
            yield x, y
    elif hasattr(data, "x") and hasattr(data, "y"):  # a TensorData
        yield from batches((data.x, data.y), batch_size)
    elif isinstance(columns := getattr(data, "columns", data), Mapping):  # a DictData, or a dict of columns
        n = batch_rows(columns)
        if not all(torch.is_tensor(v) and v.dim() > 0 and len(v) == n for v in columns.values()):
            raise ValueError("a dict as data holds columns: tensors with one row per example and the same number "
                             "of rows (pass a list of dicts for a sequence of dict batches)")
        for start in range(0, n, batch_size):
            yield {k: v[start : start + batch_size] for k, v in columns.items()}
    else:
        yield from data


def _length(data):
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        return len(data[1])
    if hasattr(data, "x") and hasattr(data, "y"):
        return len(data.y)
    return len(data) if hasattr(data, "__len__") else None


def my_batches(data, batch_size: int = 1000, check: bool = True) -> Iterator:
    """This process's share of :func:`batches` (all of them alone): under a process group of W ranks, batch i
    goes to rank ``i % W`` (:mod:`ranks`). ``check``: first compare the data across ranks (a hash of its length
    and first batch) and refuse a mismatch; after the pass, refuse fewer batches than ranks."""
    rank, size = ranks.world()
    if size == 1:
        yield from batches(data, batch_size)
        return
    count = 0
    for i, batch in enumerate(batches(data, batch_size, _skip=lambda i: i != 0 and i % size != rank)):
        if i == 0 and check:
            ranks.check_same(ranks.fingerprint(batch, _length(data)), "data (length or first batch)")
        count += 1
        if i % size == rank:
            yield batch
    if count == 0 and check:
        ranks.check_same(ranks.fingerprint(None, _length(data)), "data (length or first batch)")
    ranks.share(count, batch_size)


def model_bn_semantics(model: nn.Module) -> str:
    """What "eval" BatchNorm means for this model, in words, for protocols."""
    bns = [m for m in model.modules() if is_batchnorm(m)]
    if not bns:
        return "none"
    tracked = {m.track_running_stats for m in bns}
    if tracked == {True}:
        return "running"
    if tracked == {False}:
        return "batch"
    return "mixed"


def describe_bn(model: nn.Module, bn: str, batch_size: int) -> str:
    """The BN protocol in words, e.g. 'running statistics' or 'batch statistics (eval batch 1000)'."""
    semantics = model_bn_semantics(model)
    if semantics == "none":
        return "no BatchNorm"
    if bn == "recompute":
        return "running statistics recomputed on the evaluation data"
    if bn == "batch" or semantics == "batch":
        return f"batch statistics (eval batch {batch_size})"
    return "running statistics" if semantics == "running" else "mixed running/batch statistics"


def bn_protocol(model: nn.Module, bn: str, batch_size: int, bn_data) -> str:
    """``describe_bn`` with the once-at-the-centre meaning of "recompute" used by fixed-protocol measures."""
    if bn == "recompute" and describe_bn(model, bn, batch_size) != "no BatchNorm":
        where = "the evaluated data" if bn_data is None else "the caller's bn_data"
        return f"running statistics recomputed once at the centre on {where}, then fixed"
    return describe_bn(model, bn, batch_size)


class _Reached(Exception):
    """Raised by the statistics hook once the layer being measured has its input: the rest is not needed."""


def _channel_moments(h: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(count, mean, M2)`` per channel (dim 1) over every other dim (N, and H, W, ...); mean and M2
    (sum of squared deviations) in float64. ``var_mean`` accumulates in double on the CPU."""
    dims = [d for d in range(h.dim()) if d != 1]
    x = h if h.dtype in (torch.float32, torch.float64) else h.float()
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    count = h.numel() // h.shape[1]
    return count, mean.double(), var.double() * count


def _merge(acc, count: int, mean: torch.Tensor, m2: torch.Tensor):
    """Chan et al.'s parallel update: the moments of the union of two disjoint sets of rows."""
    if acc is None:
        return count, mean, m2
    n, mu, M = acc
    total = n + count
    delta = mean - mu
    return total, mu + delta * (count / total), M + m2 + delta**2 * (n * count / total)


def _across_ranks(pending: list, state: dict):
    """The layer measured, its moments and its batch count over all ranks (Chan's update again, in rank
    order): every rank holds the same. Alone: this rank's own."""
    if ranks.world()[1] == 1:
        return state["target"], state["acc"], state["batches"]
    layer = state["target"]
    mine = None if layer is None else pending.index(layer)
    acc = None if state["acc"] is None else tuple(a.cpu() if torch.is_tensor(a) else a for a in state["acc"])
    seen = ranks.gather((mine, acc, state["batches"]))
    targets = {t for t, _, _ in seen if t is not None}
    if len(targets) > 1:
        raise ValueError("the forward pass reaches the BatchNorm layers in an order that depends on the batch: "
                         "exact recomputed statistics need one order for all the data")
    total = None
    for _, part, _ in seen:
        if part is not None:
            total = _merge(total, *part)
    if total is not None and layer is not None:
        device = layer.running_mean.device
        total = (total[0], total[1].to(device), total[2].to(device))
    return (pending[targets.pop()] if targets else None), total, sum(b for _, _, b in seen)


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, data, batch_size: int = 1000, objective=None) -> None:
    """Set every tracking BN layer's running statistics to the exact ones over all of ``data``.

    For each BN layer, ``running_mean`` is the mean and ``running_var`` the UNBIASED variance (divisor
    count - 1, as BatchNorm's own running variance) per channel of that layer's inputs over every row
    of ``data`` (and every position: N, H, W for BatchNorm2d), whatever the batch size and order. The
    inputs of a layer are those of the model in eval mode with every earlier BN layer already holding
    its exact statistics: one pass over ``data`` per tracking BN layer, in the order the forward pass
    reaches them (not their registration order), each forward stopped at the layer measured (so L
    layers cost about (L + 1) / 2 full forward passes). Per batch the moments come from ``var_mean``,
    and are merged across batches in float64 by Chan's parallel update. ``num_batches_tracked`` is set
    to the number of batches the layer saw. ``momentum`` is not touched. Dropout is off. A layer the
    forward never reaches keeps its statistics; a BN module applied twice in one forward gets those of
    its first application.

    ``data`` as :func:`batches` accepts, each batch run through ``objective`` (default: ``(inputs, targets)``
    pairs) up to the layer measured; read once per BN layer, so it must be re-iterable (a one-shot
    iterator raises ValueError). Changes the model's buffers on purpose: call it inside
    :func:`params.preserved` to keep the original.
    """
    pending = [m for m in model.modules() if is_batchnorm(m) and m.track_running_stats]
    if not pending:
        return
    obj, device = as_objective(objective), device_of(model)
    model.eval()
    examples = None
    while pending:
        state = {"target": None, "acc": None, "batches": 0}

        def hook(module, args, kwargs):
            if state["target"] is None:
                state["target"] = module
            elif module is not state["target"]:
                raise ValueError("the forward pass reaches the BatchNorm layers in an order that depends on the "
                                 "batch: exact recomputed statistics need one order for all the data")
            h = args[0] if args else kwargs["input"]
            state["acc"] = _merge(state["acc"], *_channel_moments(h))
            state["batches"] += 1
            raise _Reached

        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in pending]
        seen = 0
        try:
            for batch in my_batches(data, batch_size, check=examples is None):
                seen += batch_rows(batch)
                try:
                    obj(model, to_device(batch, device))
                except _Reached:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        seen = ranks.all_sum(seen)
        layer, state["acc"], state["batches"] = _across_ranks(pending, state)
        if examples is None:
            if seen == 0:
                raise ValueError("no data to recompute the BatchNorm statistics on")
            examples = seen
        elif seen != examples:
            raise ValueError(f"bn='recompute' reads the data once per BatchNorm layer, and a later pass saw {seen} "
                             f"examples where the first saw {examples}: pass a tensor pair, a TensorData, a "
                             "map-style dataset or a re-iterable sequence of batches, not a one-shot iterator")
        if layer is None:  # the forward reaches none of the remaining layers
            break
        count, mean, m2 = state["acc"]
        if count < 2:
            raise ValueError(f"BatchNorm statistics need more than one value per channel, got {count}")
        layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
        layer.running_var.copy_((m2 / (count - 1)).to(layer.running_var.dtype))
        if layer.num_batches_tracked is not None:
            layer.num_batches_tracked.fill_(state["batches"])
        pending.remove(layer)


def set_bn_mode(model: nn.Module, bn: str) -> None:
    """Put ``model`` in eval mode, then BN layers in train mode for ``bn == "batch"``.

    Use inside :func:`params.preserved`: batch mode updates running statistics as a side effect.
    """
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, not {bn!r}")
    model.eval()
    if bn == "batch":
        for m in model.modules():
            if is_batchnorm(m):
                m.train()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data,
    loss_fn: LossFn | None = None,
    batch_size: int = 1000,
    bn: str = "eval",
    bn_data=None,
    objective=None,
) -> Metrics:
    """Batch-weighted mean loss and accuracy of ``model`` over all of ``data``.

        loss = sum_b loss_sum_b / sum_b weight_b = (1/n) sum_b |b| loss_fn(model(x_b), y_b) for pairs,
        accuracy = (1/n) #{units u : argmax logits_u = target_u}

    never a mean of batch means; n counts the objective's units (examples by default, tokens for a language
    model). Accuracy is top-1 where the objective classifies, ``nan`` otherwise. The model is restored bit for
    bit (modes and buffers included).

    Args:
        model: the model to evaluate.
        data: a tensor pair, TensorData, TensorDataset or other map-style dataset of (input, target) pairs,
            or an iterable of batches (:func:`batches`).
        loss_fn: ``loss_fn(outputs, targets)`` returning the mean over the batch; None for cross-entropy on
            logits ``(batch, classes)``.
        batch_size: examples per evaluation batch (memory only).
        bn: the BatchNorm mode: ``"eval"`` (running statistics), ``"batch"`` (each batch's statistics, no buffer
            updates) or ``"recompute"`` (running statistics recomputed exactly on ``bn_data`` first).
        bn_data: the data ``"recompute"`` recomputes the statistics on; None for ``data``.
        objective: how a batch becomes a loss (:mod:`objective`): an Objective, a ready name or a callable
            ``objective(model, batch) -> (loss_sum, weight)``; None for ``(inputs, targets)`` pairs and ``loss_fn``.

    Returns:
        :class:`Metrics` with ``loss``, ``accuracy`` and ``n``, the number of units (examples by default).

    Cost:
        One forward pass over ``data`` under ``torch.no_grad`` (plus about (L + 1) / 2 passes over ``bn_data``
        for ``"recompute"`` with L BatchNorm layers).
    """
    obj, device = as_objective(objective, loss_fn), device_of(model)
    with preserved(model):
        if bn == "recompute":
            recompute_bn_statistics(model, data if bn_data is None else bn_data, batch_size, obj)
            set_bn_mode(model, "eval")
        else:
            set_bn_mode(model, bn)
        total_loss = torch.zeros((), dtype=torch.float64)
        correct, n = 0, 0
        classify = True
        for batch in my_batches(data, batch_size):
            step = obj(model, to_device(batch, device))
            total_loss += step.mean.double() * step.weight
            if classify and step.correct is not None:
                correct += int(step.correct)
            else:
                classify = False
            n += step.weight
    total_loss, correct, n, unclassified = ranks.all_sum(total_loss, correct, n, int(not classify))
    classify = unclassified == 0
    if n == 0:
        raise ValueError("no data to evaluate")
    return Metrics(loss=float(total_loss / n), accuracy=correct / n if classify else float("nan"), n=n)
