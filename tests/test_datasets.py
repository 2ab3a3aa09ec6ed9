"""Folder listing, holdout split and the SR datasets on small generated images."""
from __future__ import annotations

import warnings

import pytest
import torch

from sparsesr.data import SRImageDataset, SRPatchDataset, list_images, split_holdout
from sparsesr.data.datasets import make_lr
from sparsesr.data.image_io import quantize, write_image
from sparsesr.data.resize import imresize
from sparsesr.errors import ConfigError, SparseSRError


def _smooth_image(channels: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Smooth random content (upsampled noise) so patches are distinctive but natural-ish."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(channels, h // 4 + 2, w // 4 + 2, generator=g, dtype=torch.float64)
    return imresize(coarse, size=(h, w)).clamp(0, 1)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "train"
    (root / "sub").mkdir(parents=True)
    write_image(root / "b.png", _smooth_image(3, 50, 41, 1))
    write_image(root / "a.png", _smooth_image(3, 37, 45, 2))
    write_image(root / "sub" / "c.png", _smooth_image(1, 40, 40, 3))  # grayscale
    (root / "notes.txt").write_text("not an image")
    return root


def test_list_images_is_sorted_recursive_and_filters(folder):
    paths = list_images(folder)
    assert [p.relative_to(folder).as_posix() for p in paths] == ["a.png", "b.png", "sub/c.png"]
    assert list_images([str(folder)]) == paths


def test_list_images_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SparseSRError, match="no images"):
        list_images([tmp_path / "empty"])


def test_split_holdout_is_deterministic_and_disjoint(tmp_path):
    paths = [tmp_path / f"{i:03d}.png" for i in range(20)]
    train, holdout = split_holdout(paths, 5, seed=3)
    assert len(holdout) == 5 and len(train) == 15
    assert set(train).isdisjoint(holdout) and set(train) | set(holdout) == set(paths)
    assert split_holdout(list(reversed(paths)), 5, seed=3) == (train, holdout)
    assert split_holdout(paths, 5, seed=4)[1] != holdout
    with pytest.raises(ConfigError):
        split_holdout(paths, 20)


def test_patch_shapes_and_rgb(folder):
    dataset = SRPatchDataset(list_images(folder), scale=3, patch_size=8, length=7)
    assert len(dataset) == 7
    for i in range(7):
        lr, hr = dataset[i]
        assert lr.shape == (3, 8, 8) and hr.shape == (3, 24, 24)
        assert lr.dtype == torch.float32 and hr.dtype == torch.float32
    # The grayscale image is replicated to RGB.
    gray_item = next(i for i in range(7) if dataset.paths[dataset.image_index(i)].name == "c.png")
    lr, hr = dataset[gray_item]
    assert torch.equal(hr[0], hr[1]) and torch.equal(hr[0], hr[2])


def test_each_pass_visits_every_image_once_in_a_new_order(folder):
    dataset = SRPatchDataset(list_images(folder), scale=2, patch_size=8, seed=0, length=30)
    passes = [[dataset.image_index(p * 3 + k) for k in range(3)] for p in range(10)]
    assert all(sorted(order) == [0, 1, 2] for order in passes)
    assert len({tuple(order) for order in passes}) > 1


@pytest.mark.parametrize("augment", [False, True])
def test_lr_patch_is_the_bicubic_of_the_hr_patch(folder, augment):
    scale, p = 2, 12
    dataset = SRPatchDataset(list_images(folder), scale=scale, patch_size=p, augment=augment, seed=1, length=12)
    for i in range(12):
        lr, hr = dataset[i]
        # Away from the patch border the LR pixels only see HR pixels inside the patch, so
        # downscaling the HR patch must reproduce them (flips/transposes commute with imresize).
        expected = quantize(imresize(hr.double(), scale=1 / scale)).float()
        margin = 3
        inner = (slice(None), slice(margin, p - margin), slice(margin, p - margin))
        assert torch.allclose(lr[inner], expected[inner], atol=1 / 255 + 1e-6)
        # ... which a patch misaligned by one HR pixel does not.
        misaligned = quantize(imresize(torch.roll(hr, 1, dims=-1).double(), scale=1 / scale)).float()
        assert not torch.allclose(lr[inner], misaligned[inner], atol=1 / 255 + 1e-6)


def test_patches_are_reproducible_and_change_with_seed_and_epoch(folder):
    paths = list_images(folder)
    a = SRPatchDataset(paths, scale=2, patch_size=8, seed=5, length=6)
    b = SRPatchDataset(paths, scale=2, patch_size=8, seed=5, length=6)
    for i in reversed(range(6)):  # access order does not matter
        assert all(torch.equal(x, y) for x, y in zip(a[i], b[i]))
    other_seed = SRPatchDataset(paths, scale=2, patch_size=8, seed=6, length=6)
    assert any(not torch.equal(a[i][1], other_seed[i][1]) for i in range(6))
    before = [a[i][1] for i in range(6)]
    a.set_epoch(1)
    assert any(not torch.equal(before[i], a[i][1]) for i in range(6))


def test_augmentation_uses_all_dihedral_transforms(folder):
    paths = list_images(folder)
    plain = SRPatchDataset(paths, scale=2, patch_size=8, augment=False, seed=0, length=60)
    augmented = SRPatchDataset(paths, scale=2, patch_size=8, augment=True, seed=0, length=60)
    seen = set()
    for i in range(60):
        base, aug = plain[i][1], augmented[i][1]  # same crop position (same random stream)
        for k, candidate in enumerate(
            [base, base.flip(-1), base.flip(-2), base.flip(-1, -2), base.mT, base.mT.flip(-1), base.mT.flip(-2), base.mT.flip(-1, -2)]
        ):
            if torch.equal(candidate, aug):
                seen.add(k)
                break
        else:
            pytest.fail("augmented patch is not a flip/rotation of the plain patch")
    assert len(seen) == 8


def test_small_images_are_skipped_with_warning(folder):
    with pytest.warns(UserWarning, match="skipping 1"):
        dataset = SRPatchDataset(list_images(folder), scale=4, patch_size=10)  # needs 40px HR patches
    assert [p.name for p in dataset.paths] == ["b.png", "c.png"] and len(dataset) == 2
    assert [p.name for p in dataset.skipped] == ["a.png"]
    with pytest.raises(ConfigError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SRPatchDataset(list_images(folder), scale=4, patch_size=20)


def test_image_dataset_crops_and_keeps_grayscale(folder):
    dataset = SRImageDataset(list_images(folder), scale=3)
    lr, hr, name = dataset[0]
    assert name == "a" and hr.shape == (3, 36, 45) and lr.shape == (3, 12, 15)
    assert torch.equal(lr, make_lr(hr, 3))
    assert torch.equal(lr, quantize(lr))  # LR is 8-bit
    lr, hr, name = dataset[2]
    assert name == "c" and hr.shape == (1, 39, 39) and lr.shape == (1, 13, 13)


def test_cache_is_exact_for_8_and_16_bit_images(tmp_path):
    from sparsesr.data.datasets import load_hr

    write_image(tmp_path / "deep.png", _smooth_image(3, 24, 24, 9), "RGB", 16)
    write_image(tmp_path / "flat.png", _smooth_image(3, 24, 24, 10))
    dataset = SRPatchDataset(list_images(tmp_path), scale=2, patch_size=6)
    for i, path in enumerate(dataset.paths):
        lr, hr = dataset.pair(i)
        assert torch.equal(hr, load_hr(path, 2, rgb=True))
        assert torch.equal(lr, make_lr(hr, 2))
    assert dataset._cache[0][1].dtype == torch.float32  # 16-bit content is not squeezed into uint8
    assert dataset._cache[1][1].dtype == torch.uint8
