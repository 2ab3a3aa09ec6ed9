"""MSRResNet (BasicSR; SRResNet of Ledig et al. 2017 without batch norm): residual blocks, a
pixel-shuffle upsampler, and the bilinearly upsampled input added to the output.

Module names follow BasicSR (``basicsr/archs/srresnet_arch.py``), so its state dicts load as
they are: ``conv_first``, ``body.N.conv1/conv2``, ``upconv1`` (``upconv2`` at x4), ``conv_hr``,
``conv_last``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsesr.errors import CheckpointError, ConfigError
from sparsesr.models.keys import config_from_dict, config_to_dict, conv_weight, make_config, numbered

SUPPORTED_SCALES = (2, 3, 4)


@dataclass(frozen=True)
class MSRResNetConfig:
    n_feats: int = 64
    num_block: int = 16
    scale: int = 4
    n_colors: int = 3  # input and output channels (the input is added to the output)

    def __post_init__(self) -> None:
        if self.scale not in SUPPORTED_SCALES:
            raise ConfigError(f"MSRResNet scale must be one of {SUPPORTED_SCALES}, got {self.scale}")
        if min(self.n_feats, self.num_block, self.n_colors) < 1:
            raise ConfigError(f"MSRResNet sizes must be positive, got {self}")

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MSRResNetConfig":
        return config_from_dict(cls, data)


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


class ResidualBlockNoBN(nn.Module):
    """conv -> ReLU -> conv, plus the input."""

    def __init__(self, n_feats: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(n_feats, n_feats)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(n_feats, n_feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.relu(self.conv1(x)))


class MSRResNet(nn.Module):
    """MSRResNet on images in [0, 1]."""

    def __init__(self, config: MSRResNetConfig) -> None:
        super().__init__()
        self.config = config
        c, f, s = config.n_colors, config.n_feats, config.scale
        # Registered in forward order: the first and last convs are the first and last modules.
        self.conv_first = conv3x3(c, f)
        self.body = nn.Sequential(*[ResidualBlockNoBN(f) for _ in range(config.num_block)])
        self.upconv1 = conv3x3(f, f * (4 if s == 4 else s * s))
        if s == 4:
            self.upconv2 = conv3x3(f, f * 4)
        self.pixel_shuffle = nn.PixelShuffle(2 if s == 4 else s)
        self.conv_hr = conv3x3(f, f)
        self.conv_last = conv3x3(f, c)
        self.lrelu = nn.LeakyReLU(0.1, inplace=True)

    @property
    def scale(self) -> int:
        return self.config.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(self.lrelu(self.conv_first(x)))
        out = self.lrelu(self.pixel_shuffle(self.upconv1(out)))
        if self.config.scale == 4:
            out = self.lrelu(self.pixel_shuffle(self.upconv2(out)))
        out = self.conv_last(self.lrelu(self.conv_hr(out)))
        return out + F.interpolate(x, scale_factor=self.config.scale, mode="bilinear", align_corners=False)


def detect(state_dict: dict[str, torch.Tensor]) -> tuple[MSRResNetConfig, dict[str, torch.Tensor]]:
    """Config of a BasicSR MSRResNet state dict (the keys are already the module's)."""
    first = conv_weight(state_dict, "conv_first.weight", "an MSRResNet")
    up = conv_weight(state_dict, "upconv1.weight", "an MSRResNet")
    conv_weight(state_dict, "conv_hr.weight", "an MSRResNet")
    n_feats, n_colors = int(first.shape[0]), int(first.shape[1])
    num_block = numbered(state_dict, r"body\.(\d+)\.conv1\.weight", "MSRResNet residual blocks body.N.conv1")
    if "upconv2.weight" in state_dict:
        scale = 4
    elif up.shape[0] in (4 * n_feats, 9 * n_feats):
        scale = 2 if up.shape[0] == 4 * n_feats else 3
    else:
        raise CheckpointError(f"cannot infer the MSRResNet scale: upconv1 has {up.shape[0]} output channels, "
                              f"expected {4 * n_feats} (x2) or {9 * n_feats} (x3), or an upconv2 (x4)")
    return make_config(MSRResNetConfig, n_feats=n_feats, num_block=num_block, scale=scale, n_colors=n_colors), state_dict

