"""Image I/O on small generated files: modes, 16-bit, EXIF orientation, metadata, errors."""
from __future__ import annotations

import io
import os
import struct
import time
import zlib

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image as PILImage
from PIL import ImageCms, ImageOps

from sparsesr.data import image_io
from sparsesr.data.image_io import Image, quantize, read_image, to_uint8, write_image
from sparsesr.errors import ImageReadError, ImageWriteError

CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}


def _pixels(channels: int, h: int = 7, w: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.rand(channels, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ext", ["png", "tif", "webp"])
@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
def test_lossless_round_trip_8bit(tmp_path, ext, mode):
    pixels = _pixels(CHANNELS[mode])
    path = tmp_path / f"image.{ext}"
    write_image(path, pixels, mode)
    image = read_image(path)
    expected = quantize(pixels)
    if ext == "webp" and mode in ("L", "LA"):  # WebP has no grayscale: stored as RGB(A)
        expected = torch.cat([expected[:1].expand(3, -1, -1), expected[1:]])
        mode = "RGBA" if mode == "LA" else "RGB"
    assert image.mode == mode and image.bit_depth == 8
    assert image.pixels.dtype == torch.float32 and image.pixels.shape == expected.shape
    assert torch.equal(to_uint8(image.pixels), to_uint8(expected))


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
def test_png_16bit_round_trip_keeps_16_bits(tmp_path, mode):
    pixels = _pixels(CHANNELS[mode]).double()
    path = tmp_path / "deep.png"
    write_image(path, pixels, mode, 16)
    image = read_image(path)
    assert image.mode == mode and image.bit_depth == 16
    levels = torch.round(image.pixels.double() * 65535)
    assert torch.equal(levels, torch.round(pixels.clamp(0, 1) * 65535))
    # Finer than 8 bits: the values are not all multiples of 257 (8-bit levels scaled up).
    assert (levels % 257 != 0).any()


def test_16bit_rgb_png_from_another_writer_is_read_as_16bit(tmp_path):
    import png

    values = ((np.arange(4 * 3 * 3).reshape(4, 9) * 1601) % 65536).astype(np.uint16)
    with open(tmp_path / "ext.png", "wb") as f:
        png.Writer(3, 4, greyscale=False, bitdepth=16).write(f, values.tolist())
    image = read_image(tmp_path / "ext.png")
    assert image.bit_depth == 16 and image.mode == "RGB"
    expected = torch.from_numpy(values.reshape(4, 3, 3).astype(np.float64)).permute(2, 0, 1)
    assert torch.equal(torch.round(image.pixels.double() * 65535), expected)


def _levels16(pixels: torch.Tensor) -> np.ndarray:
    """Float pixels [C, H, W] -> uint16 HWC, as a 16-bit writer stores them."""
    return np.round(pixels.double().clamp(0, 1).numpy() * 65535).astype(np.uint16).transpose(1, 2, 0)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
def test_tiff_16bit_round_trip_is_exact(tmp_path, mode):
    pixels = _pixels(CHANNELS[mode])
    path = tmp_path / "deep.tif"
    write_image(path, pixels, mode, 16)

    # The file itself: 16 bits per sample, deflate, alpha as an unassociated extra sample.
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.dtype == np.uint16 and page.samplesperpixel == CHANNELS[mode]
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert page.extrasamples == ((tifffile.EXTRASAMPLE.UNASSALPHA,) if mode in ("LA", "RGBA") else ())
        on_disk = page.asarray()
    assert np.array_equal(on_disk.reshape(7, 5, -1), _levels16(pixels))

    image = read_image(path)
    assert image.mode == mode and image.bit_depth == 16
    assert np.array_equal(_levels16(image.pixels), _levels16(pixels))
    assert (_levels16(image.pixels) % 257 != 0).any()  # finer than 8-bit levels
    assert image_io.image_size(path) == (7, 5)


@pytest.mark.parametrize("planar", ["contig", "separate"])
@pytest.mark.parametrize("mode", ["LA", "RGB", "RGBA"])
def test_16bit_tiff_from_another_writer(tmp_path, mode, planar):
    rng = np.random.default_rng(1)
    values = rng.integers(0, 65536, (6, 4, CHANNELS[mode]), dtype=np.uint16)
    data = np.moveaxis(values, -1, 0) if planar == "separate" else values
    tifffile.imwrite(
        tmp_path / "ext.tiff",
        data,
        photometric="rgb" if mode.startswith("RGB") else "minisblack",
        planarconfig=planar,
        extrasamples=["unassalpha"] if mode.endswith("A") else None,
        byteorder=">",  # big-endian, to be sure the byte order comes from the file
    )
    image = read_image(tmp_path / "ext.tiff")
    assert image.mode == mode and image.bit_depth == 16
    assert np.array_equal(_levels16(image.pixels), values)


def test_16bit_tiff_premultiplied_alpha_is_made_straight(tmp_path):
    straight = np.array([[[40000, 20000, 0, 32768], [65535, 65535, 65535, 0]]], dtype=np.uint16)
    alpha = straight[:, :, 3:].astype(np.float64) / 65535
    premultiplied = np.concatenate([np.round(straight[:, :, :3] * alpha), straight[:, :, 3:]], axis=2)
    tifffile.imwrite(tmp_path / "assoc.tif", premultiplied.astype(np.uint16), photometric="rgb",
                     extrasamples=["assocalpha"])
    image = read_image(tmp_path / "assoc.tif")
    assert image.mode == "RGBA" and image.bit_depth == 16
    levels = _levels16(image.pixels).astype(np.int64)
    assert np.abs(levels[0, 0] - straight[0, 0]).max() <= 2  # 40000 * 0.5 rounds, then back
    assert levels[0, 1, 3] == 0  # fully transparent stays transparent


UPRIGHT = {  # EXIF orientation -> how the stored HWC array is displayed
    3: lambda a: a[::-1, ::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),  # rotate 90 degrees clockwise
    8: lambda a: np.rot90(a, k=1),
}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_on_16bit_tiff(tmp_path, orientation):
    upright = UPRIGHT[orientation]
    values = (np.arange(4 * 6 * 3).reshape(4, 6, 3) * 901 % 65536).astype(np.uint16)
    path = tmp_path / "oriented.tif"
    tags = [(0x0112, "H", 1, orientation, True), (0x010F, "s", 0, "sparsesr-test", True)]
    tifffile.imwrite(path, values, photometric="rgb", extratags=tags)  # + tifffile's JSON description
    image = read_image(path)
    assert image.bit_depth == 16 and image.mode == "RGB"
    assert np.array_equal(_levels16(image.pixels), upright(values))
    assert image_io.image_size(path) == image.size == upright(values).shape[:2]
    kept = PILImage.Exif()
    kept.load(image.exif)
    assert 0x0112 not in kept and kept[0x010F] == "sparsesr-test"

    # Written back as a 16-bit TIFF: upright pixels, no orientation tag, Make kept, and not the
    # input's layout description (its shape is wrong for the output).
    write_image(tmp_path / "again.tif", image)
    again = read_image(tmp_path / "again.tif")
    assert torch.equal(again.pixels, image.pixels)
    with tifffile.TiffFile(tmp_path / "again.tif") as tif:
        tags = tif.pages[0].tags
        assert 0x0112 not in tags and 270 not in tags and tags[0x010F].value == "sparsesr-test"


def test_16bit_grayscale_tiff(tmp_path):
    pixels = _pixels(1)
    write_image(tmp_path / "deep.tif", pixels, "L", 16)
    image = read_image(tmp_path / "deep.tif")
    assert image.mode == "L" and image.bit_depth == 16
    assert torch.allclose(image.pixels, pixels, atol=1 / 65535)


def test_jpeg_is_lossy_but_close_and_drops_alpha(tmp_path):
    pixels = torch.full((4, 16, 16), 0.5)
    write_image(tmp_path / "photo.jpg", pixels, "RGBA", quality=90)
    image = read_image(tmp_path / "photo.jpg")
    assert image.mode == "RGB" and image.pixels.shape == (3, 16, 16)
    assert torch.allclose(image.pixels, pixels[:3], atol=2 / 255)


@pytest.mark.parametrize(
    "pil_mode, expected_mode",
    [("1", "L"), ("P", "RGB"), ("CMYK", "RGB"), ("YCbCr", "RGB"), ("I;16", "L"), ("LA", "LA")],
)
def test_other_modes_are_converted(tmp_path, pil_mode, expected_mode):
    ext = {"CMYK": "jpg", "YCbCr": "jpg", "I;16": "tif"}.get(pil_mode, "png")
    im = PILImage.new("RGB", (6, 4), (200, 30, 90)).convert(pil_mode) if pil_mode != "I;16" else PILImage.new("I;16", (6, 4), 4000)
    im.save(tmp_path / f"in.{ext}")
    image = read_image(tmp_path / f"in.{ext}")
    assert image.mode == expected_mode
    assert image.pixels.shape == (len(expected_mode), 4, 6)
    if pil_mode == "I;16":
        assert image.bit_depth == 16 and image.pixels[0, 0, 0].item() == pytest.approx(4000 / 65535)


def test_colour_key_transparency_becomes_alpha(tmp_path):
    im = PILImage.new("RGB", (3, 2), (10, 20, 30))
    im.putpixel((0, 0), (1, 2, 3))
    im.save(tmp_path / "key.png", transparency=(1, 2, 3))
    image = read_image(tmp_path / "key.png")
    assert image.mode == "RGBA"
    assert image.pixels[3, 0, 0].item() == 0.0 and image.pixels[3, 1, 1].item() == 1.0


def test_palette_with_transparency_becomes_rgba(tmp_path):
    im = PILImage.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.info["transparency"] = 1
    im.save(tmp_path / "pal.png", transparency=1)
    image = read_image(tmp_path / "pal.png")
    assert image.mode == "RGBA"
    assert image.pixels[:, 0, 0].tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("ext", ["png", "jpg"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_and_reset(tmp_path, orientation, ext):
    array = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3) * 5
    im = PILImage.fromarray(array)
    exif = im.getexif()
    exif[0x0112] = orientation
    exif[0x010F] = "sparsesr-test"  # Make: must survive
    path = tmp_path / f"oriented.{ext}"
    im.save(path, exif=exif.tobytes())

    image = read_image(path)
    upright = np.asarray(ImageOps.exif_transpose(PILImage.open(path)))  # same decoder, so exact
    assert torch.equal(to_uint8(image.pixels).permute(1, 2, 0), torch.from_numpy(upright.copy()))
    assert image_io.image_size(path) == upright.shape[:2]

    kept = PILImage.Exif()
    kept.load(image.exif)
    assert kept.get(0x0112, 1) == 1 and kept[0x010F] == "sparsesr-test"


@pytest.mark.parametrize(
    "name, bit_depth",
    [("meta.png", 8), ("meta16.png", 16), ("meta.jpg", 8), ("meta.tif", 8), ("meta16.tif", 16)],
)
def test_icc_and_exif_are_written_back(tmp_path, name, bit_depth):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = PILImage.Exif()
    exif[0x010F] = "sparsesr-test"
    source = Image(pixels=_pixels(3), mode="RGB", bit_depth=bit_depth, icc_profile=icc, exif=exif.tobytes())
    write_image(tmp_path / name, source)
    image = read_image(tmp_path / name)
    assert image.icc_profile == icc
    kept = PILImage.Exif()
    kept.load(image.exif)
    assert kept[0x010F] == "sparsesr-test"
    assert image.bit_depth == bit_depth


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow, on the header-only TIFF
def test_corrupt_and_missing_files_raise_one_line_errors(tmp_path):
    good = tmp_path / "good.png"
    write_image(good, _pixels(3, 32, 32))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    write_image(tmp_path / "deep.png", _pixels(3, 32, 32), "RGB", 16)
    truncated_deep = tmp_path / "truncated16.png"
    truncated_deep.write_bytes((tmp_path / "deep.png").read_bytes()[:-40])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    write_image(tmp_path / "deep.tif", _pixels(3, 32, 32), "RGB", 16)
    truncated_tiff = tmp_path / "truncated16.tif"
    truncated_tiff.write_bytes((tmp_path / "deep.tif").read_bytes()[:-300])  # inside the pixel data
    raw = np.zeros((32, 32, 4), np.uint16)
    tifffile.imwrite(tmp_path / "raw.tif", raw, photometric="rgb", extrasamples=["unassalpha"])
    truncated_raw_tiff = tmp_path / "truncated_raw16.tif"
    truncated_raw_tiff.write_bytes((tmp_path / "raw.tif").read_bytes()[:5000])
    header_only_tiff = tmp_path / "header16.tif"
    header_only_tiff.write_bytes((tmp_path / "deep.tif").read_bytes()[:12])
    tiffs = (truncated_tiff, truncated_raw_tiff, header_only_tiff)
    for path in (truncated, truncated_deep, garbage, tmp_path / "missing.png", *tiffs):
        with pytest.raises(ImageReadError) as info:
            read_image(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message


def test_failed_write_leaves_no_temp_file_and_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.png"
    write_image(path, _pixels(3))
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(image_io.os, "replace", broken_replace)
    with pytest.raises(ImageWriteError, match="out.png"):
        write_image(path, _pixels(3, seed=1))
    assert sorted(os.listdir(tmp_path)) == ["out.png"]
    assert path.read_bytes() == before


def test_write_errors(tmp_path):
    with pytest.raises(ImageWriteError, match=r"'\.gif'.*not supported.*\.png"):
        write_image(tmp_path / "x.gif", _pixels(3))
    with pytest.raises(ImageWriteError, match="no file extension"):
        write_image(tmp_path / "x", _pixels(3))
    with pytest.raises(ImageWriteError, match="does not fit"):
        write_image(tmp_path / "x.png", _pixels(3), "RGBA")
    with pytest.raises(ImageWriteError, match="bit depth must be 8 or 16"):
        write_image(tmp_path / "x.tif", _pixels(3), "RGB", 12)
    with pytest.raises(ImageWriteError):
        write_image(tmp_path / "no-such-folder" / "x.png", _pixels(3))
    assert sorted(os.listdir(tmp_path)) == []


def test_written_file_gets_normal_permissions(tmp_path):
    write_image(tmp_path / "p.png", _pixels(1))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "p.png").stat().st_mode & 0o777 == 0o666 & ~umask


def test_exif_orientation_on_16bit_png(tmp_path):
    exif = PILImage.Exif()
    exif[0x0112] = 6  # stored rotated: display needs 90 degrees clockwise
    pixels = _pixels(3, 4, 6).double()
    write_image(tmp_path / "deep.png", pixels, "RGB", 16, exif=exif.tobytes())
    image = read_image(tmp_path / "deep.png")
    assert image.bit_depth == 16 and image.pixels.shape == (3, 6, 4)
    expected = torch.rot90(torch.round(pixels * 65535), k=-1, dims=(1, 2))
    assert torch.equal(torch.round(image.pixels.double() * 65535), expected)
    kept = PILImage.Exif()
    kept.load(image.exif)
    assert 0x0112 not in kept


# --------------------------------------------------------------------------------------------
# Every output format, read back by an independent decoder (issue #15: corrupt 8-bit TIFFs)


def _smooth(channels: int, h: int = 37, w: int = 53, seed: int = 0) -> torch.Tensor:
    """Gradients plus a little noise: a photo-like image that lossy codecs keep close."""
    y = torch.linspace(0, 1, h)[:, None].expand(h, w)
    x = torch.linspace(0, 1, w)[None, :].expand(h, w)
    noise = torch.rand(channels, h, w, generator=torch.Generator().manual_seed(seed)) * 0.1
    base = torch.stack([(x + y) / 2, x, y, 1 - x][:channels]) if channels > 1 else ((x + y) / 2)[None]
    return (base * 0.9 + noise).clamp(0, 1)


def _psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


# (extension, bit depth, lossless) -> how each mode is stored: WebP has no gray, JPEG/BMP no alpha.
FORMATS = {
    ("png", 8, True): {"L": "L", "LA": "LA", "RGB": "RGB", "RGBA": "RGBA"},
    ("png", 16, True): {"L": "L", "LA": "LA", "RGB": "RGB", "RGBA": "RGBA"},
    ("tif", 8, True): {"L": "L", "LA": "LA", "RGB": "RGB", "RGBA": "RGBA"},
    ("tiff", 16, True): {"L": "L", "LA": "LA", "RGB": "RGB", "RGBA": "RGBA"},
    ("webp", 8, True): {"L": "RGB", "LA": "RGBA", "RGB": "RGB", "RGBA": "RGBA"},
    ("webp", 8, False): {"L": "RGB", "LA": "RGBA", "RGB": "RGB", "RGBA": "RGBA"},
    ("jpg", 8, False): {"L": "L", "LA": "L", "RGB": "RGB", "RGBA": "RGB"},
    ("jpeg", 8, False): {"L": "L", "LA": "L", "RGB": "RGB", "RGBA": "RGB"},
    ("bmp", 8, True): {"L": "L", "LA": "L", "RGB": "RGB", "RGBA": "RGB"},
}


def _expected_stored(pixels: torch.Tensor, mode: str, stored: str) -> torch.Tensor:
    """The pixels a format stores for ``mode`` written as ``stored`` (gray replicated, alpha dropped)."""
    colour, alpha = (pixels[:-1], pixels[-1:]) if mode.endswith("A") else (pixels, pixels[:0])
    if stored.startswith("RGB") and colour.shape[0] == 1:
        colour = colour.expand(3, -1, -1)
    return torch.cat([colour, alpha]) if stored.endswith("A") else colour


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
@pytest.mark.parametrize("ext, bit_depth, lossless", sorted(FORMATS))
def test_every_output_format_reads_back_in_other_decoders(tmp_path, ext, bit_depth, lossless, mode):
    pixels = _smooth(CHANNELS[mode])
    stored = FORMATS[ext, bit_depth, lossless][mode]
    path = tmp_path / f"out.{ext}"
    write_image(path, pixels, mode, bit_depth, lossless=lossless, quality=95)
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left
    expected = _expected_stored(pixels, mode, stored)
    levels = 65535 if bit_depth == 16 else 255
    expected_hwc = np.round(expected.double().numpy() * levels).astype(np.int64).transpose(1, 2, 0)

    # Our own reader.
    image = read_image(path)
    assert image.mode == stored and image.bit_depth == bit_depth and image.size == (37, 53)
    ours = np.round(image.pixels.double().numpy() * levels).astype(np.int64).transpose(1, 2, 0)

    # Pillow: size, mode and (8-bit) pixels; it reduces 16-bit colour, so those are checked below
    # (and it cannot open a 16-bit gray+alpha TIFF at all).
    theirs = None
    if not (ext.startswith("tif") and bit_depth == 16 and mode == "LA"):
        with PILImage.open(path) as im:
            assert im.size == (53, 37)
            if bit_depth == 8:
                assert im.mode == stored
                theirs = _hwc_of(np.asarray(im)).astype(np.int64)
    if ext in ("tif", "tiff"):  # tifffile: the file's one series matches its page, same pixels
        with tifffile.TiffFile(path) as tif:
            assert len(tif.pages) == 1 and tif.series[0].shape == tif.pages[0].shape
            theirs = _hwc_of(tif.pages[0].asarray()).astype(np.int64)
    if ext == "png" and bit_depth == 16:
        import png

        width, height, rows, info = png.Reader(filename=str(path)).asDirect()
        assert (width, height, info["bitdepth"]) == (53, 37, 16)
        theirs = np.vstack([np.asarray(r, dtype=np.int64) for r in rows]).reshape(37, 53, -1)

    if lossless:
        assert np.array_equal(ours, expected_hwc) and np.array_equal(theirs, expected_hwc)
    else:  # JPEG / lossy WebP: close, and both decoders agree
        assert _psnr(theirs, expected_hwc) > 32 and _psnr(ours, expected_hwc) > 32
        assert np.abs(ours - theirs).max() <= 2


def _hwc_of(array: np.ndarray) -> np.ndarray:
    return array[:, :, None] if array.ndim == 2 else array


def _photo(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(5)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_source_tiff(path, writer: str, array: np.ndarray) -> None:
    """An 8-bit RGB TIFF with descriptive tags (Make, Artist)."""
    if writer == "tifffile":
        tifffile.imwrite(path, array, photometric="rgb",
                         extratags=[(271, "s", 0, "sparsesr-cam", True), (315, "s", 0, "someone", True)])
        return
    exif = PILImage.Exif()
    exif[271] = "sparsesr-cam"
    exif[315] = "someone"
    compression = {"pillow-lzw": "tiff_lzw", "pillow-raw": "raw"}[writer]
    PILImage.fromarray(array).save(path, compression=compression, exif=exif)


@pytest.mark.parametrize("writer", ["pillow-raw", "pillow-lzw", "tifffile"])
@pytest.mark.parametrize("factor", [1, 2])
def test_8bit_tiff_read_write_round_trip_at_any_size(tmp_path, writer, factor):
    """Issue #15: an upscaled 8-bit TIFF held the input's IFD (width, strips) and was corrupt."""
    array = _photo(362, 500)
    source = tmp_path / "in.tif"
    _write_source_tiff(source, writer, array)
    image = read_image(source)
    assert image.mode == "RGB" and image.bit_depth == 8 and image.size == (362, 500)
    assert np.array_equal(to_uint8(image.pixels).permute(1, 2, 0).numpy(), array)
    kept = PILImage.Exif()
    kept.load(image.exif)
    assert kept[271] == "sparsesr-cam" and kept[315] == "someone"
    assert not {256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 270} & set(kept)  # layout: not EXIF

    # As the upscaler does: new pixels (here each one repeated), the input's metadata.
    big = image.pixels.repeat_interleave(factor, 1).repeat_interleave(factor, 2)
    out = tmp_path / "out.tif"
    write_image(out, Image(pixels=big, mode=image.mode, exif=image.exif, icc_profile=image.icc_profile))
    expected = np.repeat(np.repeat(array, factor, 0), factor, 1)
    with PILImage.open(out) as im:
        assert im.size == (500 * factor, 362 * factor) and im.mode == "RGB"
        assert np.array_equal(np.asarray(im), expected)
        assert im.getexif()[271] == "sparsesr-cam" and im.getexif()[315] == "someone"
    with tifffile.TiffFile(out) as tif:
        assert tif.series[0].shape == tif.pages[0].shape == (362 * factor, 500 * factor, 3)
        assert np.array_equal(tif.asarray(), expected)
    assert np.array_equal(to_uint8(read_image(out).pixels).permute(1, 2, 0).numpy(), expected)


def test_tiff_ifd_given_as_exif_does_not_corrupt_the_output(tmp_path):
    """EXIF handed to write_image straight from Pillow's getexif() of a TIFF (its whole IFD)."""
    array = _photo(30, 41)
    _write_source_tiff(tmp_path / "in.tif", "pillow-lzw", array)
    with PILImage.open(tmp_path / "in.tif") as im:
        ifd = im.getexif().tobytes()
    big = torch.from_numpy(np.repeat(np.repeat(array, 2, 0), 2, 1)).permute(2, 0, 1).float() / 255
    for name in ("out.tif", "out.jpg", "out.png"):
        write_image(tmp_path / name, big, "RGB", exif=ifd)
        with PILImage.open(tmp_path / name) as out:
            assert out.size == (82, 60)
            exif = out.getexif()
            assert exif[271] == "sparsesr-cam"
            if name == "out.tif":  # the output's own layout, not the input's
                assert (exif[256], exif[257]) == (82, 60)
            else:
                assert not {256, 257, 273, 278, 279} & set(exif)
            if name != "out.jpg":
                assert np.array_equal(np.asarray(out), big.permute(1, 2, 0).mul(255).round().byte().numpy())


# --------------------------------------------------------------------------------------------
# Writable extensions, GIF, frames


def test_writable_extensions_are_exactly_what_write_image_writes(tmp_path):
    assert isinstance(image_io.WRITABLE_EXTENSIONS, frozenset)
    assert image_io.WRITABLE_EXTENSIONS == {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}
    for ext in image_io.WRITABLE_EXTENSIONS:
        assert ext == ext.lower() and ext.startswith(".")
        write_image(tmp_path / f"x{ext.upper()}", _pixels(3))  # case of the extension does not matter
        assert read_image(tmp_path / f"x{ext.upper()}").size == (7, 5)
    for ext in (".gif", ".jp2", ".tga", ".exr", ".heic"):
        with pytest.raises(ImageWriteError) as info:
            write_image(tmp_path / f"y{ext}", _pixels(3))
        message = str(info.value)
        assert ext in message and all(e in message for e in image_io.WRITABLE_EXTENSIONS)
        assert "\n" not in message
        assert not list(tmp_path.glob("*y*")) and not list(tmp_path.glob(".*"))  # nothing written


COLOURS = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]


def _frames(mode: str = "RGB") -> list:
    return [PILImage.new(mode, (9, 6), c if mode == "RGB" else c + (255,)) for c in COLOURS]


def _animated(tmp_path, kind: str):
    frames = _frames()
    if kind == "tiff-tifffile":
        path = tmp_path / "pages.tif"
        tifffile.imwrite(path, np.stack([np.asarray(f) for f in frames]), photometric="rgb")
        return path
    ext, options = {
        "gif": ("gif", {}),
        "webp": ("webp", {"lossless": True}),
        "apng": ("png", {}),
        "tiff": ("tif", {}),
    }[kind]
    path = tmp_path / f"anim.{ext}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, **options)
    return path


@pytest.mark.parametrize("kind", ["gif", "webp", "apng", "tiff", "tiff-tifffile"])
def test_animated_files_have_frames_and_read_the_first(tmp_path, kind):
    path = _animated(tmp_path, kind)
    assert image_io.frame_count(path) == 3
    image = read_image(path)
    assert image.mode == "RGB" and image.size == (6, 9)
    assert to_uint8(image.pixels)[:, 2, 3].tolist() == list(COLOURS[0])


@pytest.mark.parametrize("ext", ["png", "jpg", "webp", "bmp", "tif", "gif"])
def test_still_images_have_one_frame(tmp_path, ext):
    path = tmp_path / f"still.{ext}"
    PILImage.new("RGB", (5, 4), (1, 2, 3)).save(path)
    assert image_io.frame_count(path) == 1
    assert read_image(path).size == (4, 5)


def test_tiff_preview_page_is_not_a_frame(tmp_path):
    path = tmp_path / "with_preview.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(_photo(20, 30), photometric="rgb")
        tif.write(_photo(10, 15), photometric="rgb", subfiletype=1)  # reduced-resolution image
    assert image_io.frame_count(path) == 1


def test_frame_count_errors_are_one_line(tmp_path):
    (tmp_path / "junk.gif").write_bytes(b"GIF89a nonsense")
    for path in (tmp_path / "junk.gif", tmp_path / "missing.png"):
        with pytest.raises(ImageReadError) as info:
            image_io.frame_count(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# Pixel limit


def _png_claiming(width: int, height: int, colour_type: int = 0) -> bytes:
    """A tiny PNG whose IHDR claims ``width`` x ``height`` but whose IDAT holds a few zero bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if Pillow decodes any pixels."""
    from PIL import ImageFile

    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.filterwarnings("error")  # no DecompressionBombWarning (nor any other) may escape
@pytest.mark.parametrize("width, height", [(13000, 13000), (12000, 12000), (60000, 40000)])
def test_huge_header_is_refused_before_decoding(tmp_path, no_decoding, width, height):
    path = tmp_path / "photo.png"
    path.write_bytes(_png_claiming(width, height, colour_type=2))
    assert path.stat().st_size < 200
    expected = (f"{path}: {width}x{height} = {width * height / 1e6:.1f} megapixels exceeds the limit "
                "of 100.0 (--max-pixels)")
    for read in (read_image, image_io.image_size):
        with pytest.raises(ImageReadError) as info:
            read(path)
        assert str(info.value) == expected
    with pytest.raises(ImageReadError, match=r"exceeds the limit of 0\.5 "):
        image_io.image_size(path, max_pixels=500_000)
    assert image_io.image_size(path, max_pixels=None) == (height, width)  # header only: no decoding
    assert image_io.image_size(path, max_pixels=width * height) == (height, width)
    assert image_io.frame_count(path) == 1
    assert image_io.DEFAULT_MAX_PIXELS == 100_000_000


@pytest.mark.filterwarnings("error")
def test_truncated_png_under_the_limit_is_a_one_line_error(tmp_path):
    path = tmp_path / "truncated.png"
    path.write_bytes(_png_claiming(4000, 3000))  # 12 MP, 12 MB to decode: then the data runs out
    for max_pixels in (None, 13_000_000):
        with pytest.raises(ImageReadError) as info:
            read_image(path, max_pixels=max_pixels)
        message = str(info.value)
        assert message.startswith(f"cannot read image {path}: ") and "\n" not in message
        assert "megapixels" not in message


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("name", ["a.png", "a.jpg", "a.tif", "a.webp", "a.gif", "a16.tif", "a16.png"])
def test_our_pixel_limit_replaces_pillows(tmp_path, monkeypatch, name):
    """An image over Pillow's limit (here made tiny) but under ours loads, silently; Pillow's
    setting is left as it was."""
    path = tmp_path / name
    if name.startswith("a16"):
        write_image(path, _pixels(3, 30, 40), "RGB", 16)
    else:
        PILImage.new("RGB", (40, 30), (9, 8, 7)).save(path)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # 1200 pixels: > 2x, Pillow would raise
    assert read_image(path).size == (30, 40)
    assert read_image(path, max_pixels=None).size == (30, 40)
    assert image_io.image_size(path, max_pixels=1200) == (30, 40)
    assert image_io.frame_count(path) == 1
    with pytest.raises(ImageReadError, match="40x30 = 0.0 megapixels exceeds the limit of 0.0"):
        read_image(path, max_pixels=1199)
    with pytest.raises(ImageReadError, match="exceeds the limit"):
        image_io.image_size(path, max_pixels=1199)
    assert PILImage.MAX_IMAGE_PIXELS == 100
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # between 1x and 2x: Pillow would warn
    assert read_image(path).size == (30, 40)
    assert PILImage.MAX_IMAGE_PIXELS == 1000


def test_pillow_limit_is_restored_with_concurrent_readers(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 77)
    for i in range(6):
        PILImage.new("RGB", (20 + i, 20), (i, i, i)).save(tmp_path / f"{i}.png")
    with ThreadPoolExecutor(4) as pool:
        sizes = list(pool.map(lambda i: read_image(tmp_path / f"{i}.png").size, list(range(6)) * 4))
    assert sizes == [(20, 20 + i) for i in range(6)] * 4
    assert PILImage.MAX_IMAGE_PIXELS == 77
    with pytest.raises(ImageReadError):
        read_image(tmp_path / "missing.png")
    assert PILImage.MAX_IMAGE_PIXELS == 77


# --------------------------------------------------------------------------------------------
# EXIF orientation of the wrong type or out of range


def _exif_with_orientation(type_code: int, count: int, value: bytes) -> bytes:
    """Little-endian EXIF with Make = "cam" and an orientation entry as given (4 value bytes)."""
    entries = [(0x010F, 2, 4, b"cam\x00"), (0x0112, type_code, count, value)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI", *e[:3]) + e[3] for e in entries)
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)


BAD_ORIENTATIONS = {
    "ascii": (2, 2, b"6\x00\x00\x00"),  # the text "6"
    "undefined": (7, 1, b"\x06\x00\x00\x00"),
    "zero": (3, 1, b"\x00\x00\x00\x00"),
    "nine": (3, 1, b"\x09\x00\x00\x00"),
}


@pytest.mark.parametrize("ext", ["jpg", "png", "webp"])
@pytest.mark.parametrize("kind", sorted(BAD_ORIENTATIONS))
def test_bad_orientation_tag_is_ignored(tmp_path, kind, ext):
    array = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3) * 5
    path = tmp_path / f"odd.{ext}"
    options = {"jpg": {"quality": 95}, "webp": {"lossless": True}}.get(ext, {})
    PILImage.fromarray(array).save(path, exif=_exif_with_orientation(*BAD_ORIENTATIONS[kind]), **options)
    image = read_image(path)
    with PILImage.open(path) as im:  # what Pillow (and viewers) show: the image as stored
        as_stored = np.asarray(ImageOps.exif_transpose(im))
    assert image.size == image_io.image_size(path) == as_stored.shape[:2] == (3, 5)
    assert np.array_equal(to_uint8(image.pixels).permute(1, 2, 0).numpy(), as_stored)
    kept = PILImage.Exif()
    kept.load(image.exif)
    assert 0x0112 not in kept and kept[0x010F] == "cam"


def test_bad_orientation_tag_on_16bit_tiff_is_ignored(tmp_path):
    values = (np.arange(4 * 6 * 3).reshape(4, 6, 3) * 901 % 65536).astype(np.uint16)
    path = tmp_path / "odd16.tif"
    tifffile.imwrite(path, values, photometric="rgb", extratags=[(0x0112, "s", 0, "6", True)])
    image = read_image(path)
    assert image.size == image_io.image_size(path) == (4, 6)
    assert np.array_equal(_levels16(image.pixels), values)


def test_image_size_sees_exif_after_the_png_pixel_data(tmp_path):
    """image_size (header only) agrees with read_image when eXIf comes after IDAT."""
    exif = PILImage.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    PILImage.new("RGB", (6, 4), (1, 2, 3)).save(buffer, format="PNG", exif=exif.tobytes())
    data = buffer.getvalue()
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append(data[pos:pos + 12 + length])
        pos += 12 + length
    exif_chunk = next(c for c in chunks if c[4:8] == b"eXIf")
    rest = [c for c in chunks if c is not exif_chunk]
    path = tmp_path / "late_exif.png"
    path.write_bytes(data[:8] + b"".join(rest[:-1]) + exif_chunk + rest[-1])  # just before IEND
    assert read_image(path).size == (6, 4)  # rotated a quarter turn
    assert image_io.image_size(path) == (6, 4)


# --------------------------------------------------------------------------------------------
# Palette and transparency; PIL images


def _palette_image(transparency=None) -> PILImage.Image:
    im = PILImage.new("P", (4, 3), 0)
    im.putpalette([200, 10, 10, 10, 200, 10, 10, 10, 200] + [0] * (768 - 9))
    im.putpixel((1, 0), 1)
    im.putpixel((2, 0), 2)
    if transparency is not None:
        im.info["transparency"] = transparency
    return im


@pytest.mark.parametrize(
    "case, expected_mode, alpha",
    [
        ("p", "RGB", None),
        ("p-one-transparent", "RGBA", [255, 0, 255]),  # index 1 transparent
        ("p-trns-table", "RGBA", [40, 128, 255]),  # PNG tRNS: an alpha per palette entry
        ("gif-transparent", "RGBA", [255, 255, 0]),  # index 2 transparent
        ("l-colour-key", "LA", [0, 255, 255]),
        ("1-colour-key", "LA", [255, 0, 0]),
    ],
)
def test_palette_and_colour_key_transparency(tmp_path, case, expected_mode, alpha):
    if case == "p":
        im, path, options = _palette_image(), tmp_path / "p.png", {}
    elif case == "p-one-transparent":
        im, path, options = _palette_image(1), tmp_path / "p1.png", {"transparency": 1}
    elif case == "p-trns-table":
        im, path, options = _palette_image(), tmp_path / "pt.png", {"transparency": bytes([40, 128])}
    elif case == "gif-transparent":
        im, path, options = _palette_image(2), tmp_path / "p.gif", {"transparency": 2}
    elif case == "l-colour-key":
        im = PILImage.new("L", (4, 3), 90)
        im.putpixel((0, 0), 7)
        path, options = tmp_path / "l.png", {"transparency": 7}
    else:
        im = PILImage.new("1", (4, 3), 0)
        im.putpixel((0, 0), 1)
        path, options = tmp_path / "1.png", {"transparency": 0}
    im.save(path, **options)
    image = read_image(path)
    assert image.mode == expected_mode and image.bit_depth == 8
    got = to_uint8(image.pixels)
    if case.startswith(("p", "gif")):
        assert got[:3, 0, :3].T.tolist() == [[200, 10, 10], [10, 200, 10], [10, 10, 200]]
    if alpha is not None:
        assert got[-1, 0, :3].tolist() == alpha
    # A PIL image goes through the very same decoding.
    with PILImage.open(path) as opened:
        from_pil = image_io.pil_to_image(opened)
    assert from_pil.mode == image.mode and torch.equal(from_pil.pixels, image.pixels)


def test_pa_and_rgba_palette_images_keep_alpha():
    pa = PILImage.new("PA", (3, 2))
    pa.putpalette([0, 0, 0, 255, 128, 0] + [0] * 762)
    pa.putpixel((0, 0), (1, 77))
    image = image_io.pil_to_image(pa)
    assert image.mode == "RGBA"
    assert to_uint8(image.pixels)[:, 0, 0].tolist() == [255, 128, 0, 77]

    quantized = PILImage.new("RGBA", (3, 2), (255, 0, 0, 128)).quantize()
    assert quantized.mode == "P" and "transparency" not in quantized.info  # alpha in the palette
    image = image_io.pil_to_image(quantized)
    assert image.mode == "RGBA" and to_uint8(image.pixels)[:, 1, 1].tolist() == [255, 0, 0, 128]


@pytest.mark.parametrize("name", ["rgba.png", "oriented.jpg", "in.tif", "gray16.tif", "cmyk.jpg", "anim.gif"])
def test_pil_to_image_decodes_like_read_image(tmp_path, name):
    path = tmp_path / name
    if name == "rgba.png":
        write_image(path, _pixels(4))
    elif name == "oriented.jpg":
        exif = PILImage.Exif()
        exif[0x0112] = 6
        exif[0x010F] = "cam"
        PILImage.fromarray(_photo(4, 6)).save(path, exif=exif.tobytes())
    elif name == "in.tif":
        _write_source_tiff(path, "pillow-lzw", _photo(9, 11))
    elif name == "gray16.tif":
        PILImage.new("I;16", (6, 4), 4000).save(path)
    elif name == "cmyk.jpg":
        PILImage.new("CMYK", (6, 4), (10, 20, 30, 40)).save(path)
    else:
        _frames()[0].save(path, save_all=True, append_images=_frames()[1:])
    expected = read_image(path)
    with PILImage.open(path) as im:
        orientation_before = im.getexif().get(0x0112)
        image = image_io.pil_to_image(im)
        assert im.getexif().get(0x0112) == orientation_before  # the caller's image is not changed
    assert (image.mode, image.bit_depth, image.size) == (expected.mode, expected.bit_depth, expected.size)
    assert torch.equal(image.pixels, expected.pixels)
    assert image.exif == expected.exif and image.icc_profile == expected.icc_profile


def test_pil_to_image_errors_are_one_line():
    with pytest.raises(ImageReadError) as info:
        image_io.pil_to_image(PILImage.new("F", (3, 2)))
    assert "floating-point" in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# Temporary files


def _temp_name_of_a_write(tmp_path, monkeypatch, target_name: str = "out.png") -> str:
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(image_io.os, "replace", spy)
    write_image(tmp_path / target_name, _pixels(3))
    monkeypatch.setattr(image_io.os, "replace", real_replace)
    return seen[0]


def test_temp_files_have_our_own_unambiguous_names(tmp_path, monkeypatch):
    name = _temp_name_of_a_write(tmp_path, monkeypatch)
    assert name.startswith(".out.png.") and image_io.is_own_temp_file(name)
    assert image_io.is_own_temp_file(tmp_path / name) and image_io.is_own_temp_file(str(tmp_path / name))
    # Not taken for an image by anything that looks at extensions (that is how they became inputs).
    assert os.path.splitext(name)[1].lower() not in image_io.IMAGE_EXTENSIONS
    assert sorted(os.listdir(tmp_path)) == ["out.png"]
    for other in [
        ".hidden.png",
        "photo.png",
        ".out.png",
        ".out.png.1A2B3C4D.sparsesr-tmp",  # hex is lower case
        ".out.png.1a2b3c4.sparsesr-tmp",
        ".out.png.1a2b3c4d.sparsesr-tmp.png",
        "out.png.1a2b3c4d.sparsesr-tmp",  # not hidden
        "..1a2b3c4d.sparsesr-tmp",
    ]:
        assert not image_io.is_own_temp_file(other), other
    # The scheme of earlier versions: their leftovers are recognised (skipped, cleaned) too.
    assert image_io.is_own_temp_file(".out.png.1a2b3c4d.tmp.png")
    long_name = "x" * 250 + ".png"  # near the file-name limit: the temporary name still fits
    write_image(tmp_path / long_name, _pixels(3))
    assert (tmp_path / long_name).is_file()


def test_remove_stale_temp_files(tmp_path, monkeypatch):
    own = _temp_name_of_a_write(tmp_path, monkeypatch)
    fresh = _temp_name_of_a_write(tmp_path, monkeypatch, "other.png")
    now = time.time()
    for name, age in [(own, 7200), (fresh, 10), (".hidden.png", 7200), ("photo.png", 7200),
                      (".photo.png.1a2b3c4d.tmp.png", 7200)]:
        (tmp_path / name).write_bytes(b"left by a killed run")
        os.utime(tmp_path / name, (now - age, now - age))
    directory = tmp_path / ".d.png.0123abcd.sparsesr-tmp"
    directory.mkdir()  # named like ours, but not a file
    os.utime(directory, (now - 7200, now - 7200))
    before = set(os.listdir(tmp_path))

    assert image_io.remove_stale_temp_files(tmp_path) == 2  # ours and an earlier version's
    assert set(os.listdir(tmp_path)) == before - {own, ".photo.png.1a2b3c4d.tmp.png"}
    assert image_io.remove_stale_temp_files(tmp_path) == 0
    assert image_io.remove_stale_temp_files(tmp_path, older_than_s=5) == 1
    assert set(os.listdir(tmp_path)) == before - {own, fresh, ".photo.png.1a2b3c4d.tmp.png"}
    assert image_io.remove_stale_temp_files(tmp_path / "missing") == 0
    with pytest.raises(ValueError):
        image_io.remove_stale_temp_files(tmp_path, older_than_s=-1)


def test_interrupted_write_leaves_no_temp_file(tmp_path, monkeypatch):
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(image_io.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_image(tmp_path / "out.png", _pixels(3))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("ext", ["tif", "jpg", "png", "webp"])
def test_camera_exif_with_sub_ifds_can_be_written_to_every_format(tmp_path, ext):
    """A camera JPEG's EXIF (with EXIF and GPS sub-IFDs) made writing an 8-bit TIFF fail."""
    exif = PILImage.Exif()
    exif[0x010F] = "sparsesr-cam"
    exif[0x0112] = 6
    exif.get_ifd(0x8769)[0x9003] = "2024:05:06 07:08:09"  # DateTimeOriginal
    exif.get_ifd(0x8825)[0x0001] = "N"  # GPSLatitudeRef
    PILImage.fromarray(_photo(10, 14)).save(tmp_path / "camera.jpg", exif=exif.tobytes(), quality=95)
    image = read_image(tmp_path / "camera.jpg")
    assert image.size == (14, 10)
    write_image(tmp_path / f"out.{ext}", image)
    with PILImage.open(tmp_path / f"out.{ext}") as out:
        assert out.size == (10, 14)
        kept = out.getexif()
        assert kept[0x010F] == "sparsesr-cam" and kept.get(0x0112, 1) == 1
        if ext != "tif":  # Pillow's TIFF writer (libtiff) cannot write sub-IFDs: TIFFs lose them
            assert kept.get_ifd(0x8769)[0x9003] == "2024:05:06 07:08:09"
            assert kept.get_ifd(0x8825)[0x0001] == "N"
    assert read_image(tmp_path / f"out.{ext}").size == (14, 10)


@pytest.mark.parametrize("ext,bits", [(".png", 8), (".png", 16), (".tif", 16), (".jpg", 8), (".webp", 8), (".bmp", 8)])
def test_quantized_pixels_write_the_same_file_as_float_pixels(tmp_path, ext, bits):
    """The upscaler hands write_image uint8 / uint16 levels of big images (no float copy): the file
    must be the one the float pixels give."""
    from sparsesr.data.image_io import _to_uint16, stored_bit_depth, to_uint8

    pixels = torch.rand(3, 9, 7)
    stored = stored_bit_depth(tmp_path / f"a{ext}", bits)
    levels = to_uint8(pixels) if stored == 8 else torch.from_numpy(_to_uint16(pixels).astype("int32")).to(torch.uint16)
    write_image(tmp_path / f"float{ext}", pixels, "RGB", bits)
    write_image(tmp_path / f"levels{ext}", levels, "RGB", bits)
    assert (tmp_path / f"float{ext}").read_bytes() == (tmp_path / f"levels{ext}").read_bytes()
    assert stored == (bits if ext in (".png", ".tif") else 8)
