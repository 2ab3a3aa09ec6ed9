import pytest
import torch

from sparsesr.errors import CheckpointError
from sparsesr.models import build_model
from sparsesr.models.checkpoint import infer_config, load_checkpoint, load_model, save_checkpoint


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
