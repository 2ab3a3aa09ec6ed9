"""Turn a model specification (``bicubic``, a checkpoint, an exported file) into an upscaler.

An upscaler is a callable ``lr[1, C, h, w] in [0, 1] -> sr[1, C, h*s, w*s]``: the one
interface evaluation, benchmarks and ``upscale`` need.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sparsesr.errors import CheckpointError, SparseSRError

Upscaler = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ResolvedUpscaler:
    fn: Upscaler
    scale: int
    description: str


def module_upscaler(model: nn.Module) -> Upscaler:
    @torch.no_grad()
    def run(lr: torch.Tensor) -> torch.Tensor:
        return model(lr)

    return run


def resolve_upscaler(spec: str, scale: int | None = None) -> ResolvedUpscaler:
    """``bicubic`` (needs ``scale``), a sparsesr / EDSR-PyTorch / BasicSR checkpoint, an exported file, or
    an embedded model name (``x2``, ``x4``, ``fast``)."""
    if spec == "bicubic":
        from sparsesr.evaluate import bicubic_upscaler

        scale = scale or 2
        return ResolvedUpscaler(bicubic_upscaler(scale), scale, f"bicubic x{scale}")
    from sparsesr.pretrained import EMBEDDED_MODELS, resolve_model

    path = resolve_model(spec) if spec in EMBEDDED_MODELS else Path(spec)
    if not path.is_file():
        raise SparseSRError(f"{spec}: not 'bicubic', not an embedded model ({', '.join(EMBEDDED_MODELS)}) "
                            "and no such model file")
    model = _load_any(path)
    model_scale = int(model.config.scale)
    if scale is not None and scale != model_scale:
        raise SparseSRError(f"{spec} is a x{model_scale} model, but --scale {scale} was asked for")
    return ResolvedUpscaler(module_upscaler(model), model_scale, f"{path.name} (x{model_scale})")


def _load_any(path: Path) -> nn.Module:
    from sparsesr.models.checkpoint import load_model

    try:
        return load_model(path)
    except CheckpointError as exc:
        if "exported sparse model" not in str(exc):
            raise
    from sparsesr.runtime import load  # an exported sparse file

    return load(path)
