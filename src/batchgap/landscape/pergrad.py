"""Per-example squared gradient norms in closed form: one forward and backward pass per eval batch.

For a layer whose parameters enter only through its own output, example i's parameter gradient is a
function of that layer's input a_i and of delta_i, the gradient of the SUM of per-example losses with
respect to the layer's output (example i's own loss only: delta is per example, never divided by the
batch size). Squared norms then come without forming per-example gradients (Goodfellow 2015):

* ``nn.Linear``, input (B, F): g_W,i = delta_i a_i^T, so |g_W,i|^2 = |a_i|^2 |delta_i|^2; |g_b,i|^2 = |delta_i|^2.
* ``nn.Linear``, input (B, T, F) (any dims between the first and the last are flattened into T):
  |sum_t delta_t a_t^T|^2 = sum_{t,s} (a_t . a_s)(delta_t . delta_s) from the two T x T Gram matrices, or
  the (F_out, F_in) matrix itself where that is cheaper (T (F_in + F_out) >= F_in F_out); bias |sum_t delta_t|^2.
* BatchNorm in eval mode with running statistics (a fixed per-channel affine map y = w x_hat + b): g_w,i =
  the sum over positions (dims after the channel) of delta * x_hat, g_b,i the sum of delta.

:func:`per_example_moments` returns what the vmap enumeration of :mod:`noise` returns: sum_i g_i (from the
same backward pass, in float64), sum_i |g_i|^2 (float64) and n. It refuses (:class:`NoClosedForm`, the
caller then enumerates with vmap) any model where a measured parameter is not the weight or bias of exactly
one such layer (other layer types, tied or shared tensors, a layer called twice, BatchNorm with batch
statistics, a Linear or BatchNorm subclass with its own forward), and checks itself on the first examples
of the first batch against ``torch.autograd.grad`` of each example's loss (which also catches a weight used
outside its layer's call or a batch dimension that is not the first). Hooks: a forward hook per measured
layer (its input; a tensor hook on its output for delta), removed on leaving, also on error; no ``.grad``
is written. Norms per layer in the model's dtype, sums over layers and examples in float64.

:class:`Mapper` is the other way, for any model: a per-example (or per-ghost-batch) function mapped with
``vmap``, or in a loop where vmap cannot trace the model (:mod:`noise`'s enumeration and sampled batches).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.func import vmap

from . import ranks
from .evaluate import my_batches
from .params import is_batchnorm, named_parameters

CLOSED_FORM_PATH = "per-example norms (Linear/BN closed form)"
VERIFY_EXAMPLES = 4  # examples of the first batch checked against a loop of autograd
_BUDGET = 2**22  # entries of the per-example (F_out, F_in) matrices or T x T Gram matrices at a time


class NoClosedForm(Exception):
    """The model is outside the closed form; the message says why (for ``grad_path``)."""


def _layers(model: nn.Module, which: str) -> tuple[list[tuple[str, torch.Tensor]], dict]:
    """The measured parameters and {module: (name, kind, measures weight, measures bias)} of their layers."""
    named = named_parameters(model, which)
    chosen = {id(p): n for n, p in named}
    owners: dict[int, list] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in chosen:
                owners.setdefault(id(p), []).append((mname, m, pname))
    layers: dict = {}
    for _, p in named:
        where = owners.get(id(p), [])
        if len(where) != 1:
            raise NoClosedForm(f"parameter {chosen[id(p)]!r} is tied or shared ({len(where)} places)")
        mname, m, pname = where[0]
        label = f"{type(m).__name__} {mname!r}"
        if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward:
            kind = "linear"
        elif is_batchnorm(m) and type(m).forward is nn.modules.batchnorm._BatchNorm.forward:
            if m.training or m.running_mean is None or m.running_var is None:
                raise NoClosedForm(f"{label} normalizes with batch statistics")
            kind = "bn"
        else:
            raise NoClosedForm(f"{label} holds measured parameters")
        if pname not in ("weight", "bias") or getattr(m, pname) is not p:
            raise NoClosedForm(f"{label} parameter {pname!r} is not its weight or bias")
        _, _, w, b = layers.get(m, (mname, kind, False, False))
        layers[m] = (mname, kind, w or pname == "weight", b or pname == "bias")
    return named, layers


def _sq(t: torch.Tensor, dims) -> torch.Tensor:
    """Squared Euclidean norms over ``dims`` (one reduction, no temporary), in float64."""
    return torch.linalg.vector_norm(t, dim=dims).double().square()


def closed_form_reason(model: nn.Module, which: str = "all") -> str | None:
    """None when :func:`per_example_moments` applies to the model as it is (its modes set), else why not."""
    try:
        _layers(model, which)
    except NoClosedForm as err:
        return str(err)
    return None


def _linear_sq(a: torch.Tensor, d: torch.Tensor, weight: bool, bias: bool) -> torch.Tensor:
    """|g_W,i|^2 + |g_b,i|^2 for each example i of a Linear layer's input a and output gradient d (float64)."""
    B = a.shape[0]
    if a.dim() == 2:
        dd = _sq(d, 1)
        return (dd * _sq(a, 1) if weight else 0) + (dd if bias else 0)
    out = torch.zeros(B, dtype=torch.float64, device=a.device)
    a, d = a.reshape(B, -1, a.shape[-1]), d.reshape(B, -1, d.shape[-1])
    T, f_in, f_out = a.shape[1], a.shape[2], d.shape[2]
    if bias:
        out += _sq(d.sum(1), 1)
    if weight:
        gram = T * (f_in + f_out) < f_in * f_out
        per = max(1, _BUDGET // (T * T if gram else f_in * f_out))
        for s in range(0, B, per):
            a_s, d_s = a[s : s + per], d[s : s + per]
            if gram:  # |sum_t d_t a_t^T|^2 = sum_{t,s} (a_t . a_s)(d_t . d_s)
                out[s : s + per] += ((a_s @ a_s.transpose(1, 2)) * (d_s @ d_s.transpose(1, 2))).sum((1, 2)).double()
            else:
                out[s : s + per] += _sq(d_s.transpose(1, 2) @ a_s, (1, 2))
    return out


def _bn_sq(m: nn.Module, x: torch.Tensor, d: torch.Tensor, weight: bool, bias: bool) -> torch.Tensor:
    """|g_w,i|^2 + |g_b,i|^2 for each example of an eval-mode BatchNorm (running statistics), float64."""
    shape, dims = (1, -1) + (1,) * (x.dim() - 2), tuple(range(2, x.dim()))
    out = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    if weight:  # x_hat = (x - mean) / sqrt(var + eps) = x s - mean s, one fused op
        s = torch.rsqrt(m.running_var + m.eps)
        g = d * torch.addcmul((-m.running_mean * s).view(shape), x, s.view(shape))
        out += _sq(g.sum(dims) if dims else g, 1)
    if bias:
        out += _sq(d.sum(dims) if dims else d, 1)
    return out


def mean_loss_error(batch_value: float, per: torch.Tensor) -> ValueError | None:
    """The check of :func:`noise._check_mean_loss`: the batch loss is the mean of the per-example losses."""
    mean_value = float(per.double().mean())
    tol = 1000 * torch.finfo(per.dtype).eps * max(1.0, abs(batch_value))
    if abs(batch_value - mean_value) <= tol:
        return None
    return ValueError(
        f"loss_fn must return the batch mean of per-example losses (and the model must treat examples "
        f"independently): on {len(per)} examples it gave {batch_value:.6g}, the mean of the per-example "
        f"losses is {mean_value:.6g}"
    )


def _verify(model: nn.Module, params: list, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor,
            out: torch.Tensor, closed: torch.Tensor) -> None:
    """The first examples' closed-form squared norms against autograd of each example's own loss."""
    k = min(VERIFY_EXAMPLES, len(y))
    losses, ref = [], []
    for i in range(k):
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True) if loss.requires_grad else [None] * len(params)
        losses.append(loss.detach())
        ref.append(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))
    if k > 1 and (err := mean_loss_error(float(loss_fn(out[:k], y[:k])), torch.stack(losses))):
        raise err
    ref_t = torch.tensor(ref, dtype=torch.float64)
    scale = float(ref_t.abs().max())
    tol = 10 * math.sqrt(torch.finfo(out.dtype if out.is_floating_point() else torch.float32).eps)
    diff = float((closed[:k].cpu() - ref_t).abs().max())
    if diff > tol * max(scale, 1e-300) and diff > 0:
        raise NoClosedForm(f"the closed form disagreed with autograd on the first {k} examples "
                           f"(max difference {diff:.3g} of {scale:.3g}): a layer's batch dimension is not the "
                           "first, or a weight is used outside its layer")


def per_example_moments(model: nn.Module, data, loss_fn: Callable, batch_size: int = 1000, which: str = "all",
                        check: bool = True):
    """``({name: sum_i g_i} float64, sum_i |g_i|^2 float64, n)`` over every example of ``data``, g_i the
    gradient of example i's loss in the ``which`` parameters, in one forward and backward pass per batch of
    ``batch_size``. ``loss_fn`` returns the batch mean. Call inside :func:`functional.session` (eval mode);
    raises :class:`NoClosedForm` (before reading any data, or after the first batch) when it does not apply."""
    named, layers = _layers(model, which)
    if not named:
        raise ValueError(f"the model has no trainable parameters for params={which!r}")
    params = [p for _, p in named]
    owner = {id(p): m for m in layers for p in m.parameters(recurse=False)}
    state = {"active": True, "calls": {}, "inputs": {}, "deltas": {}}

    def forward_hook(m, inputs, output):
        if not state["active"]:
            return
        state["calls"][m] = state["calls"].get(m, 0) + 1
        state["inputs"][m] = inputs[0].detach() if inputs and torch.is_tensor(inputs[0]) else None
        if torch.is_tensor(output) and output.requires_grad:
            output.register_hook(lambda g, m=m: state["deltas"].__setitem__(m, g.detach()))

    grad_sum = {n: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for n, p in named}
    sq_sum, count, checked = torch.zeros((), dtype=torch.float64), 0, not check
    handles = [m.register_forward_hook(forward_hook) for m in layers]
    try:
        for x, y in my_batches(data, batch_size):
            for key in ("calls", "inputs", "deltas"):
                state[key].clear()
            with torch.enable_grad():
                out = model(x)
                total = loss_fn(out, y) * len(y)  # the sum of per-example losses: delta per example
                grads = (torch.autograd.grad(total, params, allow_unused=True) if total.requires_grad
                         else [None] * len(params))
            sq = torch.zeros(len(y), dtype=torch.float64, device=out.device)
            for m, (mname, kind, w, b) in layers.items():
                calls, a, d = state["calls"].get(m, 0), state["inputs"].get(m), state["deltas"].get(m)
                if calls > 1:
                    raise NoClosedForm(f"{type(m).__name__} {mname!r} is called {calls} times in one forward")
                if d is None:  # not called, or its output does not reach the loss: its gradient must be none
                    if any(g is not None for p, g in zip(params, grads) if owner[id(p)] is m):
                        raise NoClosedForm(f"{type(m).__name__} {mname!r}'s parameters get gradient outside "
                                           "its own call")
                    continue
                if a is None or a.dim() < 2 or a.shape[0] != len(y):
                    raise NoClosedForm(f"{type(m).__name__} {mname!r}'s input is not (batch, ...) shaped")
                sq += (_linear_sq(a, d, w, b) if kind == "linear" else _bn_sq(m, a, d, w, b)).to(sq.device)
            if not checked:
                state["active"] = False
                with torch.enable_grad():
                    _verify(model, params, loss_fn, x, y, out.detach(), sq)
                state["active"], checked = True, True
            for (n, _), g in zip(named, grads):
                if g is not None:
                    grad_sum[n] += g.double()
            sq_sum += sq.sum().cpu()
            count += len(y)
            del out, total, grads
    finally:
        for h in handles:
            h.remove()
    return summed_moments(grad_sum, sq_sum, count)


def summed_moments(grad_sum: dict, sq_sum, count):
    """The moments of this rank's share summed over the ranks (:func:`ranks.all_sum`; as they are alone)."""
    names = list(grad_sum)
    *grads, sq_sum, count = ranks.all_sum(*grad_sum.values(), sq_sum, count)
    return dict(zip(names, grads)), sq_sum, count


def _stack(rows: list):
    """Like pytrees (dicts, tuples, tensors) as one pytree of stacked tensors."""
    if isinstance(rows[0], dict):
        return {k: _stack([r[k] for r in rows]) for k in rows[0]}
    return tuple(_stack(list(c)) for c in zip(*rows)) if isinstance(rows[0], tuple) else torch.stack(rows)


class Mapper:
    """``map``: vmap over the leading dimension, or a loop over it (the same function, one row at a time).
    ``run``: where vmap fails to trace the model, switch to the loop for good and compute again."""

    def __init__(self, over: str, use_vmap: bool = True):
        self.over, self.vmap, self.path = over, use_vmap, "vmap" if use_vmap else f"loop over {over} (forced)"

    def map(self, fn: Callable, theta, *rows):
        if self.vmap:
            return vmap(fn, in_dims=(None,) + (0,) * len(rows))(theta, *rows)
        return _stack([fn(theta, *(r[i] for r in rows)) for i in range(len(rows[0]))])

    def run(self, compute: Callable):
        try:
            return compute()
        except Exception as err:  # noqa: BLE001 - the loop below reraises anything that is not vmap's
            if not self.vmap:
                raise
            self.vmap = False
            out = compute()  # an error here is the model's or the loss's own, and propagates
            first = (str(err).splitlines() or [""])[0][:160]
            self.path = f"loop over {self.over}: vmap could not trace the model ({type(err).__name__}: {first})"
            return out


@torch.no_grad()
def objective_moments(F, chunk: int):
    """sum_j h_j ({name: float64}), sum_j |h_j|^2 and the unit count N, each unit's gradient h_j the gradient of
    its loss in the objective's per-unit vector: per batch one forward and ``ceil(k / chunk)`` batched backward
    passes (``is_grads_batched``) of the k per-unit losses."""
    grad_sum = {name: torch.zeros(t.shape, dtype=torch.float64, device=t.device)
                for name, t in F.as_dict(F.x0).items()}
    sq_sum, count = torch.zeros((), dtype=torch.float64), 0
    for batch in F.batches():
        leaf = F.x0.detach().requires_grad_(True)
        with torch.enable_grad():
            per = F.objective.per_unit(F.bound(leaf), batch)
        if per is None:
            raise ValueError(f"exact_gradient_noise_scale needs per-unit losses and the objective {F.objective.name} "
                             "gives only (loss_sum, weight): make it return the 1-D vector of per-unit losses")
        k = len(per)
        for s in range(0, k, chunk):
            eye = torch.zeros(min(chunk, k - s), k, dtype=per.dtype, device=per.device)
            eye[torch.arange(len(eye)), torch.arange(s, s + len(eye))] = 1
            (g,) = torch.autograd.grad(per, leaf, grad_outputs=eye, is_grads_batched=True,
                                       retain_graph=s + chunk < k)
            for name, t in F.as_dict(g.sum(0)).items():
                grad_sum[name] += t.double()
            sq_sum += (torch.linalg.vector_norm(g, dim=1).double() ** 2).sum().cpu()
        count += k
    grad_sum, sq_sum, count = summed_moments(grad_sum, sq_sum, count)
    F.count_units(count)
    return grad_sum, sq_sum, count
