"""Where a study computes: ``auto`` (the GPU when torch sees one, else the CPU), ``cpu``, ``cuda``, ``cuda:N``.

A study's data sets are moved to the device once; every model follows its data (:func:`batchgap.build.model`),
and every measurement follows the model (:mod:`batchgap.landscape`). Numbers differ between devices at float
rounding (and, through training, more), so each run records the device it trained on. On a GPU the dropout
stream is seeded per run like the CPU's, but a resumed run is not bitwise an uninterrupted one (the GPU's
generator state is not checkpointed) and cuDNN may pick nondeterministic kernels. The device kind, like the
torch thread count, is part of a run's id (:mod:`batchgap.plan`).
"""
from __future__ import annotations

import contextlib
import os
import platform
import sys

import torch

from . import machine
from .data.base import Dataset
from .errors import UserError

CHOICES = "auto, cpu, cuda or cuda:N"


def resolve(spec: str | torch.device | None = None) -> torch.device:
    """The device ``spec`` names (default: ``$BATCHGAP_DEVICE``, else ``auto``), checked to exist here.

    Args:
        spec: auto, cpu, cuda or cuda:N (as ``--device`` gives it), a ``torch.device`` (returned as it is), or
            None for ``$BATCHGAP_DEVICE``.

    Returns:
        the device; a one-line :class:`UserError` for one that cannot be used here, naming where the spec came
        from (``--device``, or ``BATCHGAP_DEVICE``). Cost: a CUDA query when a GPU is named."""
    if isinstance(spec, torch.device):
        return spec
    env = not spec and bool(os.environ.get("BATCHGAP_DEVICE", "").strip())
    spec = (spec or os.environ.get("BATCHGAP_DEVICE") or "auto").strip()
    name, given = ("BATCHGAP_DEVICE", f"BATCHGAP_DEVICE={spec}") if env else ("--device", f"--device {spec}")
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"{name}: unknown device {spec!r}; expected {CHOICES}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise UserError(f"{name}: {spec!r} is not supported; expected {CHOICES}")
    if not torch.cuda.is_available():
        use = "unset BATCHGAP_DEVICE or set it to cpu" if env else "use --device cpu"
        raise UserError(f"{given}: this torch ({torch.__version__}) sees no CUDA GPU; {use}")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise UserError(f"{given}: there are {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    return torch.device("cuda", index)


def describe(device: torch.device) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H100 80GB HBM3)``: what a run's protocol records."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def place(ds: Dataset, device: torch.device) -> Dataset:
    """``ds`` with its train and test tensors on ``device`` (itself when they are there already)."""
    if ds.train.device == device and ds.test.device == device:
        return ds
    return Dataset(ds.name, ds.train.to(device), ds.test.to(device), ds.num_classes, ds.input_shape, ds.info)


def of(ds: Dataset) -> torch.device:
    """The device a data set's tensors live on."""
    return ds.train.device


def fast_layout(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` itself, with its 4-D weights in channels_last when it has 2-D convolutions on the CPU.

    oneDNN's CPU convolutions run in NHWC: given NCHW tensors, every convolution converts its input,
    output and gradients, which costs a conv net more than its arithmetic on a small CPU (the measured
    training throughput is in docs/performance.md). The layout is a storage order, not a value: the model
    computes the same function, its state_dict holds the same values, and inputs in either layout work.
    On a GPU cuDNN chooses its own layout, so the model is left as it is. Idempotent.
    """
    convs = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    params = list(model.parameters())
    if convs and params and params[0].device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


def cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def num_threads(n: int):
    """Inside, torch uses ``n`` intra-op threads (a run's setting: its float rounding depends on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def environment(device: torch.device | None = None) -> dict:
    """The software and machine a study ran on, for its results."""
    import numpy as np
    import scipy

    from .version import __version__

    return {
        "batchgap": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "numpy": np.__version__, "scipy": scipy.__version__, "platform": platform.platform(),
        "processor": platform.machine(), "cpu_count": os.cpu_count(), "cores_available": cores(),
        "device": describe(device or torch.device("cpu")),
        "cpu_model": machine.cpu_model(), "kernels": machine.kernels(device),
    }
