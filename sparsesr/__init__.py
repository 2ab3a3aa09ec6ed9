"""sparsesr: dynamic unstructured pruning for super-resolution, and sparse kernels to run it."""
from __future__ import annotations

__version__ = "0.1.0"


def load(path, device: str = "auto", backend: str = "auto"):
    """Load a model for inference: an exported sparse file, a checkpoint, or an embedded model name
    (``x2``, ``x4``, ``fast``); ``device`` is auto, cpu, cuda or cuda:N. See ``sparsesr.runtime.load``."""
    from sparsesr.runtime import load as _load

    return _load(path, device=device, backend=backend)


def upscale(image, scale: float | None = None, model=None, **options):
    """Upscale a PIL image, a NumPy array (HWC uint8/uint16/float) or a tensor (CHW/NCHW float);
    returns the same kind. ``scale`` None is the model's own (``model="x4"``: x4; the embedded x2
    without ``model``). See ``sparsesr.upscaling.upscale`` for ``model`` and ``options``."""
    from sparsesr.upscaling import upscale as _upscale

    return _upscale(image, scale=scale, model=model, **options)
