import pytest
import torch

from sparsesr.errors import ConfigError
from sparsesr.models import build_model, list_archs, preset_config
from sparsesr.models.edsr import EDSRConfig


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_output_shape_and_range(scale):
    model = build_model("edsr-cpu", scale, n_resblocks=2, n_feats=8).eval()
    x = torch.rand(2, 3, 7, 5)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 3, 7 * scale, 5 * scale)
    # Freshly initialised, the network's residual output is small: the image stays near the mean
    # colour, inside [0, 1] up to a margin, and finite everywhere.
    assert torch.isfinite(y).all()
    assert -0.5 < y.min() and y.max() < 1.5, (y.min(), y.max())


@pytest.mark.parametrize("rgb_range", [1.0, 255.0])
def test_zero_network_outputs_the_dataset_mean(rgb_range):
    """With every conv zeroed only the mean shifts act: the output is the DIV2K mean colour in
    [0, 1] whatever the input, so the shifts and the rgb_range scaling undo each other exactly."""
    from sparsesr.models.edsr import DIV2K_RGB_MEAN

    model = build_model("edsr-cpu", 2, n_resblocks=1, n_feats=4, rgb_range=rgb_range).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.zero_()
                module.bias.zero_()
        y = model(torch.rand(1, 3, 5, 6))
    want = torch.tensor(DIV2K_RGB_MEAN).view(1, 3, 1, 1).expand_as(y)
    torch.testing.assert_close(y, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "arch, scale, params",
    # EDSR paper / EDSR-PyTorch parameter counts: baseline 1.37M (x2) and 1.52M (x4), EDSR 40.7M (x2).
    [("edsr-baseline", 2, 1_369_859), ("edsr-baseline", 4, 1_517_571), ("edsr", 2, 40_729_603)],
)
def test_presets_match_published_sizes(arch, scale, params):
    model = build_model(arch, scale)
    assert sum(p.numel() for p in model.parameters()) == params


def test_official_key_names():
    keys = set(build_model("edsr-baseline", 4).state_dict())
    for key in ["sub_mean.weight", "head.0.weight", "body.0.body.0.weight", "body.15.body.2.bias",
                "body.16.weight", "tail.0.0.weight", "tail.0.2.weight", "tail.1.weight", "add_mean.bias"]:
        assert key in keys


def test_mean_shift_round_trip():
    model = build_model("edsr-cpu", 2)
    x = torch.rand(1, 3, 4, 4) * 255
    assert torch.allclose(model.add_mean(model.sub_mean(x)), x, atol=1e-4)


def test_unknown_preset_and_scale():
    with pytest.raises(ConfigError, match="unknown model preset"):
        build_model("srgan", 2)
    with pytest.raises(ConfigError, match="scale"):
        build_model("edsr-cpu", 5)
    with pytest.raises(ConfigError, match="unknown EDSR config keys"):
        EDSRConfig.from_dict({"n_feats": 8, "width": 3})


def test_registry_lists_presets():
    assert {"edsr", "edsr-baseline", "edsr-cpu"} <= set(list_archs())
    assert preset_config("edsr", 3).res_scale == 0.1
