"""The options of an upscale: one frozen object, checked when it is made (one-line errors, no I/O)."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Iterable

from sparsesr.errors import UsageError
from sparsesr.runtime.tiling import check_tiling

PRECISIONS = ("fp32", "fp16", "bf16")
OUTPUT_EXTENSIONS = ("png", "jpg", "webp", "tiff")
# What the engine (and so the Python API) uses; the other fields only matter to ``upscale_files``.
COMPUTE_OPTIONS = ("scale", "device", "precision", "backend", "tile", "tile_pad", "alpha")


def parse_scale(scale: float | int | str | None) -> float | None:
    """``--scale`` as a float in (0, 16], or None (the model's own)."""
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


@dataclass(frozen=True)
class UpscaleOptions:
    """How to upscale. Made once (from CLI flags or keyword arguments) and passed everywhere.

    Compute (:class:`~sparsesr.upscaling.engine.UpscaleEngine`):

    - ``scale``: output factor in (0, 16]; the model runs at its own scale and the result is
      resized (MATLAB bicubic). None: the model's own.
    - ``device``: auto, cpu, cuda, cuda:N. ``backend``: "auto"/"sparse" (sparse kernels where
      they are faster) or "dense". ``precision``: "auto" (fp32 on CPU, fp16 on CUDA), "fp32",
      "fp16", "bf16" (on the CPU: dense bf16 convs where it has AMX-BF16, else fp32 with a
      warning); a half type that fails or gives non-finite values falls back to fp32.
    - ``tile``: input pixels per tile (0: automatic from free memory), ``tile_pad``: overlap.
    - ``alpha``: "bicubic" or "model" (the alpha channel through the network).

    Files (:func:`~sparsesr.upscaling.batch.upscale_files` only): ``suffix`` (None: ``_x{scale}``),
    ``ext``, ``quality``, ``recursive``, ``overwrite``, ``skip_existing``, ``compare_dense``, ``quiet``.
    """

    scale: float | None = None
    device: str = "auto"
    precision: str = "auto"
    backend: str = "auto"
    tile: int = 0
    tile_pad: int = 16
    alpha: str = "bicubic"
    suffix: str | None = None
    ext: str = "auto"
    quality: int = 95
    recursive: bool = False
    overwrite: bool = False
    skip_existing: bool = False
    compare_dense: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        # The order of the checks is the order of the messages users see when several are wrong.
        if self.overwrite and self.skip_existing:
            raise UsageError("--overwrite and --skip-existing cannot be used together")
        quality = self.quality
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise UsageError(f"--quality must be an integer from 1 to 100, got {quality!r}")
        for name, value in (("--tile", self.tile), ("--tile-pad", self.tile_pad)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise UsageError(f"{name} must be an integer, got {value!r}")
        check_tiling(self.tile, self.tile_pad)  # its seam warning is the engine's to give
        object.__setattr__(self, "scale", parse_scale(self.scale))  # frozen: normalised once, here
        ext = self.ext
        if not isinstance(ext, str) or (ext != "auto" and ext.lower().lstrip(".") not in (*OUTPUT_EXTENSIONS, "jpeg", "tif")):
            raise UsageError(f"--ext must be auto or one of {', '.join(OUTPUT_EXTENSIONS)}, got {ext!r}")
        if self.suffix is not None:
            if not isinstance(self.suffix, str):
                raise UsageError(f"--suffix must be a string, got {self.suffix!r}")
            if any(sep and sep in self.suffix for sep in (os.sep, os.altsep, "/")):
                raise UsageError(f"--suffix must not contain a path separator, got {self.suffix!r}")
            if "\0" in self.suffix:
                raise UsageError(f"--suffix must not contain a NUL character, got {self.suffix!r}")
        if self.backend not in ("auto", "sparse", "dense"):
            raise UsageError(f"--backend must be auto, sparse or dense, got {self.backend!r}")
        if self.precision not in ("auto", *PRECISIONS):
            raise UsageError(f"--precision must be auto, fp32, fp16 or bf16, got {self.precision!r}")
        if self.alpha not in ("bicubic", "model"):
            raise UsageError(f"--alpha must be bicubic or model, got {self.alpha!r}")
        if not isinstance(self.device, str):
            raise UsageError(f"--device must be a string such as auto, cpu or cuda:0, got {self.device!r}")

    @classmethod
    def from_kwargs(cls, options: dict[str, Any], allowed: Iterable[str] | None = None) -> UpscaleOptions:
        """Options from keyword arguments; a name that is not an option (of ``allowed``) is one line."""
        names = tuple(allowed) if allowed is not None else tuple(f.name for f in fields(cls))
        unknown = [name for name in options if name not in names]
        if unknown:
            raise UsageError(f"unknown upscale option {unknown[0]!r}; the options are {', '.join(names)}")
        return cls(**options)

    @property
    def seam_warning(self) -> str | None:
        """A warning when ``tile_pad`` is too small to hide tile seams, else None."""
        return check_tiling(self.tile, self.tile_pad)
