import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_tensors

from sparsesr.cli import main
from sparsesr.errors import CheckpointError, ConfigError
from sparsesr.models import build_model
from sparsesr.models import checkpoint as checkpoint_module
from sparsesr.models.checkpoint import infer_config, load_checkpoint, load_model, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _small(scale=2):
    torch.manual_seed(0)
    return build_model("edsr-cpu", scale, n_resblocks=2, n_feats=8).eval()


def _same_output(a, b):
    x = torch.rand(1, 3, 6, 6)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_safetensors_round_trip_keeps_config_and_metadata(tmp_path):
    model = _small(3)
    save_checkpoint(tmp_path / "m.safetensors", model, {"step": 7, "val": {"psnr": 30.5}})
    ckpt = load_checkpoint(tmp_path / "m.safetensors")
    assert ckpt.config == model.config
    assert ckpt.metadata["step"] == 7 and ckpt.metadata["val"]["psnr"] == 30.5
    assert _same_output(model, load_model(tmp_path / "m.safetensors"))
    assert not list(tmp_path.glob(".*tmp*")), "atomic write left a temporary file"


@pytest.mark.parametrize("wrap", ["plain", "params", "params_ema", "module"])
def test_official_and_basicsr_state_dicts(tmp_path, wrap):
    model = _small(4)
    sd = model.state_dict()
    obj = {
        "plain": sd,
        "params": {"params": sd},
        "params_ema": {"params_ema": sd, "params": {k: torch.zeros_like(v) for k, v in sd.items()}},
        "module": {f"module.{k}": v for k, v in sd.items()},
    }[wrap]
    torch.save(obj, tmp_path / "m.pth")
    loaded = load_model(tmp_path / "m.pth")
    assert loaded.config.scale == 4 and loaded.config.n_resblocks == 2 and loaded.config.n_feats == 8
    assert _same_output(model, loaded)


def test_infer_config_all_scales():
    for scale in (2, 3, 4):
        assert infer_config(_small(scale).state_dict()).scale == scale
    full = {k: v for k, v in build_model("edsr", 2).state_dict().items()}
    assert infer_config(full).res_scale == 0.1


def test_mismatched_keys_are_named(tmp_path):
    sd = _small().state_dict()
    sd.pop("tail.1.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["head.0.bias"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "bad.pt")
    message = str(err.value)
    assert "tail.1.bias" in message and "extra.weight" in message and "head.0.bias" in message


def test_garbage_files(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01garbage")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    for name in ["junk.safetensors", "junk.pt", "missing.pt"]:
        with pytest.raises(CheckpointError, match=name):
            load_checkpoint(tmp_path / name)
    torch.save({"head.0.weight": torch.zeros(3)}, tmp_path / "notedsr.pt")
    with pytest.raises(CheckpointError, match="not an EDSR"):
        load_checkpoint(tmp_path / "notedsr.pt")


def test_written_files_get_normal_permissions(tmp_path):
    import os

    save_checkpoint(tmp_path / "m.safetensors", _small())
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


# --- a checkpoint's config is checked like an exported file's, before anything is built (#15.13) --

def _with_config(path, config, tensors=None):
    """A safetensors file with a raw JSON ``config`` in its metadata (json.dumps writes NaN as NaN)."""
    tensors = tensors or {"head.0.weight": torch.zeros(1, 3, 3, 3)}
    path.write_bytes(save_tensors(tensors, metadata={"config": json.dumps(config)}))
    return path


@pytest.fixture
def nothing_is_built(monkeypatch):
    """Fail the test if a network is built: on the old code the hostile configs below would
    allocate tens of GB or loop for minutes before any error."""
    def refuse(config):
        raise AssertionError(f"a network was built for {config}")

    monkeypatch.setattr(checkpoint_module, "model_from_config", refuse)


HOSTILE_CONFIGS = [
    ({"n_resblocks": 1, "n_feats": 40000, "scale": 2}, "n_feats must be an integer in 1..2048, found 40000"),
    ({"n_resblocks": 200000, "n_feats": 4}, "n_resblocks must be an integer in 1..256"),
    ({"n_resblocks": math.nan}, "n_resblocks must be an integer"),
    ({"n_feats": True}, "n_feats must be an integer"),
    ({"rgb_range": [1, 255]}, "rgb_range must be a number in [1, 65535]"),
    ({"rgb_range": 0}, "rgb_range must be a number in [1, 65535]"),  # #15.20: garbage image, exit 0
    ({"rgb_range": 1e-300}, "rgb_range must be a number in [1, 65535]"),
    ({"rgb_range": -255}, "rgb_range must be a number in [1, 65535]"),
    ({"rgb_range": math.inf}, "rgb_range must be a number"),
    ({"res_scale": "1"}, "res_scale must be a number"),
    ({"scale": 5}, "scale must be one of 2, 3, 4"),
    ({"n_colors": 1}, "n_colors must be 3"),
    ({"n_feats": 8, "n_featz": 8}, "unknown config keys ['n_featz']"),
    ([16, 64], "config must be a JSON object"),
    ({"n_resblocks": 256, "n_feats": 2048}, "parameters, more than"),
]


@pytest.mark.parametrize("config, fragment", HOSTILE_CONFIGS)
def test_hostile_configs_are_refused_before_building(tmp_path, nothing_is_built, config, fragment):
    path = _with_config(tmp_path / "e.safetensors", config)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert str(err.value).startswith(f"{path}: bad config in metadata: ") and fragment in str(err.value)


def test_inferred_architecture_is_bounded_too(tmp_path, nothing_is_built):
    # Without metadata the config comes from the shapes: a wide head alone must not make 4000 channels.
    sd = {"head.0.weight": torch.zeros(4000, 3, 3, 3), "body.0.body.0.weight": torch.zeros(1),
          "tail.0.0.weight": torch.zeros(16000, 1)}
    torch.save(sd, tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match="unsupported architecture .*n_feats must be an integer in 1..2048"):
        load_model(tmp_path / "wide.pt")


def test_config_must_match_the_tensors(tmp_path, nothing_is_built):
    model = _small()  # 2 blocks x 8 channels
    path = _with_config(tmp_path / "m.safetensors", dict(model.config.to_dict(), n_feats=16),
                        {k: v.contiguous() for k, v in model.state_dict().items()})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)  # refused on reading, not only when a network is built
    message = str(err.value)
    assert "head.0.weight expected (16, 3, 3, 3) found (8, 3, 3, 3)" in message
    assert "\n" not in message


def test_weights_must_be_finite_floats(tmp_path):
    sd = {k: v.contiguous() for k, v in _small().state_dict().items()}
    config = _small().config.to_dict()
    _with_config(tmp_path / "nan.safetensors", config, {**sd, "tail.1.bias": torch.full((3,), math.nan)})
    with pytest.raises(CheckpointError, match="'tail.1.bias' holds NaN or infinite values"):
        load_checkpoint(tmp_path / "nan.safetensors")
    _with_config(tmp_path / "int.safetensors", config, {**sd, "tail.1.bias": torch.zeros(3, dtype=torch.int64)})
    with pytest.raises(CheckpointError, match="'tail.1.bias' is a int64"):
        load_checkpoint(tmp_path / "int.safetensors")


def test_upscale_with_a_hostile_checkpoint_is_one_line(tmp_path):
    """The reproduction of #15.13, in a process limited to 4 GB of address space: the old code
    tried to allocate 57.6 GB here."""
    import resource

    path = _with_config(tmp_path / "e.safetensors", {"n_resblocks": 1, "n_feats": 40000, "scale": 2})

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    proc = subprocess.run([sys.executable, "-m", "sparsesr", "upscale", str(REPO / "sparsesr/assets/sample.png"),
                           "--model", str(path), "-o", str(tmp_path / "o.png")],
                          capture_output=True, text=True, timeout=300, preexec_fn=limit_memory)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "n_feats must be an integer in 1..2048" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "o.png").exists()


def test_files_written_by_this_version_still_load():
    """The committed checkpoints (checkpoints/) pass the stricter loader and run."""
    paths = sorted((REPO / "checkpoints").glob("*.safetensors"))
    if not paths:
        pytest.skip("no committed checkpoints")
    for path in paths:
        model = load_model(path)
        with torch.no_grad():
            y = model(torch.rand(1, 3, 6, 6))
        assert y.shape == (1, 3, 6 * model.config.scale, 6 * model.config.scale) and bool(torch.isfinite(y).all())


# --- sparsesr prune: names, outputs and options (#15.5, #15.6, #15.10) ----------------------------


@pytest.fixture
def small_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "c.safetensors", _small())
    return tmp_path / "c.safetensors"


def test_prune_takes_embedded_names_and_a_local_file_wins(tmp_path, small_checkpoint, monkeypatch, capsys):
    assert main(["prune", "x2", "--sparsity", "0.9", "-o", str(tmp_path / "x2-90.safetensors")]) == 0
    pruned = load_checkpoint(tmp_path / "x2-90.safetensors")
    assert pruned.config.n_feats == 64 and pruned.metadata["pruning"]["sparsity"] == 0.9
    assert pruned.metadata["pruning"]["source"]["path"].endswith("edsr-baseline-x2.sparsesr.safetensors")
    monkeypatch.chdir(tmp_path)
    small_checkpoint.rename(tmp_path / "x2")
    assert main(["prune", "x2", "--sparsity", "0.5", "-o", "local.safetensors"]) == 0
    assert load_checkpoint(tmp_path / "local.safetensors").config.n_feats == 8
    capsys.readouterr()
    assert main(["prune", "x9", "--sparsity", "0.5", "-o", "x.safetensors"]) == 2
    assert "x9: no such file, and not an embedded model (x2, x4, fast)" in capsys.readouterr().err


@pytest.mark.parametrize("args, fragment", [
    (["--sparsity", "1.5"], "--sparsity 1.5: expected a fraction in [0, 1)"),
    (["--sparsity", "1"], "--sparsity 1.0: expected a fraction in [0, 1)"),
    (["--sparsity", "-0.1"], "expected a fraction in [0, 1)"),
    (["--sparsity", "nan"], "expected a fraction in [0, 1)"),
    (["--sparsity", "0.5", "--min-density", "1.5"], "--min-density 1.5: expected a fraction in [0, 1]"),
    (["--sparsity", "0.5", "-o", "OUT/"], "ends in a path separator"),
    (["--sparsity", "0.5", "-o", "DIR"], "is a folder"),
])
def test_prune_option_errors_are_one_line(tmp_path, small_checkpoint, capsys, args, fragment):
    (tmp_path / "adir").mkdir()
    args = [str(tmp_path / "adir2") + "/" if a == "OUT/" else str(tmp_path / "adir") if a == "DIR" else a for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "p.safetensors")]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["prune", str(small_checkpoint), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written (no file called adir2)
    assert not list((tmp_path / "adir").iterdir())


def test_prune_refuses_unsupported_granularities_at_parse_time(small_checkpoint, capsys):
    from sparsesr.train.oneshot import GRANULARITIES

    with pytest.raises(SystemExit) as exit_info:
        main(["prune", str(small_checkpoint), "--sparsity", "0.5", "--granularity", "7x5", "-o", "x.safetensors"])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "invalid choice: '7x5'" in last and all(g in last for g in GRANULARITIES)
    choices = {a.dest: a.choices for a in _subparser("prune")._actions}
    assert tuple(choices["granularity"]) == GRANULARITIES
    from sparsesr.train.oneshot import prune_checkpoint

    with pytest.raises(ConfigError, match="--granularity 7x5: expected one of 1x1, 4x1, 8x1, 1x4"):
        prune_checkpoint(small_checkpoint, small_checkpoint.with_name("y.safetensors"), 0.5, granularity="7x5")


def _subparser(name):
    from sparsesr.cli import build_parser

    return build_parser()._subparsers._group_actions[0].choices[name]


def test_a_changed_weight_fails_the_recorded_digest(tmp_path):
    """save_checkpoint records weights_sha256; one changed value in the file is a clear error."""
    model = build_model("edsr-cpu", 2, n_resblocks=1, n_feats=4)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, {"step": 3})
    assert load_checkpoint(path).metadata["weights_sha256"]
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x10  # a bit of the last tensor's data: still a valid float, a different weight
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"m.safetensors: the weights do not match the digest"):
        load_checkpoint(path)


def test_saving_the_same_model_twice_gives_the_same_bytes(tmp_path):
    model = build_model("edsr-cpu", 2, n_resblocks=1, n_feats=4)
    save_checkpoint(tmp_path / "a.safetensors", model, {"step": 3, "note": {"b": 1, "a": 2}})
    save_checkpoint(tmp_path / "b.safetensors", model, {"step": 3, "note": {"b": 1, "a": 2}})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


@pytest.mark.parametrize("wrap", ["state_dict", "model", "state_dict+module"])
def test_other_wrappers_of_edsr_pytorch_keys_load(tmp_path, wrap):
    """README: EDSR-PyTorch key names load as they are, also under `state_dict` / `model` and with
    DDP's `module.` prefix (the `params` / `params_ema` wrappers are tested above)."""
    model = _small(2)
    sd = model.state_dict()
    obj = {
        "state_dict": {"state_dict": sd},
        "model": {"model": sd},
        "state_dict+module": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    }[wrap]
    torch.save(obj, tmp_path / "m.pth")
    assert _same_output(model, load_model(tmp_path / "m.pth"))


def test_incomplete_basicsr_edsr_state_dict_is_one_line(tmp_path):
    """BasicSR's own EDSR names (conv_first, body.N.conv1, ...) load (issue #14, tests/test_families.py);
    one missing its biases is a clear CheckpointError naming the file, not a traceback or a wrong network."""
    f = 8
    sd = {"conv_first.weight": torch.zeros(f, 3, 3, 3), "conv_first.bias": torch.zeros(f),
          "body.0.conv1.weight": torch.zeros(f, f, 3, 3), "body.0.conv2.weight": torch.zeros(f, f, 3, 3),
          "conv_after_body.weight": torch.zeros(f, f, 3, 3), "upsample.0.weight": torch.zeros(4 * f, f, 3, 3),
          "conv_last.weight": torch.zeros(3, f, 3, 3)}
    torch.save({"params": sd}, tmp_path / "basicsr.pth")
    with pytest.raises(CheckpointError, match=r"basicsr\.pth: the tensors do not match .*missing keys") as err:
        load_checkpoint(tmp_path / "basicsr.pth")
    assert "\n" not in str(err.value)
