"""The measures :func:`batchgap.track` takes by name, each a ``landscape/`` call on the measurement set.

Each returns a :class:`Outcome`: the headline ``value`` (what the sinks plot), the result's ``as_dict`` (its
protocol) and the Hessian-vector products it used. The Hessian's top eigenvalues run Lanczos here (on
:class:`landscape.functional.FullDataLoss`, as :func:`landscape.hessian.hessian_eigenvalues` does) so that each
measurement can start from the previous one's eigenvectors: the start vector is their sum plus a seeded
N(0, 1) vector of a tenth of its norm, which keeps every direction in the Krylov space.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..landscape.evaluate import bn_protocol, evaluate
from ..landscape.functional import FullDataLoss, measured_protocol, objective_fields, session
from ..landscape.hessian import HVP_METHOD, EigenResult, lanczos_top
from ..landscape.trace import MIN_PROBES, hessian_trace
from ..landscape.objective import as_objective
from ..landscape.noise import exact_gradient_noise_scale
from ..landscape.protocol import frozen_array
from ..landscape.sharpness import eps_sharpness

WARM_NOISE = 0.1  # the seeded N(0, 1) part of a warm start vector, relative to the previous eigenvectors' sum


@dataclass
class Outcome:
    """One measure's part of a record."""

    value: float | None
    result: dict
    hvps: int = 0


@dataclass
class Context:
    """What every measure reads: the model, the measurement set, how a batch becomes a loss, the protocol."""

    model: torch.nn.Module
    data: object
    objective: object  # the user's objective= (None for pairs)
    loss_fn: object  # the user's loss_fn=
    bn: str
    batch_size: int
    params: str
    seed: int
    warm: dict  # measure name -> the previous measurement's eigenvectors (k, N)


def _loss(ctx: Context, opts: dict, hvp_cap: int | None) -> Outcome:
    m = evaluate(ctx.model, ctx.data, ctx.loss_fn, ctx.batch_size, ctx.bn, objective=ctx.objective)
    obj = as_objective(ctx.objective, ctx.loss_fn)
    result = dict(m.as_dict(), bn=ctx.bn, bn_description=bn_protocol(ctx.model, ctx.bn, ctx.batch_size, None),
                  batch_size=ctx.batch_size, method="batchgap.evaluate: one forward pass, unit-weighted mean",
                  **objective_fields(obj))
    return Outcome(m.loss, result)


def _eigen(ctx: Context, opts: dict, hvp_cap: int | None, name: str, k: int) -> Outcome:
    tol, max_hvp = float(opts.get("tol", 1e-3)), int(opts.get("max_hvp", 100))
    steps_cap = max(max_hvp, k) if hvp_cap is None else min(max(max_hvp, k), hvp_cap - k)
    obj = as_objective(ctx.objective, ctx.loss_fn)
    with session(ctx.model, ctx.bn, ctx.data, None, ctx.batch_size, obj):
        F = FullDataLoss(ctx.model, ctx.data, None, ctx.batch_size, ctx.params, objective=obj)
        if k > F.num_params:
            raise ValueError(f"{name}: k={k} exceeds the number of parameters {F.num_params}")
        count = [0]

        def matvec(v):
            count[0] += 1
            return F.hvp(v)

        noise = torch.randn(F.num_params, generator=torch.Generator().manual_seed(ctx.seed), dtype=torch.float64)
        prev = ctx.warm.get(name)
        if prev is not None and prev.shape == (k, F.num_params):
            start = prev.sum(0)
            v0 = start + WARM_NOISE * start.norm() * noise.to(start.device) / noise.norm()
            how = (f"this one from the previous measurement's {k} eigenvector(s) summed plus {WARM_NOISE} x its norm "
                   f"of a seeded N(0,1) direction (seed {ctx.seed})")
        else:
            v0 = noise.to(F.x0.device)
            how = f"this one (the first) from a seeded N(0,1) vector (seed {ctx.seed})"
        values, vectors, steps, converged = lanczos_top(matvec, v0.to(F.x0.device), k, steps_cap, tol)
        Hv = F.hvp(vectors)
        count[0] += len(vectors)
        residuals = (Hv - torch.as_tensor(values.copy(), device=Hv.device)[:, None] * vectors).norm(dim=1)
        proto = measured_protocol(ctx.model, F, ctx.bn, None, ctx.batch_size, ctx.params)
    ctx.warm[name] = vectors.detach()
    res = EigenResult(
        eigenvalues=frozen_array(values), residuals=frozen_array(residuals.cpu().numpy()), converged=converged, k=k,
        tol=tol, lanczos_steps=steps, hvps=count[0], seed=ctx.seed,
        method=f"Lanczos, full reorthogonalization, warm-started from the previous measurement's eigenvectors "
               f"({how}); {HVP_METHOD}", **proto)
    d = res.as_dict()
    d["start"] = "warm" if prev is not None and prev.shape == (k, F.num_params) else "cold"
    d["max_hvp"] = steps_cap
    return Outcome(float(values[0]), d, count[0])


def _lambda_max(ctx, opts, hvp_cap):
    return _eigen(ctx, opts, hvp_cap, "lambda_max", 1)


def _hessian_top(ctx, opts, hvp_cap):
    return _eigen(ctx, opts, hvp_cap, "hessian_top", int(opts.get("k", 3)))


def _trace(ctx: Context, opts: dict, hvp_cap: int | None) -> Outcome:
    opts = dict(opts)
    asked = int(opts.pop("n_probes", 30))
    probes = asked if hvp_cap is None else min(asked, hvp_cap)
    r = hessian_trace(ctx.model, ctx.data, n_probes=probes, seed=ctx.seed, loss_fn=ctx.loss_fn,
                      batch_size=ctx.batch_size, bn=ctx.bn, params=ctx.params, objective=ctx.objective, **opts)
    d = r.as_dict()
    d["n_probes_asked"] = asked
    return Outcome(r.value, d, r.hvps)


def _eps_sharpness(ctx: Context, opts: dict, hvp_cap: int | None) -> Outcome:
    r = eps_sharpness(ctx.model, ctx.data, seed=ctx.seed, loss_fn=ctx.loss_fn, batch_size=ctx.batch_size, bn=ctx.bn,
                      params=ctx.params, objective=ctx.objective, **opts)
    return Outcome(r.value, r.as_dict())


def _noise_scale(ctx: Context, opts: dict, hvp_cap: int | None) -> Outcome:
    r = exact_gradient_noise_scale(ctx.model, ctx.data, loss_fn=ctx.loss_fn, bn=ctx.bn, params=ctx.params,
                                   batch_size=ctx.batch_size, seed=ctx.seed, objective=ctx.objective, **opts)
    return Outcome(r.b_simple, r.as_dict())


# name -> (function, the options it takes, what its value is)
MEASURES = {
    "loss": (_loss, (), "the unit-weighted mean loss (batchgap.evaluate)"),
    "lambda_max": (_lambda_max, ("tol", "max_hvp"), "the top Hessian eigenvalue (Lanczos, warm-started)"),
    "hessian_top": (_hessian_top, ("k", "tol", "max_hvp"), "the top k Hessian eigenvalues; value = the largest"),
    "trace": (_trace, ("n_probes", "method", "confidence", "chunk"), "tr(H), with its interval (hessian_trace)"),
    "eps_sharpness": (_eps_sharpness, ("eps", "subspace_dim", "max_iter", "max_fun", "subspace_columns"),
                      "Keskar et al.'s eps-sharpness in percent (batchgap.eps_sharpness)"),
    "noise_scale": (_noise_scale, ("chunk", "ghost_batch"),
                    "B_simple from exact per-unit gradients (batchgap.exact_gradient_noise_scale)"),
}


def fewest_hvps(name: str, opts: dict) -> int:
    """The fewest HVPs measure ``name`` can run on with ``opts`` (0 for a measure that uses none)."""
    if name in ("lambda_max", "hessian_top"):
        k = 1 if name == "lambda_max" else int(opts.get("k", 3))
        return 2 * k  # k Lanczos steps and k residual products
    if name == "trace":
        return MIN_PROBES.get(opts.get("method", "lanczos-deflated"), 2)
    return 0


def check_options(options: dict | None, names: list[str]) -> dict:
    """``options`` ({measure: {option: value}}) checked against the measures asked and the options each takes."""
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict {{measure: {{option: value}}}}, not {type(options).__name__}")
    out = {}
    for name, opts in options.items():
        if name not in names:
            raise ValueError(f"options for {name!r}, which is not among measures={names}")
        if not isinstance(opts, dict):
            raise TypeError(f"options[{name!r}] must be a dict of option: value, not {type(opts).__name__}")
        allowed = MEASURES[name][1]
        for key in opts:
            if key not in allowed:
                raise ValueError(f"options[{name!r}]: unknown option {key!r}; allowed: {', '.join(allowed) or 'none'}")
        out[name] = dict(opts)
    return out
