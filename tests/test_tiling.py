from pathlib import Path

import numpy as np
import pytest
import torch

from sparsesr.errors import NotEnoughMemoryError, SparseSRError
from sparsesr.models import build_model
from sparsesr.runtime.tiling import (MIN_TILE, SEAMLESS_PAD, _axis_weight, check_tiling, is_out_of_memory,
                                     tiled_forward)

# What torch 2.13's CPU allocator raises when malloc fails (RuntimeError, no "out of memory" in it).
CPU_ALLOCATOR_FAILURE = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                         "memory: you tried to allocate 8112000000 bytes. Error code 12 (Cannot allocate memory)")


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("edsr-cpu", 2, n_resblocks=1, n_feats=8).eval()


def test_tiled_equals_untiled_on_an_image_several_tiles_wide(tiny_model):
    x = torch.rand(1, 3, 37, 83)  # not a multiple of the tile: ragged last tiles
    with torch.no_grad():
        full = tiny_model(x)
    calls = []
    tiled = tiled_forward(tiny_model, x, 2, tile=16, tile_pad=8, progress=lambda d, t: calls.append((d, t)))
    assert tiled.shape == full.shape
    assert (tiled - full).abs().max().item() < 1 / 255
    assert calls[-1] == (18, 18)  # 3 rows x 6 columns of tiles


def test_blend_weights_of_neighbours_sum_to_one():
    # Two tiles sharing the core boundary at 16 on a 32-pixel axis, pad 8, scale 2.
    left = _axis_weight(0, 16, 0, 24, 32, 8, 2, torch.device("cpu"))
    right = _axis_weight(16, 32, 8, 32, 32, 8, 2, torch.device("cpu"))
    total = torch.zeros(64)
    total[0:48] += left
    total[16:64] += right
    assert torch.allclose(total, torch.ones(64))
    assert left[0] == 1 and right[-1] == 1  # no fade at the image border


def test_without_padding_the_seams_show(tiny_model):
    # The overlap is what makes tiling exact: with no pad, tile borders see zero padding.
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        full = tiny_model(x)
    assert (tiled_forward(tiny_model, x, 2, tile=16, tile_pad=0) - full).abs().max() > 1 / 255


class _OOMAbove:
    """A fake x2 model that runs out of memory on inputs larger than ``limit`` pixels per side."""

    def __init__(self, limit: int, message: str = "CUDA out of memory. Tried to allocate 2 GiB") -> None:
        self.limit, self.message, self.sizes = limit, message, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[-2:]))
        if max(x.shape[-2:]) > self.limit:
            raise RuntimeError(self.message)
        return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")


def test_out_of_memory_halves_the_tile_and_retries():
    x = torch.rand(1, 3, 64, 64)
    model = _OOMAbove(limit=40)
    y = tiled_forward(model, x, 2, tile=0, tile_pad=4)  # untiled first: 64 > 40 fails
    assert torch.allclose(y, torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))
    assert model.sizes[0] == (64, 64)  # the untiled attempt that failed
    assert len(model.sizes) > 2 and all(max(s) <= 40 for s in model.sizes[1:])  # then tiles of 32 + pad


def test_out_of_memory_everywhere_gives_a_clear_error():
    with pytest.raises(NotEnoughMemoryError, match="not enough memory for a 80x64 image even with 16-pixel tiles"):
        tiled_forward(_OOMAbove(limit=4, message=CPU_ALLOCATOR_FAILURE), torch.rand(1, 3, 64, 80), 2, tile=32)


def test_cpu_allocation_failure_halves_the_tile_and_retries():
    x = torch.rand(1, 3, 64, 64)
    for failure in (CPU_ALLOCATOR_FAILURE, "DefaultCPUAllocator: not enough memory: you tried to allocate 1 GB"):
        model = _OOMAbove(limit=40, message=failure)
        y = tiled_forward(model, x, 2, tile=0, tile_pad=4)
        assert torch.allclose(y, torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))
        assert model.sizes[0] == (64, 64) and all(max(s) <= 40 for s in model.sizes[1:])


def test_memory_error_halves_the_tile_too():
    class Raises(_OOMAbove):
        def __call__(self, x):
            if max(x.shape[-2:]) > self.limit:
                raise MemoryError()
            return super().__call__(x)

    assert tiled_forward(Raises(limit=40), torch.rand(1, 3, 64, 64), 2, tile=0, tile_pad=4).shape == (1, 3, 128, 128)


def test_other_errors_are_not_swallowed():
    with pytest.raises(RuntimeError, match="shape mismatch"):
        tiled_forward(_OOMAbove(limit=0, message="shape mismatch"), torch.rand(1, 3, 8, 8), 2, tile=0)


def test_is_out_of_memory():
    assert is_out_of_memory(RuntimeError(CPU_ALLOCATOR_FAILURE))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(MemoryError())
    with pytest.raises(MemoryError) as numpy_failure:  # NumPy's _ArrayMemoryError, without allocating
        raise np.core._exceptions._ArrayMemoryError((2**40,), np.dtype(np.float32))
    assert is_out_of_memory(numpy_failure.value)
    assert not is_out_of_memory(RuntimeError("expected scalar type Float"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only allocation errors, not any text


# --- rows: bounded memory ---------------------------------------------------------------------


def _blend_into_one_output(model, x, scale, tile, pad):
    """Reference: every tile added into one full-size float32 output, in row-major tile order."""
    n, _, height, width = x.shape
    out = torch.zeros(n, 3, height * scale, width * scale)
    for y0 in range(0, height, tile):
        top, bottom = max(y0 - pad, 0), min(y0 + tile + pad, height)
        wy = _axis_weight(y0, min(y0 + tile, height), top, bottom, height, pad, scale, x.device)
        for x0 in range(0, width, tile):
            left, right = max(x0 - pad, 0), min(x0 + tile + pad, width)
            wx = _axis_weight(x0, min(x0 + tile, width), left, right, width, pad, scale, x.device)
            with torch.no_grad():
                out[:, :, top * scale:bottom * scale, left * scale:right * scale] += (
                    model(x[:, :, top:bottom, left:right]) * (wy[:, None] * wx[None, :]))
    return out


@pytest.mark.parametrize("tile,pad", [(16, 8), (16, 16), (20, 3), (32, 16)])
def test_rows_reach_the_sink_once_each_and_equal_one_full_blend(tiny_model, tile, pad):
    x = torch.rand(1, 3, 53, 41)
    pieces = []
    assert tiled_forward(tiny_model, x, 2, tile=tile, tile_pad=pad,
                         sink=lambda first, rows: pieces.append((first, rows.clone()))) is None
    firsts = [first for first, _ in pieces]
    assert firsts[0] == 0 and all(a + rows.shape[2] == b for (a, rows), b in zip(pieces, firsts[1:]))
    rows = torch.cat([rows for _, rows in pieces], dim=2)
    assert rows.shape == (1, 3, 106, 82)
    assert torch.equal(rows, _blend_into_one_output(tiny_model, x, 2, tile, min(pad, tile)))  # bit-identical
    assert torch.equal(rows, tiled_forward(tiny_model, x, 2, tile=tile, tile_pad=pad))


def test_with_a_sink_no_tensor_of_the_whole_output_is_allocated(tiny_model, monkeypatch):
    allocated = []
    for name in ("zeros", "empty", "zeros_like", "empty_like"):
        real = getattr(torch, name)

        def recording(*args, _real=real, **kwargs):
            result = _real(*args, **kwargs)
            allocated.append(tuple(result.shape))
            return result

        monkeypatch.setattr(torch, name, recording)
    biggest_sink_rows = []
    x = torch.rand(1, 3, 96, 40)
    tiled_forward(tiny_model, x, 2, tile=16, tile_pad=8, sink=lambda first, rows: biggest_sink_rows.append(rows.shape[2]))
    band_rows = (16 + 2 * 8) * 2
    assert allocated and max(shape[-2] for shape in allocated if len(shape) == 4) <= band_rows
    assert sum(biggest_sink_rows) == 192 and max(biggest_sink_rows) <= band_rows


def test_untiled_run_hands_the_whole_output_to_the_sink(tiny_model):
    x = torch.rand(1, 3, 12, 10)
    got = []
    tiled_forward(tiny_model, x, 2, tile=0, sink=lambda first, rows: got.append((first, rows)))
    with torch.no_grad():
        assert len(got) == 1 and got[0][0] == 0 and torch.equal(got[0][1], tiny_model(x))


def test_out_of_memory_in_the_sink_retries_from_the_top(tiny_model):
    calls = []

    def sink(first, rows):
        calls.append(first)
        if len(calls) == 2:
            raise RuntimeError(CPU_ALLOCATOR_FAILURE)

    tiled_forward(tiny_model, torch.rand(1, 3, 64, 64), 2, tile=32, tile_pad=8, sink=sink)
    assert calls[:2] == [0, 48] and calls[2] == 0 and len(calls) == 2 + 64 // 16  # then tiles of 16


# --- tile size and pad ------------------------------------------------------------------------


def test_tiles_below_the_minimum_are_refused(tiny_model):
    for tile in (1, 8, MIN_TILE - 1):
        with pytest.raises(SparseSRError, match="at least 16"):
            tiled_forward(tiny_model, torch.rand(1, 3, 32, 32), 2, tile=tile)
        with pytest.raises(SparseSRError, match="--tile must be 0 .automatic. or at least 16"):
            check_tiling(tile, 16)
    with pytest.raises(SparseSRError, match=">= 0"):
        check_tiling(16, -1)
    assert check_tiling(0, SEAMLESS_PAD) is None and check_tiling(MIN_TILE, 64) is None


def test_a_pad_below_the_seamless_one_warns():
    for pad in (0, SEAMLESS_PAD - 1):
        assert "seams may be visible" in check_tiling(64, pad)


@pytest.fixture(scope="module")
def shipped_architecture():
    """The shipped models' architecture (edsr-cpu: 16 blocks of 32 channels), random weights."""
    torch.manual_seed(1)
    return build_model("edsr-cpu", 2).eval()


def test_default_pad_hides_seams_on_the_shipped_architecture(shipped_architecture):
    x = torch.rand(1, 3, 70, 90)
    with torch.no_grad():
        full = shipped_architecture(x).clamp(0, 1)
    for tile in (MIN_TILE, 32):
        tiled = tiled_forward(shipped_architecture, x, 2, tile=tile, tile_pad=SEAMLESS_PAD).clamp(0, 1)
        assert (tiled - full).abs().max().item() < 1 / 255, tile


@pytest.mark.parametrize("name", ["x2", "fast", "x4"])
def test_shipped_models_are_seamless_from_the_warning_pad_on(name, one_thread):
    # SEAMLESS_PAD is where check_tiling stops warning: the measured edge for the shipped models.
    from sparsesr.data.image_io import read_image
    from sparsesr.pretrained import resolve_model
    from sparsesr.runtime import load

    net = load(resolve_model(name), device="cpu")
    scale = int(net.config.scale)
    x = read_image(Path(__file__).parents[1] / "sparsesr" / "assets" / "sample.png").pixels[None, :, 64:160, 64:160]
    with torch.no_grad():
        full = net(x).clamp(0, 1)

    def seam(pad):
        return (tiled_forward(net, x, scale, tile=32, tile_pad=pad).clamp(0, 1) - full).abs().max().item()

    assert seam(SEAMLESS_PAD) < 1 / 255
    if name == "x2":  # the widest model (64 channels) sets the edge: one pad step less shows seams
        assert seam(SEAMLESS_PAD - 2) > 1 / 255
    assert seam(16) < 0.05 / 255  # the default pad: far below one level
