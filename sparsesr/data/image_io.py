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
place with ``os.replace``, so a crash or an error never leaves a half-written image behind.
"""
from __future__ import annotations

import io
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import png  # pypng
import tifffile
import torch
from PIL import Image as PILImage

from sparsesr.errors import ImageReadError, ImageWriteError
from sparsesr.fileio import atomic_write_bytes

__all__ = [
    "Image",
    "IMAGE_EXTENSIONS",
    "read_image",
    "write_image",
    "image_size",
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


@dataclass
class Image:
    """A decoded image: float32 pixels [C, H, W] in [0, 1] plus what is needed to write it back."""

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
    """Float pixels in [0, 1] -> uint8 (clamped and rounded)."""
    return torch.round(x.clamp(0, 1) * 255).to(torch.uint8)


def _to_uint16(x: torch.Tensor) -> np.ndarray:
    return torch.round(x.detach().cpu().to(torch.float64).clamp(0, 1) * 65535).numpy().astype(np.uint16)


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


# --------------------------------------------------------------------------------------------
# Reading


def _decode_with_pillow(im: PILImage.Image) -> tuple[np.ndarray, str, int, bool]:
    """Pillow image -> (HWC array, mode, bit depth, whether the ICC profile still applies)."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
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
    else:  # P, CMYK, YCbCr, LAB, HSV, RGBX, ...
        target = "RGB"
    if "transparency" in im.info and target in ("L", "RGB"):
        target += "A"  # palette or colour-key transparency becomes a real alpha channel
    if target != mode:
        im = im.convert(target)
    # An ICC profile describes the file's own colour space; a CMYK/LAB/HSV one no longer applies.
    icc_valid = mode not in ("CMYK", "LAB", "HSV")
    return _hwc(np.asarray(im, dtype=np.uint8)), target, 8, icc_valid


def _decode_png16(path: Path) -> tuple[np.ndarray, str, int]:
    """16-bit PNG via pypng -> (HWC uint16 array, mode, 16)."""
    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    planes = info["planes"]
    array = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows]).reshape(height, width, planes)
    depth = info["bitdepth"]
    if depth != 16:  # an sBIT chunk made pypng rescale: bring values back to 16 bits
        array = np.round(array.astype(np.float64) * (65535 / (2**depth - 1))).astype(np.uint16)
    return array, _MODE_OF_CHANNELS[planes], 16


def _decode_tiff16(
    path: Path, tif: tifffile.TiffFile
) -> tuple[np.ndarray, str, bytes | None, int, bytes | None]:
    """16-bit TIFF via tifffile -> (HWC uint16 array, mode, ICC, orientation, EXIF bytes)."""
    page = tif.pages[0]
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

    # EXIF of a TIFF is its first IFD, as Pillow's getexif() returns it for the 8-bit TIFFs it reads.
    orientation, exif_bytes = int(page.tags.valueof(_EXIF_ORIENTATION, 1) or 1), None
    if not tif.is_bigtiff:  # Pillow's EXIF reader handles classic TIFF headers only
        with open(path, "rb") as f:
            exif = PILImage.Exif()
            exif.load_from_fp(f)
            orientation, exif_bytes = _upright_exif(exif)
    icc = page.tags.valueof(_TIFF_ICC_PROFILE) or None
    return pixels, _MODE_OF_CHANNELS[pixels.shape[2]], icc, orientation, exif_bytes


def read_image(path: str | os.PathLike) -> Image:
    """Decode an image file (PNG, JPEG, BMP, TIFF, WebP) into an upright :class:`Image`."""
    path = Path(path)
    try:
        if _is_deep_tiff(path):
            with tifffile.TiffFile(path) as tif:
                array, mode, icc, orientation, exif_bytes = _decode_tiff16(path, tif)
            bit_depth = 16
        else:
            with PILImage.open(path) as im:
                deep_png = im.format == "PNG" and _png_bit_depth(path) == 16
                if not deep_png:
                    im.load()  # decode now, so truncated or corrupt files fail here
                icc = im.info.get("icc_profile") or None
                if deep_png:
                    array, mode, bit_depth = _decode_png16(path)
                else:
                    array, mode, bit_depth, icc_valid = _decode_with_pillow(im)
                    icc = icc if icc_valid else None
                orientation, exif_bytes = _upright_exif(im.getexif())
    except FileNotFoundError:
        raise ImageReadError(f"cannot read image {path}: file not found") from None
    except Exception as exc:  # noqa: BLE001 - every decoder failure is the same user error
        raise ImageReadError(f"cannot read image {path}: {exc}") from None

    scale = 65535.0 if bit_depth == 16 else 255.0
    pixels = torch.from_numpy(array.astype(np.float32) / np.float32(scale)).permute(2, 0, 1).contiguous()
    pixels = _orient(pixels, orientation).contiguous()
    return Image(pixels=pixels, mode=mode, bit_depth=bit_depth, icc_profile=icc, exif=exif_bytes)


def _upright_exif(exif: PILImage.Exif) -> tuple[int, bytes | None]:
    """(EXIF orientation, EXIF bytes without it, since the pixels are made upright).

    Call while the image file is open: Pillow reads nested EXIF directories lazily.
    """
    orientation = int(exif.get(_EXIF_ORIENTATION, 1) or 1)
    if orientation != 1:
        del exif[_EXIF_ORIENTATION]
    return orientation, (exif.tobytes() if len(exif) else None)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) as displayed (EXIF orientation applied), reading only the header."""
    path = Path(path)
    try:
        if _is_deep_tiff(path):  # Pillow cannot open every one of these (16-bit gray+alpha)
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                height, width = page.imagelength, page.imagewidth
                if int(page.tags.valueof(_EXIF_ORIENTATION, 1) or 1) in (5, 6, 7, 8):
                    width, height = height, width
            return height, width
        with PILImage.open(path) as im:
            width, height = im.size
            # Pillow's getexif() on a PNG scans the whole file; EXIF before IDAT is already in info.
            has_exif = im.format != "PNG" or "exif" in im.info
            if has_exif and int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1) in (5, 6, 7, 8):
                width, height = height, width
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(f"cannot read image {path}: {exc}") from None
    return height, width


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


def write_image(
    path: str | os.PathLike,
    image_or_tensor: Image | torch.Tensor,
    mode: str | None = None,
    bit_depth: int | None = None,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
    quality: int = 95,
    lossless: bool = True,
) -> None:
    """Write pixels [C, H, W] in [0, 1] (or an :class:`Image`) to ``path``, atomically.

    The format comes from the extension. ``mode``/``bit_depth``/``icc_profile``/``exif`` default
    to the :class:`Image`'s own (for a tensor: mode from the channel count, 8 bits, none).
    PNG and TIFF are lossless at the given bit depth (8 or 16, every mode); WebP is
    lossless unless ``lossless=False``; JPEG uses ``quality``. JPEG/BMP/WebP are 8-bit; JPEG and
    BMP drop an alpha channel, WebP stores grayscale as RGB.
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
        raise ImageWriteError(
            f"cannot write image {path}: unknown extension {path.suffix!r} "
            f"(expected one of {', '.join(_FORMAT_OF_EXTENSION)})"
        )
    if MODES.get(mode) != pixels.shape[0]:
        raise ImageWriteError(f"cannot write image {path}: mode {mode!r} does not fit {pixels.shape[0]} channels")
    if bit_depth not in (8, 16):
        raise ImageWriteError(f"cannot write image {path}: bit depth must be 8 or 16, got {bit_depth}")

    try:
        data = _encode(pixels.detach().float().cpu(), mode, bit_depth, fmt, icc_profile, exif, quality, lossless)
    except Exception as exc:  # noqa: BLE001 - any encoder failure is the same user error
        raise ImageWriteError(f"cannot write image {path}: {exc}") from None
    _atomic_write(path, data)


def _atomic_write(path: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise ImageWriteError(f"cannot write image {path}: {exc.strerror or exc}") from None
