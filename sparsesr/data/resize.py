"""MATLAB-compatible bicubic ``imresize`` in pure torch.

Super-resolution benchmarks make their low-resolution inputs with MATLAB's ``imresize(img, 1/s,
'bicubic')``; other bicubic resizers (OpenCV, PIL) use other kernels or sampling rules and shift
published PSNR values. This module follows MATLAB's rules:

- cubic kernel with a = -0.5 (Keys 1981);
- output pixel ``x`` (1-based) samples input coordinate ``u = x / scale + 0.5 * (1 - 1 / scale)``;
- when downscaling (and ``antialias``), the kernel is stretched by ``1 / scale`` (so it is a
  low-pass filter) and its support grows from 4 to ``4 / scale`` input pixels;
- taps that fall outside the image are mirrored back in (symmetric padding: ..., 2, 1, 1, 2, ...);
- weights are normalised to sum to 1 for every output pixel, taps whose weight is zero for every
  output pixel are dropped;
- the dimension with the smaller scale factor is resized first (height first on ties).

Each dimension is resized separately, as products with (block-banded) interpolation matrices
built from these rules. Works on any ``[..., H, W]`` floating tensor, on any device.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["imresize", "cubic", "contributions"]


def cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``)."""
    ax = x.abs()
    ax2 = ax * ax
    ax3 = ax2 * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def contributions(
    in_length: int, out_length: int, scale: float, antialias: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input indices [out_length, taps] (0-based) and float64 weights [out_length, taps].

    Row ``i`` says which input pixels make output pixel ``i`` and with what weight.
    """
    kernel_width = 4.0
    stretch = scale < 1 and antialias
    if stretch:
        # A wider, lower kernel: h(x) = scale * cubic(scale * x), support 4 / scale.
        kernel_width = kernel_width / scale

    x = torch.arange(1, out_length + 1, dtype=torch.float64)  # 1-based output coordinates
    u = x / scale + 0.5 * (1 - 1 / scale)  # matching 1-based input coordinate
    left = torch.floor(u - kernel_width / 2)
    taps = math.ceil(kernel_width) + 2  # enough taps to cover the support wherever u falls
    indices = left[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]  # 1-based

    distance = u[:, None] - indices
    weights = scale * cubic(scale * distance) if stretch else cubic(distance)
    weights = weights / weights.sum(dim=1, keepdim=True)

    # Mirror out-of-range taps back into [1, in_length]: the sequence 1..n, n..1 repeated.
    mirror = torch.cat([torch.arange(1, in_length + 1), torch.arange(in_length, 0, -1)])
    indices = mirror[torch.remainder(indices.long() - 1, 2 * in_length)] - 1  # to 0-based

    # Drop tap columns that are zero for every output pixel (MATLAB does the same).
    used = (weights != 0).any(dim=0)
    return indices[:, used], weights[:, used]


def _resize_rows(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Resize dimension -2 of ``x``: output row i = sum over taps of weights[i, t] * x[indices[i, t]].

    Applied as products with a dense interpolation matrix, which BLAS runs several times faster
    than gathering taps. The matrix is built ``block`` output rows at a time over just the input
    rows they touch, so time and memory stay linear in the image size.
    """
    weights = weights.to(device=x.device, dtype=x.dtype)
    indices = indices.to(x.device)
    pieces = []
    for start in range(0, indices.shape[0], block):
        idx, w = indices[start : start + block], weights[start : start + block]
        first, last = int(idx.min()), int(idx.max())
        rows = torch.arange(idx.shape[0], device=x.device)[:, None].expand_as(idx)
        matrix = torch.zeros(idx.shape[0], last - first + 1, dtype=x.dtype, device=x.device)
        matrix.index_put_((rows, idx - first), w, accumulate=True)  # mirrored taps add up
        pieces.append(matrix @ x[..., first : last + 1, :])
    return torch.cat(pieces, dim=-2)


def _pair(value: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return float(value), float(value)
    first, second = value
    return float(first), float(second)


def imresize(
    x: torch.Tensor,
    scale: float | Sequence[float] | None = None,
    size: Sequence[int] | None = None,
    antialias: bool = True,
) -> torch.Tensor:
    """Resize the last two dimensions of ``x`` like MATLAB's ``imresize(x, ..., 'bicubic')``.

    Give exactly one of ``scale`` (a factor, or ``(scale_h, scale_w)``; output size is
    ``ceil(scale * input size)``) or ``size`` (``(H, W)``; each factor is then output/input).
    The result has ``x``'s dtype and is not clamped or rounded (cubic weights overshoot: clamp
    and quantise yourself where you need image values). Compute in float64 where you need
    bit-for-bit agreement with published pipelines.
    """
    if not x.is_floating_point():
        raise TypeError(f"imresize expects a floating-point tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"imresize expects a [..., H, W] tensor, got shape {tuple(x.shape)}")
    if (scale is None) == (size is None):
        raise ValueError("imresize needs exactly one of scale= or size=")

    in_h, in_w = x.shape[-2], x.shape[-1]
    if size is not None:
        out_h, out_w = int(size[0]), int(size[1])
        scale_h, scale_w = out_h / in_h, out_w / in_w
    else:
        scale_h, scale_w = _pair(scale)
        # MATLAB: ceil(scale * size). The tolerance keeps 1/3 * 96 (= 32.000000000000004) at 32.
        out_h = math.ceil(scale_h * in_h - 1e-9)
        out_w = math.ceil(scale_w * in_w - 1e-9)
    if out_h < 1 or out_w < 1 or scale_h <= 0 or scale_w <= 0:
        raise ValueError(f"imresize: invalid output size {out_h}x{out_w} for input {in_h}x{in_w}")

    def resize_h(t: torch.Tensor) -> torch.Tensor:
        return _resize_rows(t, *contributions(in_h, out_h, scale_h, antialias))

    def resize_w(t: torch.Tensor) -> torch.Tensor:
        return _resize_rows(t.transpose(-1, -2), *contributions(in_w, out_w, scale_w, antialias)).transpose(-1, -2)

    # Resize the dimension with the smaller factor first, as MATLAB does (less work when
    # downscaling; the order only matters at rounding level).
    out = resize_w(resize_h(x)) if scale_h <= scale_w else resize_h(resize_w(x))
    return out.contiguous()
