"""Every architecture family loads from its native key layout (issue #14): .pth, BasicSR's
params_ema wrapping and safetensors without metadata; sparsesr checkpoints and exports record it."""
import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton fixes interpreter-or-not at its first import (per process): before anything imports it.
    os.environ.setdefault("TRITON_INTERPRET", "1")
from safetensors.torch import save as save_tensors

from sparsesr.errors import CheckpointError
from sparsesr.format import export_bytes, parse_bytes
from sparsesr.models import build_model, detect_family, get_family, list_families
from sparsesr.models.checkpoint import load_checkpoint, load_model, save_checkpoint
from sparsesr.models.edsr import DIV2K_RGB_MEAN
from sparsesr.models.rrdbnet import ESRGAN_RENAMES

from native_keys import basicsr_edsr, old_esrgan

REPO = Path(__file__).resolve().parents[1]


# name -> (preset, scale, overrides, family, native renaming)
CASES = {
    "edsr-pytorch": ("edsr-cpu", 2, {"n_resblocks": 2, "n_feats": 8}, "edsr", None),
    "edsr-basicsr-x4": ("edsr-cpu", 4, {"n_resblocks": 2, "n_feats": 8}, "edsr", lambda sd: basicsr_edsr(sd, 2)),
    "edsr-basicsr-x3": ("edsr-cpu", 3, {"n_resblocks": 3, "n_feats": 8}, "edsr", lambda sd: basicsr_edsr(sd, 3)),
    "msrresnet-x4": ("msrresnet", 4, {"num_block": 2, "n_feats": 8}, "msrresnet", None),
    "msrresnet-x3": ("msrresnet", 3, {"num_block": 2, "n_feats": 8}, "msrresnet", None),
    "msrresnet-x2": ("msrresnet", 2, {"num_block": 2, "n_feats": 8}, "msrresnet", None),
    "rrdbnet-x4": ("rrdbnet", 4, {"num_block": 2, "n_feats": 8, "num_grow_ch": 4}, "rrdbnet", None),
    "rrdbnet-x2": ("rrdbnet", 2, {"num_block": 2, "n_feats": 8, "num_grow_ch": 4}, "rrdbnet", None),
    "esrgan-old-names": ("rrdbnet", 4, {"num_block": 2, "n_feats": 8, "num_grow_ch": 4}, "rrdbnet", old_esrgan),
    "srvgg-prelu": ("srvgg-cpu", 4, {"num_conv": 3, "n_feats": 8}, "srvgg", None),
    "srvgg-relu-x2": ("srvgg-cpu", 2, {"num_conv": 2, "n_feats": 8, "act_type": "relu"}, "srvgg", None),
}


def _reference(case):
    preset, scale, overrides, family, to_native = CASES[case]
    torch.manual_seed(0)
    model = build_model(preset, scale, **overrides).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or p.dim() == 1:  # PReLU weights and biases: not the defaults
                p.uniform_(-0.2, 0.3)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    return model, (to_native or dict)(sd)


def _write(tmp_path, native, how):
    if how == "safetensors":
        path = tmp_path / "native.safetensors"
        path.write_bytes(save_tensors({k: v.contiguous() for k, v in native.items()}))
    else:  # "pth", "params_ema", or another of the suffixes torch files come with (README)
        path = tmp_path / (f"native.{how}" if how in ("pt", "ckpt", "bin") else "native.pth")
        torch.save({"params_ema": native, "params": {}} if how == "params_ema" else native, path)
    return path


def _output(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("how", ["pth", "params_ema", "safetensors", "pt", "ckpt", "bin"])
@pytest.mark.parametrize("case", list(CASES))
def test_native_layouts_load_and_run_like_the_native_module(tmp_path, case, how):
    model, native = _reference(case)
    path = _write(tmp_path, native, how)
    ckpt = load_checkpoint(path)
    assert ckpt.family == CASES[case][3] and ckpt.config == model.config
    assert get_family(ckpt.family).config_type is type(ckpt.config)
    x = torch.rand(1, 3, 5, 7)
    loaded = load_model(path)
    assert loaded.scale == model.scale and loaded.config.n_colors == 3
    assert torch.equal(_output(loaded, x), _output(model, x))


def test_basicsr_edsr_matches_basicsrs_forward(tmp_path):
    """BasicSR's EDSR computes (x - mean) * 255 ... / 255 + mean with its mean outside the state
    dict; the mapped network (mean-shift buffers filled in) gives the same image."""
    import torch.nn.functional as F

    model, native = _reference("edsr-basicsr-x4")
    x = torch.rand(1, 3, 5, 6)
    mean = torch.tensor(DIV2K_RGB_MEAN).view(1, 3, 1, 1)

    def conv(t, name):
        return F.conv2d(t, native[f"{name}.weight"], native[f"{name}.bias"], padding=1)

    with torch.no_grad():
        h = conv((x - mean) * 255.0, "conv_first")
        res = h
        for i in range(2):
            res = res + conv(F.relu(conv(res, f"body.{i}.conv1")), f"body.{i}.conv2")
        y = conv(res, "conv_after_body") + h
        for i in (0, 2):
            y = F.pixel_shuffle(conv(y, f"upsample.{i}"), 2)
        expected = conv(y, "conv_last") / 255.0 + mean
    torch.save({"params": native}, tmp_path / "edsr.pth")
    assert torch.allclose(_output(load_model(tmp_path / "edsr.pth"), x), expected, atol=1e-5)


@pytest.mark.parametrize("case", ["edsr-basicsr-x4", "msrresnet-x4", "rrdbnet-x2", "srvgg-prelu"])
def test_wrong_inputs_give_one_clear_error(tmp_path, case):
    _, native = _reference(case)
    key = sorted(k for k in native if k.endswith(".bias"))[-1]
    broken = {k: v for k, v in native.items() if k != key}
    torch.save(broken, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing\.pth: .*missing keys") as err:
        load_checkpoint(tmp_path / "missing.pth")
    assert "\n" not in str(err.value)
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "other.pth")
    message = str(err.value)
    assert "no known architecture" in message and "\n" not in message
    assert all(name in message for name in ("EDSR", "MSRResNet", "RRDBNet", "SRVGGNetCompact"))


def test_detect_family_names_every_family():
    assert list_families() == ["edsr", "msrresnet", "rrdbnet", "srvgg"]
    _, native = _reference("rrdbnet-x4")
    family, config, _ = detect_family(native, "x")
    assert family.name == "rrdbnet" and config.num_grow_ch == 4


def test_esrgan_renames_cover_every_old_key():
    _, native = _reference("esrgan-old-names")
    assert any(k.startswith("RRDB_trunk.") for k in native)
    family, _, renamed = detect_family(native, "x")
    assert set(renamed) == set(_reference("rrdbnet-x4")[0].state_dict())
    assert ESRGAN_RENAMES


@pytest.mark.parametrize("case", ["edsr-basicsr-x4", "msrresnet-x2", "rrdbnet-x2", "srvgg-prelu"])
def test_sparsesr_checkpoints_and_exports_record_the_family(tmp_path, case):
    model, native = _reference(case)
    family = CASES[case][3]
    save_checkpoint(tmp_path / "c.safetensors", model)
    ckpt = load_checkpoint(tmp_path / "c.safetensors")
    assert ckpt.family == family and ckpt.metadata["family"] == family and ckpt.config == model.config
    torch.save({"params_ema": native}, tmp_path / "n.pth")
    for source in (tmp_path / "c.safetensors", tmp_path / "n.pth"):
        model_file = parse_bytes(export_bytes(source, dtype="fp16"))
        assert model_file.family == family and model_file.config == model.config
        assert model_file.summary()["family"] == family
        dense = model_file.dense_state_dict()
        want = model.state_dict()
        assert set(dense) == set(want)
        for key, value in want.items():
            stored = value.half().float() if key.removesuffix(".weight") in model_file.layers else value
            assert torch.equal(dense[key], stored), key


def test_a_checkpoint_without_family_is_edsr(tmp_path):
    model, _ = _reference("edsr-pytorch")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "sparsesr-checkpoint", "arch": "edsr-custom", "config": model.config.to_dict()}
    (tmp_path / "old.safetensors").write_bytes(save_tensors(sd, metadata={k: json.dumps(v) for k, v in meta.items()}))
    ckpt = load_checkpoint(tmp_path / "old.safetensors")
    assert ckpt.family == "edsr" and ckpt.config == model.config
    x = torch.rand(1, 3, 4, 4)
    assert torch.equal(_output(load_model(tmp_path / "old.safetensors"), x), _output(model, x))


def test_an_unknown_family_is_refused(tmp_path):
    model, _ = _reference("srvgg-prelu")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {"family": "swinir", "config": model.config.to_dict()}
    (tmp_path / "x.safetensors").write_bytes(save_tensors(sd, metadata={k: json.dumps(v) for k, v in meta.items()}))
    with pytest.raises(CheckpointError, match="unknown architecture family 'swinir'; expected one of edsr, msrresnet"):
        load_checkpoint(tmp_path / "x.safetensors")


def test_committed_checkpoints_still_load_as_edsr():
    paths = sorted((REPO / "checkpoints").glob("*.safetensors"))
    if not paths:
        pytest.skip("no committed checkpoints")
    without_family = 0
    for path in paths:
        ckpt = load_checkpoint(path)  # verifies the recorded weights_sha256
        assert ckpt.family == "edsr"
        without_family += "family" not in ckpt.metadata
    assert without_family, "no committed checkpoint from before files recorded their family is left to test"


def test_weights_sha256_of_odd_strided_and_zero_dim_tensors():
    from sparsesr.models.checkpoint import weights_sha256

    base = torch.arange(12, dtype=torch.float32)
    odd = base[3:4].as_strided((1,), (5,))
    view = base.view(3, 4).t()
    assert weights_sha256({"a": odd, "b": torch.tensor(2.0), "c": view}) == \
        weights_sha256({"a": odd.clone(), "b": torch.tensor(2.0).clone(), "c": view.contiguous()})


def test_int64_buffers_of_the_module_are_allowed():
    from sparsesr.format import spec
    from sparsesr.models.checkpoint import check_state_dict

    model, _ = _reference("srvgg-prelu")
    sd = dict(model.state_dict())
    check_state_dict(model.config, sd)
    # a counter the module has as int64 is accepted with that dtype, refused as another
    dtypes = spec.expected_dtypes(model.config)
    assert all(d == torch.float32 for d in dtypes.values())
    sd[next(iter(sd))] = sd[next(iter(sd))].long()
    with pytest.raises(CheckpointError, match="expected dense floating point"):
        check_state_dict(model.config, sd)


def test_info_names_the_family_and_config(tmp_path):
    from sparsesr.format import export
    from sparsesr.inspect import describe_model_file

    model, native = _reference("rrdbnet-x2")
    torch.save({"params_ema": native}, tmp_path / "RealESRGAN_x2plus.pth")
    info = describe_model_file(tmp_path / "RealESRGAN_x2plus.pth")
    assert info["family"] == "rrdbnet" and info["config"] == model.config.to_dict()
    assert info["model"].startswith("rrdbnet (RRDBNet, custom) x2: n_feats 8, num_block 2, num_grow_ch 4")
    assert [r["pruned"] for r in info["layers"]][0] is False and info["layers"][0]["name"] == "conv_first"
    export(tmp_path / "RealESRGAN_x2plus.pth", tmp_path / "e.safetensors")
    info = describe_model_file(tmp_path / "e.safetensors")
    assert info["family"] == "rrdbnet" and info["layers"][-1]["name"] == "conv_last"


@pytest.mark.parametrize("family, config, fragment", [
    ("srvgg", {"num_conv": 100000}, "num_conv must be an integer in 1..256"),
    ("srvgg", {"act_type": "gelu"}, "act_type must be one of prelu, relu, leakyrelu"),
    ("rrdbnet", {"scale": 3}, "scale must be one of 2, 4"),
    ("rrdbnet", {"n_feats": 2048, "num_block": 256, "num_grow_ch": 2048}, "parameters, more than"),
    ("msrresnet", {"n_resblocks": 4}, "unknown config keys ['n_resblocks']"),
    ("msrresnet", {"n_colors": 5}, "n_colors must be an integer in 1..4"),
])
def test_family_configs_are_checked_before_building(tmp_path, family, config, fragment):
    meta = {"family": family, "config": config}
    path = tmp_path / "h.safetensors"
    path.write_bytes(save_tensors({"x": torch.zeros(1)}, metadata={k: json.dumps(v) for k, v in meta.items()}))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "bad config in metadata" in str(err.value) and fragment in str(err.value)


def test_an_exported_file_of_an_unknown_family_is_refused():
    import struct

    from safetensors.torch import load as load_tensors

    from sparsesr.errors import SparseFormatError
    from sparsesr.format.reader import _Validator
    from sparsesr.models.checkpoint import Checkpoint

    model, _ = _reference("srvgg-prelu")
    data = export_bytes(Checkpoint(dict(model.state_dict()), "srvgg-custom", model.config))
    model_file = parse_bytes(data)
    assert model_file.family == "srvgg" and model_file.to_checkpoint().family == "srvgg"

    n = struct.unpack("<Q", data[:8])[0]
    metadata = json.loads(data[8:8 + n])["__metadata__"]
    with pytest.raises(SparseFormatError, match="bad metadata family: unknown architecture family 'swinir'"):
        _Validator({**metadata, "family": "swinir"}, load_tensors(data), "f").run(len(data))
    with pytest.raises(SparseFormatError, match="bad metadata config"):  # an srvgg config read as EDSR
        _Validator({k: v for k, v in metadata.items() if k != "family"}, load_tensors(data), "f").run(len(data))


def test_the_runtime_runs_other_families(tmp_path):
    from sparsesr.runtime import SparseModel, load

    model, native = _reference("srvgg-prelu")
    torch.save({"params_ema": native}, tmp_path / "v.pth")
    sparse = load(tmp_path / "v.pth", device="cpu", backend="dense")
    assert isinstance(sparse, SparseModel) and sparse.family == "srvgg"
    x = torch.rand(1, 3, 5, 7)
    assert torch.allclose(_output(sparse, x), _output(model, x), atol=1e-5)


# --- the whole pipeline through the CLI, from each family's native file (issue #14, "Must show") ----

PIPELINE_BACKENDS = ["dense", "cpu", "triton"]


@pytest.mark.parametrize("how", ["pth", "params_ema", "safetensors"])
@pytest.mark.parametrize("case", ["edsr-pytorch", "edsr-basicsr-x4", "msrresnet-x2", "rrdbnet-x4", "rrdbnet-x2",
                                  "esrgan-old-names", "srvgg-prelu"])
def test_native_file_info_prune_export_load_upscale(tmp_path, case, how, capsys, monkeypatch):
    """info names the family; prune 0.9 -> export fp16 -> load runs like the masked dense model on
    every backend here; upscale writes an image of the model's scale."""
    from PIL import Image

    from sparsesr.cli import main
    from sparsesr.runtime import backends, load

    monkeypatch.setenv("SPARSESR_CPU_DISPATCH_CACHE", "0")
    monkeypatch.setenv("SPARSESR_TRITON_AUTOTUNE", "0")
    model, native = _reference(case)
    family, scale = CASES[case][3], model.config.scale
    src = _write(tmp_path, native, how)

    assert main(["info", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == family and info["config"] == model.config.to_dict()

    pruned, exported = tmp_path / "pruned.safetensors", tmp_path / "pruned.sparsesr.safetensors"
    assert main(["prune", str(src), "--sparsity", "0.9", "-o", str(pruned)]) == 0
    assert main(["export", str(pruned), "-o", str(exported), "--dtype", "fp16"]) == 0
    masked = load_model(pruned).eval()  # the pruned checkpoint, run densely by its own module
    prunable = [m.weight for m in masked.modules() if isinstance(m, torch.nn.Conv2d)][1:-1]
    zeros = sum(int((w == 0).sum()) for w in prunable) / sum(w.numel() for w in prunable)
    assert zeros == pytest.approx(0.9, abs=0.01)

    x = torch.rand(1, 3, 6, 7)
    reference = _output(masked, x)
    ran = []
    for backend in PIPELINE_BACKENDS:
        if backend != "dense" and backends.unavailable_reason(backend) is not None:
            continue
        ran.append(backend)
        sparse = load(exported, device="cpu", backend=backend)
        assert sparse.family == family and sparse.scale == scale
        err = float((_output(sparse, x) - reference).norm() / reference.norm())
        assert err < 1e-2, f"{backend}: relative error {err:.2e} (fp16 weights)"
        if backend != "dense":  # the layers stored sparse took that backend's kernel
            assert {r["path"] for r in sparse.backend_report()["layers"] if r["layout"] != "dense"} == {backend}
    assert "cpu" in ran or backends.unavailable_reason("cpu") is not None

    Image.new("RGB", (7, 6), (120, 60, 30)).save(tmp_path / "in.png")
    assert main(["upscale", str(tmp_path / "in.png"), "--model", str(exported), "-o", str(tmp_path / "out.png"), "-q"]) == 0
    assert Image.open(tmp_path / "out.png").size == (7 * scale, 6 * scale)


@pytest.mark.parametrize("size", [(1, 1), (1, 4), (3, 1), (5, 7)])
def test_rrdbnet_x2_takes_any_size_as_real_esrgan_pads_it(tmp_path, size):
    """Odd sizes are reflect-padded to even (a size of 1 repeats its row), the output cropped; the
    sparse runtime, whose trace covers that padding, gives the same."""
    import torch.nn.functional as F

    from sparsesr.runtime import load

    model, native = _reference("rrdbnet-x2")
    h, w = size
    x = torch.rand(1, 3, h, w)
    y = _output(model, x)
    assert y.shape == (1, 3, 2 * h, 2 * w)
    if h > 1 and w > 1:  # what Real-ESRGAN's inference does: F.pad(..., "reflect"), then crop
        padded = F.pad(x, (0, w % 2, 0, h % 2), mode="reflect")
        torch.testing.assert_close(y, _output(model, padded)[..., : 2 * h, : 2 * w])
    torch.save({"params_ema": native}, tmp_path / "x2.pth")
    torch.testing.assert_close(_output(load(tmp_path / "x2.pth", device="cpu", backend="dense"), x), y,
                               atol=1e-5, rtol=1e-5)
