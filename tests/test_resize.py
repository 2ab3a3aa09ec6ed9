"""imresize against an independent float64 reference written from MATLAB's rules."""
from __future__ import annotations

import math

import pytest
import torch

from sparsesr.data.resize import imresize


def _kernel(x: float) -> float:
    """Keys cubic, a = -0.5."""
    x = abs(x)
    if x <= 1:
        return 1.5 * x**3 - 2.5 * x**2 + 1
    if x <= 2:
        return -0.5 * x**3 + 2.5 * x**2 - 4 * x + 2
    return 0.0


def _mirror(k: int, n: int) -> int:
    """1-based index reflected into 1..n (symmetric padding: 0 -> 1, -1 -> 2, n+1 -> n)."""
    while k < 1 or k > n:
        k = 1 - k if k < 1 else 2 * n + 1 - k
    return k


def _resize_1d_matrix(n_in: int, n_out: int, scale: float) -> list[list[float]]:
    """Dense [n_out][n_in] interpolation matrix, one output pixel at a time."""
    width = 4 / scale if scale < 1 else 4.0
    matrix = []
    for i in range(1, n_out + 1):
        u = i / scale + 0.5 * (1 - 1 / scale)
        row = [0.0] * n_in
        total = 0.0
        for k in range(math.floor(u - width / 2) - 1, math.ceil(u + width / 2) + 2):
            w = scale * _kernel(scale * (u - k)) if scale < 1 else _kernel(u - k)
            row[_mirror(k, n_in) - 1] += w
            total += w
        matrix.append([w / total for w in row])
    return matrix


def _reference(image: torch.Tensor, out_h: int, out_w: int, scale: float | None = None) -> torch.Tensor:
    """[H, W] float64 -> [out_h, out_w], smaller scale factor first (as MATLAB).

    MATLAB uses the given scale for the weights; with an output size it uses size ratios.
    """
    h, w = image.shape
    sh, sw = (scale, scale) if scale is not None else (out_h / h, out_w / w)
    mh = torch.tensor(_resize_1d_matrix(h, out_h, sh), dtype=torch.float64)
    mw = torch.tensor(_resize_1d_matrix(w, out_w, sw), dtype=torch.float64)
    if sh <= sw:
        return (mh @ image) @ mw.T
    return mh @ (image @ mw.T)


@pytest.mark.parametrize(
    "shape, scale",
    [
        ((12, 12), 2), ((7, 9), 2), ((9, 11), 3), ((5, 6), 4), ((13, 10), 1.5), ((8, 7), 2.7),
        ((24, 24), 1 / 2), ((27, 15), 1 / 3), ((28, 20), 1 / 4), ((25, 19), 0.6), ((17, 23), 0.35),
    ],
)
def test_matches_reference(shape, scale):
    torch.manual_seed(0)
    image = torch.rand(shape, dtype=torch.float64)
    out = imresize(image, scale=scale)
    expected_h, expected_w = math.ceil(shape[0] * scale - 1e-9), math.ceil(shape[1] * scale - 1e-9)
    assert out.shape == (expected_h, expected_w)
    ref = _reference(image, expected_h, expected_w, scale)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape, scale", [((600, 7), 1 / 2), ((7, 530), 2), ((333, 300), 1 / 3)])
def test_matches_reference_on_images_larger_than_one_block(shape, scale):
    # imresize builds its interpolation matrix 256 output rows at a time.
    image = torch.rand(shape, dtype=torch.float64)
    out = imresize(image, scale=scale)
    ref = _reference(image, out.shape[0], out.shape[1], scale)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_size_argument_and_different_factors_per_axis():
    image = torch.rand(10, 14, dtype=torch.float64)
    out = imresize(image, size=(25, 7))  # up in H, down in W
    torch.testing.assert_close(out, _reference(image, 25, 7), rtol=0, atol=1e-12)
    out = imresize(image, size=(4, 21))  # down in H, up in W
    torch.testing.assert_close(out, _reference(image, 4, 21), rtol=0, atol=1e-12)


def test_batched_equals_per_image_and_keeps_dtype():
    batch = torch.rand(2, 3, 11, 13)
    out = imresize(batch, scale=1 / 3)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 5)
    for n in range(2):
        for c in range(3):
            torch.testing.assert_close(out[n, c], imresize(batch[n, c], scale=1 / 3))


def test_constant_image_stays_constant():
    # Weights are normalised per output pixel, so flat areas (and borders) keep their value.
    image = torch.full((3, 9, 9), 0.25, dtype=torch.float64)
    for scale in (2, 1 / 3, 0.7):
        torch.testing.assert_close(imresize(image, scale=scale), torch.full_like(imresize(image, scale=scale), 0.25))


def test_antialias_off_is_plain_cubic_interpolation():
    image = torch.rand(16, 16, dtype=torch.float64)
    out = imresize(image, scale=0.5, antialias=False)
    # Without antialiasing the kernel is not stretched: output pixel 1 sits at u = 1.5 and
    # takes the 4 nearest input pixels (0 mirrors to 1) with plain cubic weights.
    u = 1 / 0.5 + 0.5 * (1 - 1 / 0.5)
    weights = torch.zeros(16, dtype=torch.float64)
    for k in range(0, 4):
        weights[_mirror(k, 16) - 1] += _kernel(u - k)
    weights /= weights.sum()
    assert out[0, 0].item() == pytest.approx((weights @ image @ weights).item(), abs=1e-12)
    assert not torch.allclose(out, imresize(image, scale=0.5))


def test_errors():
    with pytest.raises(TypeError):
        imresize(torch.zeros(4, 4, dtype=torch.uint8), scale=2)
    with pytest.raises(ValueError):
        imresize(torch.zeros(4, 4), scale=2, size=(8, 8))
    with pytest.raises(ValueError):
        imresize(torch.zeros(4, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    image = torch.rand(2, 3, 20, 17, dtype=torch.float64)
    torch.testing.assert_close(imresize(image.cuda(), scale=1 / 3).cpu(), imresize(image, scale=1 / 3))
