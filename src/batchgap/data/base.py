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


@dataclass
class Dataset:
    """A train/test pair with what a model factory needs to know about it."""

    name: str
    train: TensorData
    test: TensorData
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
