"""``sparsesr upscale``: upscale image files (or in-memory images) with a sparse model.

Three layers, each usable on its own:

- :class:`Upscaler` — a loaded model plus options; ``upscale_pixels`` maps float pixels
  ``[C, H, W]`` of any mode (L, LA, RGB, RGBA) to the upscaled pixels, with tiling, the precision
  fallback, alpha and grayscale handling, and resizing to scales the model does not have.
- :func:`upscale` — the Python API on a PIL image, a NumPy array or a tensor (same kind back).
- :func:`upscale_files` — the batch command: expand inputs, name outputs, skip / refuse existing
  files, write atomically with metadata, carry on past bad files, shard across ``torchrun`` ranks.
"""
from __future__ import annotations

import copy
import glob
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from sparsesr.data.image_io import (
    IMAGE_EXTENSIONS,
    WRITABLE_EXTENSIONS,
    Image,
    frame_count,
    is_own_temp_file,
    pil_to_image,
    read_image,
    remove_stale_temp_files,
    stored_bit_depth,
    to_uint8,
    write_image,
)
from sparsesr.data.resize import imresize
from sparsesr.errors import SparseSRError, UsageError
from sparsesr.pretrained import resolve_model
from sparsesr.runtime.tiling import auto_tile_size, is_out_of_memory, tiled_forward

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OUTPUT_EXTENSIONS = ("png", "jpg", "webp", "tiff")
_LUMA = (0.299, 0.587, 0.114)  # BT.601, sums to 1: a gray input stays exactly gray
_TILE_BAR_MIN = 4  # show a per-tile progress bar from this many tiles on


# --------------------------------------------------------------------------------------------
# Pixels: colour handling around the network


def fill_transparent(rgb: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Replace the colour under fully transparent pixels with that of the nearest visible ones.

    What a file stores under alpha = 0 is arbitrary (often black); a convolutional network
    mixes it into the visible edge pixels, which then show a dark fringe. A push-pull fill
    (average down a pyramid over visible pixels only, then fill holes from the coarser level)
    gives every hidden pixel a colour from its visible neighbourhood.
    """
    known = (alpha > 0).to(rgb.dtype)
    if bool(known.all()) or not bool(known.any()):
        return rgb
    return _push_pull(rgb[None] * known[None], known[None])[0]


def _push_pull(weighted: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    colour = weighted / weight.clamp_min(1e-8)
    if bool((weight > 0).all()) or min(weight.shape[-2:]) == 1:
        return colour
    coarse = _push_pull(F.avg_pool2d(weighted, 2, ceil_mode=True), F.avg_pool2d(weight, 2, ceil_mode=True))
    coarse = F.interpolate(coarse, size=weight.shape[-2:], mode="bilinear", align_corners=False)
    return torch.where(weight > 0, colour, coarse)


def _to_gray(rgb: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(_LUMA, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    return (rgb * weights).sum(dim=0, keepdim=True)


def _parse_scale(scale: float | int | str | None) -> float | None:
    if scale is None:
        return None
    try:
        if isinstance(scale, bool):
            raise TypeError  # float(True) == 1.0: a flag passed by mistake, not a scale
        value = float(scale)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"--scale must be a number, got {scale!r}") from None
    if not 0 < value <= 16:  # also refuses NaN, for which every comparison is false
        raise UsageError(f"--scale must be in (0, 16], got {scale}")
    return value


def _path_recorder(paths: dict[str, Counter], dense_reasons: Counter) -> Callable:
    """A forward hook counting the path each ``SparseConv2d`` call took. A plain function, so a
    ``copy.deepcopy`` of the network (the half-precision copy) keeps counting into the same dicts."""
    def record(conv: torch.nn.Module, inputs: Any, output: Any) -> None:
        paths.setdefault(conv.name, Counter())[conv.last_path] += 1
        if conv.last_path == "dense":
            dense_reasons[conv.last_reason] += 1

    return record


def _pick_device(device: str) -> str:
    from sparsesr.runtime.backends import resolve_device  # auto: under torchrun each rank takes its own GPU

    return str(resolve_device(device))


class Upscaler:
    """A loaded model and the options to run it; turns float pixels [C, H, W] into upscaled ones.

    ``model``: an embedded name (``x2``, ``x4``, ``fast``), an exported file or a checkpoint
    (None: the embedded default for ``scale``). ``scale``: any factor; the model runs at its own
    scale and the result is resized (MATLAB bicubic) to ``scale`` (None: the model's own).
    ``backend``: "auto"/"sparse" (sparse kernels where they are faster) or "dense".
    ``precision``: "auto" (fp32 on CPU, fp16 on CUDA), "fp32", "fp16", "bf16"; a half type that
    fails or gives non-finite values falls back to fp32 with a warning. ``tile``: input pixels per
    tile (0: automatic from free memory), ``tile_pad``: overlap. ``alpha``: "bicubic" or "model".
    """

    # Half types that run faster than fp32 on this CPU; any other is replaced by fp32 (warning).
    # The hook for a bf16 path (AVX512_BF16 / AMX CPUs): none is measured faster yet, and the
    # sparse CPU kernel computes in fp32 only, so a half type would also lose the sparse kernels.
    CPU_FAST_HALF: tuple[torch.dtype, ...] = ()

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        scale: float | None = None,
        device: str = "auto",
        precision: str = "auto",
        backend: str = "auto",
        tile: int = 0,
        tile_pad: int = 16,
        alpha: str = "bicubic",
        warn: Callable[[str], None] | None = None,
    ) -> None:
        from sparsesr.runtime import load
        from sparsesr.runtime.tiling import check_tiling

        if backend not in ("auto", "sparse", "dense"):
            raise SparseSRError(f"--backend must be auto, sparse or dense, got {backend!r}")
        if precision not in ("auto", *PRECISIONS):
            raise SparseSRError(f"--precision must be auto, fp32, fp16 or bf16, got {precision!r}")
        if alpha not in ("bicubic", "model"):
            raise SparseSRError(f"--alpha must be bicubic or model, got {alpha!r}")
        seam_warning = check_tiling(tile, tile_pad)  # raises for a bad tile before the model loads
        requested = _parse_scale(scale)
        self.model_path = resolve_model(model, requested or 2)
        self.device = torch.device(_pick_device(device))
        self.net = load(self.model_path, device=str(self.device), backend="dense" if backend == "dense" else "auto")
        # The path every layer took on every call (all images, tiles, and the half-precision copy,
        # which shares these hooks), for backend_summary: a layer's last call alone is not the run.
        self._paths: dict[str, Counter] = {}
        self._dense_reasons: Counter = Counter()
        for conv in self.net.sparse_convs():
            conv.register_forward_hook(_path_recorder(self._paths, self._dense_reasons))
        self.model_scale = int(self.net.config.scale)
        self.scale = requested or float(self.model_scale)
        self.backend = "dense" if backend == "dense" else "auto"
        self.tile, self.tile_pad, self.alpha = tile, tile_pad, alpha
        self.warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
        if seam_warning:
            self.warn(seam_warning)
        if precision == "auto":
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        elif precision != "fp32" and self.device.type == "cpu" and PRECISIONS[precision] not in self.CPU_FAST_HALF:
            # Dense CPU fp16 is emulated (~40x slower than fp32 here) and the sparse kernel is fp32-only.
            self.warn(f"{precision} has no fast CPU path here; running fp32")
            precision = "fp32"
        self.dtype = PRECISIONS[precision]
        self._half_net: torch.nn.Module | None = None
        self.compute_seconds = 0.0  # time spent in the network (and tiling), for the summary

    # -- the network ------------------------------------------------------------------------

    def _network(self) -> torch.nn.Module:
        if self.dtype == torch.float32:
            return self.net
        if self._half_net is None:  # a copy, so fp32 stays exact for the fallback
            self._half_net = copy.deepcopy(self.net).to(self.dtype)
        return self._half_net

    def _fall_back(self, why: str) -> None:
        self.warn(f"{str(self.dtype).removeprefix('torch.')} {why} on {self.device}; using fp32")
        self.dtype, self._half_net = torch.float32, None

    def run_rgb(self, rgb: torch.Tensor, progress: Callable[[int, int], None] | None = None,
                sink: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor | None:
        """The network on ``rgb`` [N, 3, h, w] in [0, 1] -> float32 [N, 3, h*s, w*s] on the CPU (s: model scale).

        With ``sink``, nothing is returned and no float tensor of the whole output is made:
        ``sink(first_row, rows)`` gets the finished output rows (float32 [N, 3, r, w*s] on the
        CPU, valid during the call) top to bottom; after a precision fallback or an out-of-memory
        retry they come again from the top, so the sink must write them in place.
        """
        x = rgb.to(self.device, torch.float32)
        net_config = self.net.config
        tile = self.tile or auto_tile_size(x, self.model_scale, net_config.n_feats)
        start = time.perf_counter()

        def checked(first: int, rows: torch.Tensor) -> None:
            if self.dtype != torch.float32 and not bool(torch.isfinite(rows).all()):
                raise FloatingPointError("non-finite values")  # stops the tiling; fp32 reruns it
            sink(first, rows.float().cpu())

        while True:
            try:
                y = tiled_forward(self._network(), x.to(self.dtype), self.model_scale, tile, self.tile_pad,
                                  progress, None if sink is None else checked)
            except Exception as exc:  # noqa: BLE001 - a half type the device cannot run: fall back
                if self.dtype == torch.float32 or is_out_of_memory(exc) or isinstance(exc, SparseSRError):
                    raise
                if isinstance(exc, FloatingPointError):
                    self._fall_back("gave non-finite values")
                else:
                    self._fall_back(f"is not supported ({str(exc).splitlines()[0][:80]})")
                continue
            if y is not None and self.dtype != torch.float32 and not bool(torch.isfinite(y).all()):
                self._fall_back("gave non-finite values")
                continue
            break
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.compute_seconds += time.perf_counter() - start
        return None if y is None else y.float().cpu()

    def backend_summary(self) -> str:
        """Which paths the layers took over every call so far, e.g. ``cpu kernel 34/36 layers, dense
        2/36 layers on cpu``. With ``auto``/``sparse`` each layer takes dense where that is measured
        faster at the input's size, so a layer may take several paths (it counts under each) and
        the most common reason for dense is added."""
        if not self._paths:
            return "not run"
        total = len(self.net.sparse_convs())
        taken = Counter(path for counts in self._paths.values() for path in counts)
        parts = [f"{'dense' if p == 'dense' else p + ' kernel'} {n}/{total} layers" for p, n in taken.most_common()]
        line = f"{', '.join(parts)} on {self.device}"
        mixed = sum(len(counts) > 1 for counts in self._paths.values())
        if mixed:
            line += f" ({mixed} layer{'s' if mixed > 1 else ''} took more than one path, by input size)"
        if "dense" in taken and self.backend != "dense" and self._dense_reasons:
            line += f"; why dense: {self._dense_reasons.most_common(1)[0][0]}"
        return line

    def set_backend(self, backend: str) -> None:
        """Switch every layer to "auto" (sparse where faster) or "dense"."""
        self.net.set_backend("dense" if backend == "dense" else "auto")
        self._half_net = None

    # -- pixels -----------------------------------------------------------------------------

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return max(1, round(height * self.scale)), max(1, round(width * self.scale))

    def _resize_to(self, y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(y.shape[-2:]) == size:
            return y
        return imresize(y, size=size)

    @torch.no_grad()
    def upscale_pixels(self, pixels: torch.Tensor, mode: str | None = None,
                       progress: Callable[[int, int], None] | None = None,
                       bit_depth: int | None = None) -> torch.Tensor:
        """Float pixels [C, H, W] in [0, 1] (C = 1, 2, 3, 4: L, LA, RGB, RGBA) -> upscaled [C, h, w] in [0, 1].

        ``bit_depth`` 8 or 16: the result quantized as ``write_image`` does it (uint8 / uint16,
        bit-identical), stored channels-last so ``permute(1, 2, 0)`` is HWC without a copy. At the
        model's own scale each finished band of tile rows is quantized straight into that storage,
        so no float copy of the whole output exists; other scales resize the float output first.
        """
        from sparsesr.data.image_io import _to_uint16, to_uint8  # write_image's own rounding
        from sparsesr.errors import NotEnoughMemoryError

        channels = pixels.shape[0]
        mode = mode or {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}.get(channels)
        if pixels.dim() != 3 or mode is None or channels != len(mode):
            raise SparseSRError(f"expected pixels [C, H, W] with 1-4 channels, got shape {tuple(pixels.shape)}")
        if bit_depth not in (None, 8, 16):
            raise SparseSRError(f"bit depth must be 8 or 16, got {bit_depth}")
        pixels = pixels.float().cpu()
        gray = mode in ("L", "LA")
        colour = pixels[:1].expand(3, -1, -1) if gray else pixels[:3]
        alpha = pixels[-1:] if mode in ("LA", "RGBA") else None
        if alpha is not None:
            colour = fill_transparent(colour, alpha)
        size = self.output_size(*pixels.shape[-2:])
        direct = bit_depth is not None and size == tuple(n * self.model_scale for n in pixels.shape[-2:])

        if bit_depth is not None:
            try:
                out = torch.empty(*size, channels, dtype=torch.uint8 if bit_depth == 8 else torch.uint16)
            except Exception as exc:  # noqa: BLE001 - only a failed allocation is translated
                if not is_out_of_memory(exc):
                    raise
                needed = size[0] * size[1] * channels * bit_depth / 8 / 2**20
                raise NotEnoughMemoryError(f"not enough memory for a {pixels.shape[2]}x{pixels.shape[1]} image: "
                                           f"its {size[1]}x{size[0]} output needs {needed:.0f} MiB") from None
            out = out.permute(2, 0, 1)

            def store(channel: int, first_row: int, rows: torch.Tensor) -> None:
                # About 1 MiB at a time, so the float temporaries of the rounding stay small too.
                step = max(1, (1 << 18) // (rows.shape[0] * rows.shape[2]))
                for r in range(0, rows.shape[1], step):
                    chunk = rows[:, r:r + step]
                    levels = to_uint8(chunk) if bit_depth == 8 else torch.from_numpy(_to_uint16(chunk))
                    out[channel:channel + len(chunk), first_row + r:first_row + r + chunk.shape[1]] = levels

        if direct:
            if alpha is not None:  # first: its float copy is gone before the colour's band exists
                if self.alpha == "model":
                    self.run_rgb(alpha.expand(3, -1, -1)[None],
                                 sink=lambda first, rows: store(channels - 1, first, rows[0].mean(dim=0, keepdim=True)))
                else:
                    store(channels - 1, 0, imresize(alpha, size=size))
            self.run_rgb(colour[None], progress,
                         sink=lambda first, rows: store(0, first, _to_gray(rows[0]) if gray else rows[0]))
            return out

        result = self._resize_to(self.run_rgb(colour[None], progress)[0], size)
        if gray:
            result = _to_gray(result)
        if alpha is not None:
            if self.alpha == "model":
                up_alpha = self.run_rgb(alpha.expand(3, -1, -1)[None])[0].mean(dim=0, keepdim=True)
                up_alpha = self._resize_to(up_alpha, size)
            else:
                up_alpha = imresize(alpha, size=size)
            result = torch.cat([result, up_alpha])
        result = result.clamp_(0, 1)  # in place: ``result`` is always a fresh tensor here
        if bit_depth is None:
            return result
        store(0, 0, result)
        return out

    def upscale_image(self, image: Image, progress: Callable[[int, int], None] | None = None,
                      bit_depth: int | None = None) -> Image:
        """An :class:`Image` -> the upscaled :class:`Image`, keeping mode, bit depth, ICC profile and EXIF.

        ``bit_depth`` 8 or 16: its pixels come quantized to that depth (uint8 / uint16, as
        ``write_image`` would round them), written band by band, so memory follows the tile size.
        """
        pixels = self.upscale_pixels(image.pixels, image.mode, progress, bit_depth=bit_depth)
        return Image(pixels=pixels, mode=image.mode, bit_depth=image.bit_depth,
                     icc_profile=image.icc_profile, exif=image.exif)


# --------------------------------------------------------------------------------------------
# Python API: PIL image, NumPy array or tensor in, the same kind out


_CACHE: dict[tuple, Upscaler] = {}


def _cached_upscaler(model, scale, options: dict) -> Upscaler:
    key = (str(model), scale, tuple(sorted(options.items())))
    if key not in _CACHE:
        _CACHE.clear()  # keep one model in memory, not one per call pattern
        _CACHE[key] = Upscaler(model=model, scale=scale, **options)
    return _CACHE[key]


def upscale(image: Any, scale: float | None = None, model: str | os.PathLike | Upscaler | None = None,
            **options) -> Any:
    """Upscale a PIL image, a NumPy array (HW / HWC; uint8, uint16 or float in [0, 1]) or a tensor
    (CHW / NCHW float in [0, 1]); returns the same kind, dtype and layout (NumPy, tensors: the same
    channels; PIL: decoded as image files are, so a palette image with transparency comes back RGBA).

    ``scale``: None (the default) is the model's own, as on the command line; without ``model``,
    the embedded x2. ``model``: an embedded name, a file path, or an :class:`Upscaler` (reused as
    is; ``scale`` is then its own). ``options``: ``device``, ``precision``, ``backend``, ``tile``,
    ``tile_pad``, ``alpha`` (see :class:`Upscaler`).
    """
    upscaler = model if isinstance(model, Upscaler) else _cached_upscaler(model, scale, options)
    if isinstance(image, torch.Tensor):
        return _upscale_tensor(upscaler, image)
    try:
        from PIL import Image as PILImage
    except ImportError:  # pragma: no cover - pillow is a dependency
        PILImage = None
    if PILImage is not None and isinstance(image, PILImage.Image):
        return _upscale_pil(upscaler, image)
    import numpy as np

    if isinstance(image, np.ndarray):
        return _upscale_numpy(upscaler, image)
    raise SparseSRError(f"upscale expects a PIL image, a NumPy array or a tensor, got {type(image).__name__}")


def _upscale_tensor(upscaler: Upscaler, x: torch.Tensor) -> torch.Tensor:
    if not x.is_floating_point() or x.dim() not in (3, 4):
        raise SparseSRError(f"expected a float tensor [C, H, W] or [N, C, H, W], got {x.dtype} {tuple(x.shape)}")
    batch = x if x.dim() == 4 else x[None]
    out = torch.stack([upscaler.upscale_pixels(item) for item in batch])
    out = out.to(device=x.device, dtype=x.dtype)
    return out if x.dim() == 4 else out[0]


def _upscale_numpy(upscaler: Upscaler, array):
    import numpy as np

    if array.ndim not in (2, 3) or (array.ndim == 3 and not 1 <= array.shape[2] <= 4):
        raise SparseSRError(f"expected a NumPy array HW or HWC with 1-4 channels, got shape {array.shape}")
    levels = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(array.dtype)
    if levels is None and not np.issubdtype(array.dtype, np.floating):
        raise SparseSRError(f"expected a uint8, uint16 or float array, got {array.dtype}")
    hwc = array[:, :, None] if array.ndim == 2 else array
    pixels = torch.from_numpy(np.ascontiguousarray(hwc, dtype=np.float32)).permute(2, 0, 1)
    if levels:
        pixels = pixels / levels
    out = upscaler.upscale_pixels(pixels).permute(1, 2, 0).numpy()
    if levels:
        out = np.round(out.astype(np.float64) * levels).astype(array.dtype)
    else:
        out = out.astype(array.dtype)
    return out[:, :, 0] if array.ndim == 2 else out


def _upscale_pil(upscaler: Upscaler, im):
    import numpy as np
    from PIL import Image as PILImage

    # The files' own decode path: modes, palette transparency, EXIF orientation as `upscale` sees them.
    out = upscaler.upscale_image(pil_to_image(im))
    if out.bit_depth == 16:  # 16-bit gray: the only deep mode a PIL image holds
        levels = np.round(out.pixels[0].double().clamp(0, 1).numpy() * 65535).astype(np.uint16)
        result = PILImage.fromarray(levels)  # uint16 HW -> mode I;16
    else:
        levels = to_uint8(out.pixels).permute(1, 2, 0).numpy()
        result = PILImage.fromarray(levels[:, :, 0] if out.mode == "L" else levels)  # HWC -> LA/RGB/RGBA
    if out.icc_profile:
        result.info["icc_profile"] = out.icc_profile
    if out.exif:
        result.info["exif"] = out.exif
    if "dpi" in im.info:
        result.info["dpi"] = im.info["dpi"]
    return result


# --------------------------------------------------------------------------------------------
# Files: planning which input goes where


@dataclass
class Job:
    source: Path
    target: Path
    named: bool = False  # the user gave this exact output file name (-o FILE): keep its extension


@dataclass
class BatchResult:
    total: int = 0
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, one-line reason)
    seconds: float = 0.0
    compute_seconds: float = 0.0
    backend: str = ""
    compare: dict | None = None  # {"sparse_seconds", "dense_seconds"} with --compare-dense
    rank: int = 0
    world_size: int = 1

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        head = f"rank {self.rank} of {self.world_size}: " if self.world_size > 1 else ""
        parts = [f"{len(self.written)} of {self.total} images written"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped (already there)")
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        line = f"{head}{'; '.join(parts)} in {self.seconds:.1f} s (model {self.compute_seconds:.2f} s; {self.backend})"
        if self.compare:
            sparse, dense = self.compare["sparse_seconds"], self.compare["dense_seconds"]
            speedup = f", {dense / sparse:.2f}x" if sparse > 0 else ""
            line += f"; model time sparse {sparse:.2f} s vs dense {dense:.2f} s{speedup}"
        return line


def scale_label(scale: float) -> str:
    return f"{scale:g}"


# Read as inputs; GIF is read (its first frame) but never written: --ext auto makes it PNG.
INPUT_EXTENSIONS = frozenset({*IMAGE_EXTENSIONS, ".gif"})
_STALE_AFTER_S = 3600  # a temp file untouched this long belongs to no live run


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in INPUT_EXTENSIONS


def _is_earlier_output(path: Path, suffix: str) -> bool:
    """``photo_x2.png`` next to a ``photo.*`` image: an output of an earlier run, not an input."""
    if not suffix or not path.stem.endswith(suffix) or path.stem == suffix:
        return False
    original = path.stem[: -len(suffix)]
    return any((path.parent / f"{original}{ext}").is_file() for ext in INPUT_EXTENSIONS)


def _found_image(path: Path, suffix: str) -> bool:
    """Whether a file that a folder walk or a glob came across is an input (named files always are)."""
    return path.is_file() and _is_image(path) and not is_own_temp_file(path) and not _is_earlier_output(path, suffix)


def expand_inputs(inputs: Iterable[str | os.PathLike], recursive: bool = False, suffix: str = ""
                  ) -> tuple[list[tuple[Path, Path | None]], list[tuple[str, str]]]:
    """Inputs (files, folders, globs) -> ([(image, folder it was found under or None)], [(input, error)]).

    A named file is taken as it is. Folder walks and globs take images but not our temp files nor
    earlier outputs (``_is_earlier_output``); folder walks also skip hidden files and folders, as
    the shell's ``*`` and ``glob`` do.
    """
    found: list[tuple[Path, Path | None]] = []
    errors: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found.append((path, None))
        elif path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(p for p in path.glob(pattern)
                           if not any(part.startswith(".") for part in p.relative_to(path).parts)
                           and _found_image(p, suffix))
            if not files:
                errors.append((str(item), f"no images in folder {item}"))
            found.extend((p, path) for p in files)
        else:
            matches = sorted(Path(p) for p in glob.glob(str(item), recursive=True))
            files = [p for p in matches if _found_image(p, suffix)]
            if not files:
                errors.append((str(item), f"{item}: no such file, folder or matching images"))
            found.extend((p, None) for p in files)
    unique, seen = [], set()
    for path, root in found:  # the same file named twice (e.g. a file and a glob) runs once
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((path, root))
    return unique, errors


def output_extension(source: Path, ext: str, image: Image | None = None) -> str:
    """The output extension (with dot): for ``auto`` the input's own, unless it cannot be written
    (GIF and other read-only formats: PNG) or cannot hold the image (BMP with alpha: PNG)."""
    if ext != "auto":
        return "." + ext.lower().lstrip(".")
    own = source.suffix.lower()
    if own not in WRITABLE_EXTENSIONS:
        return ".png"
    if image is not None and own == ".bmp" and image.has_alpha:
        return ".png"  # BMP output would lose the alpha channel
    return own


_SAME_FORMAT = {".jpeg": ".jpg", ".tif": ".tiff"}


def parse_output(output: str | os.PathLike | None) -> tuple[Path | None, bool]:
    """``-o`` as (path, whether it is a file). The rule: an existing folder, or a name ending in
    ``/``, is a folder (created if missing); else a name with an extension ``write_image`` writes
    is a file; anything else is refused, since guessing made folders called ``big.gif``."""
    if output is None:
        return None, False
    text = os.fspath(output)
    if not text:
        raise UsageError("-o: the output path is empty")
    path = Path(text)
    if path.is_dir() or text.endswith(tuple(sep for sep in (os.sep, os.altsep, "/") if sep)):
        return path, False
    extension = path.suffix.lower()
    if extension in WRITABLE_EXTENSIONS:
        return path, True
    writable = ", ".join(sorted(WRITABLE_EXTENSIONS))
    if extension:
        raise UsageError(f"-o {text}: cannot write {extension} files; give one of {writable}, "
                         "or end a folder name with /")
    raise UsageError(f"-o {text}: give a file name with an image extension, or end a folder name with / "
                     f"(image extensions: {writable})")


def check_options(*, scale: Any = None, tile: Any = 0, tile_pad: Any = 16, ext: str = "auto",
                  suffix: str | None = None, quality: Any = 95, overwrite: bool = False,
                  skip_existing: bool = False, output: str | os.PathLike | None = None) -> None:
    """Refuse, with one line, options that are out of range or contradict each other; no I/O."""
    from sparsesr.runtime.tiling import check_tiling

    if overwrite and skip_existing:
        raise UsageError("--overwrite and --skip-existing cannot be used together")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise UsageError(f"--quality must be an integer from 1 to 100, got {quality!r}")
    for name, value in (("--tile", tile), ("--tile-pad", tile_pad)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{name} must be an integer, got {value!r}")
    check_tiling(tile, tile_pad)  # its seam warning is the Upscaler's to give
    _parse_scale(scale)
    if not isinstance(ext, str) or (ext != "auto" and ext.lower().lstrip(".") not in (*OUTPUT_EXTENSIONS, "jpeg", "tif")):
        raise UsageError(f"--ext must be auto or one of {', '.join(OUTPUT_EXTENSIONS)}, got {ext!r}")
    if suffix is not None:
        if any(sep and sep in suffix for sep in (os.sep, os.altsep, "/")):
            raise UsageError(f"--suffix must not contain a path separator, got {suffix!r}")
        if "\0" in suffix:
            raise UsageError(f"--suffix must not contain a NUL character, got {suffix!r}")
    path, is_file = parse_output(output)
    if is_file and ext != "auto":
        named, asked = path.suffix.lower(), "." + ext.lower().lstrip(".")
        if _SAME_FORMAT.get(named, named) != _SAME_FORMAT.get(asked, asked):
            raise UsageError(f"-o {output} is a {named} file but --ext {ext} asks for {asked}; drop one of them")


def check_folder_writable(folder: Path, what: str) -> None:
    """Raise UsageError unless files can be made in ``folder``, or it can be created. Probed by
    making (and removing) a folder there: permission bits do not tell (root, read-only mounts, /proc)."""
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{what}: {existing} is not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".sparsesr-probe-", dir=existing)
    except OSError as exc:
        action = f"cannot write in {folder}" if existing == folder else f"cannot create folder {folder}"
        raise UsageError(f"{what}: {action} ({existing}: {exc.strerror or exc})") from None
    os.rmdir(probe)


def plan_jobs(
    inputs: Iterable[str | os.PathLike],
    output: str | os.PathLike | None,
    suffix: str,
    ext: str = "auto",
    recursive: bool = False,
) -> tuple[list[Job], list[tuple[str, str]]]:
    """Where each input image goes (``-o`` as :func:`parse_output` reads it); the extension is
    refined per image once it is decoded."""
    found, errors = expand_inputs(inputs, recursive, suffix)
    out, file_target = parse_output(output)
    if file_target and len(found) > 1:
        raise UsageError(f"-o {output} is a file name, but {len(found)} images were given; "
                         "end a folder name with /")
    jobs = []
    for source, root in found:
        if file_target:
            jobs.append(Job(source, out, named=True))
            continue
        name = f"{source.stem}{suffix}{output_extension(source, ext)}"
        if out is None:
            target = source.with_name(name)
        else:  # mirror the tree below the folder it was found in
            relative = source.parent.relative_to(root) if root is not None else Path()
            target = out / relative / name
        jobs.append(Job(source, target))
    return jobs, errors


def shard(jobs: list[Job], rank: int, world_size: int) -> list[Job]:
    """This rank's share of the jobs, by index (``torchrun`` sets RANK and WORLD_SIZE)."""
    return jobs[rank::world_size]


def _rank_and_world() -> tuple[int, int]:
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise SparseSRError("RANK and WORLD_SIZE must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise SparseSRError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world


# --------------------------------------------------------------------------------------------
# Files: the batch


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _blocking_component(folder: Path) -> Path | None:
    """The nearest existing ancestor of ``folder`` (itself included) when it is not a folder."""
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    return None if existing.is_dir() else existing


def upscale_files(
    inputs: Iterable[str | os.PathLike],
    output: str | os.PathLike | None = None,
    *,
    model: str | os.PathLike | None = None,
    scale: float | None = None,
    device: str = "auto",
    precision: str = "auto",
    backend: str = "auto",
    tile: int = 0,
    tile_pad: int = 16,
    alpha: str = "bicubic",
    suffix: str | None = None,
    ext: str = "auto",
    recursive: bool = False,
    overwrite: bool = False,
    skip_existing: bool = False,
    compare_dense: bool = False,
    quality: int = 95,
    quiet: bool = False,
    log: Callable[[str], None] = _stderr,
) -> BatchResult:
    """Upscale image files; see ``sparsesr upscale --help``. Problems with the command (options,
    the output location) raise :class:`UsageError` before the model is loaded; per-image problems
    are logged (one line naming the file) and counted in the result, and the batch carries on."""
    from tqdm import tqdm

    start = time.perf_counter()
    check_options(scale=scale, tile=tile, tile_pad=tile_pad, ext=ext, suffix=suffix, quality=quality,
                  overwrite=overwrite, skip_existing=skip_existing, output=output)
    out, file_target = parse_output(output)
    if out is not None:
        check_folder_writable(out.parent if file_target else out, f"-o {os.fspath(output)}")
    rank, world_size = _rank_and_world()
    upscaler = Upscaler(model, scale, device, precision, backend, tile, tile_pad, alpha,
                        warn=lambda m: log(f"warning: {m}"))
    if suffix is None:
        suffix = f"_x{scale_label(upscaler.scale)}"
    suffix = suffix.replace("{scale}", scale_label(upscaler.scale))
    jobs, errors = plan_jobs(inputs, output, suffix, ext, recursive)
    if out is None:  # outputs go next to their inputs: each of those folders must take files
        for folder in sorted({job.target.parent for job in jobs}):
            check_folder_writable(folder, f"output folder {folder}")
    # Every input of the whole batch, before sharding: another rank's input is no output either.
    inputs_resolved = {job.source.resolve() for job in jobs}
    result = BatchResult(rank=rank, world_size=world_size)
    if rank == 0:  # every rank sees the same input errors and folders; one reports and cleans them
        for item, message in errors:
            log(message)
            result.failed.append((item, message))
        for folder in sorted({job.target.parent for job in jobs}):
            if folder.is_dir():
                remove_stale_temp_files(folder, older_than_s=_STALE_AFTER_S)
    jobs = shard(jobs, rank, world_size)
    result.total = len(jobs) + len(result.failed)
    targets_seen: set[Path] = set()
    timed_images: list[Image] = [] if compare_dense else None

    bar = tqdm(jobs, desc="images", unit="img", disable=quiet or len(jobs) < 2, dynamic_ncols=True)
    say = bar.write if not bar.disable else log
    for job in bar:
        target = job.target

        def fail(message: str) -> None:
            say(message)
            result.failed.append((str(job.source), message))

        try:
            if skip_existing and job.target.exists():  # resuming: do not even decode the input
                result.skipped.append(job.target)
                continue
            image = read_image(job.source)
            if not job.named:  # the extension can depend on the image (alpha, 16 bits)
                target = target.with_suffix(output_extension(job.source, ext, image))
            resolved = target.resolve()
            if resolved in inputs_resolved:
                fail(f"{job.source}: output {target} would overwrite an input; choose another --suffix or -o")
                continue
            if resolved in targets_seen:
                fail(f"{job.source}: output {target} is also the output of another input; skipped")
                continue
            targets_seen.add(resolved)
            if target.exists():
                if skip_existing:
                    result.skipped.append(target)
                    continue
                if not overwrite:
                    fail(f"{job.source}: output {target} exists; pass --overwrite or --skip-existing")
                    continue
            frames = frame_count(job.source)
            if frames > 1:  # said before the model runs, so it is not mistaken for a failure after
                say(f"warning: {job.source} has {frames} frames; only the first is upscaled")
            blocked = _blocking_component(target.parent)
            if blocked is not None:
                fail(f"{job.source}: cannot write image {target}: {blocked} is not a folder")
                continue
            tiles = _TileBar(tqdm, quiet, job.source.name)
            try:
                # quantized as the output will store it: no float copy of the whole output
                upscaled = upscaler.upscale_image(image, tiles.update, bit_depth=stored_bit_depth(target, image.bit_depth))
            finally:
                tiles.close()
            target.parent.mkdir(parents=True, exist_ok=True)
            try:  # without --overwrite, never replace a file that appeared meanwhile (a concurrent run)
                write_image(target, upscaled, quality=quality, replace=overwrite)
            except FileExistsError:
                say(f"{job.source}: output {target} appeared meanwhile; skipped")
                result.skipped.append(target)
                continue
            result.written.append(target)
            if timed_images is not None:
                timed_images.append(image)
        except SparseSRError as exc:
            fail(str(exc) if str(job.source) in str(exc) else f"{job.source}: {exc}")
        except OSError as exc:  # creating the output's folder, linking it into place
            fail(f"{job.source}: cannot write image {target}: {exc.strerror or exc}")
        except (RuntimeError, MemoryError) as exc:  # decoding or encoding a big image, not the tiles
            if not is_out_of_memory(exc):
                raise
            fail(f"{job.source}: out of memory ({(str(exc).splitlines() or ['MemoryError'])[0][:80]}); "
                 "try a smaller --tile")

    result.backend = upscaler.backend_summary()
    result.compute_seconds = upscaler.compute_seconds
    if timed_images:
        result.compare = _compare_dense(upscaler, timed_images)
    result.seconds = time.perf_counter() - start
    return result


class _TileBar:
    """Creates a tqdm bar over tiles on the first call that reports enough tiles."""

    def __init__(self, tqdm, quiet: bool, name: str) -> None:
        self.tqdm, self.quiet, self.name, self.bar = tqdm, quiet, name, None

    def update(self, done: int, total: int) -> None:
        if self.quiet or total < _TILE_BAR_MIN:
            return
        if self.bar is None or self.bar.total != total:  # a new tiling (first, or after OOM)
            self.close()
            self.bar = self.tqdm(total=total, desc=self.name, unit="tile", leave=False, dynamic_ncols=True)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _compare_dense(upscaler: Upscaler, images: list[Image]) -> dict:
    """Model time over ``images`` with sparse kernels (warm: one-time setup excluded) and dense."""
    times = {}
    try:
        for backend in ("auto", "dense"):
            upscaler.set_backend(backend)
            before = upscaler.compute_seconds
            for image in images:
                upscaler.upscale_pixels(image.pixels, image.mode)
            times[backend] = upscaler.compute_seconds - before
    finally:
        upscaler.set_backend(upscaler.backend)
    return {"sparse_seconds": times["auto"], "dense_seconds": times["dense"]}
