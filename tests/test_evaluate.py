"""evaluate(): protocol on generated folders, and the published bicubic numbers on shared data."""
from __future__ import annotations

import math
import os

import pytest
import torch

from sparsesr.data.datasets import crop_to_multiple, make_lr
from sparsesr.data.image_io import quantize, read_image, write_image
from sparsesr.data.resize import imresize
from sparsesr.errors import ConfigError, SparseSRError
from sparsesr.evaluate import bicubic_upscaler, evaluate, load_eval_model
from sparsesr.metrics import psnr, ssim

from conftest import SHARED_DATA, SHARED_DATA_SKIP


def _image(channels: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(channels, h // 3, w // 3, generator=g, dtype=torch.float64)
    return imresize(coarse, size=(h, w)).clamp(0, 1)


@pytest.fixture
def bench(tmp_path):
    folder = tmp_path / "Tiny"
    folder.mkdir()
    write_image(folder / "rgb.png", _image(3, 38, 41, 1))
    write_image(folder / "gray.png", _image(1, 40, 36, 2))
    return folder


def test_bicubic_scores_follow_the_protocol(bench):
    results = evaluate(bicubic_upscaler(2), [bench], 2, progress=False, per_image=True)
    assert set(results) == {"Tiny"}
    entry = results["Tiny"]
    assert entry["images"] == 2 and set(entry["per_image"]) == {"rgb", "gray"}

    # Recompute each image by hand: crop, 8-bit bicubic LR, bicubic up, round, score.
    for name, channels in (("rgb", 3), ("gray", 1)):
        hr = quantize(crop_to_multiple(read_image(bench / f"{name}.png").pixels.double(), 2))
        assert hr.shape[0] == channels
        sr = quantize(imresize(make_lr(hr, 2), scale=2))
        assert entry["per_image"][name]["psnr"] == pytest.approx(psnr(sr, hr, 2), abs=1e-9)
        assert entry["per_image"][name]["ssim"] == pytest.approx(ssim(sr, hr, 2), abs=1e-9)
    mean = sum(v["psnr"] for v in entry["per_image"].values()) / 2
    assert entry["psnr"] == pytest.approx(mean)
    assert 20 < entry["psnr"] < 60 and 0.5 < entry["ssim"] < 1


def test_grayscale_is_fed_as_rgb_and_perfect_upscaler_scores_inf(bench):
    hr_images = {p.stem: crop_to_multiple(read_image(p).pixels, 2) for p in bench.iterdir()}
    shapes = []

    def oracle(lr: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(lr.shape))
        for hr in hr_images.values():  # return the matching HR, replicated to RGB
            if hr.shape[-2:] == (lr.shape[-2] * 2, lr.shape[-1] * 2):
                return hr.expand(3, -1, -1).unsqueeze(0)
        raise AssertionError("no HR image of that size")

    results = evaluate(oracle, [bench], 2, progress=False)
    assert all(shape[:2] == (1, 3) for shape in shapes)
    assert results["Tiny"]["psnr"] == math.inf
    assert results["Tiny"]["ssim"] == pytest.approx(1.0)


def test_wrong_output_size_and_duplicate_names_are_errors(bench, tmp_path):
    with pytest.raises(ValueError, match="upscaler returned shape"):
        evaluate(lambda lr: lr, [bench], 2, progress=False)
    other = tmp_path / "elsewhere" / "Tiny"
    other.mkdir(parents=True)
    with pytest.raises(ConfigError):
        evaluate(bicubic_upscaler(2), [bench, other], 2, progress=False)


# --- which model eval runs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from sparsesr.models import build_model
    from sparsesr.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, build_model("edsr-cpu", 2, n_resblocks=1, n_feats=8))
    return path


def test_an_image_too_small_to_score_is_one_error_naming_it(tmp_path, capsys):
    from sparsesr.cli import main

    write_image(tmp_path / "tiny.png", torch.rand(3, 4, 5))  # x2: 2x2 LR, 4x4 HR, nothing left after a 2-pixel crop
    with pytest.raises(SparseSRError, match=r"/tiny: 4x4 is too small to score at x2 "
                                            r"\(the protocol crops 2 pixels from every border\)$"):
        evaluate(bicubic_upscaler(2), tmp_path, 2, progress=False)
    assert main(["eval", "--model", "bicubic", "--scale", "2", "--data", str(tmp_path), "-q"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "tiny: 4x4 is too small" in err


def test_a_checkpoint_runs_on_the_sparse_runtime(checkpoint, bench):
    """One loader for eval and upscale: a checkpoint is the runtime's model (exported in memory),
    not the dense training module, and it scores what the dense module scores."""
    import sparsesr
    from sparsesr.models.checkpoint import load_model

    model = load_eval_model(str(checkpoint), device="cpu")
    assert type(model.net) is type(sparsesr.load(checkpoint, device="cpu"))
    assert type(model.net).__module__.startswith("sparsesr.runtime")
    assert model.scale == 2 and "sparse runtime on cpu" in model.description
    dense = load_model(checkpoint).eval()
    with torch.no_grad():
        reference = evaluate(dense, [bench], 2, progress=False)["Tiny"]
    got = evaluate(model.fn, [bench], 2, progress=False)["Tiny"]
    assert got["psnr"] == pytest.approx(reference["psnr"], abs=1e-3)


def test_eval_model_scale_and_bicubic(checkpoint):
    assert load_eval_model("bicubic").scale == 2 and load_eval_model("bicubic", 3).scale == 3
    assert load_eval_model("bicubic").net is None
    with pytest.raises(SparseSRError, match=r"is a x2 model, but --scale 4 was asked for"):
        load_eval_model(str(checkpoint), 4, device="cpu")
    with pytest.raises(SparseSRError, match=r"x9: no such file, and not an embedded model \(bicubic, x2, x4, fast\)"):
        load_eval_model("x9")


def test_the_old_loader_module_is_gone():
    with pytest.raises(ImportError):
        import sparsesr.upscalers  # noqa: F401 - one loader now: sparsesr.load


# Published bicubic values (research.md section 2): (PSNR, SSIM).
PUBLISHED = {
    2: {"Set5": (33.66, 0.9299), "Set14": (30.24, 0.8688), "BSD100": (29.56, 0.8431)},
    4: {"Set5": (28.42, 0.8104), "Set14": (26.00, 0.7027), "BSD100": (25.96, 0.6675)},
}


def _check_published(scale: int, names: list[str]) -> None:
    folders = {"Set5": SHARED_DATA / "val" / "Set5", "Set14": SHARED_DATA / "test" / "Set14", "BSD100": SHARED_DATA / "test" / "BSD100"}
    results = evaluate(bicubic_upscaler(scale), [folders[n] for n in names], scale, progress=False)
    for name in names:
        want_psnr, want_ssim = PUBLISHED[scale][name]
        # Published values are rounded to 2 / 4 decimals; allow that plus the brief's tolerance.
        assert abs(results[name]["psnr"] - want_psnr) <= 0.05, (name, results[name])
        assert abs(results[name]["ssim"] - want_ssim) <= 0.002, (name, results[name])


# CI (.ci/run) sets SPARSESR_REQUIRE_DATA=1 when ../shared/data is beside the clone, so a wrong path
# fails there instead of skipping; elsewhere the skip is announced at the end of the run (conftest).
if os.environ.get("SPARSESR_REQUIRE_DATA") == "1" and not SHARED_DATA.is_dir():
    raise RuntimeError(f"SPARSESR_REQUIRE_DATA=1 but {SHARED_DATA} is not a folder")
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=SHARED_DATA_SKIP)


@needs_shared_data
@pytest.mark.parametrize("scale", [2, 4])
def test_bicubic_reproduces_published_set5(scale):
    _check_published(scale, ["Set5"])  # a few seconds: the quick guard of the whole protocol


@needs_shared_data
@pytest.mark.slow
@pytest.mark.parametrize("scale", [2, 4])
def test_bicubic_reproduces_published_set14_bsd100(scale):
    _check_published(scale, ["Set14", "BSD100"])


# The project's quality bars for the embedded models (docs/models.md, "project bar"): PSNR(Y) on
# Set5 above the published bicubic value by at least this many dB. `x2`: 37.2 dB (issue #13; it
# measures 37.28). `fast` trades quality for speed, but must still clear bicubic by 2 dB (+2.05).
SHIPPED_BARS = {"x2": 3.54, "x4": 1.5, "fast": 2.0}


@needs_shared_data
@pytest.mark.parametrize("name", sorted(SHIPPED_BARS))
def test_shipped_models_meet_their_set5_bar(name):
    """The shipped file itself (fp16 weights, sparse runtime), and the score its metadata claims."""
    from sparsesr.pretrained import EMBEDDED_MODELS, list_models, resolve_model

    path = resolve_model(name)
    model = load_eval_model(str(path), device="cpu")
    scale = EMBEDDED_MODELS[name].scale
    assert model.scale == scale
    measured = evaluate(model.fn, [SHARED_DATA / "val" / "Set5"], scale, progress=False)["Set5"]["psnr"]
    assert measured > PUBLISHED[scale]["Set5"][0] + SHIPPED_BARS[name], measured
    claimed = next(row for row in list_models() if row["name"] == name)["psnr"]["Set5"]  # `sparsesr models`
    assert abs(measured - claimed) < 0.05, (measured, claimed)
