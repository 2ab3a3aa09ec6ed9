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
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from sparsesr.data.image_io import IMAGE_EXTENSIONS, Image, read_image, write_image
from sparsesr.data.resize import imresize
from sparsesr.errors import BackendError, SparseSRError
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
        value = float(scale)
    except (TypeError, ValueError):
        raise SparseSRError(f"--scale must be a number, got {scale!r}") from None
    if not 0 < value <= 16:
        raise SparseSRError(f"--scale must be in (0, 16], got {scale}")
    return value


def _pick_device(device: str) -> str:
    if device != "auto":
        return device
    if torch.cuda.is_available():  # under torchrun each rank takes its own GPU
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    return "cpu"


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

        if backend not in ("auto", "sparse", "dense"):
            raise SparseSRError(f"--backend must be auto, sparse or dense, got {backend!r}")
        if precision not in ("auto", *PRECISIONS):
            raise SparseSRError(f"--precision must be auto, fp32, fp16 or bf16, got {precision!r}")
        if alpha not in ("bicubic", "model"):
            raise SparseSRError(f"--alpha must be bicubic or model, got {alpha!r}")
        if tile < 0 or tile_pad < 0:
            raise SparseSRError(f"--tile and --tile-pad must be >= 0, got {tile} and {tile_pad}")
        requested = _parse_scale(scale)
        self.model_path = resolve_model(model, requested or 2)
        self.device = torch.device(_pick_device(device))
        self.net = load(self.model_path, device=str(self.device), backend="dense" if backend == "dense" else "auto")
        self.model_scale = int(self.net.config.scale)
        self.scale = requested or float(self.model_scale)
        self.backend = "dense" if backend == "dense" else "auto"
        self.tile, self.tile_pad, self.alpha = tile, tile_pad, alpha
        self.warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
        if precision == "auto":
            precision = "fp16" if self.device.type == "cuda" else "fp32"
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

    def run_rgb(self, rgb: torch.Tensor, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """The network on ``rgb`` [N, 3, h, w] in [0, 1] -> float32 [N, 3, h*s, w*s] on the CPU (s: model scale)."""
        x = rgb.to(self.device, torch.float32)
        net_config = self.net.config
        tile = self.tile or auto_tile_size(x, self.model_scale, net_config.n_feats)
        start = time.perf_counter()
        while True:
            try:
                y = tiled_forward(self._network(), x.to(self.dtype), self.model_scale, tile, self.tile_pad, progress)
            except Exception as exc:  # noqa: BLE001 - a half type the device cannot run: fall back
                if self.dtype == torch.float32 or is_out_of_memory(exc) or isinstance(exc, SparseSRError):
                    raise
                self._fall_back(f"is not supported ({str(exc).splitlines()[0][:80]})")
                continue
            if self.dtype != torch.float32 and not bool(torch.isfinite(y).all()):
                self._fall_back("gave non-finite values")
                continue
            break
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.compute_seconds += time.perf_counter() - start
        return y.float().cpu()

    def backend_summary(self) -> str:
        """Which paths the layers took in the last run, e.g. ``cpu kernel 32/34 layers, dense 2``."""
        paths = Counter(row["path"] for row in self.net.backend_report()["layers"] if row["path"])
        if not paths:
            return "not run"
        total = sum(paths.values())
        parts = [f"{'dense' if p == 'dense' else p + ' kernel'} {n}/{total} layers" for p, n in paths.most_common()]
        return f"{', '.join(parts)} on {self.device}"

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
                       progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Float pixels [C, H, W] in [0, 1] (C = 1, 2, 3, 4: L, LA, RGB, RGBA) -> upscaled [C, h, w] in [0, 1]."""
        channels = pixels.shape[0]
        mode = mode or {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}.get(channels)
        if pixels.dim() != 3 or mode is None or channels != len(mode):
            raise SparseSRError(f"expected pixels [C, H, W] with 1-4 channels, got shape {tuple(pixels.shape)}")
        pixels = pixels.float().cpu()
        gray = mode in ("L", "LA")
        colour = pixels[:1].expand(3, -1, -1) if gray else pixels[:3]
        alpha = pixels[-1:] if mode in ("LA", "RGBA") else None
        if alpha is not None:
            colour = fill_transparent(colour, alpha)
        size = self.output_size(*pixels.shape[-2:])

        out = self._resize_to(self.run_rgb(colour[None], progress)[0], size)
        if gray:
            out = _to_gray(out)
        if alpha is not None:
            if self.alpha == "model":
                up_alpha = self.run_rgb(alpha.expand(3, -1, -1)[None])[0].mean(dim=0, keepdim=True)
                up_alpha = self._resize_to(up_alpha, size)
            else:
                up_alpha = imresize(alpha, size=size)
            out = torch.cat([out, up_alpha])
        return out.clamp(0, 1)

    def upscale_image(self, image: Image, progress: Callable[[int, int], None] | None = None) -> Image:
        """An :class:`Image` -> the upscaled :class:`Image`, keeping mode, bit depth, ICC profile and EXIF."""
        pixels = self.upscale_pixels(image.pixels, image.mode, progress)
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


def upscale(image: Any, scale: float | None = 2, model: str | os.PathLike | Upscaler | None = None, **options) -> Any:
    """Upscale a PIL image, a NumPy array (HW / HWC; uint8, uint16 or float in [0, 1]) or a tensor
    (CHW / NCHW float in [0, 1]); returns the same kind, mode, dtype and layout.

    ``model``: an embedded name, a file path, or an :class:`Upscaler` (reused as is). ``options``:
    ``device``, ``precision``, ``backend``, ``tile``, ``tile_pad``, ``alpha`` (see :class:`Upscaler`).
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

    if im.mode in ("I;16", "I;16L", "I;16B", "I"):
        array = np.clip(np.asarray(im, dtype=np.int64), 0, 65535).astype(np.uint16)
        out = PILImage.fromarray(_upscale_numpy(upscaler, array))  # uint16 HW -> mode I;16
    else:
        mode = im.mode if im.mode in ("L", "LA", "RGB", "RGBA") else ("RGBA" if "A" in im.getbands() else "RGB")
        out = PILImage.fromarray(_upscale_numpy(upscaler, np.asarray(im.convert(mode))), mode=mode)
    for key in ("icc_profile", "exif", "dpi"):
        if key in im.info:
            out.info[key] = im.info[key]
    return out


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


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _is_earlier_output(path: Path, suffix: str) -> bool:
    """``photo_x2.png`` next to a ``photo.*`` image: an output of an earlier run, not an input."""
    if not suffix or not path.stem.endswith(suffix) or path.stem == suffix:
        return False
    original = path.stem[: -len(suffix)]
    return any((path.parent / f"{original}{ext}").is_file() for ext in IMAGE_EXTENSIONS)


def expand_inputs(inputs: Iterable[str | os.PathLike], recursive: bool = False, suffix: str = ""
                  ) -> tuple[list[tuple[Path, Path | None]], list[tuple[str, str]]]:
    """Inputs (files, folders, globs) -> ([(image, folder it was found under or None)], [(input, error)])."""
    found: list[tuple[Path, Path | None]] = []
    errors: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found.append((path, None))
        elif path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(p for p in path.glob(pattern) if p.is_file() and _is_image(p))
            files = [p for p in files if not _is_earlier_output(p, suffix)]
            if not files:
                errors.append((str(item), f"no images in folder {item}"))
            found.extend((p, path) for p in files)
        else:
            matches = sorted(Path(p) for p in glob.glob(str(item), recursive=True))
            files = [p for p in matches if p.is_file() and _is_image(p)]
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
    """The output extension (with dot): the input's own for ``auto`` unless it cannot hold the image."""
    if ext != "auto":
        return "." + ext.lower().lstrip(".")
    own = source.suffix.lower()
    if image is not None:
        if own in (".bmp",) and image.has_alpha:
            return ".png"  # BMP output would lose the alpha channel
    return own


def plan_jobs(
    inputs: Iterable[str | os.PathLike],
    output: str | os.PathLike | None,
    suffix: str,
    ext: str = "auto",
    recursive: bool = False,
) -> tuple[list[Job], list[tuple[str, str]]]:
    """Where each input image goes; the extension is refined per image once it is decoded."""
    found, errors = expand_inputs(inputs, recursive, suffix)
    out = Path(output) if output is not None else None
    file_target = out is not None and _is_image(out) and not out.is_dir()
    if file_target and len(found) != 1:
        raise SparseSRError(f"-o {output} is a file name, but {len(found)} images were given; pass a folder")
    jobs = []
    for source, root in found:
        if file_target:
            jobs.append(Job(source, out, named=True))
            continue
        else:
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
    """Upscale image files; see ``sparsesr upscale --help``. Per-image problems are logged
    (one line naming the file) and counted in the result; the batch carries on."""
    from tqdm import tqdm

    start = time.perf_counter()
    if ext != "auto" and ext.lower().lstrip(".") not in (*OUTPUT_EXTENSIONS, "jpeg", "tif"):
        raise SparseSRError(f"--ext must be auto or one of {', '.join(OUTPUT_EXTENSIONS)}, got {ext!r}")
    rank, world_size = _rank_and_world()
    upscaler = Upscaler(model, scale, device, precision, backend, tile, tile_pad, alpha,
                        warn=lambda m: log(f"warning: {m}"))
    if suffix is None:
        suffix = f"_x{scale_label(upscaler.scale)}"
    suffix = suffix.replace("{scale}", scale_label(upscaler.scale))
    jobs, errors = plan_jobs(inputs, output, suffix, ext, recursive)
    result = BatchResult(rank=rank, world_size=world_size)
    if rank == 0:  # every rank sees the same input errors; one reports them
        for item, message in errors:
            log(message)
            result.failed.append((item, message))
    jobs = shard(jobs, rank, world_size)
    result.total = len(jobs) + len(result.failed)
    inputs_resolved = {job.source.resolve() for job in jobs}
    targets_seen: set[Path] = set()
    timed_images: list[Image] = [] if compare_dense else None

    bar = tqdm(jobs, desc="images", unit="img", disable=quiet or len(jobs) < 2, dynamic_ncols=True)
    for job in bar:
        def fail(message: str) -> None:
            (bar.write if not bar.disable else log)(message)
            result.failed.append((str(job.source), message))

        try:
            if skip_existing and job.target.exists():  # resuming: do not even decode the input
                result.skipped.append(job.target)
                continue
            image = read_image(job.source)
            target = job.target
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
            tiles = _TileBar(tqdm, quiet, job.source.name)
            try:
                upscaled = upscaler.upscale_image(image, tiles.update)
            finally:
                tiles.close()
            target.parent.mkdir(parents=True, exist_ok=True)
            write_image(target, upscaled, quality=quality)
            result.written.append(target)
            if timed_images is not None:
                timed_images.append(image)
        except SparseSRError as exc:
            fail(str(exc) if str(job.source) in str(exc) else f"{job.source}: {exc}")
        except OSError as exc:
            fail(f"{job.source}: {exc.strerror or exc}")
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            fail(f"{job.source}: out of memory ({str(exc).splitlines()[0][:80]}); try a smaller --tile")

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
