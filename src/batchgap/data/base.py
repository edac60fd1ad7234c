"""Data sets held as tensors in memory, and the registry every loader joins."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class TensorData:
    """Inputs and integer class targets, one row per example."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} rows but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: torch.Tensor | slice) -> "TensorData":
        return TensorData(self.x[indices], self.y[indices])

    def to(self, device: torch.device | str) -> "TensorData":
        return TensorData(self.x.to(device), self.y.to(device))

    def as_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y

    @property
    def device(self) -> torch.device:
        return self.x.device


@dataclass
class DictData:
    """Named columns of tensors (``input_ids``, ``attention_mask``, ``labels``, ...), one row per example;
    every measure and the training loop read it as dict batches of rows (an objective turns them into a loss:
    :mod:`batchgap.landscape.objective`)."""

    columns: dict

    def __post_init__(self) -> None:
        if not isinstance(self.columns, dict) or not self.columns:
            raise ValueError("DictData needs a non-empty dict of tensors (column name -> tensor, one row per example)")
        rows = {k: len(v) if torch.is_tensor(v) and v.dim() > 0 else None for k, v in self.columns.items()}
        if None in rows.values() or len(set(rows.values())) != 1:
            raise ValueError(f"DictData columns must be tensors with the same number of rows, got {rows}")

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def subset(self, indices: torch.Tensor | slice) -> "DictData":
        return DictData({k: v[indices] for k, v in self.columns.items()})

    def to(self, device: torch.device | str) -> "DictData":
        return DictData({k: v.to(device) for k, v in self.columns.items()})

    @property
    def device(self) -> torch.device:
        return next(iter(self.columns.values())).device


@dataclass
class Dataset:
    """A train/test pair with what a model factory needs to know about it."""

    name: str
    train: TensorData | DictData
    test: TensorData | DictData
    num_classes: int
    input_shape: tuple[int, ...]
    info: dict = field(default_factory=dict)  # provenance: files, checksums, generator arguments


@dataclass(frozen=True)
class DatasetSpec:
    """A built-in data set: its name, a line about it, its loader, whether it needs downloaded files."""

    name: str
    description: str
    loader: Callable[..., Dataset]  # loader(data_dir: Path, download: bool) -> Dataset
    needs_files: bool  # False for data generated offline (MNIST-1D)
