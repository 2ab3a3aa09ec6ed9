"""Upscale images with a sparse model, in four layers, each usable on its own:

- :mod:`~sparsesr.upscaling.options` — :class:`UpscaleOptions`, every option in one frozen,
  checked object.
- :mod:`~sparsesr.upscaling.engine` — :class:`UpscaleEngine`: a loaded model plus options; float
  pixels ``[C, H, W]`` of any mode (L, LA, RGB, RGBA) to upscaled pixels, with tiling, the
  precision fallback, alpha and grayscale handling, and resizing to scales the model does not have.
- :mod:`~sparsesr.upscaling.api` — :func:`upscale`, the Python API on a PIL image, a NumPy array
  or a tensor (same kind back).
- :mod:`~sparsesr.upscaling.batch` — :func:`upscale_files`, the ``sparsesr upscale`` command.
"""
from __future__ import annotations

from sparsesr.upscaling.api import release_memory, upscale
from sparsesr.upscaling.batch import BatchResult, upscale_files
from sparsesr.upscaling.engine import UpscaleEngine, fill_transparent
from sparsesr.upscaling.options import UpscaleOptions

__all__ = ["BatchResult", "UpscaleEngine", "UpscaleOptions", "fill_transparent", "release_memory", "upscale",
           "upscale_files"]
