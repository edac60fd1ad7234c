"""The built-in data sets by name: loading, downloading and listing them.

Files live in ``DATA_DIR/<name>/`` under their official names, where ``DATA_DIR`` is the ``data_dir``
argument, else ``$BATCHGAP_DATA``, else ``~/.cache/batchgap/data`` (see :mod:`batchgap.data.files`).
MNIST-1D is generated offline and only caches its arrays there.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from ..errors import one_of
from .base import Dataset, DatasetSpec
from .cifar import CIFAR10, CIFAR100, load_cifar10, load_cifar100
from .files import Remote, ensure, resolve_data_dir
from .mnist import REMOTE as MNIST_REMOTE
from .mnist import load_mnist
from .mnist1d import load_mnist1d

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("mnist1d", "MNIST-1D: 4000/1000 signals of 40 features, 10 classes (the default)",
                    load_mnist1d, needs_files=False),
        DatasetSpec("mnist", "MNIST: 60000/10000 images 1x28x28, 10 classes (network F1)",
                    load_mnist, needs_files=True),
        DatasetSpec("cifar10", "CIFAR-10: 50000/10000 images 3x32x32, 10 classes (networks C1, C2)",
                    load_cifar10, needs_files=True),
        DatasetSpec("cifar100", "CIFAR-100: 50000/10000 images 3x32x32, 100 classes (networks C3, C4)",
                    load_cifar100, needs_files=True),
    )
}

REMOTES: dict[str, Remote] = {r.dataset: r for r in (MNIST_REMOTE, CIFAR10.remote, CIFAR100.remote)}


class DatasetRow(NamedTuple):
    """One row of ``batchgap list``'s data sets."""

    name: str
    description: str
    needs_files: bool


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise one_of("dataset", name, DATASETS)
    return DATASETS[name]


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = False) -> Dataset:
    """The data set ``name`` as tensors in memory; its files are fetched first when ``download``.

    Image pixels are divided by 255 (the paper's only preprocessing); files are checked by md5 before use. An
    unknown name or missing files raise :class:`UserError` (one line naming the choices or the command).

    Args:
        name: ``"mnist1d"`` (generated offline, the default study's), ``"mnist"``, ``"cifar10"`` or
            ``"cifar100"`` (``batchgap list`` shows them).
        data_dir: where the files live; None for ``$BATCHGAP_DATA``, else ``~/.cache/batchgap/data``.
        download: fetch missing files from the official mirror first.

    Returns:
        A :class:`Dataset`: ``train`` and ``test`` as :class:`TensorData`, ``num_classes``, ``input_shape`` and
        ``info`` (the files and their checksums, or the generator's arguments).

    Cost:
        One read (and, with ``download``, one fetch) of the files; the whole data set is held in memory.
    """
    return _spec(name).loader(resolve_data_dir(data_dir), download)


def download(name: str, data_dir: str | os.PathLike | None = None, base_url: str | None = None) -> list[Path]:
    """Fetch the official files of ``name`` into ``DATA_DIR/<name>/``; return their paths.

    Files already there with the right md5 are kept. ``base_url`` replaces the official mirror (the
    file names are appended to it). MNIST-1D needs no download: the result is then ``[]``.
    """
    _spec(name)
    if name not in REMOTES:
        return []
    return ensure(REMOTES[name], resolve_data_dir(data_dir), download=True, base_url=base_url)


def list_datasets() -> list[DatasetRow]:
    """One row per built-in data set: name, description, whether it needs downloaded files."""
    return [DatasetRow(s.name, s.description, s.needs_files) for s in DATASETS.values()]
