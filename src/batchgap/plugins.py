"""The user's own code and files in a study: ``"MODULE:CALLABLE"`` model factories, data loaders and
augmentations, and ``npz``/``pt`` data files, each with the identity that goes into a run's id.

A spec is ``"package.module:name"`` (an importable module; the study file's folder is importable, as
``python`` makes a script's folder) or ``"path/to/file.py:name"`` (relative to the study file). Its
identity is the spec, the file the callable comes from and the sha256 of that file's source; a data
file's identity is the sha256 of its bytes, a loader's the sha256 of the tensors it returned. Changing
the model's code or the data makes new runs instead of silently resuming old ones.

Every mistake is one line (:class:`~batchgap.errors.UserError`): a module that does not import (and
why), a missing or non-callable attribute, a factory or loader that raises, arrays missing from a file,
labels that are not integers in ``[0, num_classes)``, NaN or infinite inputs, train and test inputs of
different shapes, a model whose output is not ``(batch, num_classes)``.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .data.base import Dataset, DictData, TensorData
from .errors import UserError

FILE_FORMATS = ("npz", "pt")
ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def is_spec(name: str) -> bool:
    """Whether ``name`` names user code (``MODULE:CALLABLE``) rather than a built-in."""
    return isinstance(name, str) and ":" in name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tensors(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _import(module: str, root: Path, where: str):
    if module.endswith(".py"):
        path = (root / module).resolve()
        if not path.is_file():
            raise UserError(f"{where}: {module}: no such file (relative to {root})")
        name = f"_batchgap_user_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        with _importable(path.parent):
            try:
                spec.loader.exec_module(mod)
            except Exception as e:
                del sys.modules[name]
                raise UserError(f"{where}: {module} does not import ({type(e).__name__}: {_line(e)})") from None
        return mod
    with _importable(root):
        try:
            return importlib.import_module(module)
        except Exception as e:
            raise UserError(f"{where}: module {module!r} does not import ({type(e).__name__}: {_line(e)})") from None


class _importable:
    """``folder`` at the front of ``sys.path`` while the body runs (and for the imports it makes)."""

    def __init__(self, folder: Path):
        self.folder = str(folder)

    def __enter__(self):
        self.added = self.folder not in sys.path
        if self.added:
            sys.path.insert(0, self.folder)

    def __exit__(self, *exc):
        if self.added and self.folder in sys.path:
            sys.path.remove(self.folder)


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else "no message"


def resolve(spec: str, root: str | Path, where: str) -> tuple[Callable, dict]:
    """The callable a ``MODULE:CALLABLE`` spec names, and its identity (spec, source file, source sha256)."""
    module, _, attr = spec.rpartition(":")
    if not module or not attr:
        raise UserError(f"{where}: expected MODULE:CALLABLE or FILE.py:CALLABLE, got {spec!r}")
    mod = _import(module, Path(root), where)
    fn = getattr(mod, attr, None)
    if fn is None:
        raise UserError(f"{where}: {module} has no attribute {attr!r}")
    if not callable(fn):
        raise UserError(f"{where}: {module}:{attr} is not callable (a {type(fn).__name__})")
    try:
        source = Path(inspect.getsourcefile(fn) or mod.__file__)
    except TypeError:
        source = Path(mod.__file__)
    return fn, {"spec": spec, "source": source.name, "source_sha256": sha256_file(source)}


def call(fn: Callable, where: str, *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)``; an exception it raises becomes one line naming ``where``."""
    try:
        return fn(*args, **kwargs)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{where}: raised {type(e).__name__}: {_line(e)}") from None


# ---------------------------------------------------------------------------------------- models

def build_model(spec: str, root, input_shape: tuple[int, ...], num_classes: int, options: dict,
                seed: int | None = None) -> torch.nn.Module:
    """The user's model, ``CALLABLE(input_shape, num_classes, **options)``, its weights drawn from ``seed``
    (the global RNG left as it was)."""
    fn, _ = resolve(spec, root, "model.name")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.default_generator.manual_seed(seed)
        model = call(fn, f"model {spec}", tuple(input_shape), num_classes, **options)
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"model {spec}: returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def check_output(model: torch.nn.Module, x: torch.Tensor, num_classes: int, what: str) -> None:
    """The model maps a batch of inputs to logits of shape (batch, num_classes)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = call(model, f"{what}: forward pass on a batch of {len(x)}", x)
    finally:
        model.train(was)
    if not torch.is_tensor(out) or tuple(out.shape) != (len(x), num_classes):
        got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise UserError(f"{what}: must return logits of shape (batch, num_classes) = ({len(x)}, {num_classes}), "
                        f"got {got}")


# ---------------------------------------------------------------------------------------- data

def _arrays_from_file(path: Path, fmt: str) -> dict:
    if not path.is_file():
        raise UserError(f"data.path: {path}: no such file")
    try:
        if fmt == "npz":
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"data.path: {path}: not a readable .{fmt} file ({type(e).__name__}: {_line(e)})") from None
    if not isinstance(obj, dict):
        raise UserError(f"data.path: {path}: expected a dict of tensors {', '.join(ARRAYS)}, "
                        f"got a {type(obj).__name__}")
    return obj


def _tensor(value: Any, name: str, where: str) -> torch.Tensor:
    try:
        return value if torch.is_tensor(value) else torch.as_tensor(np.asarray(value))
    except Exception:
        raise UserError(f"{where}: {name} is not an array ({type(value).__name__})") from None


def user_dataset(arrays: dict | tuple | list, where: str, label: str, num_classes: int = 0) -> Dataset:
    """A :class:`Dataset` from the four arrays, every one checked."""
    if isinstance(arrays, (tuple, list)):
        if len(arrays) != 4:
            raise UserError(f"{where}: expected the four arrays {', '.join(ARRAYS)}, got {len(arrays)} values")
        arrays = dict(zip(ARRAYS, arrays))
    if not isinstance(arrays, dict):
        raise UserError(f"{where}: expected {', '.join(ARRAYS)} (a dict or a 4-tuple), got a {type(arrays).__name__}")
    missing = [k for k in ARRAYS if k not in arrays]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)} (has {', '.join(map(str, arrays)) or 'nothing'})")
    t = {k: _tensor(arrays[k], k, where) for k in ARRAYS}
    for k in ("x_train", "x_test"):
        if not t[k].is_floating_point():
            t[k] = t[k].float()
        if t[k].dim() < 2 or len(t[k]) == 0:
            raise UserError(f"{where}: {k} must have one row per example and at least one example, "
                            f"got shape {tuple(t[k].shape)}")
        if not torch.isfinite(t[k]).all():
            raise UserError(f"{where}: {k} holds NaN or infinite values")
        if t[k].dtype == torch.float64:
            t[k] = t[k].float()
    if t["x_train"].shape[1:] != t["x_test"].shape[1:]:
        raise UserError(f"{where}: train and test inputs differ in shape: {tuple(t['x_train'].shape[1:])} "
                        f"against {tuple(t['x_test'].shape[1:])}")
    for k in ("y_train", "y_test"):
        y = t[k]
        if y.is_floating_point() or y.dtype == torch.bool or y.is_complex() or y.dim() != 1:
            raise UserError(f"{where}: {k} must be a 1-D array of integer class labels, "
                            f"got {y.dtype} of shape {tuple(y.shape)}")
        t[k] = y.long()
    for x, y in (("x_train", "y_train"), ("x_test", "y_test")):
        if len(t[x]) != len(t[y]):
            raise UserError(f"{where}: {x} has {len(t[x])} rows but {y} has {len(t[y])}")
    top = int(max(t["y_train"].max(), t["y_test"].max())) + 1
    k = num_classes or top
    low = int(min(t["y_train"].min(), t["y_test"].min()))
    if low < 0 or top > k:
        raise UserError(f"{where}: labels must lie in [0, {k}) (data.num_classes = {k}), found {low} to {top - 1}")
    info = {"source": label, "sha256": sha256_tensors(t[a] for a in ARRAYS),
            "num_classes": "given" if num_classes else "inferred"}
    return Dataset(label, TensorData(t["x_train"], t["y_train"]), TensorData(t["x_test"], t["y_test"]), k,
                   tuple(t["x_train"].shape[1:]), info)


def dict_dataset(splits: dict, where: str, label: str, num_classes: int = 0) -> Dataset:
    """A :class:`Dataset` of dict batches from ``{"train": {column: tensor}, "test": {column: tensor}}`` (one row
    per example; the same columns in both): the model factory gets ``input_shape`` = the first column's row shape
    and ``num_classes`` = ``data.num_classes``, or one more than the largest ``labels`` entry."""
    cols = {}
    for split in ("train", "test"):
        part = splits[split]
        if not isinstance(part, dict) or not part:
            raise UserError(f"{where}: {split} must be a dict of column tensors (input_ids, labels, ...), got "
                            f"{type(part).__name__}")
        cols[split] = {k: _tensor(v, f"{split}[{k!r}]", where) for k, v in part.items()}
        rows = {k: (len(v) if v.dim() else 0) for k, v in cols[split].items()}
        if len(set(rows.values())) != 1 or 0 in rows.values():
            raise UserError(f"{where}: the {split} columns must have one row per example, the same number, got {rows}")
        for k, v in cols[split].items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise UserError(f"{where}: {split}[{k!r}] holds NaN or infinite values")
    if list(cols["train"]) != list(cols["test"]):
        raise UserError(f"{where}: train and test have other columns: {list(cols['train'])} against "
                        f"{list(cols['test'])}")
    first = next(iter(cols["train"]))
    if cols["train"][first].shape[1:] != cols["test"][first].shape[1:]:
        raise UserError(f"{where}: train and test {first!r} rows differ in shape")
    k = num_classes
    if not k and "labels" in cols["train"]:
        labels = torch.cat([cols[s]["labels"].reshape(-1) for s in ("train", "test")])
        k = int(labels.max()) + 1
    if not k:
        raise UserError(f"{where}: no 'labels' column to infer the classes from: set data.num_classes")
    info = {"source": label, "sha256": sha256_tensors(t for s in ("train", "test") for t in cols[s].values()),
            "num_classes": "given" if num_classes else "inferred", "columns": list(cols["train"])}
    return Dataset(label, DictData(cols["train"]), DictData(cols["test"]), k, tuple(cols["train"][first].shape[1:]),
                   info)


def load_user_data(name: str, path: str, root, num_classes: int = 0) -> Dataset:
    """``[data] name = "npz" | "pt"`` with ``path``, or ``name = "MODULE:CALLABLE"`` (a loader returning
    the four arrays) as a :class:`Dataset`; its ``info`` records the source and a sha256."""
    if name in FILE_FORMATS:
        file = (Path(root) / path).resolve()
        ds = user_dataset(_arrays_from_file(file, name), f"data.path: {path}", f"{name}:{path}", num_classes)
        ds.info = {**ds.info, "file": path, "file_sha256": sha256_file(file)}
        return ds
    fn, identity = resolve(name, root, "data.name")
    arrays = call(fn, f"data loader {name}")
    if isinstance(arrays, dict) and set(arrays) == {"train", "test"}:
        ds = dict_dataset(arrays, f"data loader {name}", name, num_classes)
    else:
        ds = user_dataset(arrays, f"data loader {name}", name, num_classes)
    ds.info = {**ds.info, "loader_source_sha256": identity["source_sha256"]}
    return ds


def identity(model_name: str, data, augments: list[str], root) -> dict:
    """What of the user's code and data a run depends on, for its id (empty for built-ins only)."""
    out = {}
    if is_spec(model_name):
        out["model"] = resolve(model_name, root, "model.name")[1]
    if data.info.get("sha256") and "source" in data.info:
        out["data"] = {k: v for k, v in data.info.items() if k.endswith("sha256") or k in ("source", "file")}
    for name in sorted({a for a in augments if is_spec(a)}):
        out.setdefault("augment", {})[name] = resolve(name, root, "augment")[1]
    return out


def make_augment(spec: str, root) -> Callable:
    """The user's augmentation ``CALLABLE(x_batch, generator) -> x_batch``, applied to a whole batch."""
    fn, _ = resolve(spec, root, "augment")

    def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        out = call(fn, f"augment {spec}", x, gen)
        if not torch.is_tensor(out) or out.shape != x.shape:
            raise UserError(f"augment {spec}: must return a tensor of the batch's shape {tuple(x.shape)}")
        return out
    return augment
