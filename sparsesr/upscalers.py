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

from sparsesr.errors import SparseSRError

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
    """``bicubic`` (needs ``scale``), a sparsesr / EDSR-PyTorch checkpoint, an exported file, or
    an embedded model name (``x2``, ``x4``, ``fast``)."""
    if spec == "bicubic":
        from sparsesr.evaluate import bicubic_upscaler

        scale = scale or 2
        return ResolvedUpscaler(bicubic_upscaler(scale), scale, f"bicubic x{scale}")
    from sparsesr.pretrained import resolve_model

    path = resolve_model(spec, also=("bicubic",))
    model = _load_any(path)
    model_scale = int(model.config.scale)
    if scale is not None and scale != model_scale:
        raise SparseSRError(f"{spec} is a x{model_scale} model, but --scale {scale} was asked for")
    return ResolvedUpscaler(module_upscaler(model), model_scale, f"{path.name} (x{model_scale})")


def _load_any(path: Path) -> nn.Module:
    from sparsesr.format import is_sparse_model_file

    if is_sparse_model_file(path):
        from sparsesr.runtime import load

        return load(path)
    from sparsesr.models.checkpoint import load_model

    return load_model(path)
