"""Tiled inference: run an upscaler on overlapping tiles and blend them without seams.

Each tile owns a *core* rectangle of the input (the tiles' cores partition the image) and is run
on the core grown by ``tile_pad`` pixels on every side, so the network sees real context instead
of its zero padding. Where two tiles meet, their outputs are cross-faded with linear weights over
``tile_pad`` input pixels centred on the core boundary; the weights of neighbouring tiles sum to
one, so a network whose receptive radius is at most ``tile_pad / 2`` gives exactly the untiled
result, and a deeper one gives a result whose small border errors are feathered away.

If a tile runs out of memory, the tile size is halved and tiling starts over.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch

from sparsesr.errors import BackendError

MIN_TILE = 16  # below this, tiles are mostly padding: give up instead
Progress = Callable[[int, int], None]  # (tiles done, tiles in total)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's ``OutOfMemoryError`` and the plain ``RuntimeError`` other devices raise."""
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
    )


def _free_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def auto_tile_size(x: torch.Tensor, scale: int, n_feats: int = 64, max_tile: int = 1024) -> int:
    """A tile side (input pixels) whose activations use about a quarter of the free memory.

    Per input pixel the network keeps a few feature maps of ``n_feats`` channels alive, plus the
    upsampler's ``n_feats * scale**2`` ones; 4 bytes each (fp32) times a safety factor of 2.
    Returns 0 ("no tiling") when the whole image fits.
    """
    if x.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(x.device)
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 4 << 30
    bytes_per_pixel = 2 * x.element_size() * x.shape[0] * n_feats * (4 + 2 * scale * scale)
    side = int(math.sqrt(free / 4 / bytes_per_pixel))
    if side >= max(x.shape[-2:]):
        return 0
    return max(MIN_TILE * 4, min(max_tile, side // 8 * 8))


def _starts(length: int, tile: int) -> list[int]:
    return list(range(0, length, tile))


def _axis_weight(core0: int, core1: int, lo: int, hi: int, length: int, pad: int, scale: int,
                 device: torch.device) -> torch.Tensor:
    """Blend weights for the output pixels of input range [lo, hi), whose tile owns [core0, core1).

    Linear ramps of width ``pad`` centred on each core edge that is not an image edge; the
    ramps of two neighbours are complementary (they sum to 1).
    """
    centres = (torch.arange(lo * scale, hi * scale, device=device, dtype=torch.float32) + 0.5) / scale
    weight = torch.ones_like(centres)
    if pad == 0:
        return ((centres >= core0) & (centres < core1)).float()
    if core0 > 0:
        weight = weight * ((centres - core0) / pad + 0.5).clamp(0, 1)
    if core1 < length:
        weight = weight * ((core1 - centres) / pad + 0.5).clamp(0, 1)
    return weight


def _tiled_once(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, scale: int, tile: int,
                pad: int, progress: Progress | None) -> torch.Tensor:
    n, _, height, width = x.shape
    ys, xs = _starts(height, tile), _starts(width, tile)
    total = len(ys) * len(xs)
    out = None
    done = 0
    for y0 in ys:
        y1 = min(y0 + tile, height)
        top, bottom = max(y0 - pad, 0), min(y1 + pad, height)
        wy = _axis_weight(y0, y1, top, bottom, height, pad, scale, x.device)
        for x0 in xs:
            x1 = min(x0 + tile, width)
            left, right = max(x0 - pad, 0), min(x1 + pad, width)
            y = model(x[:, :, top:bottom, left:right])
            if out is None:  # the output's channel count and dtype come from the model
                out = torch.zeros(n, y.shape[1], height * scale, width * scale, dtype=torch.float32, device=x.device)
            wx = _axis_weight(x0, x1, left, right, width, pad, scale, x.device)
            out[:, :, top * scale:bottom * scale, left * scale:right * scale] += y.float() * (wy[:, None] * wx[None, :])
            done += 1
            if progress is not None:
                progress(done, total)
    return out.to(x.dtype)


@torch.no_grad()
def tiled_forward(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    scale: int,
    tile: int,
    tile_pad: int = 16,
    progress: Progress | None = None,
) -> torch.Tensor:
    """``model(x)`` for ``x`` [N, C, H, W], computed on ``tile``-pixel tiles blended over ``tile_pad``.

    ``tile`` <= 0 or at least the image size runs the whole image at once. On out-of-memory the
    tile size is halved (an untiled run falls back to tiles of half the image) and tiling starts
    over; below ``MIN_TILE`` pixels a ``BackendError`` is raised. ``progress(done, total)`` is
    called after each tile.
    """
    if x.dim() != 4:
        raise ValueError(f"tiled_forward expects [N, C, H, W], got shape {tuple(x.shape)}")
    height, width = x.shape[-2:]
    while True:
        try:
            if tile <= 0 or tile >= max(height, width):
                y = model(x)
                if progress is not None:
                    progress(1, 1)
                return y
            pad = min(tile_pad, tile)  # a pad wider than the tile would make ramps of one tile overlap
            return _tiled_once(model, x, scale, tile, pad, progress)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if not is_out_of_memory(exc):
                raise
            _free_cache(x.device)
            tile = (max(height, width) if tile <= 0 or tile >= max(height, width) else tile) // 2
            if tile < MIN_TILE:
                raise BackendError(
                    f"out of memory even with {MIN_TILE}-pixel tiles on {x.device}; try --device cpu"
                ) from None
