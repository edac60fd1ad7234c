"""Curvature of the full-data loss from Hessian-vector products: top eigenvalues and the trace.

H is the Hessian of L(theta) = (1/n) sum_b |b| loss_fn(model(x_b; theta), y_b) over all of ``data``
with respect to the measured parameters (``params``: ``"all"`` trainable or ``"no-bn"``, each tensor
once: a tied tensor is one block; the result's ``params_measured`` says which), at the model's
parameters. ``data``: any form :func:`evaluate.batches` accepts. Products H v are reverse-over-reverse
(the gradient's graph kept, then a backward pass of grad . v), summed over batches with weights |b| / n
(:meth:`functional.FullDataLoss.hvp`), in float64 accumulation. BN protocol as in :mod:`sharpness`
(``"eval"`` default; ``"recompute"`` once at the centre). Dropout is off. The model is restored bit for bit.

* :func:`hessian_eigenvalues`: the k largest (algebraic) eigenvalues by Lanczos with full
  reorthogonalization from a seeded start vector; stops when every wanted Ritz pair's residual
  estimate ``beta_j |s_{j,i}|`` is at most ``tol * |theta_i|``, or after ``max_hvp`` steps. The
  returned residuals ``||H v - lambda v||`` are then computed with k extra HVPs, not estimated.
* :func:`lanczos_block`: the engine, K independent Lanczos chains with one operator call per step on
  the block of K vectors; :func:`lanczos_top` (one chain) and :mod:`density` use it.
* the trace, :func:`trace.hessian_trace`, lives in :mod:`trace` (its estimators use :func:`lanczos_block`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .functional import FullDataLoss, measured_protocol, session
from .objective import as_objective
from .protocol import Measured, frozen_array, jsonable

HVP_METHOD = ("reverse-over-reverse HVP: backward of grad . v through the kept gradient graph of functional_call "
              "(per batch, built once for all HVPs of the measurement within FullDataLoss.graph_budget), "
              "batch-weighted")


@dataclass(frozen=True)
class EigenResult(Measured):
    """What :func:`hessian_eigenvalues` returns: eigenvalues, computed residuals, HVP count and protocol."""

    eigenvalues: np.ndarray  # (k,), descending
    residuals: np.ndarray  # ||H v_i - lambda_i v_i||, computed with extra HVPs
    converged: bool
    k: int
    tol: float
    lanczos_steps: int
    hvps: int  # all HVPs used, the residual checks included
    seed: int
    method: str
    params_measured: str  # params in words with the counts: trainable of all tensors and entries, tied names
    eigenvectors: np.ndarray | None = field(default=None, repr=False)  # (k, num_params); not in as_dict

    def as_dict(self) -> dict:
        d = jsonable(self)
        d.pop("eigenvectors")
        return d


@dataclass
class LanczosChains:
    """What :func:`lanczos_block` returns, per chain k: ``alphas[k]`` (m_k,) the diagonal of T_k,
    ``betas[k]`` (m_k,) the off-diagonal (the last entry is the residual norm after step m_k, not in
    T_k), ``bases[k]`` (m_k, N) the orthonormal Lanczos vectors (None unless asked), and ``hvps`` the
    operator rows applied (sum of m_k)."""

    alphas: list
    betas: list
    bases: list | None
    hvps: int

    def tridiagonal(self, k: int) -> np.ndarray:
        a, b = self.alphas[k], self.betas[k][:-1]
        return np.diag(a) + np.diag(b, 1) + np.diag(b, -1)


def lanczos_block(matvec, V0: torch.Tensor, steps: int, keep_basis: bool = False, stop=None,
                  breakdown: float = 0.0) -> LanczosChains:
    """K independent Lanczos recurrences with full reorthogonalization, one per row of ``V0`` (K, N).

    Each step calls ``matvec`` ONCE on the (k, N) block of the chains still running (rows in chain
    order; all K until one stops), so an operator that shares work among vectors
    (:meth:`functional.FullDataLoss.hvp`) pays it once per step for all chains. The chains never mix:
    each is reorthogonalized (twice) against its own basis only, and gives the same numbers as run
    alone. Chain k stops after step j when j + 1 == ``steps`` (capped at N), when its beta_j is at most
    ``breakdown`` times the largest |alpha|, beta it has seen (an invariant Krylov subspace: T_k is then
    exact), or when ``stop(alphas, betas)`` (its own coefficient lists) says so. Memory: the bases,
    K (steps + 1) N float64, allocated at once; with ``stop`` they grow by doubling instead, so memory
    follows the steps taken. All float64.
    """
    K, N = V0.shape
    steps = min(steps, N)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cap = steps if stop is None else min(steps, 16)  # with ``stop`` grown by doubling: steps taken only
    Q = torch.zeros(K, cap + 1, N, dtype=torch.float64, device=V0.device)
    Q[:, 0] = V0 / V0.norm(dim=1, keepdim=True)
    alphas, betas = [[] for _ in range(K)], [[] for _ in range(K)]
    scale = [0.0] * K
    active, hvps = list(range(K)), 0
    for j in range(steps):
        if j + 1 >= Q.shape[1]:
            more = min(Q.shape[1], steps + 1 - Q.shape[1])
            Q = torch.cat([Q, torch.zeros(K, more, N, dtype=Q.dtype, device=Q.device)], dim=1)
        W = matvec(Q[active, j])
        hvps += len(active)
        still = []
        for i, k in enumerate(active):
            w = W[i]
            alphas[k].append(float(Q[k, j] @ w))
            basis = Q[k, : j + 1]
            for _ in range(2):  # full reorthogonalization, twice is enough
                w = w - basis.T @ (basis @ w)
            betas[k].append(float(w.norm()))
            scale[k] = max(scale[k], abs(alphas[k][-1]), betas[k][-1])
            done = stop is not None and stop(alphas[k], betas[k])  # asked at every step, the last too
            if done or j + 1 == steps or betas[k][-1] == 0 or betas[k][-1] <= breakdown * scale[k]:
                continue
            Q[k, j + 1] = w / betas[k][-1]
            still.append(k)
        active = still
        if not active:
            break
    bases = [Q[k, : len(alphas[k])] for k in range(K)] if keep_basis else None
    return LanczosChains([np.array(a) for a in alphas], [np.array(b) for b in betas], bases, hvps)


def lanczos_top(matvec, v0: torch.Tensor, k: int, max_steps: int, tol: float):
    """Top-k Ritz pairs of a symmetric operator by Lanczos with full reorthogonalization.

    One chain of :func:`lanczos_block` (``matvec`` maps an (N,) vector to H v); it stops when every
    wanted Ritz pair's residual estimate ``beta_j |s_{j,i}|`` is at most ``tol * |theta_i|`` (checked
    from step k on), on breakdown, or after ``max_steps``.
    Returns ``(values (k,), vectors (k, N), steps, converged)``; all float64.
    """
    state = {"converged": False}

    def converged(alpha, beta):
        T = np.diag(alpha) + np.diag(beta[:-1], 1) + np.diag(beta[:-1], -1)
        theta, S = np.linalg.eigh(T)
        top = np.argsort(theta)[::-1][:k]
        if len(alpha) >= k:
            est = np.abs(beta[-1] * S[-1, top])
            scale = np.maximum(np.abs(theta[top]), np.finfo(float).tiny)
            if np.all(est <= tol * scale) or beta[-1] <= 1e-12 * max(np.abs(theta).max(), 1e-300):
                state["converged"] = True
        return state["converged"]

    chains = lanczos_block(lambda B: matvec(B[0])[None], v0.reshape(1, -1), max_steps, keep_basis=True,
                           stop=converged)
    theta, S = np.linalg.eigh(chains.tridiagonal(0))
    top = np.argsort(theta)[::-1][:k]
    Q = chains.bases[0]
    vectors = torch.as_tensor(S[:, top].T, dtype=torch.float64, device=v0.device) @ Q
    return theta[top], vectors, len(chains.alphas[0]), state["converged"]


def hessian_eigenvalues(
    model: nn.Module, data, k: int = 1, loss_fn=None, batch_size: int = 1000, bn: str = "eval",
    params: str = "all", seed: int = 0, tol: float = 1e-3, max_hvp: int = 100,
    return_eigenvectors: bool = False, bn_data=None, objective=None,
) -> EigenResult:
    """The k largest (algebraic) eigenvalues of the full-data loss Hessian, with residuals and the HVP count.

        H = d^2/dtheta^2 (1/n) sum_b |b| loss_fn(model(x_b; theta), y_b),    H v_i = lambda_i v_i

    by Lanczos with full reorthogonalization from a seeded N(0, 1) start vector, stopped when every wanted
    Ritz pair's residual estimate is at most ``tol * |lambda_i|`` or after ``max_hvp`` steps; the returned
    residuals ||H v_i - lambda_i v_i|| are then computed, not estimated.

    Args:
        model: the trained model; restored bit for bit, also on error.
        data: the data the loss is taken over: a tensor pair, a TensorData, a map-style dataset or an iterable
            of batches.
        k: how many of the largest eigenvalues (1 <= k <= number of measured parameters).
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean; None for cross-entropy on logits.
        batch_size: examples per evaluation batch (memory only).
        bn: the BatchNorm protocol: ``"eval"``, ``"batch"`` or ``"recompute"`` (once, at the model's parameters).
        params: the measured parameters: ``"all"`` trainable, or ``"no-bn"``.
        seed: seeds the ``torch.Generator`` that draws the start vector.
        tol: the relative residual at which a Ritz pair counts as converged.
        max_hvp: the cap on Lanczos steps (raised to k when smaller).
        return_eigenvectors: also return the k eigenvectors (k x number of parameters, float64).
        bn_data: the data ``"recompute"`` recomputes the BatchNorm statistics on; None for ``data``.
        objective: how a batch becomes a loss (:mod:`objective`): an Objective, a ready name or a callable
            ``objective(model, batch) -> (loss_sum, weight)``; None for ``(inputs, targets)`` pairs and ``loss_fn``.

    Returns:
        An :class:`EigenResult`: ``eigenvalues`` (descending), ``residuals``, ``converged``, ``lanczos_steps``,
        ``hvps`` (all HVPs, the residual checks included), ``eigenvectors`` when asked, and the protocol.

    Cost:
        At most ``max_hvp + k`` Hessian-vector products over all of ``data``: one forward pass and gradient
        graph per batch (kept for all products while the graphs fit in ``FullDataLoss.graph_budget``), then
        per product a backward pass of grad . v; memory: the Lanczos basis, ``steps x P`` float64.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    obj = as_objective(objective, loss_fn)
    with session(model, bn, data, bn_data, batch_size, obj):
        F = FullDataLoss(model, data, None, batch_size, params, objective=obj)
        if k > F.num_params:
            raise ValueError(f"k={k} exceeds the number of parameters {F.num_params}")
        count = [0]

        def matvec(v):
            count[0] += 1
            return F.hvp(v)

        v0 = torch.randn(F.num_params, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        values, vectors, steps, converged = lanczos_top(matvec, v0.to(F.x0.device), k, max(max_hvp, k), tol)
        Hv = F.hvp(vectors)
        count[0] += len(vectors)
        residuals = (Hv - torch.as_tensor(values.copy(), device=Hv.device)[:, None] * vectors).norm(dim=1)
        proto = measured_protocol(model, F, bn, bn_data, batch_size, params)
    return EigenResult(
        eigenvalues=frozen_array(values), residuals=frozen_array(residuals.cpu().numpy()),
        converged=converged, k=k, tol=tol, lanczos_steps=steps, hvps=count[0], seed=seed,
        method=f"Lanczos, full reorthogonalization, seeded N(0,1) start; {HVP_METHOD}",
        eigenvectors=frozen_array(vectors.cpu().numpy()) if return_eigenvectors else None, **proto,
    )


def rademacher(m: int, N: int, gen: torch.Generator, device) -> torch.Tensor:
    """``m`` Rademacher probes of length ``N`` (entries +-1, float64) drawn from ``gen``, on ``device``: the
    probes of Hutchinson's trace and the start vectors of the spectral density, the same for the same seed."""
    return (torch.randint(0, 2, (m, N), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1).to(device)
