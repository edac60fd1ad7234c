"""What a study measures on trained models, each number with its protocol.

Per run: full-set train and test metrics, the distance from the start point x0, and the geometry of
the solution (sharpness, Hessian, filter-normalized curves, a 2-D surface).
Per pair of runs of one seed (small batch, large batch): the parametric plot (paper Figure 3).
Knows nothing of studies or files: it takes models and data, returns plain dicts for results.json.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from .config import MeasureConfig
from .data.base import Dataset
from .landscape import (
    adaptive_sharpness, average_sharpness, density_and_trace, eps_sharpness, evaluate, filter_normalized_direction,
    gradient_noise_scale, hessian_density, hessian_eigenvalues, hessian_trace, interpolate, loss_curve, loss_surface,
    norm_measures, pac_bayes_flatness, worst_case_flatness,
)
from .landscape.evaluate import describe_bn
from .landscape.noise import exact_gradient_noise_scale, per_example_gradients_exist
from .landscape.objective import PairObjective
from .landscape.params import distance, named_parameters


def data_protocol(dataset: Dataset) -> dict:
    """Which examples the measures use: the sets as the study holds them (subsets recorded in info)."""
    return {
        "dataset": dataset.name,
        "train_examples": len(dataset.train),
        "test_examples": len(dataset.test),
        "subset": dataset.info.get("subset", "none: full sets"),
    }


def endpoint_metrics(model: nn.Module, dataset: Dataset, mcfg: MeasureConfig, objective=None) -> dict:
    """Loss and accuracy on the full train and test sets, batch-weighted, BN as ``mcfg.bn``."""
    out = {}
    for split in ("train", "test"):
        m = evaluate(model, getattr(dataset, split), batch_size=mcfg.eval_batch_size, bn=mcfg.bn, objective=objective)
        out[split] = {"loss": m.loss, "accuracy": m.accuracy, "n": m.n}
    out["protocol"] = {
        "bn": describe_bn(model, mcfg.bn, mcfg.eval_batch_size),
        "eval_batch_size": mcfg.eval_batch_size,
        "dropout": "off",
        "data": "full train and test sets",
        **objective_protocol(objective),
    }
    return out


def objective_protocol(objective) -> dict:
    """How the batches became a loss, for a protocol: nothing for the default objective (results as before)."""
    return {} if objective is None else {"loss_fn": objective.name, "objective": objective.kind, "unit": objective.unit}


def eval_batches(dataset: Dataset, mcfg: MeasureConfig) -> tuple[int, int]:
    """``(examples, batches)`` of the smallest full-data pass the measures make (train, test, the geometry subset)
    in batches of ``eval_batch_size``: data-parallel measurement needs a batch per process."""
    smallest = min(len(dataset.train), len(dataset.test), mcfg.geometry_examples or len(dataset.train))
    return smallest, math.ceil(smallest / mcfg.eval_batch_size)


def measure_trained(model: nn.Module, x0: dict, dataset: Dataset, mcfg: MeasureConfig, seed: int, surface: bool,
                    iterates: dict | None, build, geometry_of=None, objective=None) -> dict:
    """Everything a study measures on one trained model, as its result's fields: ``train``/``test`` metrics,
    ``eval_protocol``, ``distance_from_init``, ``geometry``, ``trajectory`` (over ``iterates``, models made by
    ``build(state_dict)``; None: not measured) and ``measure_time_s``. ``objective``: the study's (None: the
    default pairs); ``geometry_of``: the caller's :func:`geometry` (a study's module attribute, which its tests
    wrap), default this module's."""
    t0 = time.perf_counter()
    metrics = endpoint_metrics(model, dataset, mcfg, objective)
    out = {"train": metrics["train"], "test": metrics["test"], "eval_protocol": metrics["protocol"],
           "distance_from_init": distance_from_init(model, x0),
           "geometry": (geometry_of or geometry)(model, dataset, mcfg, seed, surface=surface, objective=objective)}
    if iterates is not None:
        out["trajectory"] = trajectory(build, iterates, dataset, mcfg, seed, objective)
    out["measure_time_s"] = time.perf_counter() - t0
    return out


def distance_from_init(model: nn.Module, x0_state: dict) -> dict:
    """||x* - x0|| over all trainable parameters (BN affine included), and ||x0|| for scale."""
    x0_norm = float(torch.sqrt(sum((x0_state[n].double() ** 2).sum() for n, _ in model.named_parameters())))
    return {"value": distance(model, x0_state), "x0_norm": x0_norm, "parameters": "all trainable (BN affine included)"}


def parametric_plot(
    model_sb: nn.Module, model_lb: nn.Module, dataset: Dataset, mcfg: MeasureConfig,
    names: tuple[str, str] = ("SB", "LB"), objective=None,
) -> dict:
    """f(alpha x_LB + (1 - alpha) x_SB) on the full train and test sets (paper Figure 3).

    BN ``auto``: for running-statistics models the statistics at each alpha are recomputed on the
    training set and shared by the train and test curves (interpolated running statistics are not the
    statistics of any network, and extrapolated variances can turn negative); otherwise eval mode.
    """
    lo, hi = mcfg.interpolation_range
    # the grid always holds alpha = 0 and 1 (the two solutions themselves) when they are in range
    alphas = np.union1d(np.linspace(lo, hi, mcfg.interpolation_points), [a for a in (0.0, 1.0) if lo <= a <= hi])
    r = interpolate(
        model_sb, model_lb, {"train": dataset.train, "test": dataset.test}, alphas,
        path=mcfg.interpolation_path, bn=None if mcfg.interpolation_bn == "auto" else mcfg.interpolation_bn,
        batch_size=mcfg.eval_batch_size, objective=objective,
    )
    out = {"alphas": alphas.tolist()}
    for split in ("train", "test"):
        out[split] = {"loss": r.curves[split].loss.tolist(), "accuracy": r.curves[split].accuracy.tolist()}
    out["protocol"] = {
        "path": r.path,
        "formula": (f"alpha * x_{names[1]} + (1 - alpha) * x_{names[0]}" if r.path == "linear"
                    else f"sin(alpha pi/2) * x_{names[1]} + cos(alpha pi/2) * x_{names[0]}"),
        "points": len(alphas),
        "bn": ("statistics recomputed at each alpha on the training set" if r.bn == "recompute" else r.bn_description),
        "buffers": r.buffers,
        "eval_batch_size": r.batch_size,
        "data": "full train and test sets",
        "parameters": r.params_interpolated,
        **objective_protocol(objective),
    }
    return out


def geometry_data(dataset: Dataset, mcfg: MeasureConfig, seed: int):
    """The training set, or the seeded subset of ``mcfg.geometry_examples`` examples, and its description."""
    train = dataset.train
    k = mcfg.geometry_examples
    if not k or k >= len(train):
        return train, f"full training set ({len(train)} examples)"
    gen = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randperm(len(train), generator=gen)[:k].sort().values
    return train.subset(idx), f"training subset of {k} examples (seed {10_000 + seed})"


def geometry(model: nn.Module, dataset: Dataset, mcfg: MeasureConfig, seed: int, surface: bool = False,
             objective=None) -> dict:
    """Sharpness (Keskar eps, full space and random subspace; adaptive), Hessian top eigenvalues and
    trace, filter-normalized loss curves and, with ``surface``, a 2-D loss surface; each with its protocol.

    All on the training loss (the paper's f), BN as ``mcfg.bn``; randomness from ``seed``; each batch through
    ``objective`` (None: cross-entropy on ``(x, y)`` pairs).
    """
    data, data_desc = geometry_data(dataset, mcfg, seed)
    common = {"batch_size": mcfg.eval_batch_size, "bn": mcfg.bn, "objective": objective}
    out: dict = {"data": data_desc}
    sharp = []
    for eps in mcfg.sharpness_eps:
        for dim in (None, mcfg.sharpness_subspace_dim or None) if mcfg.sharpness_subspace_dim else (None,):
            r = eps_sharpness(model, data, eps=eps, subspace_dim=dim, max_iter=mcfg.sharpness_max_iter, seed=seed,
                              subspace_columns=mcfg.sharpness_subspace_columns, **common)
            sharp.append(r.as_dict())
    out["sharpness"] = sharp
    if mcfg.adaptive_rho:
        out["adaptive_sharpness"] = adaptive_sharpness(  # m-sharpness points drawn from the run's seed
            model, data, rho=mcfg.adaptive_rho, max_iter=mcfg.sharpness_max_iter, m=mcfg.adaptive_m or None,
            n_points=mcfg.adaptive_points, seed=seed, **common).as_dict()
    if mcfg.hessian_top_k:
        out["hessian_eigenvalues"] = hessian_eigenvalues(
            model, data, k=mcfg.hessian_top_k, max_hvp=mcfg.hessian_max_hvp, seed=seed, **common).as_dict()
    density = None
    if mcfg.hessian_trace_probes and mcfg.density_vectors >= 2:  # the trace reuses the spectral density's HVPs
        dens, tr = density_and_trace(model, data, n_vectors=mcfg.density_vectors, steps=mcfg.density_steps,
                                     trace_probes=mcfg.hessian_trace_probes, seed=seed, **common)
        out["hessian_trace"], density = tr.as_dict(), dens.as_dict()
    elif mcfg.hessian_trace_probes:
        probes = mcfg.hessian_trace_probes  # Lanczos-deflated from 4 HVPs (its fewest); below, plain Hutchinson
        out["hessian_trace"] = hessian_trace(model, data, n_probes=probes, seed=seed, **common,
                                             method="lanczos-deflated" if probes >= 4 else "hutchinson").as_dict()
    if mcfg.noise_scale_batches:
        out["noise_scale"] = noise_scale(model, data, mcfg, seed, objective)
    if mcfg.hessian_top_k and sharp:
        out["second_order"] = second_order(model, sharp, out["hessian_eigenvalues"])
    out.update(generalization_measures(model, data, mcfg, seed, common, density))
    if mcfg.curve_directions:
        alphas = np.linspace(-mcfg.curve_range, mcfg.curve_range, mcfg.curve_points | 1)  # odd: holds alpha = 0
        curves = []
        for k in range(mcfg.curve_directions):
            d = filter_normalized_direction(model, seed=seed * 1000 + k)
            curves.append(loss_curve(model, d, data, alphas, **common))
        out["curves"] = {
            "alphas": alphas.tolist(),
            "loss": [c.loss.tolist() for c in curves],
            "accuracy": [c.accuracy.tolist() for c in curves],
            "protocol": {"direction": curves[0].direction, "directions": len(curves),
                         "direction_seeds": [seed * 1000 + k for k in range(len(curves))],
                         "bn": curves[0].bn_description, "data": data_desc},
        }
    if surface and mcfg.surface_points:
        grid = np.linspace(-mcfg.curve_range, mcfg.curve_range, mcfg.surface_points | 1)
        d1 = filter_normalized_direction(model, seed=seed * 1000 + 500)
        d2 = filter_normalized_direction(model, seed=seed * 1000 + 501)
        s = loss_surface(model, d1, d2, data, grid, grid, **common)
        out["surface"] = {"alphas": grid.tolist(), "betas": grid.tolist(), "loss": s.loss.tolist(),
                          "protocol": {"direction": s.directions[0], "bn": s.bn_description, "data": data_desc,
                                       "direction_seeds": [seed * 1000 + 500, seed * 1000 + 501]}}
    return out


# geometry keys: the loss target keeps the keys results.json has always had; the error target (Jiang et al.'s)
# adds _error
PAC_BAYES_KEYS = {"loss": "%s", "error": "%s_error"}
FLATNESS_RTOL = 0.02  # PAC-Bayes sigma to 2%: its Monte Carlo error at 8 draws is larger (a few % of delta in g)


def generalization_measures(model: nn.Module, data, mcfg: MeasureConfig, seed: int, common: dict,
                            density: dict | None = None) -> dict:
    """The generalization measures the config asks for: norms and margins, average sharpness (plain and
    magnitude-aware), PAC-Bayes flatness (both variants, each for the loss and/or error target as
    ``mcfg.pac_bayes_target`` says: keys ``pac_bayes``, ``pac_bayes_mag`` for the loss, ``pac_bayes_error``,
    ``pac_bayes_mag_error`` for the error), worst-case flatness (both variants), the Hessian's spectral density
    (``density``: already measured with the trace, :func:`geometry`).

    PAC-Bayes starts its search where the average sharpness at the same draws predicts the crossing
    (the rise is quadratic in sigma near a minimum); the start changes the search's path, and the result
    only within its tolerance (2%) where the estimate is monotone in sigma (where it is not, another start
    can find another crossing; the result's ``monotone`` says which)."""
    out: dict = {}
    pairs = mcfg.flatness_samples >= 4 and mcfg.flatness_samples % 2 == 0  # antithetic draws need two pairs
    if mcfg.norms:
        out["norms"] = norm_measures(model, data, **common).as_dict()
    start = {}
    for key, sigma, mag in (("average_sharpness", mcfg.average_sigma, False),
                            ("average_sharpness_mag", mcfg.average_sigma_relative, True)):
        if sigma:
            a = average_sharpness(model, data, sigma=sigma, magnitude_aware=mag, n_samples=mcfg.flatness_samples,
                                  seed=seed, antithetic=pairs, **common)
            out[key] = a.as_dict()
            if math.isfinite(a.value) and a.value > 0 and mcfg.pac_bayes_delta:
                start[mag] = sigma * (mcfg.pac_bayes_delta / a.value) ** 0.5
    if mcfg.pac_bayes_delta:
        targets = ("loss", "error") if mcfg.pac_bayes_target == "both" else (mcfg.pac_bayes_target,)
        for target in targets:
            for key, mag in (("pac_bayes", False), ("pac_bayes_mag", True)):
                # the loss-rise prediction of the average sharpness starts the loss target's search only
                out[PAC_BAYES_KEYS[target] % key] = pac_bayes_flatness(
                    model, data, delta=mcfg.pac_bayes_delta, magnitude_aware=mag, n_samples=mcfg.flatness_samples,
                    seed=seed, rtol=FLATNESS_RTOL, sigma_start=start.get(mag) if target == "loss" else None,
                    target=target, antithetic=pairs, **common).as_dict()
    if mcfg.worst_case_delta:
        for key, mag in (("worst_case", False), ("worst_case_mag", True)):
            out[key] = worst_case_flatness(model, data, delta=mcfg.worst_case_delta, magnitude_aware=mag,
                                           max_iter=mcfg.worst_case_max_iter, **common).as_dict()
    if mcfg.density_vectors and density is None:
        density = hessian_density(model, data, n_vectors=mcfg.density_vectors, steps=mcfg.density_steps, seed=seed,
                                  **common).as_dict()
    if density is not None:
        out["density"] = density
    return out


def second_order(model: nn.Module, sharp: list[dict], eig: dict) -> list[dict]:
    """Does the eps-box reach beyond the quadratic regime? At a minimum the second-order model of the loss
    rises by at most lambda_max |y|^2 / 2 over the box, |y|^2 = eps^2 sum_i (|x_i| + 1)^2; as phi that is
    100 eps^2 sum_i (|x_i| + 1)^2 lambda_max / 2 / (1 + f(x)). A measured phi above it means the loss rises
    faster than its quadratic model within the box (higher-order terms or the gradient): "beyond"."""
    box = float(sum(((p.detach().double().abs() + 1) ** 2).sum() for _, p in named_parameters(model, "all")))
    lam = eig["eigenvalues"][0]
    rows = []
    for e in sharp:
        if e.get("subspace_dim") is None:
            est = 100 * e["eps"] ** 2 * box * max(lam, 0.0) / 2 / (1 + e["f_x"])
            rows.append({"eps": e["eps"], "estimate": est, "measured": e["value"], "lambda_max": lam,
                         "beyond_quadratic": e["value"] > est,
                         "formula": "100 eps^2 sum_i (|x_i| + 1)^2 lambda_max / 2 / (1 + f(x)), an upper bound of the "
                                    "quadratic model's rise over the box at a minimum"})
    return rows


NOISE_SMALL_BATCH = 32


def noise_scale(model: nn.Module, data, mcfg: MeasureConfig, seed: int, objective=None) -> dict:
    """The gradient noise scale B_simple (McCandlish et al. 2018), exact where per-example gradients exist.

    Where every measured parameter is a Linear's or a running-statistics BatchNorm's (no BN, or ``mcfg.bn``
    "eval" on a tracking model, or "recompute"): exact, from every example's gradient norm in closed form, one
    forward and backward pass (:func:`exact_gradient_noise_scale`; ``seed`` unused). Elsewhere sampled:
    ``mcfg.noise_scale_batches`` batches of 32 against the full gradient (enumerating every example with vmap
    costs more than the 200 batches on a conv net), under batch statistics the estimator's examples ghost
    batches of that one size (32, or half the data when smaller), each normalized by itself.
    ``b_simple`` None (with ``reason``) when not estimated. An objective other than a pair objective: exact, from
    its per-unit losses (each unit's gradient; a token of a language model is a unit), one row (sequence) per
    batch: a batch's per-unit gradients cost (its units) backward passes through its whole graph, so rows one at a
    time cost the least (the result does not depend on it: no BatchNorm couples the rows under these objectives).
    """
    if objective is not None and not isinstance(objective, PairObjective):
        return exact_gradient_noise_scale(model, data, batch_size=1, bn=mcfg.bn, objective=objective).as_dict()
    if per_example_gradients_exist(model, mcfg.bn) == "closed form":
        return exact_gradient_noise_scale(model, data, batch_size=mcfg.eval_batch_size, bn=mcfg.bn).as_dict()
    return gradient_noise_scale(model, data, small=min(NOISE_SMALL_BATCH, len(data) // 2), big=None,
                                n_batches=mcfg.noise_scale_batches, seed=seed, batch_size=mcfg.eval_batch_size,
                                bn=mcfg.bn, objective=objective).as_dict()


def trajectory(build, iterates: dict, dataset: Dataset, mcfg: MeasureConfig, seed: int, objective=None) -> list[dict]:
    """Training loss and full-space eps-sharpness of the iterates kept along training (paper Figure 6).

    ``build(state_dict)`` gives the model at an iterate; ``iterates`` maps epoch -> state dict.
    """
    data, data_desc = geometry_data(dataset, mcfg, seed)
    rows = []
    for epoch, state in sorted(iterates.items()):
        model = build(state)
        m = evaluate(model, data, batch_size=mcfg.eval_batch_size, bn=mcfg.bn, objective=objective)
        sharp = {f"{eps:g}": eps_sharpness(model, data, eps=eps, max_iter=mcfg.sharpness_max_iter, seed=seed,
                                           batch_size=mcfg.eval_batch_size, bn=mcfg.bn, objective=objective).value
                 for eps in mcfg.sharpness_eps}
        row = {"epoch": epoch, "train_loss": m.loss, "train_accuracy": m.accuracy, "sharpness": sharp,
               "data": data_desc, "space": "full"}
        if mcfg.noise_scale_batches:
            ns = noise_scale(model, data, mcfg, seed, objective)
            row["noise_scale"] = ns["b_simple"]  # None when not estimated; then the reason beside it
            if ns["b_simple"] is None:
                row["noise_scale_reason"] = ns["reason"]
        rows.append(row)
    return rows
