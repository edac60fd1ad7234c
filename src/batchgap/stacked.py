"""Several seeds of one small model trained at once, as one stacked model (torch.func).

K models of the same architecture (different start points x0) trained in the same regime are held as
one set of stacked tensors (``torch.func.stack_module_state``: every parameter and buffer gains a
leading dimension K) and run with ``torch.func.vmap`` over ``torch.func.functional_call``. On a CPU a
small model's step is dominated by per-operation overhead (Python, dispatch, autograd bookkeeping,
the optimizer's loop over tensors), which one stacked step pays once for K models.

What each seed sees is exactly what :func:`train.train` gives it:

* its own ``torch.Generator`` seeded with its seed, drawing each epoch's permutation and the
  augmentation in the same order as ``train`` does;
* its own optimizer state: the optimizer (built by :func:`train.make_optimizer`) holds each seed's
  parameters as separate tensors (views into the stacked ones), one param group per seed, so its
  kernels see the very tensors, and round the very way, they do for ``train``;
* BatchNorm in train mode on its own batch: the running statistics are stacked buffers (in_dims 0 of
  the vmap), updated in place per slice, so they end equal to each sequential run's;
* the same learning-rate schedule, divergence check (a seed whose epoch loss is not finite stops
  there: its files are written at that epoch and its slice is no longer recorded), per-epoch
  evaluation and files: ``history.jsonl``, ``state.pt`` (the per-seed checkpoint ``train`` writes and
  resumes from, optimizer state sliced out) and ``model.pt`` in each run directory.

Results equal the sequential runs' to float rounding (batched and single matrix products may round
differently; tests compare to 1e-5). Because the files are ``train``'s own, a group killed half way
resumes, stacked or one run at a time, from the last checkpoint of each run.

Not stackable (:func:`stackable` says why): models with active dropout (its randomness would come
from one shared stream rather than each seed's; ``vmap`` refuses random operations anyway), steps
other than the plain one (remedies), and models over ``max_params`` parameters, where the step is
compute-bound and stacking gains nothing but memory use.
"""
from __future__ import annotations

import copy
import json
import math
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from .config import TrainConfig
from .data.base import TensorData
from .step import Augment, LossFn
from .train import TrainResult, _epoch_metrics, _load_state, _seeded_rng_state, lr_at, make_optimizer, scaled_lr
from .util import atomic_save_torch, atomic_write_text, progress_bar

STACK_MAX_PARAMS = 1_000_000  # above this a step is compute-bound on a CPU: stacking does not pay


def stackable(model: nn.Module, max_params: int = STACK_MAX_PARAMS) -> str | None:
    """None when ``model`` can be trained stacked with others, else the reason it cannot."""
    n = sum(p.numel() for p in model.parameters())
    if n > max_params:
        return f"{n} parameters (stacking pays for models of at most {max_params})"
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"dropout at {name or 'the model'} (its randomness is per seed)"
    return None


def _seed_optimizer_state(sd: dict, k: int, P: int) -> dict:
    """Seed k's optimizer state dict (group k, its P parameters renumbered 0..P-1), as ``train``'s
    own optimizer holds it."""
    group = copy.deepcopy(sd["param_groups"][k])
    group["params"] = list(range(P))
    state = {i: copy.deepcopy(sd["state"][k * P + i]) for i in range(P) if k * P + i in sd["state"]}
    return {"state": state, "param_groups": [group]}


def _group_optimizer_state(sds: list[dict], P: int) -> dict:
    """The inverse of :func:`_seed_optimizer_state`: K seeds' state dicts as one, group k for seed k."""
    groups, state = [], {}
    for k, sd in enumerate(sds):
        (group,) = sd["param_groups"]
        groups.append({**group, "params": [k * P + i for i in range(P)]})
        state.update({k * P + i: v for i, v in sd["state"].items()})
    return {"state": state, "param_groups": groups}


# modules that act on each example alone and hold no tensors: run on the K*B examples at once
_PER_EXAMPLE = (nn.ReLU, nn.Flatten, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.modules.dropout._DropoutNd)


class StackedForward:
    """``x (K, B, ...) -> outputs (K, B, ...)`` of K models held as stacked ``params`` and ``buffers``.

    Walks ``nn.Sequential`` containers layer by layer. BatchNorm in train mode runs as ONE native
    batch_norm over K*C channels (the K models' channels side by side, on views of the stacked weights
    and running statistics, which it updates in place), so each channel's forward and backward are
    the very computation the single model does; ``vmap``'s own BatchNorm rule rounds differently,
    and Adam turns rounding noise in the gradient of a bias before a BatchNorm (zero in exact
    arithmetic) into steps of size lr. Parameter-free per-example layers run on the merged K*B
    batch; every other module runs under ``vmap(functional_call(...))`` over its own slice of the
    stacked tensors.
    """

    def __init__(self, base: nn.Module, params: dict, buffers: dict):
        self.K = len(next(iter(params.values())))
        self.layers: list = []  # one closure per layer, built once: the step does no name lookups
        self._plan(base, "", params, buffers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def _plan(self, module: nn.Module, prefix: str, params: dict, buffers: dict) -> None:
        if type(module) is nn.Sequential:
            for name, child in module.named_children():
                self._plan(child, f"{prefix}{name}.", params, buffers)
            return
        p = {n: params[prefix + n] for n, _ in module.named_parameters()}
        b = {n: buffers[prefix + n] for n, _ in module.named_buffers()}
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            self.layers.append(self._batch_norm(module, p, b))
        elif isinstance(module, _PER_EXAMPLE) and not p and not b:
            if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
                raise ValueError("dropout is not stackable")

            def per_example(x, module=module):
                out = module(x.reshape(-1, *x.shape[2:]))
                return out.reshape(x.shape[0], x.shape[1], *out.shape[1:])
            self.layers.append(per_example)
        elif _is_reshape(module):
            self.layers.append(lambda x, shape=module.shape: x.reshape(x.shape[0], x.shape[1], *shape))
        elif type(module) is nn.Linear:
            weight, bias = p["weight"], p.get("bias")
            self.layers.append(lambda x: _StackedLinear.apply(x, weight, bias))
        else:
            call = vmap(lambda p, b, x: functional_call(module, (p, b), (x,)), in_dims=(0, 0, 0))
            self.layers.append(lambda x: call(p, b, x))

    def _batch_norm(self, m: nn.modules.batchnorm._BatchNorm, p: dict, b: dict):
        K, C = self.K, m.num_features
        w = p["weight"].view(K * C) if "weight" in p else None
        bias = p["bias"].view(K * C) if "bias" in p else None
        rm = b["running_mean"].view(K * C) if "running_mean" in b else None
        rv = b["running_var"].view(K * C) if "running_var" in b else None
        nbt = b.get("num_batches_tracked")

        def batch_norm(x):
            B, rest = x.shape[1], x.shape[3:]
            xm = x.movedim(0, 1).reshape(B, K * C, *rest)  # (B, K*C, ...): model k's channels at k*C..k*C+C-1
            momentum = 0.0 if m.momentum is None else m.momentum
            if m.track_running_stats:
                nbt.add_(1)
                if m.momentum is None:  # cumulative moving average, as _BatchNorm.forward
                    momentum = 1.0 / float(nbt[0])
            out = F.batch_norm(xm, rm, rv, w, bias, True, momentum, m.eps)
            return out.reshape(B, K, C, *rest).movedim(1, 0).contiguous()  # slices laid out as one model's
        return batch_norm


class _StackedLinear(torch.autograd.Function):
    """K Linear layers on x (K, B, in): forward and backward by batched products whose every slice is
    bitwise what ``F.linear`` and its autograd compute for one model (``vmap``'s linear backward is not)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()  # reductions over a strided view would round in another order
        need_x, need_w, need_b = ctx.needs_input_grad
        return (torch.bmm(grad, weight) if need_x else None,
                torch.bmm(grad.transpose(1, 2), x) if need_w else None,
                grad.sum(1) if need_b else None)


def exact_layers(model: nn.Module) -> bool:
    """True when every layer of ``model`` runs stacked by the bitwise-exact paths of
    :class:`StackedForward` (Linear, BatchNorm, parameter-free per-example layers in Sequentials);
    others run under ``vmap`` and agree with the sequential run to float rounding only."""
    def ok(m: nn.Module) -> bool:
        if type(m) is nn.Sequential:
            return all(ok(c) for c in m.children())
        if type(m) is nn.Linear or isinstance(m, nn.modules.batchnorm._BatchNorm) or _is_reshape(m):
            return True
        return isinstance(m, _PER_EXAMPLE) and not any(True for _ in m.parameters())
    return ok(model)


def _is_reshape(module: nn.Module) -> bool:
    from .models import Reshape

    return isinstance(module, Reshape)


def train_stacked(
    models: list[nn.Module],
    train_data: TensorData,
    test_data: TensorData | None,
    cfg: TrainConfig,
    batch_size: int,
    seeds: list[int],
    augment: Augment | None = None,
    run_dirs: list[str | Path] | None = None,
    loss_fn: LossFn = F.cross_entropy,
    progress: bool | None = None,
    desc: str = "train stacked",
    keep_epochs: tuple[int, ...] = (),
) -> list[TrainResult]:
    """Train each ``models[k]`` in place as ``train(models[k], ..., seed=seeds[k], run_dir=run_dirs[k])``
    would, all K at once (see the module docstring). Returns one :class:`train.TrainResult` per seed."""
    K = len(models)
    if K == 0 or len(seeds) != K or (run_dirs is not None and len(run_dirs) != K):
        raise ValueError(f"need one seed (and run_dir) per model: {K} models, {len(seeds)} seeds")
    for m in models:
        why = stackable(m, max_params=math.inf)
        if why:
            raise ValueError(f"cannot train stacked: {why}")
    names = [[(n, t.shape) for n, t in [*m.named_parameters(), *m.named_buffers()]] for m in models]
    if any(n != names[0] for n in names):
        raise ValueError("models differ in architecture (parameter and buffer names or shapes)")
    n = len(train_data)
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
    steps_per_epoch = n // batch_size
    peak = scaled_lr(cfg, batch_size)
    warmup_steps = math.ceil(cfg.warmup_epochs * steps_per_epoch)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    rng_states = [_seeded_rng_state(s) for s in seeds]
    results = [TrainResult(steps_per_epoch=steps_per_epoch, lr=peak, batch_size=batch_size) for _ in range(K)]
    dirs = [Path(d) for d in run_dirs] if run_dirs is not None else None

    states = [None] * K
    if dirs is not None:
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        states = [_load_state(d / "state.pt") for d in dirs]
        done = {None if s is None else s["result"]["epochs_done"] for s in states}
        if len(done) > 1:
            raise ValueError(f"the runs' checkpoints are at different epochs {sorted(done, key=str)}: resume them one by one")
        for k, s in enumerate(states):
            if s is not None:
                models[k].load_state_dict(s["model"])
                gens[k].set_state(s["generator"])
                rng_states[k] = s["rng"]
                results[k] = TrainResult(**s["result"])
                results[k].resumed_from_epoch = results[k].epochs_done

    base = copy.deepcopy(models[0]).to("meta")
    base.train()
    params, buffers = stack_module_state(models)  # copies: the models are written back at the end
    trainable = {name for name, p in models[0].named_parameters() if p.requires_grad}
    for name, p in params.items():
        p.requires_grad_(name in trainable)
    stacked = [p for name, p in params.items() if name in trainable]
    P = len(stacked)
    # The optimizer sees K x P leaf tensors, each one seed's parameter (sharing memory with the
    # stacked tensor), in one param group per seed; their gradients are views of the stacked
    # gradients, which backward accumulates into in place. So the optimizer's kernels (fused Adam
    # vectorizes over each tensor, a scalar tail left over) run on exactly the tensors train() gives them.
    for p in stacked:
        p.grad = torch.zeros_like(p)
    seed_params = [[p.detach()[k].requires_grad_(True) for p in stacked] for k in range(K)]
    for k in range(K):
        for sp, p in zip(seed_params[k], stacked):
            sp.grad = p.grad[k]
    optimizer = make_optimizer(types.SimpleNamespace(parameters=lambda: iter(seed_params[0])), cfg, peak)
    for k in range(1, K):
        optimizer.add_param_group({"params": seed_params[k]})
    if states[0] is not None:
        optimizer.load_state_dict(_group_optimizer_state([s["optimizer"] for s in states], P))
    grads = [p.grad for p in stacked]
    forward = StackedForward(base, params, buffers)
    keep = set(keep_epochs)
    if dirs is not None and 0 in keep and results[0].epochs_done == 0:
        for k in range(K):
            atomic_save_torch(models[k].state_dict(), dirs[k] / "iterates" / "epoch-0.pt")
    active = [r.diverged_epoch is None and r.epochs_done < cfg.epochs for r in results]
    start_epoch = results[0].epochs_done
    step = max(r.steps for r in results)  # the steps taken by the seeds still training
    t0 = time.perf_counter() - results[0].wall_time_s

    def write_back(k: int) -> None:
        with torch.no_grad():
            for name, p in models[k].named_parameters():
                p.copy_(params[name][k])
            for name, b in models[k].named_buffers():
                b.copy_(buffers[name][k])

    bar = progress_bar(range(start_epoch, cfg.epochs), desc=desc, enabled=progress, initial=start_epoch, total=cfg.epochs)
    for epoch in bar:
        if not any(active):
            break
        perms = [torch.randperm(n, generator=g) if a else None for g, a in zip(gens, active)]
        perms = [p if p is not None else perms[active.index(True)] for p in perms]  # a stopped seed idles
        totals, count = [0.0] * K, 0
        for b in range(steps_per_epoch):
            lr = lr_at(step, peak, warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = torch.stack([p[b * batch_size : (b + 1) * batch_size] for p in perms])
            x, y = train_data.x[idx], train_data.y[idx]  # (K, B, ...)
            if augment is not None:
                x = torch.stack([augment(x[k], gens[k]) if active[k] else x[k] for k in range(K)])
            out = forward(x)
            # one loss call per model: the same kernel, and so the same rounding, as train()'s
            losses = [loss_fn(out[k], y[k]) for k in range(K)]
            torch._foreach_zero_(grads)
            torch.stack(losses).sum().backward()
            optimizer.step()
            step += 1
            values = torch.stack(losses).detach().tolist()
            for k in range(K):
                if active[k]:
                    results[k].steps += 1
                    totals[k] += values[k] * batch_size
            count += batch_size
        last_epoch = epoch + 1 == cfg.epochs
        for k in range(K):
            if not active[k]:
                continue
            r = results[k]
            r.epochs_done = epoch + 1
            train_loss = totals[k] / count
            if not math.isfinite(train_loss):
                r.diverged_epoch = epoch + 1
            row = {"epoch": epoch + 1, "steps": r.steps, "batch_size": batch_size, "lr": optimizer.param_groups[0]["lr"],
                   "batch_loss": train_loss}
            last = last_epoch or r.diverged_epoch is not None
            write_back(k)
            if (epoch + 1) % cfg.eval_every == 0 or last:
                row.update(_epoch_metrics(models[k], train_data, test_data, cfg.eval_batch_size))
            row["time_s"] = time.perf_counter() - t0
            r.history.append(row)
            r.wall_time_s = time.perf_counter() - t0
            if dirs is not None:
                if epoch + 1 in keep:
                    atomic_save_torch(models[k].state_dict(), dirs[k] / "iterates" / f"epoch-{epoch + 1}.pt")
                atomic_write_text(dirs[k] / "history.jsonl", "".join(json.dumps(h) + "\n" for h in r.history))
                every = cfg.checkpoint_every
                if (every and (epoch + 1) % every == 0) or last:
                    atomic_save_torch(
                        {"model": models[k].state_dict(),
                         "optimizer": _seed_optimizer_state(optimizer.state_dict(), k, P),
                         "generator": gens[k].get_state(), "rng": rng_states[k], "result": r.as_dict()},
                        dirs[k] / "state.pt",
                    )
            if last:
                active[k] = False  # its model keeps this epoch's state
    if dirs is not None:
        for k in range(K):
            atomic_save_torch(models[k].state_dict(), dirs[k] / "model.pt")
    return results
