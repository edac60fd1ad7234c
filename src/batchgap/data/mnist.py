"""MNIST from the four official gzipped idx files in ``DATA_DIR/mnist/``.

The idx format: a big-endian 4-byte magic number (2051 for a uint8 image array of 3 dimensions, 2049 for
a uint8 label vector), one big-endian uint32 per dimension, then the data, row-major. Pixels are divided
by 255 and nothing else (as the paper), giving float32 in [0, 1] of shape (N, 1, 28, 28).
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from .base import Dataset, TensorData
from .files import CHECKSUMS, Remote, corrupt, ensure

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
SIDE = 28
NUM_CLASSES = 10

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"

REMOTE = Remote(
    dataset="mnist",
    base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
    filenames=(TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS),
)


class IdxError(ValueError):
    """A file that is not a well-formed idx file of the expected kind."""


def parse_idx(raw: bytes, magic: int, ndim: int) -> np.ndarray:
    """The uint8 array in an (uncompressed) idx file, after checking its magic number and length."""
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"{len(raw)} bytes, shorter than the {header}-byte header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise IdxError(f"magic number {found}, expected {magic}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims, dtype=np.int64))
    if len(raw) != header + size:
        raise IdxError(f"{len(raw) - header} data bytes, dimensions {dims} need {size}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse a gzipped idx file; any defect raises :class:`IdxError` with the reason."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise IdxError(f"not a complete gzip file: {e}") from None
    return parse_idx(raw, magic, ndim)


def _split(image_path: Path, label_path: Path) -> TensorData:
    try:
        images = read_idx(image_path, IMAGES_MAGIC, 3)
    except IdxError as e:
        raise corrupt(image_path, REMOTE.dataset, str(e)) from None
    try:
        labels = read_idx(label_path, LABELS_MAGIC, 1)
    except IdxError as e:
        raise corrupt(label_path, REMOTE.dataset, str(e)) from None
    if images.shape[1:] != (SIDE, SIDE):
        raise corrupt(image_path, REMOTE.dataset, f"images are {images.shape[1:]}, expected ({SIDE}, {SIDE})")
    if len(labels) != len(images):
        raise corrupt(label_path, REMOTE.dataset, f"{len(labels)} labels for {len(images)} images")
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise corrupt(label_path, REMOTE.dataset, f"label {labels.max()} outside 0..{NUM_CLASSES - 1}")
    x = torch.from_numpy(images.copy()).unsqueeze(1).float().div_(255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorData(x, y)


def load_mnist(data_dir: Path, download: bool = False, base_url: str | None = None) -> Dataset:
    """MNIST (60k train / 10k test) from ``data_dir/mnist/``; fetched first when ``download``."""
    train_images, train_labels, test_images, test_labels = paths = ensure(REMOTE, data_dir, download, base_url)
    return Dataset(
        name="mnist",
        train=_split(train_images, train_labels),
        test=_split(test_images, test_labels),
        num_classes=NUM_CLASSES,
        input_shape=(1, SIDE, SIDE),
        info={
            "directory": str(REMOTE.directory(data_dir)),
            "files": {p.name: CHECKSUMS[p.name] for p in paths},
            "scaling": "pixels / 255",
        },
    )
