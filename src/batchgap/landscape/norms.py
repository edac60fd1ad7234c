"""Norm- and margin-based generalization measures (Jiang et al. 2019, "Fantastic generalization measures
and where to find them"), each defined exactly here and in :attr:`NormResult.definitions`.

Parameters. ``w`` is the flat vector of the measured parameters (``params``: ``"all"`` trainable, or
``"no-bn"`` = ``"no-norm"``; :func:`params.named_parameters`: each tied tensor once), used by
``param_norm_all`` and ``fisher_rao_norm``. The layer measures and the path norm describe the function, so
they read every weight of the model (trainable or frozen), whatever ``params`` says.

Layers. Every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` module (``model.named_modules()``, each module once;
a tensor shared by two such modules is two layers, as it is applied twice) contributes its weight as one
matrix W_i. Biases and normalization affine parameters are not layers (nor are the weights of other
modules: Embedding, ConvTranspose, RNNs, ...; :attr:`NormResult.other_parameters` lists every parameter in
no layer). A conv weight (out, in/groups, *kernel) is RESHAPED to the matrix (out, in/groups * prod(kernel));
its norms are that matrix's norms, not the norms of the convolution as an operator on its input (whose
spectral norm differs in general; Sedghi et al. 2019 compute that one). All norms in float64.

* ``param_norm_all`` = ||w||_2 over every measured parameter (weights, biases, normalization affine
  parameters): not one of Jiang et al.'s measures.
* ``frobenius[i]`` = ||W_i||_F, ``spectral[i]`` = ||W_i||_2 (largest singular value,
  ``torch.linalg.matrix_norm(ord=2)``); ``log_prod_frobenius`` = sum_i log ||W_i||_F and ``log_prod_spectral``
  = sum_i log ||W_i||_2 (logs of products, so that deep nets do not overflow or underflow).
* Jiang et al. 2019's forms over the d layers (their appendix C numbering, as in the reference code of
  Dziugaite et al. 2020), each with the SQUARED layer norms: ``params_norm`` = sum_i ||W_i||_F^2 (eq. 42,
  params.norm: weight matrices only); ``log_prod_of_fro`` = sum_i log ||W_i||_F^2 (eq. 37);
  ``log_prod_of_spec`` = sum_i log ||W_i||_2^2 (eq. 32); ``sum_of_fro`` = d (prod_i ||W_i||_F^2)^(1/d) and
  ``sum_of_spec`` = d (prod_i ||W_i||_2^2)^(1/d) (sum.of.fro and sum.of.spec; eqs. 39 and 35 are their logs),
  computed as d exp(mean_i log ||W_i||^2). The sum forms are d times the geometric mean of the squared norms,
  unchanged by a rescaling of one layer by c and the next by 1/c; a plain sum of squared norms is not.
* ``path_norm`` (Neyshabur et al. 2015; Jiang et al.'s measure is its square) = sqrt( sum over all
  input-to-output paths of the product of the squared weights on the path ), a bias being the weight of a
  path that starts at a constant unit 1. Computed as sqrt(sum of the outputs of the network with every
  parameter squared, on an all-ones input of one example's shape), ``functional_call`` in eval mode. That
  equals the path sum only for networks of Linear/Conv layers, activations that are the identity on
  nonnegative inputs (ReLU, LeakyReLU), Identity, Flatten, Dropout (off) and average pooling, chained by
  ``nn.Sequential``: the check is on the exact module types, and anything else gives ``path_norm=None``
  with ``path_norm_reason`` naming the module and its type: normalization layers, other nonlinearities
  (Tanh, GELU, ...), custom modules (their forward cannot be checked), and max-pooling (a max is not a
  sum over paths; the squared-network value would not be the paper's path norm). Average pooling is a
  fixed linear map, not parametrized: it enters with its own coefficients (1/k), unsquared, as in the
  squared-network computation of Jiang et al.
* ``fisher_rao_norm`` (empirical Fisher-Rao norm, Liang et al. 2019, as used by Jiang et al.) =
  sqrt( (1/n) sum_i <w, grad_w l_i(w)>^2 ) over the examples of ``data`` with their labels, l_i the loss of
  example i alone. No depth-dependent constant is applied. <w, grad l_i> is the directional derivative of
  l_i along w, computed for a whole batch by ONE forward-mode ``torch.func.jvp`` of the per-example loss
  vector of ``functional_call`` with tangent w (not a backward pass per example). Per-example losses: for
  the default loss with (batch, classes) logits, ``F.cross_entropy(reduction="none")``; otherwise
  ``torch.func.vmap`` of ``loss_fn(out[i:i+1], y[i:i+1])`` over the rows of the batch's outputs
  (``loss_fn`` returns a batch mean, so that is example i's loss), falling back to a loop over the rows if
  vmap fails (``fisher_rao_method`` says which). The outputs come from one forward of the whole batch, so
  under batch-statistics BatchNorm (``bn="batch"``, or "eval" for ``track_running_stats=False``) l_i is
  example i's loss in the batch-statistics forward of its batch, and the derivative includes the change
  of the batch statistics along w: the result then depends on ``batch_size``.
* ``margin`` = the ``percentile``-th percentile (Jiang et al.: 10th) over the examples of
  gamma_i = f_{y_i}(x_i) - max_{j != y_i} f_j(x_i), f the logits of the forward pass under the BN
  protocol, ``numpy.percentile`` with its default linear interpolation (between the order statistics at
  ranks floor and ceil of p/100 (n-1)). ``margin_fraction_negative`` = the fraction with gamma_i < 0
  (strictly; a tie is 0). None with ``margin_reason`` unless outputs are (batch, classes >= 2) logits and
  targets class indices.
* ``spectral_margin`` (Bartlett et al. 2017's spectrally normalized margin without its reference-matrix
  factor) = margin / prod_i ||W_i||_2, and ``log_spectral_margin`` = log(margin) - log_prod_spectral (None
  when margin <= 0). Jiang et al.'s "prod of spec over margin" measure prod_i ||W_i||_2^2 / margin^2 is
  1 / spectral_margin^2.

Invariance: under a ReLU rescaling (W1, b1, W2) -> (c W1, c b1, W2 / c) the function is unchanged and so
are path_norm, margin, fisher_rao_norm, the products of norms and Jiang's sum forms (sum_of_spec,
sum_of_fro), but param_norm_all and params_norm change: these measures are not all
reparameterization-invariant.

BN protocol: :func:`functional.session` (``"eval"``, ``"batch"``, ``"recompute"`` once on ``bn_data``,
default ``data``). Dropout is off. The model is restored bit for bit.

Cost: the norms need no data pass (one SVD per layer); the path norm one forward of one example; margin and
Fisher-Rao share ONE jvp pass over ``data`` (about three forward passes), plus the BN recomputation's passes for
``"recompute"``. Timings, and why a user ``loss_fn`` is slower: docs/measures.md, "Norm measures: cost".
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as Fn
from torch import nn
from torch.func import functional_call, jvp, vmap
from torch.utils._pytree import tree_map

from . import ranks
from .functional import FullDataLoss, measured_protocol, session
from .objective import PairObjective, as_objective, is_classification, mean_cross_entropy, second_order
from .params import is_normalization
from .protocol import Measured, jsonable

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_NORM = ("conv weights (out, in/groups, *kernel) are reshaped to the matrix (out, in/groups * prod(kernel)); "
             "their Frobenius and spectral norms are that matrix's, not the convolution operator's")
# exact types (a subclass may override forward) through which the squared network computes the path sum
PATH_NORM_TYPES = (
    nn.Sequential, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Flatten,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
MAX_POOL_TYPES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                  nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d)
MARGIN_INTERPOLATION = ("numpy.percentile, method='linear': the order statistics at ranks floor and ceil of "
                        "p/100 (n-1), linearly interpolated")

DEFINITIONS = {
    "param_norm_all": ("||w||_2 over every measured parameter w (params: weights, biases, normalization affine), "
                       "each tied tensor once; not Jiang et al.'s params.norm"),
    "params_norm": "sum_i ||W_i||_F^2 over the layers' weight matrices (Jiang et al. 2019, eq. 42, params.norm)",
    "frobenius": "||W_i||_F per layer W_i (Linear/Conv weight; conv reshaped to (out, in/groups*prod(kernel)))",
    "spectral": "||W_i||_2 per layer: the largest singular value of the (reshaped) weight matrix",
    "log_prod_frobenius": "sum_i log ||W_i||_F  (log of prod_i ||W_i||_F)",
    "log_prod_spectral": "sum_i log ||W_i||_2  (log of prod_i ||W_i||_2)",
    "log_prod_of_fro": "sum_i log ||W_i||_F^2 (Jiang et al. 2019, eq. 37, log.prod.of.fro)",
    "log_prod_of_spec": "sum_i log ||W_i||_2^2 (Jiang et al. 2019, eq. 32, log.prod.of.spec)",
    "sum_of_fro": ("d (prod_i ||W_i||_F^2)^(1/d), d layers (Jiang et al. 2019, sum.of.fro; eq. 39, log.sum.of.fro, "
                   "is its log)"),
    "sum_of_spec": ("d (prod_i ||W_i||_2^2)^(1/d), d layers (Jiang et al. 2019, sum.of.spec; eq. 35, log.sum.of.spec, "
                    "is its log)"),
    "path_norm": ("sqrt(sum over input-to-output paths of prod of squared weights on the path, biases as paths "
                  "from a constant unit) = sqrt(sum of outputs of the network with squared parameters on an "
                  "all-ones input); Jiang et al.'s path-norm measure is its square"),
    "fisher_rao_norm": "sqrt((1/n) sum_i <w, grad_w l_i(w)>^2), l_i the loss of example i with its label",
    "margin": ("p-th percentile over the examples of f_y(x) - max_{j != y} f_j(x) (logits), numpy.percentile "
               "linear interpolation"),
    "margin_fraction_negative": "fraction of examples with f_y(x) - max_{j != y} f_j(x) < 0",
    "spectral_margin": "margin / prod_i ||W_i||_2",
    "log_spectral_margin": "log(margin) - sum_i log ||W_i||_2 (None when margin <= 0)",
}


@dataclass(frozen=True)
class NormResult(Measured):
    """What :func:`norm_measures` returns; every field's formula is in ``definitions`` (and docs/measures.md).

    Jiang et al. 2019's measures, under their names: ``params_norm`` (eq. 42), ``log_prod_of_spec`` (eq. 32),
    ``sum_of_spec`` (exp of eq. 35), ``log_prod_of_fro`` (eq. 37), ``sum_of_fro`` (exp of eq. 39); the
    path norm's square (eq. 44) and the margin of inverse.margin (eq. 22). The rest are batchgap's:
    ``param_norm_all`` (every parameter), the unsquared ``log_prod_*``, the per-layer norms.
    """

    params_measured: str  # the measured parameters in words (params.describe_params)
    layers: tuple[str, ...]  # "<module>.weight" of each Linear/Conv module, in named_modules order
    frobenius: tuple[float, ...]  # ||W_i||_F per layer
    spectral: tuple[float, ...]  # ||W_i||_2 per layer
    conv_norm: str  # conv weights are reshaped matrices (CONV_NORM)
    other_parameters: tuple[str, ...]  # parameters in no layer: biases, normalization affine, other modules
    param_norm_all: float  # ||w||_2 over every measured parameter (biases, normalization included)
    params_norm: float  # sum_i ||W_i||_F^2, Jiang et al.'s eq. 42
    log_prod_frobenius: float  # sum_i log ||W_i||_F
    log_prod_spectral: float  # sum_i log ||W_i||_2
    log_prod_of_fro: float  # sum_i log ||W_i||_F^2, Jiang et al.'s eq. 37
    log_prod_of_spec: float  # sum_i log ||W_i||_2^2, Jiang et al.'s eq. 32
    sum_of_fro: float  # d (prod_i ||W_i||_F^2)^(1/d), Jiang et al.'s sum.of.fro
    sum_of_spec: float  # d (prod_i ||W_i||_2^2)^(1/d), Jiang et al.'s sum.of.spec
    path_norm: float | None
    path_norm_reason: str | None  # why path_norm is None
    fisher_rao_norm: float
    fisher_rao_method: str
    percentile: float
    margin: float | None
    margin_fraction_negative: float | None
    margin_reason: str | None  # why margin is None
    margin_interpolation: str
    spectral_margin: float | None
    log_spectral_margin: float | None
    definitions: types.MappingProxyType = field(default_factory=lambda: types.MappingProxyType(dict(DEFINITIONS)))

    def as_dict(self) -> dict:
        return jsonable(self)


def jiang_sum_form(norms) -> float:
    """d (prod_i n_i^2)^(1/d) for the d layer norms n_i, as d exp((2/d) sum_i log n_i) (no overflow).

    Jiang et al. 2019's sum.of.spec (n_i = ||W_i||_2) and sum.of.fro (n_i = ||W_i||_F); eqs. 35 and 39 are
    its log. By the AM-GM inequality it is at most sum_i n_i^2, with equality when all n_i are equal.

    Args:
        norms: the d layer norms (nonnegative floats).

    Returns:
        The value as a float; 0.0 when a norm is 0, nan when there is no layer (d = 0).

    Cost: O(d).
    """
    n = np.asarray(list(norms), dtype=np.float64)
    if len(n) == 0:
        return float("nan")
    with np.errstate(divide="ignore"):
        return float(len(n) * np.exp(2.0 * np.mean(np.log(n))))


def layer_matrices(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, W)`` for every Linear/Conv module's weight, W detached, reshaped to (out, -1), float64."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, LAYER_TYPES) and getattr(m, "weight", None) is not None:
            w = m.weight.detach()
            out.append((f"{name}.weight" if name else "weight", w.reshape(w.shape[0], -1).to(torch.float64)))
    return out


def _where(name: str) -> str:
    return f"module {name!r}" if name else "the model itself"


def path_norm_obstacle(model: nn.Module) -> str | None:
    """Why the squared-network value would not be the path norm (module docstring), or None when it is."""
    for name, m in model.named_modules():
        kind = type(m).__name__
        if is_normalization(m):
            return (f"{_where(name)} is a normalization layer ({kind}): the path norm is defined for networks of "
                    "Linear/Conv layers and ReLU-like activations only")
        if isinstance(m, MAX_POOL_TYPES):
            return (f"{_where(name)} is max-pooling ({kind}): a max is not a sum over paths, the squared-network "
                    "value would not be the path norm")
        if type(m) not in PATH_NORM_TYPES:
            return (f"{_where(name)} is a {kind}, not one of Linear, Conv1d/2d/3d, ReLU, LeakyReLU, Identity, "
                    "Flatten, Dropout, average pooling chained by nn.Sequential (a nonlinearity that is not the "
                    "identity on nonnegative inputs, or a forward this check cannot read)")
    return None


@torch.no_grad()
def _path_norm(model: nn.Module, example: torch.Tensor | None) -> tuple[float | None, str | None]:
    reason = path_norm_obstacle(model)
    if reason is not None:
        return None, reason
    if not torch.is_tensor(example) or not example.is_floating_point():
        return None, "the inputs are not a floating-point tensor"
    squared = {n: p.detach().to(torch.float64).square() for n, p in model.named_parameters()}
    ones = torch.ones(example.shape, dtype=torch.float64, device=example.device)
    out = functional_call(model, squared, (ones,))
    if not torch.is_tensor(out):
        return None, f"the model returned a {type(out).__name__}, not a tensor"
    return math.sqrt(float(out.sum())), None


def _per_example(out, y, loss_fn, how: str, used: list) -> torch.Tensor:
    """The vector of the batch's per-example losses, by ``how`` ("vmap" or "loop"); the default loss on
    (batch, classes) logits with class indices is ``F.cross_entropy(reduction="none")`` either way."""
    if loss_fn is None and is_classification(out, y):
        used.append("ce")
        return Fn.cross_entropy(out, y, reduction="none")
    fn = loss_fn or mean_cross_entropy
    used.append(how)
    if how == "vmap":
        def one(o, t):
            return fn(tree_map(lambda a: a.unsqueeze(0), o), tree_map(lambda a: a.unsqueeze(0), t)).reshape(())

        return vmap(one)(out, y)
    return torch.stack([fn(tree_map(lambda a: a[i : i + 1], out), tree_map(lambda a: a[i : i + 1], y)).reshape(())
                        for i in range(len(y))])


_METHODS = {
    "ce": "F.cross_entropy(reduction='none')",
    "vmap": "torch.func.vmap of loss_fn over single examples",
    "loop": "a loop of loss_fn over single examples (vmap failed)",
    "objective": "the objective's per_unit losses",
}


def _unit_losses(F: FullDataLoss, batch, used: list):
    """For an objective other than pairs: the per-unit losses at a parameter vector (with the logits and
    targets as aux), through :meth:`objective.Objective.per_unit` and :meth:`objective.Objective.logits`."""
    def losses(vec):
        model = F.bound(vec)
        per = F.objective.per_unit(model, batch)
        if per is None:
            raise ValueError(f"the Fisher-Rao norm needs per-unit losses and the objective {F.objective.name} "
                             "gives only (loss_sum, weight): make it return the 1-D vector of per-unit losses")
        used.append("objective")
        return per, F.objective.logits(model, batch)
    return losses


def _data_pass(F: FullDataLoss, loss_fn):
    """One jvp per batch: sum_i <w, grad l_i>^2 (float64), the margins, the first input row, the method."""
    fr_sq = torch.zeros((), dtype=torch.float64)
    margins, reason, example, used = [], None, None, []
    w, vmap_failed = F.x0, False
    pairs = isinstance(F.objective, PairObjective)
    units = 0
    for batch in F.batches():
        x, y = batch if pairs else (None, None)
        if example is None and pairs:
            example = x[:1] if torch.is_tensor(x) else None
        for how in ("loop",) if vmap_failed or not pairs else ("vmap", "loop"):
            def losses(vec, how=how, batch=batch):
                if not pairs:
                    return _unit_losses(F, batch, used)(vec)
                out, y = F.objective.forward(F.bound(vec), batch)
                return _per_example(out, y, loss_fn, how, used), out

            try:
                # forward mode only: no graph for parameters read from the model; attention on its math
                # backend (the fused kernels have no forward-mode derivative)
                with torch.no_grad(), second_order() as attention:
                    _, dirs, out = jvp(losses, (w,), (w,), has_aux=True)
                F.attention_calls += attention.calls
                break
            except Exception:
                if how == "loop" or not pairs:
                    raise
                if used and used[-1] == "vmap":
                    used.pop()
                vmap_failed = True  # the loop from here on
        fr_sq += dirs.detach().to(torch.float64).square().sum().cpu()
        units += len(dirs)
        if not pairs:
            out, y = out if out is not None else (None, None)
        if reason is None:
            out = out.detach() if torch.is_tensor(out) else out
            if not is_classification(out, y):
                reason = "the outputs are not (batch, classes) logits with class-index targets"
            elif out.shape[1] < 2:
                reason = "the model has one output: no other class to take the margin against"
            else:
                logits = out.to(torch.float64)
                index = y[:, None].to(logits.device)
                true = logits.gather(1, index)[:, 0]
                others = logits.scatter(1, index, float("-inf")).amax(1)
                margins.append((true - others).cpu())
    fr_sq, units = F.reduce(fr_sq, units)
    F.count_units(units)
    shares = ranks.gather((reason, margins))  # every rank's margins, in rank order
    reason = next((r for r, _ in shares if r is not None), None)
    margins = [m for _, part in shares for m in part]
    method = ("jvp (forward mode, tangent w) of the per-unit losses of functional_call, one per batch; "
              "per-unit losses by " + " then ".join(_METHODS[h] for h in dict.fromkeys(used)))
    return fr_sq, (None if reason else torch.cat(margins).numpy()), reason, example, method


def norm_measures(
    model: nn.Module, data, loss_fn=None, batch_size: int = 1000, bn: str = "eval", params: str = "all",
    percentile: float = 10.0, bn_data=None, objective=None,
) -> NormResult:
    """The norm- and margin-based measures of the module docstring, on one BN protocol.

    Formulas (W_i the d layers' weight matrices, w the measured parameters, gamma_i example i's margin):
    params_norm = sum_i ||W_i||_F^2; sum_of_spec = d (prod_i ||W_i||_2^2)^(1/d), sum_of_fro likewise;
    log_prod_of_spec = sum_i log ||W_i||_2^2; param_norm_all = ||w||_2; fisher_rao_norm =
    sqrt((1/n) sum_i <w, grad l_i>^2); margin = the percentile-th percentile of gamma_i (each field's
    definition is in ``NormResult.definitions`` and docs/measures.md).

    Args:
        model: the network; restored bit for bit.
        data: any form :func:`evaluate.batches` accepts (the examples of the margin and Fisher-Rao norm,
            normally the training set).
        loss_fn: ``loss_fn(outputs, targets)`` returning a batch mean (default cross-entropy of logits); the
            Fisher-Rao norm's loss. A user loss goes through vmap (slower: for cross-entropy leave None).
        batch_size: evaluation batch size.
        bn: BN protocol (:func:`functional.session`): "eval", "batch" or "recompute".
        params: selects w for ``param_norm_all`` and ``fisher_rao_norm`` ("all" or "no-bn").
        percentile: in [0, 100], the margin's percentile (Jiang et al.: 10).
        bn_data: the data of the "recompute" statistics (default ``data``).
        objective: how a batch becomes a loss (:mod:`objective`); None for ``(inputs, targets)`` pairs and
            ``loss_fn``. The Fisher-Rao norm needs its per-unit losses, the margin its logits.

    Returns:
        :class:`NormResult`: every measure above, the per-layer norms, the protocol, and a reason in place
        of each measure that is not defined here (path norm, margin).

    Cost: one SVD per layer, one forward of one example (path norm), one forward-mode jvp pass over
    ``data`` (about three forward passes), plus the BN recomputation's passes for "recompute".
    """
    if not 0.0 <= float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    layers = layer_matrices(model)
    frob = [float(torch.linalg.matrix_norm(W, "fro")) for _, W in layers]
    spec = [float(torch.linalg.matrix_norm(W, 2)) for _, W in layers]
    in_layers = {id(m.weight) for m in model.modules() if isinstance(m, LAYER_TYPES) and m.weight is not None}
    other = tuple(n for n, p in model.named_parameters() if id(p) not in in_layers)
    with np.errstate(divide="ignore"):
        log_frob, log_spec = float(np.sum(np.log(frob))), float(np.sum(np.log(spec)))
    obj = as_objective(objective, loss_fn)
    with session(model, bn, data, bn_data, batch_size, obj):
        F = FullDataLoss(model, data, None, batch_size, params, objective=obj)
        fr_sq, margins, margin_reason, example, fr_method = _data_pass(F, loss_fn)
        path, path_reason = _path_norm(model, example)
        proto = measured_protocol(model, F, bn, bn_data, batch_size, params)
        param_norm_all = float(F.x0.to(torch.float64).norm())
    margin = fraction = spectral_margin = log_spectral_margin = None
    if margins is not None:
        margin = float(np.percentile(margins, float(percentile)))
        fraction = float(np.mean(margins < 0))
        with np.errstate(over="ignore", invalid="ignore"):
            spectral_margin = float(np.float64(margin) * np.exp(-np.float64(log_spec)))
        log_spectral_margin = math.log(margin) - log_spec if margin > 0 else None
    return NormResult(
        layers=tuple(n for n, _ in layers), frobenius=tuple(frob), spectral=tuple(spec), conv_norm=CONV_NORM,
        other_parameters=other, param_norm_all=param_norm_all, params_norm=float(sum(f * f for f in frob)),
        log_prod_frobenius=log_frob, log_prod_spectral=log_spec, log_prod_of_fro=2 * log_frob,
        log_prod_of_spec=2 * log_spec, sum_of_fro=jiang_sum_form(frob), sum_of_spec=jiang_sum_form(spec),
        path_norm=path, path_norm_reason=path_reason,
        fisher_rao_norm=math.sqrt(float(fr_sq) / F.n), fisher_rao_method=fr_method, percentile=float(percentile),
        margin=margin, margin_fraction_negative=fraction, margin_reason=margin_reason,
        margin_interpolation=MARGIN_INTERPOLATION, spectral_margin=spectral_margin,
        log_spectral_margin=log_spectral_margin, **proto,
    )
