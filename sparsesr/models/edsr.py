"""EDSR (Lim et al., CVPR-W 2017): residual blocks without batch norm, pixel-shuffle upsampler.

Module and parameter names follow the official EDSR-PyTorch code, so its ``.pt`` state dicts
load as they are: ``sub_mean``, ``head.0``, ``body.N.body.{0,2}``, ``body.<n_resblocks>`` (the
last body conv), ``tail.0`` (upsampler), ``tail.1``, ``add_mean``. BasicSR's EDSR names
(``conv_first``, ``body.N.conv1/conv2``, ``conv_after_body``, ``upsample.K``, ``conv_last``) are
mapped to these by ``detect``.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from sparsesr.errors import CheckpointError, ConfigError
from sparsesr.models.keys import WrongFamily, conv_weight, make_config, numbered, renamed

# Per-channel RGB mean of DIV2K, as used by the official EDSR checkpoints.
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)
SUPPORTED_SCALES = (2, 3, 4)


@dataclass(frozen=True)
class EDSRConfig:
    """Everything needed to rebuild an EDSR network."""

    n_resblocks: int = 16
    n_feats: int = 64
    res_scale: float = 1.0
    scale: int = 2
    n_colors: int = 3
    rgb_range: float = 255.0  # official checkpoints work on pixel values in [0, 255]

    def __post_init__(self) -> None:
        if self.scale not in SUPPORTED_SCALES:
            raise ConfigError(f"scale must be one of {SUPPORTED_SCALES}, got {self.scale}")
        if self.n_resblocks < 1 or self.n_feats < 1:
            raise ConfigError(
                f"n_resblocks and n_feats must be positive, got {self.n_resblocks} and {self.n_feats}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EDSRConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown EDSR config keys {unknown}; expected some of {sorted(known)}")
        return cls(**data)


class MeanShift(nn.Module):
    """Adds (sign=+1) or subtracts (sign=-1) the dataset mean, as a fixed 1x1 conv.

    Kept as buffers named ``weight`` / ``bias`` so the official checkpoints' ``sub_mean.*`` and
    ``add_mean.*`` keys load, and so pruning (which looks for ``nn.Conv2d``) never touches it.
    """

    def __init__(self, rgb_range: float, sign: int, mean: tuple[float, ...] = DIV2K_RGB_MEAN) -> None:
        super().__init__()
        n = len(mean)
        # Built from Python numbers with no tensor arithmetic: the format reader builds models on
        # the meta device, where the first arithmetic op makes torch import triton (~150 MB, seconds).
        eye = [[[[1.0 if i == j else 0.0]] for j in range(n)] for i in range(n)]
        self.register_buffer("weight", torch.tensor(eye))
        self.register_buffer("bias", torch.tensor([sign * rgb_range * m for m in mean]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias)


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


class ResBlock(nn.Module):
    """conv -> ReLU -> conv, scaled, plus the input."""

    def __init__(self, n_feats: int, res_scale: float) -> None:
        super().__init__()
        self.body = nn.Sequential(conv3x3(n_feats, n_feats), nn.ReLU(inplace=True), conv3x3(n_feats, n_feats))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) * self.res_scale


class Upsampler(nn.Sequential):
    """Pixel-shuffle upsampling: log2(scale) x2 stages, or one x3 stage."""

    def __init__(self, scale: int, n_feats: int) -> None:
        layers: list[nn.Module] = []
        if scale == 3:
            layers += [conv3x3(n_feats, 9 * n_feats), nn.PixelShuffle(3)]
        else:
            for _ in range(int(math.log2(scale))):
                layers += [conv3x3(n_feats, 4 * n_feats), nn.PixelShuffle(2)]
        super().__init__(*layers)


class EDSR(nn.Module):
    """EDSR on RGB input in [0, 1]; returns the upscaled image in (about) [0, 1]."""

    def __init__(self, config: EDSRConfig) -> None:
        super().__init__()
        self.config = config
        c, f = config.n_colors, config.n_feats
        self.sub_mean = MeanShift(config.rgb_range, -1)
        self.head = nn.Sequential(conv3x3(c, f))
        self.body = nn.Sequential(*[ResBlock(f, config.res_scale) for _ in range(config.n_resblocks)], conv3x3(f, f))
        self.tail = nn.Sequential(Upsampler(config.scale, f), conv3x3(f, c))
        self.add_mean = MeanShift(config.rgb_range, +1)

    @property
    def scale(self) -> int:
        return self.config.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.sub_mean(x * self.config.rgb_range)
        x = self.head(x)
        x = x + self.body(x)
        x = self.add_mean(self.tail(x))
        return x / self.config.rgb_range


# BasicSR's EDSR (basicsr/archs/edsr_arch.py) -> EDSR-PyTorch names. BasicSR keeps its mean
# (DIV2K's, with img_range 255: the same network as EDSR-PyTorch's) out of the state dict.
BASICSR_RENAMES = [
    (r"conv_first\.(weight|bias)", r"head.0.\1"),
    (r"body\.(\d+)\.conv1\.(weight|bias)", r"body.\1.body.0.\2"),
    (r"body\.(\d+)\.conv2\.(weight|bias)", r"body.\1.body.2.\2"),
    (r"upsample\.(\d+)\.(weight|bias)", r"tail.0.\1.\2"),
    (r"conv_last\.(weight|bias)", r"tail.1.\1"),
]


def detect(state_dict: dict[str, torch.Tensor]) -> tuple[EDSRConfig, dict[str, torch.Tensor]]:
    """Config of an EDSR-PyTorch or BasicSR EDSR state dict, keys renamed to EDSR-PyTorch's."""
    if "conv_first.weight" in state_dict and "conv_after_body.weight" in state_dict:
        n_resblocks = numbered(state_dict, r"body\.(\d+)\.conv1\.weight", "EDSR residual blocks body.N.conv1")
        state_dict = renamed(state_dict, BASICSR_RENAMES + [
            (r"conv_after_body\.(weight|bias)", rf"body.{n_resblocks}.\1")])
        for name, sign in (("sub_mean", -1), ("add_mean", +1)):
            shift = MeanShift(255.0, sign)
            state_dict.setdefault(f"{name}.weight", shift.weight)
            state_dict.setdefault(f"{name}.bias", shift.bias)
    if "head.0.weight" not in state_dict:
        raise WrongFamily("not an EDSR state dict (expected a conv weight 'head.0.weight' (EDSR-PyTorch) "
                          "or 'conv_first.weight' and 'conv_after_body.weight' (BasicSR))")
    head = conv_weight(state_dict, "head.0.weight", "an EDSR")
    n_feats, n_colors = int(head.shape[0]), int(head.shape[1])
    n_resblocks = numbered(state_dict, r"body\.(\d+)\.body\.0\.weight", "EDSR residual blocks body.N.body.0")
    ups = [state_dict[k] for k in sorted(state_dict) if re.fullmatch(r"tail\.0\.\d+\.weight", k)]
    if len(ups) == 1 and ups[0].shape[0] == 9 * n_feats:
        scale = 3
    elif ups and all(u.shape[0] == 4 * n_feats for u in ups):
        scale = 2 ** len(ups)
    else:
        raise CheckpointError("cannot infer the EDSR scale from the upsampler convs tail.0.* (upsample.*)")
    # EDSR-PyTorch trains only its large model (32 x 256) with residual scaling 0.1 (BasicSR too).
    res_scale = 0.1 if (n_resblocks, n_feats) == (32, 256) else 1.0
    config = make_config(EDSRConfig, n_resblocks=n_resblocks, n_feats=n_feats, res_scale=res_scale, scale=scale,
                         n_colors=n_colors)
    return config, state_dict
