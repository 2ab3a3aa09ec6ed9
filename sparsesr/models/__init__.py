"""Model architectures and a small registry of presets.

>>> model = build_model("edsr-baseline", scale=2)
>>> model = build_model("srvgg-cpu", scale=4)

Four families (``sparsesr.models.registry``): EDSR, MSRResNet, RRDBNet (ESRGAN / Real-ESRGAN)
and SRVGGNetCompact. Every config has ``scale``, ``n_colors`` and ``n_feats``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from sparsesr.errors import ConfigError
from sparsesr.models.edsr import EDSR, EDSRConfig
from sparsesr.models.msrresnet import MSRResNet, MSRResNetConfig
from sparsesr.models.rrdbnet import RRDBNet, RRDBNetConfig
from sparsesr.models.srvgg import SRVGGConfig, SRVGGNetCompact
from sparsesr.models.registry import Family, detect_family, family_of, get_family, list_families

# name -> default config. One entry per preset; scale is filled in at build time.
PRESETS: dict[str, Any] = {
    # The EDSR paper's baseline: 16 residual blocks x 64 channels (1.37M parameters at x2).
    "edsr-baseline": EDSRConfig(n_resblocks=16, n_feats=64, res_scale=1.0),
    # The full EDSR: 32 x 256 with residual scaling 0.1 for stable training (40.7M at x2).
    "edsr": EDSRConfig(n_resblocks=32, n_feats=256, res_scale=0.1),
    # CPU-trainable: same depth as the baseline (so pruning sees the same 32 body convs and the
    # same layer balance problem) at half the width: ~4x fewer FLOPs, ~0.34M parameters at x2,
    # which trains to well above bicubic in about an hour on 2 CPU cores.
    "edsr-cpu": EDSRConfig(n_resblocks=16, n_feats=32, res_scale=1.0),
    # BasicSR's MSRResNet: 16 blocks x 64 channels (1.5M parameters at x4).
    "msrresnet": MSRResNetConfig(n_feats=64, num_block=16),
    # ESRGAN / Real-ESRGAN (RealESRGAN_x4plus, x2plus): 23 RRDBs x 64 channels, growth 32 (16.7M).
    "rrdbnet": RRDBNetConfig(n_feats=64, num_block=23, num_grow_ch=32),
    # Real-ESRGAN's realesr-general-x4v3: 32 convs x 64 channels, PReLU (1.2M at x4).
    "srvgg": SRVGGConfig(n_feats=64, num_conv=32, act_type="prelu"),
    # CPU-trainable compact net: 8 convs x 32 channels (~0.09M at x4).
    "srvgg-cpu": SRVGGConfig(n_feats=32, num_conv=8, act_type="prelu"),
}


def list_archs() -> list[str]:
    return sorted(PRESETS)


def preset_config(arch: str, scale: int, **overrides) -> Any:
    if arch not in PRESETS:
        raise ConfigError(f"unknown model preset {arch!r}; expected one of {', '.join(list_archs())}")
    try:
        return replace(PRESETS[arch], scale=scale, **overrides)
    except TypeError as exc:
        raise ConfigError(f"bad override for preset {arch!r}: {exc}") from None


def build_model(arch: str, scale: int, **overrides) -> nn.Module:
    """Build a preset (see ``list_archs()``) at the given scale; ``overrides`` change config fields."""
    return model_from_config(preset_config(arch, scale, **overrides))


def model_from_config(config: Any) -> nn.Module:
    """The network of any family's config (dispatching on the config's type)."""
    return family_of(config).build(config)


def arch_of(config: Any) -> str:
    """The preset name matching ``config`` (ignoring scale), or ``"<family>-custom"``."""
    for name, preset in PRESETS.items():
        if type(preset) is type(config) and replace(preset, scale=config.scale) == config:
            return name
    return f"{family_of(config).name}-custom"


__all__ = [
    "EDSR", "EDSRConfig", "MSRResNet", "MSRResNetConfig", "RRDBNet", "RRDBNetConfig", "SRVGGConfig", "SRVGGNetCompact",
    "Family", "PRESETS", "arch_of", "build_model", "detect_family", "family_of", "get_family", "list_archs",
    "list_families", "model_from_config", "preset_config",
]
