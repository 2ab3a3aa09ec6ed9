"""End-to-end training on tiny generated images: outputs, exact resume, and 2-process DDP."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from sparsesr.errors import ConfigError
from sparsesr.models.checkpoint import load_checkpoint
from sparsesr.train import load_config, train
from sparsesr.train import loop as train_loop

from conftest import write_smooth_images


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_smooth_images(tmp_path_factory.mktemp("images"), [(40 + 2 * i, 36) for i in range(6)])


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
    assert meta["init"]["fresh"] == ["tail.0.0.bias", "tail.0.0.weight", "tail.0.2.bias", "tail.0.2.weight"]

    train(cfg, tmp_path / "x4", progress=False)
    ckpt = load_checkpoint(tmp_path / "x4" / "model.safetensors")
    assert ckpt.config.scale == 4 and ckpt.metadata["init"]["transferred_from_scale"] == 2


# --- issue #15: resume keeps the run's config, atomic files, one log per step, checked states ---

def _crash_at(monkeypatch, crash_step):
    """Make the next train() stop (as if killed) just before it computes step ``crash_step + 1``."""
    real_batch = train_loop._batch

    def batch(dataset, step, *args):
        if step == crash_step:
            raise KeyboardInterrupt
        return real_batch(dataset, step, *args)

    monkeypatch.setattr(train_loop, "_batch", batch)
    return lambda: monkeypatch.setattr(train_loop, "_batch", real_batch)


def _records(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _cli(*argv):
    from sparsesr.cli import main

    return main(["train", "-q", *map(str, argv)])


_PRUNE = ("prune.method=dup", "prune.sparsity=0.5", "prune.end_step=4", "prune.update_every=1")


def test_resume_without_config_uses_the_saved_one(tmp_path, image_folder, monkeypatch, capsys):
    # `sparsesr train -o RUN --resume` used to train the *default* config and drop [prune]
    monkeypatch.chdir(tmp_path)  # the defaults' relative data path must not matter
    cfg = _config(image_folder, *_PRUNE)
    train(cfg, tmp_path / "straight", progress=False)
    restore = _crash_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False)
    restore()
    saved = (tmp_path / "cut" / "config.json").read_bytes()

    assert _cli("-o", tmp_path / "cut", "--resume") == 0, capsys.readouterr().err
    assert (tmp_path / "cut" / "config.json").read_bytes() == saved
    a = load_checkpoint(tmp_path / "straight" / "model.safetensors")
    b = load_checkpoint(tmp_path / "cut" / "model.safetensors")
    assert b.metadata["train_config"]["prune"]["sparsity"] == 0.5
    assert abs(b.metadata["pruning"]["report"]["sparsity"] - 0.5) < 0.01
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


@pytest.fixture
def cut_run(tmp_path, image_folder, monkeypatch):
    """A run stopped after step 5 (state.pt at step 4), and an uninterrupted twin."""
    cfg = _config(image_folder)
    train(cfg, tmp_path / "straight", progress=False)
    restore = _crash_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False)
    restore()
    return tmp_path / "cut"


def test_resume_with_a_conflicting_config_is_a_one_line_error(cut_run, image_folder, tmp_path, capsys):
    saved = (cut_run / "config.json").read_bytes()
    assert _cli("-o", cut_run, "--resume", "--set", "train.lr=0.1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "train.lr (saved 0.0002, given 0.1)" in err and "config.json" in err

    toml = tmp_path / "other.toml"  # a -c that differs from the saved config, in several keys
    toml.write_text(f"[data]\ntrain = ['{image_folder}']\n[train]\niterations = 6\n")
    assert _cli("-c", toml, "-o", cut_run, "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.n_feats" in err and "train.batch_size" in err
    with pytest.raises(ConfigError, match="train.lr"):  # the library checks it too
        train(_config(image_folder, "train.lr=0.1"), cut_run, resume=True, progress=False)
    assert (cut_run / "config.json").read_bytes() == saved


def test_resume_accepts_the_same_values_and_a_new_thread_count(cut_run, tmp_path, capsys):
    assert _cli("-o", cut_run, "--resume", "--set", "train.iterations=6", "--set", "train.threads=1") == 0, \
        capsys.readouterr().err
    a = load_checkpoint(tmp_path / "straight" / "model.safetensors").state_dict
    b = load_checkpoint(cut_run / "model.safetensors").state_dict
    # Another thread count changes the order of oneDNN's sums, so only rounding may differ (a resume
    # from the wrong state or with another config would differ by far more).
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


def test_resume_drops_the_log_records_of_the_lost_steps(cut_run, tmp_path):
    with open(cut_run / "log.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # and a torn last line, as a kill during a write could leave
    result = train(None, cut_run, resume=True, progress=False)
    assert result.steps == 2
    records = _records(cut_run)  # every line parses
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "val" in r] == [3, 6]
    resume = [r["resume"] for r in records if "resume" in r]
    assert resume == [{"from_step": 4, "dropped_records": 1, "state_checksum": "verified"}]
    straight = _records(tmp_path / "straight")
    assert [r["loss"] for r in records if "loss" in r] == [r["loss"] for r in straight if "loss" in r]


def test_a_fresh_start_replaces_an_earlier_log_and_state(tmp_path, image_folder, monkeypatch):
    cfg = _config(image_folder, "train.iterations=3")
    train(cfg, tmp_path / "run", progress=False)
    restore = _crash_at(monkeypatch, 1)  # cut before the first save of the second start
    with pytest.raises(KeyboardInterrupt):
        train(_config(image_folder, "train.iterations=4"), tmp_path / "run", progress=False)
    restore()
    assert [r["step"] for r in _records(tmp_path / "run") if "loss" in r] == [1]
    assert not (tmp_path / "run" / "state.pt").exists()  # the first start's state belongs to another config


def test_config_json_is_written_atomically(tmp_path, image_folder, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")

    def killed_before_rename(src, dst):
        raise OSError(5, "simulated crash before the rename")

    monkeypatch.setattr(os, "replace", killed_before_rename)
    with pytest.raises(OSError):
        train(_config(image_folder), run, progress=False)
    assert (run / "config.json").read_text() == "{}"  # never a half-written file
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]  # no temporary files left


def test_log_records_are_single_writes_and_readers_skip_a_torn_last_line(tmp_path, monkeypatch):
    from sparsesr.errors import TrainingError
    from sparsesr.train import read_log
    from sparsesr.train.runlog import append_record

    writes = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(bytes(data)) or real_write(fd, data))
    log = tmp_path / "log.jsonl"
    append_record(log, {"step": 1, "loss": 0.5})
    append_record(log, {"step": 2, "val": {"psnr": 30.0}})
    assert writes == [b'{"step": 1, "loss": 0.5}\n', b'{"step": 2, "val": {"psnr": 30.0}}\n']
    with open(log, "ab") as f:
        f.write(b'{"step": 3, "lo')
    assert read_log(log) == [{"step": 1, "loss": 0.5}, {"step": 2, "val": {"psnr": 30.0}}]
    log.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(TrainingError, match="log.jsonl: line 2 is not a JSON record"):
        read_log(log)
    assert read_log(tmp_path / "missing.jsonl") == []


def test_state_written_before_checksums_still_resumes(cut_run, tmp_path):
    # The previous release wrote state.pt as a plain torch.save of the state dict, config.json
    # without a final newline, and log lines with a buffered write: such a run must resume.
    from sparsesr.train.state import load_train_state

    state, verified = load_train_state(cut_run / "state.pt")
    assert verified
    torch.save(state, cut_run / "state.pt")
    (cut_run / "config.json").write_text(json.dumps(json.loads((cut_run / "config.json").read_text()), indent=2))
    assert load_train_state(cut_run / "state.pt")[1] is False
    assert _cli("-o", cut_run, "--resume") == 0
    a = load_checkpoint(tmp_path / "straight" / "model.safetensors").state_dict
    b = load_checkpoint(cut_run / "model.safetensors").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    (note,) = [r["resume"] for r in _records(cut_run) if "resume" in r]
    assert note["from_step"] == 4 and note["state_checksum"].startswith("none (state.pt was written by an older")
    assert load_train_state(cut_run / "state.pt")[1] is True  # saved again with a checksum


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, image_folder):
    run = tmp_path_factory.mktemp("finished") / "run"
    train(_config(image_folder, "train.iterations=2"), run, progress=False)
    return run


def _corrupt(case, path):
    from sparsesr.train.state import load_train_state

    data = path.read_bytes()
    if case == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif case == "bit_flip":
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(flipped))
    elif case == "header":
        path.write_bytes(data.replace(b"sha256=", b"sha265=", 1))
    else:  # a readable file (old format, no checksum) whose content is wrong
        state, _ = load_train_state(path)
        if case == "structure":
            state = {"weights": state["model"]}
        elif case == "negative_step":
            state["step"] = -3
        elif case == "step_is_text":
            state["step"] = "2"
        elif case == "nan_weights":
            state["model"]["head.0.weight"][0, 0, 0, 0] = float("nan")
        elif case == "inf_optimizer":
            next(iter(state["optimizer"]["state"].values()))["exp_avg"].fill_(float("inf"))
        elif case == "wrong_shape":
            state["model"]["head.0.weight"] = torch.zeros(3, 3, 3, 3)
        elif case == "schedule":
            state["scheduler"]["last_epoch"] = 7
        torch.save(state, path)


CORRUPTIONS = ["truncated", "empty", "random", "bit_flip", "header", "structure", "negative_step", "step_is_text",
               "nan_weights", "inf_optimizer", "wrong_shape", "schedule"]


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_a_corrupt_state_is_one_clear_error(case, finished_run, tmp_path, capsys):
    from sparsesr.errors import CheckpointError

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    _corrupt(case, run / "state.pt")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(CheckpointError, match=r"state\.pt: ") as err:
        train(None, run, resume=True, progress=False)
    assert "\n" not in str(err.value)
    assert _cli("-o", run, "--resume") == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("sparsesr train: error: ") and str(run / "state.pt") in stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing was touched


def test_a_corrupt_state_from_the_real_command_line(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    _corrupt("truncated", run / "state.pt")
    proc = subprocess.run([sys.executable, "-m", "sparsesr", "train", "-q", "-o", str(run), "--resume"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"{run / 'state.pt'}: checksum mismatch" in proc.stderr


def _poison_weights_at(monkeypatch, bad_step):
    real_step = torch.optim.Adam.step
    calls = []

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == bad_step:
            with torch.no_grad():
                self.param_groups[0]["params"][3].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)


@pytest.mark.parametrize("what", ["weights", "loss"])
def test_training_stops_when_it_diverges_and_saves_no_nan(what, tmp_path, image_folder, monkeypatch):
    from sparsesr.errors import TrainingError
    from sparsesr.train.state import load_train_state

    if what == "weights":
        _poison_weights_at(monkeypatch, 3)
        expected = "training diverged at step 3: weight .* is not finite"
    else:
        real_batch = train_loop._batch

        def nan_batch(dataset, step, *args):
            lr, hr = real_batch(dataset, step, *args)
            return (lr * float("nan"), hr) if step == 2 else (lr, hr)

        monkeypatch.setattr(train_loop, "_batch", nan_batch)
        expected = "training diverged at step 3: the loss is nan"
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=expected + r".*state\.pt holds step 2"):
        train(_config(image_folder), run, progress=False)
    state, _ = load_train_state(run / "state.pt")  # finite, or it would not load
    assert state["step"] == 2
    assert not (run / "model.safetensors").exists()
    for name in ("last.safetensors", "best.safetensors"):
        if (run / name).exists():
            assert all(torch.isfinite(v).all() for v in load_checkpoint(run / name).state_dict.values())


def test_save_checkpoint_refuses_non_finite_weights_and_records_a_digest(tmp_path):
    from sparsesr.errors import CheckpointError
    from sparsesr.models import build_model
    from sparsesr.models.checkpoint import save_checkpoint, weights_sha256

    model = build_model("edsr-cpu", 2, n_resblocks=1, n_feats=8)
    save_checkpoint(tmp_path / "ok.safetensors", model, {"weights_sha256": "copied from elsewhere"})
    ckpt = load_checkpoint(tmp_path / "ok.safetensors")
    assert ckpt.metadata["weights_sha256"] == weights_sha256(ckpt.state_dict) == weights_sha256(model.state_dict())
    with torch.no_grad():
        model.head[0].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: refusing to save non-finite weights \(head\.0\.weight"):
        save_checkpoint(tmp_path / "bad.safetensors", model)
    assert not (tmp_path / "bad.safetensors").exists()
