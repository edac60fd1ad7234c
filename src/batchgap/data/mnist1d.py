"""MNIST-1D (Greydanus 2020), generated offline: the default data set, no files to fetch.

``mnist1d.data.make_dataset`` with the package's default arguments gives 4000 train / 1000 test signals
of 40 features in 10 classes. It seeds and draws from the *global* numpy and ``random`` generators, so
the generation runs between a save and a restore of both states: loading never changes a user's RNG.

Generation takes seconds, so the arrays are cached in ``DATA_DIR/mnist1d/mnist1d-default.npz``
(written atomically, with the generator arguments recorded) and reused while the recorded arguments
match the current defaults. A cache that cannot be read or fails its checks is regenerated.
"""
from __future__ import annotations

import json
import random
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .base import Dataset, TensorData
from .files import atomic_path

NAME = "mnist1d"
CACHE_FILE = "mnist1d-default.npz"
NUM_CLASSES = 10
_KEYS = ("x", "y", "x_test", "y_test")


def generator_args() -> dict:
    """``mnist1d``'s default generator arguments (its download URL left out: nothing is downloaded)."""
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)
    return json.loads(json.dumps(args))  # the form it takes after a round trip through the cache


@contextmanager
def global_rng_preserved() -> Iterator[None]:
    """Restore the global numpy and ``random`` generator states on exit, even on error."""
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def generate(args: dict) -> dict[str, np.ndarray]:
    """Run ``mnist1d.data.make_dataset`` on ``args``; x float32, y int64."""
    import mnist1d.data
    from mnist1d.utils import ObjectView

    with global_rng_preserved():
        raw = mnist1d.data.make_dataset(ObjectView(dict(args)))
    return {
        "x": np.asarray(raw["x"], dtype=np.float32),
        "y": np.asarray(raw["y"], dtype=np.int64),
        "x_test": np.asarray(raw["x_test"], dtype=np.float32),
        "y_test": np.asarray(raw["y_test"], dtype=np.int64),
    }


def _check(arrays: dict[str, np.ndarray]) -> None:
    """Raise ValueError unless ``arrays`` look like an MNIST-1D split pair."""
    for x_key, y_key in (("x", "y"), ("x_test", "y_test")):
        x, y = arrays[x_key], arrays[y_key]
        if x.dtype != np.float32 or x.ndim != 2 or y.dtype != np.int64 or y.shape != (len(x),):
            raise ValueError(f"{x_key}/{y_key} have shapes {x.shape}/{y.shape}")
        if len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES):
            raise ValueError(f"{y_key} outside 0..{NUM_CLASSES - 1}")
    if arrays["x"].shape[1] != arrays["x_test"].shape[1]:
        raise ValueError("train and test have different widths")


def read_cache(path: Path, args: dict) -> tuple[dict[str, np.ndarray], dict] | None:
    """The cached arrays and metadata, or None when the file is missing, unreadable, stale or malformed."""
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            arrays = {k: f[k] for k in _KEYS}
        _check(arrays)
    except Exception:  # missing, truncated, not a zip, wrong keys or dtypes: regenerate
        return None
    if meta.get("args") != args:
        return None
    return arrays, meta


def write_cache(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write the arrays and ``meta`` (JSON) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)


def load_mnist1d(data_dir: Path, download: bool = False) -> Dataset:
    """MNIST-1D with the default generator arguments, from the cache in ``data_dir`` or generated.

    ``download`` is accepted for a uniform loader signature and ignored: nothing is downloaded.
    """
    args = generator_args()
    path = Path(data_dir) / NAME / CACHE_FILE
    cached = read_cache(path, args)
    if cached is None:
        meta = {"generator": "mnist1d.data.make_dataset", "args": args}
        arrays = generate(args)
        try:
            write_cache(path, arrays, meta)
        except OSError as e:
            warnings.warn(f"mnist1d: could not cache the generated data in {path}: {e}", stacklevel=2)
    else:
        arrays, meta = cached
    train = TensorData(torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"]))
    test = TensorData(torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"]))
    return Dataset(
        name=NAME,
        train=train,
        test=test,
        num_classes=NUM_CLASSES,
        input_shape=(arrays["x"].shape[1],),
        info={**meta, "cache": str(path)},
    )
