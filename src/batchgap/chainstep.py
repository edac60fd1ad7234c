"""The chain step: :func:`batchgap.step.sgd_step` for a chain of Linear, BatchNorm1d and ReLU layers on the
CPU, the same bits without autograd. The one module of batchgap that calls torch's private API.

A batch-32 step of the default MLP spends about half its time outside arithmetic: the modules' Python,
the autograd graph and engine, the optimizer's Python around its fused kernel, about 45 small operations
in all. For the models that are a plain chain of these layers :class:`ChainStep` runs the same aten
operations autograd runs (the forward kernels, the backward formulas of torch's derivatives.yaml in the
order the engine runs them, the same fused Adam kernel: ``torch.ops.aten.*_backward``,
``torch._fused_adam_``), so it computes the same bits, without a graph (``python benchmarks/run.py
training`` measures it against the autograd step: about 1.6x faster on the default MLP).

Those calls are private: a torch release may change what they compute or their signatures. So the step
is used only on the torch versions its bitwise tests (``tests/test_train.py``) ran on, :data:`TESTED_TORCH`;
on any other, :func:`build` says None and :func:`batchgap.train.train` runs the autograd step, which is
what a run records in its ``train_step`` (``"autograd"``, or ``"chainstep"`` when this step ran).
Its one seam is ``train(..., fast_step=True)``.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from .step import LossFn

# The torch releases (major.minor) on which the chain step's bitwise tests passed. A new torch runs the
# autograd step until the tests pass on it and its release is added here.
TESTED_TORCH = ("2.13",)

NAME = "chainstep"  # what a run's record says when this step trained it (else "autograd")


def tested(version: str | None = None) -> bool:
    """Whether torch ``version`` (default: the installed ``torch.__version__``) is one the chain step was
    tested on: its ``major.minor`` is in :data:`TESTED_TORCH`.

    Args:
        version: a torch version string such as ``"2.13.0+cpu"``; None for the installed one.

    Returns:
        True on a tested release (``2.13.x`` for any local build tag), else False.

    Cost: a regular expression on a short string.
    """
    m = re.match(r"(\d+)\.(\d+)", str(torch.__version__ if version is None else version))
    return m is not None and f"{m.group(1)}.{m.group(2)}" in TESTED_TORCH


def build(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn) -> ChainStep | None:
    """The chain step for ``model`` and ``optimizer`` (:meth:`ChainStep.build`), or None where it does not
    apply: another torch than :data:`TESTED_TORCH`, another model, optimizer, loss or device.

    Args:
        model: the network, trained in place.
        optimizer: its optimizer (torch's fused Adam gets one flat update; any other its own ``step()``).
        loss_fn: the loss; only ``torch.nn.functional.cross_entropy`` itself is taken.

    Returns:
        A :class:`ChainStep`, called as ``step(x, y)`` for the batch's mean loss, or None.

    Cost: one pass over the modules; on success one copy of the parameters (and the Adam moments) into flat
    buffers, which the model's tensors then view.
    """
    if not tested():
        return None
    return ChainStep.build(model, optimizer, loss_fn)


def own_storage(obj):
    """``obj`` (a state dict, nested) with each tensor that is a view of a larger buffer copied into a storage
    of its own: the checkpoint files of a :class:`ChainStep` run are then the files the autograd step writes.

    Args:
        obj: a tensor, or dicts, lists and tuples of them (a module's or optimizer's state dict).

    Returns:
        The same structure; tensors that own their storage are the same objects, views are copies.

    Cost: one copy of each viewed tensor.
    """
    if isinstance(obj, dict):
        out = type(obj)((k, own_storage(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a module's state dict: its layers' versions
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(own_storage(v) for v in obj)
    if isinstance(obj, torch.Tensor) and obj.untyped_storage().nbytes() != obj.numel() * obj.element_size():
        return obj.clone()
    return obj


_CHAIN_LAYERS = (nn.Flatten, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Identity)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or getattr(m, "parametrizations", None))


def _chain(model: nn.Module) -> list[nn.Module] | None:
    """The layers of ``model`` in the order it runs them, when it is a (nested) nn.Sequential of
    Flatten(1, -1), Linear, affine BatchNorm1d, ReLU and Identity modules with no hooks; else None."""
    out: list[nn.Module] = []

    def walk(m: nn.Module) -> bool:
        if _hooked(m):
            return False
        if type(m) is nn.Sequential:
            return all(walk(c) for c in m)
        t = type(m)
        if t not in _CHAIN_LAYERS:
            return False
        if t is nn.Flatten and (m.start_dim, m.end_dim) != (1, -1):
            return False
        if t is nn.BatchNorm1d and (not m.affine or not m.eps > 0):
            return False
        if t is not nn.Identity:
            out.append(m)
        return True

    if not walk(model):
        return None
    from torch.nn.modules import module as _module
    if (_module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
            or _module._global_backward_pre_hooks):
        return None
    return out


_ATEN: tuple = ()


def _aten() -> tuple:
    """The backward operators the chain step calls, looked up once."""
    global _ATEN
    aten = torch.ops.aten
    _ATEN = (aten.nll_loss_forward.default, aten.nll_loss_backward.default, aten.native_batch_norm_backward.default,
             aten.threshold_backward.default)
    return _ATEN


class ChainStep:
    """:func:`batchgap.step.sgd_step` for a chain of Linear, BatchNorm1d and ReLU layers (:func:`_chain`) on
    the CPU, the same update bit for bit, without autograd. :meth:`build` makes one, or says None for any
    other model, optimizer or loss (the module's :func:`build` also for an untested torch).

    The parameters, their gradients, the BatchNorm batch counters and (for torch's fused Adam) the moments
    become views of one flat buffer each: the update is one fused-Adam kernel on one tensor (a few, see
    :meth:`_flat_adam`), the counters
    one increment, and as each step writes every gradient in full there is no zero_grad. ``p.grad``,
    buffers and ``optimizer.state`` stay what torch expects (views), so ``optimizer.step()``, state dicts
    and checkpoints work as before: call :meth:`enter` before a run of these steps (another step may have
    run in between) and :meth:`leave` after it (it writes the one step count back into each parameter's
    state). :meth:`unflatten` gives each tensor its own storage again.
    """

    def __init__(self, model: nn.Module, layers: list[nn.Module], optimizer: torch.optim.Optimizer, params: list):
        self.model, self.layers, self.optimizer, self.params = model, layers, optimizer, params
        p0 = params[0]
        self.dtype, self.device = p0.dtype, p0.device
        self.bns = [m for m in layers if type(m) is nn.BatchNorm1d]
        with torch.no_grad():
            self.flat = self._flatten(params, lambda p: p.data, lambda p, v: setattr(p, "data", v))
            self.flat_grad = torch.zeros_like(self.flat)
            self.grads, offset = {}, 0
            for p in params:
                self.grads[p] = self.flat_grad[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
            counted = [m for m in self.bns if m.track_running_stats and m.num_batches_tracked is not None]
            self.counters = None
            if counted and len({m.num_batches_tracked.dtype for m in counted}) == 1:
                self.counted = counted
                self.counters = self._flatten(counted, lambda m: m.num_batches_tracked,
                                              lambda m, v: setattr(m, "num_batches_tracked", v))
        self.one = torch.ones((), dtype=p0.dtype, device=p0.device)
        self.adam = self._flat_adam()

    @staticmethod
    def _flatten(items: list, get, put) -> torch.Tensor:
        """One buffer holding ``get(item)`` of every item, each item's tensor replaced by its view (``put``)."""
        tensors = [get(i) for i in items]
        flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
        offset = 0
        for item, t in zip(items, tensors):
            view = flat[offset : offset + t.numel()].view_as(t)
            view.copy_(t)
            put(item, view)
            offset += t.numel()
        return flat

    @classmethod
    def build(cls, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn) -> ChainStep | None:
        """A chain step for ``model`` (a chain of Linear, BatchNorm1d, ReLU on the CPU, every parameter in
        ``optimizer``, no hooks) and ``loss_fn`` ``F.cross_entropy``, or None for anything else. It does not
        check the torch version: :func:`batchgap.chainstep.build` does (what ``train()`` calls)."""
        import torch.nn.functional as F

        if loss_fn is not F.cross_entropy:
            return None
        layers = _chain(model)
        if not layers or not any(type(m) is nn.Linear for m in layers):
            return None
        params = [p for g in optimizer.param_groups for p in g["params"]]
        mine = [p for m in layers for p in m.parameters(recurse=False)]
        ids = {id(p) for p in params}
        if len(ids) != len(params) or len({id(p) for p in mine}) != len(mine) or ids != {id(p) for p in mine}:
            return None  # frozen, shared or foreign parameters: the general step
        p0 = params[0]
        tensors = params + [b for m in layers for b in m.buffers(recurse=False)]
        if not (p0.is_floating_point() and all(t.device.type == "cpu" for t in tensors)
                and all(p.dtype == p0.dtype and p.requires_grad and p.is_contiguous() for p in params)):
            return None
        if any(p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) for p in params):
            return None
        return cls(model, layers, optimizer, params)

    def _flat_adam(self) -> dict | None:
        """The flat moments and step count when the optimizer is torch's fused Adam in one group, else None
        (then each step ends with ``optimizer.step()``)."""
        from torch.optim import optimizer as _optim

        opt = self.optimizer
        if type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1:
            return None
        g = opt.param_groups[0]
        if (not g.get("fused") or g.get("amsgrad") or g.get("capturable") or g.get("differentiable")
                or torch.is_tensor(g["lr"]) or any(torch.is_tensor(b) for b in g["betas"])):
            return None
        if (opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks
                or _optim._global_optimizer_pre_hooks or _optim._global_optimizer_post_hooks):
            return None
        states = [opt.state.get(p, {}) for p in self.params]
        fresh = all(len(s) == 0 for s in states)
        if not fresh and not all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in states):
            return None
        if not fresh and len({float(s["step"]) for s in states}) != 1:
            return None
        if fresh:  # Adam's lazy initialization (torch.optim.Adam._init_group, fused), done here
            for p in self.params:
                opt.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        states = [opt.state[p] for p in self.params]
        with torch.no_grad():
            moments = [self._flatten(states, lambda s, k=k: s[k], lambda s, v, k=k: s.__setitem__(k, v))
                       for k in ("exp_avg", "exp_avg_sq")]
        # The kernel runs each tensor's elements in vector registers but its last numel % width through
        # scalar code, which can round differently: one tensor for the parameters whose
        # sizes are multiples of any vector (256 bytes) in a row, cut after each that is not, keeps every
        # element on the path it takes parameter by parameter (and the kernel's per-thread chunks are whole
        # cache lines, so whole vectors, either way).
        segments, start, offset = [], 0, 0
        for p in self.params:
            offset += p.numel()
            if (p.numel() * p.element_size()) % 256:
                segments.append((start, offset))
                start = offset
        if start < offset:
            segments.append((start, offset))
        step = torch.zeros((), dtype=torch.float32)
        views = [[t[a:b] for a, b in segments] for t in (self.flat, self.flat_grad, *moments)]
        return {"group": g, "views": views, "steps": [step] * len(segments), "step": step, "states": states,
                "update": torch._fused_adamw_ if g.get("decoupled_weight_decay") else torch._fused_adam_}

    def accepts(self, x: torch.Tensor, y: torch.Tensor, batch: int) -> bool:
        """Whether batches like ``x``, ``y`` (``batch`` examples) can take this step; else the general step
        (which raises what the model would raise: a wrong shape or dtype, a batch of one under BatchNorm,
        or takes what only it takes: class probabilities as targets)."""
        flatten = type(self.layers[0]) is nn.Flatten
        return (x.device == self.device and x.dtype == self.dtype and (x.dim() == 2 or flatten and x.dim() > 2)
                and y.device == self.device and y.dtype == torch.long and y.dim() == 1
                and (batch > 1 or not self.bns) and all(m.training for m in self.layers))

    def enter(self) -> None:
        """Before a run of steps: gradients are the flat buffer's views, the step count the optimizer's,
        and the program holds the layers' tensors as they are now."""
        for p in self.params:
            if p.grad is not self.grads[p]:
                p.grad = self.grads[p]
        if self.adam is not None:
            self.adam["step"].copy_(self.adam["states"][0]["step"])
        # one tuple per layer: its kind, what its forward and backward need (tensors: detached views)
        self.program, first = [], True
        with torch.no_grad():
            for m in self.layers:
                t = type(m)
                if t is nn.Linear:
                    w = m.weight.detach()
                    b = None if m.bias is None else m.bias.detach()
                    grad_b = b is not None and self.grads[m.bias]  # False: no bias
                    self.program.append((0, w, w.t(), b, self.grads[m.weight], grad_b, first))
                    first = False
                elif t is nn.BatchNorm1d:
                    running = m.track_running_stats
                    count = m.num_batches_tracked if running and m.num_batches_tracked is not None else None
                    factor = 0.0 if m.momentum is None else m.momentum
                    stats = (m.running_mean, m.running_var) if running else (None, None)
                    # the counters are one flat buffer, incremented once for all layers by __call__
                    cumulative = count if m.momentum is None else None
                    if count is not None and self.counters is None:
                        self.program.append((4, count))
                    self.program.append((1, m.weight.detach(), m.bias.detach(), *stats, factor, cumulative, m.eps,
                                         self.grads[m.weight], self.grads[m.bias], first))
                    first = False
                elif t is nn.ReLU:
                    self.program.append((2,))
                else:
                    self.program.append((3,))

    def leave(self) -> None:
        """After a run of steps: each parameter's step count in the optimizer's state is the flat one."""
        if self.adam is not None:
            for s in self.adam["states"]:
                s["step"].copy_(self.adam["step"])

    @torch.no_grad()
    def unflatten(self) -> None:
        """Give every parameter and BatchNorm counter a storage of its own again (the values unchanged)."""
        for p in self.params:
            p.data = p.data.clone()
        if self.counters is not None:
            for m in self.counted:
                m.num_batches_tracked = m.num_batches_tracked.clone()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One step on the batch ``x``, ``y``: the update :func:`batchgap.step.sgd_step` makes with
        ``F.cross_entropy`` (mean over the batch), bit for bit. Returns the batch's mean loss (no graph).
        Cost: the forward, the backward and the optimizer update of the chain, as autograd runs them."""
        addmm, mm, batch_norm, relu = torch.addmm, torch.mm, torch.native_batch_norm, torch.relu
        nll_loss_forward, nll_loss_backward, batch_norm_backward, relu_backward = _ATEN or _aten()
        program = self.program
        if self.counters is not None:
            self.counters.add_(1)  # nn.BatchNorm1d's num_batches_tracked += 1, for every layer at once
        saved = []
        h = x
        for op in program:
            kind = op[0]
            if kind == 0:  # nn.Linear: F.linear
                saved.append(h)
                h = addmm(op[3], h, op[2]) if op[3] is not None else mm(h, op[2])
            elif kind == 1:  # nn.BatchNorm1d.forward in training mode
                _, w, b, mean, var, factor, cumulative, eps = op[:8]
                if cumulative is not None:
                    factor = 1.0 / float(cumulative)
                out, save_mean, save_invstd = batch_norm(h, w, b, mean, var, True, factor, eps)
                saved.append((h, save_mean, save_invstd))
                h = out
            elif kind == 2:
                h = relu(h)
                saved.append(h)
            elif kind == 3:
                h = h.flatten(1)
            else:
                op[1].add_(1)
        # F.cross_entropy: log_softmax, nll_loss (mean); then back through both, as autograd does
        logp = torch._log_softmax(h, 1, False)
        loss, total_weight = nll_loss_forward(logp, y, None, 1, -100)
        g = nll_loss_backward(self.one, logp, y, None, 1, -100, total_weight)
        g = torch._log_softmax_backward_data(g, logp, 1, logp.dtype)
        for op in reversed(program):
            kind = op[0]
            if kind == 0:  # AddmmBackward0: weight.t() is column-major, so grad.t() @ input; the bias: sum
                _, w, _, _, gw, gb, first = op
                mm(g.t(), saved.pop(), out=gw)
                if gb is not False:
                    torch.sum(g, 0, out=gb)
                if first:  # the input needs no gradient: the backward ends here, as autograd's does
                    break
                g = mm(g, w)
            elif kind == 1:  # NativeBatchNormBackward0
                _, w, _, mean, var, _, _, eps, gw, gb, first = op
                inp, save_mean, save_invstd = saved.pop()
                g, dw, db = batch_norm_backward(
                    g, inp, w, mean, var, save_mean, save_invstd, True, eps, [not first, True, True])
                gw.copy_(dw)
                gb.copy_(db)
                if first:
                    break
            elif kind == 2:  # ReluBackward0
                g = relu_backward(g, saved.pop(), 0)
        adam = self.adam
        if adam is None:
            self.optimizer.step()
        else:
            group = adam["group"]
            beta1, beta2 = group["betas"]
            adam["step"].add_(1)
            params, grads, exp_avg, exp_avg_sq = adam["views"]
            adam["update"](params, grads, exp_avg, exp_avg_sq, [], adam["steps"], amsgrad=False, lr=group["lr"],
                           beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                           maximize=group["maximize"], grad_scale=None, found_inf=None)
        return loss
