"""Tiny data sets written in exactly the official file formats, for tests that must not download.

Write files into a data directory, then let the loaders accept them (their md5 differs from the official
one) with :func:`trust_files`; or do both, for several data sets, with :func:`install_fake_data`::

    from data_fixtures import install_fake_data, write_fake_mnist, trust_files

    def test_something(tmp_path, monkeypatch):
        install_fake_data(monkeypatch, tmp_path, names=("mnist", "cifar10"))  # also sets $BATCHGAP_DATA
        ds = load_dataset("cifar10")

Images carry a learnable signal: each class has its own mean intensity per channel (so flips, crops and
small rotations keep it) plus Gaussian noise. The content is a deterministic function of the arguments;
:func:`fake_image_arrays` returns exactly what a loader must give back (times 255).
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np

from batchgap.data import files, mnist, mnist1d
from batchgap.data.cifar import CIFAR10, CIFAR100, CifarLayout

_PALETTE_SEED = 20170101  # class means are shared by every fake split, whatever its seed


class FakeArrays(NamedTuple):
    """A fake data set in the loaders' layout: images uint8 (N, C, H, W) (or float32 (N, D)), labels int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Every class as evenly as possible, in random order."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def fake_image_arrays(
    num_classes: int, shape: tuple[int, int, int], n_train: int, n_test: int, seed: int = 0
) -> FakeArrays:
    """uint8 images whose per-channel mean depends on the class, plus noise (std 20)."""
    means = np.random.default_rng(_PALETTE_SEED).uniform(30, 225, size=(num_classes, shape[0]))
    rng = np.random.default_rng(seed)
    splits = []
    for n in (n_train, n_test):
        y = _labels(n, num_classes, rng)
        x = means[y][:, :, None, None] + rng.normal(0, 20, size=(n, *shape))
        splits += [np.clip(np.rint(x), 0, 255).astype(np.uint8), y]
    return FakeArrays(*splits)


def fake_mnist_arrays(n_train: int = 60, n_test: int = 20, seed: int = 0) -> FakeArrays:
    return fake_image_arrays(10, (1, 28, 28), n_train, n_test, seed)


def fake_cifar_arrays(num_classes: int, n_train: int, n_test: int, seed: int = 0) -> FakeArrays:
    return fake_image_arrays(num_classes, (3, 32, 32), n_train, n_test, seed)


# --- MNIST: gzipped idx files -------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An uncompressed idx file: big-endian magic, big-endian uint32 dimensions, uint8 data."""
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_gzip(path: Path, payload: bytes) -> Path:
    """Write ``payload`` gzip-compressed (header time 0, so the bytes depend on the content only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(filename=path.name, mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(payload)
    return path


def write_fake_mnist(data_dir: str | os.PathLike, n_train: int = 60, n_test: int = 20, seed: int = 0) -> list[Path]:
    """The four official MNIST files in ``data_dir/mnist/``; returns their paths (train images first)."""
    a = fake_mnist_arrays(n_train, n_test, seed)
    directory = mnist.REMOTE.directory(Path(data_dir))
    contents = {
        mnist.TRAIN_IMAGES: idx_bytes(a.x_train[:, 0], mnist.IMAGES_MAGIC),
        mnist.TRAIN_LABELS: idx_bytes(a.y_train, mnist.LABELS_MAGIC),
        mnist.TEST_IMAGES: idx_bytes(a.x_test[:, 0], mnist.IMAGES_MAGIC),
        mnist.TEST_LABELS: idx_bytes(a.y_test, mnist.LABELS_MAGIC),
    }
    return [write_gzip(directory / name, payload) for name, payload in contents.items()]


# --- CIFAR: tar.gz of pickled batches ----------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote it, like the official CIFAR files: strings and bytes as byte strings
    (SHORT_BINSTRING / BINSTRING), numpy's globals under their old ``numpy.core`` module names."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_string(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string

    def save_global(self, obj, name=None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode("ascii"))
        self.memoize(obj)


def py2_pickle(obj) -> bytes:
    """``obj`` pickled the way Python 2 pickled the official CIFAR batches (load with encoding="bytes")."""
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def cifar_batch(images: np.ndarray, labels: np.ndarray, layout: CifarLayout, batch_label: str) -> bytes:
    """One pickled batch dict as in the official archives (bytes keys, uint8 (N, 3072) data, list labels)."""
    batch = {
        b"batch_label": batch_label.encode(),
        b"data": images.reshape(len(images), -1),
        b"filenames": [f"fake_{i:05d}.png".encode() for i in range(len(images))],
        layout.label_key: [int(v) for v in labels],
    }
    if layout is CIFAR100:
        batch[b"coarse_labels"] = [int(v) // 5 for v in labels]
    return py2_pickle(batch)


def write_tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    """A gzipped tar of ``members`` (name -> bytes) under one top directory, deterministic bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            top = tarfile.TarInfo(next(iter(members)).split("/")[0])
            top.type, top.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(top)
            for name, payload in members.items():
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(payload), 0o644
                tar.addfile(info, io.BytesIO(payload))
    return path


def cifar_members(layout: CifarLayout, a: FakeArrays) -> dict[str, bytes]:
    """The archive members of ``layout`` holding ``a``; the training set split evenly over its batches."""
    members = {}
    for i, (x, y) in enumerate(
        zip(np.array_split(a.x_train, len(layout.train_members)), np.array_split(a.y_train, len(layout.train_members)))
    ):
        members[layout.train_members[i]] = cifar_batch(x, y, layout, f"training batch {i + 1}")
    (test_member,) = layout.test_members
    members[test_member] = cifar_batch(a.x_test, a.y_test, layout, "testing batch 1")
    top = layout.train_members[0].split("/")[0]
    names = [f"class_{c}".encode() for c in range(layout.num_classes)]
    meta_name, meta_key = ("batches.meta", b"label_names") if layout is CIFAR10 else ("meta", b"fine_label_names")
    members[f"{top}/{meta_name}"] = py2_pickle({meta_key: names})
    return members


def write_fake_cifar(layout: CifarLayout, data_dir: str | os.PathLike, n_train: int, n_test: int,
                     seed: int = 0) -> list[Path]:
    a = fake_cifar_arrays(layout.num_classes, n_train, n_test, seed)
    (name,) = layout.remote.filenames
    return [write_tar_gz(layout.remote.directory(Path(data_dir)) / name, cifar_members(layout, a))]


def write_fake_cifar10(data_dir: str | os.PathLike, n_train: int = 50, n_test: int = 20, seed: int = 0) -> list[Path]:
    """``data_dir/cifar10/cifar-10-python.tar.gz`` with ``n_train`` images over 5 batches; returns [path]."""
    return write_fake_cifar(CIFAR10, data_dir, n_train, n_test, seed)


def write_fake_cifar100(data_dir: str | os.PathLike, n_train: int = 200, n_test: int = 100,
                        seed: int = 0) -> list[Path]:
    """``data_dir/cifar100/cifar-100-python.tar.gz``; returns [path]."""
    return write_fake_cifar(CIFAR100, data_dir, n_train, n_test, seed)


# --- MNIST-1D: the loader's cache file ----------------------------------------------------------------


def fake_mnist1d_arrays(n_train: int = 400, n_test: int = 100, seed: int = 0) -> FakeArrays:
    """float32 signals of 40 features: a class template (shared palette) plus noise (std 0.5)."""
    templates = np.random.default_rng(_PALETTE_SEED).normal(size=(10, 40))
    rng = np.random.default_rng(seed)
    splits = []
    for n in (n_train, n_test):
        y = _labels(n, 10, rng)
        splits += [(templates[y] + rng.normal(0, 0.5, size=(n, 40))).astype(np.float32), y]
    return FakeArrays(*splits)


def write_fake_mnist1d(data_dir: str | os.PathLike, n_train: int = 400, n_test: int = 100, seed: int = 0) -> list[Path]:
    """A small fake MNIST-1D cache in ``data_dir/mnist1d/``, which the loader reuses instead of generating.

    The loaded data set's ``info["source"]`` says it is fake. Needs no :func:`trust_files`.
    """
    a = fake_mnist1d_arrays(n_train, n_test, seed)
    path = Path(data_dir) / mnist1d.NAME / mnist1d.CACHE_FILE
    meta = {"generator": "mnist1d.data.make_dataset", "args": mnist1d.generator_args(),
            "source": "fake data written by tests/data_fixtures.py"}
    mnist1d.write_cache(path, dict(zip(("x", "y", "x_test", "y_test"), a)), meta)
    return [path]


# --- letting the loaders accept fake files ---------------------------------------------------------


def trust_files(monkeypatch, paths: Iterable[str | os.PathLike]) -> None:
    """Set the checksum table entries of ``paths`` to their actual md5 for this test (pytest ``monkeypatch``)."""
    for path in map(Path, paths):
        if path.name in files.CHECKSUMS:
            monkeypatch.setitem(files.CHECKSUMS, path.name, files.md5sum(path))


WRITERS = {
    "mnist1d": write_fake_mnist1d,
    "mnist": write_fake_mnist,
    "cifar10": write_fake_cifar10,
    "cifar100": write_fake_cifar100,
}


def install_fake_data(
    monkeypatch,
    data_dir: str | os.PathLike,
    names: Iterable[str] = ("mnist1d", "mnist", "cifar10", "cifar100"),
    n_train: int = 200,
    n_test: int = 100,
    seed: int = 0,
) -> Path:
    """Write fake ``names`` into ``data_dir``, trust them, and point ``$BATCHGAP_DATA`` there; returns the dir.

    ``load_dataset(name)`` then gives ``n_train`` / ``n_test`` examples of each, with no data_dir argument.
    """
    data_dir = Path(data_dir)
    for name in names:
        trust_files(monkeypatch, WRITERS[name](data_dir, n_train=n_train, n_test=n_test, seed=seed))
    monkeypatch.setenv(files.ENV_VAR, str(data_dir))
    return data_dir
