"""The upscale engine around the tiles: quantized output written band by band, memory, out-of-memory, tile
options and half precision on the CPU."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from sparsesr.data.image_io import _to_uint16, to_uint8
from sparsesr.errors import NotEnoughMemoryError, SparseSRError
from sparsesr.models import build_model
from sparsesr.models.checkpoint import save_checkpoint
from sparsesr.upscaling import UpscaleEngine, UpscaleOptions, upscale_files

from test_tiling import CPU_ALLOCATOR_FAILURE

MODES = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}


def _engine(model=None, warn=None, **options) -> UpscaleEngine:
    return UpscaleEngine.load(model, UpscaleOptions(**options), warn=warn)


@pytest.fixture(scope="module")
def upscalers(one_thread):
    """The default x2 model, tiled (16-pixel tiles) and whole, per alpha option."""
    return {(tile, alpha): _engine(tile=tile, alpha=alpha, warn=lambda m: None)
            for tile in (0, 16) for alpha in ("bicubic", "model")}


def _pixels(mode, height=37, width=45, seed=0):
    pixels = torch.rand(MODES[mode], height, width, generator=torch.Generator().manual_seed(seed))
    if mode in ("LA", "RGBA"):
        pixels[-1, :10, :10] = 0  # transparent corner: the fill runs too
    return pixels


def _quantized(pixels, bit_depth):
    return to_uint8(pixels) if bit_depth == 8 else torch.from_numpy(_to_uint16(pixels))


@pytest.mark.parametrize("bit_depth", [8, 16])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("tile", [0, 16])
def test_quantized_output_is_bit_identical_to_quantizing_the_float_output(upscalers, mode, tile, bit_depth):
    alphas = ("bicubic", "model") if mode in ("LA", "RGBA") else ("bicubic",)
    for alpha in alphas:
        upscaler = upscalers[(tile, alpha)]
        pixels = _pixels(mode)
        expected = _quantized(upscaler.upscale_pixels(pixels, mode), bit_depth)
        got = upscaler.upscale_pixels(pixels, mode, bit_depth=bit_depth)
        assert got.dtype == (torch.uint8 if bit_depth == 8 else torch.uint16)
        assert got.shape == (MODES[mode], 74, 90) and torch.equal(got, expected), alpha
        assert got.permute(1, 2, 0).is_contiguous()  # HWC for the encoders without a copy


def test_quantized_output_at_a_scale_the_model_lacks(one_thread):
    upscaler = _engine(scale=3, tile=16)
    pixels = _pixels("RGB", 20, 26)
    got = upscaler.upscale_pixels(pixels, bit_depth=8)
    assert got.shape == (3, 60, 78) and torch.equal(got, to_uint8(upscaler.upscale_pixels(pixels)))


def test_bad_bit_depth_is_one_clear_error(upscalers):
    with pytest.raises(SparseSRError, match="bit depth must be 8 or 16"):
        upscalers[(0, "bicubic")].upscale_pixels(_pixels("RGB"), bit_depth=12)


def test_quantized_tiled_path_allocates_no_float_tensor_of_the_whole_output(upscalers, monkeypatch):
    allocated = []
    for name in ("zeros", "empty", "zeros_like", "empty_like", "cat", "stack"):
        real = getattr(torch, name)

        def recording(*args, _real=real, **kwargs):
            result = _real(*args, **kwargs)
            allocated.append((tuple(result.shape), result.dtype))
            return result

        monkeypatch.setattr(torch, name, recording)
    upscalers[(16, "bicubic")].upscale_pixels(torch.rand(3, 96, 40), bit_depth=8)
    # Images only ([C, H, W] or [N, C, H, W]): the CPU kernel may densify 2-D weights on the way.
    floats = [shape for shape, dtype in allocated if dtype.is_floating_point and len(shape) >= 3]
    assert (192, 80, 3) in [shape for shape, dtype in allocated if dtype == torch.uint8]  # channels-last
    assert floats and max(shape[-2] for shape in floats) <= (16 + 2 * 16) * 2  # one band of tile rows


_RSS_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from sparsesr.upscaling import UpscaleEngine, UpscaleOptions

    torch.set_num_threads(1)
    upscaler = UpscaleEngine.load(sys.argv[1], UpscaleOptions(tile=128, backend="dense"))
    pixels = torch.rand(3, 1500, 2000)
    upscaler.upscale_pixels(pixels[:, :64, :64], bit_depth=8)  # warm: one-time set-up is not the image's

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    out = upscaler.upscale_pixels(pixels, bit_depth=8)
    print(json.dumps({"added": status("VmHWM") - before, "shape": list(out.shape), "dtype": str(out.dtype)}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc/self/clear_refs")
def test_peak_memory_of_a_large_upscale_is_well_below_its_float_output(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, build_model("edsr-cpu", 2, n_resblocks=1, n_feats=8))
    proc = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(path)], capture_output=True, text=True,
                          timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shape"] == [3, 3000, 4000] and result["dtype"] == "torch.uint8"
    float_output = 3 * 3000 * 4000 * 4  # 137 MiB, what the old code held (twice) whatever the tile
    # Now: the uint8 output (34 MiB), a float band of (128 + 32) * 2 rows (15 MiB), a tile's activations.
    assert result["added"] < 0.6 * float_output, result  # measured: 0.5


# --- out of memory ----------------------------------------------------------------------------


def _failing_above(limit):
    """An ``UpscaleEngine._network`` whose network fails like torch's CPU allocator on large inputs."""
    def network(self):
        net = self.net

        def run(x):
            if max(x.shape[-2:]) > limit:
                raise RuntimeError(CPU_ALLOCATOR_FAILURE)
            return net(x)
        return run
    return network


def test_out_of_memory_halves_the_tile_and_the_result_matches(upscalers, monkeypatch):
    upscaler = upscalers[(0, "bicubic")]
    pixels = _pixels("RGB", 40, 40)
    whole = upscaler.upscale_pixels(pixels)
    monkeypatch.setattr(UpscaleEngine, "_network", _failing_above(39))  # untiled fails, 20-pixel tiles + pad fit
    assert (upscaler.upscale_pixels(pixels) - whole).abs().max() < 1 / 255
    assert (upscaler.upscale_pixels(pixels, bit_depth=8).int() - to_uint8(whole).int()).abs().max() <= 1


def test_out_of_memory_even_with_the_smallest_tiles_is_one_line(upscalers, monkeypatch):
    monkeypatch.setattr(UpscaleEngine, "_network", _failing_above(40))  # a 16-pixel tile with its pad is 48
    with pytest.raises(NotEnoughMemoryError, match=r"^not enough memory for a 70x50 image even with 16-pixel tiles"):
        upscalers[(0, "bicubic")].upscale_pixels(_pixels("RGB", 50, 70))


def test_no_memory_for_the_output_itself_is_one_line(upscalers, monkeypatch):
    real = torch.empty

    def empty(*args, **kwargs):
        if kwargs.get("dtype") == torch.uint8:
            raise RuntimeError(CPU_ALLOCATOR_FAILURE)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    with pytest.raises(NotEnoughMemoryError, match=r"^not enough memory for a 45x37 image: its 90x74 output needs"):
        upscalers[(0, "bicubic")].upscale_pixels(_pixels("RGB"), bit_depth=8)


def test_a_network_that_refuses_the_input_is_one_line(upscalers, monkeypatch):
    """Any other error of the network's forward (a padding a family cannot do, say) is one line
    that names the family and the size, not a traceback."""
    def network(self):
        def run(x):
            raise RuntimeError("Padding size should be less than the corresponding input dimension\nmore")
        return run

    monkeypatch.setattr(UpscaleEngine, "_network", network)
    with pytest.raises(SparseSRError, match=r"^the edsr network failed on a 45x37 input: Padding size should be "
                                            r"less than the corresponding input dimension$"):
        upscalers[(0, "bicubic")].upscale_pixels(_pixels("RGB"))


def test_the_batch_reports_the_file_that_does_not_fit_and_goes_on(tmp_path, monkeypatch, one_thread):
    rng = np.random.default_rng(0)
    PILImage.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    PILImage.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    monkeypatch.setattr(UpscaleEngine, "_network", _failing_above(40))
    lines = []
    result = upscale_files([tmp_path / "big.png", tmp_path / "small.png"], quiet=True, log=lines.append)
    assert [name for name, _ in result.failed] == [str(tmp_path / "big.png")]
    assert "not enough memory for a 64x64 image" in result.failed[0][1]
    assert [p.name for p in result.written] == ["small_x2.png"]


# --- tile options -----------------------------------------------------------------------------


def test_tiles_below_16_are_refused_before_the_model_loads(monkeypatch):
    monkeypatch.setattr("sparsesr.upscaling.engine.resolve_model", lambda *a: pytest.fail("model resolved"))
    for tile in (1, 15):
        with pytest.raises(SparseSRError, match="--tile must be 0 .automatic. or at least 16"):
            _engine(tile=tile)


def test_a_small_pad_warns_and_the_default_does_not():
    seen = []
    _engine(tile=64, tile_pad=4, warn=seen.append)
    assert len(seen) == 1 and "--tile-pad 4" in seen[0] and "seams" in seen[0]
    seen.clear()
    _engine(tile=64, warn=seen.append)
    assert seen == []


# --- half precision on the CPU ----------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_on_the_cpu_warns_once_and_runs_fp32(precision, one_thread, monkeypatch):
    monkeypatch.setattr("sparsesr.runtime.precision.cpu_has_amx_bf16", lambda: False)  # bf16's fast path needs AMX
    seen = []
    upscaler = _engine(device="cpu", precision=precision, warn=seen.append)
    needs = " (it needs a CPU with AMX-BF16)" if precision == "bf16" else ""
    assert seen == [f"{precision} has no fast CPU path here{needs}; running fp32"]
    assert upscaler.dtype == torch.float32 and upscaler._network() is upscaler.net
    pixels = _pixels("RGB", 12, 12)
    assert torch.equal(upscaler.upscale_pixels(pixels), _engine(device="cpu", precision="fp32").upscale_pixels(pixels))
    assert upscaler._half_net is None and len(seen) == 1


def test_auto_precision_on_the_cpu_is_fp32_without_a_warning():
    seen = []
    assert _engine(device="cpu", warn=seen.append).dtype == torch.float32 and seen == []


def test_non_finite_half_output_falls_back_to_fp32_in_the_banded_path(monkeypatch, one_thread):
    seen = []
    upscaler = _engine(device="cpu", tile=16, warn=seen.append)
    expected = upscaler.upscale_pixels(_pixels("RGB"), bit_depth=8)
    upscaler.dtype = torch.bfloat16  # as on a device with a fast half type (CUDA)
    real = UpscaleEngine._network

    def broken(self):
        net = real(self)
        return (lambda x: net(x) * float("inf")) if self.dtype != torch.float32 else net

    monkeypatch.setattr(UpscaleEngine, "_network", broken)
    got = upscaler.upscale_pixels(_pixels("RGB"), bit_depth=8)
    assert upscaler.dtype == torch.float32 and any("non-finite" in m for m in seen)
    assert torch.equal(got, expected)  # the rows written in bf16 were all written again
