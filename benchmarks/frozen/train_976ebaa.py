"""``batchgap.train.train()`` as of commit 976ebaa, the baseline of the training rows of benchmarks/run.py.

Frozen: the code that ran at 976ebaa for one process (no torchrun group), no run directory and no
progress bar, which is how the benchmark calls it, with the helpers it called copied in beside it as
they were then: ``scaled_lr``, ``lr_at``, ``make_optimizer`` (fused Adam/SGD), ``sgd_step`` (batchgap.step),
``fast_layout`` (batchgap.devices), ``_restore_layout``, ``_seeded_rng_state``, and ``_epoch_metrics`` with
the ``evaluate`` it called (batchgap.landscape.evaluate, bn="eval": snapshot the model, eval mode, one
no-grad pass, batch-size weighted float64 loss sum and top-1 accuracy, restore the snapshot). The
branches that path never took (DistributedDataParallel across workers, resuming from a run directory,
checkpoints, kept iterates, the tqdm bar) are left out; a call that would need them is refused.

Imports torch and the standard library only (tests/test_benchmarks.py checks it): batchgap can change
underneath without changing this baseline.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def scaled_lr(cfg, batch_size: int) -> float:
    power = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[cfg.lr_rule]
    return cfg.lr * (batch_size / cfg.base_batch_size) ** power


def lr_at(step: int, peak: float, warmup_steps: int) -> float:
    if warmup_steps <= 0 or step >= warmup_steps:
        return peak
    return peak * (step + 1) / warmup_steps


def make_optimizer(model: nn.Module, cfg, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)


def sgd_step(model, optimizer, x, y, loss_fn):
    loss = loss_fn(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def fast_layout(model: nn.Module) -> nn.Module:
    convs = any(isinstance(m, nn.Conv2d) for m in model.modules())
    params = list(model.parameters())
    if convs and params and params[0].device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


@torch.no_grad()
def restore_layout(model: nn.Module, contiguous: dict) -> None:
    for n, p in model.named_parameters():
        if contiguous.get(n) and not p.is_contiguous():
            p.data = p.data.contiguous()


def seeded_rng_state(seed: int) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.get_rng_state()


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int) -> tuple[float, float]:
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    training = {n: m.training for n, m in model.named_modules()}
    try:
        model.eval()
        total, correct, n = torch.zeros((), dtype=torch.float64), 0, 0
        for start in range(0, len(data.y), batch_size):
            x, y = data.x[start : start + batch_size], data.y[start : start + batch_size]
            out = model(x)
            total += F.cross_entropy(out, y).double() * len(y)
            correct += int((out.argmax(dim=1) == y).sum())
            n += len(y)
    finally:
        for name, p in model.named_parameters():
            p.copy_(params[name])
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        for name, m in model.named_modules():
            m.training = training[name]
    return float(total / n), correct / n


def epoch_metrics(model, train_data, test_data, batch_size: int) -> dict:
    out = {}
    for split, data in (("train", train_data), ("test", test_data)):
        if data is None:
            continue
        out[f"{split}_loss"], out[f"{split}_accuracy"] = evaluate(model, data, batch_size)
    return out


@dataclass
class TrainResult:
    history: list = field(default_factory=list)
    epochs_done: int = 0
    steps: int = 0
    steps_per_epoch: int = 0
    lr: float = 0.0
    batch_size: int = 0
    diverged_epoch: int | None = None
    wall_time_s: float = 0.0


def train(model, train_data, test_data, cfg, batch_size, seed: int = 0, augment=None, loss_fn=None,
          step=None) -> TrainResult:
    """976ebaa's ``train(model, train_data, test_data, cfg, batch_size, seed, augment, loss_fn, step)`` in one
    process: per step a batch gathered by index, the learning rate set, ``step`` (default the autograd
    ``sgd_step``) and a ``float(loss)``; the training-set (and test-set) metrics after the epochs
    ``cfg.eval_every`` divides and after the last."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise ValueError("the frozen 976ebaa train() is the one-process path; it does not train data-parallel")
    loss_fn = loss_fn or F.cross_entropy
    step = step or sgd_step
    n = len(train_data)
    schedule = batch_size if callable(batch_size) else (lambda epoch, b=batch_size: b)
    sizes = [schedule(e) for e in range(cfg.epochs)]
    if not all(1 <= b <= n for b in sizes):
        raise ValueError(f"batch_size must be in [1, {n}], got {sorted(set(sizes))}")
    rank = 0
    shares = list(sizes)
    batch_size = sizes[-1]
    steps_per_epoch = n // sizes[0]
    peak = scaled_lr(cfg, batch_size)
    warmup_steps = math.ceil(cfg.warmup_epochs * steps_per_epoch)
    layouts = {n: p.is_contiguous() for n, p in model.named_parameters() if p.dim() == 4}
    fast_layout(model)
    optimizer = make_optimizer(model, cfg, peak)
    gen = torch.Generator().manual_seed(seed)
    result = TrainResult(steps_per_epoch=steps_per_epoch, lr=peak, batch_size=batch_size)
    rng_state = seeded_rng_state(seed)
    t0 = time.perf_counter() - result.wall_time_s
    gpu = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
    net = model
    with torch.random.fork_rng(devices=gpu):
        torch.set_rng_state(rng_state)
        if gpu:
            torch.cuda.default_generators[gpu[0].index].manual_seed(seed + result.epochs_done)
        for epoch in range(cfg.epochs):
            if result.diverged_epoch is not None:
                break
            model.train()
            perm = torch.randperm(n, generator=gen)
            total, count = 0.0, 0
            bs, local = sizes[epoch], shares[epoch]
            for b in range(n // bs):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(result.steps, peak, warmup_steps)
                idx = perm[b * bs : (b + 1) * bs]
                mine = slice(rank * local, (rank + 1) * local)
                if augment is None:
                    idx = idx[mine]
                x, y = train_data.x[idx], train_data.y[idx]
                if augment is not None:
                    x, y = augment(x, gen)[mine], y[mine]
                loss = step(net, optimizer, x, y, loss_fn)
                result.steps += 1
                total += float(loss.detach()) * len(y)
                count += len(y)
            result.epochs_done = epoch + 1
            train_loss = total / count
            if not math.isfinite(train_loss):
                result.diverged_epoch = epoch + 1
            row = {"epoch": epoch + 1, "steps": result.steps, "batch_size": bs, "lr": optimizer.param_groups[0]["lr"],
                   "batch_loss": train_loss}
            last = epoch + 1 == cfg.epochs or result.diverged_epoch is not None
            if (epoch + 1) % cfg.eval_every == 0 or last:
                row.update(epoch_metrics(model, train_data, test_data, cfg.eval_batch_size))
            row["time_s"] = time.perf_counter() - t0
            result.history.append(row)
            result.wall_time_s = time.perf_counter() - t0
    result.wall_time_s = time.perf_counter() - t0
    restore_layout(model, layouts)
    return result
