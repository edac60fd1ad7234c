"""Data sets as tensors in memory: the built-in loaders, the data directory, augmentation.

The data directory is the ``data_dir`` argument, else the environment variable ``BATCHGAP_DATA``, else
``~/.cache/batchgap/data``. Each data set keeps its files in ``DATA_DIR/<name>/``: ``mnist/`` the four
official idx ``.gz`` files, ``cifar10/cifar-10-python.tar.gz``, ``cifar100/cifar-100-python.tar.gz``,
``mnist1d/`` a cache of the generated arrays. ``batchgap data download NAME`` fetches them.
"""
from .augment import AUGMENTATIONS, check_augment, make_augment
from .base import Dataset, DatasetSpec, DictData, TensorData
from .files import CHECKSUMS, resolve_data_dir
from .registry import DATASETS, DatasetRow, download, list_datasets, load_dataset

__all__ = [
    "AUGMENTATIONS",
    "CHECKSUMS",
    "DATASETS",
    "Dataset",
    "DatasetRow",
    "DatasetSpec",
    "DictData",
    "TensorData",
    "check_augment",
    "download",
    "list_datasets",
    "load_dataset",
    "make_augment",
    "resolve_data_dir",
]
