"""Data sets as tensors in memory."""
from .base import Dataset, DatasetSpec, TensorData

__all__ = ["Dataset", "DatasetSpec", "TensorData"]
