"""Data-parallel measurement: which batches this process reads, and the sums every process then holds.

Under ``torch.distributed`` (a process group initialized, world size W > 1, any backend: gloo on CPUs, NCCL
on GPUs), every full-data pass reads only this rank's share of the data's batches: batch i (in the order
:func:`evaluate.batches` gives them) belongs to rank ``i % W``, whatever the batch count (it need not divide
by W; every rank needs at least one batch). The sums a pass makes (loss sums, unit counts, gradients, HVPs,
BatchNorm moments, per-unit squares) are then summed over the ranks (:func:`all_sum`), so every rank holds the
same value, bit for bit, and any solver driven by them (Lanczos, L-BFGS-B) runs identically everywhere. This
is the one place that knows about ranks: :class:`functional.FullDataLoss`, :func:`evaluate.evaluate`,
:func:`evaluate.recompute_bn_statistics` and the per-example passes (:mod:`pergrad`, :mod:`noise`,
:mod:`norms`) call it; no measure does. The value equals one process's up to the order of float additions.

The ranks must see the same data: the first pass of each reader compares a hash of the data's length and
first batch across ranks and refuses a mismatch with one line. Code that runs on ONE rank while a group
exists (rank 0 evaluating between training epochs) wraps itself in :func:`alone`.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist

_alone = [0]  # depth of alone() blocks: inside one, this process measures by itself


@contextmanager
def alone() -> Iterator[None]:
    """Measure in this process alone for the body, even under a process group (nothing is sharded or summed)."""
    _alone[0] += 1
    try:
        yield
    finally:
        _alone[0] -= 1


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the measurement: ``(0, 1)`` without a group of several processes or in
    :func:`alone`."""
    if _alone[0] or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def fields() -> dict:
    """The protocol's record of how a measurement was computed: ``world_size`` and ``backend`` (None alone)."""
    _, size = world()
    return dict(world_size=size, backend=str(dist.get_backend()) if size > 1 else None)


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(*values):
    """Each value (a tensor, or a Python number) summed over the ranks, in float64, as one collective; returned
    in the given kinds (tensors keep their shapes, devices; numbers come back as floats, ints as ints).
    Alone: the values themselves."""
    if world()[1] == 1:
        return values[0] if len(values) == 1 else values
    flat = [torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in values]
    device = _device()
    buf = torch.cat([f.to(device) for f in flat])
    dist.all_reduce(buf)
    out, at = [], 0
    for v, f in zip(values, flat):
        part = buf[at : at + f.numel()]
        at += f.numel()
        if torch.is_tensor(v):
            out.append(part.reshape(v.shape).to(device=v.device, dtype=v.dtype))
        else:
            out.append(int(round(float(part))) if isinstance(v, int) else float(part))
    return out[0] if len(out) == 1 else tuple(out)


def gather(obj) -> list:
    """Every rank's ``obj`` (picklable; tensors on the CPU), in rank order; ``[obj]`` alone."""
    if world()[1] == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _digest(value, h) -> None:
    if torch.is_tensor(value):  # dtype, shape and the first 4096 entries (copied to the CPU alone)
        h.update(f"{value.dtype}{tuple(value.shape)}".encode())
        t = value.detach().reshape(-1)[:4096].cpu().contiguous()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(str(k).encode())
            _digest(value[k], h)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _digest(v, h)
    else:
        h.update(repr(value).encode())


def fingerprint(first_batch, length) -> str:
    """A hash of a data argument as one rank sees it: its length (None when unsized) and first batch."""
    h = hashlib.sha256(repr(length).encode())
    _digest(first_batch, h)
    return h.hexdigest()


def check_same(value: str, what: str) -> None:
    """Refuse, on every rank alike, when the ranks' ``value`` differ (one collective)."""
    seen = gather(value)
    if len(set(seen)) > 1:
        differ = [r for r, v in enumerate(seen) if v != seen[0]]
        raise ValueError(f"data-parallel measurement: the processes were given different {what} (rank(s) "
                         f"{differ} differ from rank 0); pass every rank the same data, it shards them itself")


def share(count: int, batch_size: int) -> None:
    """Refuse (on every rank alike) a pass of ``count`` batches that leaves a rank without one."""
    _, size = world()
    if 0 < count < size:
        raise ValueError(f"data-parallel measurement over {size} processes needs at least {size} batches, the "
                         f"data makes {count} of batch_size {batch_size}: lower batch_size or the process count")


def spread(fn, items) -> list:
    """``[fn(item) for item in items]``, item j computed by rank ``j % W`` alone (:func:`alone`) and gathered,
    so every rank holds every result: independent small problems (the m-sharpness batches). An error on any
    rank is raised on every rank."""
    rank, size = world()
    if size == 1:
        return [fn(item) for item in items]
    mine, error = {}, None
    try:
        with alone():
            mine = {j: fn(item) for j, item in enumerate(items) if j % size == rank}
    except Exception as err:  # noqa: BLE001 - raised below on every rank, not only this one
        error = err
    shares = gather((error, mine))
    for err, _ in shares:
        if err is not None:
            raise err
    done = {j: value for _, part in shares for j, value in part.items()}
    return [done[j] for j in range(len(items))]
