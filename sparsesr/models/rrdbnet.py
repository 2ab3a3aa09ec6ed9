"""RRDBNet (ESRGAN, Wang et al. 2018; Real-ESRGAN 2021): residual-in-residual dense blocks, two
nearest-neighbour x2 upsamplings with a conv each.

Module names follow BasicSR (``basicsr/archs/rrdbnet_arch.py``): ``conv_first``,
``body.N.rdb{1,2,3}.conv{1..5}``, ``conv_body``, ``conv_up1``, ``conv_up2``, ``conv_hr``,
``conv_last``. At x2 (Real-ESRGAN's ``RealESRGAN_x2plus``) the input is pixel-unshuffled by 2
first, so ``conv_first`` takes ``4 * n_colors`` channels. The original ESRGAN names
(``RRDB_trunk.N.RDB1.conv1``, ``trunk_conv``, ``upconv1``, ``HRconv``) are mapped to these.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsesr.errors import CheckpointError, ConfigError
from sparsesr.models.keys import config_from_dict, config_to_dict, conv_weight, make_config, numbered, renamed

SUPPORTED_SCALES = (2, 4)
RESIDUAL_SCALE = 0.2  # ESRGAN scales every dense block's and every RRDB's residual by 0.2

# The original ESRGAN repository's names -> BasicSR's (the weights are the same).
ESRGAN_RENAMES = [
    (r"RRDB_trunk\.(\d+)\.RDB(\d)\.conv(\d)(?:\.0)?\.(weight|bias)", r"body.\1.rdb\2.conv\3.\4"),
    (r"trunk_conv\.(weight|bias)", r"conv_body.\1"),
    (r"upconv1\.(weight|bias)", r"conv_up1.\1"),
    (r"upconv2\.(weight|bias)", r"conv_up2.\1"),
    (r"HRconv\.(weight|bias)", r"conv_hr.\1"),
]


@dataclass(frozen=True)
class RRDBNetConfig:
    n_feats: int = 64
    num_block: int = 23
    num_grow_ch: int = 32
    scale: int = 4
    n_colors: int = 3

    def __post_init__(self) -> None:
        if self.scale not in SUPPORTED_SCALES:
            raise ConfigError(f"RRDBNet scale must be one of {SUPPORTED_SCALES}, got {self.scale}")
        if min(self.n_feats, self.num_block, self.num_grow_ch, self.n_colors) < 1:
            raise ConfigError(f"RRDBNet sizes must be positive, got {self}")

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RRDBNetConfig":
        return config_from_dict(cls, data)


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


class ResidualDenseBlock(nn.Module):
    """Five convs, each seeing the block input and every earlier conv's output."""

    def __init__(self, n_feats: int, grow: int) -> None:
        super().__init__()
        for i in range(4):
            setattr(self, f"conv{i + 1}", conv3x3(n_feats + i * grow, grow))
        self.conv5 = conv3x3(n_feats + 4 * grow, n_feats)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(self.lrelu(conv(torch.cat(features, 1))))
        return x + self.conv5(torch.cat(features, 1)) * RESIDUAL_SCALE


class RRDB(nn.Module):
    def __init__(self, n_feats: int, grow: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(n_feats, grow)
        self.rdb2 = ResidualDenseBlock(n_feats, grow)
        self.rdb3 = ResidualDenseBlock(n_feats, grow)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.rdb3(self.rdb2(self.rdb1(x))) * RESIDUAL_SCALE


class RRDBNet(nn.Module):
    """RRDBNet on images in [0, 1]."""

    def __init__(self, config: RRDBNetConfig) -> None:
        super().__init__()
        self.config = config
        c, f = config.n_colors, config.n_feats
        self.unshuffle = 4 // config.scale  # the trunk always upsamples x4
        self.conv_first = conv3x3(c * self.unshuffle**2, f)
        self.body = nn.Sequential(*[RRDB(f, config.num_grow_ch) for _ in range(config.num_block)])
        self.conv_body = conv3x3(f, f)
        self.conv_up1 = conv3x3(f, f)
        self.conv_up2 = conv3x3(f, f)
        self.conv_hr = conv3x3(f, f)
        self.conv_last = conv3x3(f, c)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    @property
    def scale(self) -> int:
        return self.config.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.unshuffle > 1:  # x2: the trunk upsamples x4, so the input is pixel-unshuffled by 2
            x = F.pixel_unshuffle(_pad_to_even(x), self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        out = self.conv_last(self.lrelu(self.conv_hr(feat)))
        return out[..., : h * self.config.scale, : w * self.config.scale]


def _pad_to_even(x: torch.Tensor) -> torch.Tensor:
    """``x`` with one more row / column where its height / width is odd: the reflected one (row
    ``h - 2``), as Real-ESRGAN's x2 inference pads before the pixel unshuffle; for a size of 1 the
    row itself (nothing to reflect). Slices whose bounds come from the shape, no branch on it, so
    torch.fx traces it (and the runtime fuses the whole network)."""
    h, w = x.shape[-2:]
    row = (h - 2) % h  # h - 2, or 0 when h == 1
    x = torch.cat([x, x[..., row:row + h % 2, :]], dim=-2)
    col = (w - 2) % w
    return torch.cat([x, x[..., col:col + w % 2]], dim=-1)


def detect(state_dict: dict[str, torch.Tensor]) -> tuple[RRDBNetConfig, dict[str, torch.Tensor]]:
    """Config of an RRDBNet state dict (BasicSR or original ESRGAN names), keys renamed to BasicSR's."""
    if "trunk_conv.weight" in state_dict:
        state_dict = renamed(state_dict, ESRGAN_RENAMES)
    first = conv_weight(state_dict, "conv_first.weight", "an RRDBNet")
    conv_weight(state_dict, "conv_body.weight", "an RRDBNet")
    last = conv_weight(state_dict, "conv_last.weight", "an RRDBNet")
    grow = conv_weight(state_dict, "body.0.rdb1.conv1.weight", "an RRDBNet")
    n_feats, n_in, n_colors = int(first.shape[0]), int(first.shape[1]), int(last.shape[0])
    num_block = numbered(state_dict, r"body\.(\d+)\.rdb1\.conv1\.weight", "RRDBNet blocks body.N.rdb1")
    if n_in == n_colors:
        scale = 4
    elif n_in == 4 * n_colors:
        scale = 2  # Real-ESRGAN x2: pixel-unshuffled input
    else:
        raise CheckpointError(f"cannot infer the RRDBNet scale: conv_first takes {n_in} channels and conv_last "
                              f"gives {n_colors}, expected {n_colors} (x4) or {4 * n_colors} (x2) input channels")
    config = make_config(RRDBNetConfig, n_feats=n_feats, num_block=num_block, num_grow_ch=int(grow.shape[0]),
                         scale=scale, n_colors=n_colors)
    return config, state_dict
