"""Extra forward passes that must not count as BatchNorm batches.

A remedy that runs the model more than once on a batch (SAM's second pass, FGSM's adversarial pass,
conservative training's inner iterations) must leave the BatchNorm running statistics as if the batch
had been seen once. Inside :func:`frozen_bn_stats` every BatchNorm layer has ``track_running_stats``
switched off, which in PyTorch's BatchNorm (and :class:`~batchgap.remedies.GhostBatchNorm`) changes
nothing about the output in either mode (train mode normalizes with batch statistics anyway; eval
mode still reads the running buffers) but stops the writes: ``running_mean``, ``running_var`` and
``num_batches_tracked`` are left untouched, not even rewritten. That matters: an autograd graph built
before the block (FGSM's clean pass) keeps a reference to the running buffers and refuses to
backpropagate once they were modified in place. The flag is put back on exit, also on error.

As a safety net for BatchNorm subclasses that write their buffers regardless of the flag, every
buffer is also saved on entry and copied back on exit if its value changed. Setting the momentum to 0
instead would still advance ``num_batches_tracked`` and would break ``momentum=None``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..landscape.params import is_batchnorm

__all__ = ["frozen_bn_stats"]

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[nn.Module]:
    """``with frozen_bn_stats(model): model(x)`` leaves every BN running buffer bit for bit as it was."""
    layers = [m for m in model.modules() if is_batchnorm(m)]
    tracking = [m.track_running_stats for m in layers]
    saved = []
    for module in layers:
        for name in _BUFFERS:
            buf = getattr(module, name, None)
            if buf is not None:
                saved.append((buf, buf.detach().clone()))
    try:
        for module in layers:
            module.track_running_stats = False
        yield model
    finally:
        for module, flag in zip(layers, tracking):
            module.track_running_stats = flag
        with torch.no_grad():
            for buf, copy in saved:
                if not torch.equal(buf, copy):
                    buf.copy_(copy)
