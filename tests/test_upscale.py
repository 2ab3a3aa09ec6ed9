"""``sparsesr upscale``: the CLI on generated files, image fidelity, errors, the Python API, sharding."""
import errno
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from PIL import ImageCms

import sparsesr
from sparsesr.cli import main
from sparsesr.data.image_io import Image, read_image, to_uint8, write_image
from sparsesr.errors import SparseSRError
from sparsesr.format import export
from sparsesr.models import build_model
from sparsesr.models.checkpoint import save_checkpoint
from sparsesr.pretrained import EMBEDDED_MODELS, list_models, resolve_model
import sparsesr.upscaling as upscaling
from sparsesr.upscaling import UpscaleEngine, UpscaleOptions, fill_transparent, upscale_files


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """Tiny random x2 and x4 models as checkpoints and as exported files."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    save_checkpoint(folder / "tiny.safetensors", build_model("edsr-cpu", 2, n_resblocks=1, n_feats=8))
    export(folder / "tiny.safetensors", folder / "tiny.sparsesr.safetensors")
    save_checkpoint(folder / "tiny4.safetensors", build_model("edsr-cpu", 4, n_resblocks=1, n_feats=8))
    export(folder / "tiny4.safetensors", folder / "tiny4.sparsesr.safetensors")
    return folder


@pytest.fixture(autouse=True)
def embedded(model_files, tmp_path_factory, monkeypatch):
    """Point the registry at a folder holding the tiny model as ``x2`` and ``fast`` (no ``x4``);
    outside ``tmp_path``, which tests compare before and after a run."""
    folder = tmp_path_factory.mktemp("embedded")
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


def _engine(model=None, warn=None, **options) -> UpscaleEngine:
    return UpscaleEngine.load(model, UpscaleOptions(**options), warn=warn)


def _run(*args) -> int:
    return main(["upscale", "-q", *map(str, args)])


def _one_error_line(capsys) -> str:
    """The one line the command printed on stderr (there must be exactly one)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def _files(root) -> set:
    """Every file and folder under ``root``, relative to it."""
    return {p.relative_to(root) for p in root.rglob("*")}


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model is even loaded: for problems that must be found before any work."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(UpscaleEngine, "load", refuse)


@pytest.fixture
def no_run(monkeypatch):
    """Fail the test if the model runs (it may load: naming outputs needs the model's scale)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(UpscaleEngine, "run_rgb", refuse)


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
    assert _run(source, "-o", f"{tmp_path / 'outdir'}/") == 0  # a new folder: named with a trailing /
    assert (tmp_path / "outdir" / "a_x2.png").is_file()
    assert _run(source, "--scale", "2.5", "-o", tmp_path / "outdir") == 0  # an existing folder: no / needed
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


def test_an_output_folder_that_cannot_be_created_mid_batch_names_the_output(tmp_path, capsys):
    # -r mirrors sub-folders under -o; one of them is blocked by a file: that image fails, naming
    # the output it could not write (not the input), and the others are written.
    _tree(tmp_path / "in")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sub").write_text("a file, not a folder")
    assert _run(tmp_path / "in", "-r", "-o", tmp_path / "out") == 1
    err = _one_error_line(capsys)
    assert err == (f"{tmp_path / 'in' / 'sub' / 'c.png'}: cannot write image {tmp_path / 'out' / 'sub' / 'c_x2.png'}: "
                   f"{tmp_path / 'out' / 'sub'} is not a folder")
    assert (tmp_path / "out" / "sub").read_text() == "a file, not a folder"
    assert read_image(tmp_path / "out" / "a_x2.png").size == (40, 48)


def test_missing_embedded_model_is_one_clear_line(tmp_path, capsys):
    _save(tmp_path / "a.png")
    assert main(["upscale", str(tmp_path / "a.png"), "--model", "x4"]) == 2
    err = capsys.readouterr().err
    assert "no embedded x4 model in this installation" in err and "name a model file instead" in err
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
    assert _run(tmp_path / "in", "-o", f"{tmp_path / 'flat'}/") == 0
    assert sorted(p.name for p in (tmp_path / "flat").iterdir()) == ["a_x2.png", "b_x2.jpg"]
    assert _run(tmp_path / "in", "-r", "-o", f"{tmp_path / 'tree'}/") == 0
    assert (tmp_path / "tree" / "sub" / "c_x2.png").is_file() and (tmp_path / "tree" / "a_x2.png").is_file()
    assert _run(str(tmp_path / "in" / "*.png"), "-o", f"{tmp_path / 'globbed'}/") == 0
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
        result = upscale_files(sources, f"{tmp_path / f'rank{rank}'}/", quiet=True)
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
    upscaler = _engine(warn=warnings_seen.append)
    upscaler.dtype = torch.bfloat16  # as on a CPU with a fast bf16 path (else bf16 is run as fp32)
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


def test_release_memory_drops_the_cached_engine():
    from sparsesr.upscaling import api, release_memory

    sparsesr.upscale(PILImage.new("RGB", (9, 7)))
    (engine,) = api._CACHE.values()
    release_memory()
    assert api._CACHE == {}
    sparsesr.upscale(PILImage.new("RGB", (9, 7)))  # loads again
    assert next(iter(api._CACHE.values())) is not engine


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


# --- issue #15: everything checked before the model runs ----------------------------------------


@pytest.mark.parametrize("output, wrong", [
    ("/proc/nudir/", "/proc/nudir"),  # cannot be created, even by root
    ("{tmp}/blocker/out/", "{tmp}/blocker"),  # a file where a folder is needed
    ("{tmp}/blocker/out.png", "{tmp}/blocker"),
])
def test_an_unusable_output_location_is_refused_before_any_work(tmp_path, capsys, no_model, output, wrong):
    source = _save(tmp_path / "a.png")
    (tmp_path / "blocker").write_text("a file, not a folder")
    before = _files(tmp_path)
    assert _run(source, "-o", output.format(tmp=tmp_path)) == 2
    line = _one_error_line(capsys)
    head = f"sparsesr upscale: error: -o {output.format(tmp=tmp_path)}: "
    assert line.startswith(head)
    assert wrong.format(tmp=tmp_path) in line.removeprefix(head)  # says which path is wrong...
    assert "a.png" not in line  # ...not the input's name
    assert _files(tmp_path) == before


@pytest.mark.parametrize("output, needle", [
    ("big.gif", "-o big.gif: cannot write .gif files; give one of .bmp, .jpeg, .jpg, .png, .tif, .tiff, .webp"),
    ("out.XYZ", "-o out.XYZ: cannot write .xyz files; give one of .bmp, .jpeg"),
    ("noext", "-o noext: give a file name with an image extension, or end a folder name with /"),
])
def test_an_output_that_is_neither_an_image_file_nor_a_folder_is_refused(tmp_path, capsys, monkeypatch, no_model,
                                                                           output, needle):
    monkeypatch.chdir(tmp_path)
    _save(tmp_path / "a.png")
    assert _run("a.png", "-o", output) == 2
    assert needle in _one_error_line(capsys)
    assert _files(tmp_path) == {Path("a.png")}  # no folder called big.gif, no file either


def test_the_output_path_rule(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _save(tmp_path / "a.png")
    (tmp_path / "have").mkdir()
    assert _run("a.png", "-o", "new/deeper/") == 0  # ends with /: a folder, created
    assert _run("a.png", "-o", "have") == 0  # an existing folder: no / needed
    assert _run("a.png", "-o", "named.PNG") == 0  # an image extension: a file
    assert _run("a.png", "-o", "named.jpeg", "--ext", "jpg") == 0  # --ext agreeing with the name
    for path, fmt in [("new/deeper/a_x2.png", "PNG"), ("have/a_x2.png", "PNG"), ("named.PNG", "PNG"),
                      ("named.jpeg", "JPEG")]:
        with PILImage.open(tmp_path / path) as im:
            assert (im.format, im.size, im.mode) == (fmt, (48, 40), "RGB"), path


def test_a_file_output_for_several_images_is_refused(tmp_path, capsys, no_run):
    _save(tmp_path / "a.png")
    _save(tmp_path / "b.png", seed=1)
    assert _run(tmp_path / "a.png", tmp_path / "b.png", "-o", tmp_path / "out.png") == 2
    assert f"-o {tmp_path / 'out.png'} is a file name, but 2 images were given" in _one_error_line(capsys)
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("args, needle", [
    (["--overwrite", "--skip-existing"], "--overwrite and --skip-existing cannot be used together"),
    (["-o", "x.jpg", "--ext", "png"], "-o x.jpg is a .jpg file but --ext png asks for .png"),
    (["--quality", "150"], "--quality must be an integer from 1 to 100, got 150"),
    (["--quality", "-3"], "--quality must be an integer from 1 to 100, got -3"),
    (["--quality", "0"], "--quality must be an integer from 1 to 100, got 0"),
    (["--scale", "0"], "--scale must be in (0, 16], got 0"),
    (["--scale", "-2"], "--scale must be in (0, 16], got -2"),
    (["--scale", "nan"], "--scale must be in (0, 16], got nan"),
    (["--scale", "inf"], "--scale must be in (0, 16], got inf"),
    (["--scale", "two"], "--scale must be a number, got 'two'"),
    (["--tile", "-5"], "--tile and --tile-pad must be >= 0, got -5 and 16"),
    (["--tile-pad", "-1"], "--tile and --tile-pad must be >= 0, got 0 and -1"),
    (["--tile", "8"], "--tile must be 0 (automatic) or at least 16, got 8"),
    (["--suffix", "/x"], "--suffix must not contain a path separator, got '/x'"),
])
def test_invalid_or_conflicting_options_are_refused(tmp_path, capsys, monkeypatch, no_model, args, needle):
    monkeypatch.chdir(tmp_path)
    _save(tmp_path / "a.png")
    assert _run("a.png", *args) == 2
    line = _one_error_line(capsys)
    assert line == f"sparsesr upscale: error: {needle}" or (line.startswith("sparsesr upscale: error: ")
                                                           and needle in line)
    assert _files(tmp_path) == {Path("a.png")}


def test_options_are_checked_by_the_python_api_too(tmp_path, no_model):
    source = _save(tmp_path / "a.png")
    with pytest.raises(SparseSRError, match="--quality must be an integer from 1 to 100"):
        upscale_files([source], quality=True)  # a bool is not a quality
    with pytest.raises(SparseSRError, match="--ext must be auto or one of"):
        upscale_files([source], ext="gif")


# --- GIF and animated inputs ------------------------------------------------------------------


def _palette_image(size=(12, 10), frames=1):
    """A palette image with a transparent index 0 (and ``frames`` different frames)."""
    rng = np.random.default_rng(3)
    palette = [0, 0, 0] + list(rng.integers(0, 256, 255 * 3))
    out = []
    for _ in range(frames):
        im = PILImage.fromarray(rng.integers(0, 8, (size[1], size[0]), dtype=np.uint8), "P")
        im.putpalette(palette)
        im.info["transparency"] = 0
        out.append(im)
    return out


def test_a_gif_input_is_written_as_png(tmp_path, capsys):
    _palette_image()[0].save(tmp_path / "a.gif", transparency=0)
    assert _run(tmp_path / "a.gif") == 0
    assert capsys.readouterr().err == ""
    with PILImage.open(tmp_path / "a_x2.png") as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGBA", (24, 20))
    assert not (tmp_path / "a_x2.gif").exists()


@pytest.mark.parametrize("name, output, fmt", [("anim.gif", "anim_x2.png", "PNG"), ("anim.webp", "anim_x2.webp", "WEBP"),
                                                ("anim.png", "anim_x2.png", "PNG")])
def test_an_animated_input_warns_once_and_gives_a_still_image(tmp_path, capsys, monkeypatch, name, output, fmt):
    first, *rest = _palette_image(frames=3)
    first.save(tmp_path / name, save_all=True, append_images=rest, duration=100, loop=0)
    with PILImage.open(tmp_path / name) as im:
        assert im.n_frames == 3
    order = []
    real = UpscaleEngine.upscale_image
    monkeypatch.setattr(UpscaleEngine, "upscale_image", lambda self, *a, **k: order.append("model") or real(self, *a, **k))
    assert main(["upscale", "-q", str(tmp_path / name)]) == 0
    line = _one_error_line(capsys)
    assert line == f"warning: {tmp_path / name} has 3 frames; only the first is upscaled"
    assert order == ["model"]  # one model run: the first frame only
    with PILImage.open(tmp_path / output) as im:
        assert im.format == fmt and getattr(im, "n_frames", 1) == 1 and im.size == (24, 20)


# --- inputs: earlier outputs, temp files, sharding ----------------------------------------------


def test_globs_skip_earlier_outputs_but_named_files_are_taken(tmp_path):
    _save(tmp_path / "baby.png")
    _save(tmp_path / "baby_x2.png", size=(48, 40))  # an earlier run's output
    assert _run(str(tmp_path / "*.png"), "--overwrite") == 0
    assert not (tmp_path / "baby_x2_x2.png").exists()
    assert read_image(tmp_path / "baby_x2.png").size == (40, 48)  # rewritten from baby.png
    assert _run(tmp_path / "baby_x2.png") == 0  # named on its own: the user means it
    assert read_image(tmp_path / "baby_x2_x2.png").size == (80, 96)


def test_sharded_runs_protect_every_input_not_only_their_own(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "s5"
    folder.mkdir()
    _save(folder / "a.png")
    before = _save(folder / "a_x2.png", seed=7).read_bytes()  # an input of rank 1, the output of rank 0's a.png
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _run(folder / "a.png", folder / "a_x2.png", "--overwrite") == 1
    assert (folder / "a_x2.png").read_bytes() == before
    assert f"{folder / 'a.png'}: output {folder / 'a_x2.png'} would overwrite an input" in capsys.readouterr().err


def _leftover(folder, name, age_s):
    """A temp file as a killed run leaves it (a whole image inside), ``age_s`` seconds old."""
    path = _save(folder / name, format="PNG")
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_temp_files_are_not_taken_for_inputs(tmp_path, capsys):
    _save(tmp_path / "mid.png")
    _leftover(tmp_path, ".mid_x2.png.0e277fbc.tmp.png", 10)  # the scheme of earlier versions
    _leftover(tmp_path, ".mid_x2.png.1234abcd.sparsesr-tmp", 10)  # today's (sparsesr.fileio)
    assert _run(tmp_path) == 0  # the folder
    assert _run(str(tmp_path / ".*"), "--skip-existing") == 1  # a glob for hidden files: finds none of ours
    assert "no such file, folder or matching images" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["mid.png", "mid_x2.png"]
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".")]) == 2  # fresh: maybe another run's


def test_stale_temp_files_in_the_output_folder_are_removed(tmp_path):
    _save(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    stale = [_leftover(out, ".b_x2.png.0123abcd.sparsesr-tmp", 7200),
             _leftover(out, ".b_x2.png.0123abcd.tmp.png", 7200)]
    fresh = _leftover(out, ".c_x2.png.4567cdef.sparsesr-tmp", 60)
    assert _run(tmp_path / "a.png", "-o", out) == 0
    assert not any(p.exists() for p in stale) and fresh.exists()
    assert (out / "a_x2.png").is_file()


# --- concurrent runs ---------------------------------------------------------------------------


def _another_run_writes(monkeypatch, target, data=b"the other run's output"):
    """While this run computes, another one writes ``target``."""
    real = UpscaleEngine.upscale_image

    def racing(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        target.write_bytes(data)
        return out

    monkeypatch.setattr(UpscaleEngine, "upscale_image", racing)


@pytest.mark.parametrize("links", [True, False])
def test_an_output_that_appears_meanwhile_is_not_replaced(tmp_path, capsys, monkeypatch, links):
    if not links:  # a file system without hard links (FAT, some network shares): O_EXCL reserves
        def no_link(*args, **kwargs):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    _save(tmp_path / "a.png")
    _another_run_writes(monkeypatch, tmp_path / "a_x2.png")
    assert _run(tmp_path / "a.png") == 0
    captured = capsys.readouterr()
    assert (tmp_path / "a_x2.png").read_bytes() == b"the other run's output"
    assert captured.err.strip() == f"{tmp_path / 'a.png'}: output {tmp_path / 'a_x2.png'} appeared meanwhile; skipped"
    assert "0 of 1 images written; 1 skipped" in captured.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a_x2.png"]  # no temp file left


def test_without_hard_links_outputs_are_still_written(tmp_path, monkeypatch):
    def no_link(*args, **kwargs):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "link", no_link)
    _save(tmp_path / "a.png")
    assert _run(tmp_path / "a.png") == 0
    assert read_image(tmp_path / "a_x2.png").size == (40, 48)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a_x2.png"]


def test_overwrite_replaces_an_output_that_appears_meanwhile(tmp_path, monkeypatch):
    _save(tmp_path / "a.png")
    _another_run_writes(monkeypatch, tmp_path / "a_x2.png")
    assert _run(tmp_path / "a.png", "--overwrite") == 0
    assert read_image(tmp_path / "a_x2.png").size == (40, 48)


# --- Python API ---------------------------------------------------------------------------------


def test_api_palette_image_with_transparency_keeps_alpha():
    im = _palette_image()[0]
    out = sparsesr.upscale(im)
    assert out.mode == "RGBA" and out.size == (24, 20)
    transparent = np.asarray(im) == 0
    alpha = np.asarray(out)[:, :, 3]
    assert alpha[::2, ::2][transparent].max() < 255 and alpha[::2, ::2][~transparent].min() > 0


@pytest.mark.parametrize("api", ["sparsesr.upscale", "sparsesr.upscaling.upscale"])
def test_api_scale_defaults_to_the_models_own(embedded, model_files, api):
    shutil.copy(model_files / "tiny4.sparsesr.safetensors", embedded / EMBEDDED_MODELS["x4"].filename)
    fn = sparsesr.upscale if api == "sparsesr.upscale" else upscaling.upscale
    x = torch.rand(3, 5, 6)
    assert fn(x, model="x4").shape == (3, 20, 24)
    assert fn(x, model=model_files / "tiny4.sparsesr.safetensors").shape == (3, 20, 24)
    assert fn(x).shape == (3, 10, 12)  # no model: the default x2
    assert fn(x, model="x4", scale=2).shape == (3, 10, 12)


@pytest.mark.parametrize("name, factor", [("x4", 4), ("x2", 2), ("fast", 2)])
def test_api_an_embedded_model_gives_its_own_scale(embedded, model_files, name, factor):
    shutil.copy(model_files / "tiny4.sparsesr.safetensors", embedded / EMBEDDED_MODELS["x4"].filename)
    assert sparsesr.upscale(torch.rand(3, 5, 6), model=name).shape == (3, 5 * factor, 6 * factor)
    assert sparsesr.upscale(PILImage.new("RGB", (6, 5)), model=name).size == (6 * factor, 5 * factor)
    assert sparsesr.upscale(np.zeros((5, 6, 3), np.uint8), model=name).shape == (5 * factor, 6 * factor, 3)


def test_api_reloads_a_model_file_that_was_replaced(model_files, tmp_path):
    path = tmp_path / "model.sparsesr.safetensors"
    shutil.copy(model_files / "tiny.sparsesr.safetensors", path)
    x = torch.rand(3, 5, 6)
    assert sparsesr.upscale(x, model=path).shape == (3, 10, 12)
    shutil.copy(model_files / "tiny4.sparsesr.safetensors", path)  # same name, another model
    assert sparsesr.upscale(x, model=path).shape == (3, 20, 24)


def test_api_a_scale_the_engine_does_not_do_is_one_clear_error(model_files):
    engine = _engine(model_files / "tiny4.sparsesr.safetensors")
    x = torch.rand(3, 5, 6)
    assert sparsesr.upscale(x, model=engine).shape == (3, 20, 24)
    assert sparsesr.upscale(x, model=engine, scale=4).shape == (3, 20, 24)
    with pytest.raises(SparseSRError, match=r"^scale=2 was asked for, but the engine given as model= upscales x4$"):
        sparsesr.upscale(x, model=engine, scale=2)
    with pytest.raises(SparseSRError, match=r"^model= is an UpscaleEngine, which has its own options; got tile too$"):
        sparsesr.upscale(x, model=engine, tile=64)


@pytest.mark.parametrize("kwargs, line", [
    ({"scale": 0}, "--scale must be in (0, 16], got 0"),
    ({"scale": float("nan")}, "--scale must be in (0, 16], got nan"),
    ({"scale": "two"}, "--scale must be a number, got 'two'"),
    ({"scale": True}, "--scale must be a number, got True"),
    ({"tile": 8}, "--tile must be 0 (automatic) or at least 16, got 8"),
    ({"tile": 1.5}, "--tile must be an integer, got 1.5"),
    ({"tile_pad": -1}, "--tile and --tile-pad must be >= 0, got 0 and -1"),
    ({"backend": "triton"}, "--backend must be auto, sparse or dense, got 'triton'"),
    ({"precision": "fp8"}, "--precision must be auto, fp32, fp16 or bf16, got 'fp8'"),
    ({"alpha": "none"}, "--alpha must be bicubic or model, got 'none'"),
    ({"device": 0}, "--device must be a string such as auto, cpu or cuda:0, got 0"),
    ({"quality": 0}, "--quality must be an integer from 1 to 100, got 0"),
    ({"ext": "gif"}, "--ext must be auto or one of png, jpg, webp, tiff, got 'gif'"),
    ({"suffix": "a/b"}, "--suffix must not contain a path separator, got 'a/b'"),
    ({"overwrite": True, "skip_existing": True}, "--overwrite and --skip-existing cannot be used together"),
])
def test_options_are_checked_when_made(kwargs, line):
    with pytest.raises(SparseSRError) as info:
        UpscaleOptions(**kwargs)
    assert str(info.value) == line


def test_options_are_one_frozen_object_and_unknown_names_are_one_line(no_model):
    from dataclasses import FrozenInstanceError

    options = UpscaleOptions(scale="2.5", tile=64)
    assert options.scale == 2.5 and options == UpscaleOptions(scale=2.5, tile=64)  # normalised, comparable
    with pytest.raises(FrozenInstanceError):
        options.tile = 32
    with pytest.raises(SparseSRError, match=r"^unknown upscale option 'tiles'; the options are scale, device, "):
        UpscaleOptions.from_kwargs({"tiles": 4})
    with pytest.raises(SparseSRError, match=r"^unknown upscale option 'quality'; the options are scale, device, "
                                            r"precision, backend, tile, tile_pad, alpha$"):
        sparsesr.upscale(torch.rand(3, 4, 4), quality=50)  # a file option: no use to the Python API
    with pytest.raises(SparseSRError, match="--scale must be in"):
        sparsesr.upscale(torch.rand(3, 4, 4), scale=-1)  # checked before any model loads (no_model)


class _NearestX3(torch.nn.Module):
    """Not a runtime model and no ``config``: only the attributes the engine may read."""

    scale, n_colors, n_feats = 3, 3, 8

    def forward(self, x):
        return torch.nn.functional.interpolate(x, scale_factor=3, mode="nearest")


def test_the_engine_needs_only_the_runtime_attributes():
    engine = UpscaleEngine(_NearestX3(), UpscaleOptions(tile=16, tile_pad=8))
    assert not hasattr(engine.net, "config") and engine.scale == 3
    x = torch.rand(3, 20, 37)
    expected = torch.nn.functional.interpolate(x[None], scale_factor=3, mode="nearest")[0]
    assert torch.allclose(engine.upscale_pixels(x), expected, atol=1e-6)  # tiled: 2 x 3 tiles
    assert torch.equal(engine.upscale_pixels(x, bit_depth=8), to_uint8(expected))
    assert sparsesr.upscale(x, model=engine).shape == (3, 60, 111)
    assert engine.backend_summary() == "_NearestX3 on cpu"
    resized = UpscaleEngine(_NearestX3(), UpscaleOptions(scale=1.5))
    assert resized.upscale_pixels(x).shape == (3, 30, 56)


def test_the_engine_refuses_a_model_that_is_not_rgb():
    gray = _NearestX3()
    gray.n_colors = 1
    with pytest.raises(SparseSRError, match=r"^the model takes 1 colour channels; upscaling runs RGB"):
        UpscaleEngine(gray)


def test_one_name_per_thing():
    # The engine class, eval's function type and the deleted sparsesr.upscalers were all "Upscaler".
    import sparsesr.evaluate

    assert not hasattr(upscaling, "Upscaler") and not hasattr(sparsesr.evaluate, "Upscaler")


# --- small ones -----------------------------------------------------------------------------------


def test_a_suffix_may_start_with_a_dash(tmp_path, capsys):
    from sparsesr.cli import build_parser

    args = build_parser().parse_args(["upscale", "a.png", "--suffix", "-up{scale}x", "-q"])
    assert args.suffix == "-up{scale}x" and args.quiet and args.inputs == ["a.png"]
    _save(tmp_path / "a.png")
    assert _run(tmp_path / "a.png", "--suffix", "-up{scale}x") == 0
    assert read_image(tmp_path / "a-up2x.png").size == (40, 48)
    with pytest.raises(SystemExit) as exit_info:  # an option where the value should be stays an error
        main(["upscale", str(tmp_path / "a.png"), "--suffix", "--overwrite"])
    assert exit_info.value.code == 2
    assert "argument --suffix: expected one argument" in capsys.readouterr().err


def test_the_summary_counts_every_run_of_every_layer(tmp_path, capsys, monkeypatch):
    from sparsesr.runtime import backends

    cpu = backends.kernel("cpu")
    if cpu is None:
        pytest.skip("CPU kernel not built")
    # The kernel "wins" on inputs at least 16 rows high: the first image runs all 6 layers on it,
    # the second (smaller, and the last to run) only the last conv (it sees the 2x upsampled rows).
    monkeypatch.setattr(cpu, "should_use_sparse", lambda prepared, h, w: h >= 16)
    _save(tmp_path / "big.png", size=(24, 20))
    _save(tmp_path / "small.png", size=(12, 10))
    assert _run(tmp_path / "big.png", tmp_path / "small.png", "--backend", "sparse") == 0
    out = capsys.readouterr().out
    assert "cpu kernel 6/6 layers, dense 5/6 layers on cpu" in out
    assert "5 layers took more than one path" in out
    assert "why dense: dense measured faster than the CPU kernel at 10x12" in out


def test_the_summary_reports_the_half_precision_run():
    # The default on CUDA (fp16) runs a half-precision copy of the network; on CPU bf16 is forced
    # here as on a CPU with a fast bf16 path. Its layers are the ones that ran, not "not run".
    upscaler = _engine()
    upscaler.dtype = torch.bfloat16
    upscaler.upscale_pixels(torch.rand(3, 8, 8))
    assert upscaler._half_net is not None
    summary = upscaler.backend_summary()
    assert summary.startswith("dense 6/6 layers on cpu")
    from sparsesr.runtime import backends

    if backends.kernel("cpu") is not None:
        assert summary.endswith("; why dense: CPU kernel computes in float32, input is bfloat16")


def test_the_quick_start_output_is_ignored_by_git():
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        proc = subprocess.run(["git", "check-ignore", "-q", "sample_x2.png"], cwd=root, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("git not available")
    if proc.returncode == 128:
        pytest.skip("not a git checkout")
    assert proc.returncode == 0


# --- a pruned, exported model: the sparse layers really run -------------------------------------------


@pytest.fixture(scope="module")
def pruned_files(tmp_path_factory):
    """A small EDSR, 90 % of its middle conv weights set to exact zeros; the checkpoint and its CSR export."""
    folder = tmp_path_factory.mktemp("pruned")
    torch.manual_seed(1)
    model = build_model("edsr-cpu", 2, n_resblocks=2, n_feats=16).eval()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs[1:-1]:  # EDSR keeps its first and last conv dense
        weight = conv.weight.data
        threshold = weight.abs().flatten().kthvalue(int(0.9 * weight.numel())).values
        weight[weight.abs() <= threshold] = 0
    save_checkpoint(folder / "pruned.safetensors", model)
    report = export(folder / "pruned.safetensors", folder / "pruned.sparsesr.safetensors", layout="csr").to_dict()
    assert report["sparsity"] >= 0.89
    return model, folder


@pytest.fixture
def sparse_kernel_always(monkeypatch):
    from sparsesr.runtime import backends

    cpu = backends.kernel("cpu")
    if cpu is None:
        pytest.skip("CPU kernel not built")
    monkeypatch.setattr(cpu, "should_use_sparse", lambda prepared, h, w: True)


def test_pruned_model_via_the_api_matches_the_dense_model(pruned_files, sparse_kernel_always):
    model, folder = pruned_files
    x = torch.rand(3, 13, 11)
    with torch.no_grad():
        reference = model(x[None])[0].clamp(0, 1)
    upscaler = _engine(folder / "pruned.sparsesr.safetensors", backend="sparse")
    out = sparsesr.upscale(x, model=upscaler)
    assert (out - reference).abs().max() < 1e-4
    paths = [row["path"] for row in upscaler.net.backend_report()["layers"]]
    assert paths == ["cpu"] * len(paths)  # every layer, the sparse ones included, ran the kernel
    assert [row["layout"] for row in upscaler.net.backend_report()["layers"]][1:-1] == ["csr"] * (len(paths) - 2)


def test_pruned_model_via_the_cli_matches_the_dense_model(tmp_path, capsys, pruned_files, sparse_kernel_always):
    model, folder = pruned_files
    source = _save(tmp_path / "a.png", size=(17, 14))
    for backend in ("sparse", "dense"):
        assert _run(source, "--model", folder / "pruned.sparsesr.safetensors", "--backend", backend,
                    "-o", tmp_path / f"{backend}.png") == 0
        with PILImage.open(tmp_path / f"{backend}.png") as im:
            assert im.size == (34, 28) and im.mode == "RGB"
    summaries = capsys.readouterr().out.splitlines()
    assert "cpu kernel 8/8 layers on cpu" in summaries[0] and "dense 8/8 layers on cpu" in summaries[1]
    with torch.no_grad():
        reference = model(read_image(source).pixels[None])[0].clamp(0, 1)
    for backend in ("sparse", "dense"):
        out = read_image(tmp_path / f"{backend}.png").pixels
        assert (out - reference).abs().max() <= 0.5 / 255 + 1e-4, backend
