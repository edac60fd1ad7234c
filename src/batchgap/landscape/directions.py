"""Filter-normalized random directions (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets").

d is drawn i.i.d. standard normal (from an explicit ``torch.Generator``), then rescaled filter by filter:

    d_f  <-  d_f / ||d_f|| * ||w_f||

where a filter f is, for a parameter of 2 or more dimensions,

* a Conv weight ``(out, in, k...)``: one output channel ``w[o]``;
* a ConvTranspose weight ``(in, out/groups, k...)``: one output channel ``w[:, o]``;
* a Linear weight ``(out, in)`` and any other >= 2-D parameter: one row (one neuron) ``w[o]``
  (per row, not per layer: the seed demo normalized Linear layers as a whole, which is wrong).

1-D parameters (biases, BatchNorm weight and bias) follow ``bias_bn``:

* ``"zero"`` (default, Li et al.'s choice): the direction is 0 there, they stay at their values;
* ``"filter"``: every scalar is its own filter, d_i <- sign(d_i) * |w_i|.

A filter whose random draw is exactly 0 stays 0. Parameters not selected by ``params``
(``"all"``, or ``"no-bn"`` = ``"no-norm"``: none of a normalization layer's, see
:func:`params.named_parameters`) get a zero direction; frozen ones none. A tied tensor gets one entry,
under its first name (as ``model.named_parameters()`` lists it). The draw
happens on the CPU in each parameter's dtype, in the order of ``model.named_parameters()``, so a
seed gives the same direction on any device and whatever the policy.
"""
from __future__ import annotations

import torch
from torch import nn

from .params import named_parameters

BIAS_BN_POLICIES = ("zero", "filter")


class Direction(dict):
    """``{parameter name: tensor}`` with the protocol that made it, in words, as ``.protocol``."""

    protocol: str = "caller's direction"


def _filter_dim(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


def _normalize_filters(d: torch.Tensor, w: torch.Tensor, dim: int) -> torch.Tensor:
    dims = [i for i in range(d.dim()) if i != dim]
    d_norm = torch.linalg.vector_norm(d, dim=dims, keepdim=True)
    w_norm = torch.linalg.vector_norm(w, dim=dims, keepdim=True)
    scale = torch.where(d_norm > 0, w_norm / torch.where(d_norm > 0, d_norm, 1), 0)
    return d * scale


@torch.no_grad()
def filter_normalized_direction(
    model: nn.Module,
    generator: torch.Generator | None = None,
    bias_bn: str = "zero",
    params: str = "all",
    seed: int = 0,
) -> Direction:
    """A filter-normalized Gaussian direction (Li et al. 2018), ``{name: tensor}`` for every trainable parameter.

        d ~ N(0, I),    d_f <- d_f / ||d_f|| * ||w_f||    for each filter f (module docstring)

    The global RNG is never used. The :class:`Direction` (a dict) is aligned with ``model.named_parameters()``
    (same names, shapes, dtypes, devices) and can be passed to :func:`curves.loss_curve` /
    :func:`curves.loss_surface`.

    Args:
        model: the model whose parameters w set the filters' norms (not changed).
        generator: the ``torch.Generator`` (CPU) to draw from; None for ``torch.Generator().manual_seed(seed)``.
        bias_bn: 1-D parameters (biases, BatchNorm affine): ``"zero"`` (direction 0 there, Li et al.'s
            choice) or ``"filter"`` (each scalar its own filter, d_i <- sign(d_i) |w_i|).
        params: the perturbed parameters: ``"all"`` trainable, or ``"no-bn"`` (others get a zero direction).
        seed: the seed of the default generator (unused when ``generator`` is given).

    Returns:
        A :class:`Direction`: ``{name: tensor}`` with a ``protocol`` string saying how it was drawn.

    Cost:
        One Gaussian draw of the parameters' size and a norm per filter; no data pass.
    """
    if bias_bn not in BIAS_BN_POLICIES:
        raise ValueError(f"bias_bn must be one of {BIAS_BN_POLICIES}, not {bias_bn!r}")
    source = "caller's torch.Generator" if generator is not None else f"torch.Generator seeded {seed}"
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    selected = {n for n, _ in named_parameters(model, params)}
    owner = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = module
    out = Direction()
    out.protocol = f"{describe(bias_bn, params)}; drawn from {source}"
    for name, w in model.named_parameters():
        if not w.requires_grad:
            continue
        d = torch.randn(w.shape, generator=generator, dtype=w.dtype, device="cpu").to(w.device)
        wd = w.detach()
        if name not in selected:
            d.zero_()
        elif w.dim() >= 2:
            d = _normalize_filters(d, wd, _filter_dim(owner[name]))
        elif bias_bn == "zero":
            d.zero_()
        else:  # "filter": each scalar its own filter
            d = torch.sign(d) * wd.abs()
        out[name] = d
    return out


def describe(bias_bn: str, params: str) -> str:
    """The direction's protocol in words."""
    one_d = "0 for biases and BN parameters" if bias_bn == "zero" else "sign(d_i)|w_i| for 1-D parameters"
    which = params if params == "all" else f"{params} (0 for every normalization layer's parameters)"
    return (f"filter-normalized N(0,1) direction (Li et al. 2018): per output channel / per row, "
            f"||d_f|| = ||w_f||; {one_d}; parameters: {which}")
