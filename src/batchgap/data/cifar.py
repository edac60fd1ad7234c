"""CIFAR-10 and CIFAR-100, read straight from the official python archives (no extraction).

``DATA_DIR/cifar10/cifar-10-python.tar.gz`` holds ``cifar-10-batches-py/data_batch_1..5`` and
``test_batch``; ``DATA_DIR/cifar100/cifar-100-python.tar.gz`` holds ``cifar-100-python/train`` and
``test``. Each member is a (Python 2) pickled dict with ``b"data"``, a uint8 array (N, 3072) of
channel-major 32x32 RGB images, and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100).
Pixels are divided by 255 and nothing else (as the paper): float32 in [0, 1], shape (N, 3, 32, 32).

Members are unpickled only after the archive's md5 has been checked, and by an unpickler that accepts
nothing but plain containers and numpy arrays.
"""
from __future__ import annotations

import codecs
import io
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .base import Dataset, TensorData
from .files import CHECKSUMS, Remote, corrupt, ensure

SHAPE = (3, 32, 32)
BASE_URL = "https://www.cs.toronto.edu/~kriz/"


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its splits inside its archive, and which label key it uses."""

    remote: Remote
    train_members: tuple[str, ...]
    test_members: tuple[str, ...]
    label_key: bytes
    num_classes: int


CIFAR10 = CifarLayout(
    remote=Remote("cifar10", BASE_URL, ("cifar-10-python.tar.gz",)),
    train_members=tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)),
    test_members=("cifar-10-batches-py/test_batch",),
    label_key=b"labels",
    num_classes=10,
)
CIFAR100 = CifarLayout(
    remote=Remote("cifar100", BASE_URL, ("cifar-100-python.tar.gz",)),
    train_members=("cifar-100-python/train",),
    test_members=("cifar-100-python/test",),
    label_key=b"fine_labels",
    num_classes=100,
)


class CifarError(ValueError):
    """An archive member that is missing or not a CIFAR batch."""


# What a CIFAR batch pickle may reference: numpy's array reconstruction under its old and new module names,
# and codecs.encode, which protocol-2 pickles written by Python 3 use to rebuild bytes.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_SCALAR = np.float64(0).__reduce__()[0]
_ALLOWED = {
    **{(m, "_reconstruct"): _RECONSTRUCT for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _SCALAR for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise CifarError(f"pickle references {module}.{name}, which a CIFAR batch never does") from None


def parse_batch(raw: bytes, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one pickled batch, validated."""
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except CifarError:
        raise
    except Exception as e:  # a damaged pickle can fail in many ways (EOFError, UnpicklingError, ...)
        raise CifarError(f"unreadable pickle: {type(e).__name__}") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise CifarError(f"a batch must be a dict with b'data' and {label_key!r}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    size = int(np.prod(SHAPE))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != size:
        raise CifarError(f"data is {data.dtype} {data.shape}, expected uint8 (N, {size})")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise CifarError(f"{labels.shape} labels of type {labels.dtype} for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise CifarError(f"labels outside 0..{num_classes - 1}")
    return data.reshape(-1, *SHAPE), labels.astype(np.int64)


def _read_split(archive: tarfile.TarFile, members: tuple[str, ...], layout: CifarLayout) -> TensorData:
    images, labels = [], []
    for name in members:
        try:
            f = archive.extractfile(name)
        except KeyError:
            raise CifarError(f"member {name} missing") from None
        if f is None:
            raise CifarError(f"member {name} is not a file")
        try:
            x, y = parse_batch(f.read(), layout.label_key, layout.num_classes)
        except CifarError as e:
            raise CifarError(f"{name}: {e}") from None
        images.append(x)
        labels.append(y)
    x = torch.from_numpy(np.concatenate(images)).float().div_(255.0)
    return TensorData(x, torch.from_numpy(np.concatenate(labels)))


def read_archive(path: Path, layout: CifarLayout) -> tuple[TensorData, TensorData]:
    """The train and test splits inside a CIFAR archive; a defect raises :class:`CifarError`."""
    try:
        with tarfile.open(path, "r:gz") as archive:
            return _read_split(archive, layout.train_members, layout), _read_split(
                archive, layout.test_members, layout
            )
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise CifarError(f"not a complete tar.gz archive: {e}") from None


def load_cifar(layout: CifarLayout, data_dir: Path, download: bool = False, base_url: str | None = None) -> Dataset:
    """One CIFAR variant from ``data_dir/<name>/``; its archive is fetched first when ``download``."""
    name = layout.remote.dataset
    (path,) = ensure(layout.remote, data_dir, download, base_url)
    try:
        train, test = read_archive(path, layout)
    except CifarError as e:
        raise corrupt(path, name, str(e)) from None
    return Dataset(
        name=name,
        train=train,
        test=test,
        num_classes=layout.num_classes,
        input_shape=SHAPE,
        info={
            "directory": str(layout.remote.directory(data_dir)),
            "files": {path.name: CHECKSUMS[path.name]},
            "scaling": "pixels / 255",
        },
    )


def load_cifar10(data_dir: Path, download: bool = False, base_url: str | None = None) -> Dataset:
    """CIFAR-10 (50k train / 10k test, 10 classes)."""
    return load_cifar(CIFAR10, data_dir, download, base_url)


def load_cifar100(data_dir: Path, download: bool = False, base_url: str | None = None) -> Dataset:
    """CIFAR-100 (50k train / 10k test, 100 fine classes)."""
    return load_cifar(CIFAR100, data_dir, download, base_url)
