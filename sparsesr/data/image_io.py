"""Read and write images as float tensors, keeping what users care about.

``read_image`` returns an :class:`Image`: pixels as float32 ``[C, H, W]`` in [0, 1], the colour
mode ("L", "LA", "RGB", "RGBA"), the bit depth (8 or 16), and the ICC profile and EXIF bytes so
they can be written back. EXIF orientation is applied to the pixels and reset in the kept EXIF,
so a photo is upscaled the way it is displayed.

Pillow decodes everything except 16-bit colour images, which it silently reduces to 8 bits (or,
for 16-bit gray+alpha TIFFs, cannot open). 16-bit PNGs (all of them, for one code path) go through
``pypng``, a small pure-Python PNG codec; 16-bit colour and gray+alpha TIFFs are read and all 16-bit
TIFFs are written with ``tifffile`` (pure Python + numpy). 16-bit grayscale TIFFs are still read
by Pillow, whose libtiff decodes every compression (tifffile needs ``imagecodecs`` for LZW).

``write_image`` is atomic: it writes a temporary file in the destination folder and moves it into
place with ``os.replace``, so a crash or an error never leaves a half-written image behind. A kill
during the write can leave the temporary file; :func:`is_own_temp_file` recognises those names and
:func:`remove_stale_temp_files` deletes old ones.

Reading checks the pixel count from the header against ``max_pixels`` before decoding anything;
this limit replaces Pillow's decompression-bomb check, which never fires from here. Of animated
files (GIF, WebP, APNG, multi-page TIFF) the first frame is read; :func:`frame_count` tells.
"""
from __future__ import annotations

import contextlib
import io
import os
import struct
import threading
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import png  # pypng
import tifffile
import torch
from PIL import Image as PILImage

from sparsesr.errors import ImageReadError, ImageWriteError, SparseSRError
from sparsesr.fileio import atomic_write_bytes, is_own_temp_file, remove_stale_temp_files  # noqa: F401 (re-exported)

__all__ = [
    "Image",
    "IMAGE_EXTENSIONS",
    "WRITABLE_EXTENSIONS",
    "DEFAULT_MAX_PIXELS",
    "read_image",
    "write_image",
    "image_size",
    "frame_count",
    "pil_to_image",
    "is_own_temp_file",
    "remove_stale_temp_files",
    "quantize",
    "to_uint8",
    "MODES",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MODES = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}  # mode -> number of channels
_MODE_OF_CHANNELS = {channels: mode for mode, channels in MODES.items()}
_EXIF_ORIENTATION = 0x0112
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_TIFF_ICC_PROFILE = 34675

# 100 megapixels: photos of every full-frame or smaller camera (up to ~61 MP) fit, while one
# decoded as float32 RGB is already 1.2 GB and its x2 upscale 4.8 GB. Bigger images (100-150 MP
# medium format, panoramas) are rare enough to ask for --max-pixels, and a small file claiming
# more is usually a broken or malicious one (a decompression bomb). Pillow's own check (89 MP,
# a warning, an error from 179 MP) is replaced by this one.
DEFAULT_MAX_PIXELS = 100_000_000


@dataclass
class Image:
    """A decoded image: float32 pixels [C, H, W] in [0, 1] plus what is needed to write it back.

    ``pixels`` may also be uint8 / uint16 levels already quantized to ``bit_depth`` (what the
    upscaler hands to :func:`write_image` for a big image, so no float copy of it exists).
    """

    pixels: torch.Tensor
    mode: str = "RGB"
    bit_depth: int = 8
    icc_profile: bytes | None = None
    exif: bytes | None = None

    @property
    def has_alpha(self) -> bool:
        return self.mode in ("LA", "RGBA")

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return int(self.pixels.shape[-2]), int(self.pixels.shape[-1])


# --------------------------------------------------------------------------------------------
# Helpers


def quantize(x: torch.Tensor, bit_depth: int = 8) -> torch.Tensor:
    """Clamp to [0, 1] and round to the nearest of the 2**bit_depth levels; same dtype."""
    levels = float(2**bit_depth - 1)
    return torch.round(x.clamp(0, 1) * levels) / levels


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float pixels in [0, 1] -> uint8 (clamped and rounded); uint8 pixels pass as they are."""
    if x.dtype == torch.uint8:
        return x
    if x.dtype == torch.uint16:  # 16-bit levels written to an 8-bit format
        x = x.to(torch.float64) / 65535
    return torch.round(x.clamp(0, 1) * 255).to(torch.uint8)


def _to_uint16(x: torch.Tensor) -> np.ndarray:
    if x.dtype == torch.uint16:  # quantized already (the upscaler's banded output): no float copy
        return x.detach().cpu().numpy()
    if x.dtype == torch.uint8:
        x = x.to(torch.float64) / 255
    return torch.round(x.detach().cpu().to(torch.float64).clamp(0, 1) * 65535).numpy().astype(np.uint16)


def stored_bit_depth(path: str | os.PathLike, bit_depth: int) -> int:
    """The bit depth :func:`write_image` stores for an image of ``bit_depth`` at ``path``: JPEG,
    BMP and WebP hold 8 bits, PNG and TIFF 8 or 16."""
    return bit_depth if Path(path).suffix.lower() in (".png", ".tif", ".tiff") else 8


def _hwc(array: np.ndarray) -> np.ndarray:
    return array[:, :, None] if array.ndim == 2 else array


def _orient(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1-8) to [C, H, W] pixels so they are upright."""
    h, w = -2, -1
    if orientation == 2:
        return pixels.flip(w)
    if orientation == 3:
        return pixels.flip(h, w)
    if orientation == 4:
        return pixels.flip(h)
    if orientation == 5:
        return pixels.transpose(h, w)
    if orientation == 6:
        return torch.rot90(pixels, k=-1, dims=(h, w))  # 90 degrees clockwise
    if orientation == 7:
        return pixels.transpose(h, w).flip(h, w)
    if orientation == 8:
        return torch.rot90(pixels, k=1, dims=(h, w))  # 90 degrees counter-clockwise
    return pixels


def _png_bit_depth(path: Path) -> int | None:
    """Bit depth from a PNG's IHDR, or None if the file is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or not head.startswith(_PNG_SIGNATURE):
        return None
    return head[24]


def _is_deep_tiff(path: Path) -> bool:
    """Whether ``path`` is a TIFF that needs tifffile: 16-bit colour or gray+alpha.

    Decided from the first page's tags (bits per sample, sample format, photometric, samples per
    pixel), never from pixel values. Plain 16-bit grayscale and all else is left to Pillow.
    """
    with open(path, "rb") as f:
        if f.read(4) not in _TIFF_SIGNATURES:
            return False
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
    except Exception:  # noqa: BLE001 - a structure tifffile rejects: Pillow decides (and reports)
        return False
    deep = page.bitspersample == 16 and page.sampleformat == tifffile.SAMPLEFORMAT.UINT
    colour = page.photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.MINISBLACK)
    if not (deep and colour and page.samplesperpixel > 1):
        return False
    try:  # LZW and JPEG need the optional imagecodecs package
        tifffile.TIFF.DECOMPRESSORS[page.compression]
    except Exception:  # noqa: BLE001 - tifffile raises various errors for a missing codec
        warnings.warn(f"{path}: 16-bit TIFF with {page.compression.name} compression is read at 8 bits "
                      "(pip install imagecodecs to keep 16 bits)", stacklevel=3)
        return False
    return True


def _one_line(exc: BaseException) -> str:
    """An exception as one line of text, for an error message that must not span lines."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _orientation(value: object) -> int:
    """An EXIF orientation tag's value as 1-8; anything else (ASCII, bytes, 0, 9, ...) counts as 1.

    Pillow (``ImageOps.exif_transpose``) and viewers ignore such a tag too, so the image is
    used as stored rather than rejected.
    """
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 8:
        return value
    return 1


# Pillow's decompression-bomb check reads the module global ``MAX_IMAGE_PIXELS``. Our own limit
# replaces it, so it is lifted while we open and decode; a count of readers in progress (not a lock
# held during decoding) lets threads read in parallel and restores the user's value after the last.
# Pillow has no per-call setting: other threads' own Pillow calls meanwhile run without its check.
_pillow_limit_lock = threading.Lock()
_pillow_limit_users = 0
_pillow_limit_saved: int | None = None


@contextlib.contextmanager
def _pillow_limit_lifted() -> Iterator[None]:
    global _pillow_limit_users, _pillow_limit_saved
    with _pillow_limit_lock:
        if _pillow_limit_users == 0:
            _pillow_limit_saved = PILImage.MAX_IMAGE_PIXELS
            PILImage.MAX_IMAGE_PIXELS = None
        _pillow_limit_users += 1
    try:
        yield
    finally:
        with _pillow_limit_lock:
            _pillow_limit_users -= 1
            if _pillow_limit_users == 0:
                PILImage.MAX_IMAGE_PIXELS = _pillow_limit_saved


def _check_pixels(path: Path, width: int, height: int, max_pixels: int | None) -> None:
    """Raise ImageReadError if a ``width`` x ``height`` image is over ``max_pixels`` (None: no limit)."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageReadError(
            f"{path}: {width}x{height} = {width * height / 1e6:.1f} megapixels exceeds the limit "
            f"of {max_pixels / 1e6:.1f} (--max-pixels)"
        )


def _png_chunk(path: Path, kind: bytes) -> bytes | None:
    """Data of the first chunk of type ``kind`` in a PNG, walking chunk headers (no decoding)."""
    # Unbuffered: a buffered read after each seek would fetch (and so read all of) the chunk data.
    with open(path, "rb", buffering=0) as f:
        if f.read(8) != _PNG_SIGNATURE:
            return None
        while len(head := f.read(8)) == 8:
            length, found = struct.unpack(">I4s", head)
            if found == kind:
                data = f.read(length)
                return data if len(data) == length else None
            if found == b"IEND":
                return None
            f.seek(length + 4, os.SEEK_CUR)  # data and CRC
    return None


def _header_exif(im: PILImage.Image, path: Path | None) -> PILImage.Exif:
    """EXIF of an opened image without decoding its pixels (as ``im.getexif()`` after ``load``).

    Pillow's PNG ``getexif`` decodes the whole image to find an eXIf chunk after the pixel data;
    a walk over the chunk headers finds it as well, for the price of a few seeks.
    """
    if im.format != "PNG" or path is None or "exif" in im.info:
        return im.getexif()
    late = _png_chunk(path, b"eXIf")
    if late:
        im.info["exif"] = b"Exif\x00\x00" + late  # as Pillow's PNG decoder stores it
    return PILImage.Image.getexif(im)  # the base class: EXIF from info, orientation from XMP


_EXIF_SUB_IFDS = (34665, 34853)  # pointers to the EXIF and GPS sub-IFDs

# First-IFD tags of a TIFF that describe the picture, not how its pixels are stored: these are
# its "EXIF". Everything else in that IFD (size, strips, compression, colour map, private layout
# such as ImageJ's or Photoshop's layers) belongs to the input file and corrupts an output that
# carries it (Pillow's TIFF writer lets EXIF tags override its own ImageWidth, RowsPerStrip...).
_TIFF_DESCRIPTIVE_TAGS = frozenset({
    269,  # DocumentName
    270,  # ImageDescription (unless tifffile/ImageJ layout metadata, see _is_layout_description)
    271,  # Make
    272,  # Model
    _EXIF_ORIENTATION,
    282, 283, 296,  # XResolution, YResolution, ResolutionUnit
    305,  # Software
    306,  # DateTime
    315,  # Artist
    316,  # HostComputer
    318, 319,  # WhitePoint, PrimaryChromaticities
    18246, 18249,  # Rating, RatingPercent
    33432,  # Copyright
    *_EXIF_SUB_IFDS,
    0x9C9B, 0x9C9C, 0x9C9D, 0x9C9E, 0x9C9F,  # Windows XPTitle, XPComment, XPAuthor, XPKeywords, XPSubject
})

# Tags that describe storage only. EXIF to be written never keeps them, whatever its source: an
# EXIF block handed to write_image directly may be a TIFF's first IFD.
_LAYOUT_TAGS = frozenset({
    254, 255, 256, 257, 258, 259, 262, 263, 264, 265, 266, 273, 277, 278, 279, 280, 281, 284,
    288, 289, 290, 291, 292, 293, 317, 320, 321, 322, 323, 324, 325, 330, 332, 334, 338, 339,
    340, 341, 347, *range(512, 522), 530, _TIFF_ICC_PROFILE,  # the ICC profile travels on its own
    37724, 50838, 50839,  # Photoshop layers, ImageJ metadata: tied to the input's pixels
})


def _is_layout_description(text: object) -> bool:
    """Whether an ImageDescription is tifffile's or ImageJ's shape metadata of the input file."""
    return isinstance(text, str) and text.startswith(('{"shape"', "ImageJ="))


def _upright_exif(exif: PILImage.Exif, tiff: bool = False) -> tuple[int, bytes | None]:
    """(EXIF orientation, EXIF bytes to keep), the orientation removed since pixels are made upright.

    ``tiff``: ``exif`` is a TIFF's first IFD; only its descriptive tags are kept. An orientation
    tag that is not an integer 1-8 is dropped and counts as 1. Call while the image file is open:
    Pillow reads nested EXIF directories lazily.
    """
    orientation = _orientation(exif.get(_EXIF_ORIENTATION, 1))
    drop = [_EXIF_ORIENTATION] if _EXIF_ORIENTATION in exif else []
    for tag in list(exif):
        if (tiff and tag not in _TIFF_DESCRIPTIVE_TAGS) or tag in _LAYOUT_TAGS:
            drop.append(tag)
        elif tag == 270 and _is_layout_description(exif[tag]):
            drop.append(tag)
    for tag in set(drop):
        del exif[tag]
    return orientation, (exif.tobytes() if len(exif) else None)


# --------------------------------------------------------------------------------------------
# Reading


_GRAY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _decode_with_pillow(im: PILImage.Image) -> tuple[np.ndarray, str, int, bool]:
    """Pillow image -> (HWC array, mode, bit depth, whether the ICC profile still applies)."""
    mode = im.mode
    if mode in _GRAY16_MODES:
        # 16-bit grayscale (Pillow may report 16-bit PNG/TIFF grayscale as "I").
        array = np.clip(np.asarray(im, dtype=np.int64), 0, 65535).astype(np.uint16)
        return _hwc(array), "L", 16, True
    if mode == "F":
        raise ValueError("32-bit floating-point images are not supported")
    if mode in MODES:
        target = mode
    elif mode == "1":
        target = "L"
    elif mode == "La":
        target = "LA"
    elif mode in ("RGBa", "PA"):
        target = "RGBA"
    elif mode == "P" and im.palette is not None and im.palette.mode == "RGBA":
        target = "RGBA"  # alpha in the palette itself (an in-memory quantized RGBA image)
    else:  # P, CMYK, YCbCr, LAB, HSV, RGBX, ...
        target = "RGB"
    # Palette or colour-key transparency becomes a real alpha channel (Pillow converts these modes).
    if im.info.get("transparency") is not None and mode in ("1", "L", "P", "RGB") and target in ("L", "RGB"):
        target += "A"
    if target != mode:
        im = im.convert(target)
    # An ICC profile describes the file's own colour space; a CMYK/LAB/HSV one no longer applies.
    icc_valid = mode not in ("CMYK", "LAB", "HSV")
    return _hwc(np.asarray(im, dtype=np.uint8)), target, 8, icc_valid


def _decode_png16(path: Path) -> tuple[np.ndarray, str, int]:
    """16-bit PNG via pypng -> (HWC uint16 array, mode, 16)."""
    with open(path, "rb") as f:  # pypng leaves a file it opens itself open
        width, height, rows, info = png.Reader(file=f).asDirect()
        planes = info["planes"]
        array = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows]).reshape(height, width, planes)
    depth = info["bitdepth"]
    if depth != 16:  # an sBIT chunk made pypng rescale: bring values back to 16 bits
        array = np.round(array.astype(np.float64) * (65535 / (2**depth - 1))).astype(np.uint16)
    return array, _MODE_OF_CHANNELS[planes], 16


def _decode_tiff16(
    path: Path, tif: tifffile.TiffFile, max_pixels: int | None
) -> tuple[np.ndarray, str, bytes | None, int, bytes | None]:
    """16-bit TIFF via tifffile -> (HWC uint16 array, mode, ICC, orientation, EXIF bytes)."""
    page = tif.pages[0]
    _check_pixels(path, page.imagewidth, page.imagelength, max_pixels)
    array = page.asarray()
    if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE:
        array = np.moveaxis(array, 0, -1)  # [S, H, W] -> [H, W, S]
    colour = 3 if page.photometric == tifffile.PHOTOMETRIC.RGB else 1
    pixels = array[:, :, :colour].astype(np.uint16)
    # The first extra sample is alpha when marked so; unspecified extras are dropped (Pillow's "X").
    kind = page.extrasamples[0] if page.extrasamples else tifffile.EXTRASAMPLE.UNSPECIFIED
    if kind in (tifffile.EXTRASAMPLE.ASSOCALPHA, tifffile.EXTRASAMPLE.UNASSALPHA):
        alpha = array[:, :, colour].astype(np.uint16)
        if kind == tifffile.EXTRASAMPLE.ASSOCALPHA:  # premultiplied; an Image holds straight colour
            a = alpha.astype(np.float64)[:, :, None]
            straight = np.where(a > 0, pixels * 65535.0 / np.maximum(a, 1), 0)
            pixels = np.clip(np.round(straight), 0, 65535).astype(np.uint16)
        pixels = np.concatenate([pixels, alpha[:, :, None]], axis=2)

    # A TIFF's EXIF is the descriptive part of its first IFD, read as Pillow's getexif() does.
    orientation, exif_bytes = _orientation(page.tags.valueof(_EXIF_ORIENTATION, 1)), None
    if not tif.is_bigtiff:  # Pillow's EXIF reader handles classic TIFF headers only
        with open(path, "rb") as f:
            exif = PILImage.Exif()
            exif.load_from_fp(f)
            orientation, exif_bytes = _upright_exif(exif, tiff=True)
    icc = page.tags.valueof(_TIFF_ICC_PROFILE) or None
    return pixels, _MODE_OF_CHANNELS[pixels.shape[2]], icc, orientation, exif_bytes


def _to_image(
    array: np.ndarray, mode: str, bit_depth: int, icc: bytes | None, orientation: int, exif: bytes | None
) -> Image:
    scale = 65535.0 if bit_depth == 16 else 255.0
    pixels = torch.from_numpy(array.astype(np.float32) / np.float32(scale)).permute(2, 0, 1).contiguous()
    pixels = _orient(pixels, orientation).contiguous()
    return Image(pixels=pixels, mode=mode, bit_depth=bit_depth, icc_profile=icc, exif=exif)


def _detached_exif(exif: PILImage.Exif) -> PILImage.Exif:
    """A copy of ``exif`` to edit; only the orientation if Pillow cannot serialise the rest."""
    copy = PILImage.Exif()
    try:
        copy.load(exif.tobytes())
    except Exception:  # noqa: BLE001 - unwritable EXIF is dropped rather than failing the image
        copy = PILImage.Exif()
        copy[_EXIF_ORIENTATION] = _orientation(exif.get(_EXIF_ORIENTATION, 1))
    return copy


def _image_from_pillow(im: PILImage.Image, path: Path | None) -> Image:
    """The shared decode path of files (``path``) and PIL images (``path`` None) opened by Pillow."""
    deep_png = path is not None and im.format == "PNG" and _png_bit_depth(path) == 16
    if deep_png:  # Pillow would reduce it to 8 bits; EXIF is then taken without decoding
        array, mode, bit_depth = _decode_png16(path)
        exif = _header_exif(im, path)
        icc = im.info.get("icc_profile") or None
    else:
        im.load()  # decode now, so truncated or corrupt files fail here
        array, mode, bit_depth, icc_valid = _decode_with_pillow(im)
        exif = im.getexif()
        icc = (im.info.get("icc_profile") or None) if icc_valid else None
    if path is None:  # the caller's image: its EXIF must stay as it is
        exif = _detached_exif(exif)
    orientation, exif_bytes = _upright_exif(exif, tiff=im.format == "TIFF")
    return _to_image(array, mode, bit_depth, icc, orientation, exif_bytes)


def read_image(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image:
    """Decode an image file (PNG, JPEG, BMP, TIFF, WebP, GIF...) into an upright :class:`Image`.

    Of an animated file (GIF, WebP, APNG, multi-page TIFF) the first frame is read; see
    :func:`frame_count`. An image of more than ``max_pixels`` pixels (None: no limit) is refused
    from its header, before anything is decoded.
    """
    path = Path(path)
    try:
        if _is_deep_tiff(path):
            with tifffile.TiffFile(path) as tif:
                array, mode, icc, orientation, exif_bytes = _decode_tiff16(path, tif, max_pixels)
            return _to_image(array, mode, 16, icc, orientation, exif_bytes)
        with _pillow_limit_lifted(), PILImage.open(path) as im:
            _check_pixels(path, *im.size, max_pixels)
            return _image_from_pillow(im, path)
    except SparseSRError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"cannot read image {path}: file not found") from None
    except MemoryError:
        raise ImageReadError(f"cannot read image {path}: not enough memory to decode it") from None
    except Exception as exc:  # noqa: BLE001 - every decoder failure is the same user error
        raise ImageReadError(f"cannot read image {path}: {_one_line(exc)}") from None


def pil_to_image(im: PILImage.Image) -> Image:
    """A PIL image as an :class:`Image`, decoded exactly as :func:`read_image` decodes files.

    Modes become "L", "LA", "RGB" or "RGBA": "1" -> "L"; palette ("P") -> "RGB", or "RGBA" when it
    has transparency (a ``transparency`` entry or an RGBA palette); "PA" -> "RGBA"; a colour-key
    ``transparency`` on "L"/"RGB" becomes alpha; CMYK, YCbCr... -> "RGB"; "I;16"/"I" -> 16-bit "L"
    (clipped to 0-65535); "F" is refused. Pillow holds colour at 8 bits, so a 16-bit colour file
    opened by Pillow is already 8-bit here (use read_image on the file to keep 16 bits). The EXIF
    orientation of ``im.getexif()`` is applied and removed from the kept EXIF, as for a file (after
    ``ImageOps.exif_transpose`` there is none left to apply); of an animated image the current frame
    is used. ``im`` is not modified. Failures raise :class:`ImageReadError`.
    """
    if not isinstance(im, PILImage.Image):
        raise TypeError(f"pil_to_image expects a PIL.Image.Image, got {type(im).__name__}")
    what = f"cannot use PIL image ({im.mode}, {im.width}x{im.height})"
    try:
        with _pillow_limit_lifted():  # the caller already holds the image: no pixel limit here
            return _image_from_pillow(im, None)
    except SparseSRError:
        raise
    except MemoryError:
        raise ImageReadError(f"{what}: not enough memory") from None
    except Exception as exc:  # noqa: BLE001 - every decoder failure is the same user error
        raise ImageReadError(f"{what}: {_one_line(exc)}") from None


def image_size(
    path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[int, int]:
    """(height, width) as displayed (EXIF orientation applied), reading only the header.

    Refuses, like :func:`read_image`, an image of more than ``max_pixels`` pixels (None: no limit).
    """
    path = Path(path)
    try:
        if _is_deep_tiff(path):  # Pillow cannot open every one of these (16-bit gray+alpha)
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                height, width = page.imagelength, page.imagewidth
                orientation = _orientation(page.tags.valueof(_EXIF_ORIENTATION, 1))
        else:
            with _pillow_limit_lifted(), PILImage.open(path) as im:
                width, height = im.size
                orientation = _orientation(_header_exif(im, path).get(_EXIF_ORIENTATION, 1))
        _check_pixels(path, width, height, max_pixels)
    except SparseSRError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"cannot read image {path}: file not found") from None
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(f"cannot read image {path}: {_one_line(exc)}") from None
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def frame_count(path: str | os.PathLike) -> int:
    """Number of frames (pages) of an image file: 1 for a still image, >1 for an animated one.

    Read from the headers, without decoding pixels. Reduced-resolution pages of a TIFF (previews)
    do not count. :func:`read_image` reads only the first frame.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            is_tiff = f.read(4) in _TIFF_SIGNATURES
        if is_tiff:
            with contextlib.suppress(Exception):  # a TIFF tifffile rejects: Pillow counts (or reports)
                with tifffile.TiffFile(path) as tif:
                    return max(1, sum(1 for page in tif.pages if not page.is_reduced))
        with _pillow_limit_lifted(), PILImage.open(path) as im:
            return max(1, int(getattr(im, "n_frames", 1)))
    except FileNotFoundError:
        raise ImageReadError(f"cannot read image {path}: file not found") from None
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(f"cannot read image {path}: {_one_line(exc)}") from None


# --------------------------------------------------------------------------------------------
# Writing


def _png_chunks_with_metadata(data: bytes, icc_profile: bytes | None, exif: bytes | None) -> bytes:
    """Insert iCCP / eXIf chunks (pypng cannot write them) right after IHDR."""
    chunks = list(png.Reader(bytes=data).chunks())
    extra = []
    if icc_profile:
        extra.append((b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc_profile)))
    if exif:
        raw = exif[6:] if exif.startswith(b"Exif\x00\x00") else exif  # PNG stores bare TIFF data
        extra.append((b"eXIf", raw))
    out = io.BytesIO()
    png.write_chunks(out, chunks[:1] + extra + chunks[1:])
    return out.getvalue()


def _encode_png16(array: np.ndarray, mode: str, icc_profile: bytes | None, exif: bytes | None) -> bytes:
    height, width, planes = array.shape
    writer = png.Writer(
        width, height, greyscale=mode in ("L", "LA"), alpha=mode in ("LA", "RGBA"), bitdepth=16
    )
    buffer = io.BytesIO()
    writer.write(buffer, array.reshape(height, width * planes))
    return _png_chunks_with_metadata(buffer.getvalue(), icc_profile, exif)


# Descriptive first-IFD tags carried into a 16-bit TIFF (with orientation and resolution). The
# layout tags are tifffile's own, and tifffile cannot write EXIF / GPS sub-IFDs: camera EXIF is lost.
_TIFF_TEXT_TAGS = {
    270: "ImageDescription",
    271: "Make",
    272: "Model",
    305: "Software",
    306: "DateTime",
    315: "Artist",
    316: "HostComputer",
    33432: "Copyright",
}
_TIFF_RESOLUTION_TAGS = (282, 283, 296)  # XResolution, YResolution, ResolutionUnit


def _encode_tiff16(array: np.ndarray, mode: str, icc_profile: bytes | None, exif: bytes | None) -> bytes:
    """HWC uint16 array -> 16-bit TIFF bytes (Adobe deflate, straight alpha as an extra sample)."""
    tags = PILImage.Exif()
    if exif:
        tags.load(exif)
    extratags = []
    for code in _TIFF_TEXT_TAGS:
        text = tags.get(code)
        if not isinstance(text, str) or not text:
            continue
        if code == 270 and text.startswith(('{"shape"', "ImageJ=")):
            continue  # tifffile / ImageJ layout metadata of the input: wrong for the new size
        extratags.append((code, "s", 0, text.encode("utf-8", "replace"), True))
    orientation = tags.get(_EXIF_ORIENTATION)
    if isinstance(orientation, int) and 1 <= orientation <= 8:
        extratags.append((_EXIF_ORIENTATION, "H", 1, orientation, True))
    resolution = {}
    x_res, y_res, unit = (tags.get(code) for code in _TIFF_RESOLUTION_TAGS)
    if x_res and y_res and unit in (1, 2, 3):
        resolution = {"resolution": (float(x_res), float(y_res)), "resolutionunit": unit}

    buffer = io.BytesIO()
    tifffile.imwrite(
        buffer,
        array if array.shape[2] > 1 else array[:, :, 0],
        photometric="rgb" if mode in ("RGB", "RGBA") else "minisblack",
        planarconfig="contig",
        extrasamples=["unassalpha"] if mode in ("LA", "RGBA") else None,
        compression="zlib",  # Adobe deflate, as Pillow writes 8-bit TIFFs here
        predictor=True,  # horizontal differencing: smaller files for photos, standard TIFF
        iccprofile=icc_profile or None,
        metadata=None,  # no tifffile JSON in ImageDescription
        software=False,  # carried from EXIF when there
        extratags=extratags,
        **resolution,
    )
    return buffer.getvalue()


def _tiff_first_ifd_exif(exif: bytes | None) -> bytes | None:
    """EXIF for an 8-bit TIFF: its descriptive first-IFD tags only, as for 16-bit TIFFs.

    Pillow compresses TIFFs with libtiff, which fails on EXIF / GPS sub-IFDs ("Error setting from
    dictionary"), so camera EXIF (exposure...) is lost in TIFF output; Make, Model, Artist... stay.
    """
    if not exif:
        return None
    tags = PILImage.Exif()
    try:
        tags.load(exif)
    except Exception:  # noqa: BLE001 - unreadable EXIF: none rather than a failed write
        return None
    for tag in [t for t in tags if t not in _TIFF_DESCRIPTIVE_TAGS or t in _EXIF_SUB_IFDS]:
        del tags[tag]
    return tags.tobytes() if len(tags) else None


def _encode(
    pixels: torch.Tensor,
    mode: str,
    bit_depth: int,
    fmt: str,
    icc_profile: bytes | None,
    exif: bytes | None,
    quality: int,
    lossless: bool,
) -> bytes:
    """Pixels [C, H, W] in [0, 1] -> encoded file bytes in format ``fmt``."""
    # Formats that cannot hold what we have: reduce rather than fail (documented in write_image).
    if fmt in ("JPEG", "BMP") and mode in ("LA", "RGBA"):
        pixels, mode = pixels[:-1], mode[:-1]  # no alpha channel in JPEG / BMP
    if fmt == "WEBP" and mode in ("L", "LA"):
        # WebP is colour only: replicate gray, keep alpha.
        pixels = torch.cat([pixels[:1].expand(3, -1, -1), pixels[1:]])
        mode = "RGBA" if mode == "LA" else "RGB"
    if fmt in ("JPEG", "BMP", "WEBP"):
        bit_depth = 8

    if fmt == "PNG" and bit_depth == 16:
        return _encode_png16(_to_uint16(pixels).transpose(1, 2, 0), mode, icc_profile, exif)
    if fmt == "TIFF" and bit_depth == 16:
        return _encode_tiff16(_to_uint16(pixels).transpose(1, 2, 0), mode, icc_profile, exif)

    array = to_uint8(pixels.detach().cpu()).permute(1, 2, 0).numpy()
    im = PILImage.fromarray(array[:, :, 0] if mode == "L" else array)

    options: dict = {}
    if icc_profile:
        options["icc_profile"] = icc_profile
    if exif:
        options["exif"] = exif
    if fmt == "JPEG":
        options.update(quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == "WEBP":
        # exact: keep colour under fully transparent pixels (lossless means lossless).
        options.update(lossless=lossless, quality=100 if lossless else quality, exact=lossless)
    elif fmt == "TIFF":
        options["compression"] = "tiff_adobe_deflate"
        options.pop("exif", None)
        if tiff_exif := _tiff_first_ifd_exif(exif):
            options["exif"] = tiff_exif
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **options)
    return buffer.getvalue()


_FORMAT_OF_EXTENSION = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
}
# What write_image can write (lower case, with the dot). Reading also takes GIF and what else
# Pillow opens; writing GIF is not offered: 256 colours would undo the upscaling.
WRITABLE_EXTENSIONS: frozenset[str] = frozenset(_FORMAT_OF_EXTENSION)


def _exif_for_writing(exif: bytes | None) -> bytes | None:
    """``exif`` without storage-layout tags (the bytes unchanged when it has none, or is unreadable).

    An Image from read_image holds none already; this guards EXIF handed in directly, such as a
    TIFF's whole first IFD from Pillow's ``getexif()``, which would corrupt a TIFF written with it.
    """
    if not exif:
        return None
    tags = PILImage.Exif()
    try:
        tags.load(exif)
        drop = [t for t in tags if t in _LAYOUT_TAGS or (t == 270 and _is_layout_description(tags[t]))]
        if not drop:
            return exif
        for tag in drop:
            del tags[tag]
        return tags.tobytes() if len(tags) else None
    except Exception:  # noqa: BLE001 - not EXIF Pillow can parse: the encoder decides, as before
        return exif


def write_image(
    path: str | os.PathLike,
    image_or_tensor: Image | torch.Tensor,
    mode: str | None = None,
    bit_depth: int | None = None,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
    quality: int = 95,
    lossless: bool = True,
    replace: bool = True,
) -> None:
    """Write pixels [C, H, W] in [0, 1] (or an :class:`Image`) to ``path``, atomically.

    ``replace=False``: never replace an existing file, even one that appears while this one is
    encoded or written (a concurrent run); ``FileExistsError`` then, and ``path`` is left as it is.

    The format comes from the extension. ``mode``/``bit_depth``/``icc_profile``/``exif`` default
    to the :class:`Image`'s own (for a tensor: mode from the channel count, 8 bits, none).
    PNG and TIFF are lossless at the given bit depth (8 or 16, every mode); WebP is
    lossless unless ``lossless=False``; JPEG uses ``quality``. JPEG/BMP/WebP are 8-bit; JPEG and
    BMP drop an alpha channel, WebP stores grayscale as RGB. An extension not in
    :data:`WRITABLE_EXTENSIONS` (GIF...) raises :class:`ImageWriteError` before anything is written.
    EXIF storage-layout tags (size, strips...) are never written; TIFFs keep only the descriptive
    first-IFD tags (Make, Model, Artist, orientation, resolution...), not the EXIF / GPS sub-IFDs.
    """
    path = Path(path)
    if isinstance(image_or_tensor, Image):
        pixels = image_or_tensor.pixels
        mode = mode or image_or_tensor.mode
        bit_depth = bit_depth or image_or_tensor.bit_depth
        icc_profile = icc_profile if icc_profile is not None else image_or_tensor.icc_profile
        exif = exif if exif is not None else image_or_tensor.exif
    else:
        pixels = image_or_tensor
    if pixels.dim() == 4 and pixels.shape[0] == 1:
        pixels = pixels[0]
    if pixels.dim() != 3:
        raise ImageWriteError(f"cannot write image {path}: expected pixels [C,H,W], got {tuple(pixels.shape)}")
    mode = mode or _MODE_OF_CHANNELS.get(pixels.shape[0], "")
    bit_depth = bit_depth or 8
    fmt = _FORMAT_OF_EXTENSION.get(path.suffix.lower())
    if fmt is None:
        what = f"writing {path.suffix!r} files is not supported" if path.suffix else "no file extension"
        raise ImageWriteError(
            f"cannot write image {path}: {what} (supported: {', '.join(sorted(WRITABLE_EXTENSIONS))})"
        )
    if MODES.get(mode) != pixels.shape[0]:
        raise ImageWriteError(f"cannot write image {path}: mode {mode!r} does not fit {pixels.shape[0]} channels")
    if bit_depth not in (8, 16):
        raise ImageWriteError(f"cannot write image {path}: bit depth must be 8 or 16, got {bit_depth}")

    try:
        exif = _exif_for_writing(exif)
        quantized = pixels.dtype in (torch.uint8, torch.uint16)  # levels already: no float copy
        pixels = pixels.detach().cpu() if quantized else pixels.detach().float().cpu()
        data = _encode(pixels, mode, bit_depth, fmt, icc_profile, exif, quality, lossless)
    except Exception as exc:  # noqa: BLE001 - any encoder failure is the same user error
        raise ImageWriteError(f"cannot write image {path}: {exc}") from None
    _atomic_write(path, data, replace=replace)


def _atomic_write(path: Path, data: bytes, replace: bool = True) -> None:
    """``fileio.atomic_write_bytes`` with its errors as one ``ImageWriteError`` line naming ``path``;
    ``FileExistsError`` (``replace=False`` and ``path`` exists) is passed on for the caller to skip."""
    try:
        atomic_write_bytes(path, data, replace=replace)
    except FileExistsError:
        raise
    except OSError as exc:
        raise ImageWriteError(f"cannot write image {path}: {exc.strerror or _one_line(exc)}") from None
