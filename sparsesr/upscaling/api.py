"""``sparsesr.upscale``: a PIL image, a NumPy array or a tensor in, the same kind out."""
from __future__ import annotations

import os
from typing import Any

import torch

from sparsesr.data.image_io import pil_to_image, to_uint8
from sparsesr.errors import SparseSRError, UsageError
from sparsesr.upscaling.engine import UpscaleEngine
from sparsesr.upscaling.options import COMPUTE_OPTIONS, UpscaleOptions

_CACHE: dict[tuple, UpscaleEngine] = {}


def _engine_for(model: str | os.PathLike | UpscaleEngine | None, scale: float | None,
                options: dict[str, Any]) -> UpscaleEngine:
    if isinstance(model, UpscaleEngine):  # reused as it is: anything asked of it must be what it does
        if options:
            raise UsageError(f"model= is an UpscaleEngine, which has its own options; got {', '.join(options)} too")
        asked = UpscaleOptions(scale=scale).scale
        if asked is not None and asked != model.scale:
            raise UsageError(f"scale={scale} was asked for, but the engine given as model= upscales x{model.scale:g}")
        return model
    opts = UpscaleOptions.from_kwargs({"scale": scale, **options}, allowed=COMPUTE_OPTIONS)
    key = (str(model), _file_identity(model), opts)
    if key not in _CACHE:
        _CACHE.clear()  # keep one model in memory, not one per call pattern
        _CACHE[key] = UpscaleEngine.load(model, opts)
    return _CACHE[key]


def release_memory() -> None:
    """Drop the engine ``upscale`` keeps for its next call: the model and the activation buffers it
    holds across forwards (about 2 GiB after a large image with the default x2; see
    ``RuntimeModel.release_buffers``). The next call loads the model again."""
    _CACHE.clear()


def _file_identity(model: str | os.PathLike | None) -> tuple | None:
    """What changes when the file at ``model`` is replaced (an embedded name or None: nothing), so
    that a cached engine is not reused for a file that was overwritten since."""
    try:
        st = os.stat(model)
    except (OSError, TypeError, ValueError):
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def upscale(image: Any, scale: float | None = None, model: str | os.PathLike | UpscaleEngine | None = None,
            **options: Any) -> Any:
    """Upscale a PIL image, a NumPy array (HW / HWC; uint8, uint16 or float in [0, 1]) or a tensor
    (CHW / NCHW float in [0, 1]); returns the same kind, dtype and layout (NumPy, tensors: the same
    channels; PIL: decoded as image files are, so a palette image with transparency comes back RGBA).

    ``scale``: None (the default) is the model's own, so ``model="x4"`` gives x4; without
    ``model``, the embedded model for ``scale`` (x2 when None). Any other factor in (0, 16] runs the
    model at its own scale and resizes the result, as ``sparsesr upscale --scale`` does.
    ``model``: an embedded name, a file path, or an :class:`UpscaleEngine` (reused as it is: then
    no options, and ``scale`` only if it is the engine's own). ``options``: ``device``,
    ``precision``, ``backend``, ``tile``, ``tile_pad``, ``alpha`` (see :class:`UpscaleOptions`).
    """
    engine = _engine_for(model, scale, options)
    if isinstance(image, torch.Tensor):
        return _upscale_tensor(engine, image)
    try:
        from PIL import Image as PILImage
    except ImportError:  # pragma: no cover - pillow is a dependency
        PILImage = None
    if PILImage is not None and isinstance(image, PILImage.Image):
        return _upscale_pil(engine, image)
    import numpy as np

    if isinstance(image, np.ndarray):
        return _upscale_numpy(engine, image)
    raise SparseSRError(f"upscale expects a PIL image, a NumPy array or a tensor, got {type(image).__name__}")


def _upscale_tensor(engine: UpscaleEngine, x: torch.Tensor) -> torch.Tensor:
    if not x.is_floating_point() or x.dim() not in (3, 4):
        raise SparseSRError(f"expected a float tensor [C, H, W] or [N, C, H, W], got {x.dtype} {tuple(x.shape)}")
    batch = x if x.dim() == 4 else x[None]
    out = torch.stack([engine.upscale_pixels(item) for item in batch])
    out = out.to(device=x.device, dtype=x.dtype)
    return out if x.dim() == 4 else out[0]


def _upscale_numpy(engine: UpscaleEngine, array):
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
    out = engine.upscale_pixels(pixels).permute(1, 2, 0).numpy()
    if levels:
        out = np.round(out.astype(np.float64) * levels).astype(array.dtype)
    else:
        out = out.astype(array.dtype)
    return out[:, :, 0] if array.ndim == 2 else out


def _upscale_pil(engine: UpscaleEngine, im):
    import numpy as np
    from PIL import Image as PILImage

    # The files' own decode path: modes, palette transparency, EXIF orientation as `upscale` sees them.
    out = engine.upscale_image(pil_to_image(im))
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
