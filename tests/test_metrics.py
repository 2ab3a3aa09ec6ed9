"""PSNR/SSIM on Y against hand-computed values and a direct (non-separable) SSIM reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparsesr.metrics import psnr, ssim, to_y


def _random_image(channels: int, h: int = 24, w: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, h, w), generator=g, dtype=torch.uint8)


def test_identical_images():
    image = _random_image(3)
    assert psnr(image, image, crop_border=2) == math.inf
    assert ssim(image, image, crop_border=2) == pytest.approx(1.0, abs=1e-12)


def test_known_mse_on_grayscale():
    hr = torch.full((1, 16, 16), 100, dtype=torch.uint8)
    sr = hr + 10  # every pixel off by 10 on the 0-255 scale: MSE = 100
    assert psnr(sr, hr, crop_border=0) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-12)


def test_known_mse_on_rgb_goes_through_y():
    hr = torch.full((3, 16, 16), 0.5, dtype=torch.float64)
    sr = hr + 1 / 255  # Y moves by (65.481 + 128.553 + 24.966) / 255 = 219 / 255
    expected = 10 * math.log10(255**2 / (219 / 255) ** 2)
    assert psnr(sr, hr, crop_border=0) == pytest.approx(expected, abs=1e-9)


def test_y_conversion_range_and_grayscale_untouched():
    black_white = torch.tensor([0.0, 1.0], dtype=torch.float64).view(1, 1, 2).expand(3, 1, 2)
    assert to_y(black_white).flatten().tolist() == pytest.approx([16.0, 235.0])
    gray = torch.tensor([[[0.0, 1.0]]], dtype=torch.float64)
    assert to_y(gray).flatten().tolist() == pytest.approx([0.0, 255.0])


def test_uint8_and_float_inputs_agree():
    sr, hr = _random_image(3, seed=1), _random_image(3, seed=2)
    assert psnr(sr, hr, 3) == pytest.approx(psnr(sr.double() / 255, hr.double() / 255, 3), abs=1e-12)
    assert ssim(sr, hr, 3) == pytest.approx(ssim(sr.double() / 255, hr.double() / 255, 3), abs=1e-12)


def test_crop_border_removes_border_differences():
    hr = _random_image(3)
    sr = hr.clone()
    sr[:, :2, :] = 0
    sr[:, :, -2:] = 255
    assert psnr(sr, hr, crop_border=2) == math.inf
    assert psnr(sr, hr, crop_border=1) < 40


def test_batch_is_mean_of_images():
    a, b, c, d = (_random_image(3, seed=s) for s in range(4))
    batch_sr, batch_hr = torch.stack([a, c]), torch.stack([b, d])
    expected = (psnr(a, b, 2) + psnr(c, d, 2)) / 2
    assert psnr(batch_sr, batch_hr, 2) == pytest.approx(expected, abs=1e-12)
    assert ssim(batch_sr, batch_hr, 2) == pytest.approx((ssim(a, b, 2) + ssim(c, d, 2)) / 2, abs=1e-12)


def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004 with a full 11x11 window, one valid position at a time (0-255 inputs)."""
    coords = np.arange(11) - 5
    g = np.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * 1.5**2))
    g /= g.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (g * px).sum(), (g * py).sum()
            vx, vy = (g * (px - mx) ** 2).sum(), (g * (py - my) ** 2).sum()
            cov = (g * (px - mx) * (py - my)).sum()
            values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_direct_reference_on_y():
    sr, hr = _random_image(3, 22, 19, seed=5), _random_image(3, 22, 19, seed=6)
    # Make them correlated so SSIM is not near 0.
    sr = ((sr.int() + 3 * hr.int()) // 4).to(torch.uint8)
    crop = 3
    expected = _ssim_reference(to_y(sr)[0, crop:-crop, crop:-crop].numpy(), to_y(hr)[0, crop:-crop, crop:-crop].numpy())
    assert ssim(sr, hr, crop) == pytest.approx(expected, abs=1e-10)


def test_ssim_on_grayscale_uses_the_channel():
    sr, hr = _random_image(1, seed=7), _random_image(1, seed=8)
    expected = _ssim_reference(sr[0].double().numpy(), hr[0].double().numpy())
    assert ssim(sr, hr, 0) == pytest.approx(expected, abs=1e-10)


def test_errors():
    with pytest.raises(ValueError):
        psnr(_random_image(3), _random_image(1), 0)
    with pytest.raises(ValueError):
        psnr(_random_image(4), _random_image(4), 0)
    with pytest.raises(ValueError):
        ssim(_random_image(3, 12, 12), _random_image(3, 12, 12), 2)  # 8x8 left: smaller than the window


def test_blockwise_gaussian_filter_matches_conv2d_on_large_images():
    from sparsesr.metrics import _filter_valid, _gaussian_1d

    g = _gaussian_1d()
    image = torch.rand(2, 600, 270, dtype=torch.float64)  # several 256-row blocks, a ragged last one
    expected = torch.nn.functional.conv2d(image.unsqueeze(1), torch.outer(g, g)[None, None]).squeeze(1)
    torch.testing.assert_close(_filter_valid(image, g), expected, rtol=0, atol=1e-12)
