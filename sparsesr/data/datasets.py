"""Training and evaluation datasets built from folders of HR images.

LR images are made from the HR images with the MATLAB-compatible bicubic (``resize.imresize``),
then rounded to 8 bits, the way published SR pipelines store their LR inputs; models therefore
train on the same kind of input they are evaluated on.
"""
from __future__ import annotations

import os
import random
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from sparsesr.data.image_io import IMAGE_EXTENSIONS, image_size, quantize, read_image, to_uint8
from sparsesr.data.resize import imresize
from sparsesr.errors import ConfigError

__all__ = [
    "list_images",
    "split_holdout",
    "make_lr",
    "crop_to_multiple",
    "load_hr",
    "SRPatchDataset",
    "SRImageDataset",
]


def list_images(folders: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """All image files under the given folders (recursive), sorted by path.

    Raises ``ConfigError`` if a folder does not exist or no image is found.
    """
    folders = [Path(folders)] if isinstance(folders, (str, os.PathLike)) else [Path(f) for f in folders]
    found: list[Path] = []
    for folder in folders:
        if not folder.is_dir():
            raise ConfigError(f"image folder not found: {folder}")
        found.extend(
            p for p in folder.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
        )
    if not found:
        names = ", ".join(map(str, folders))
        raise ConfigError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {names}")
    return sorted(set(found))


def split_holdout(paths: Sequence[Path], n: int, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Split ``paths`` into (train, holdout) with ``n`` holdout images chosen by ``seed``.

    Both lists are sorted; the choice depends only on ``seed`` and the set of paths.
    """
    paths = sorted(paths)
    if not 0 <= n < len(paths):
        raise ConfigError(f"holdout size must be between 0 and {len(paths) - 1}, got {n}")
    held = set(random.Random(seed).sample(range(len(paths)), n))
    train = [p for i, p in enumerate(paths) if i not in held]
    holdout = [p for i, p in enumerate(paths) if i in held]
    return train, holdout


def crop_to_multiple(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Crop the bottom/right of [..., H, W] so that H and W are multiples of ``scale``."""
    h, w = hr.shape[-2], hr.shape[-1]
    return hr[..., : h - h % scale, : w - w % scale]


def make_lr(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """MATLAB-bicubic downscale of [..., H, W] by ``scale``, rounded to 8 bits (float, same dtype).

    ``hr`` must already be cropped to a multiple of ``scale``. Computed in float64 so results do
    not depend on the input precision.
    """
    h, w = hr.shape[-2], hr.shape[-1]
    if h % scale or w % scale:
        raise ValueError(f"HR size {h}x{w} is not a multiple of scale {scale}")
    lr = imresize(hr.to(torch.float64), size=(h // scale, w // scale))
    return quantize(lr).to(hr.dtype)


def load_hr(path: Path, scale: int, rgb: bool) -> torch.Tensor:
    """Read an HR image as float32 [C, H, W] cropped to a multiple of ``scale``.

    Alpha is dropped. With ``rgb`` grayscale becomes 3 identical channels; without it a
    grayscale image keeps its single channel.
    """
    image = read_image(path)
    pixels = image.pixels[:-1] if image.has_alpha else image.pixels
    if rgb and pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    return crop_to_multiple(pixels, scale).contiguous()


def _augment(lr: torch.Tensor, hr: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random flip / 90-degree rotation (8 dihedral transforms) on both patches."""
    if rng.random() < 0.5:
        lr, hr = lr.flip(-1), hr.flip(-1)
    if rng.random() < 0.5:
        lr, hr = lr.flip(-2), hr.flip(-2)
    if rng.random() < 0.5:
        lr, hr = lr.transpose(-1, -2), hr.transpose(-1, -2)
    return lr, hr


def _compact(pixels: torch.Tensor) -> torch.Tensor:
    """Store 8-bit content as uint8 (4x less memory in the cache), anything finer as is."""
    as_uint8 = to_uint8(pixels)
    return as_uint8 if torch.equal(as_uint8.float() / 255, pixels) else pixels


def _expand(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 255 if pixels.dtype == torch.uint8 else pixels


class SRPatchDataset(Dataset):
    """Random aligned (LR, HR) training patches, float32 RGB [3, p, p] and [3, p*s, p*s].

    Everything about item ``i`` (which image, patch position, flip/rotation) comes from random
    generators seeded with ``(seed, epoch, i)``, so batches are identical across DataLoader
    workers, processes and resumed runs. Items are grouped in passes of ``len(paths)``: each pass
    visits every image once, in its own random order. The simplest reproducible setup is a plain
    sequential sampler (``shuffle=False``) with ``length = steps * batch_size``; resuming at step
    ``k`` is then starting at item ``k * batch_size``. (``set_epoch`` changes the patches too, but
    DataLoader workers with ``persistent_workers=True`` keep the copy they started with.)

    HR images are cropped to a multiple of ``scale``; LR images are their MATLAB-bicubic
    downscale rounded to 8 bits. Both are computed once per image and cached in memory (each
    DataLoader worker keeps its own cache; 8-bit content is cached as uint8). Grayscale images
    become RGB, alpha is dropped. Images smaller than the HR patch are skipped with a warning
    (listed in ``skipped``).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        scale: int,
        patch_size: int = 48,
        augment: bool = True,
        seed: int = 0,
        length: int | None = None,
    ) -> None:
        if scale < 1 or patch_size < 1:
            raise ConfigError(f"scale and patch_size must be positive, got {scale} and {patch_size}")
        self.scale = int(scale)
        self.patch_size = int(patch_size)
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        hr_patch = self.patch_size * self.scale
        self.paths: list[Path] = []
        self.skipped: list[Path] = []
        for path in map(Path, paths):
            h, w = image_size(path)
            (self.paths if min(h, w) >= hr_patch else self.skipped).append(path)
        if self.skipped:
            warnings.warn(
                f"skipping {len(self.skipped)} training image(s) smaller than the {hr_patch}px HR patch, "
                f"e.g. {self.skipped[0]}",
                stacklevel=2,
            )
        if not self.paths:
            raise ConfigError(
                f"no training image is at least {hr_patch}x{hr_patch} pixels (patch {patch_size}, scale {scale})"
            )
        self.length = len(self.paths) if length is None else int(length)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_epoch(self, epoch: int) -> None:
        """Select a new, reproducible set of items (like DistributedSampler.set_epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def image_index(self, index: int) -> int:
        """Which of ``self.paths`` item ``index`` is cut from."""
        n = len(self.paths)
        pass_number, position = divmod(index, n)
        order = np.random.default_rng([self.seed, self.epoch, pass_number, n]).permutation(n)
        return int(order[position])

    def _cached(self, image_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if image_index not in self._cache:
            hr = load_hr(self.paths[image_index], self.scale, rgb=True)
            self._cache[image_index] = (_compact(make_lr(hr, self.scale)), _compact(hr))
        return self._cache[image_index]

    def pair(self, image_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole (LR, HR) float32 images for one training image."""
        lr, hr = self._cached(image_index)
        return _expand(lr), _expand(hr)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        lr, hr = self._cached(self.image_index(index))
        rng = np.random.default_rng([self.seed, self.epoch, index])
        p, s = self.patch_size, self.scale
        top = int(rng.integers(0, lr.shape[-2] - p + 1))
        left = int(rng.integers(0, lr.shape[-1] - p + 1))
        lr_patch = _expand(lr[:, top : top + p, left : left + p])
        # LR pixel (y, x) covers HR pixels (y*s .. y*s+s-1, x*s ..): aligned by construction.
        hr_patch = _expand(hr[:, top * s : (top + p) * s, left * s : (left + p) * s])
        if self.augment:
            lr_patch, hr_patch = _augment(lr_patch, hr_patch, rng)
        return lr_patch.contiguous(), hr_patch.contiguous()


class SRImageDataset(Dataset):
    """Whole images for validation and evaluation: ``(lr, hr, name)``.

    ``hr`` is float32 [C, H, W] cropped to a multiple of ``scale``; ``lr`` its MATLAB-bicubic
    downscale rounded to 8 bits. Grayscale images keep ONE channel (C = 1) because published
    tables score them on that channel; RGB(A) images give C = 3 (alpha dropped).
    ``name`` is the file name without extension. Items are computed on access, not cached.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], scale: int) -> None:
        if scale < 1:
            raise ConfigError(f"scale must be positive, got {scale}")
        self.paths = [Path(p) for p in paths]
        self.scale = int(scale)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        path = self.paths[index]
        hr = load_hr(path, self.scale, rgb=False)
        if min(hr.shape[-2:]) < self.scale:
            raise ConfigError(f"image {path} is smaller than the scale factor {self.scale}")
        return make_lr(hr, self.scale), hr, path.stem
