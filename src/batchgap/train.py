"""One training loop for every regime.

The data set lives in memory as tensors; each epoch draws a permutation from an explicit
``torch.Generator`` and slices batches by index (no DataLoader). The last incomplete batch of an epoch
is dropped, so every step of a regime sees exactly ``batch_size`` examples. Augmentation, when asked,
runs vectorized on each batch with the same generator.

Learning rate: ``lr * (batch_size / base_batch_size) ** k`` with k = 0 (``none``), 1/2 (``sqrt``,
Krizhevsky 2014, Hoffer 2017) or 1 (``linear``, Goyal 2017), optionally ramped linearly from
``lr / steps`` up to that value over the first ``warmup_epochs`` epochs.

Reproducible on its own: all randomness (batch order, augmentation, dropout) flows from the run's seed,
through a generator for the data and a forked global RNG for dropout, and both are saved in the
checkpoint so a resumed run continues bit for bit.

Per step the loop does no host synchronization: the batch losses are read once per epoch (the logged
``batch_loss`` is the same float sum as before), the examples are gathered a chunk of batches at a time,
and the learning rate is written only when it changes. The plain step of an MLP on the CPU skips autograd
(:mod:`batchgap.chainstep`, ``train(..., fast_step=True)``, on the torch releases it was tested on), computing
the same bits; each run records which step trained it (``TrainResult.step_kinds``).

Data-parallel: inside a process group of two or more workers (torchrun), the same loop trains with
DistributedDataParallel, each worker on its slice of every global batch; see :mod:`batchgap.distributed`.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import chainstep, devices, distributed
from .config import TrainConfig
from .data.base import DictData, TensorData
from .errors import UserError
from .landscape import ranks
from .landscape.evaluate import evaluate
from .landscape.objective import as_objective
from .step import Augment, LossFn, Step, objective_step, sgd_step  # noqa: F401  (re-exported: batchgap.train.sgd_step)
from .rundir import RunDir, checkpoint_problem, read_history, tell  # noqa: F401  (read_history: re-exported)
from .util import progress_bar


def scaled_lr(cfg: TrainConfig, batch_size: int) -> float:
    """The peak learning rate after the batch-size scaling rule."""
    power = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[cfg.lr_rule]
    return cfg.lr * (batch_size / cfg.base_batch_size) ** power


def lr_at(step: int, peak: float, warmup_steps: int) -> float:
    """Linear warmup from peak/warmup_steps to peak over the first ``warmup_steps`` steps, then peak."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return peak
    return peak * (step + 1) / warmup_steps


# One kernel per parameter tensor for the whole update (torch's ``fused`` Adam/SGD) instead of PyTorch's
# CPU default of ~8 elementwise passes over each tensor: on a CPU a small model's optimizer step is
# memory-bound, and this made a batch-32 step of the default MLP about 1.4x faster (docs/performance.md).
# Same algorithm, different rounding from the unfused loop; deterministic, so a run is still bitwise
# reproducible from its seed. False restores the unfused update.
FUSED_OPTIMIZER = True


# The training loop gathers the examples of this many bytes of batches at a time (one index per chunk,
# the whole epoch for a small data set), then slices each batch from them.
GATHER_BYTES = 64 * 2**20


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names (Adam or SGD) over the model's trainable parameters, fused where possible."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = FUSED_OPTIMIZER and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None
    if cfg.optimizer == "adam":
        # Keras defaults as the paper's official code: betas (0.9, 0.999), eps 1e-8 (PyTorch's too).
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)


@dataclass
class TrainResult:
    """What :func:`train` returns, and what a resume restores from ``state.pt``."""

    history: list = field(default_factory=list)  # one dict per evaluated epoch
    epochs_done: int = 0
    steps: int = 0
    steps_per_epoch: int = 0
    lr: float = 0.0
    batch_size: int = 0
    diverged_epoch: int | None = None
    wall_time_s: float = 0.0
    resumed_from_epoch: int = 0
    distributed: dict | None = None  # data-parallel protocol (world size, BN statistics), None in one process
    step_kinds: list = field(default_factory=list)  # the steps that ran, in order: "chainstep", "autograd"

    def as_dict(self) -> dict:
        return asdict(self)


def train(
    model: nn.Module,
    train_data: TensorData | DictData,
    test_data: TensorData | DictData | None,
    cfg: TrainConfig,
    batch_size: int | Callable[[int], int],
    seed: int = 0,
    augment: Augment | None = None,
    run_dir: str | Path | None = None,
    loss_fn: LossFn = F.cross_entropy,
    step: Step = sgd_step,
    progress: bool | None = None,
    desc: str = "train",
    keep_epochs: tuple[int, ...] = (),
    fast_step: bool = True,
    objective=None,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.epochs`` epochs at ``batch_size``.

    With ``run_dir``, writes ``history.jsonl`` (one line per evaluated epoch), ``state.pt`` (a resumable
    checkpoint every ``cfg.checkpoint_every`` epochs) and ``model.pt`` (the final state dict), each
    atomically; a ``state.pt`` left by a killed run is picked up and training continues from it.
    Stops early, marking ``diverged_epoch``, when the training loss becomes NaN or infinite.

    ``batch_size`` may be a schedule, a function from the epoch (counted from 0) to the batch size
    (dynamic sampling; ``batchgap.remedies.switch_schedule`` / ``geometric_schedule``); the learning-rate
    rule then uses the final epoch's size. ``keep_epochs`` keeps the model after those epochs (0 = the
    start point) as ``iterates/epoch-K.pt`` for warm starts and measurements along training.

    ``fast_step``: the plain step (``step`` is :func:`sgd_step`) of a Linear/BatchNorm1d/ReLU chain on the
    CPU, in one process, runs as :class:`batchgap.chainstep.ChainStep` (the same aten operations without
    autograd: the same bits, about 1.6x faster on the default MLP) where torch is a release its bitwise tests
    ran on (:data:`batchgap.chainstep.TESTED_TORCH`); False runs autograd everywhere. Not part of a run's id,
    as it changes no number; ``TrainResult.step_kinds`` says which step ran (``"chainstep"``, ``"autograd"``).

    A model with 2-D convolutions on the CPU trains in channels_last (:func:`batchgap.devices.fast_layout`:
    the same values, a faster layout for oneDNN) and is handed back in the memory format it came in.

    In a process group of W > 1 workers every worker calls this with the same arguments; ``batch_size``
    is the global batch (W must divide it), rank 0 alone touches ``run_dir`` and evaluates.

    Each epoch is ``n // batch_size`` steps over ``randperm(n)`` from ``torch.Generator().manual_seed(seed)``
    (the last partial batch left out); the learning rate is ``cfg``'s LR rule at the batch size, after a
    linear warmup over ``cfg.warmup_epochs`` (no decay schedule).

    Args:
        model: the ``nn.Module`` to train, in place (on the device of ``train_data``).
        train_data: the training set as a :class:`TensorData` (held in memory, indexed per batch).
        test_data: the test set evaluated beside the training set every ``cfg.eval_every`` epochs, or None.
        cfg: the :class:`TrainConfig`: optimizer, learning rate and its rule, epochs, warmup, schedule, remedy.
        batch_size: the batch size, or a function from the epoch (from 0) to the batch size.
        seed: seeds the generator that shuffles the data and drives ``augment``.
        augment: ``augment(x, generator)`` returning the augmented batch, or None.
        run_dir: a directory for the history, checkpoints and final model (resumed from), or None.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean (default cross-entropy).
        step: the function that takes one optimizer step, ``step(model, optimizer, x, y, loss_fn)`` returning
            the batch's loss (default :func:`batchgap.step.sgd_step`: forward, backward, ``optimizer.step()``).
        progress: show a progress bar; None for only when output is a terminal.
        desc: the progress bar's label.
        keep_epochs: epochs after which the model is saved as ``iterates/epoch-K.pt`` (0 = the start point).
        fast_step: allow the chain step (:mod:`batchgap.chainstep`, torch 2.13.x only); it changes no number,
            so it is not part of a run's id.
        objective: how a batch becomes a loss (:mod:`batchgap.landscape.objective`), for the training loss
            (:func:`batchgap.step.objective_step`: the batch's mean over its units) and the evaluation; None for
            ``loss_fn`` on ``(x, y)`` pairs. With a :class:`~batchgap.data.DictData` the batches are dicts of its
            columns' rows. The logged ``batch_loss`` is then weighted by units (tokens of a language model).

    Returns:
        A :class:`TrainResult`: ``history`` (one dict per evaluated epoch: train and test loss and accuracy),
        ``epochs_done``, ``steps``, ``lr``, ``batch_size``, ``diverged_epoch``, ``wall_time_s``,
        ``resumed_from_epoch``, the data-parallel protocol and ``step_kinds`` (which training step ran).

    Cost:
        ``cfg.epochs`` passes over ``train_data`` of one forward and backward pass each, plus a forward pass over
        ``train_data`` and ``test_data`` every ``cfg.eval_every`` epochs; memory: the model, the optimizer state
        and one batch's graph.
    """
    n = len(train_data)
    if objective is not None:
        objective = as_objective(objective, None if loss_fn is F.cross_entropy else loss_fn)
        if step is not sgd_step or augment is not None:
            raise ValueError("train(objective=...) takes the plain step and no augmentation (remedies and "
                             "augmentations read (x, y) pairs)")
    elif isinstance(train_data, DictData):
        raise ValueError("dict data (DictData) needs an objective that reads dict batches, e.g. "
                         "objective=batchgap.huggingface_objective(causal_lm=True)")
    schedule = batch_size if callable(batch_size) else (lambda epoch, b=batch_size: b)
    sizes = [schedule(e) for e in range(cfg.epochs)]
    if not all(1 <= b <= n for b in sizes):
        raise ValueError(f"batch_size must be in [1, {n}], got {sorted(set(sizes))}")
    world, rank = distributed.world_size(), distributed.rank()
    shares = [distributed.local_batch_size(b) for b in sizes]  # each worker's share of each epoch's batches
    batch_size = sizes[-1]
    steps_per_epoch = n // sizes[0]
    peak = scaled_lr(cfg, batch_size)
    warmup_steps = math.ceil(cfg.warmup_epochs * steps_per_epoch)
    layouts = {n: p.is_contiguous() for n, p in model.named_parameters() if p.dim() == 4}
    devices.fast_layout(model)  # before the optimizer: its fused state takes the parameters' layout
    optimizer = make_optimizer(model, cfg, peak)
    gen = torch.Generator().manual_seed(seed)
    result = TrainResult(steps_per_epoch=steps_per_epoch, lr=peak, batch_size=batch_size)
    if world > 1:
        result.distributed = distributed.protocol(model, batch_size, cfg.bn_sync)
    rd = RunDir(run_dir) if run_dir is not None else None
    writes = rd is not None and rank == 0
    start_epoch = 0
    rng_state = _seeded_rng_state(distributed.worker_seed(seed))
    if rd is not None:
        state = None
        if writes:
            rd.path.mkdir(parents=True, exist_ok=True)
            state = rd.load_state()
            done = state["result"]["epochs_done"] if state is not None else -1
            lost = [e for e in sorted(keep_epochs) if e <= done and checkpoint_problem(rd.iterate(e))]
            if lost:  # a kept iterate is only made by training through its epoch
                tell(rd.iterate(lost[0]), f"{rd.iterate(lost[0])}: {checkpoint_problem(rd.iterate(lost[0]))}; "
                     "the run trains from scratch to make it again")
                state = None
        state = distributed.broadcast(state)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            result = TrainResult(**state["result"])
            rng_state = _resumed_rng(state, result, cfg, rd.state)
            start_epoch = result.epochs_done
            result.resumed_from_epoch = start_epoch
    keep = set(keep_epochs)
    if writes and 0 in keep and start_epoch == 0:
        rd.save_iterate(0, model.state_dict())
    t0 = time.perf_counter() - result.wall_time_s
    gpu = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
    # the plain step of a Linear/BatchNorm1d/ReLU chain on the CPU, without autograd: the same bits, faster
    plain = fast_step and step is sgd_step and world == 1 and objective is None
    chain = chainstep.build(model, optimizer, loss_fn) if plain else None
    own = chainstep.own_storage if chain is not None else (lambda state: state)  # files as autograd writes them
    lr_set = None
    with torch.random.fork_rng(devices=gpu), _parallel(model, world, cfg.bn_sync) as net:
        torch.set_rng_state(rng_state)
        if gpu:  # dropout on a GPU draws from its own generator: seeded per run too (not checkpointed)
            torch.cuda.default_generators[gpu[0].index].manual_seed(distributed.worker_seed(seed) + result.epochs_done)
        bar = progress_bar(range(start_epoch, cfg.epochs), desc=desc, enabled=progress if rank == 0 else False,
                           initial=start_epoch, total=cfg.epochs)
        for epoch in bar:
            if result.diverged_epoch is not None:
                break
            model.train()
            perm = torch.randperm(n, generator=gen)
            bs, local = sizes[epoch], shares[epoch]
            fast = chain if chain is not None and chain.accepts(train_data.x[:1], train_data.y[:1], local) else None
            if fast is not None:
                fast.enter()
            kind = chainstep.NAME if fast is not None else "autograd"
            if kind not in result.step_kinds:
                result.step_kinds.append(kind)
            losses, count, weights = [], 0, []
            for batch in _epoch_batches(train_data, perm, bs, local, rank, augment, gen):
                lr = lr_at(result.steps, peak, warmup_steps)
                if lr != lr_set:  # only when it changes (the warmup's steps, and once after a resume)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    lr_set = lr
                if objective is None:
                    x, y = batch
                    loss = fast(x, y) if fast is not None else step(net, optimizer, x, y, loss_fn)
                    count += len(y)
                else:  # units (tokens) weigh the epoch's loss; a float, read from the objective without a sync
                    loss, weight = objective_step(net, optimizer, batch, objective)
                    weights.append(weight)
                    count += weight
                result.steps += 1
                losses.append(loss.detach())  # no host sync per step: read once per epoch
            if fast is not None:
                fast.leave()
            # the same float arithmetic as a per-step float(loss) * len(y) (every batch of an epoch has one size)
            total = 0.0
            steps = torch.stack(losses).reshape(len(losses)).tolist()  # one number a step, as float(loss)
            for value, weight in zip(steps, weights or itertools.repeat(local)):
                total += value * weight
            loss = losses[-1]
            result.epochs_done = epoch + 1
            if world > 1:
                sums = torch.tensor([total, count], dtype=torch.float64, device=loss.device)
                total, count = distributed.all_reduce_sum(sums).tolist()
            train_loss = total / count
            if not math.isfinite(train_loss):
                result.diverged_epoch = epoch + 1
            row = {"epoch": epoch + 1, "steps": result.steps, "batch_size": bs, "lr": optimizer.param_groups[0]["lr"],
                   "batch_loss": train_loss}
            last = epoch + 1 == cfg.epochs or result.diverged_epoch is not None
            if ((epoch + 1) % cfg.eval_every == 0 or last) and rank == 0:
                with distributed.local_bn(model), ranks.alone():  # rank 0 alone evaluates: no sharding
                    row.update(_epoch_metrics(model, train_data, test_data, cfg.eval_batch_size, objective))
            row["time_s"] = time.perf_counter() - t0
            result.history.append(row)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix({k: f"{row[k]:.3f}" for k in ("train_accuracy", "test_accuracy") if k in row})
            result.wall_time_s = time.perf_counter() - t0
            if writes:
                if epoch + 1 in keep:
                    rd.save_iterate(epoch + 1, own(model.state_dict()))
                rd.write_history(result.history)
            every = cfg.checkpoint_every
            if rd is not None and ((every and (epoch + 1) % every == 0) or last):
                rngs = distributed.all_gather(torch.get_rng_state())  # every worker's dropout stream
                if writes:
                    rd.save_state({"model": own(model.state_dict()), "optimizer": own(optimizer.state_dict()),
                                   "generator": gen.get_state(), "rng": rngs[0], "rngs": rngs,
                                   "result": result.as_dict()})
    result.wall_time_s = time.perf_counter() - t0
    if writes:
        rd.save_model(own(model.state_dict()))
    if chain is not None:
        chain.unflatten()
    _restore_layout(model, layouts)
    return result


@torch.no_grad()
def _restore_layout(model: nn.Module, contiguous: dict) -> None:
    """Put back the memory format the caller's 4-D parameters had (values unchanged)."""
    for n, p in model.named_parameters():
        if contiguous.get(n) and not p.is_contiguous():
            p.data = p.data.contiguous()


def _parallel(model: nn.Module, world: int, bn_sync: bool):
    """The module the steps call: a DDP wrapper in a group of workers, the model itself otherwise."""
    return distributed.data_parallel(model, bn_sync) if world > 1 else contextlib.nullcontext(model)


def _batches(data: TensorData, perm: torch.Tensor, bs: int, local: int, rank: int, augment: Augment | None,
             gen: torch.Generator):
    """This worker's ``(x, y)`` of each step of an epoch: ``perm`` cut into batches of ``bs`` (the last
    incomplete one dropped), the worker's ``local`` examples of each (augmented, when asked, for the global
    batch so that the generators stay in step). The examples are gathered a chunk of batches at a time."""
    steps = len(perm) // bs
    per = bs if augment is not None else local  # examples taken from the data per step
    row = data.x[0].numel() * data.x.element_size() + data.y.element_size() * max(1, data.y[0].numel())
    chunk = max(1, GATHER_BYTES // max(1, per * row))
    mine = slice(rank * local, (rank + 1) * local)
    for first in range(0, steps, chunk):
        k = min(steps, first + chunk) - first
        idx = perm[first * bs : (first + k) * bs]
        if augment is None and local != bs:
            idx = idx.view(k, bs)[:, mine].reshape(-1)
        xs, ys = data.x[idx], data.y[idx]
        for b in range(k):
            x, y = xs[b * per : (b + 1) * per], ys[b * per : (b + 1) * per]
            if x.data_ptr() % 64:  # as aligned as a batch of its own (BLAS kernels may round by alignment)
                x = x.clone()
            if augment is not None:
                x, y = augment(x, gen)[mine], y[mine]
            yield x, y


def _epoch_batches(data, perm: torch.Tensor, bs: int, local: int, rank: int, augment: Augment | None,
                   gen: torch.Generator):
    """This worker's batches of an epoch: ``(x, y)`` of a TensorData (:func:`_batches`), or the dicts of a
    DictData's columns at the same rows (its ``local`` share of each global batch of ``bs``)."""
    if not isinstance(data, DictData):
        yield from _batches(data, perm, bs, local, rank, augment, gen)
        return
    mine = slice(rank * local, (rank + 1) * local)
    for s in range(len(perm) // bs):
        idx = perm[s * bs : (s + 1) * bs][mine].to(data.device)
        yield {k: v[idx] for k, v in data.columns.items()}


def _resumed_rng(state: dict, result: TrainResult, cfg: TrainConfig, state_path: Path) -> torch.Tensor:
    """This worker's dropout stream from a checkpoint; the remaining epochs need the world that began it."""
    saved = (result.distributed or {}).get("world_size", 1)
    world = distributed.world_size()
    finished = result.epochs_done >= cfg.epochs or result.diverged_epoch is not None
    if saved != world and not finished:
        raise UserError(f"{state_path}: begun with {saved} worker(s), resumed with {world}; "
                        f"resume it with {saved}, or train into another directory")
    return state.get("rngs", [state["rng"]])[distributed.rank()] if saved == world else state["rng"]


def _epoch_metrics(model: nn.Module, train_data, test_data, batch_size: int, objective=None) -> dict:
    out = {}
    for split, data in (("train", train_data), ("test", test_data)):
        if data is None:
            continue
        m = evaluate(model, data, batch_size=batch_size, objective=objective)
        out[f"{split}_loss"], out[f"{split}_accuracy"] = m.loss, m.accuracy
    return out


def _seeded_rng_state(seed: int) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.get_rng_state()
