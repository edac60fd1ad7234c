"""The critical-batch study's training, branching and noise measurements on one model and one training set.

:func:`sgd_to_targets` trains with plain SGD (no momentum, no weight decay, a constant learning rate, a seeded
permutation per epoch with the last partial batch dropped) and records the first step at which the full-data
training loss is at or below each target, checked on a geometric grid of steps (every step up to ``2 / (ratio -
1)``, then every ``ratio`` x: the step counts are upper bounds within a factor ``ratio``), and the parameters at
those steps. :func:`branch` continues from such parameters for a fixed number of examples (Merrill et al. 2025's
branched runs). :func:`noise_scales` measures B_simple (exact: :func:`batchgap.landscape.noise.
exact_gradient_noise_scale`) and B_noise (:func:`critical_fit.b_noise_estimate`, per-example gradients by
``torch.func.vmap(grad)``, Hessian-vector products of the full-data loss by reverse-over-reverse) at parameters.

The loss is cross-entropy, mean over examples; the model must have no BatchNorm or dropout (one function of the
parameters, per-example gradients defined).
"""
from __future__ import annotations

import math

import torch
from torch.func import functional_call, grad, vmap
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..landscape.noise import exact_gradient_noise_scale
from .critical_fit import b_noise_estimate


def eval_steps(max_steps: int, ratio: float) -> list[int]:
    """The steps at which the full-data loss is checked: 1, 2, ... then a geometric grid of ratio ``ratio``.

    Args:
        max_steps: the last step (always included).
        ratio: the grid's ratio (> 1).

    Returns:
        The increasing step list.
    """
    steps, s = [], 1
    while s < max_steps:
        steps.append(s)
        s = max(s + 1, int(math.floor(s * ratio)))
    return steps + [max_steps]


@torch.no_grad()
def full_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> float:
    """The mean cross-entropy over all of (x, y).

    Args:
        model: the network.
        x: inputs.
        y: integer labels.
        chunk: examples per forward pass.

    Returns:
        The loss as a float.
    """
    total = sum(float(torch.nn.functional.cross_entropy(model(x[i:i + chunk]), y[i:i + chunk], reduction="sum"))
                for i in range(0, len(y), chunk))
    return total / len(y)


def _sgd(model, x, y, batch, lr, steps, gen, on_step=None):
    """Plain SGD for ``steps`` steps; ``on_step(t)`` after step t may return True to stop. The last step taken."""
    params = [p for p in model.parameters() if p.requires_grad]
    n, perm, pos = len(y), None, len(y)
    for t in range(1, steps + 1):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + batch]
        pos += batch
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
        if on_step is not None and on_step(t):
            return t
    return steps


def sgd_to_targets(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, lr: float, targets,
                   max_steps: int, seed: int, ratio: float = 1.05, blowup: float = 10.0) -> dict:
    """Train ``model`` in place by plain SGD until the full-data loss is at or below every target, it diverges,
    or ``max_steps``.

    Args:
        model: the network (trained in place).
        x: the training inputs.
        y: the labels.
        batch: the batch size (at most len(y)).
        lr: the learning rate.
        targets: training-loss targets (any order).
        max_steps: the step cap.
        seed: seeds the ``torch.Generator`` of the batch order.
        ratio: the check grid's ratio (:func:`eval_steps`).
        blowup: a run with a loss not finite or above ``blowup`` x its initial loss is diverged and stopped.

    Returns:
        ``{"steps": {target: first checked step at or below it, or None}, "iterates": {target: parameter vector
        there}, "initial_loss", "final_loss", "last_step", "diverged"}`` (targets as given, floats).

    Cost:
        One minibatch gradient per step and one full-data forward pass per checked step.
    """
    targets = sorted((float(t) for t in targets), reverse=True)
    checks, hits, iterates = set(eval_steps(max_steps, ratio)), {}, {}
    state = {"loss": full_loss(model, x, y), "diverged": False}
    first = state["loss"]

    def on_step(t):
        if t not in checks:
            return False
        loss = state["loss"] = full_loss(model, x, y)
        if not math.isfinite(loss) or loss > blowup * first:
            state["diverged"] = True
            return True
        for target in targets:
            if target not in hits and loss <= target:
                hits[target] = t
                iterates[target] = parameters_to_vector(model.parameters()).detach().clone()
        return len(hits) == len(targets)

    last = _sgd(model, x, y, batch, lr, max_steps, torch.Generator().manual_seed(seed), on_step)
    return {"steps": {t: hits.get(t) for t in targets}, "iterates": iterates, "initial_loss": first,
            "final_loss": state["loss"] if math.isfinite(state["loss"]) else None, "last_step": last,
            "diverged": state["diverged"]}


def branch(model: torch.nn.Module, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, batch: int, lr: float,
           examples: int, seed: int) -> float | None:
    """From parameters ``theta``, plain SGD at batch size ``batch`` for ``examples // batch`` steps (at least
    one); the full-data loss at its end.

    Args:
        model: the network (its parameters are overwritten).
        theta: the start (a parameter vector).
        x: the training inputs.
        y: the labels.
        batch: the branch's batch size.
        lr: its learning rate.
        examples: the examples it may see.
        seed: seeds its batch order.

    Returns:
        The final full-data loss, or None where it is not finite.

    Cost:
        ``examples`` per-example gradients in ``examples // batch`` steps and one full-data forward pass.
    """
    vector_to_parameters(theta.clone(), model.parameters())
    _sgd(model, x, y, batch, lr, max(1, examples // batch), torch.Generator().manual_seed(seed))
    loss = full_loss(model, x, y)
    return loss if math.isfinite(loss) else None


def noise_scales(model: torch.nn.Module, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, probes: int,
                 seed: int, confidence: float = 0.95) -> dict:
    """B_simple (exact) and B_noise (estimated, :func:`critical_fit.b_noise_estimate`) at parameters ``theta``.

        B_simple = tr(Sigma) / |G|^2,   B_noise = tr(H Sigma) / (G^T H G)

    Args:
        model: the network (its parameters are overwritten with ``theta``).
        theta: the parameters (a vector).
        x: the training inputs.
        y: the labels.
        probes: examples sampled for tr(H Sigma) (all of them when >= len(y): exact).
        seed: seeds the sample.
        confidence: the B_noise interval's coverage.

    Returns:
        ``{"loss", "b_simple", "grad_norm_sq", "trace_sigma", "b_noise": {b_noise_estimate's dict}}``.

    Cost:
        One pass for B_simple (closed-form per-example norms), one gradient graph over all examples, then
        ``probes + 1`` backward passes through it and ``probes`` per-example gradients.
    """
    vector_to_parameters(theta.clone(), model.parameters())
    simple = exact_gradient_noise_scale(model, (x, y))
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    shapes = [p for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() for p in shapes]

    def as_dict(vec):
        return {k: v.view_as(p) for k, v, p in zip(names, vec.split(sizes), shapes)}

    def example_loss(vec, xi, yi):
        out = functional_call(model, as_dict(vec), (xi[None],))
        return torch.nn.functional.cross_entropy(out, yi[None])

    leaf = theta.detach().clone().requires_grad_(True)
    full = torch.nn.functional.cross_entropy(functional_call(model, as_dict(leaf), (x,)), y)
    (G,) = torch.autograd.grad(full, leaf, create_graph=True)

    def hvp(V):
        return torch.stack([torch.autograd.grad(G @ v.to(G.dtype), leaf, retain_graph=True)[0] for v in V])

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
    noise = b_noise_estimate(G.detach(), lambda idx: per_example(theta, x[idx], y[idx]), hvp, len(y), probes, seed,
                             confidence)
    return {"loss": float(full.detach()), "b_simple": simple.b_simple, "grad_norm_sq": simple.grad_norm_sq,
            "trace_sigma": simple.trace_sigma, "b_noise": noise}
