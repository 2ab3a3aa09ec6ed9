"""``sparsesr upscale``: the CLI on generated files, image fidelity, errors, the Python API, sharding."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from PIL import ImageCms

import sparsesr
from sparsesr.cli import main
from sparsesr.data.image_io import Image, read_image, write_image
from sparsesr.errors import SparseSRError
from sparsesr.format import export
from sparsesr.models import build_model
from sparsesr.models.checkpoint import save_checkpoint
from sparsesr.pretrained import EMBEDDED_MODELS, list_models, resolve_model
from sparsesr.upscaling import Upscaler, fill_transparent, upscale_files


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A tiny random x2 model as a checkpoint and as an exported file."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    save_checkpoint(folder / "tiny.safetensors", build_model("edsr-cpu", 2, n_resblocks=1, n_feats=8))
    export(folder / "tiny.safetensors", folder / "tiny.sparsesr.safetensors")
    return folder


@pytest.fixture(autouse=True)
def embedded(model_files, tmp_path, monkeypatch):
    """Point the registry at a folder holding the tiny model as ``x2`` and ``fast`` (no ``x4``)."""
    folder = tmp_path / "embedded"
    folder.mkdir()
    for name in ("x2", "fast"):
        shutil.copy(model_files / "tiny.sparsesr.safetensors", folder / EMBEDDED_MODELS[name].filename)
    monkeypatch.setenv("SPARSESR_MODEL_DIR", str(folder))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return folder


def _save(path, mode="RGB", size=(24, 20), seed=0, **params):
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    im = PILImage.fromarray(array[:, :, 0] if channels == 1 else array, mode=mode)
    im.save(path, **params)
    return path


def _run(*args) -> int:
    return main(["upscale", "-q", *map(str, args)])


# --- modes, bit depth, metadata ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_modes_are_kept(tmp_path, mode):
    source = _save(tmp_path / "in.png", mode)
    assert _run(source) == 0
    out = read_image(tmp_path / "in_x2.png")
    assert out.mode == mode and out.bit_depth == 8
    assert out.size == (40, 48)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_16bit_png_stays_16bit(tmp_path, mode):
    channels = len(mode)
    pixels = torch.rand(channels, 12, 10)
    write_image(tmp_path / "deep.png", pixels, mode, 16)
    assert read_image(tmp_path / "deep.png").bit_depth == 16
    assert _run(tmp_path / "deep.png") == 0
    out = read_image(tmp_path / "deep_x2.png")
    assert out.bit_depth == 16 and out.mode == mode and out.size == (24, 20)
    levels = torch.round(out.pixels * 65535)
    assert (levels % 257 != 0).any()  # real 16-bit values, not 8-bit ones stretched


def test_16bit_grayscale_tiff_stays_16bit_tiff(tmp_path):
    write_image(tmp_path / "deep.tif", torch.rand(1, 8, 8), "L", 16)
    assert _run(tmp_path / "deep.tif") == 0
    out = read_image(tmp_path / "deep_x2.tif")
    assert out.bit_depth == 16 and out.mode == "L"


def test_gray_output_has_no_colour_cast(tmp_path):
    # A gray image in RGB comes out gray-ish through a random model; stored as L it must be L.
    _save(tmp_path / "g.png", "L")
    assert _run(tmp_path / "g.png", "--ext", "webp") == 0  # WebP stores gray as RGB: R == G == B
    rgb = read_image(tmp_path / "g_x2.webp").pixels
    assert torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[1], rgb[2])


def test_exif_orientation_is_applied_and_metadata_kept(tmp_path):
    exif = PILImage.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    exif[0x010F] = "sparsesr-test"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    _save(tmp_path / "photo.jpg", "RGB", size=(30, 20), exif=exif.tobytes(), icc_profile=icc, quality=95)
    assert _run(tmp_path / "photo.jpg") == 0
    with PILImage.open(tmp_path / "photo_x2.jpg") as im:
        assert im.size == (40, 60)  # upright: 20 wide, 30 high, times 2
        assert im.info.get("icc_profile") == icc
        kept = im.getexif()
        assert kept.get(0x010F) == "sparsesr-test" and kept.get(0x0112, 1) == 1


def test_colour_under_transparent_pixels_does_not_matter(tmp_path):
    # An opaque square on a fully transparent background: whatever colour hides under alpha = 0
    # (black here, white there) must not bleed into the visible pixels (no dark fringes).
    rng = np.random.default_rng(1)
    rgba = np.zeros((24, 24, 4), np.uint8)
    rgba[6:18, 6:18, :3] = rng.integers(100, 200, (12, 12, 3))
    rgba[6:18, 6:18, 3] = 255
    PILImage.fromarray(rgba, "RGBA").save(tmp_path / "black.png")
    rgba[rgba[:, :, 3] == 0, :3] = 255
    PILImage.fromarray(rgba, "RGBA").save(tmp_path / "white.png")
    assert _run(tmp_path / "black.png", tmp_path / "white.png") == 0
    black, white = read_image(tmp_path / "black_x2.png"), read_image(tmp_path / "white_x2.png")
    visible = black.pixels[3] > 0
    assert visible.any()
    assert torch.equal(black.pixels[:3, visible], white.pixels[:3, visible])


def test_fill_transparent_takes_the_neighbours_colour():
    rgb = torch.zeros(3, 8, 8)
    rgb[0] = 1.0  # red everywhere it is visible
    alpha = torch.zeros(1, 8, 8)
    alpha[:, 2:5, 2:5] = 1
    filled = fill_transparent(rgb * alpha, alpha)
    assert torch.allclose(filled, rgb)


def test_alpha_through_the_model(tmp_path):
    _save(tmp_path / "a.png", "RGBA")
    assert _run(tmp_path / "a.png", "--alpha", "model") == 0
    assert read_image(tmp_path / "a_x2.png").mode == "RGBA"


# --- naming, scale, overwrite protection ------------------------------------------------------


def test_output_naming(tmp_path):
    source = _save(tmp_path / "a.png")
    assert _run(source, "--suffix", "_big", "--ext", "jpg") == 0
    assert (tmp_path / "a_big.jpg").is_file()
    assert _run(source, "-o", tmp_path / "named.webp") == 0
    assert read_image(tmp_path / "named.webp").size == (40, 48)
    assert _run(source, "-o", tmp_path / "outdir") == 0
    assert (tmp_path / "outdir" / "a_x2.png").is_file()
    assert _run(source, "--scale", "2.5", "-o", tmp_path / "outdir") == 0
    assert read_image(tmp_path / "outdir" / "a_x2.5.png").size == (50, 60)


def test_float_scale_3_with_a_x2_model(tmp_path, model_files):
    source = _save(tmp_path / "a.png")
    assert _run(source, "--scale", "3", "--model", model_files / "tiny.safetensors") == 0
    assert read_image(tmp_path / "a_x3.png").size == (60, 72)


def test_existing_outputs_are_protected(tmp_path, capsys):
    source = _save(tmp_path / "a.png")
    target = tmp_path / "a_x2.png"
    target.write_bytes(b"keep me")
    assert _run(source) == 1
    assert target.read_bytes() == b"keep me"
    assert "--overwrite" in capsys.readouterr().err
    assert _run(source, "--skip-existing") == 0
    assert target.read_bytes() == b"keep me"
    assert "1 skipped" in capsys.readouterr().out
    assert _run(source, "--overwrite") == 0
    assert read_image(target).size == (40, 48)


def test_inputs_are_never_overwritten(tmp_path, capsys):
    source = _save(tmp_path / "a.png")
    before = source.read_bytes()
    assert _run(source, "--suffix", "", "--overwrite") == 1
    assert source.read_bytes() == before
    assert "would overwrite an input" in capsys.readouterr().err


# --- errors -----------------------------------------------------------------------------------


def test_a_corrupt_file_does_not_stop_the_batch(tmp_path, capsys):
    _save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    _save(tmp_path / "c.jpg")
    assert _run(tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.jpg") == 1
    captured = capsys.readouterr()
    assert "b.png" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert "2 of 3 images written; 1 failed" in captured.out
    assert (tmp_path / "a_x2.png").is_file() and (tmp_path / "c_x2.jpg").is_file()


def test_an_unwritable_output_is_reported(tmp_path, capsys):
    _save(tmp_path / "a.png")
    (tmp_path / "blocker").write_text("a file, not a folder")
    assert _run(tmp_path / "a.png", "-o", tmp_path / "blocker" / "out") == 1
    err = capsys.readouterr().err
    assert "a.png" in err and "Traceback" not in err


def test_missing_embedded_model_is_one_clear_line(tmp_path, capsys):
    _save(tmp_path / "a.png")
    assert main(["upscale", str(tmp_path / "a.png"), "--model", "x4"]) == 2
    err = capsys.readouterr().err
    assert "no embedded x4 model in this installation" in err and "--model PATH" in err
    with pytest.raises(SparseSRError, match="no such file"):
        resolve_model("nonexistent.safetensors")


def test_missing_input_is_counted(tmp_path, capsys):
    _save(tmp_path / "a.png")
    assert _run(tmp_path / "a.png", tmp_path / "nope.png") == 1
    assert "1 of 2 images written; 1 failed" in capsys.readouterr().out


# --- inputs: globs, folders, recursion, sharding ----------------------------------------------


def _tree(root):
    (root / "sub").mkdir(parents=True)
    _save(root / "a.png", seed=1)
    _save(root / "b.jpg", seed=2)
    _save(root / "sub" / "c.png", seed=3)
    (root / "notes.txt").write_text("not an image")


def test_folders_globs_and_recursion(tmp_path):
    _tree(tmp_path / "in")
    assert _run(tmp_path / "in", "-o", tmp_path / "flat") == 0
    assert sorted(p.name for p in (tmp_path / "flat").iterdir()) == ["a_x2.png", "b_x2.jpg"]
    assert _run(tmp_path / "in", "-r", "-o", tmp_path / "tree") == 0
    assert (tmp_path / "tree" / "sub" / "c_x2.png").is_file() and (tmp_path / "tree" / "a_x2.png").is_file()
    assert _run(str(tmp_path / "in" / "*.png"), "-o", tmp_path / "globbed") == 0
    assert [p.name for p in (tmp_path / "globbed").iterdir()] == ["a_x2.png"]
    # next to the inputs; a second run over the folder does not upscale the outputs again
    assert _run(tmp_path / "in", "--skip-existing") == 0
    assert _run(tmp_path / "in", "--skip-existing") == 0
    assert not (tmp_path / "in" / "a_x2_x2.png").exists()


def test_torchrun_ranks_share_the_inputs(tmp_path, monkeypatch):
    sources = [_save(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    written = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        result = upscale_files(sources, tmp_path / f"rank{rank}", quiet=True)
        assert result.ok and result.world_size == 2
        written[rank] = sorted(p.name for p in result.written)
    assert written == {0: ["0_x2.png", "2_x2.png"], 1: ["1_x2.png"]}


# --- tiling, precision, backend ---------------------------------------------------------------


def test_tiled_run_matches_the_untiled_one(tmp_path):
    _save(tmp_path / "a.png", size=(70, 50))
    assert _run(tmp_path / "a.png", "-o", tmp_path / "whole.png") == 0
    assert _run(tmp_path / "a.png", "-o", tmp_path / "tiled.png", "--tile", "16", "--tile-pad", "8") == 0
    whole, tiled = read_image(tmp_path / "whole.png").pixels, read_image(tmp_path / "tiled.png").pixels
    assert (whole - tiled).abs().max() <= 1 / 255 + 1e-6


def test_half_precision_falls_back_on_non_finite_values(monkeypatch):
    upscaler = Upscaler(precision="bf16", warn=warnings_seen.append)
    real = upscaler._network

    def broken():
        net = real()
        return (lambda x: net(x) * float("inf")) if upscaler.dtype != torch.float32 else net

    monkeypatch.setattr(upscaler, "_network", broken)
    out = upscaler.upscale_pixels(torch.rand(3, 8, 8))
    assert torch.isfinite(out).all() and upscaler.dtype == torch.float32
    assert any("non-finite" in w for w in warnings_seen)


warnings_seen: list[str] = []


def test_compare_dense_reports_both_times(tmp_path, capsys):
    _save(tmp_path / "a.png")
    assert _run(tmp_path / "a.png", "--compare-dense") == 0
    out = capsys.readouterr().out
    assert "sparse" in out and "vs dense" in out


# --- Python API -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_api_pil(mode):
    im = PILImage.new(mode, (9, 7))
    out = sparsesr.upscale(im)
    assert isinstance(out, PILImage.Image) and out.mode == mode and out.size == (18, 14)


def test_api_pil_16bit():
    im = PILImage.fromarray(np.full((5, 6), 40000, np.uint16))
    out = sparsesr.upscale(im)
    assert np.asarray(out).dtype == np.uint16 and out.size == (12, 10)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("shape", [(7, 9), (7, 9, 3), (7, 9, 4)])
def test_api_numpy(dtype, shape):
    array = (np.random.default_rng(0).random(shape) * (1 if dtype == np.float32 else np.iinfo(dtype).max)).astype(dtype)
    out = sparsesr.upscale(array, scale=2)
    assert out.dtype == dtype and out.shape == (14, 18, *shape[2:])


def test_api_tensor_and_matches_the_file_path(tmp_path):
    x = torch.rand(3, 6, 5)
    y = sparsesr.upscale(x)
    assert y.shape == (3, 12, 10) and y.dtype == x.dtype
    batch = sparsesr.upscale(torch.stack([x, x]).double())
    assert batch.shape == (2, 3, 12, 10) and batch.dtype == torch.float64
    assert torch.allclose(batch[1].float(), y, atol=1e-5)
    write_image(tmp_path / "x.png", Image(pixels=x))
    assert _run(tmp_path / "x.png") == 0
    from_file = read_image(tmp_path / "x_x2.png").pixels
    expected = sparsesr.upscale(read_image(tmp_path / "x.png").pixels)
    assert (from_file - expected).abs().max() <= 0.5 / 255 + 1e-6


def test_api_rejects_other_types():
    with pytest.raises(SparseSRError, match="PIL image, a NumPy array or a tensor"):
        sparsesr.upscale([1, 2, 3])


# --- registry ---------------------------------------------------------------------------------


def test_models_listing(capsys, tmp_path, monkeypatch):
    import shutil

    from sparsesr.pretrained import EMBEDDED_MODELS, model_dir

    # a model folder holding only the x2 file: x4 and fast are listed as not installed
    shutil.copy(model_dir() / EMBEDDED_MODELS["x2"].filename, tmp_path)
    monkeypatch.setenv("SPARSESR_MODEL_DIR", str(tmp_path))
    rows = {row["name"]: row for row in list_models()}
    assert rows["x2"]["present"] and not rows["x4"]["present"]
    assert rows["x2"]["scale"] == 2 and 0 <= rows["x2"]["sparsity"] <= 1 and rows["x2"]["size_bytes"] > 0
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "x2" in out and "not installed" in out


def test_16bit_rgb_tiff_stays_16bit_rgb_tiff(tmp_path):
    import tifffile

    values = np.random.default_rng(0).integers(0, 65536, (10, 12, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "deep.tif", values, photometric="rgb")
    assert _run(tmp_path / "deep.tif") == 0  # --ext auto keeps the format
    with tifffile.TiffFile(tmp_path / "deep_x2.tif") as tif:
        page = tif.pages[0]
        assert page.dtype == np.uint16 and page.shape == (20, 24, 3)
        assert page.photometric == tifffile.PHOTOMETRIC.RGB
    out = read_image(tmp_path / "deep_x2.tif")
    assert out.bit_depth == 16 and out.mode == "RGB" and out.size == (20, 24)
    assert (torch.round(out.pixels * 65535) % 257 != 0).any()  # real 16-bit values, not 8-bit ones stretched


def test_shipped_models_are_as_sparse_as_promised():
    # The package's own files (not the tiny test models), as docs/models.md describes them: `fast`
    # >= 89% sparse over its pruned layers, x2 >= 75%, x4 >= 85%; scale as the registry says.
    from pathlib import Path

    from sparsesr.format import read_file

    shipped = Path(sparsesr.__file__).parent / "assets" / "models"
    floors = {"x2": 0.75 - 1e-6, "x4": 0.85 - 1e-6, "fast": 0.89}
    for name, entry in EMBEDDED_MODELS.items():
        path = shipped / entry.filename
        if not path.is_file():
            continue
        summary = read_file(path).summary()
        assert summary["sparsity"] >= floors[name] and summary["scale"] == entry.scale, name
    assert (shipped / EMBEDDED_MODELS["x2"].filename).is_file() and (shipped / EMBEDDED_MODELS["fast"].filename).is_file()
