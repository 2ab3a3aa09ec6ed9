"""Benchmark evaluation: Y-channel PSNR/SSIM over folders of HR images, as published tables do.

For every HR image: crop to a multiple of the scale, make the LR input with the MATLAB-compatible
bicubic and round it to 8 bits, run the upscaler, clamp and round its output to 8 bits, then
score Y PSNR/SSIM with ``scale`` border pixels cropped (see docs/evaluation.md). Grayscale images
go through the upscaler as a 3-channel replica and are scored on their single channel.

``load_eval_model`` turns ``sparsesr eval --model`` into the function that is scored: ``bicubic``,
or any model ``sparsesr.load`` takes, run on the sparse runtime (as ``sparsesr upscale`` runs it).
"""
from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from sparsesr.data.datasets import SRImageDataset, list_images
from sparsesr.data.image_io import quantize
from sparsesr.data.resize import imresize
from sparsesr.errors import ConfigError, SparseSRError, UsageError
from sparsesr.metrics import psnr, ssim

__all__ = ["EvalModel", "UpscaleFn", "bicubic_upscaler", "evaluate", "format_table", "load_eval_model", "score_pair"]

# lr [1, 3, h, w] in [0, 1] -> sr [1, 3, h*s, w*s]: all that evaluation needs of a model.
UpscaleFn = Callable[[torch.Tensor], torch.Tensor]

# Luma weights (BT.601, summing to 1) to turn a model's RGB output for a gray input back to gray.
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def bicubic_upscaler(scale: int | float) -> UpscaleFn:
    """An upscaler that is MATLAB bicubic interpolation (the published 'Bicubic' baseline)."""

    def upscale(lr: torch.Tensor) -> torch.Tensor:
        return imresize(lr.to(torch.float64), scale=scale).to(lr.dtype)

    return upscale


@dataclass(frozen=True)
class EvalModel:
    """What ``sparsesr eval --model`` scores: the function, its scale, and a line naming it."""

    fn: UpscaleFn
    scale: int
    description: str
    net: torch.nn.Module | None = None  # the runtime model (None for bicubic)


def load_eval_model(spec: str, scale: int | None = None, device: str = "auto", precision: str = "auto",
                    warn: Callable[[str], None] | None = None) -> EvalModel:
    """``bicubic`` (at ``scale``, default 2), or what ``sparsesr.load`` takes (an embedded name, an
    exported file, a checkpoint of any family the runtime runs) on the sparse runtime. A ``scale``
    other than the model's own is an error: published tables score a model at its own scale.

    ``precision``: "auto" or "fp32" (the reference), or "bf16" to measure its cost: on the CPU it
    runs the dense bf16 copy (``sparsesr.runtime.precision.DenseBf16``) where the CPU has AMX-BF16,
    else fp32 after a one-line ``warn`` (default: ``warnings.warn``), as ``sparsesr upscale`` does.
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise UsageError(f"--precision must be auto, fp32 or bf16, got {precision!r}")
    if spec == "bicubic":
        if precision == "bf16":
            raise UsageError("--precision bf16 applies to networks; bicubic is computed in float64")
        scale = scale or 2
        return EvalModel(bicubic_upscaler(scale), scale, f"bicubic x{scale}")
    import sparsesr
    from sparsesr.pretrained import resolve_model
    from sparsesr.runtime.precision import compute_dtype, half_network

    path = resolve_model(spec, also=("bicubic",))  # resolved here so that a bad name lists bicubic too
    net = sparsesr.load(path, device=device)
    model_scale = int(net.scale)
    if scale is not None and scale != model_scale:
        raise SparseSRError(f"{spec} is a x{model_scale} model, but --scale {scale} was asked for")
    on = next(itertools.chain(net.parameters(), net.buffers())).device
    dtype = compute_dtype("fp32" if precision == "auto" else precision, on,
                          warn or (lambda message: warnings.warn(message, stacklevel=3)))
    network = net if dtype == torch.float32 else half_network(net, dtype, on)
    runs_on = f"sparse runtime on {on}" if dtype == torch.float32 else f"{str(dtype).removeprefix('torch.')} on {on}"

    @torch.no_grad()
    def run(lr: torch.Tensor) -> torch.Tensor:
        return network(lr.to(on, dtype)).float()

    return EvalModel(run, model_scale, f"{path.name} ({net.family} x{model_scale}, {runs_on})", net)


@torch.no_grad()
def score_pair(upscaler: UpscaleFn, lr: torch.Tensor, hr: torch.Tensor, scale: int) -> tuple[float, float]:
    """(PSNR, SSIM) of one image: ``lr`` [C,h,w] and ``hr`` [C,H,W] as SRImageDataset returns them.

    C = 1 (grayscale) is fed to the upscaler as 3 identical channels and scored on one channel.
    """
    gray = lr.shape[0] == 1
    model_input = (lr.expand(3, -1, -1) if gray else lr).unsqueeze(0).contiguous()
    sr = upscaler(model_input)
    if tuple(sr.shape) != (1, 3, *hr.shape[-2:]):
        raise ValueError(f"upscaler returned shape {tuple(sr.shape)}, expected (1, 3, {hr.shape[-2]}, {hr.shape[-1]})")
    sr = sr[0].detach().to("cpu", torch.float64)
    if gray:
        weights = torch.tensor(_GRAY_WEIGHTS, dtype=torch.float64).view(3, 1, 1)
        sr = (sr * weights).sum(dim=0, keepdim=True)
    # Published tables score 8-bit images; rounding HR too makes its float32 values exact k/255.
    sr = quantize(sr)
    hr = quantize(hr.to(torch.float64))
    return psnr(sr, hr, crop_border=scale), ssim(sr, hr, crop_border=scale)


def evaluate(
    upscaler: UpscaleFn,
    folders: str | os.PathLike | Iterable[str | os.PathLike],
    scale: int,
    progress: bool = True,
    per_image: bool = False,
) -> dict[str, dict]:
    """Average Y PSNR/SSIM per folder: ``{folder name: {"psnr", "ssim", "images"}}``.

    ``upscaler`` maps an LR batch [1, 3, h, w] (float32, CPU, values in [0, 1]) to SR
    [1, 3, h*scale, w*scale] on any device. With ``per_image`` each entry also has
    ``"per_image": {name: {"psnr", "ssim"}}``.
    """
    folders = [Path(folders)] if isinstance(folders, (str, os.PathLike)) else [Path(f) for f in folders]
    names = [f.name for f in folders]
    if len(set(names)) != len(names):
        raise ConfigError(f"evaluation folders must have distinct names, got {', '.join(names)}")
    results: dict[str, dict] = {}
    for folder in folders:
        dataset = SRImageDataset(list_images(folder), scale)
        scores: dict[str, dict[str, float]] = {}
        for lr, hr, name in tqdm(dataset, desc=f"{folder.name} x{scale}", disable=not progress, leave=False):
            if min(hr.shape[-2:]) <= 2 * scale:  # nothing would be left once the border is cropped
                raise SparseSRError(f"{folder / name}: {hr.shape[-1]}x{hr.shape[-2]} is too small to score at "
                                    f"x{scale} (the protocol crops {scale} pixels from every border)")
            image_psnr, image_ssim = score_pair(upscaler, lr, hr, scale)
            scores[name] = {"psnr": image_psnr, "ssim": image_ssim}
        n = len(scores)
        entry = {
            "psnr": sum(s["psnr"] for s in scores.values()) / n,
            "ssim": sum(s["ssim"] for s in scores.values()) / n,
            "images": n,
        }
        if per_image:
            entry["per_image"] = scores
        results[folder.name] = entry
    return results


def format_table(results: dict[str, dict], precision: Sequence[int] = (2, 4)) -> str:
    """A one-line-per-dataset text table of ``evaluate`` results."""
    lines = [f"{'dataset':<12} {'images':>6} {'PSNR':>8} {'SSIM':>8}"]
    for name, r in results.items():
        lines.append(f"{name:<12} {r['images']:>6} {r['psnr']:>8.{precision[0]}f} {r['ssim']:>8.{precision[1]}f}")
    return "\n".join(lines)
