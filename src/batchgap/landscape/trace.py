"""tr(H), the trace of the full-data loss Hessian, by randomized estimators that each report an interval.

H as in :mod:`hessian` (:class:`functional.FullDataLoss` inside :func:`functional.session`). Every estimator
below splits tr(H) into a part computed exactly on an orthonormal basis Q (k x N, possibly empty) and a
Hutchinson estimate on the rest:

    tr(H) = tr(Q H Q^T) + tr(P H P),    P = I - Q^T Q,    tr(P H P) ~ mean_i g_i'^T H g_i',  g_i' = P g_i,

g_i Rademacher (+-1) and independent of Q, so the second term is unbiased given Q, and the interval is the
Student-t interval of the residual values g_i'^T H g_i' (m_r - 1 degrees of freedom), conditional on Q:

* ``"hutchinson"`` (Girard 1989; Hutchinson 1989): Q empty; m probes.
* ``"hutch++"`` (Meyer, Musco, Musco & Woodruff 2021, Algorithm 1 with Rademacher S and G): s = m // 3
  sketch probes S, Q = orth(H S), tr(Q H Q^T) with s more HVPs, m - 2s residual probes.
* ``"lanczos-deflated"`` (this module's default; not a published estimator under that name: Hutchinson on
  the complement of a Krylov space, the idea of Hutch++ with the sketch H S replaced by a Lanczos basis, in
  the family of Chen & Hallman 2023's Krylov-aware estimators but not their algorithm): ``s = round(m *
  LANCZOS_SHARE)`` steps of Lanczos with full reorthogonalization from a Rademacher start give the Krylov
  basis Q (s x N) and tr(Q H Q^T) = sum_j alpha_j (each alpha_j = q_j^T H q_j is computed from the step's
  own HVP, so the exact part costs nothing more), then m - s residual probes. Lanczos finds the few
  outlying eigenvalues of a trained network's Hessian in a few steps, which removes them from the
  residual's variance 2 ||P H P||_F^2 (minus its diagonal).
* ``"xtrace"`` (Epperly, Tropp & Webber 2024, "XTrace", the exchangeable estimator of their Section 2 with
  Rademacher test vectors and without their normalization of the test vectors; as curvlinops' ``xtrace``):
  s = m // 2 test vectors W, Q = orth(H W), and for each i the Hutch++-like estimate t_i with Q_(i) the
  basis of H W without column i and w_i the residual probe; the estimate is mean_i t_i and the interval the
  Student-t interval of the t_i (s - 1 degrees of freedom) around it: the paper's a-posteriori error
  estimate std(t_i) / sqrt(s), which is not a guaranteed interval (the t_i share the sketch); its coverage
  is measured in tests/test_landscape_trace.py.
* ``deflate=`` an :class:`hessian.EigenResult` with eigenvectors (``hessian_eigenvalues(...,
  return_eigenvectors=True)`` on the same model, data and protocol): Q = its k Ritz vectors, tr(Q H Q^T) =
  the sum of their Ritz values (the Rayleigh quotients of the Ritz vectors, exact up to rounding under full
  reorthogonalization), and all m probes go to the residual: the eigenpairs a measurement already has
  remove their eigenvalues from the variance for no HVP.
* shared with the spectral density (:func:`density.density_and_trace`, what a study measures when it measures
  both): Q = the Krylov basis of the density's first Lanczos chain (its ``steps`` vectors), tr(Q H Q^T) = that
  chain's alphas summed, and the residual probes are the density's other start vectors (their values come
  from the chains' first steps, :func:`krylov_residuals`, for no HVP) plus the trace's own probes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .functional import FullDataLoss, measured_protocol, session
from .hessian import HVP_METHOD, EigenResult, LanczosChains, lanczos_block, rademacher
from .montecarlo import interval
from .objective import as_objective
from .protocol import Measured

METHODS = ("lanczos-deflated", "hutch++", "xtrace", "hutchinson")
MIN_PROBES = {"hutchinson": 2, "hutch++": 5, "xtrace": 6, "lanczos-deflated": 4}
LANCZOS_SHARE = 0.5  # of the HVPs, to the Lanczos basis in "lanczos-deflated" (measured: docs/performance.md)
BREAKDOWN = 1e-10  # a Lanczos chain stops when its space is invariant (beta <= this x its largest coefficient)


@dataclass(frozen=True)
class TraceResult(Measured):
    """What :func:`hessian_trace` returns: the estimate, its standard error and interval, and the protocol."""

    value: float
    stderr: float
    ci_low: float
    ci_high: float
    confidence: float
    n_probes: int
    hvps: int
    method: str
    interval: str
    seed: int
    params_measured: str  # params in words with the counts: trainable of all tensors and entries, tied names
    exact_part: float = 0.0  # tr(Q H Q^T) on the deflated basis (0 for plain Hutchinson)
    deflated: int = 0  # the dimension k of that basis


def residual(hvp, Q: torch.Tensor | None, m: int, gen: torch.Generator, N: int, dev) -> np.ndarray:
    """``m`` values g'^T H g', g' = (I - Q^T Q) g for Rademacher g (Q (k, N) orthonormal rows, or None)."""
    G = rademacher(m, N, gen, dev)
    if Q is not None and len(Q):
        for _ in range(2):  # twice: the projection is orthogonal to rounding
            G = G - (G @ Q.T) @ Q
    return (G * hvp(G)).sum(dim=1).cpu().numpy()


def hutch_pp(hvp, m: int, gen, N: int, dev) -> tuple[float, np.ndarray, int]:
    """Hutch++: ``(tr(Q H Q^T), residual values, k)`` with Q = orth(H S), S the first m // 3 probes."""
    s = m // 3
    Q, _ = torch.linalg.qr(hvp(rademacher(s, N, gen, dev)).T)  # (N, s)
    Q = Q.T.contiguous()
    exact = float((Q * hvp(Q)).sum())
    return exact, residual(hvp, Q, m - 2 * s, gen, N, dev), s


def lanczos_deflated(hvp, m: int, gen, N: int, dev) -> tuple[float, np.ndarray, int]:
    """``(sum of the Lanczos alphas, residual values, k)`` for the Krylov basis of round(m * LANCZOS_SHARE) steps."""
    s = min(max(1, int(round(m * LANCZOS_SHARE))), m - 2, N)
    chains = lanczos_block(hvp, rademacher(1, N, gen, dev), s, keep_basis=True, breakdown=BREAKDOWN)
    Q = chains.bases[0]  # fewer than s rows after a breakdown: the HVPs left go to the residual
    return float(np.sum(chains.alphas[0])), residual(hvp, Q, m - chains.hvps, gen, N, dev), len(Q)


def xtrace(hvp, m: int, gen, N: int, dev) -> tuple[float, np.ndarray, int]:
    """XTrace's s = m // 2 exchangeable estimates t_i (they already hold the exact part; returned as 0)."""
    s = m // 2
    W = rademacher(s, N, gen, dev).T  # (N, s)
    Y = hvp(W.T).T
    Q, R = torch.linalg.qr(Y)
    Z = hvp(Q.T).T  # H Q
    tr_q = float((Q * Z).sum())
    S = torch.linalg.inv(R.T)
    S = S / S.norm(dim=0, keepdim=True)  # Q_(i) Q_(i)^T = Q (I - s_i s_i^T) Q^T
    QZ = Q.T @ Z
    t = np.empty(s)
    for i in range(s):
        si = S[:, i]
        defl = lambda v: v - (si @ v) * si  # noqa: E731
        w = W[:, i]
        apw = Y[:, i] - Z @ defl(Q.T @ w)
        papw = apw - Q @ defl(Q.T @ apw)
        t[i] = tr_q - float(si @ QZ @ si) + float(w @ papw)
    return 0.0, t, s


def krylov_residuals(chains: LanczosChains, N: int) -> tuple[float, np.ndarray, torch.Tensor]:
    """The trace parts a block of Lanczos chains (:func:`hessian.lanczos_block` with ``keep_basis=True``, from
    independent Rademacher starts z_i / sqrt(N)) already holds, for no HVP: ``(sum of chain 0's alphas = tr(Q H Q^T),
    residual values z_i^T P H P z_i of chains 1.., Q)`` with Q = chain 0's Krylov basis (k, N) and P = I - Q^T Q.

    Chain i's first step gives H v_i = alpha_i1 v_i + beta_i1 q_i2 (v_i = z_i / sqrt(N), q_i2 its second Lanczos
    vector; the Lanczos relation, to rounding), and Q H Q^T = T_0 (chain 0's tridiagonal; full
    reorthogonalization), so with c = Q v_i, d = Q H v_i: v_i^T P H P v_i = alpha_i1 - 2 c.d + c^T T_0 c, times N
    for z_i. Chains 1.. start independently of chain 0, so their values are unbiased residual probes given Q."""
    Q = chains.bases[0]
    T = torch.as_tensor(chains.tridiagonal(0), dtype=Q.dtype, device=Q.device)
    values = []
    for base, a, b in zip(chains.bases[1:], chains.alphas[1:], chains.betas[1:]):
        v = base[0]
        Hv = a[0] * v + (b[0] * base[1] if len(base) > 1 else 0.0)  # no second vector: v spans an invariant space
        c, d = Q @ v, Q @ Hv
        values.append(N * (float(a[0]) - 2 * float(c @ d) + float(c @ T @ c)))
    return float(np.sum(chains.alphas[0])), np.array(values), Q


def estimate(hvp, N: int, dev, method: str, m: int, gen: torch.Generator, confidence: float = 0.95,
             Q: torch.Tensor | None = None, q_trace: float = 0.0) -> tuple[float, float, float, float, int, int]:
    """One trace estimate of the operator ``hvp`` ((k, N) -> (k, N)) by ``method`` with m HVPs:
    ``(value, stderr, interval half-width, exact part, basis dimension k, residual samples)``. With ``Q``
    (orthonormal rows) and its ``q_trace`` = tr(Q H Q^T): Hutchinson on the complement of Q."""
    if Q is not None:
        exact, samples, k = q_trace, residual(hvp, Q, m, gen, N, dev), len(Q)
    elif method == "hutchinson":
        exact, samples, k = 0.0, residual(hvp, None, m, gen, N, dev), 0
    else:
        exact, samples, k = {"hutch++": hutch_pp, "lanczos-deflated": lanczos_deflated, "xtrace": xtrace}[method](
            hvp, m, gen, N, dev)
    mean, stderr, low, _ = interval(samples, confidence, antithetic=False)
    return exact + mean, stderr, mean - low, exact, k, len(samples)


def hessian_trace(
    model: nn.Module, data, n_probes: int = 30, method: str = "lanczos-deflated", seed: int = 0, loss_fn=None,
    batch_size: int = 1000, bn: str = "eval", params: str = "all", confidence: float = 0.95,
    chunk: int = 8, bn_data=None, objective=None, deflate: EigenResult | None = None,
) -> TraceResult:
    """tr(H), the trace of the full-data loss Hessian, with a Student-t confidence interval.

    tr(H) = tr(Q H Q^T) + tr(P H P): an exact part on an orthonormal basis Q and a Hutchinson estimate
    mean_i g_i'^T H g_i' (g' = (I - Q^T Q) g, g Rademacher) on the rest, with the Student-t interval of the
    residual values conditional on Q. ``method`` picks Q (module :mod:`trace` has each in full):
    ``"lanczos-deflated"`` (default): the Krylov basis of round(m / 2) Lanczos steps, exact part = sum of
    the alphas, m - steps residual probes; ``"hutch++"`` (Meyer et al. 2021): Q = orth(H S) from m // 3
    probes, m // 3 HVPs for tr(Q H Q^T), the rest residual probes; ``"xtrace"`` (Epperly, Tropp & Webber
    2024, without test-vector normalization): mean of m // 2 exchangeable estimates, interval from their
    spread (the paper's error estimate); ``"hutchinson"``: Q empty (tr ~ mean z^T H z over m probes).
    With ``deflate`` (``"hutchinson"`` only): Q = that result's Ritz vectors, exact part = their Ritz values.

    Args:
        model: the trained model; restored bit for bit, also on error.
        data: the data the loss is taken over: a tensor pair, a TensorData, a map-style dataset or an iterable
            of batches.
        n_probes: m, the Hessian-vector products in all (at least 4 for lanczos-deflated, 5 for hutch++, 6 for
            xtrace, 2 for hutchinson).
        method: ``"lanczos-deflated"``, ``"hutch++"``, ``"xtrace"`` or ``"hutchinson"``.
        seed: seeds the ``torch.Generator`` that draws the Rademacher probes (and Lanczos start).
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean; None for cross-entropy on logits.
        batch_size: examples per evaluation batch (memory only).
        bn: the BatchNorm protocol: ``"eval"``, ``"batch"`` or ``"recompute"`` (once, at the model's parameters).
        params: the measured parameters: ``"all"`` trainable, or ``"no-bn"``.
        confidence: the interval's coverage, e.g. 0.95.
        chunk: kept for the signature (speed only, not the result).
        bn_data: the data ``"recompute"`` recomputes the BatchNorm statistics on; None for ``data``.
        objective: how a batch becomes a loss (:mod:`objective`): an Objective, a ready name or a callable
            ``objective(model, batch) -> (loss_sum, weight)``; None for ``(inputs, targets)`` pairs and ``loss_fn``.
        deflate: an EigenResult with eigenvectors from the same model, data and protocol, or None.

    Returns:
        A :class:`TraceResult`: ``value``, ``stderr``, ``ci_low``, ``ci_high`` at ``confidence``, ``hvps``,
        ``exact_part`` and ``deflated`` (the basis), ``interval`` (what the interval is, in words), protocol.

    Cost:
        ``n_probes`` Hessian-vector products over all of ``data`` (one forward pass and gradient graph per
        batch, kept for all products, then a backward pass of grad . v per product); memory: the probes and
        the basis, about m x P float64.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if not isinstance(n_probes, (int, np.integer)) or n_probes < MIN_PROBES[method]:
        raise ValueError(f"n_probes must be an integer >= {MIN_PROBES[method]} for {method}, got {n_probes!r}")
    if deflate is not None:
        if method != "hutchinson":
            raise ValueError(f"deflate= works with method='hutchinson' (the residual estimator), not {method!r}")
        if not isinstance(deflate, EigenResult) or deflate.eigenvectors is None:
            raise TypeError("deflate must be an EigenResult with eigenvectors (return_eigenvectors=True)")
    gen = torch.Generator().manual_seed(seed)
    obj = as_objective(objective, loss_fn)
    with session(model, bn, data, bn_data, batch_size, obj):
        F = FullDataLoss(model, data, None, batch_size, params, objective=obj)
        dev, N = F.x0.device, F.num_params
        if method == "xtrace" and n_probes // 2 > N:
            raise ValueError(f"xtrace needs n_probes // 2 <= the {N} parameters, got n_probes={n_probes}")
        Q = None
        if deflate is not None:
            if deflate.eigenvectors.shape[1] != N or deflate.params_measured != F.params_measured:
                raise ValueError(f"deflate's eigenvectors measure {deflate.params_measured}, this trace "
                                 f"{F.params_measured}: deflate must come from the same model and params")
            Q = torch.as_tensor(np.array(deflate.eigenvectors), dtype=torch.float64, device=dev)
        est = estimate(F.hvp, N, dev, method, n_probes, gen, confidence, Q,
                       0.0 if deflate is None else float(np.sum(deflate.eigenvalues)))
        proto = measured_protocol(model, F, bn, bn_data, batch_size, params)
    value, stderr, half, exact, k, m = est
    hvps = n_probes - (n_probes % 2 if method == "xtrace" else 0)
    if method == "xtrace":
        interval = f"Student-t over the {m} exchangeable XTrace estimates (the paper's error estimate; they share Q)"
    elif k:
        interval = (f"Student-t over the {m} residual probes g'^T H g', g' = (I - Q^T Q) g, conditional on the "
                    f"{k}-dimensional basis Q; tr(Q H Q^T) = {exact:.6g} exact")
    else:
        interval = f"Student-t over the {m} Rademacher probe values z^T H z"
    words = {"hutchinson": "Hutchinson, Rademacher probes", "hutch++": "Hutch++ (Meyer et al. 2021), Rademacher",
             "xtrace": "XTrace (Epperly, Tropp & Webber 2024) without test-vector normalization, Rademacher",
             "lanczos-deflated": f"Hutchinson on the complement of a {k}-step Lanczos Krylov basis, Rademacher"}
    name = words[method] if deflate is None else f"Hutchinson deflated by {k} given Ritz pairs, Rademacher"
    return TraceResult(
        value=value, stderr=stderr, ci_low=value - half, ci_high=value + half, confidence=confidence,
        n_probes=n_probes, hvps=hvps, method=f"{name}; {HVP_METHOD}", interval=interval, seed=seed,
        exact_part=exact, deflated=k, **proto,
    )


def shared_estimate(hvp, N: int, dev, n_vectors: int, steps: int, trace_probes: int, gen: torch.Generator
                    ) -> tuple[LanczosChains, float, np.ndarray, np.ndarray, int]:
    """SLQ's chains and the trace parts they share (:func:`density.density_and_trace`): ``(chains, tr(Q H Q^T),
    the n_vectors - 1 free residual values, the trace_probes drawn ones, k)`` for the operator ``hvp``."""
    chains = lanczos_block(hvp, rademacher(n_vectors, N, gen, dev), steps, keep_basis=True, breakdown=BREAKDOWN)
    exact, free, Q = krylov_residuals(chains, N)
    drawn = residual(hvp, Q, trace_probes, gen, N, dev) if trace_probes else np.empty(0)
    return chains, exact, free, drawn, len(Q)


def shared_trace(exact: float, free: np.ndarray, drawn: np.ndarray, k: int, confidence: float, seed: int,
                 density_hvps: int, proto: dict) -> TraceResult:
    """The :class:`TraceResult` of :func:`density.density_and_trace`: ``exact`` = tr(Q H Q^T) on the density's
    k-dimensional Krylov basis, residual values ``free`` (the density's other start vectors) and ``drawn``."""
    n = len(free) + len(drawn)
    mean, stderr, low, high = interval(np.concatenate([free, drawn]), confidence, antithetic=False)
    return TraceResult(
        value=exact + mean, stderr=stderr, ci_low=exact + low, ci_high=exact + high, confidence=confidence,
        n_probes=len(drawn), hvps=len(drawn), seed=seed, exact_part=exact, deflated=k,
        method=(f"Hutchinson on the complement of the spectral density's first {k}-step Lanczos Krylov basis, "
                f"Rademacher; shares the density's {density_hvps} HVPs (its other {len(free)} start vectors are "
                f"residual probes) and adds {len(drawn)}; {HVP_METHOD}"),
        interval=(f"Student-t over the {n} residual probes g'^T H g', g' = (I - Q^T Q) g ({len(free)} the density's "
                  f"start vectors, {len(drawn)} drawn), conditional on the {k}-dimensional basis Q; tr(Q H Q^T) = "
                  f"{exact:.6g} exact"),
        **proto,
    )
