"""Tiled inference: run an upscaler on overlapping tiles and blend them without seams.

Each tile owns a *core* rectangle of the input (the tiles' cores partition the image) and is run
on the core grown by ``tile_pad`` pixels on every side, so the network sees real context instead
of its zero padding. Where two tiles meet, their outputs are cross-faded with linear weights over
``tile_pad`` input pixels centred on the core boundary; the weights of neighbouring tiles sum to
one, so a network whose receptive radius is at most ``tile_pad / 2`` gives exactly the untiled
result, and a deeper one gives a result whose small border errors are feathered away.

Tiles run row by row. Only the output rows of the current tile row are held in float32 (a band of
``(tile + 2 * tile_pad) * scale`` rows); rows that no later tile touches are final and are handed
to a ``sink`` (or copied into a full output), so with a sink the memory is bounded by the tile
size, not the image size.

If a tile runs out of memory, the tile size is halved and tiling starts over.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch

from sparsesr.errors import NotEnoughMemoryError, UsageError

MIN_TILE = 16  # below this, tiles are mostly padding: give up instead
# Smallest even pad at which the shipped models' tiled output stays within 1/255 of the untiled
# one. The 64-channel default x2 sets it (1.28/255 at 8, 0.14/255 at 10; the 32-channel models are
# under 0.4/255 at 8); docs/performance.md, "Memory and tiling". The default pad, 16, is above it.
# Smaller pads are allowed with a warning.
SEAMLESS_PAD = 10
Progress = Callable[[int, int], None]  # (tiles done, tiles in total)
RowSink = Callable[[int, torch.Tensor], None]  # (first output row, finished rows [N, C, r, W*scale])

# Texts of failed allocations that arrive as plain RuntimeErrors: the CPU allocator's ("can't
# allocate memory", older torch "not enough memory") and other devices' ("out of memory").
_OOM_TEXTS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True if ``exc`` is a failed allocation: ``torch.OutOfMemoryError`` (CUDA), ``MemoryError``
    (Python, NumPy) or a ``RuntimeError`` from torch's CPU allocator or another device saying so."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if isinstance(exc, MemoryError) or (oom_type is not None and isinstance(exc, oom_type)):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc).lower() for text in _OOM_TEXTS)


def check_tiling(tile: int, tile_pad: int) -> str | None:
    """Refuse a tile size below ``MIN_TILE`` (0 means automatic) or a negative pad, with one line;
    return a warning when ``tile_pad`` is too small to hide the seams (None otherwise)."""
    if tile < 0 or tile_pad < 0:
        raise UsageError(f"--tile and --tile-pad must be >= 0, got {tile} and {tile_pad}")
    if 0 < tile < MIN_TILE:
        raise UsageError(f"--tile must be 0 (automatic) or at least {MIN_TILE}, got {tile}")
    if tile_pad < SEAMLESS_PAD:
        return (f"--tile-pad {tile_pad} is below {SEAMLESS_PAD}: tile seams may be visible "
                "(differences above 1/255 from the untiled result) where the image is tiled")
    return None


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


def _tiled_rows(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, scale: int, tile: int,
                pad: int, progress: Progress | None, sink: RowSink) -> None:
    """Tile row by tile row: blend into a float32 band of output rows, hand finished rows to ``sink``.

    Every output pixel receives the same additions in the same order as in one full-size
    accumulator, so the rows are bit-identical to blending into the whole output at once.
    """
    n, _, height, width = x.shape
    ys, xs = _starts(height, tile), _starts(width, tile)
    total = len(ys) * len(xs)
    # One buffer for every band, reused: allocating a fresh band per tile row fragments the heap
    # and leaves its RSS growing (measured: +20 MiB over a 2000x1500 image).
    buffer: torch.Tensor | None = None
    carry: torch.Tensor | None = None  # rows of the previous band that this tile row still adds to
    done = 0
    for row, y0 in enumerate(ys):
        y1 = min(y0 + tile, height)
        top, bottom = max(y0 - pad, 0), min(y1 + pad, height)
        wy = _axis_weight(y0, y1, top, bottom, height, pad, scale, x.device)
        band = None  # output rows [top * scale, bottom * scale)
        for x0 in xs:
            x1 = min(x0 + tile, width)
            left, right = max(x0 - pad, 0), min(x1 + pad, width)
            y = model(x[:, :, top:bottom, left:right])
            if band is None:  # the output's channel count comes from the model
                if buffer is None:
                    buffer = torch.empty(n, y.shape[1], min(tile + 2 * pad, height) * scale, width * scale,
                                         dtype=torch.float32, device=x.device)
                band = buffer[:, :, :(bottom - top) * scale]
                band.zero_()
                if carry is not None:
                    band[:, :, :carry.shape[2]] = carry
                    carry = None
            wx = _axis_weight(x0, x1, left, right, width, pad, scale, x.device)
            band[:, :, :, left * scale:right * scale] += y.float() * (wy[:, None] * wx[None, :])
            del y
            done += 1
            if progress is not None:
                progress(done, total)
        # Rows above the next tile row's padded top get no more additions: they are final.
        final = (bottom - top) * scale if row + 1 == len(ys) else (max(ys[row + 1] - pad, 0) - top) * scale
        if final:  # 0 when the pad equals the tile: the next row starts where this one did
            sink(top * scale, band[:, :, :final].to(x.dtype))
        if final < band.shape[2]:
            carry = band[:, :, final:].clone()  # a copy: the next band overwrites the buffer


def _full_output(x: torch.Tensor, channels: int, scale: int) -> torch.Tensor:
    n, _, height, width = x.shape
    try:
        return torch.empty(n, channels, height * scale, width * scale, dtype=x.dtype, device=x.device)
    except Exception as exc:  # noqa: BLE001 - only a failed allocation is translated
        if not is_out_of_memory(exc):
            raise
        raise NotEnoughMemoryError(
            f"not enough memory for a {width}x{height} image: its {width * scale}x{height * scale} "
            f"output alone needs {n * channels * height * width * scale * scale * x.element_size() / 2**30:.1f} GiB"
        ) from None


@torch.no_grad()
def tiled_forward(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    scale: int,
    tile: int,
    tile_pad: int = 16,
    progress: Progress | None = None,
    sink: RowSink | None = None,
) -> torch.Tensor | None:
    """``model(x)`` for ``x`` [N, C, H, W], computed on ``tile``-pixel tiles blended over ``tile_pad``.

    ``tile`` <= 0 or at least the image size runs the whole image at once; otherwise it must be at
    least ``MIN_TILE``. On out-of-memory the tile size is halved (an untiled run falls back to
    tiles of half the image) and tiling starts over; below ``MIN_TILE`` pixels a
    ``NotEnoughMemoryError`` is raised. ``progress(done, total)`` is called after each tile.

    With ``sink``, nothing is returned: ``sink(first_row, rows)`` receives the output rows (dtype
    of ``x``, on its device; a view valid during the call only) top to bottom, each row once, and
    no tensor of the whole output is allocated. After an out-of-memory retry the rows come again
    from the top, so a sink should write them in place.
    """
    if x.dim() != 4:
        raise ValueError(f"tiled_forward expects [N, C, H, W], got shape {tuple(x.shape)}")
    if 0 < tile < MIN_TILE:
        raise UsageError(f"tile must be 0 (automatic) or at least {MIN_TILE} pixels, got {tile}")
    height, width = x.shape[-2:]
    while True:
        try:
            if tile <= 0 or tile >= max(height, width):
                y = model(x)
                if progress is not None:
                    progress(1, 1)
                if sink is None:
                    return y
                sink(0, y)
                return None
            pad = min(tile_pad, tile)  # a pad wider than the tile would make ramps of one tile overlap
            if sink is not None:
                _tiled_rows(model, x, scale, tile, pad, progress, sink)
                return None
            out: list[torch.Tensor] = []

            def keep(first: int, rows: torch.Tensor) -> None:
                if not out:
                    out.append(_full_output(x, rows.shape[1], scale))
                out[0][:, :, first:first + rows.shape[2]] = rows

            _tiled_rows(model, x, scale, tile, pad, progress, keep)
            return out[0]
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if not is_out_of_memory(exc):
                raise
        # Outside the except block: the traceback (and the tensors its frames hold) is gone.
        _free_cache(x.device)
        tile = (max(height, width) if tile <= 0 or tile >= max(height, width) else tile) // 2
        if tile < MIN_TILE:
            hint = "; try --device cpu" if x.device.type == "cuda" else ""
            raise NotEnoughMemoryError(
                f"not enough memory for a {width}x{height} image even with {MIN_TILE}-pixel tiles "
                f"on {x.device}{hint}"
            )
