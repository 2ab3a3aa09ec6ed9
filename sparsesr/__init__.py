"""sparsesr: dynamic unstructured pruning for super-resolution, and sparse kernels to run it."""
from __future__ import annotations

__version__ = "0.1.0"


def load(path, device: str = "auto", backend: str = "auto"):
    """Load an exported sparse model file (or a checkpoint) for inference; see ``sparsesr.runtime.load``."""
    from sparsesr.runtime import load as _load

    return _load(path, device=device, backend=backend)


def upscale(image, scale: float | None = 2, model=None, **options):
    """Upscale a PIL image, a NumPy array (HWC uint8/uint16/float) or a tensor (CHW/NCHW float);
    returns the same kind. See ``sparsesr.upscaling.upscale`` for ``model`` and ``options``."""
    from sparsesr.upscaling import upscale as _upscale

    return _upscale(image, scale=scale, model=model, **options)
