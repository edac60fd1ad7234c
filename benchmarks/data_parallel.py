"""Data-parallel measurement (issue 27): one measurement on 1 and on 2 CPU processes at one thread each.

    python benchmarks/run.py data-parallel        # or: python benchmarks/data_parallel.py

The default MLP and the conv net ``cnn1d`` (3 x conv1d, BN, ReLU), each trained as ``harness.trained_mlp`` on
MNIST-1D's 4000 training examples; eps-sharpness (eps 1e-3, max_iter 10, full space) and the top-3 Hessian
eigenvalues, each called on every rank of a gloo group (``batchgap.eps_sharpness(model, data)`` as a torchrun
script calls it), evaluation batches of 1000 (4 batches: 2 per rank). The worlds alternate, ``REPEATS`` times
each, each in a fresh spawn with one thread for torch and for numpy/scipy's BLAS; a measurement's time is rank
0's wall time between two barriers (median of the repeats). Beside it: the seconds the ranks
spent in the all-reduce (``ranks.all_sum``, waits for the slower rank included) and the CPU seconds.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import load, mnist1d, row, trained_mlp  # noqa: E402

REPEATS = 3
MEASURES = ("eps-sharpness", "top-3 eigenvalues")
ARCHS = {"mlp": "default MLP", "cnn1d": "conv net cnn1d"}


def _worker(rank: int, world: int, store: str, arch: str, state: str, out: str) -> None:
    import resource

    import torch
    import torch.distributed as dist

    import batchgap
    from batchgap.landscape import ranks
    from batchgap.models import init_model

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = init_model(arch, (40,), 10, 0)
    model.load_state_dict(torch.load(state))
    data = mnist1d().train
    comm = [0.0]
    summed = ranks.all_sum

    def timed_sum(*values):
        t = time.perf_counter()
        try:
            return summed(*values)
        finally:
            comm[0] += time.perf_counter() - t

    ranks.all_sum = timed_sum
    runs = {"eps-sharpness": lambda: batchgap.eps_sharpness(model, data, eps=1e-3, max_iter=10).value,
            "top-3 eigenvalues": lambda: tuple(batchgap.hessian_eigenvalues(model, data, k=3).eigenvalues)}
    result = {}
    for name, run in runs.items():
        if world > 1:
            dist.barrier()
        comm[0] = 0.0
        cpu, t = resource.getrusage(resource.RUSAGE_SELF).ru_utime, time.perf_counter()
        value = run()
        if world > 1:
            dist.barrier()
        result[name] = {"wall": time.perf_counter() - t, "comm": comm[0],
                        "cpu": resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu, "value": value}
    cpus = [result] if world == 1 else [None] * world
    if world > 1:
        dist.all_gather_object(cpus, result)
        dist.destroy_process_group()
    if rank == 0:
        torch.save({"rank0": result, "ranks": cpus}, out)


def measure(world: int, arch: str, state: Path, tmp: Path, k: int) -> dict:
    import torch
    import torch.multiprocessing as mp

    out = tmp / f"out-{arch}-{world}-{k}.pt"
    mp.spawn(_worker, args=(world, str(tmp / f"store-{arch}-{world}-{k}"), arch, str(state), str(out)), nprocs=world,
             join=True)
    return torch.load(out, weights_only=False)


def rows(archs=tuple(ARCHS)) -> list[dict]:
    out = []
    for arch in archs:
        out += arch_rows(arch)
    return out


def arch_rows(arch: str) -> list[dict]:
    import os

    import torch

    # one thread each, numpy's and scipy's BLAS too: their threads (L-BFGS-B's vector work) otherwise let the one
    # process use ~1.7 cores (measured: eps-sharpness 4.3 CPU s in 2.6 s wall) and the two ranks compete for them
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"  # read by each spawned worker as it loads numpy
    start = load()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        torch.set_num_threads(1)
        torch.save(trained_mlp(mnist1d(), arch=arch).state_dict(), tmp / f"{arch}.pt")
        got = {1: [], 2: []}
        for k in range(REPEATS):
            for world in (1, 2):
                got[world].append(measure(world, arch, tmp / f"{arch}.pt", tmp, k))
    out = []
    for name in MEASURES:
        wall = {w: statistics.median(g["rank0"][name]["wall"] for g in got[w]) for w in got}
        comm = statistics.median(g["rank0"][name]["comm"] for g in got[2])
        v1, v2 = (got[w][0]["rank0"][name]["value"] for w in (1, 2))
        rel = max(abs(a - b) / abs(a) for a, b in zip(*(v if isinstance(v, tuple) else (v,) for v in (v1, v2))))
        speedup = wall[1] / wall[2]
        # CPU seconds: the one process's, and the busier rank's (the critical path were each on a core of its own)
        cpu1 = statistics.median(g["rank0"][name]["cpu"] for g in got[1])
        cpu2 = statistics.median(max(r[name]["cpu"] for r in g["ranks"]) for g in got[2])
        total2 = statistics.median(sum(r[name]["cpu"] for r in g["ranks"]) for g in got[2])
        out.append(row(f"{name}, {ARCHS[arch]}, 4000 examples: 2 processes against 1 (gloo, 1 thread each)",
                       f"{wall[2]:.2f} s on 2 processes", f"{wall[1]:.2f} s on 1", f"{speedup:.2f}x",
                       ">= 1.7x, same value", speedup >= 1.7 and rel < 1e-4,
                       f"values agree to {rel:.1e}; CPU s: 1 process {cpu1:.2f}, busier rank {cpu2:.2f} "
                       f"({cpu1 / cpu2:.2f}x), both ranks {total2:.2f}; rank 0 in the all-reduce (waits for the "
                       f"other rank included) {comm:.2f} s; {start} at the start, {load()} at the end"))
    return out


if __name__ == "__main__":
    for r in rows(tuple(sys.argv[1:]) or tuple(ARCHS)):
        print(" | ".join(str(v) for v in r.values()))
