"""Data augmentation as a few vectorized tensor ops on a whole batch: images (N, C, H, W), signals (N, L).

Every augmentation is a function ``augment(x, generator) -> x'`` whose only randomness is the
``torch.Generator`` passed in; the same generator state gives the same output. Names:

* ``"none"``: no augmentation (:func:`make_augment` returns None).
* ``"paper"``: the paper's appendix E.1: a random horizontal flip (probability 1/2), a rotation by an
  angle uniform in [-10, 10] degrees about the image centre, and a translation uniform in [-0.2, 0.2] of
  the image size in each axis; rotation and translation in one bilinear resampling
  (``F.affine_grid`` + ``F.grid_sample``), zeros where the image moved away.
* ``"crop-flip"``: the usual CIFAR augmentation: pad 4 zero pixels on every side, crop back to the
  original size at a uniform random offset, then a random horizontal flip.
* ``"shift-1d"``: for 1-D signals (N, L) or (N, C, L), e.g. MNIST-1D. The paper's augmentation
  (appendix E.1) is for images; its translation part, carried to one axis: each signal is translated
  by an integer s uniform in {-floor(0.2 L), ..., floor(0.2 L)} positions (the paper's bound of 0.2 of
  the size), ``out[..., j] = x[..., j - s]`` where ``0 <= j - s < L`` and 0 elsewhere (zero fill, as
  the image translation fills with zeros). No flips (a mirrored digit signal is another signal) and
  no rotation (no second axis). Integer shifts keep the values exact: no resampling.

The sampled parameters are exposed (:func:`sample_paper_params`, :func:`sample_crop_flip_params`,
:func:`sample_shift_1d_params`) and the deterministic transforms take them explicitly (:func:`flip`,
:func:`affine`, :func:`crop`, :func:`shift_1d`), so each part can be tested on its own.

Conventions for :func:`affine`: angles in degrees, positive = counterclockwise as displayed (row 0 at the
top); shifts are fractions of the image width and height, positive = right and down.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import UserError, one_of

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

AUGMENTATIONS: dict[str, str] = {
    "none": "no augmentation",
    "paper": "flips, rotations up to 10 degrees, translations up to 0.2 of the image size (paper, appendix E.1)",
    "crop-flip": "random 32x32 crop of the image padded by 4 pixels, and horizontal flips (usual CIFAR recipe)",
    "shift-1d": "1-D signals: integer translations up to 0.2 of the length, zero fill (the paper's bound, one axis)",
}

IMAGE_AUGMENTATIONS = ("paper", "crop-flip")
SIGNAL_AUGMENTATIONS = ("shift-1d",)

PAPER_MAX_ANGLE = 10.0  # degrees
PAPER_MAX_SHIFT = 0.2  # fraction of the image size
CROP_PAD = 4  # pixels


@dataclass(frozen=True)
class PaperParams:
    flip: torch.Tensor  # (N,) bool
    angle: torch.Tensor  # (N,) degrees
    shift: torch.Tensor  # (N, 2) fractions of the width and height


@dataclass(frozen=True)
class CropFlipParams:
    dx: torch.Tensor  # (N,) column offset into the padded image, 0..2*pad
    dy: torch.Tensor  # (N,) row offset into the padded image, 0..2*pad
    flip: torch.Tensor  # (N,) bool


def _uniform(n: int, generator: torch.Generator, bound: float, *shape: int) -> torch.Tensor:
    """Uniform in [-bound, bound], drawn on the generator's device."""
    u = torch.rand(n, *shape, generator=generator, device=generator.device)
    return (2 * u - 1) * bound


def _coin(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device) < 0.5


def _check_images(x: torch.Tensor) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float batch of images (N, C, H, W), got {x.dtype} {tuple(x.shape)}")


def _check_signals(x: torch.Tensor) -> None:
    if x.dim() not in (2, 3):
        raise ValueError(f"expected a batch of 1-D signals (N, L) or (N, C, L), got {x.dtype} {tuple(x.shape)}")


def flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images where ``mask`` is true (left-right), leave the others."""
    _check_images(x)
    return torch.where(mask.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def affine(x: torch.Tensor, angle: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image by ``angle`` degrees about its centre, then shift it by ``shift`` (bilinear, zeros).

    In pixel coordinates about the centre (u right, v down) the content moves by p -> R p + t, with
    R the counterclockwise-as-displayed rotation and t = shift * (W, H). ``affine_grid`` wants the
    inverse map in normalized coordinates (x, y in [-1, 1]): p_in = S^-1 R^T S (p_out - t_n), where
    S = diag(W/2, H/2) converts normalized to pixel units and t_n = 2 * shift.
    """
    _check_images(x)
    n, _, h, w = x.shape
    rad = torch.deg2rad(angle.to(device=x.device, dtype=x.dtype))
    cos, sin = torch.cos(rad), torch.sin(rad)
    m = torch.stack(
        [torch.stack([cos, -sin * (h / w)], -1), torch.stack([sin * (w / h), cos], -1)], -2
    )  # (N, 2, 2) = S^-1 R^T S
    t = 2 * shift.to(device=x.device, dtype=x.dtype)
    theta = torch.cat([m, -(m @ t.unsqueeze(-1))], dim=-1)  # (N, 2, 3)
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def crop(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, pad: int = CROP_PAD) -> torch.Tensor:
    """Crop each image, zero-padded by ``pad``, back to its size at offsets (``dy``, ``dx``) of the padded one."""
    _check_images(x)
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = dy.to(x.device).view(n, 1) + torch.arange(h, device=x.device)  # (N, H)
    cols = dx.to(x.device).view(n, 1) + torch.arange(w, device=x.device)  # (N, W)
    padded = padded.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2 * pad))
    return padded.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


def sample_paper_params(
    n: int, generator: torch.Generator, max_angle: float = PAPER_MAX_ANGLE, max_shift: float = PAPER_MAX_SHIFT
) -> PaperParams:
    """Per-image flip, angle and shift of the ``"paper"`` augmentation, in that order from ``generator``."""
    return PaperParams(
        flip=_coin(n, generator),
        angle=_uniform(n, generator, max_angle),
        shift=_uniform(n, generator, max_shift, 2),
    )


def sample_crop_flip_params(n: int, generator: torch.Generator, pad: int = CROP_PAD) -> CropFlipParams:
    """Per-image crop offsets and flip of the ``"crop-flip"`` augmentation."""
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=generator.device)
    return CropFlipParams(dx=offsets[0], dy=offsets[1], flip=_coin(n, generator))


def max_shift_1d(length: int, max_shift: float = PAPER_MAX_SHIFT) -> int:
    """The largest shift in positions for signals of ``length``: floor(max_shift * length) (8 for L = 40)."""
    return math.floor(round(max_shift * length, 9))  # rounded first: 0.29 * 100 is 28.999999999999996


def sample_shift_1d_params(
    n: int, generator: torch.Generator, length: int, max_shift: float = PAPER_MAX_SHIFT
) -> torch.Tensor:
    """Per-signal integer shifts (N,), uniform on {-m, ..., m} with m = :func:`max_shift_1d` (``length``)."""
    m = max_shift_1d(length, max_shift)
    return torch.randint(-m, m + 1, (n,), generator=generator, device=generator.device)


def shift_1d(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Translate each signal by ``shifts[i]`` positions (positive = towards higher index), zeros shifted in.

    ``out[i, ..., j] = x[i, ..., j - s_i]`` where ``0 <= j - s_i < L``, else 0; one gather for the batch.
    """
    _check_signals(x)
    length = x.shape[-1]
    src = torch.arange(length, device=x.device) - shifts.to(x.device).view(-1, 1)  # (N, L)
    valid = (src >= 0) & (src < length)
    shape = (len(x),) + (1,) * (x.dim() - 2) + (length,)
    gathered = x.gather(-1, src.clamp(0, length - 1).view(shape).expand(x.shape))
    return torch.where(valid.view(shape), gathered, torch.zeros((), dtype=x.dtype, device=x.device))


def paper_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The paper's augmentation (appendix E.1) on a batch: flip, then rotation and translation."""
    p = sample_paper_params(len(x), generator)
    return affine(flip(x, p.flip), p.angle, p.shift)


def crop_flip_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel zero padding, then a random horizontal flip."""
    p = sample_crop_flip_params(len(x), generator)
    return flip(crop(x, p.dx, p.dy), p.flip)


def shift_1d_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The ``"shift-1d"`` augmentation: a random integer translation of each signal, up to 0.2 of its length."""
    _check_signals(x)
    return shift_1d(x, sample_shift_1d_params(len(x), generator, x.shape[-1]))


_FUNCTIONS: dict[str, Augment | None] = {
    "none": None, "paper": paper_augment, "crop-flip": crop_flip_augment, "shift-1d": shift_1d_augment,
}


def make_augment(name: str) -> Augment | None:
    """The augmentation called ``name`` (one of :data:`AUGMENTATIONS`), or None for ``"none"``."""
    if name not in _FUNCTIONS:
        raise one_of("augment", name, AUGMENTATIONS)
    return _FUNCTIONS[name]


def check_augment(name: str, input_shape: tuple[int, ...]) -> None:
    """Raise :class:`UserError` unless ``name`` exists and suits inputs of shape ``input_shape``."""
    make_augment(name)
    if name in SIGNAL_AUGMENTATIONS and len(input_shape) not in (1, 2):
        raise UserError(
            f'augment: "{name}" transforms 1-D signals of shape (L,) or (C, L), but this data set\'s inputs '
            f'have shape {tuple(input_shape)}; use "paper", "crop-flip" or "none" for images'
        )
    if name in IMAGE_AUGMENTATIONS and len(input_shape) != 3:
        signal = ' or "shift-1d"' if len(input_shape) in (1, 2) else ""
        raise UserError(
            f'augment: "{name}" transforms images of shape (C, H, W), but this data set\'s inputs have '
            f'shape {tuple(input_shape)}; use augment = "none"{signal}'
        )
