"""SRVGGNetCompact (Real-ESRGAN's ``realesr-general-x4v3`` / ``realesr-animevideov3``): a plain
stack of 3x3 convs and activations at low resolution, pixel shuffle, plus the nearest-upsampled
input.

Module names follow Real-ESRGAN (``realesrgan/archs/srvgg_arch.py``): ``body.0`` the first conv,
``body.1`` its activation, then ``num_conv`` x (conv, activation), then the last conv to
``n_colors * scale**2`` channels. Only PReLU activations have weights (``[n_feats]``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsesr.errors import CheckpointError, ConfigError
from sparsesr.models.keys import WrongFamily, config_from_dict, config_to_dict, conv_weight, make_config

SUPPORTED_SCALES = (2, 3, 4)
ACT_TYPES = ("prelu", "relu", "leakyrelu")


@dataclass(frozen=True)
class SRVGGConfig:
    n_feats: int = 64
    num_conv: int = 32
    act_type: str = "prelu"
    scale: int = 4
    n_colors: int = 3  # input and output channels (the input is added to the output)

    def __post_init__(self) -> None:
        if self.scale not in SUPPORTED_SCALES:
            raise ConfigError(f"SRVGGNetCompact scale must be one of {SUPPORTED_SCALES}, got {self.scale}")
        if self.act_type not in ACT_TYPES:
            raise ConfigError(f"SRVGGNetCompact act_type must be one of {ACT_TYPES}, got {self.act_type!r}")
        if min(self.n_feats, self.num_conv, self.n_colors) < 1:
            raise ConfigError(f"SRVGGNetCompact sizes must be positive, got {self}")

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SRVGGConfig":
        return config_from_dict(cls, data)


def _activation(act_type: str, n_feats: int) -> nn.Module:
    if act_type == "prelu":
        return nn.PReLU(num_parameters=n_feats)
    if act_type == "leakyrelu":
        return nn.LeakyReLU(0.1, inplace=True)
    return nn.ReLU(inplace=True)


class SRVGGNetCompact(nn.Module):
    """SRVGGNetCompact on images in [0, 1]."""

    def __init__(self, config: SRVGGConfig) -> None:
        super().__init__()
        self.config = config
        c, f, s = config.n_colors, config.n_feats, config.scale
        layers = [nn.Conv2d(c, f, 3, padding=1), _activation(config.act_type, f)]
        for _ in range(config.num_conv):
            layers += [nn.Conv2d(f, f, 3, padding=1), _activation(config.act_type, f)]
        layers.append(nn.Conv2d(f, c * s * s, 3, padding=1))
        self.body = nn.Sequential(*layers)
        self.upsampler = nn.PixelShuffle(s)

    @property
    def scale(self) -> int:
        return self.config.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.upsampler(self.body(x))
        return out + F.interpolate(x, scale_factor=self.config.scale, mode="nearest")


def detect(state_dict: dict[str, torch.Tensor]) -> tuple[SRVGGConfig, dict[str, torch.Tensor]]:
    """Config of an SRVGGNetCompact state dict (its keys are already the module's).

    Without PReLU weights the activation is taken to be ReLU: ReLU and LeakyReLU have no weights
    to tell them apart (every published model uses PReLU).
    """
    first = conv_weight(state_dict, "body.0.weight", "an SRVGGNetCompact")
    if any(not re.fullmatch(r"body\.\d+\.(weight|bias)", k) for k in state_dict):
        raise WrongFamily("not an SRVGGNetCompact state dict (expected only body.N.weight / body.N.bias keys)")
    n_feats, n_colors = int(first.shape[0]), int(first.shape[1])
    convs = sorted(int(k.split(".")[1]) for k, v in state_dict.items() if k.endswith(".weight") and v.dim() == 4)
    num_conv = len(convs) - 2
    if num_conv < 1 or convs != list(range(0, 2 * len(convs), 2)):
        raise CheckpointError(f"SRVGGNetCompact convs body.0, body.2, ... missing or misnumbered (found {convs[:6]})")
    out = int(state_dict[f"body.{convs[-1]}.weight"].shape[0])
    scale = math.isqrt(out // n_colors) if out % n_colors == 0 else 0
    if scale * scale * n_colors != out:
        raise CheckpointError(f"cannot infer the SRVGGNetCompact scale: the last conv gives {out} channels, "
                              f"expected {n_colors} x scale^2")
    act_type = "prelu" if "body.1.weight" in state_dict else "relu"
    config = make_config(SRVGGConfig, n_feats=n_feats, num_conv=num_conv, act_type=act_type, scale=scale, n_colors=n_colors)
    return config, state_dict
