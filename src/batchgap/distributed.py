"""Data-parallel training with PyTorch's DistributedDataParallel, under ``torchrun``.

    torchrun --nproc_per_node=4 -m batchgap run STUDY        # or: batchgap run STUDY --nproc 4

:func:`batchgap.train.train` trains data-parallel whenever a process group of two or more workers is
initialized (the CLI calls :func:`init_from_env` when torchrun started it). What a step does with
W workers, every choice stated:

- The global batch is the regime's ``batch_size`` B; the learning-rate rules use B. Every worker draws
  the SAME permutation from the run's seeded generator and takes its contiguous slice
  ``[rank * B/W, (rank + 1) * B/W)`` of each global batch, so the workers see disjoint shards of the
  very batches a single process would draw. B must be divisible by W. Augmentation, when asked, is
  drawn for the whole global batch on every worker (the generators stay in step) and then sliced.
- DDP averages the gradients, so the step is the one of the mean loss over the global batch.
- BatchNorm, by default: statistics per worker. That is ghost batch normalization with ghost size B/W
  (Hoffer et al. 2017). The running statistics are updated as :class:`~batchgap.remedies.GhostBatchNorm`
  updates them: one momentum update per worker's slice, in rank order (each worker all-gathers the
  per-worker means and variances), so every worker holds the same buffers and a run equals a single
  process training with ``ghost_bn(model, B // W)``: parameters and buffers.
  With ``train.bn_sync = true``: statistics of the whole global batch. Each BN layer all-reduces the
  per-channel sums, then the sums of squared deviations from the global mean (two passes, no
  cancellation), through an autograd function whose backward all-reduces the gradient; running
  statistics are updated with the global mean and unbiased variance. That equals a single process with
  ordinary BatchNorm on the global batch. (``nn.SyncBatchNorm`` does this on CUDA only.)
  Ghost BN layers already in the model (``train.ghost_batch``, :func:`~batchgap.remedies.ghost_bn` of
  size g) normalize ghost batches of g within each worker's slice and update the running statistics
  once per ghost batch, all workers' in rank order: the single-process ghost BN of g whenever g divides
  B/W (``bn_sync`` is refused for them: ghost batches and global statistics contradict each other).
  These layers keep the state-dict keys of ``nn.BatchNorm1d/2d``; they replace those layers only while
  :func:`train` runs and put the originals back afterwards, holding the trained tensors.
- Dropout: each worker draws its masks from its own stream, seeded from (seed, rank); with dropout a
  data-parallel run equals no single-process run.
- The logged batch loss is the global one (summed loss and counts all-reduced once per epoch).
- Rank 0 alone reads and writes files and evaluates; checkpoints it loads reach the other workers by
  broadcast, so nothing but the data needs to be on a shared file system.

Backends: gloo on the CPU, nccl when the run's device is a GPU (:func:`start_worker` picks it; each
worker then uses GPU ``LOCAL_RANK``). :func:`launch` (``--nproc N``) and :func:`start_worker` are the
one place the CLI and the study start and join a process group.
"""
from __future__ import annotations

import datetime
import inspect
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import UserError
from .remedies.ghost_bn import GhostBatchNorm, ghost_chunk_sizes

__all__ = [
    "GlobalBatchNorm", "WorkerBatchNorm", "active", "agree", "all_reduce_sum", "broadcast", "finish",
    "init_from_env", "launched", "local_batch_size", "rank", "world_size",
]

# Ranks wait for each other at most this long (rank 0 alone evaluates between epochs).
TIMEOUT = datetime.timedelta(hours=2)


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets its variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(backend: str = "gloo") -> int:
    """Join the process group torchrun describes in the environment; return the world size.

    A world of one worker is an ordinary single-process run: no group is made.
    """
    if dist.is_initialized():
        return dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=TIMEOUT)
    return world


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every worker (pickled); ``obj`` itself outside a group."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_device())
    return box[0]


def all_gather(obj: Any) -> list:
    """Every worker's ``obj``, in rank order."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def agree(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 alone; a :class:`UserError` it raises is raised on every worker, so all
    of them stop with the same one-line message instead of waiting for a rank that left."""
    error, value = None, None
    if is_main():
        try:
            value = fn()
        except UserError as e:
            error = str(e)
    error = broadcast(error)
    if error is not None:
        raise UserError(error)
    return value


def finish() -> None:
    """Wait for every worker, then leave the process group (the process goes on alone)."""
    if active():
        dist.barrier()
        dist.destroy_process_group()


def local_batch_size(batch_size: int) -> int:
    """The per-worker share of a global batch (a study's plan has checked that it divides evenly)."""
    w = world_size()
    if batch_size % w:
        raise ValueError(f"the global batch {batch_size} does not divide among {w} workers")
    return batch_size // w


def start_worker(device: torch.device) -> tuple[torch.device, str | None]:
    """In a process torchrun started: end with the torchrun agent that started it, whatever ends that
    (:func:`batchgap.lifecycle.die_with_parent`), and join its process group (nccl with each worker on GPU
    ``LOCAL_RANK`` when ``device`` is a GPU, else gloo).

    Args:
        device: the device the study asked for.

    Returns:
        (the worker's device, the torchrun command line that started it, for the record); outside torchrun
        ``(device, None)``. Cost: the process group's rendezvous."""
    if not launched():
        return device, None
    from . import lifecycle  # a rank ends with the torchrun agent that started it, however that ends

    lifecycle.die_with_parent(int(os.environ.get(lifecycle.PARENT_ENV) or os.getppid()))
    if device.type == "cuda":
        init_from_env("nccl")
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        init_from_env()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
    nodes = world_size() // max(1, per_node)
    return device, f"torchrun --nproc_per_node={per_node}" + (f" --nnodes={nodes}" if nodes > 1 else "") + " -m"


def launch(argv: list[str], nproc: int) -> int:
    """``batchgap ... --nproc N``: the same command, less ``--nproc``, under torchrun with N workers on
    this machine; each worker goes on as a data-parallel worker.

    torchrun is bound to this process (:mod:`batchgap.lifecycle`): killed, this process takes torchrun and
    its ranks with it; interrupted or terminated (SIGTERM), it passes SIGTERM on and waits for them (60 s,
    then SIGKILL) before the interrupt goes on.

    Args:
        argv: this process's command line (after the program name).
        nproc: the number of workers.

    Returns:
        torchrun's exit code. Cost: the whole data-parallel run."""
    import subprocess
    import sys

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-c", BIND, str(os.getpid()),  # bound to this process, then torchrun
           sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "batchgap", *_without_nproc(argv)]
    with subprocess.Popen(cmd, env=env) as proc:
        try:
            return proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM here: torchrun ends its ranks on SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise


# runs lifecycle.trampoline (not ``-m batchgap.lifecycle``: the package imports that module first, and runpy warns)
BIND = "import sys; from batchgap.lifecycle import trampoline; sys.exit(trampoline(sys.argv[1:]))"


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line less ``--nproc N`` (torchrun's own parser would take it for --nproc-per-node)."""
    out, skip = [], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip:
            skip = False
        elif len(name) >= 4 and "--nproc".startswith(name):  # --nproc, or a prefix argparse accepted
            skip = "=" not in arg
        else:
            out.append(arg)
    return out


def worker_seed(seed: int) -> int:
    """The seed of a worker's own random stream (dropout): the run's seed on rank 0."""
    return seed + rank() * 2**32


# ---------------------------------------------------------------------------------------- BatchNorm

class _AllReduceSum(torch.autograd.Function):
    """y = sum over workers of x, on every worker; the gradient is all-reduced the same way.

    With DDP averaging parameter gradients over W workers, this gives the exact gradient of the mean
    of the workers' losses: each worker's input affects every worker's output.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over workers (``x`` itself outside a group)."""
    return _AllReduceSum.apply(x) if active() else x


class _DistributedBN(_BatchNorm):
    """Shared plumbing: built from an existing BN layer holding the very same tensors; in eval mode,
    outside a process group, or with ``collective`` off, exactly ``nn.BatchNorm``. Subclasses define
    ``_forward_distributed``."""

    collective = True

    ghost_size: int | None = None

    @classmethod
    def replacing(cls, bn: _BatchNorm) -> "_DistributedBN":
        new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  track_running_stats=bn.track_running_stats)
        if isinstance(bn, GhostBatchNorm):
            new.ghost_size = bn.ghost_size
        for name in ("weight", "bias"):
            new._parameters[name] = bn._parameters[name]
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            new._buffers[name] = bn._buffers[name]
        new.train(bn.training)
        return new

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3, 4):
            raise ValueError(f"expected a 2-D, 3-D or 4-D input (N, C[, L] or N, C, H, W), got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.collective and active()):  # what the replaced layer would do
            return GhostBatchNorm.forward(self, input) if self.ghost_size else super().forward(input)
        self._check_input_dim(input)
        return self._forward_distributed(input)

    def _momentum(self) -> float:
        """Advance ``num_batches_tracked`` once and return the factor of this update (as nn.BatchNorm)."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum


def _dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


class WorkerBatchNorm(_DistributedBN):
    """Per-worker statistics (ghost BN with ghost size = per-worker batch, or the ghost size of the
    GhostBatchNorm it replaced, within the worker's slice); running statistics updated once per chunk,
    every worker's chunks in rank order, as GhostBatchNorm does for the chunks of a whole batch."""

    def _forward_distributed(self, input: torch.Tensor) -> torch.Tensor:
        n = input.shape[0]
        chunks = torch.split(input, ghost_chunk_sizes(n, self.ghost_size) if self.ghost_size else [n])
        out = [F.batch_norm(c, None, None, self.weight, self.bias, True, 0.0, self.eps) for c in chunks]
        if self.track_running_stats:
            with torch.no_grad():
                dims = _dims(input)
                local = torch.stack([torch.cat([c.mean(dims), c.var(dims, unbiased=True)]) for c in chunks])
                local = local.to(self.running_mean.dtype)
                parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, local)  # the same number of chunks on every worker: equal slices
                k = self.num_features
                for stats in torch.cat(parts):
                    m = self._momentum()
                    self.running_mean.mul_(1 - m).add_(stats[:k], alpha=m)
                    self.running_var.mul_(1 - m).add_(stats[k:], alpha=m)
        return out[0] if len(out) == 1 else torch.cat(out)


class GlobalBatchNorm(_DistributedBN):
    """Statistics of the whole global batch, all-reduced differentiably across workers."""

    def _forward_distributed(self, input: torch.Tensor) -> torch.Tensor:
        dims = _dims(input)
        shape = [1, self.num_features] + [1] * (input.dim() - 2)
        count = torch.tensor([input.numel() // self.num_features], dtype=torch.int64, device=input.device)
        dist.all_reduce(count)
        n = int(count.item())
        mean = all_reduce_sum(input.sum(dims)) / n
        centred = input - mean.view(shape)
        var = all_reduce_sum((centred * centred).sum(dims)) / n  # biased, as BN normalizes
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            if n < 2:
                raise ValueError("BatchNorm needs more than one value per channel in the global batch")
            with torch.no_grad():
                m = self._momentum()
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
        return out


def _swap(model: nn.Module, bn_sync: bool) -> list[tuple[nn.Module, str, nn.Module]]:
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if bn_sync and isinstance(child, GhostBatchNorm):
                raise UserError("train.bn_sync: the model has ghost BatchNorm layers (train.ghost_batch); "
                                "global-batch statistics and ghost batches exclude each other")
            if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d, GhostBatchNorm):
                setattr(parent, name, (GlobalBatchNorm if bn_sync else WorkerBatchNorm).replacing(child))
                swapped.append((parent, name, child))
    return swapped


@contextmanager
def data_parallel(model: nn.Module, bn_sync: bool = False) -> Iterator[nn.Module]:
    """``with data_parallel(model) as net:`` train ``net`` (a DDP wrapper of ``model``) on each
    worker's slice of the global batch. BN layers are swapped as the module docstring says for the
    duration of the block and put back after, holding the trained tensors. ``model`` on rank 0 can be
    evaluated inside the block under :func:`local_bn`."""
    from torch.nn.parallel import DistributedDataParallel

    swapped = _swap(model, bn_sync)
    try:
        device = next(model.parameters()).device
        ids = [device] if device.type == "cuda" else None
        # no broadcast of buffers from rank 0 each step (training normalizes by batch statistics; rank 0's running
        # statistics are the ones saved). torch >= 2.13 calls that forward_sync_buffers and warns on the old name;
        # it also copies rank 0's buffers once at init, which changes no number of rank 0's
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel)
                   .parameters else "broadcast_buffers")
        net = DistributedDataParallel(model, device_ids=ids, **{no_sync: False})
        yield net
    finally:
        for parent, name, original in swapped:
            current = getattr(parent, name)
            original.train(current.training)
            setattr(parent, name, original)


@contextmanager
def local_bn(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, the model's distributed BN layers behave as plain BN on this worker alone (for
    evaluation on rank 0 while the others wait): no collective, whatever the train/eval flags."""
    layers = [m for m in model.modules() if isinstance(m, _DistributedBN)]
    for m in layers:
        m.collective = False
    try:
        yield model
    finally:
        for m in layers:
            del m.collective  # back to the class default


def protocol(model: nn.Module, batch_size: int, bn_sync: bool, backend: str | None = None) -> dict:
    """What a data-parallel run did, for results.json."""
    w, local = world_size(), batch_size // world_size()
    ghosts = sorted({m.ghost_size for m in model.modules() if isinstance(m, GhostBatchNorm)})
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        bn = "no BatchNorm layers"
    elif ghosts and min(ghosts) < local:
        bn = (f"BN statistics per ghost batch of {', '.join(map(str, ghosts))} within each worker's "
              f"per-worker batch {local}")
    elif bn_sync:
        bn = f"BN statistics of the global batch {batch_size} (sums all-reduced across {w} workers)"
    else:
        bn = f"BN statistics per worker (ghost batch = per-worker batch {local})"
    return {
        "world_size": w, "backend": backend or dist.get_backend(), "global_batch": batch_size,
        "per_worker_batch": local, "bn": bn,
        "data": "one seeded permutation on every worker; worker r takes slice r of each global batch",
        "dropout": "one random stream per worker, seeded from (seed, rank)",
    }
