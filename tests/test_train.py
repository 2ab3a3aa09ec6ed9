"""End-to-end training on tiny generated images: outputs, exact resume, and 2-process DDP."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sparsesr.errors import ConfigError
from sparsesr.models.checkpoint import load_checkpoint
from sparsesr.train import load_config, train
from sparsesr.train import loop as train_loop


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(6):
        # smooth random images: low-res noise upsampled, so SR has something to learn
        small = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
        Image.fromarray(small).resize((40 + 2 * i, 36), Image.BICUBIC).save(folder / f"img{i}.png")
    return folder


def _config(folder, *extra):
    return load_config(None, [
        f"data.train=['{folder}']", "data.holdout=2", "data.patch_size=8",
        "model.n_resblocks=1", "model.n_feats=8",
        "train.iterations=6", "train.batch_size=2", "train.val_every=3", "train.save_every=2",
        "train.log_every=1", *extra,
    ])


def test_train_writes_checkpoints_and_log(tmp_path, image_folder):
    result = train(_config(image_folder), tmp_path / "run", progress=False)
    assert result.steps == 6 and result.val_psnr is not None
    for name in ["model.safetensors", "last.safetensors", "best.safetensors", "state.pt", "log.jsonl", "config.json"]:
        assert (tmp_path / "run" / name).is_file(), name
    ckpt = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert ckpt.metadata["step"] == 6 and ckpt.config.n_feats == 8
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val" in r] == [3, 6]


def test_killed_run_resumes_exactly(tmp_path, image_folder, monkeypatch):
    cfg = _config(image_folder, "train.ema=0.9")
    train(cfg, tmp_path / "straight", progress=False)

    real_batch = train_loop._batch

    def crash_at_step_5(dataset, step, *args):
        if step == 5:  # state was saved at step 4; step 5 is lost and must be redone on resume
            raise KeyboardInterrupt
        return real_batch(dataset, step, *args)

    monkeypatch.setattr(train_loop, "_batch", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(train_loop, "_batch", real_batch)
    result = train(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert result.steps == 2
    a = load_checkpoint(tmp_path / "straight" / "model.safetensors").state_dict
    b = load_checkpoint(tmp_path / "resumed" / "model.safetensors").state_dict
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_state_is_an_error(tmp_path, image_folder):
    from sparsesr.errors import ConfigError

    with pytest.raises(ConfigError, match="nothing to resume"):
        train(_config(image_folder), tmp_path / "empty", resume=True, progress=False)


def test_two_process_ddp_replicas_agree(tmp_path, image_folder):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sparsesr", "train", "-q", "--out", str(out),
           "--set", f"data.train=['{image_folder}']", "--set", "data.holdout=2", "--set", "data.patch_size=8",
           "--set", "model.n_resblocks=1", "--set", "model.n_feats=8", "--set", "train.iterations=3",
           "--set", "train.batch_size=2", "--set", "train.threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    agree = [r for r in records if "replicas_agree" in r]
    assert agree and agree[0]["replicas_agree"] is True and len(agree[0]["replicas"]) == 2
    assert (out / "model.safetensors").is_file()


def test_pruned_training_resumes_with_identical_masks(tmp_path, image_folder, monkeypatch):
    cfg = _config(image_folder, "prune.method=dup", "prune.sparsity=0.5", "prune.end_step=4", "prune.update_every=1")
    train(cfg, tmp_path / "straight", progress=False)

    real_batch = train_loop._batch

    def crash_at_step_3(dataset, step, *args):
        if step == 3:
            raise KeyboardInterrupt
        return real_batch(dataset, step, *args)

    monkeypatch.setattr(train_loop, "_batch", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(train_loop, "_batch", real_batch)
    train(cfg, tmp_path / "resumed", resume=True, progress=False)

    a = load_checkpoint(tmp_path / "straight" / "model.safetensors")
    b = load_checkpoint(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert abs(a.metadata["pruning"]["report"]["sparsity"] - 0.5) < 0.01
    # exact zeros are baked into the saved weights
    body = a.state_dict["body.0.body.0.weight"]
    assert 0 < (body == 0).float().mean() < 1


def test_init_from_another_scale_keeps_everything_but_the_upsampler(tmp_path, image_folder):
    # x4 from x2: head, body and last conv start from the x2 weights; the upsampler is new.
    train(_config(image_folder, "train.iterations=2"), tmp_path / "x2", progress=False)
    parent = load_checkpoint(tmp_path / "x2" / "model.safetensors").state_dict
    cfg = _config(image_folder, "train.iterations=2", "model.scale=4", f"model.init={tmp_path / 'x2' / 'model.safetensors'}")
    with pytest.raises(ConfigError, match="init_other_scale"):  # a forgotten `scale` must not pass silently
        train_loop._initial_model(cfg)
    cfg.model.init_other_scale = True

    model, meta = train_loop._initial_model(cfg)
    start = model.state_dict()
    for key, value in parent.items():
        if not key.startswith("tail.0."):
            assert torch.equal(start[key], value), key
    assert start["tail.0.0.weight"].shape == parent["tail.0.0.weight"].shape
    assert not torch.equal(start["tail.0.0.weight"], parent["tail.0.0.weight"])
    assert "tail.0.2.weight" in start  # x4 has a second upsampling stage
    assert meta["init"]["transferred_from_scale"] == 2

    train(cfg, tmp_path / "x4", progress=False)
    ckpt = load_checkpoint(tmp_path / "x4" / "model.safetensors")
    assert ckpt.config.scale == 4 and ckpt.metadata["init"]["transferred_from_scale"] == 2
