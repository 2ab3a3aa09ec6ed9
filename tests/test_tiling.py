import pytest
import torch

from sparsesr.errors import BackendError
from sparsesr.models import build_model
from sparsesr.runtime.tiling import _axis_weight, is_out_of_memory, tiled_forward


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
    with pytest.raises(BackendError, match="out of memory"):
        tiled_forward(_OOMAbove(limit=4), torch.rand(1, 3, 64, 64), 2, tile=32, tile_pad=4)


def test_other_errors_are_not_swallowed():
    with pytest.raises(RuntimeError, match="shape mismatch"):
        tiled_forward(_OOMAbove(limit=0, message="shape mismatch"), torch.rand(1, 3, 8, 8), 2, tile=0)


def test_is_out_of_memory():
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: out of memory"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("expected scalar type Float"))
