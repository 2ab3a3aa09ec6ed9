"""The experiment tools (tools/*.py) that the results and the resumed runs depend on."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from sparsesr.models import build_model
from sparsesr.models.checkpoint import save_checkpoint
from sparsesr.pruning import one_shot_prune

from conftest import write_smooth_images

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- tools/frontier.py ---------------------------------------------------------------------------

def _point(name, ms, set5, bsd100, engine="pytorch"):
    return {"name": name, "engine": engine, "ms": ms, "psnr": {"Set5": set5, "BSD100": bsd100}}


def test_the_frontier_rule():
    frontier = _tool("frontier")
    dense = [_point("d32", 50, 36.9, 31.5, "openvino (bf16)"), _point("d64", 120, 37.4, 31.8)]
    sparse = [
        _point("faster-better", 40, 37.0, 31.6, "sparsesr"),   # beats d32 on both counts
        _point("slower-worse", 60, 36.8, 31.4, "sparsesr"),    # d32 is faster and better
        _point("better-on-one", 60, 37.0, 31.4, "sparsesr"),   # d32 better on BSD100 only: not dominated
        _point("tie", 50, 36.9, 31.5, "sparsesr"),             # d32 as fast and as good: dominated
    ]
    frontier.mark_frontier(sparse, dense)
    verdict = {p["name"]: p["on_frontier"] for p in sparse}
    assert verdict == {"faster-better": True, "slower-worse": False, "better-on-one": True, "tie": False}
    assert sparse[1]["beaten_by"] == ["d32 on openvino (bf16)"]


def _run_folder(folder: Path, sparsity: float, set5: float, bsd100: float) -> Path:
    folder.mkdir()
    torch.manual_seed(0)
    model = build_model("edsr-cpu", 2, n_resblocks=1, n_feats=8)
    if sparsity:
        one_shot_prune(model, sparsity)
    save_checkpoint(folder / "model.safetensors", model)
    scores = {"Set5": {"psnr": set5, "ssim": 0.9}, "Set14": {"psnr": 33.0, "ssim": 0.9}, "BSD100": {"psnr": bsd100, "ssim": 0.9}}
    (folder / "eval.json").write_text(json.dumps(scores))
    return folder


def test_frontier_end_to_end(tmp_path, capsys, one_thread):
    frontier = _tool("frontier")
    sparse = _run_folder(tmp_path / "dup-s90", 0.9, 37.0, 31.6)
    dense = _run_folder(tmp_path / "dense", 0.0, 36.9, 31.5)
    assert frontier.main(["--sparse", str(sparse), "--dense", str(dense), "--size", "16", "--threads", "1",
                          "--repeats", "1", "--out", str(tmp_path / "f")]) == 0
    result = json.loads((tmp_path / "f.json").read_text())
    assert [p["name"] for p in result["sparse"]] == ["dup-s90"]
    assert {p["engine"] for p in result["dense"]} >= {"sparsesr", "pytorch"}
    assert all(p["psnr"] == {"Set5": 36.9, "BSD100": 31.5} for p in result["dense"])
    point = result["sparse"][0]
    assert point["on_frontier"] == (not point["beaten_by"])  # better than dense: only a faster dense point can't beat it
    assert point["on_frontier"]
    assert "| dup-s90 | sparsesr |" in (tmp_path / "f.md").read_text() and "dup-s90" in capsys.readouterr().out


def test_frontier_needs_scores(tmp_path):
    frontier = _tool("frontier")
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit, match="expected model.safetensors and eval.json"):
        frontier.scores_of(tmp_path / "run")
    kept = tmp_path / "dup-x2b-s90.safetensors"  # a finished run as checkpoints/ keeps it
    kept.write_bytes(b"")
    (tmp_path / "dup-x2b-s90.eval.json").write_text(json.dumps({"Set5": {"psnr": 37.0}, "BSD100": {"psnr": 31.6}}))
    assert frontier.scores_of(kept) == (kept, {"Set5": 37.0, "BSD100": 31.6})


# --- tools/save_partial.py -------------------------------------------------------------------------

def test_save_partial_copies_a_checked_state_and_cuts_the_log(tmp_path, monkeypatch, one_thread):
    from sparsesr.train import load_config, train

    save_partial = _tool("save_partial")
    monkeypatch.setattr(save_partial, "CHECKPOINTS", tmp_path / "checkpoints")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "images").mkdir()
    images = write_smooth_images(tmp_path / "images", [(40, 36)] * 4)
    config = load_config(None, [f'data.train=["{images}"]', "data.holdout=1", "data.patch_size=8", "data.val_crop=16",
                                "model.arch=edsr-cpu", "model.n_resblocks=1", "model.n_feats=8", "train.iterations=4",
                                "train.batch_size=2", "train.save_every=2", "train.log_every=1", "train.val_every=4"])
    run = tmp_path / "runs" / "r"
    train(config, run, progress=False)
    with open(run / "log.jsonl", "a") as log:  # a record after the saved state (a run cut off later)
        log.write(json.dumps({"step": 99, "loss": 0.1}) + "\n")
    target, step = save_partial.save_partial(run)
    assert target == tmp_path / "checkpoints" / "r.partial" and step == 4
    assert (target / "state.pt").read_bytes() == (run / "state.pt").read_bytes()
    steps = [json.loads(line).get("step", 0) for line in (target / "log.jsonl").read_text().splitlines()]
    assert steps and max(steps) == 4
    assert save_partial.main([str(tmp_path / "nothing")]) == 1
