"""BatchNorm folded into the layer before it, for evaluations with fixed statistics.

With fixed statistics (``model.eval()`` and running statistics: the ``"eval"`` and ``"recompute"``
protocols of :func:`functional.session`) a BatchNorm after a Linear or convolution is an affine map
per output channel, so the pair is one layer:

    BN(W x + b) = (s W) x + ((b - mu) s + beta),    s = gamma / sqrt(var + eps),

the same function of the same parameters (W, b, gamma, beta), differentiable in all of them, with one
pass over the activations fewer forward and several fewer in every backward and HVP. Values change by
float rounding only (tests/test_landscape_fold.py against the unfolded model; the HVP's speed-up is a
row of ``benchmarks/run.py``).

:func:`folded_view` returns a shallow copy of the model's module tree in which each such pair of
consecutive children of a plain ``nn.Sequential`` reached from the model through plain Sequentials only
(Linear -> BatchNorm1d, Conv1d/2d/3d -> BatchNorm1d/2d/3d, both of exactly these types, no hooks, the BN
in eval mode with running statistics, its channels those of the layer) is replaced: the layer by
:class:`FoldedLayer` and the BN by :class:`FoldedAway` (the identity), which keep the originals' parameter
and buffer names, so ``functional_call(view, {name: tensor})`` takes the model's own names. The view shares
every tensor with the model and is never trained; it is only valid while the model's modes and BN statistics
stay as they were when it was made (inside one session). None when there is nothing to fold.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

_LAYERS = {nn.Linear: nn.BatchNorm1d, nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def foldable(layer: nn.Module, bn: nn.Module) -> bool:
    """Whether ``bn`` right after ``layer`` in a Sequential is a fixed affine map that can be folded in."""
    want = _LAYERS.get(type(layer))
    if want is None or type(bn) is not want or bn.training or not bn.track_running_stats:
        return False
    if bn.running_mean is None or bn.running_var is None or _hooked(layer) or _hooked(bn):
        return False
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return bn.num_features == channels


class FoldedAway(nn.Module):
    """The folded BatchNorm: its parameters and buffers under their names, its forward the identity."""

    def __init__(self, bn: nn.Module):
        super().__init__()
        self.eps = bn.eps
        for name in ("weight", "bias"):  # None when affine=False
            self.register_parameter(name, bn._parameters.get(name))
        for name, b in bn.named_buffers(recurse=False):
            self.register_buffer(name, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FoldedLayer(nn.Module):
    """The layer with the following BatchNorm's affine map applied to its weight and bias."""

    def __init__(self, layer: nn.Module, bn: FoldedAway):
        super().__init__()
        self.layer = type(layer)  # only for repr
        for name in ("weight", "bias"):  # bias None when bias=False
            self.register_parameter(name, layer._parameters.get(name))
        # neither is a child: their tensors are reached under the layer's and the BN's own paths
        object.__setattr__(self, "conv", None if isinstance(layer, nn.Linear) else layer)
        object.__setattr__(self, "bn", bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        s = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            s = s * bn.weight
        shift = -bn.running_mean * s if self.bias is None else (self.bias - bn.running_mean) * s
        if bn.bias is not None:
            shift = shift + bn.bias
        weight = self.weight * s.reshape(-1, *([1] * (self.weight.dim() - 1)))
        if self.conv is None:
            return F.linear(x, weight, shift)
        return self.conv._conv_forward(x, weight, shift)

    def extra_repr(self) -> str:
        return f"{self.layer.__name__} with the next BatchNorm folded in"


def folded_view(model: nn.Module) -> nn.Module | None:
    """A view of ``model`` with its foldable (layer, BatchNorm) pairs folded (module docstring), or None."""
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    # only Sequentials reached from the root through Sequentials: a module with its own forward may call a
    # Sequential's children one by one (then the pair is not one layer)
    chained, todo = [], [model] if type(model) is nn.Sequential else []
    while todo:
        seq = todo.pop()
        chained.append(seq)
        todo += [c for c in seq._modules.values() if type(c) is nn.Sequential]
    pairs = []
    for seq in chained:
        if _hooked(seq):
            continue
        names = list(seq._modules)
        pairs += [(seq, a, b) for a, b in zip(names, names[1:])
                  if seq._modules[a] is not None and seq._modules[b] is not None
                  and uses[id(seq._modules[a])] == uses[id(seq._modules[b])] == 1
                  and foldable(seq._modules[a], seq._modules[b])]
    if not pairs:
        return None
    # copy the module objects (not their tensors), then swap the pairs in the copies
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    try:
        view = copy.deepcopy(model, memo)
    except Exception:  # a module that cannot be copied: evaluated unfolded
        return None
    copies = dict(zip([id(m) for m in model.modules()], view.modules()))
    for seq, a, b in pairs:  # a layer is never a BN, so the pairs do not overlap
        target = copies[id(seq)]
        away = FoldedAway(target._modules[b])
        target._modules[a] = FoldedLayer(target._modules[a], away)
        target._modules[b] = away
    return view
