"""A model and the compute options -> tiled inference on float pixels (the engine under the API and the batch).

The engine reads only what every runtime model exposes (``scale``, ``n_colors``, ``n_feats``;
``sparse_convs``/``set_backend`` where the model has them), never ``net.config``, so it runs any
family the runtime assembles, or any module with those attributes.
"""
from __future__ import annotations

import os
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from sparsesr.data.image_io import Image, _to_uint16, to_uint8
from sparsesr.data.resize import imresize
from sparsesr.errors import NotEnoughMemoryError, SparseSRError
from sparsesr.pretrained import resolve_model
from sparsesr.runtime import precision as half
from sparsesr.runtime.tiling import auto_tile_size, is_out_of_memory, tiled_forward
from sparsesr.upscaling.options import UpscaleOptions

_LUMA = (0.299, 0.587, 0.114)  # BT.601, sums to 1: a gray input stays exactly gray


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


def _device_of(net: torch.nn.Module) -> torch.device:
    tensor = next(iter(net.parameters()), None)
    if tensor is None:
        tensor = next(iter(net.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


class UpscaleEngine:
    """A loaded model and the options to run it; turns float pixels [C, H, W] into upscaled ones.

    ``net``: a runtime model (``sparsesr.load``) or any module with ``scale``, ``n_colors`` (3)
    and ``n_feats``, mapping RGB [N, 3, h, w] in [0, 1] to [N, 3, h*scale, w*scale]; it runs on
    the device its tensors are on. ``options``: the compute fields of :class:`UpscaleOptions`.
    ``warn``: where warnings go (default: ``warnings.warn``). :meth:`load` loads a model by name.
    """

    def __init__(self, net: torch.nn.Module, options: UpscaleOptions | None = None,
                 warn: Callable[[str], None] | None = None) -> None:
        options = options or UpscaleOptions()
        if int(net.n_colors) != 3:
            raise SparseSRError(f"the model takes {net.n_colors} colour channels; upscaling runs RGB (3-channel) models")
        self.net, self.options = net, options
        self.model_path: Path | None = None  # set by load()
        self.device = _device_of(net)
        self.model_scale = int(net.scale)
        self.scale = options.scale or float(self.model_scale)
        self.backend = "dense" if options.backend == "dense" else "auto"
        self.warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
        # The path every layer took on every call (all images, tiles, and the half-precision copy,
        # which shares these hooks), for backend_summary: a layer's last call alone is not the run.
        self._paths: dict[str, Counter] = {}
        self._dense_reasons: Counter = Counter()
        for conv in self._sparse_convs():
            conv.register_forward_hook(_path_recorder(self._paths, self._dense_reasons))
        if options.seam_warning:
            self.warn(options.seam_warning)
        precision = options.precision
        if precision == "auto":  # bf16 stays opt-in on the CPU: it cost `fast` 0.011 dB on Set5 (docs/models.md)
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        # A half type without a fast path here (fp16 on any CPU, bf16 without AMX) -> fp32, warned.
        self.dtype = half.compute_dtype(precision, self.device, self.warn)
        self._half_net: torch.nn.Module | None = None
        self.compute_seconds = 0.0  # time spent in the network (and tiling), for the summary

    @classmethod
    def load(cls, model: str | os.PathLike | None = None, options: UpscaleOptions | None = None,
             warn: Callable[[str], None] | None = None) -> UpscaleEngine:
        """Load ``model`` on the sparse runtime: an embedded name (``x2``, ``x4``, ``fast``), an
        exported file or a checkpoint; None: the embedded default for ``options.scale``."""
        from sparsesr.runtime import load

        options = options or UpscaleOptions()
        path = resolve_model(model, options.scale or 2)
        device = _pick_device(options.device)
        net = load(path, device=device, backend="dense" if options.backend == "dense" else "auto")
        engine = cls(net, options, warn)
        engine.model_path = path
        return engine

    # -- the network ------------------------------------------------------------------------

    def _sparse_convs(self) -> list[torch.nn.Module]:
        sparse_convs = getattr(self.net, "sparse_convs", None)  # runtime models; a plain module has none
        return sparse_convs() if sparse_convs is not None else []

    def _network(self) -> torch.nn.Module:
        if self.dtype == torch.float32:
            return self.net
        if self._half_net is None:  # a copy, so fp32 stays exact for the fallback
            self._half_net = half.half_network(self.net, self.dtype, self.device)
        return self._half_net

    def _dense_bf16(self) -> bool:
        """Whether the network runs as :class:`~sparsesr.runtime.precision.DenseBf16` (bf16 on the CPU)."""
        return self.dtype == torch.bfloat16 and self.device.type == "cpu"

    def _tile_size(self, x: torch.Tensor) -> int:
        """The tile for this attempt: ``options.tile``, else automatic, at most
        ``BF16_CPU_MAX_TILE`` on the bf16 CPU path (an fp32 fallback gets its own)."""
        if self.options.tile:
            return self.options.tile
        tile = auto_tile_size(x, self.model_scale, int(self.net.n_feats))
        if self._dense_bf16() and max(x.shape[-2:]) > half.BF16_CPU_MAX_TILE:
            tile = min(tile or half.BF16_CPU_MAX_TILE, half.BF16_CPU_MAX_TILE)
        return tile

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
        start = time.perf_counter()

        def checked(first: int, rows: torch.Tensor) -> None:
            if self.dtype != torch.float32 and not bool(torch.isfinite(rows).all()):
                raise FloatingPointError("non-finite values")  # stops the tiling; fp32 reruns it
            sink(first, rows.float().cpu())

        while True:
            # DenseBf16 casts each tile itself and returns fp32; given fp32 tiles, tiled_forward also
            # hands out its blended rows in fp32 (it returns them in its input's dtype), not rounded to bf16.
            net_input = x if self._dense_bf16() else x.to(self.dtype)
            try:
                y = tiled_forward(self._network(), net_input, self.model_scale, self._tile_size(x),
                                  self.options.tile_pad, progress, None if sink is None else checked)
            except Exception as exc:  # noqa: BLE001 - a half type the device cannot run: fall back
                if is_out_of_memory(exc) or isinstance(exc, SparseSRError):
                    raise
                if self.dtype == torch.float32:  # the network itself refused this input: say so in one line
                    raise SparseSRError(f"the {self.net.family} network failed on a {x.shape[-1]}x{x.shape[-2]} "
                                        f"input: {(str(exc).splitlines() or [type(exc).__name__])[0][:200]}") from exc
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
        total = len(self._sparse_convs())
        if not total:
            return f"{type(self.net).__name__} on {self.device}"
        if not self._paths:
            return "not run"
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
        """Switch every layer to "auto" (sparse where faster) or "dense" (a no-op for a plain module)."""
        if hasattr(self.net, "set_backend"):
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
        alpha_by_model = self.options.alpha == "model"

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
                if alpha_by_model:
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
            if alpha_by_model:
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
