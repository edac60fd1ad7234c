"""The fixed measurement set of :func:`batchgap.track`: all of the data given, or a seeded subset of stated size.

Every measurement of a tracker reads the same rows in the same order, so the numbers along training differ by
the parameters alone. A subset is drawn once, by a ``torch.Generator`` seeded with the tracker's seed (never the
global RNG): ``torch.randperm(n)[:size]``, sorted, for data with a length (tensor pairs, TensorData,
TensorDataset, map-style datasets, and DataLoaders over them, re-batched in order with the loader's own
``collate_fn``); the first ``size`` rows of one pass, kept in memory, for an iterable without a length.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler, Subset, TensorDataset
from torch.utils.data import Dataset as TorchDataset

from ..landscape.objective import batch_rows


def _pair(data):
    """``(x, y)`` when ``data`` is a tensor pair, a TensorData or a two-tensor TensorDataset, else None."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        return tuple(data)
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        return tuple(data.tensors)
    if not isinstance(data, (TorchDataset, DataLoader)) and torch.is_tensor(getattr(data, "x", None)) and \
            torch.is_tensor(getattr(data, "y", None)):
        return data.x, data.y
    return None


def _indices(n: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:size].sort().values


def _drawn(n: int, idx: torch.Tensor, seed: int) -> dict:
    digest = hashlib.sha256(idx.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    return dict(rows=len(idx), of=n, seed=seed, indices_sha256=digest,
                selection=f"seeded subset: torch.randperm({n}) from a torch.Generator seeded {seed}, its first "
                          f"{len(idx)}, in data order")


def _head(batch, rows: int):
    """The first ``rows`` rows of a batch (every tensor with a first dimension cut)."""
    if torch.is_tensor(batch):
        return batch[:rows] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return {k: _head(v, rows) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        cut = [_head(v, rows) for v in batch]
        return tuple(cut) if isinstance(batch, tuple) else cut
    return batch


def measurement_set(data, subset: int | None, seed: int) -> tuple[object, dict]:
    """``(the data every measurement reads, its description for the records)``.

    Args:
        data: a tensor pair, TensorData, TensorDataset, map-style dataset, DataLoader or re-iterable of batches.
        subset: None for all of ``data``, else the number of rows to draw.
        seed: seeds the draw.

    Returns:
        The measurement data and a dict (``rows``, ``selection`` and, for a seeded draw, ``of``, ``seed`` and the
        indices' sha256).

    Cost: one pass over ``data`` for an iterable without a length (to count or keep its rows), else none.
    """
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset < 1):
        raise ValueError(f"subset must be None (all the data) or a positive number of rows, not {subset!r}")
    if (pair := _pair(data)) is not None:
        x, y = pair
        if len(x) != len(y):
            raise ValueError(f"inputs have {len(x)} rows but targets have {len(y)}")
        n = len(y)
        if subset is None or subset >= n:
            return (x, y), dict(rows=n, selection="all")
        idx = _indices(n, subset, seed)
        return (x[idx], y[idx]), _drawn(n, idx, seed)
    if isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset):
        n = len(data.dataset)
        if subset is None and isinstance(data.sampler, SequentialSampler) and not data.drop_last:
            return data, dict(rows=n, selection="all (the DataLoader in its order)")
        idx = _indices(n, n if subset is None else min(subset, n), seed)
        loader = DataLoader(Subset(data.dataset, idx.tolist()), batch_size=data.batch_size or 1,
                            collate_fn=data.collate_fn)
        info = _drawn(n, idx, seed) if len(idx) < n else dict(rows=n, selection="all")
        info["selection"] += " (the DataLoader's dataset re-batched in order with its collate_fn)"
        return loader, info
    if isinstance(data, TorchDataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
        n = len(data)
        if subset is None or subset >= n:
            return data, dict(rows=n, selection="all")
        idx = _indices(n, subset, seed)
        return Subset(data, idx.tolist()), _drawn(n, idx, seed)
    try:
        one_shot = iter(data) is data
    except TypeError:
        raise TypeError(f"data of type {type(data).__name__} is not iterable: pass a tensor pair, a TensorData, a "
                        "dataset, a DataLoader or a list of batches") from None
    if subset is None:
        if one_shot:
            raise TypeError(f"data is a one-shot iterator ({type(data).__name__}), but every measurement reads the "
                            "data again: pass a list of batches, a DataLoader or a dataset, or subset=N to keep the "
                            "first N rows of one pass")
        return data, dict(rows=sum(batch_rows(b) for b in data), selection="all (the iterable in its order)")
    kept, rows = [], 0
    for batch in data:
        r = batch_rows(batch)
        kept.append(batch if rows + r <= subset else _head(batch, subset - rows))
        rows += min(r, subset - rows)
        if rows >= subset:
            break
    if not kept:
        raise ValueError("the data yielded no batch")
    return kept, dict(rows=rows, selection=f"the first {rows} rows of one pass over the data, kept in memory (an "
                                           "iterable without a length has no seeded subset)")
