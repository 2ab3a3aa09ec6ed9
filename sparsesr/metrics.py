"""PSNR and SSIM on the Y channel, computed the way published SR tables compute them.

Protocol (see docs/evaluation.md): RGB images are converted to BT.601 luma
``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` (RGB in [0, 1], so Y is on a 0-255 scale in
[16, 235]); single-channel images are scored on that channel, scaled to 0-255, without the Y
mapping. ``crop_border`` pixels are removed from every side, everything is float64.
SSIM follows Wang et al. 2004 as MATLAB's ``ssim_index.m`` / BasicSR: 11x11 Gaussian window
with sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, statistics over the 'valid' region only.

Inputs are tensors ``[C, H, W]`` or ``[N, C, H, W]`` with C = 1 or 3, either uint8 or floating
point in [0, 1]. For numbers comparable with published tables, pass images already rounded to
8 bits (``sparsesr.data.image_io.quantize``); the metrics themselves do not round.
A batch gives the mean of the per-image values (published tables average per image).
"""
from __future__ import annotations

import math

import torch

__all__ = ["psnr", "ssim", "to_y", "BT601_Y_WEIGHTS"]

# BT.601 luma weights for RGB in [0, 1] giving Y on a 0-255 scale (offset 16).
BT601_Y_WEIGHTS = (65.481, 128.553, 24.966)


def _as_batch_float64(image: torch.Tensor) -> torch.Tensor:
    """[C,H,W] or [N,C,H,W], uint8 or float in [0,1] -> float64 [N,C,H,W] in [0,1]."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4:
        raise ValueError(f"expected an image [C,H,W] or a batch [N,C,H,W], got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.to(torch.float64) / 255.0
    if not image.is_floating_point():
        raise TypeError(f"expected uint8 or floating-point pixels, got {image.dtype}")
    return image.to(torch.float64)


def to_y(image: torch.Tensor) -> torch.Tensor:
    """The channel that gets scored, on a 0-255 scale, float64, shape [N, H, W].

    3 channels -> BT.601 Y in [16, 235]; 1 channel -> that channel * 255.
    """
    image = _as_batch_float64(image)
    channels = image.shape[1]
    if channels == 3:
        r, g, b = image[:, 0], image[:, 1], image[:, 2]
        wr, wg, wb = BT601_Y_WEIGHTS
        return 16.0 + wr * r + wg * g + wb * b
    if channels == 1:
        return image[:, 0] * 255.0
    raise ValueError(f"expected 1 (grayscale) or 3 (RGB) channels, got {channels}")


def _prepare(sr: torch.Tensor, hr: torch.Tensor, crop_border: int) -> tuple[torch.Tensor, torch.Tensor]:
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr shapes differ: {tuple(sr.shape)} vs {tuple(hr.shape)}")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    sr_y, hr_y = to_y(sr), to_y(hr.to(sr.device))
    if crop_border > 0:
        sr_y = sr_y[:, crop_border:-crop_border, crop_border:-crop_border]
        hr_y = hr_y[:, crop_border:-crop_border, crop_border:-crop_border]
    if sr_y.numel() == 0:
        raise ValueError(f"nothing left to score after cropping {crop_border} pixels from {tuple(sr.shape)}")
    return sr_y, hr_y


def psnr(sr: torch.Tensor, hr: torch.Tensor, crop_border: int) -> float:
    """Peak signal-to-noise ratio in dB on Y (peak 255); ``inf`` for identical images."""
    sr_y, hr_y = _prepare(sr, hr, crop_border)
    mse = ((sr_y - hr_y) ** 2).mean(dim=(1, 2))
    values = [math.inf if m == 0 else 10.0 * math.log10(255.0**2 / m) for m in mse.tolist()]
    return sum(values) / len(values)


def _gaussian_1d(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1-D Gaussian; the 2-D SSIM window is its outer product with itself."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _valid_filter_matrix(n: int, g: torch.Tensor) -> torch.Tensor:
    """[n - k + 1, n] matrix M such that M @ v is the 'valid' correlation of v with g (length k)."""
    k = g.numel()
    rows = torch.arange(n - k + 1, device=g.device)
    matrix = torch.zeros(n - k + 1, n, dtype=g.dtype, device=g.device)
    for offset in range(k):
        matrix[rows, rows + offset] = g[offset]
    return matrix


def _filter_rows(t: torch.Tensor, g: torch.Tensor, block: int = 256) -> torch.Tensor:
    """'valid' correlation of every column of [..., H, W] with g, along H.

    Done as products with a banded matrix, ``block`` output rows at a time so the cost stays
    linear in H. Exact up to rounding, and several times faster than a float64 conv2d (which
    has no optimised CPU path) or a sum of shifted slices.
    """
    k = g.numel()
    n_out = t.shape[-2] - k + 1
    band = _valid_filter_matrix(min(block, n_out) + k - 1, g)
    pieces = []
    for start in range(0, n_out, block):
        rows = min(block, n_out - start)
        pieces.append(band[:rows, : rows + k - 1] @ t[..., start : start + rows + k - 1, :])
    return torch.cat(pieces, dim=-2)


def _filter_valid(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """'valid' 2-D filtering of [..., H, W] by the separable window outer(g, g)."""
    return _filter_rows(_filter_rows(t, g).transpose(-1, -2), g).transpose(-1, -2)


def ssim(sr: torch.Tensor, hr: torch.Tensor, crop_border: int) -> float:
    """Structural similarity on Y (Wang et al. 2004, MATLAB settings); 1 for identical images."""
    sr_y, hr_y = _prepare(sr, hr, crop_border)
    if min(sr_y.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels after cropping, got {tuple(sr_y.shape[-2:])}")
    c1 = (0.01 * 255) ** 2
    c2 = (0.03 * 255) ** 2
    g = _gaussian_1d().to(sr_y.device)
    # Filter the five maps in one batch: local means, second moments and cross moment.
    maps = torch.stack([sr_y, hr_y, sr_y * sr_y, hr_y * hr_y, sr_y * hr_y])
    mu_x, mu_y, xx, yy, xy = _filter_valid(maps, g)
    var_x = xx - mu_x**2
    var_y = yy - mu_y**2
    cov = xy - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2)).mean().item()
