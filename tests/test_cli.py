"""The command line: help texts, exit codes, one-line errors, and the train/eval/prune/export/info flow."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sparsesr.cli import build_parser, main
from sparsesr.models import build_model
from sparsesr.models.checkpoint import save_checkpoint

COMMANDS = ["train", "eval", "prune", "export", "info", "upscale", "models", "bench"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("Set")
    rng = np.random.default_rng(1)
    for i in range(3):
        small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((36, 28), Image.BICUBIC).save(folder / f"im{i}.png")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "small.safetensors"
    save_checkpoint(path, build_model("edsr-cpu", 2, n_resblocks=2, n_feats=16))
    return path


def test_every_command_has_help(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: sparsesr " + name in capsys.readouterr().out
    assert set(COMMANDS) <= set(build_parser()._subparsers._group_actions[0].choices)


def test_eval_bicubic_json(images, capsys):
    assert main(["eval", "--model", "bicubic", "--scale", "2", "--data", str(images), "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    row = result[images.name]
    assert row["images"] == 3 and 15 < row["psnr"] < 60 and 0 < row["ssim"] <= 1


def test_eval_checkpoint_table(images, checkpoint, capsys):
    assert main(["eval", "--model", str(checkpoint), "--data", str(images), "-q"]) == 0
    out = capsys.readouterr().out
    assert images.name in out and "PSNR" in out


def test_eval_and_info_take_embedded_model_names(images, capsys, monkeypatch):
    """Like upscale and bench: `--model fast` / `info x4` name the shipped files."""
    monkeypatch.setenv("SPARSESR_CPU_DISPATCH_CACHE", "0")
    assert main(["eval", "--model", "fast", "--data", str(images), "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)[images.name]["images"] == 3
    assert main(["info", "x4", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["scale"] == 4 and info["sparsity"] > 0.7
    assert main(["eval", "--model", "x9", "--data", str(images)]) != 0
    assert "not an embedded model" in capsys.readouterr().err


def test_prune_info_export_flow(tmp_path, checkpoint, capsys):
    pruned = tmp_path / "pruned.safetensors"
    assert main(["prune", str(checkpoint), "--sparsity", "0.75", "-o", str(pruned)]) == 0
    capsys.readouterr()
    assert main(["info", str(pruned), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert abs(info["sparsity"] - 0.75) < 1e-3
    assert info["pruning"]["method"] == "magnitude"
    exported = tmp_path / "model.safetensors"
    assert main(["export", str(pruned), "-o", str(exported), "--dtype", "fp16", "--layout", "csr", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert abs(report["sparsity"] - 0.75) < 1e-3 and report["size_bytes"] < report["dense_fp32_bytes"]
    assert main(["info", str(exported)]) == 0
    assert "sparsity over pruned layers: 0.75" in capsys.readouterr().out
    assert main(["info", str(exported), "--runtime", "--backend", "dense"]) == 0
    runtime_rows = capsys.readouterr().out.split("runtime (path")[1].splitlines()
    assert any(row.split()[:3] == ["body.0.body.0", "csr", "dense"] for row in runtime_rows if row.strip())


def test_eval_exported_file_matches_its_checkpoint(tmp_path, images, checkpoint, capsys):
    pruned, exported = tmp_path / "p.safetensors", tmp_path / "e.safetensors"
    assert main(["prune", str(checkpoint), "--sparsity", "0.5", "-o", str(pruned)]) == 0
    assert main(["export", str(pruned), "-o", str(exported)]) == 0
    capsys.readouterr()
    scores = []
    for model in (pruned, exported):
        assert main(["eval", "--model", str(model), "--data", str(images), "--json", "-q"]) == 0
        scores.append(json.loads(capsys.readouterr().out)[images.name]["psnr"])
    assert abs(scores[0] - scores[1]) < 1e-3


def _run(*args):
    return subprocess.run([sys.executable, "-m", "sparsesr", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["eval", "--data", "/nonexistent/folder"], "/nonexistent/folder"),
        (["train", "-o", "OUT", "--set", "model.arch=srgan"], "model.arch: expected one of edsr"),
        (["train", "-o", "OUT", "--set", "train.itrations=5"], "unknown key"),
        (["info", "/nonexistent.safetensors"], "/nonexistent.safetensors"),
        (["eval", "--model", "/nonexistent.pt", "--data", "."], "/nonexistent.pt"),
    ],
)
def test_user_errors_are_one_line(tmp_path, args, needle):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    proc = _run(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr


def test_corrupt_image_is_one_line(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    proc = _run("eval", "--data", str(folder), "-q")
    assert proc.returncode == 2
    assert "broken.png" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _upscale_in(folder, *args):
    return subprocess.run([sys.executable, "-m", "sparsesr", "upscale", "-q", *args], capture_output=True,
                          text=True, timeout=300, cwd=folder)


@pytest.mark.parametrize("args, line", [
    (["-o", "big.gif"], "sparsesr upscale: error: -o big.gif: cannot write .gif files; give one of .bmp, .jpeg, "
                        ".jpg, .png, .tif, .tiff, .webp, or end a folder name with /"),
    (["--overwrite", "--skip-existing", "--quality", "150"],
     "sparsesr upscale: error: --overwrite and --skip-existing cannot be used together"),
])
def test_upscale_usage_errors_are_one_line_and_leave_nothing(tmp_path, args, line):
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "a.png")
    proc = _upscale_in(tmp_path, "a.png", *args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [line]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_upscale_end_to_end_with_the_shipped_model(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (10, 12, 4), dtype=np.uint8), "RGBA").save(tmp_path / "a.png")
    proc = _upscale_in(tmp_path, "a.png", "-o", "big/", "--suffix", "-up{scale}x")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout.startswith("1 of 1 images written in ")
    with Image.open(tmp_path / "big" / "a-up2x.png") as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGBA", (24, 20))
    assert sorted(p.name for p in (tmp_path / "big").iterdir()) == ["a-up2x.png"]
