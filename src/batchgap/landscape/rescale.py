"""Function-preserving reparametrizations of ReLU networks (Dinh et al. 2017, "Sharp minima can generalize for
deep nets"), to test which measures of a solution depend on its parametrization rather than on its function.

* :func:`rescale_layers` (Dinh et al., section 4.1, the alpha-scale transformation): ReLU is positively
  homogeneous, relu(a z) = a relu(z) for a > 0, so multiplying the affine map that feeds the ``layer``-th ReLU by
  ``alpha`` (its weight AND its bias; with BatchNorm between them, the BatchNorm's affine weight and bias, which
  is that map's last affine step) and the next layer's weight by ``1/alpha`` (its bias unchanged) leaves every
  output unchanged. Dinh et al. show it moves eps-sharpness and the Hessian's top eigenvalue at will.
* :func:`rescale_before_bn`: the Linear/Conv layer right before the ``layer``-th BatchNorm, weight and bias, times
  ``alpha``. BatchNorm divides the scale out: (a h - a mu) / sqrt(a^2 var + eps'). To make that exact in every
  BN protocol the transform also scales the layer's running mean by a, its running variance by a^2 and its eps
  by a^2 (so batch statistics, running statistics and statistics recomputed on data all give the same
  normalized value; without the eps change the function moves by about eps (1 - 1/a^2) / (2 var)).

Both return a transformed deep copy (the model is not changed). Layers are found in the order of
``model.named_modules()``, which is the forward order of the Sequential models batchgap builds; for any other
model the order may not be the forward order, which is why :func:`max_output_change` exists: the caller checks
the outputs and refuses a transform that changed them (:func:`checked`).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .evaluate import batches, recompute_bn_statistics, set_bn_mode
from .params import is_batchnorm, preserved

AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# modules between a ReLU and the next affine layer that commute with a positive scale
PASS_THROUGH = (nn.Flatten, nn.Dropout, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
TRANSFORMS = ("layers", "batchnorm")
# outputs unchanged: max |f'(x) - f(x)| <= OUTPUT_RTOL x max(1, max |f(x)|) (float32 rounding through a few layers)
OUTPUT_RTOL = 1e-4


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if not list(m.children())]


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or alpha == float("inf"):
        raise ValueError(f"alpha must be a finite positive number (ReLU is only positively homogeneous), got {alpha!r}")
    return float(alpha)


def _check_layer(layer: int, count: int, what: str) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= count:
        raise ValueError(f"layer must be an integer from 1 to {count} (the model's {what}), got {layer!r}")
    return layer


@torch.no_grad()
def rescale_layers(model: nn.Module, alpha: float, layer: int = 1) -> nn.Module:
    """Dinh et al.'s alpha-scale transformation around the ``layer``-th ReLU (1-based), on a copy.

    Args:
        model: a network whose ``layer``-th ReLU is fed by a Linear/Conv (optionally followed by BatchNorm) and
            feeds a Linear/Conv (through pass-through modules only: flatten, dropout, pooling).
        alpha: the factor, > 0.
        layer: which ReLU.

    Returns:
        The transformed copy: the affine step before the ReLU times alpha (weight and bias), the next layer's
        weight times 1/alpha. Cost: a deep copy of the model.
    """
    alpha = _check_alpha(alpha)
    leaves = _leaves(model)
    relus = [i for i, (_, m) in enumerate(leaves) if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError("rescale_layers needs a network with ReLU layers (Dinh et al.'s transformation)")
    k = relus[_check_layer(layer, len(relus), f"{len(relus)} ReLU layers") - 1]
    before = leaves[k - 1][1] if k >= 1 else None
    if not (isinstance(before, AFFINE) or is_batchnorm(before)):
        raise ValueError(f"ReLU {leaves[k][0]!r} is not fed directly by a Linear, Conv or BatchNorm layer")
    nxt = next((i for i in range(k + 1, len(leaves)) if not isinstance(leaves[i][1], PASS_THROUGH)), None)
    if nxt is None or not isinstance(leaves[nxt][1], AFFINE):
        raise ValueError(f"ReLU {leaves[k][0]!r} does not feed a Linear or Conv layer through pass-through modules")
    out = copy.deepcopy(model)
    mods = dict(out.named_modules())
    first, second = mods[leaves[k - 1][0]], mods[leaves[nxt][0]]
    if first.weight is None:
        raise ValueError(f"{leaves[k - 1][0]!r} has no affine weight to scale")
    first.weight.mul_(alpha)
    if first.bias is not None:
        first.bias.mul_(alpha)
    second.weight.div_(alpha)
    return out


@torch.no_grad()
def rescale_before_bn(model: nn.Module, alpha: float, layer: int = 1) -> nn.Module:
    """The Linear/Conv before the ``layer``-th BatchNorm (1-based) times ``alpha``, which BatchNorm cancels, on a copy.

    Args:
        model: a network whose ``layer``-th BatchNorm directly follows a Linear or Conv layer.
        alpha: the factor, > 0.
        layer: which BatchNorm.

    Returns:
        The transformed copy: that layer's weight and bias times alpha, the BatchNorm's running mean times alpha,
        running variance and eps times alpha^2 (the module docstring says why). Cost: a deep copy of the model.
    """
    alpha = _check_alpha(alpha)
    leaves = _leaves(model)
    bns = [i for i, (_, m) in enumerate(leaves) if is_batchnorm(m)]
    if not bns:
        raise ValueError("rescale_before_bn needs a network with BatchNorm layers (model.bn = \"none\" has none)")
    k = bns[_check_layer(layer, len(bns), f"{len(bns)} BatchNorm layers") - 1]
    if k == 0 or not isinstance(leaves[k - 1][1], AFFINE):
        raise ValueError(f"BatchNorm {leaves[k][0]!r} does not directly follow a Linear or Conv layer")
    out = copy.deepcopy(model)
    mods = dict(out.named_modules())
    lin, bn = mods[leaves[k - 1][0]], mods[leaves[k][0]]
    lin.weight.mul_(alpha)
    if lin.bias is not None:
        lin.bias.mul_(alpha)
    if bn.running_mean is not None:
        bn.running_mean.mul_(alpha)
        bn.running_var.mul_(alpha * alpha)
    bn.eps = bn.eps * alpha * alpha
    return out


def transform(model: nn.Module, kind: str, alpha: float, layer: int = 1) -> nn.Module:
    """:func:`rescale_layers` (``kind`` "layers") or :func:`rescale_before_bn` ("batchnorm")."""
    if kind not in TRANSFORMS:
        raise ValueError(f"kind must be one of {', '.join(TRANSFORMS)}, not {kind!r}")
    return (rescale_layers if kind == "layers" else rescale_before_bn)(model, alpha, layer)


@torch.no_grad()
def outputs(model: nn.Module, x: torch.Tensor, bn: str = "eval", batch_size: int = 1000) -> torch.Tensor:
    """The model's outputs on the inputs ``x`` under the BatchNorm protocol ``bn`` (:mod:`evaluate`'s modes; for
    "recompute" the statistics are recomputed on ``x``); the model comes back as it was."""
    with preserved(model):
        if bn == "recompute":
            recompute_bn_statistics(model, (x, torch.zeros(len(x), dtype=torch.long)), batch_size)
            bn = "eval"
        set_bn_mode(model, bn)
        return torch.cat([model(xb) for xb, _ in batches((x, torch.zeros(len(x), dtype=torch.long)), batch_size)])


def max_output_change(a: nn.Module, b: nn.Module, x: torch.Tensor, bn: str = "eval", batch_size: int = 1000) -> float:
    """max |f_b(x) - f_a(x)| / max(1, max |f_a(x)|) over the inputs ``x`` under the BN protocol ``bn``."""
    fa, fb = outputs(a, x, bn, batch_size), outputs(b, x, bn, batch_size)
    return float((fb - fa).abs().max() / max(1.0, float(fa.abs().max())))


def checked(model: nn.Module, kind: str, alpha: float, x: torch.Tensor, layer: int = 1, bn: str = "eval",
            batch_size: int = 1000, rtol: float = OUTPUT_RTOL) -> tuple[nn.Module, float]:
    """:func:`transform`, refused (ValueError) unless every output on ``x`` is unchanged to ``rtol``.

    Returns:
        ``(the transformed copy, its max_output_change)``. Cost: two forward passes over ``x``."""
    out = transform(model, kind, alpha, layer)
    change = max_output_change(model, out, x, bn, batch_size)
    if not change <= rtol:
        raise ValueError(f"the {kind} rescaling by {alpha:g} at layer {layer} changed the outputs by {change:.3g} "
                         f"(relative; tolerance {rtol:g}): the model is not a ReLU chain this transform preserves")
    return out, change
