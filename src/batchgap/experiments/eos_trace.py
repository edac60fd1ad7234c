"""The edge-of-stability machinery: training on a flat parameter vector with the sharpness tracked.

An :class:`Objective` is a loss on a flat vector theta, ``loss(theta, idx)`` the mean over the training examples
``idx`` (None: all n of them). :func:`trace` runs one optimizer on it (full-batch gradient descent, SGD on
seeded minibatches, or Adam) and every ``every`` steps records the full-data training loss and

    lambda_max = the top eigenvalue of H = d^2 L / dtheta^2 (L the full-data loss),

and for Adam also the preconditioned sharpness lambda_max(P^-1 H), P = diag(sqrt(v_hat)) + eps (Cohen et al.
2022, with their bias factor (1 - beta1^t) left out of P and kept in m_hat, the same update), computed as the
top eigenvalue of the symmetric P^-1/2 H P^-1/2 (the same spectrum). Each eigenvalue is found by Lanczos with
full reorthogonalization (:func:`batchgap.landscape.hessian.lanczos_block`) started from the previous
measurement's eigenvector plus a seeded random part (so an eigenvalue that overtakes the old top one is still
seen), and stopped when the Ritz pair's residual estimate is at most ``tol`` times the eigenvalue.

A run is declared diverged (:func:`diverged`) when its full-data loss is not finite or exceeds ``blowup`` times
the loss at the start; it stops there. On f(x) = x^T A x / 2 gradient descent at step size eta diverges exactly
when lambda_max(A) > 2 / eta (the test suite checks the detector against that).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.func import functional_call

from ..landscape.hessian import lanczos_block
from ..landscape.params import flat, unflatten

OPTIMIZERS = ("gd", "sgd", "adam")
LOSSES = ("cross-entropy", "mse")


@dataclass
class Objective:
    """A training loss on a flat parameter vector: ``loss(theta, idx)``, the mean over the examples ``idx`` (a
    LongTensor; None for all ``n``); ``accuracy(theta)`` the training accuracy, or None where it has none."""

    loss: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    n: int
    theta0: torch.Tensor
    accuracy: Callable[[torch.Tensor], float] | None = None


def model_objective(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str) -> Objective:
    """The training loss of ``model`` (no BatchNorm, no dropout, else ValueError: the loss must be a function of
    the parameters alone) on (x, y).

        cross-entropy:  L = (1/n) sum_i -log softmax(f(x_i))_{y_i}
        mse:            L = (1/n) sum_i (1/2) ||f(x_i) - e_{y_i}||^2      (one-hot targets, summed over classes)

    Args:
        model: the network; its trainable parameters, in ``named_parameters()`` order, are theta. Not modified.
        x: the training inputs.
        y: the integer labels.
        loss: ``"cross-entropy"`` or ``"mse"``.

    Returns:
        An :class:`Objective` with theta0 the model's current parameters (a detached copy).

    Cost:
        ``loss(theta, idx)``: one forward pass over the examples idx.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, not {loss!r}")
    if any(isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.Dropout)) for m in model.modules()):
        raise ValueError("model_objective: the model has BatchNorm or dropout; the loss must be one function of theta")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, shapes = [n for n, _ in named], [p for _, p in named]

    def outputs(theta, idx):
        xs = x if idx is None else x[idx]
        return functional_call(model, dict(zip(names, unflatten(theta, shapes))), (xs,))

    def value(theta, idx=None):
        out, labels = outputs(theta, idx), y if idx is None else y[idx]
        if loss == "mse":
            return 0.5 * (out - torch.nn.functional.one_hot(labels, out.shape[1]).to(out.dtype)).pow(2).sum(1).mean()
        return torch.nn.functional.cross_entropy(out, labels)

    @torch.no_grad()
    def accuracy(theta):
        return float((outputs(theta, None).argmax(1) == y).double().mean())

    return Objective(value, len(y), flat(shapes), accuracy)


def quadratic_objective(A: torch.Tensor, x0: torch.Tensor) -> Objective:
    """f(x) = x^T A x / 2 as an :class:`Objective` of one "example" (its Hessian is A everywhere).

    Args:
        A: a symmetric (N, N) matrix.
        x0: the start point (N,).

    Returns:
        An :class:`Objective` with theta0 a copy of ``x0`` and no accuracy.

    Cost:
        One matrix-vector product per loss.
    """
    def value(theta, idx=None):
        return 0.5 * theta @ (A @ theta)

    return Objective(value, 1, x0.detach().clone())


def hvp_at(obj: Objective, theta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The Hessian-vector product v -> H v, H = d^2 L / dtheta^2 of the full-data loss at ``theta``.

    Args:
        obj: the objective.
        theta: the point.

    Returns:
        A closure mapping vectors (N,) or (k, N) to H v in float64 (cast to theta's dtype for the product).

    Cost:
        One forward pass and gradient with its graph kept (reverse-over-reverse) when called, then one backward
        pass through that graph per vector.
    """
    leaf = theta.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(obj.loss(leaf, None), leaf, create_graph=True)

    def hvp(V: torch.Tensor) -> torch.Tensor:
        rows = V[None] if V.dim() == 1 else V
        out = torch.stack([torch.autograd.grad(g @ r.to(g.dtype), leaf, retain_graph=True)[0].double()
                           for r in rows])
        return out[0] if V.dim() == 1 else out

    return hvp


def top_eigenpair(matvec, v0: torch.Tensor, tol: float = 1e-3, max_steps: int = 60, min_steps: int = 4):
    """The largest (algebraic) eigenvalue and its unit eigenvector of a symmetric operator, by Lanczos with full
    reorthogonalization from ``v0``: stopped once at least ``min_steps`` steps are taken and the top Ritz pair's
    residual estimate beta_j |s_j| is at most ``tol`` |theta|, on an invariant subspace, or after ``max_steps``.

    Args:
        matvec: v (N,) float64 -> A v (N,) float64, A symmetric.
        v0: the start vector (N,), not zero.
        tol: the relative residual estimate at which the top Ritz pair counts as converged.
        max_steps: the cap on Lanczos steps (and on operator products).
        min_steps: the fewest steps taken.

    Returns:
        ``(value, vector (N,) float64, steps, converged)``.

    Cost:
        ``steps`` operator products; memory ``steps x N`` float64.
    """
    state = {"converged": False}

    def stop(alpha, beta):
        T = np.diag(alpha) + np.diag(beta[:-1], 1) + np.diag(beta[:-1], -1)
        theta, S = np.linalg.eigh(T)
        est = abs(beta[-1] * S[-1, -1])
        state["converged"] = bool(est <= tol * max(abs(theta[-1]), np.finfo(float).tiny))
        return len(alpha) >= min_steps and state["converged"]

    chains = lanczos_block(lambda B: matvec(B[0])[None], v0.reshape(1, -1).double(), max_steps, keep_basis=True,
                           stop=stop, breakdown=1e-12)
    theta, S = np.linalg.eigh(chains.tridiagonal(0))
    vector = torch.as_tensor(S[:, -1], dtype=torch.float64, device=v0.device) @ chains.bases[0]
    steps = len(chains.alphas[0])
    return float(theta[-1]), vector, steps, state["converged"] or steps == v0.numel()


def sharpness(obj: Objective, theta: torch.Tensor, start: torch.Tensor, scale: torch.Tensor | None = None,
              tol: float = 1e-3, max_steps: int = 60):
    """lambda_max(D H D) at theta, D = diag(``scale``) (None: the identity, lambda_max(H)); for the preconditioned
    sharpness scale = P^-1/2, so D H D = P^-1/2 H P^-1/2 has the spectrum of P^-1 H.

    Args:
        obj: the objective.
        theta: the point.
        start: the Lanczos start vector (N,).
        scale: the diagonal of D, or None.
        tol: as :func:`top_eigenpair`.
        max_steps: as :func:`top_eigenpair`.

    Returns:
        ``(lambda_max, eigenvector of D H D, Lanczos steps, converged)``.

    Cost:
        One gradient graph over all n examples, then one backward pass through it per Lanczos step.
    """
    hvp = hvp_at(obj, theta)
    if scale is None:
        return top_eigenpair(hvp, start, tol, max_steps)
    d = scale.double()
    return top_eigenpair(lambda v: d * hvp(d * v), start, tol, max_steps)


def diverged(losses, blowup: float = 100.0) -> bool:
    """Whether a run diverged: some recorded loss L_t is not finite or L_t > blowup * L_0.

    Args:
        losses: the full-data losses recorded so far, the first at the start point.
        blowup: the factor over the first loss that counts as divergence.

    Returns:
        True when diverged.

    Cost:
        One pass over ``losses``.
    """
    first = losses[0]
    return any(not math.isfinite(v) or v > blowup * max(first, 1e-12) for v in losses)


@dataclass
class Trace:
    """What :func:`trace` returns: per measured step the full-data loss, the training accuracy, lambda_max (and
    for Adam the preconditioned sharpness), the Lanczos steps each took; ``diverged_at`` the step where the
    run was stopped as diverged (else None); ``iterates`` the measured thetas when asked."""

    steps: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    accuracy: list = field(default_factory=list)
    sharpness: list = field(default_factory=list)
    preconditioned: list = field(default_factory=list)
    lanczos_steps: list = field(default_factory=list)
    converged: list = field(default_factory=list)
    diverged_at: int | None = None
    iterates: list = field(default_factory=list)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("steps", "loss", "accuracy", "sharpness", "lanczos_steps", "converged",
                                            "diverged_at")}
        if self.preconditioned:
            d["preconditioned_sharpness"] = self.preconditioned
        return d


def trace(obj: Objective, optimizer: str, lr: float, steps: int, every: int, *, batch_size: int = 0,
          beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, seed: int = 0, tol: float = 1e-3,
          max_lanczos: int = 60, blowup: float = 100.0, keep_iterates: bool = False, progress=None) -> Trace:
    """Train ``obj`` from theta0 and track the sharpness every ``every`` steps (and at the last step).

        gd:    theta <- theta - lr grad L(theta)                        (all n examples)
        sgd:   theta <- theta - lr grad L_B(theta)                      (B: ``batch_size`` examples, an epoch-wise
                                                                         seeded permutation, the last partial batch
                                                                         dropped)
        adam:  m <- b1 m + (1-b1) g, v <- b2 v + (1-b2) g^2, theta <- theta - lr m_hat / (sqrt(v_hat) + eps)
               (full batch; m_hat, v_hat bias-corrected); measured also lambda_max(P^-1 H), P = diag(sqrt(v_hat))+eps

    Args:
        obj: the objective.
        optimizer: ``"gd"``, ``"sgd"`` or ``"adam"``.
        lr: the step size eta.
        steps: optimizer steps.
        every: measure every this many steps (step 0 and the last step included).
        batch_size: SGD's minibatch (1 <= batch_size <= n).
        beta1: Adam's first-moment decay.
        beta2: Adam's second-moment decay.
        eps: Adam's epsilon (also in P).
        seed: seeds the generator of SGD's batches and of the Lanczos start vectors' random part.
        tol: Lanczos's relative residual estimate (see :func:`top_eigenpair`).
        max_lanczos: the cap on Lanczos steps per eigenvalue.
        blowup: the divergence threshold of :func:`diverged`.
        keep_iterates: keep each measured theta (tests).
        progress: called with the number of steps done after each one, or None.

    Returns:
        A :class:`Trace`.

    Cost:
        ``steps`` gradients (of n or batch_size examples) plus, per measurement, one full-data gradient graph and
        a Lanczos chain (about 4-20 backward passes warm-started; twice that for Adam).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {optimizer!r}")
    if optimizer == "sgd" and not 1 <= batch_size <= obj.n:
        raise ValueError(f"batch_size must be in [1, {obj.n}] for sgd, got {batch_size}")
    if steps < 0 or every < 1 or not lr > 0:
        raise ValueError(f"steps >= 0, every >= 1 and lr > 0 needed, got {steps}, {every}, {lr}")
    gen = torch.Generator().manual_seed(seed)
    theta = obj.theta0.detach().clone()
    N = theta.numel()
    out = Trace()
    m = torch.zeros_like(theta)
    v = torch.zeros_like(theta)
    vec = torch.randn(N, generator=gen, dtype=torch.float64)
    pvec = vec.clone()
    order, pos = None, obj.n
    for t in range(steps + 1):
        if t % every == 0 or t == steps:
            with torch.no_grad():
                loss = float(obj.loss(theta, None))
            out.steps.append(t)
            out.loss.append(loss)
            out.accuracy.append(obj.accuracy(theta) if obj.accuracy is not None else None)
            if diverged(out.loss, blowup):
                out.diverged_at = t
                out.sharpness.append(None)
                out.lanczos_steps.append(0)
                out.converged.append(False)
                if optimizer == "adam":
                    out.preconditioned.append(None)
                break
            lam, vec, k, conv = sharpness(obj, theta, _mixed(vec, gen), None, tol, max_lanczos)
            out.sharpness.append(lam)
            if optimizer == "adam":
                if t == 0:
                    out.preconditioned.append(None)  # v_hat undefined before the first step
                else:
                    scale = (v / (1 - beta2 ** t)).sqrt().add(eps).rsqrt()
                    plam, pvec, pk, pconv = sharpness(obj, theta, _mixed(pvec, gen), scale, tol, max_lanczos)
                    out.preconditioned.append(plam)
                    k, conv = k + pk, conv and pconv
            out.lanczos_steps.append(k)
            out.converged.append(conv)
            if keep_iterates:
                out.iterates.append(theta.clone())
        if t == steps:
            break
        idx = None
        if optimizer == "sgd":
            if pos + batch_size > obj.n:
                order, pos = torch.randperm(obj.n, generator=gen), 0
            idx, pos = order[pos: pos + batch_size], pos + batch_size
        leaf = theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(obj.loss(leaf, idx), leaf)
        with torch.no_grad():
            if optimizer == "adam":
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v / (1 - beta2 ** (t + 1))).sqrt().add_(eps)
                theta = theta - lr * (m / (1 - beta1 ** (t + 1))) / denom
            else:
                theta = theta - lr * g
        if progress is not None:
            progress(t + 1)
    return out


def _mixed(previous: torch.Tensor, gen: torch.Generator, weight: float = 0.1) -> torch.Tensor:
    """The warm start: the previous unit eigenvector plus a seeded random unit vector times ``weight``."""
    r = torch.randn(previous.shape, generator=gen, dtype=torch.float64)
    p = previous / previous.norm()
    return p + weight * r.to(p.device) / r.norm()
