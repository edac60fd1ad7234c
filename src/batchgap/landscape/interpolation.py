"""Loss and accuracy along a path between two models (Keskar et al. 2017, Figure 3 and appendix).

Paths, with ``a = model_a`` and ``b = model_b`` (the paper: a = SB minimizer, b = LB minimizer):

* ``"linear"``:      theta(alpha) = alpha * b + (1 - alpha) * a          (alpha = 0 is a, alpha = 1 is b)
* ``"curvilinear"``: theta(alpha) = sin(alpha pi / 2) * b + cos(alpha pi / 2) * a

The curvilinear coefficients are exact (0, +-1) at integer alpha, so both endpoints are the models
themselves bit for bit.

BatchNorm. An interpolated point was never trained, so it has no running statistics of its own;
interpolating them linearly is a guess, and extrapolated running variances can turn negative.
``bn=None`` therefore picks, and records:

* ``"recompute"`` when the model tracks running statistics: at every alpha the running statistics
  are recomputed exactly (each BN layer's mean and unbiased variance over all of ``bn_data``, layer by
  layer: :func:`evaluate.recompute_bn_statistics`) on ``bn_data`` (default: ``data["train"]`` when
  ``data`` is a mapping with a ``"train"`` entry, else the evaluated data itself), then the model is
  evaluated in eval mode;
* ``"eval"`` otherwise (no BN, or ``track_running_stats=False``: batch statistics, Keskar's mode).

With an explicit ``bn="eval"`` the float buffers (running mean/var) are interpolated with the same
coefficients as the parameters, integer buffers (``num_batches_tracked``) are taken from ``a``; at
alpha = 0 and 1 the result is then exactly ``evaluate(model_a)`` / ``evaluate(model_b)``.
``bn="batch"`` uses each evaluation batch's statistics.

Each point is set fresh from the two endpoints (no accumulated drift) and evaluated by
:func:`evaluate.evaluate`, so every number equals what ``evaluate`` gives for that parameter vector.
``data`` may be one data set or a mapping ``{name: data}`` (e.g. train and test): BN statistics are
then recomputed once per alpha and shared by all sets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import nn

from . import ranks
from .evaluate import BN_MODES, describe_bn, evaluate, model_bn_semantics, recompute_bn_statistics
from .objective import as_objective
from .params import preserved, tied_parameters
from .protocol import as_grid, data_size_name, frozen_array, jsonable

PATHS = ("linear", "curvilinear")


@dataclass(frozen=True)
class PathCurve:
    """Loss and accuracy at each alpha on one data set (arrays shaped ``(len(alphas),)``)."""

    loss: np.ndarray
    accuracy: np.ndarray
    n: int


@dataclass(frozen=True)
class InterpolationResult:
    """What :func:`interpolate` returns: ``curves`` per data set along ``alphas``, the path and the protocol."""

    alphas: np.ndarray
    path: str
    formula: str
    curves: dict  # name -> PathCurve
    bn: str
    bn_description: str
    bn_data: str
    buffers: str
    batch_size: int
    loss_fn: str
    params_interpolated: str  # in words: every parameter tensor (frozen included), each once, tied names
    objective: str  # the batch form and where the loss comes from (objective.Objective.kind)
    unit: str  # what each curve's n counts: examples, or tokens for a language model
    world_size: int = 1  # processes that shared the data (ranks.py)
    backend: str | None = None

    @property
    def loss(self) -> np.ndarray:
        return self._only().loss

    @property
    def accuracy(self) -> np.ndarray:
        return self._only().accuracy

    def _only(self) -> PathCurve:
        if len(self.curves) != 1:
            raise AttributeError(f"several data sets ({', '.join(self.curves)}): use .curves[name]")
        return next(iter(self.curves.values()))

    def as_dict(self) -> dict:
        return jsonable(self)


def path_coefficients(alpha: float, path: str) -> tuple[float, float]:
    """``(c_a, c_b)`` with theta(alpha) = c_a * a + c_b * b; exact at integer alpha for both paths."""
    if path == "linear":
        return 1.0 - alpha, alpha
    if path == "curvilinear":
        if float(alpha).is_integer():
            sin = (0.0, 1.0, 0.0, -1.0)[int(alpha) % 4]
            cos = (1.0, 0.0, -1.0, 0.0)[int(alpha) % 4]
            return cos, sin
        return math.cos(alpha * math.pi / 2), math.sin(alpha * math.pi / 2)
    raise ValueError(f"path must be one of {PATHS}, not {path!r}")


def _check_same_architecture(a: nn.Module, b: nn.Module) -> None:
    sa = {n: t.shape for n, t in list(a.named_parameters()) + list(a.named_buffers())}
    sb = {n: t.shape for n, t in list(b.named_parameters()) + list(b.named_buffers())}
    if sa != sb:
        diff = sorted(set(sa.items()) ^ set(sb.items()))[:3]
        raise ValueError(f"model_a and model_b differ in parameters/buffers, e.g. {diff}")


@torch.no_grad()
def _combine(model: nn.Module, ta: dict, tb: dict, ca: float, cb: float, buffers: bool) -> None:
    """Write c_a * a + c_b * b into the parameters (and float buffers when ``buffers``)."""
    for n, p in model.named_parameters():
        p.copy_(ta[n] * ca + tb[n] * cb)
    if buffers:
        for n, t in model.named_buffers():
            t.copy_(ta[n] * ca + tb[n] * cb if t.is_floating_point() else ta[n])


def _resolve_bn(model: nn.Module, bn: str | None) -> str:
    if bn is None:
        return "recompute" if model_bn_semantics(model) in ("running", "mixed") else "eval"
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES} or None, not {bn!r}")
    return bn


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    data,
    alphas=None,
    path: str = "linear",
    bn: str | None = None,
    bn_data=None,
    loss_fn=None,
    batch_size: int = 1000,
    objective=None,
) -> InterpolationResult:
    """Loss and accuracy of theta(alpha) between ``model_a`` (alpha=0) and ``model_b`` (alpha=1).

        linear:       theta(alpha) = alpha b + (1 - alpha) a
        curvilinear:  theta(alpha) = sin(alpha pi / 2) b + cos(alpha pi / 2) a

    Keskar et al.'s Figure 3 (a = the SB minimizer, b = the LB minimizer). Each point is set fresh from the
    endpoints and evaluated by :func:`evaluate`; both models come back bit for bit as they were. See the
    module docstring for the BN choice.

    Args:
        model_a: the model at alpha = 0 (it is the one moved along the path, then restored).
        model_b: the model at alpha = 1, of the same architecture.
        data: one data set (tensor pair, TensorData, map-style dataset, iterable of batches) or a mapping
            ``{name: data}`` (e.g. train and test), evaluated at every alpha.
        alphas: the grid; None for 25 points in [-1, 2] (the official code's grid).
        path: ``"linear"`` or ``"curvilinear"``.
        bn: None to pick (``"recompute"`` for models that track running statistics, else ``"eval"``), or
            ``"eval"`` (buffers interpolated too), ``"batch"`` or ``"recompute"`` (at every alpha).
        bn_data: the data ``"recompute"`` recomputes the statistics on; None for ``data["train"]`` when
            ``data`` is a mapping with that key, else the evaluated data.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean; None for cross-entropy on logits.
        batch_size: examples per evaluation batch (memory only).
        objective: how a batch becomes a loss (:mod:`objective`): an Objective, a ready name or a callable
            ``objective(model, batch) -> (loss_sum, weight)``; None for ``(inputs, targets)`` pairs and ``loss_fn``.

    Returns:
        An :class:`InterpolationResult`: ``alphas``, ``curves`` (``{name: PathCurve}`` with loss and accuracy
        per alpha; ``.loss`` and ``.accuracy`` when there is one data set), the path's formula and the
        protocol (BN mode, buffers, parameters).

    Cost:
        One forward pass over each data set per alpha, plus, for ``"recompute"``, about (L + 1) / 2 forward
        passes over ``bn_data`` per alpha (L BatchNorm layers); no backward pass.
    """
    alphas = as_grid(np.linspace(-1.0, 2.0, 25) if alphas is None else alphas, "alphas")
    path_coefficients(0.0, path)  # validates path
    _check_same_architecture(model_a, model_b)
    sets = dict(data) if isinstance(data, Mapping) else {"data": data}
    if not sets:
        raise ValueError("data mapping is empty")
    bn = _resolve_bn(model_a, bn)
    obj = as_objective(objective, loss_fn)
    if bn == "recompute" and bn_data is None:
        if "train" in sets:
            bn_data, bn_data_desc = sets["train"], "train (the data passed as data['train'])"
        elif len(sets) == 1:
            bn_data, bn_data_desc = next(iter(sets.values())), "the evaluated data"
        else:
            raise ValueError("bn='recompute' with several data sets and no 'train' entry: pass bn_data")
    elif bn == "recompute":
        bn_data_desc = f"caller's bn_data ({data_size_name(bn_data)})"
    else:
        bn_data_desc = "not used"

    ta = {n: t.detach().clone() for n, t in list(model_a.named_parameters()) + list(model_a.named_buffers())}
    tb = {n: t.detach().clone() for n, t in list(model_b.named_parameters()) + list(model_b.named_buffers())}
    losses = {name: [] for name in sets}
    accs = {name: [] for name in sets}
    ns: dict[str, int] = {}
    with preserved(model_a):
        for alpha in alphas:
            ca, cb = path_coefficients(float(alpha), path)
            _combine(model_a, ta, tb, ca, cb, buffers=(bn == "eval"))
            if bn == "recompute":
                recompute_bn_statistics(model_a, bn_data, batch_size, obj)
            for name, d in sets.items():
                m = evaluate(model_a, d, None, batch_size, bn="eval" if bn == "recompute" else bn, objective=obj)
                losses[name].append(m.loss)
                accs[name].append(m.accuracy)
                ns[name] = m.n
        bn_description = describe_bn(model_a, bn, batch_size)

    curves = {
        name: PathCurve(frozen_array(losses[name]), frozen_array(accs[name]), ns[name]) for name in sets
    }
    formula = (
        "theta(alpha) = alpha * b + (1 - alpha) * a"
        if path == "linear"
        else "theta(alpha) = sin(alpha pi/2) * b + cos(alpha pi/2) * a"
    )
    buffers = {
        "eval": "float buffers interpolated with the parameters' coefficients; integer buffers from a",
        "recompute": "running statistics recomputed at every alpha on bn_data",
        "batch": "batch statistics of each evaluation batch",
    }[bn]
    return InterpolationResult(
        alphas=frozen_array(alphas),
        path=path,
        formula=formula + " (a = model_a at alpha=0, b = model_b at alpha=1)",
        curves=curves,
        bn=bn,
        bn_description=bn_description,
        bn_data=bn_data_desc,
        buffers=buffers,
        batch_size=batch_size,
        params_interpolated=_describe_interpolated(model_a),
        loss_fn=obj.name, objective=obj.kind, unit=obj.unit, **ranks.fields(),
    )


def _describe_interpolated(model: nn.Module) -> str:
    every = list(model.named_parameters())
    text = (f"every parameter tensor, frozen ones included: {len(every)} tensors, "
            f"{sum(p.numel() for _, p in every)} entries")
    ties = tied_parameters(model)
    return text + ("; tied tensors interpolated once: " + ", ".join(f"{a} = {n}" for a, n in ties) if ties else "")
