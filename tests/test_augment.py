"""Batch augmentations: determinism, exact geometry of each part, and the sampled parameter ranges."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from batchgap.data.augment import (
    AUGMENTATIONS,
    affine,
    check_augment,
    crop,
    crop_flip_augment,
    flip,
    make_augment,
    paper_augment,
    max_shift_1d,
    sample_crop_flip_params,
    sample_paper_params,
    sample_shift_1d_params,
    shift_1d,
    shift_1d_augment,
)
from batchgap.errors import UserError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 6, c: int = 3, h: int = 12, w: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=gen(seed))


def centroid(img: torch.Tensor) -> tuple[float, float]:
    """Intensity-weighted (row, column) of a 2-D image."""
    rows, cols = torch.meshgrid(torch.arange(img.shape[0]), torch.arange(img.shape[1]), indexing="ij")
    total = img.sum()
    return float((rows * img).sum() / total), float((cols * img).sum() / total)


# --- names and checks ------------------------------------------------------------------------------


def test_names():
    assert set(AUGMENTATIONS) == {"none", "paper", "crop-flip", "shift-1d"}
    assert make_augment("none") is None
    assert make_augment("paper") is paper_augment and make_augment("crop-flip") is crop_flip_augment
    assert make_augment("shift-1d") is shift_1d_augment
    with pytest.raises(UserError, match=r"augment: unknown value 'crop_flip' \(did you mean \"crop-flip\"\?\); "
                                        r"allowed: crop-flip, none, paper, shift-1d"):
        make_augment("crop_flip")


def test_check_augment_refuses_image_augmentations_on_vectors():
    check_augment("none", (40,))
    check_augment("paper", (3, 32, 32))
    check_augment("crop-flip", (1, 28, 28))
    for name in ("paper", "crop-flip"):
        with pytest.raises(UserError,
                           match=rf'augment: "{name}" transforms images .* shape \(40,\); use augment = "none"'):
            check_augment(name, (40,))
    with pytest.raises(UserError, match="unknown value 'flips'"):
        check_augment("flips", (3, 32, 32))


def test_check_augment_takes_shift_1d_for_signals_only():
    check_augment("shift-1d", (40,))
    check_augment("shift-1d", (1, 40))
    for name in ("paper", "crop-flip"):  # image augmentations on signals: refused, shift-1d suggested
        with pytest.raises(UserError, match=rf'"{name}" transforms images .* shape \(1, 40\); '
                                            r'use augment = "none" or "shift-1d"$'):
            check_augment(name, (1, 40))
    for shape in [(3, 32, 32), (1, 28, 28)]:
        with pytest.raises(UserError) as info:
            check_augment("shift-1d", shape)
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith('augment: "shift-1d" transforms 1-D signals') and str(shape) in message


def test_shift_1d_refuses_images():
    with pytest.raises(ValueError, match=r"expected a batch of 1-D signals \(N, L\) or \(N, C, L\)"):
        shift_1d_augment(images(), gen(0))


@pytest.mark.parametrize("fn", [paper_augment, crop_flip_augment,
                                lambda x, g: crop(x, *torch.zeros(2, len(x), dtype=torch.long))])
def test_image_functions_refuse_vectors(fn):
    with pytest.raises(ValueError, match=r"expected a float batch of images \(N, C, H, W\)"):
        fn(torch.zeros(4, 40), gen(0))


# --- determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["paper", "crop-flip", "shift-1d"])
def test_output_depends_only_on_the_generator(name):
    fn = make_augment(name)
    x = torch.rand(16, 40, generator=gen(0)) if name == "shift-1d" else images()
    torch.manual_seed(1)
    a = fn(x, gen(5))
    torch.manual_seed(2)  # the global RNG must play no part
    b = fn(x, gen(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, fn(x, gen(6)))
    g = gen(5)
    first, second = fn(x, g), fn(x, g)  # the generator advances: a new draw each batch
    assert torch.equal(first, a) and not torch.equal(first, second)
    assert a.shape == x.shape and a.dtype == x.dtype


# --- flip ----------------------------------------------------------------------------------------


def test_flip_is_an_exact_mirror_where_asked():
    x = images(n=4, h=5, w=7)
    mask = torch.tensor([True, False, True, False])
    out = flip(x, mask)
    mirrored = x[..., torch.arange(6, -1, -1)]
    assert torch.equal(out[0], mirrored[0]) and torch.equal(out[2], mirrored[2])
    assert torch.equal(out[1], x[1]) and torch.equal(out[3], x[3])


# --- affine --------------------------------------------------------------------------------------


@pytest.mark.parametrize("h, w", [(12, 12), (7, 10)])
def test_zero_angle_zero_shift_reproduces_the_input(h, w):
    x = images(h=h, w=w)
    out = affine(x, torch.zeros(len(x)), torch.zeros(len(x), 2))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


def test_translation_moves_a_pixel_by_the_expected_amount():
    h, w = 10, 20  # shifts are fractions of each axis: 0.1 of the width = 2 pixels, of the height = 1
    x = torch.zeros(4, 1, h, w)
    x[:, 0, 4, 9] = 1.0
    shift = torch.tensor([[0.1, 0.0], [0.0, 0.2], [-0.2, -0.3], [0.5, 0.0]])
    out = affine(x, torch.zeros(4), shift)
    expected = torch.zeros_like(x)
    expected[0, 0, 4, 11] = expected[1, 0, 6, 9] = expected[2, 0, 1, 5] = expected[3, 0, 4, 19] = 1.0
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_translation_fills_with_zeros():
    x = torch.ones(1, 2, 10, 10)
    out = affine(x, torch.zeros(1), torch.tensor([[0.2, 0.0]]))  # content moves 2 pixels right
    assert torch.all(out[..., :2].abs() < 1e-6) and torch.allclose(out[..., 2:], torch.ones(1, 2, 10, 8))


def test_quarter_turn_is_counterclockwise_rot90_and_half_turn_mirrors_both_axes():
    x = images(n=2, h=9, w=9)
    quarter = affine(x, torch.full((2,), 90.0), torch.zeros(2, 2))
    torch.testing.assert_close(quarter, torch.rot90(x, 1, dims=(-2, -1)), rtol=0, atol=1e-5)
    z = torch.zeros(1, 1, 7, 15)  # rotation is in pixels, whatever the aspect ratio
    z[0, 0, 3, 10] = 1.0  # 3 pixels right of the centre (3, 7) ...
    expected = torch.zeros_like(z)
    expected[0, 0, 0, 7] = 1.0  # ... goes 3 pixels above it
    torch.testing.assert_close(affine(z, torch.tensor([90.0]), torch.zeros(1, 2)), expected, rtol=0, atol=1e-5)
    y = images(n=2, h=6, w=11)
    half = affine(y, torch.full((2,), 180.0), torch.zeros(2, 2))
    torch.testing.assert_close(half, y.flip(-1).flip(-2), rtol=0, atol=1e-5)


@pytest.mark.parametrize("angle", [10.0, -10.0])
def test_rotation_by_the_largest_angle_moves_mass_along_the_circle(angle):
    size, r = 21, 6
    x = torch.zeros(1, 1, size, size)
    x[0, 0, 10, 10 + r] = 1.0  # r pixels right of the centre
    out = affine(x, torch.tensor([angle]), torch.zeros(1, 2))[0, 0]
    a = math.radians(angle)  # counterclockwise as displayed: up (smaller row) for a positive angle
    row, col = centroid(out)
    assert abs(row - (10 - r * math.sin(a))) < 0.1 and abs(col - (10 + r * math.cos(a))) < 0.1
    assert abs(float(out.sum()) - 1.0) < 0.05 and float(out.min()) >= 0.0


def test_paper_augment_keeps_a_centred_object_whole_and_values_in_range():
    x = torch.zeros(64, 3, 32, 32)
    x[:, :, 12:20, 12:20] = 1.0  # 8x8 object: at most 0.2*32 + rotation slack from the centre stays inside
    out = paper_augment(x, gen(0))
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0 + 1e-6
    torch.testing.assert_close(out.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=1e-3, atol=0)


def test_paper_augment_is_the_composition_of_its_sampled_parameters():
    x = images(n=8)
    p = sample_paper_params(8, gen(3))
    expected = affine(flip(x, p.flip), p.angle, p.shift)
    assert torch.equal(paper_augment(x, gen(3)), expected)


def test_paper_parameters_cover_the_papers_ranges():
    n = 20000
    p = sample_paper_params(n, gen(0))
    assert p.flip.dtype == torch.bool and p.angle.shape == (n,) and p.shift.shape == (n, 2)
    assert float(p.angle.abs().max()) <= 10.0 and float(p.shift.abs().max()) <= 0.2
    assert float(p.angle.min()) < -9.9 and float(p.angle.max()) > 9.9  # uniform up to the bound
    assert float(p.shift.min()) < -0.199 and float(p.shift.max()) > 0.199
    assert abs(float(p.angle.mean())) < 0.2 and abs(float(p.angle.std()) - 20 / math.sqrt(12)) < 0.1
    assert abs(float(p.flip.float().mean()) - 0.5) < 0.02
    assert abs(float(torch.corrcoef(p.shift.T)[0, 1])) < 0.03  # the two axes are drawn independently


# --- crop-flip -----------------------------------------------------------------------------------


def test_crop_at_the_centre_offset_is_the_identity_and_corner_offsets_shift_in_zeros():
    x = images(n=2, h=8, w=10)
    four = torch.full((2,), 4)
    assert torch.equal(crop(x, four, four), x)
    out = crop(x, torch.zeros(2, dtype=torch.long), torch.full((2,), 8))  # window at the left, bottom
    assert (torch.equal(out[..., :4, 4:], x[..., 4:, :6]) and torch.all(out[..., 4:, :] == 0)
            and torch.all(out[..., :4] == 0))


def test_crop_flip_matches_its_sampled_parameters():
    x = images(n=10)
    p = sample_crop_flip_params(10, gen(4))
    padded = F.pad(x, (4, 4, 4, 4))
    out = crop_flip_augment(x, gen(4))
    for i in range(10):
        window = padded[i, :, p.dy[i] : p.dy[i] + 12, p.dx[i] : p.dx[i] + 12]
        assert torch.equal(out[i], window.flip(-1) if p.flip[i] else window)


def test_every_crop_flip_output_is_a_crop_of_the_padded_input():
    """Oracle with no knowledge of the parameters: search all 81 windows and their mirrors."""
    x = images(n=12, h=9, w=11)
    out = crop_flip_augment(x, gen(8))
    assert out.shape == x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):
        windows = [padded[i, :, dy : dy + 9, dx : dx + 11] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], win) or torch.equal(out[i], win.flip(-1)) for win in windows)


def test_crop_flip_parameters_cover_all_offsets():
    p = sample_crop_flip_params(5000, gen(1))
    assert set(p.dx.tolist()) == set(range(9)) and set(p.dy.tolist()) == set(range(9))
    assert abs(float(p.flip.float().mean()) - 0.5) < 0.03


# --- shift-1d ------------------------------------------------------------------------------------


def test_shift_1d_moves_a_spike_by_exactly_the_sampled_shift():
    n, length = 200, 40
    x = torch.zeros(n, length)
    pos = torch.randint(0, length, (n,), generator=gen(1))
    x[torch.arange(n), pos] = 1.0 + torch.arange(n, dtype=torch.float32)  # a distinct height per signal
    out = shift_1d_augment(x, gen(2))
    s = sample_shift_1d_params(n, gen(2), length)
    for i in range(n):
        expected = torch.zeros(length)
        if 0 <= pos[i] + s[i] < length:
            expected[pos[i] + s[i]] = x[i, pos[i]]  # positive shift = towards higher index
        assert torch.equal(out[i], expected), (i, int(pos[i]), int(s[i]))
    assert int((s != 0).sum()) > n // 2


def test_shift_1d_against_a_loop_oracle_with_channels():
    x = torch.rand(9, 2, 13, generator=gen(3)) + 1.0  # no zeros in the input: every zero is fill
    shifts = torch.tensor([-13, -12, -5, -1, 0, 1, 4, 12, 20])
    out = shift_1d(x, shifts)
    for i, s in enumerate(shifts.tolist()):
        for j in range(13):
            expected = x[i, :, j - s] if 0 <= j - s < 13 else torch.zeros(2)
            assert torch.equal(out[i, :, j], expected)


def test_shift_zero_is_the_identity():
    for x in (torch.randn(5, 40, generator=gen(0)), torch.randn(5, 1, 40, generator=gen(1))):
        assert torch.equal(shift_1d(x, torch.zeros(5, dtype=torch.long)), x)


def test_shift_1d_fills_with_zeros():
    x = torch.ones(3, 1, 40, dtype=torch.float64)
    out = shift_1d(x, torch.tensor([8, -8, 3]))
    assert out.dtype == torch.float64 and out.shape == x.shape
    assert torch.all(out[0, 0, :8] == 0) and torch.all(out[0, 0, 8:] == 1)
    assert torch.all(out[1, 0, 32:] == 0) and torch.all(out[1, 0, :32] == 1)
    assert torch.all(out[2, 0, :3] == 0) and torch.all(out[2, 0, 3:] == 1)
    inf = torch.full((1, 10), float("inf"))  # filled with 0, not 0 * value (which would be nan)
    assert torch.equal(shift_1d(inf, torch.tensor([2]))[0, :2], torch.zeros(2))


@pytest.mark.parametrize("length, bound", [(40, 8), (10, 2), (4, 0), (100, 20), (7, 1)])
def test_shift_bound_holds_and_every_shift_in_it_is_drawn(length, bound):
    assert max_shift_1d(length) == bound  # floor(0.2 L)
    s = sample_shift_1d_params(20000, gen(0), length)
    assert s.dtype == torch.long
    assert set(s.tolist()) == set(range(-bound, bound + 1))  # uniform on the integers in the bound
    counts = torch.bincount(s + bound).double()
    assert float((counts / counts.mean() - 1).abs().max()) < 0.15
    ramp = torch.arange(1, length + 1, dtype=torch.float32).repeat(2000, 1)  # ramp[i, j] = j + 1
    out = shift_1d_augment(ramp, gen(1))
    # read each shift back from the output: s >= 0 puts the 1 at index s, s < 0 starts the ramp at 1 - s
    first_nonzero = (out > 0).long().argmax(1)
    read = torch.where(out[:, 0] > 0, 1 - out[:, 0].long(), first_nonzero)
    assert torch.equal(read, sample_shift_1d_params(2000, gen(1), length))
    assert int(read.abs().max()) == bound
