"""Training, pruning and scale transfer for the non-EDSR families, on tiny models and images."""

import pytest
import torch

from sparsesr.errors import ConfigError
from sparsesr.models import build_model, preset_config
from sparsesr.models.checkpoint import load_checkpoint, load_model, save_checkpoint
from sparsesr.pruning import find_prunable, sparsity_report
from sparsesr.train import load_config, train
from sparsesr.train import loop as train_loop

from conftest import write_smooth_images
from native_keys import old_esrgan

# Tiny versions of each family's preset (a few thousand weights).
TINY = {
    "srvgg-cpu": ["model.n_feats=8", "model.num_conv=2"],
    "msrresnet": ["model.n_feats=8", "model.num_block=1"],
    "rrdbnet": ["model.n_feats=8", "model.num_block=1", "model.num_grow_ch=4"],
}
TINY_SIZES = {arch: {o.split("=")[0].removeprefix("model."): int(o.split("=")[1]) for o in opts}
              for arch, opts in TINY.items()}


pytestmark = pytest.mark.usefixtures("seeded_one_thread")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_smooth_images(tmp_path_factory.mktemp("images"), [(32 + 4 * i, 32) for i in range(4)], small=(5, 6))


def _config(folder, arch, *extra):
    return load_config(None, [
        f"model.arch={arch}", *TINY[arch], f"data.train=['{folder}']", "data.holdout=1", "data.patch_size=8",
        "train.iterations=4", "train.batch_size=2", "train.val_every=4", "train.save_every=4", "train.log_every=1",
        *extra,
    ])


def _tiny_model(arch, scale):
    return build_model(arch, scale, **TINY_SIZES[arch])


def _prunable_sparsity(model):
    return sparsity_report(model)["sparsity"]  # over find_prunable's convs


# --- DUP training ends in a checkpoint of the family that load and export accept ---------------

@pytest.mark.parametrize("arch, family", [("srvgg-cpu", "srvgg"), ("msrresnet", "msrresnet")])
def test_dup_training_of_a_family(arch, family, tmp_path, image_folder):
    from sparsesr.format import export, read_file

    dup = ("prune.method=dup", "prune.sparsity=0.9", "prune.end_step=3", "prune.update_every=1")
    result = train(_config(image_folder, arch, *dup), tmp_path / "run", progress=False)
    assert result.val_psnr is not None
    ckpt = load_checkpoint(result.model_path)
    assert ckpt.family == family and ckpt.metadata["family"] == family
    assert ckpt.arch == f"{family}-custom" and ckpt.config.n_feats == 8
    model = load_model(result.model_path)
    assert _prunable_sparsity(model) == pytest.approx(0.9, abs=0.01)
    assert ckpt.metadata["pruning"]["report"]["sparsity"] == pytest.approx(0.9, abs=0.01)

    export(result.model_path, tmp_path / "model.sparsesr.safetensors")
    exported = read_file(tmp_path / "model.sparsesr.safetensors")
    assert exported.family == family and exported.config == ckpt.config
    import sparsesr

    net = sparsesr.load(tmp_path / "model.sparsesr.safetensors", device="cpu")
    assert net.family == family
    with torch.no_grad():
        x = torch.rand(1, 3, 8, 8)
        torch.testing.assert_close(net(x), model(x), atol=1e-4, rtol=1e-4)


# --- `sparsesr prune` on checkpoints in their native key layouts -------------------------------

@pytest.mark.parametrize("arch, scale, layout", [
    ("srvgg-cpu", 4, "params"),         # Real-ESRGAN's realesr-*v3 files: {"params": state dict}
    ("rrdbnet", 4, "esrgan"),           # the original ESRGAN names (RRDB_trunk, trunk_conv, HRconv)
    ("rrdbnet", 2, "params_ema"),       # Real-ESRGAN's RealESRGAN_x2plus: BasicSR names, params_ema
])
def test_prune_command_on_native_checkpoints(arch, scale, layout, tmp_path, capsys):
    from sparsesr.cli import main

    model = _tiny_model(arch, scale)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    native = {"params": {"params": state}, "params_ema": {"params_ema": state}, "esrgan": old_esrgan(state)}[layout]
    torch.save(native, tmp_path / "native.pth")

    assert main(["prune", str(tmp_path / "native.pth"), "--sparsity", "0.9", "-o", str(tmp_path / "pruned.safetensors")]) == 0
    assert "pruned to 0.9" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "pruned.safetensors")
    assert ckpt.family == arch.split("-")[0] and ckpt.metadata["family"] == ckpt.family
    assert ckpt.config == model.config
    pruned = load_model(tmp_path / "pruned.safetensors")
    assert _prunable_sparsity(pruned) == pytest.approx(0.9, abs=0.005)
    prunable = {f"{name}.weight" for name, _ in find_prunable(pruned)}
    dense = [k for k, v in pruned.state_dict().items() if v.dim() == 4 and k not in prunable]
    assert len(dense) == 2  # the convs that read the image and write the output stay as they were
    assert all(torch.equal(pruned.state_dict()[k], state[k]) for k in dense)


# --- init_other_scale: x4 from x2 keeps all but the scale-dependent tensors --------------------

@pytest.mark.parametrize("arch, fresh", [
    ("srvgg-cpu", {"body.6.weight", "body.6.bias"}),  # the last conv (n_colors * scale^2 outputs)
    ("msrresnet", {"upconv1.weight", "upconv1.bias", "upconv2.weight", "upconv2.bias"}),  # the upsampler
    ("rrdbnet", {"conv_first.weight", "conv_first.bias"}),  # reads the pixel-unshuffled input at x2
])
def test_init_other_scale_for_other_families(arch, fresh, tmp_path, image_folder):
    parent_model = _tiny_model(arch, 2)
    save_checkpoint(tmp_path / "x2.safetensors", parent_model)
    parent = parent_model.state_dict()
    cfg = _config(image_folder, arch, "model.scale=4", f"model.init={tmp_path / 'x2.safetensors'}",
                  "model.init_other_scale=true")
    model, meta = train_loop._initial_model(cfg)
    start = model.state_dict()
    assert model.config == preset_config(arch, 4, **TINY_SIZES[arch])
    assert set(meta["init"]["fresh"]) == fresh and meta["init"]["transferred_from_scale"] == 2
    for key, value in start.items():
        if key not in fresh:
            assert torch.equal(value, parent[key]), key
    assert all(key not in parent or not torch.equal(start[key], parent[key]) for key in fresh)

    if arch == "srvgg-cpu":  # and it trains on from there
        result = train(cfg, tmp_path / "x4", progress=False)
        ckpt = load_checkpoint(result.model_path)
        assert ckpt.config.scale == 4 and ckpt.metadata["init"]["transferred_from_scale"] == 2


# --- what a family cannot do is one line ------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["model.arch=rrdbnet", "model.scale=3"], r"model.arch 'rrdbnet' at model.scale 3: RRDBNet scale must be one of \(2, 4\)"),
    (["model.arch=srvgg-cpu", "model.n_resblocks=2"], r"model.n_resblocks: not a size of 'srvgg-cpu' \(srvgg family\); "
                                                      r"its sizes are n_feats, num_conv"),
    (["model.arch=edsr-cpu", "model.num_block=2"], "model.num_block: not a size of 'edsr-cpu'"),
    (["model.arch=msrresnet", "model.num_block=0"], "model.num_block: must be >= 1, got 0"),
])
def test_family_limits_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_init_of_another_family_than_the_arch_is_refused(tmp_path, image_folder):
    save_checkpoint(tmp_path / "srvgg.safetensors", _tiny_model("srvgg-cpu", 2))
    cfg = _config(image_folder, "msrresnet", f"model.init={tmp_path / 'srvgg.safetensors'}")
    with pytest.raises(ConfigError, match="is a srvgg checkpoint, but model.arch 'msrresnet' is msrresnet"):
        train_loop._initial_model(cfg)


def test_size_overrides_of_other_families_stay_out_of_config_json():
    # a run that does not use them writes the config.json it wrote before they existed
    assert set(load_config(None).to_dict()["model"]) == {"arch", "scale", "init", "init_other_scale", "n_resblocks", "n_feats"}
    assert load_config(None, ["model.arch=srvgg-cpu", "model.num_conv=3"]).to_dict()["model"]["num_conv"] == 3


# --- the convs kept dense are the image's, in every family --------------------------------------

@pytest.mark.parametrize("arch", ["edsr-cpu", "msrresnet", "rrdbnet", "srvgg-cpu"])
@pytest.mark.parametrize("scale", [2, 4])
def test_prunable_convs_match_the_sparse_eligible_layers_of_the_format(arch, scale):
    from sparsesr.format.spec import conv_layer_names, sparse_eligible

    sizes = TINY_SIZES.get(arch, {"n_resblocks": 1, "n_feats": 8})
    model = build_model(arch, scale, **sizes)
    names = [name for name, _ in find_prunable(model)]
    # the export stores all convs but the first and last registered dense; the same convs, found
    # here by running the model, are the ones pruning leaves alone
    assert names == sparse_eligible(conv_layer_names(model))
