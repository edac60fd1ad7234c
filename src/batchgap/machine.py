"""The machine a run computed on: its CPU model and the kernel family behind its float arithmetic.

A run is bitwise reproducible on the machine that ran it. On another CPU model, or the same torch linked
to other kernels (MKL or OpenBLAS, another vector width, oneDNN for fp32 matmuls), a run's last digits may
differ, and through training more. So each run records :func:`cpu_model` and :func:`kernels` beside its
thread count and device (``RunResult.cpu``, ``RunResult.kernels``); neither is part of a run's id, so an
output directory resumed on another machine keeps its finished runs. :func:`note` is the one line a study
says when the runs of one output were computed on more than one machine, and :func:`summary` lists them
for the report's header.
"""
from __future__ import annotations

import functools
import platform
import re
from collections import Counter
from typing import Iterable

import torch

UNRECORDED = "machine not recorded (runs of an earlier batchgap)"


@functools.lru_cache(maxsize=1)
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                # x86: "model name"; some ARM kernels: "Hardware", "Processor", "cpu model" (MIPS)
                if key.strip().lower() in ("model name", "hardware", "processor", "cpu model") and \
                        value.strip() and not value.strip().isdigit():
                    return " ".join(value.split())
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_model() -> str:
    """The CPU model of this machine, as the operating system names it.

    ``/proc/cpuinfo``'s ``model name`` (x86; ``Hardware`` or ``Processor`` on ARM) on Linux, else
    ``platform.processor()``, else ``platform.machine()``.

    Returns:
        e.g. ``"Intel(R) Xeon(R) Processor @ 2.80GHz"``; ``"unknown CPU"`` when nothing says.

    Cost: one read of ``/proc/cpuinfo``, once per process (cached).
    """
    return _cpu_model()


def _field(text: str, pattern: str) -> str | None:
    m = re.search(pattern, text)
    return m.group(1) if m else None


@functools.lru_cache(maxsize=4)
def _cpu_kernels() -> str:
    config = torch.__config__.show()
    blas = _field(config, r"BLAS_INFO=([^,\s]+)") or "unknown"
    lapack = _field(config, r"LAPACK_INFO=([^,\s]+)")
    mkl = _field(config, r"Math Kernel Library Version ([0-9.]+)") if torch.backends.mkl.is_available() else None
    parts = [f"BLAS {blas}" + (f" (MKL {mkl})" if mkl and blas == "mkl" else "")]
    if lapack:
        parts.append(f"LAPACK {lapack}")
    onednn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    if onednn:
        version = _field(config, r"MKL-DNN v([0-9.]+)")
        parts.append("oneDNN" + (f" {version}" if version else ""))
    # fp32 matmuls go to oneDNN on ARM (its Compute Library) or when a lower fp32 precision is allowed
    precision = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", "none")
    arm = platform.machine().lower() in ("aarch64", "arm64")
    via = "oneDNN" if onednn and (arm or precision not in ("none", "ieee")) else "BLAS"
    parts.append(f"fp32 matmul on {via}" + (f" ({precision})" if precision not in ("none", "ieee") else ""))
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()
    if capability:
        parts.append(f"{capability} kernels")
    return ", ".join(parts)


def kernels(device: torch.device | None = None) -> str:
    """The kernel family this torch computes with on ``device``: what decides the rounding of a matmul.

    On the CPU, parsed from ``torch.__config__.show()`` and ``torch.backends``: the BLAS and LAPACK torch
    was built with (``BLAS_INFO``, ``LAPACK_INFO``; MKL's version), oneDNN (``torch.backends.mkldnn``) and
    whether fp32 matmuls go to it (on ARM, or with ``torch.backends.mkldnn.matmul.fp32_precision`` lowered)
    or to BLAS, and the vector width of torch's own kernels (``torch.backends.cpu.get_cpu_capability()``).
    On a GPU: CUDA's and cuDNN's versions (the GPU itself is in the run's ``device``).

    Args:
        device: where the run computes; None for the CPU.

    Returns:
        e.g. ``"BLAS mkl (MKL 2024.2), LAPACK mkl, oneDNN 3.12.0, fp32 matmul on BLAS, AVX512 kernels"``.

    Cost: one ``torch.__config__.show()`` per process (cached).
    """
    if device is not None and device.type == "cuda":
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        return f"CUDA {torch.version.cuda}" + (f", cuDNN {cudnn}" if cudnn else "")
    return _cpu_kernels()


def _label(cpu: str | None, kernels_: str | None) -> str:
    if cpu is None:
        return UNRECORDED
    return f"{cpu} ({kernels_ or 'kernels not recorded'})"


def summary(runs: Iterable) -> list[tuple[str, int]]:
    """Every machine that computed ``runs``, with how many runs it computed, most runs first.

    A machine is a CPU model, its kernel family, the torch thread count and the device: the four things
    recorded with each run (``RunResult.cpu``, ``kernels``, ``threads``, ``device``) that its last digits
    depend on. Runs of a batchgap that recorded no CPU model count under :data:`UNRECORDED`.

    Args:
        runs: :class:`batchgap.results.RunResult` objects (anything with those four attributes).

    Returns:
        ``[(label, runs), ...]``, e.g. ``("Intel(R) Xeon(R) ... (BLAS mkl, ...), 1 thread(s), cpu", 8)``.

    Cost: one pass over ``runs``.
    """
    counts = Counter(f"{_label(getattr(r, 'cpu', None), getattr(r, 'kernels', None))}, "
                     f"{r.threads} thread(s), {r.device}" for r in runs)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def note(runs: Iterable) -> str | None:
    """The one line a study prints when its output's runs were computed on more than one CPU model or
    kernel family (each run's ``cpu`` and ``kernels``), else None. Runs that recorded no machine (an older
    batchgap) are left out: nothing says they differ.

    Args:
        runs: :class:`batchgap.results.RunResult` objects.

    Returns:
        e.g. ``"note: the runs of this output were computed on 2 machines: A (...) (8 runs), B (...) (2
        runs); their last digits may differ"``, or None.

    Cost: one pass over ``runs``.
    """
    counts = Counter(_label(r.cpu, r.kernels) for r in runs if getattr(r, "cpu", None) is not None)
    if len(counts) < 2:
        return None
    named = ", ".join(f"{label} ({n} run{'s' if n != 1 else ''})"
                      for label, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return (f"note: the runs of this output were computed on {len(counts)} machines (CPU model and kernels): "
            f"{named}; their last digits may differ")
