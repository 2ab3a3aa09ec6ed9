"""Names and limits of the file format (docs/format.md), shared by the writer and the reader."""
from __future__ import annotations

import functools
import json
import math

import torch
from torch import nn

from sparsesr.errors import ConfigError
from sparsesr.models import model_from_config
from sparsesr.models.edsr import SUPPORTED_SCALES, EDSRConfig

FORMAT_NAME = "sparsesr"
FORMAT_VERSION = "1"
LAYOUTS = ("dense", "csr", "bsr")
VALUE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INDEX_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
SAFETENSORS_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                           torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64"}

# Limits the reader enforces before building anything, so a hostile header cannot make it
# allocate or loop without bound. Far above every published EDSR (32 blocks x 256 channels).
MAX_HEADER_BYTES = 100_000_000
MAX_RESBLOCKS = 256
MAX_FEATS = 2048
MAX_BLOCK_SIDE = 64
# The per-field limits still allow 19.7G weights (256 blocks x 2048 channels); the densified
# weights of a network must also fit in memory: 200M parameters is 800 MB in fp32, 5x the full
# EDSR x4 (43M).
MAX_PARAMETERS = 200_000_000
# EDSR's mean shift subtracts an RGB mean: a network with another number of colours cannot run.
N_COLORS = 3
# Pixel values the network works on are [0, rgb_range]: 255 for EDSR-PyTorch, 1 for [0, 1]
# models, up to 65535 for 16-bit ones. Outside this range the image comes out as garbage.
RGB_RANGE_LIMITS = (1.0, 65535.0)
# Residual scaling: 1.0 (EDSR baseline) or 0.1 (full EDSR); 0 or less turns the blocks off or inverts them.
RES_SCALE_LIMITS = (0.0, 10.0)  # (exclusive, inclusive)


def validated_config(raw: object) -> EDSRConfig:
    """The ``EDSRConfig`` a file's JSON config describes, checked before anything is built.

    Checks types (integers are not bools, numbers are finite), ranges (``n_resblocks``
    1..MAX_RESBLOCKS, ``n_feats`` 1..MAX_FEATS, ``n_colors`` = 3, a supported ``scale``,
    ``rgb_range`` in RGB_RANGE_LIMITS, ``res_scale`` in RES_SCALE_LIMITS) and that the network has
    at most MAX_PARAMETERS parameters (counted on the meta device: nothing is allocated). Missing
    fields take EDSRConfig's defaults. Raises ``ConfigError`` naming the field; callers prefix
    their file name.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a JSON object, found {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in EDSRConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown config keys {unknown[:5]}; expected some of {sorted(EDSRConfig.__dataclass_fields__)}")
    for key, limit in (("n_resblocks", MAX_RESBLOCKS), ("n_feats", MAX_FEATS)):
        if key in raw and not (is_int(raw[key]) and 1 <= raw[key] <= limit):
            raise ConfigError(f"config {key} must be an integer in 1..{limit}, found {_shown(raw[key])}")
    if "scale" in raw and not (is_int(raw["scale"]) and raw["scale"] in SUPPORTED_SCALES):
        raise ConfigError(f"config scale must be one of {', '.join(map(str, SUPPORTED_SCALES))}, found {_shown(raw['scale'])}")
    if "n_colors" in raw and not (is_int(raw["n_colors"]) and raw["n_colors"] == N_COLORS):
        raise ConfigError(f"config n_colors must be {N_COLORS} (EDSR's mean shift is RGB), found {_shown(raw['n_colors'])}")
    low, high = RGB_RANGE_LIMITS
    if "rgb_range" in raw and not (is_finite_number(raw["rgb_range"]) and low <= raw["rgb_range"] <= high):
        raise ConfigError(f"config rgb_range must be a number in [{low:g}, {high:g}] (255 for EDSR-PyTorch models, "
                          f"1 for [0, 1] models), found {_shown(raw['rgb_range'])}")
    low, high = RES_SCALE_LIMITS
    if "res_scale" in raw and not (is_finite_number(raw["res_scale"]) and low < raw["res_scale"] <= high):
        raise ConfigError(f"config res_scale must be a number in ({low:g}, {high:g}], found {_shown(raw['res_scale'])}")
    config = EDSRConfig(**{k: (float(v) if k in ("rgb_range", "res_scale") else v) for k, v in raw.items()})
    n_params = parameter_count(config)
    if n_params > MAX_PARAMETERS:
        raise ConfigError(f"config describes {n_params:,} parameters, more than the {MAX_PARAMETERS:,} this "
                          f"package loads (n_resblocks {config.n_resblocks}, n_feats {config.n_feats})")
    return config


def parameter_count(config: EDSRConfig) -> int:
    """Number of values in the state dict of the network ``config`` describes (weights, biases, mean shifts)."""
    _, shapes = _structure(config)
    return sum(math.prod(shape) for _, shape in shapes)


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """A finite int or float (bools and ints beyond float precision are not numbers here)."""
    if is_int(value):
        return abs(value) < 2**53
    return isinstance(value, float) and math.isfinite(value)


def _shown(value: object) -> str:
    """``repr`` cut short: a hostile file may hold a huge value."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def weight_tensor_names(layer: str, layout: str, index: str | None) -> tuple[str, ...]:
    """The tensors that store ``layer``'s weight in the file, in a fixed order."""
    base = f"{layer}.weight"
    if layout == "dense":
        return (base,)
    prefix = "" if layout == "csr" else "block_"
    index_names = {
        "absolute": (f"{prefix}row_ptr", f"{prefix}col_idx"),
        "delta8": (f"{prefix}row_ptr", f"{prefix}col_delta"),
        "bitmask": (f"{prefix}mask",),
    }[index]
    return tuple(f"{base}.{n}" for n in index_names + (f"{prefix}values",))


def conv_layer_names(model: nn.Module) -> list[str]:
    """Names of the model's ``nn.Conv2d`` layers, in forward order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def sparse_eligible(conv_names: list[str]) -> list[str]:
    """Layers that may be stored sparse: all but the first and the last conv.

    The first and last convs are tiny (3 channels on one side), cost little, and are the most
    sensitive to pruning; pruning methods keep them dense too.
    """
    return conv_names[1:-1]


def expected_structure(config: EDSRConfig) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """``(conv layer names, {state-dict key: shape})`` of the network ``config`` describes."""
    names, shapes = _structure(config)
    return list(names), dict(shapes)


@functools.lru_cache(maxsize=16)
def _structure(config: EDSRConfig) -> tuple[tuple[str, ...], tuple[tuple[str, tuple[int, ...]], ...]]:
    # Built on the meta device: no memory is allocated for weights.
    with torch.device("meta"):
        model = model_from_config(config)
    shapes = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
    return tuple(conv_layer_names(model)), shapes


def dense_fp32_nbytes(shapes: dict[str, tuple[int, ...]]) -> int:
    """Size of a plain fp32 safetensors file holding tensors of these shapes (no metadata).

    Mirrors the safetensors layout: 8-byte header length, JSON header padded with spaces to a
    multiple of 8, then the data.
    """
    header, offset = {}, 0
    for name in sorted(shapes):
        n = 4
        for s in shapes[name]:
            n *= s
        header[name] = {"dtype": "F32", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    header_len = len(json.dumps(header, separators=(",", ":")))
    return 8 + header_len + (-header_len % 8) + offset
