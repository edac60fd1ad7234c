"""Ghost batch normalization (Hoffer, Hubara and Soudry 2017, "Train longer, generalize better").

In train mode a large batch of N examples is split, in order, into consecutive "ghost batches" of
``ghost_size`` examples, and each is normalized with its own mean and (biased) variance::

    y_i = gamma * (x_i - mean_c) / sqrt(var_c + eps) + beta      for x_i in chunk c

so a large-batch step sees the statistical noise of small-batch BatchNorm. Every choice, stated:

- Chunks: ``N // ghost_size`` chunks of ``ghost_size``, then the remainder as a last smaller chunk.
  A last chunk of ONE example is merged into the chunk before it (which then has ``ghost_size + 1``),
  since BatchNorm cannot normalize a single example of an (N, C) input. With ``ghost_size >= N`` there
  is one chunk: the layer is then exactly ``nn.BatchNorm``. A whole batch of one example fails as it
  does in ``nn.BatchNorm``.
- Running statistics (``track_running_stats=True``): each chunk updates them as if it were a
  separate call of a plain BatchNorm layer, in batch order: one momentum update per chunk with that
  chunk's mean and unbiased variance, and ``num_batches_tracked`` advanced once per chunk
  (``momentum=None``, the cumulative average, then averages over chunks). So a batch of k chunks moves
  the running statistics k times as far as a plain BN step would: with the default momentum 0.1 they
  follow recent data more closely, as they would in small-batch training.
- Eval mode with running statistics: exactly ``nn.BatchNorm`` (running statistics, no chunks).
  Eval mode without them (``track_running_stats=False``, the Keras ``mode=2`` semantics): chunk
  statistics as in train mode, so the layer computes the same function in both modes.
- Inputs (N, C), (N, C, L) and (N, C, H, W), statistics per channel C, as BatchNorm1d / 2d.

:func:`ghost_bn` swaps every ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` of a model for a
:class:`GhostBatchNorm` that holds the very same parameter and buffer tensors, so state-dict keys are
unchanged (checkpoints load either way) and an optimizer built before the swap still updates them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import UserError

__all__ = ["GhostBatchNorm", "ghost_bn", "ghost_chunk_sizes"]


def _check_ghost_size(ghost_size: object) -> int:
    if isinstance(ghost_size, bool) or not isinstance(ghost_size, int) or ghost_size < 2:
        raise UserError(f"ghost_size must be an int >= 2, got {ghost_size!r}")
    return ghost_size


def ghost_chunk_sizes(n: int, ghost_size: int) -> list[int]:
    """Sizes of the consecutive chunks a batch of ``n`` is split into (see the module docstring).

    >>> ghost_chunk_sizes(10, 4), ghost_chunk_sizes(9, 4), ghost_chunk_sizes(3, 8)
    ([4, 4, 2], [4, 5], [3])
    """
    if n <= ghost_size:
        return [n]
    sizes = [ghost_size] * (n // ghost_size)
    rest = n % ghost_size
    if rest == 1:
        sizes[-1] += 1
    elif rest:
        sizes.append(rest)
    return sizes


class GhostBatchNorm(_BatchNorm):
    """BatchNorm over consecutive ghost batches of ``ghost_size`` examples (see the module docstring).

    Same constructor arguments, parameters and buffers as ``nn.BatchNorm1d/2d`` plus ``ghost_size``;
    a subclass of PyTorch's ``_BatchNorm``, so code that looks for BatchNorm layers finds it.
    """

    def __init__(self, num_features: int, ghost_size: int = 128, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.ghost_size = _check_ghost_size(ghost_size)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3, 4):
            raise ValueError(f"expected a 2-D, 3-D or 4-D input (N, C[, L] or N, C, H, W), got {input.dim()}-D")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_size={self.ghost_size}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        # the same decisions as nn.BatchNorm's forward, taken once per chunk
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not use_batch_stats:
            momentum = 0.0 if self.momentum is None else self.momentum
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                False, momentum, self.eps)
        update = self.training and self.track_running_stats
        running_mean = self.running_mean if update else None
        running_var = self.running_var if update else None
        outs = []
        for chunk in torch.split(input, ghost_chunk_sizes(input.shape[0], self.ghost_size)):
            momentum = 0.0 if self.momentum is None else self.momentum
            if update and self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    momentum = 1.0 / float(self.num_batches_tracked)
            outs.append(F.batch_norm(chunk, running_mean, running_var, self.weight, self.bias,
                                     True, momentum, self.eps))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def _ghost_from(bn: _BatchNorm, ghost_size: int) -> GhostBatchNorm:
    new = GhostBatchNorm(bn.num_features, ghost_size, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                         track_running_stats=bn.track_running_stats)
    for name in ("weight", "bias"):
        new._parameters[name] = bn._parameters[name]
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[name] = bn._buffers[name]
    new.train(bn.training)
    return new


def ghost_bn(model: nn.Module, ghost_size: int) -> nn.Module:
    """Replace, in place, every ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` of ``model`` by a
    :class:`GhostBatchNorm` of ``ghost_size`` holding the same parameter and buffer tensors (the
    same objects: state-dict keys and values unchanged, optimizers still valid). GhostBatchNorm layers
    already there get the new ``ghost_size``. Returns ``model`` (the new layer when ``model`` itself is
    a BatchNorm). Hooks registered on a replaced layer are not carried over.
    """
    ghost_size = _check_ghost_size(ghost_size)
    if isinstance(model, GhostBatchNorm):
        model.ghost_size = ghost_size
        return model
    if isinstance(model, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return _ghost_from(model, ghost_size)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GhostBatchNorm):
                child.ghost_size = ghost_size
            elif isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
                setattr(parent, name, _ghost_from(child, ghost_size))
    return model
