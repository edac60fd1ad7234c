"""What every benchmark module shares: timing, the row format, threads, the data and the trained model.

benchmarks/run.py (the command) and benchmarks/peers.py (the rows against the peer libraries) both import
this module, and it imports neither: the benchmarks' imports form a tree (tests/test_benchmarks.py).

Other processes share this machine's cores, so every number a benchmark prints is a RATIO against a
baseline measured in the same process, the two interleaved and repeated (median of the repeats), with
the load average printed beside it.
"""
from __future__ import annotations

import os
import statistics
import time


def load() -> str:
    """The 1- and 5-minute load averages, for a row's note."""
    return "load {:.1f}/{:.1f}".format(*os.getloadavg()[:2])


def timed(fn, clock=time.perf_counter) -> float:
    """Seconds one call of ``fn`` takes on ``clock``."""
    t = clock()
    fn()
    return clock() - t


def interleaved(fns: dict, repeats: int = 3, clock=time.perf_counter) -> dict:
    """Median seconds of each function, the functions run in turn ``repeats`` times."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn, clock))
    return {k: statistics.median(v) for k, v in times.items()}


def row(benchmark, value, baseline, ratio, target, met, note="") -> dict:
    """One line of the printed table."""
    return {"benchmark": benchmark, "value": value, "baseline": baseline, "ratio": ratio, "target": target,
            "met": met, "note": note}


def set_threads(n: int) -> None:
    """torch's intra-op thread count."""
    import torch

    torch.set_num_threads(n)


def mnist1d():
    """MNIST-1D as batchgap loads it (generated once into the data directory)."""
    from batchgap.data import load_dataset

    return load_dataset("mnist1d")


def synthetic_cifar(n: int):
    """``n`` CIFAR-shaped images (uniform noise) and labels, seeded: for throughput, not accuracy."""
    import torch
    from batchgap.data.base import TensorData

    g = torch.Generator().manual_seed(0)
    return TensorData(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))


def trained_mlp(ds, epochs=3, arch="mlp"):
    """The default MLP (seed 0; or another MNIST-1D ``arch``, e.g. ``"cnn1d"``) trained ``epochs`` epochs at batch
    400 on ``ds.train``: the model of the measurement rows."""
    from batchgap.config import TrainConfig
    from batchgap.models import init_model
    from batchgap.train import train

    m = init_model(arch, (40,), 10, 0)
    train(m, ds.train, None, TrainConfig(epochs=epochs), 400, seed=0, progress=False)
    return m


def _matmul_flops(n_threads: int, n: int = 2048, reps: int = 5) -> float:
    import torch

    set_threads(n_threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(reps))
    set_threads(1)
    return 2 * n**3 / best


PEAK: dict = {}


def matmul_peak(n_threads: int = 1) -> float:
    """float32 FLOP/s of a 2048^3 matmul with ``n_threads`` threads (best of 5; measured once per process)."""
    if n_threads not in PEAK:
        PEAK[n_threads] = _matmul_flops(n_threads)
    return PEAK[n_threads]
