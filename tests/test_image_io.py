"""Image I/O on small generated files: modes, 16-bit, EXIF orientation, metadata, errors."""
from __future__ import annotations

import os

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
    with pytest.raises(ImageWriteError, match="unknown extension"):
        write_image(tmp_path / "x.gif", _pixels(3))
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
