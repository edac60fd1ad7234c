"""The architecture registry: the paper's F1 and C1-C4, the seed's SimpleVGG, and MNIST-1D nets.

Every model is built by a factory from the data set's shape::

    model = build_model("C1", input_shape=(3, 32, 32), num_classes=10, bn="batch")
    model = init_model("mlp", (40,), 10, seed=0)          # seeded, global RNG untouched

Conventions shared by every model here:

- The output is logits (no softmax); pair it with ``nn.CrossEntropyLoss``.
- Weights keep PyTorch's default initialization (Kaiming-uniform with a = sqrt(5) for Linear and
  Conv weights, uniform biases). The official Keras code used glorot_uniform weights and zero biases;
  that difference is deliberate and applies to all models.
- Linear and conv layers keep their biases, also when BatchNorm follows (as in the Keras code). Such
  a bias is cancelled by the BatchNorm after it: its gradient is zero and perturbing it does not
  change the loss, so it is a flat direction of every full-space sharpness measure.
- ``bn`` chooses what BatchNorm does at evaluation time, and every BatchNorm layer is built by
  :func:`batch_norm`, so the choice holds in every model:

  ``"running"``  PyTorch's default: batch statistics in training, running statistics in eval mode.
  ``"batch"``    batch statistics in training AND in eval mode, no running buffers
                 (``track_running_stats=False``). This is what the official Keras code did
                 (``BatchNormalization(mode=2)``); the paper never says so. An eval-mode output then
                 depends on the rest of the batch, and a batch of one example fails.
  ``"none"``     no BatchNorm layers at all (ablations).

  BatchNorm keeps PyTorch's epsilon (1e-5) and momentum (0.1); Keras 1 used other defaults.
- Layers are named (``fc1.linear.weight``, ``conv2.bn.running_mean``, ``head.bias``), and a layer's
  name does not depend on ``bn`` or on dropout options, so the same layer has the same name in every
  variant of a model.
"""
from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import UserError, closest, one_of

__all__ = ["BN_MODES", "MODELS", "ModelSpec", "Reshape", "batch_norm", "bn_mode", "build_model",
           "count_parameters", "init_model", "list_models"]

BN_MODES = ("running", "batch", "none")


# ------------------------------------------------------------------------------ Building blocks

def batch_norm(num_features: int, dims: int, bn: str) -> nn.Module | None:
    """The one place a BatchNorm layer is made: ``dims`` 1 (after Linear/Conv1d) or 2 (after Conv2d).

    Returns ``None`` for ``bn="none"`` (the caller leaves the layer out).
    """
    if bn not in BN_MODES:
        raise one_of("bn", bn, BN_MODES)
    if bn == "none":
        return None
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims]
    return cls(num_features, track_running_stats=(bn == "running"))


def bn_mode(model: nn.Module) -> str:
    """The BatchNorm evaluation mode of any model: "running", "batch", "none", or "mixed"."""
    modes = {"running" if m.track_running_stats else "batch"
             for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    if not modes:
        return "none"
    return modes.pop() if len(modes) == 1 else "mixed"


class Reshape(nn.Module):
    """Reshape each example to ``shape`` (keeps the batch dimension); accepts flat or shaped input."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return ", ".join(map(str, self.shape))


def _seq(**layers: nn.Module | None) -> nn.Sequential:
    """A Sequential with named children; ``None`` entries (a BN or dropout switched off) are left out."""
    return nn.Sequential(OrderedDict((k, v) for k, v in layers.items() if v is not None))


def _dense(n_in: int, n_out: int, bn: str, dropout: float = 0.0) -> nn.Sequential:
    """Linear -> BN -> ReLU [-> Dropout]."""
    return _seq(linear=nn.Linear(n_in, n_out), bn=batch_norm(n_out, 1, bn), relu=nn.ReLU(),
                drop=nn.Dropout(dropout) if dropout else None)


def _conv2d(c_in: int, c_out: int, k: int, bn: str, dropout: float = 0.0) -> nn.Sequential:
    """Conv k x k 'same' (stride 1) -> BN -> ReLU [-> Dropout]."""
    return _seq(conv=nn.Conv2d(c_in, c_out, k, padding=k // 2), bn=batch_norm(c_out, 2, bn), relu=nn.ReLU(),
                drop=nn.Dropout(dropout) if dropout else None)


# --------------------------------------------------------------------------------- Input shapes

def _fmt(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _image(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) from (C, H, W) or (H, W)."""
    if len(input_shape) == 3:
        return input_shape  # type: ignore[return-value]
    if len(input_shape) == 2:
        return (1, *input_shape)  # type: ignore[return-value]
    raise UserError(f"takes images shaped (C, H, W) or (H, W), not input shape {_fmt(input_shape)}")


def _sequence(input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(C, L) from (C, L) or (L,)."""
    if len(input_shape) == 2:
        return input_shape  # type: ignore[return-value]
    if len(input_shape) == 1:
        return (1, input_shape[0])
    raise UserError(f"takes sequences shaped (L,) or (C, L), not input shape {_fmt(input_shape)}")


def _shape_in(model_shape: tuple[int, ...], input_shape: tuple[int, ...]) -> nn.Module | None:
    """A Reshape in front when the data's shape is not already the shape the first layer wants."""
    return None if tuple(input_shape) == tuple(model_shape) else Reshape(*model_shape)


def _positive(option: str, value: int) -> int:
    if value < 1:
        raise UserError(f"option {option} must be >= 1, got {value}")
    return value


# ---------------------------------------- The paper's networks (Keskar et al. 2017, appendix B)

def _fc(input_shape, num_classes, bn, width, depth) -> nn.Sequential:
    n = math.prod(input_shape)
    layers: dict[str, nn.Module] = {"flatten": nn.Flatten()}
    for i in range(depth):
        layers[f"fc{i + 1}"] = _dense(n if i == 0 else width, width, bn)
    layers["head"] = nn.Linear(width if depth else n, num_classes)
    return _seq(**layers)


def f1(input_shape: tuple[int, ...], num_classes: int, bn: str) -> nn.Sequential:
    """F1 (MNIST): flatten -> 5 x (Linear 512, BN, ReLU) -> Linear num_classes.

    Paper appendix B. Takes any input shape (it flattens), so it also runs on CIFAR or MNIST-1D.
    The official repository (``network_zoo.py``) has no F1; like its other nets it would have used
    BatchNormalization ``mode=2`` (``bn="batch"`` here).
    """
    return _fc(input_shape, num_classes, bn, width=512, depth=5)


def c1(input_shape: tuple[int, ...], num_classes: int, bn: str) -> nn.Sequential:
    """C1 (CIFAR-10; C3 on CIFAR-100), a shallow convolutional net.

    2 x (Conv 64 5x5 'same', BN, ReLU, MaxPool 3x3 stride 2 'same') -> Linear 384, BN, ReLU,
    Dropout 0.5 -> Linear 192, BN, ReLU, Dropout 0.5 -> Linear num_classes.

    The official Keras code (``shallownet``) matches the paper. Its 'same' 3x3/2 max pooling, in
    Keras 1's Theano backend, pads one pixel on every side and crops the result to ceil(n / 2):
    exactly ``MaxPool2d(3, 2, padding=1)``, whose output is also ceil(n / 2) (32 -> 16 -> 8). Theano
    pads with zeros and PyTorch with -inf; the pool follows a ReLU, so every window's maximum is
    >= 0 and the two agree. (TensorFlow's 'same' would pad bottom/right only, shifting the windows.)
    The flatten size follows from the input shape, so any image size works.
    """
    c, h, w = _image(input_shape)
    reshape = _shape_in((c, h, w), input_shape)
    for _ in range(2):
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1  # MaxPool2d(3, 2, padding=1): ceil(n / 2)
    return _seq(
        reshape=reshape,
        conv1=_conv2d(c, 64, 5, bn),
        pool1=nn.MaxPool2d(3, stride=2, padding=1),
        conv2=_conv2d(64, 64, 5, bn),
        pool2=nn.MaxPool2d(3, stride=2, padding=1),
        flatten=nn.Flatten(),
        fc1=_dense(64 * h * w, 384, bn, dropout=0.5),
        fc2=_dense(384, 192, bn, dropout=0.5),
        head=nn.Linear(192, num_classes),
    )


_VGG16 = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def c2(input_shape: tuple[int, ...], num_classes: int, bn: str, *, dropout: bool = False) -> nn.Sequential:
    """C2 (CIFAR-10; C4 on CIFAR-100), a VGG-16 layout with one dense layer.

    Conv 3x3 'same' stacks 2x64, 2x128, 3x256, 3x512, 3x512 (13 convs), each conv + BN + ReLU, a
    2x2 max pool after each stack -> Linear 512, BN, ReLU -> Linear num_classes (paper appendix B;
    unlike VGG-16 there is one dense layer of 512, not two of 4096).

    ``dropout=True`` adds the official Keras code's dropouts (``deepnet``), which the paper does not
    mention: 0.3 after the first conv of the first stack, 0.4 after every other conv except the last
    of each stack, 0.5 before and after the dense layer.

    Pooling: Keras 'same' 2x2/2 pooling gives ceil(n / 2); ``MaxPool2d(2, ceil_mode=True)`` gives the
    same sizes, so odd sizes work too (MNIST's 28 -> 14 -> 7 -> 4 -> 2 -> 1). On even sizes this is
    the standard (TensorFlow) window alignment; Keras 1's Theano backend instead padded one pixel on
    each side and cropped, which shifts every window up/left by one pixel and never looks at the last
    row and column. We do not reproduce that quirk.
    """
    c, h, w = _image(input_shape)
    layers: dict[str, nn.Module | None] = {"reshape": _shape_in((c, h, w), input_shape)}
    c_in = c
    for s, stack in enumerate(_VGG16, start=1):
        for j, c_out in enumerate(stack, start=1):
            last = j == len(stack)
            p = 0.0 if (not dropout or last) else (0.3 if s == 1 else 0.4)
            layers[f"conv{s}_{j}"] = _conv2d(c_in, c_out, 3, bn, dropout=p)
            c_in = c_out
        layers[f"pool{s}"] = nn.MaxPool2d(2, ceil_mode=True)
        h, w = -(-h // 2), -(-w // 2)
    layers["flatten"] = nn.Flatten()
    layers["drop"] = nn.Dropout(0.5) if dropout else None
    layers["fc1"] = _dense(c_in * h * w, 512, bn, dropout=0.5 if dropout else 0.0)
    layers["head"] = nn.Linear(512, num_classes)
    return _seq(**layers)


# ------------------------------------------------------------- The seed demonstration's network

def simplevgg(input_shape: tuple[int, ...], num_classes: int, bn: str, *,
              width: int = 64, convs: int = 2, hidden: int = 0) -> nn.Sequential:
    """SimpleVGG, the seed demonstration's CIFAR-10 net.

    3 x [``convs`` x (Conv 3x3 'same', BN, ReLU), MaxPool 2] with ``width``, 2 x ``width`` and
    4 x ``width`` channels (64/128/256 by default; on 32x32 the flatten size is 256 * 4 * 4), then
    the head: Linear num_classes when ``hidden`` is 0 (the default), else Linear ``hidden``, ReLU,
    Dropout 0.5, Linear num_classes (no BN in the head).

    The defaults follow REFERENCE.md section 2 (two convs per block, head unspecified so the
    simplest one). A public AI-generated implementation matching the seed's description
    (github.com/kothariprakhar/on-large-batch-training-for-deep-learning-generali-impl,
    ``implementation.py``) has ONE conv per block and a Linear 512 / ReLU / Dropout 0.5 head:
    ``convs=1, hidden=512`` builds that network exactly (up to in-place ReLUs). Pooling is plain
    ``MaxPool2d(2)`` (floor), as in that code, so each side must be at least 8.
    """
    c, h, w = _image(input_shape)
    _positive("width", width)
    _positive("convs", convs)
    if hidden < 0:
        raise UserError(f"option hidden must be >= 0 (0: no hidden layer), got {hidden}")
    if min(h, w) < 8:
        raise UserError(f"needs images at least 8x8 (three 2x2 poolings), not input shape {_fmt(input_shape)}")
    layers: dict[str, nn.Module | None] = {"reshape": _shape_in((c, h, w), input_shape)}
    c_in = c
    for b, c_out in enumerate((width, 2 * width, 4 * width), start=1):
        for j in range(1, convs + 1):
            layers[f"conv{b}_{j}"] = _conv2d(c_in, c_out, 3, bn)
            c_in = c_out
        layers[f"pool{b}"] = nn.MaxPool2d(2)
        h, w = h // 2, w // 2
    layers["flatten"] = nn.Flatten()
    n = c_in * h * w
    if hidden:
        layers["fc1"] = _seq(linear=nn.Linear(n, hidden), relu=nn.ReLU(), drop=nn.Dropout(0.5))
        n = hidden
    layers["head"] = nn.Linear(n, num_classes)
    return _seq(**layers)


# ----------- MNIST-1D nets (Greydanus 2020): small enough for a CPU, big enough to show the gap

def mlp(input_shape: tuple[int, ...], num_classes: int, bn: str, *, width: int = 256, depth: int = 3) -> nn.Sequential:
    """MLP: flatten -> ``depth`` x (Linear ``width``, BN, ReLU) -> Linear num_classes.

    The default study's model: on MNIST-1D, 40 -> 3 x (256, BN, ReLU) -> 10. ``depth=0`` is
    multinomial logistic regression.
    """
    _positive("width", width)
    if depth < 0:
        raise UserError(f"option depth must be >= 0, got {depth}")
    return _fc(input_shape, num_classes, bn, width=width, depth=depth)


def cnn1d(input_shape: tuple[int, ...], num_classes: int, bn: str, *, width: int = 32) -> nn.Sequential:
    """1-D CNN for MNIST-1D: 3 x (Conv1d k5 stride 2 padding 2, BN, ReLU) -> flatten -> Linear.

    ``width`` channels in every conv; the length halves (rounding up) at each conv, 40 -> 20 -> 10 -> 5.
    Flattening (rather than global pooling) keeps where a feature was, which MNIST-1D's digits need.
    This is the shape of the MNIST-1D paper's CNN (three stride-2 convs then a linear layer, ~94%
    test accuracy); with ``width=32`` it has 12,298 parameters and reached 92.7% test accuracy on the
    default MNIST-1D (4000/1000) after 60 epochs of Adam (lr 1e-3, batch 128; ``mlp``: 69%).
    Takes (L,) or (C, L) inputs.
    """
    c, length = _sequence(input_shape)
    _positive("width", width)
    layers: dict[str, nn.Module | None] = {"reshape": _shape_in((c, length), input_shape)}
    c_in = c
    for i in range(1, 4):
        layers[f"conv{i}"] = _seq(conv=nn.Conv1d(c_in, width, 5, stride=2, padding=2),
                                  bn=batch_norm(width, 1, bn), relu=nn.ReLU())
        c_in = width
        length = (length - 1) // 2 + 1
    layers["flatten"] = nn.Flatten()
    layers["head"] = nn.Linear(width * length, num_classes)
    return _seq(**layers)


# --------------------------------------------------------------------------------- The registry

@dataclass(frozen=True)
class ModelSpec:
    """One registered architecture.

    ``factory(input_shape, num_classes, bn, **options)`` builds it; its keyword-only parameters are
    the model's options (see :attr:`options`). ``input_kind`` is what it takes: "vector" (anything,
    flattened), "image" ((C, H, W) or (H, W)) or "sequence" ((L,) or (C, L)).
    """

    name: str
    description: str
    factory: Callable[..., nn.Module]
    input_kind: str
    paper_name: str | None = None

    @property
    def options(self) -> dict[str, object]:
        """The model's options and their defaults."""
        return {p.name: p.default for p in inspect.signature(self.factory).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("F1", "MNIST MLP: 5 x (Linear 512, BN, ReLU)", f1, "vector", "F1"),
        ModelSpec("C1", "CIFAR-10 shallow CNN: 2 x (conv 5x5 64, pool) + dense 384, 192", c1, "image", "C1"),
        ModelSpec("C2", "CIFAR-10 VGG-16 layout (13 convs) + dense 512", c2, "image", "C2"),
        ModelSpec("C3", "CIFAR-100 shallow CNN (C1 with 100 classes)", c1, "image", "C3"),
        ModelSpec("C4", "CIFAR-100 VGG-16 layout (C2 with 100 classes)", c2, "image", "C4"),
        ModelSpec("simplevgg", "seed demo's SimpleVGG: 3 x [2 x conv 3x3, pool], 64/128/256", simplevgg, "image"),
        ModelSpec("mlp", "MLP: depth x (Linear width, BN, ReLU); default 3 x 256", mlp, "vector"),
        ModelSpec("cnn1d", "MNIST-1D CNN: 3 x (conv1d k5 stride 2, BN, ReLU) + linear", cnn1d, "sequence"),
    )
}


def list_models() -> list[tuple[str, str, str]]:
    """Rows (name, description, paper name or "") for ``batchgap list``."""
    return [(s.name, s.description, s.paper_name or "") for s in MODELS.values()]


def _check_options(spec: ModelSpec, options: dict) -> None:
    allowed = spec.options
    for key, value in options.items():
        if key not in allowed:
            names = ", ".join(sorted(allowed)) or "none"
            raise UserError(f"model {spec.name!r}: unknown option {key!r}{closest(key, allowed)}; allowed: {names}")
        default = allowed[key]
        ok = isinstance(value, bool) if isinstance(default, bool) else (
            isinstance(value, type(default)) and not isinstance(value, bool))
        if not ok:
            raise UserError(f"model {spec.name!r}: option {key} must be {type(default).__name__}, got {value!r}")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, bn: str = "running", **options) -> nn.Module:
    """Build model ``name`` for inputs of shape ``input_shape`` (one example) and ``num_classes``.

    Construction draws from the global RNG like any ``nn.Module``; seed it yourself or use
    :func:`init_model`. Bad names, options, shapes or ``bn`` raise :class:`UserError`.

    Args:
        name: a registered model: ``"F1"``, ``"C1"`` to ``"C4"`` (Keskar et al.'s networks), ``"simplevgg"``,
            ``"mlp"``, ``"cnn1d"`` (``batchgap list`` shows them).
        input_shape: the shape of one example, e.g. ``(784,)`` or ``(3, 32, 32)``.
        num_classes: the number of outputs (logits).
        bn: ``"running"`` (PyTorch's default), ``"batch"`` (batch statistics in eval mode too, as the official
            Keras code) or ``"none"`` (no BatchNorm layers).
        **options: the model's own options (e.g. ``width`` and ``depth`` of ``"mlp"``), type-checked.

    Returns:
        The ``nn.Module``, on the CPU, in training mode.

    Cost:
        The parameters' memory and one initialization draw; no data pass.
    """
    if name not in MODELS:
        raise one_of("model", name, MODELS)
    spec = MODELS[name]
    if bn not in BN_MODES:
        raise one_of("bn", bn, BN_MODES)
    _check_options(spec, options)
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise UserError(f"model {name!r}: input shape must be a tuple of ints, got {input_shape!r}") from None
    if not shape or min(shape) < 1 or shape != tuple(input_shape):
        raise UserError(f"model {name!r}: input shape must be positive ints, got {input_shape!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"model {name!r}: num_classes must be a positive int, got {num_classes!r}")
    try:
        return spec.factory(shape, num_classes, bn, **options)
    except UserError as e:
        raise UserError(f"model {name!r}: {e}") from None


def init_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int, bn: str = "running",
               **options) -> nn.Module:
    """:func:`build_model` with its initial weights fixed by ``seed``; the global RNG is left as it was.

    The same seed gives bitwise-identical weights whatever ran before. Models are built on the CPU,
    so only the CPU generator is forked and seeded (``torch.manual_seed`` would also reseed CUDA's).

    Args:
        name: a registered model (as :func:`build_model`).
        input_shape: the shape of one example.
        num_classes: the number of outputs (logits).
        seed: seeds the CPU generator the initialization draws from.
        bn: ``"running"``, ``"batch"`` or ``"none"`` (as :func:`build_model`).
        **options: the model's own options.

    Returns:
        The ``nn.Module``, on the CPU, in training mode.

    Cost:
        As :func:`build_model`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return build_model(name, input_shape, num_classes, bn=bn, **options)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter entries (trainable or not; buffers such as running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())
