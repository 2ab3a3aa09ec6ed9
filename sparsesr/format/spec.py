"""Names and limits of the file format (docs/format.md), shared by the writer and the reader."""
from __future__ import annotations

import functools
import json
import math
from typing import Any

import torch
from torch import nn

from sparsesr.errors import ConfigError
from sparsesr.models import model_from_config
from sparsesr.models import msrresnet, rrdbnet, srvgg
from sparsesr.models.edsr import SUPPORTED_SCALES

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
# The other families take grey (1), RGB (3) or RGBA (4) images.
MAX_COLORS = 4
# Pixel values the network works on are [0, rgb_range]: 255 for EDSR-PyTorch, 1 for [0, 1]
# models, up to 65535 for 16-bit ones. Outside this range the image comes out as garbage.
RGB_RANGE_LIMITS = (1.0, 65535.0)
# Residual scaling: 1.0 (EDSR baseline) or 0.1 (full EDSR); 0 or less turns the blocks off or inverts them.
RES_SCALE_LIMITS = (0.0, 10.0)  # (exclusive, inclusive)


# Per family: field -> check. ("int", low, high), ("choice", values) or ("number", low, high,
# low exclusive), with a note for the message. Fields a file leaves out take the config's defaults.
_COLORS = ("int", 1, MAX_COLORS, "")
FIELD_CHECKS: dict[str, dict[str, tuple]] = {
    "edsr": {
        "n_resblocks": ("int", 1, MAX_RESBLOCKS, ""),
        "n_feats": ("int", 1, MAX_FEATS, ""),
        "scale": ("choice", SUPPORTED_SCALES, ""),
        "n_colors": ("choice", (N_COLORS,), " (EDSR's mean shift is RGB)"),
        "rgb_range": ("number", *RGB_RANGE_LIMITS, False, " (255 for EDSR-PyTorch models, 1 for [0, 1] models)"),
        "res_scale": ("number", *RES_SCALE_LIMITS, True, ""),
    },
    "msrresnet": {
        "n_feats": ("int", 1, MAX_FEATS, ""),
        "num_block": ("int", 1, MAX_RESBLOCKS, ""),
        "scale": ("choice", msrresnet.SUPPORTED_SCALES, ""),
        "n_colors": _COLORS,
    },
    "rrdbnet": {
        "n_feats": ("int", 1, MAX_FEATS, ""),
        "num_block": ("int", 1, MAX_RESBLOCKS, ""),
        "num_grow_ch": ("int", 1, MAX_FEATS, ""),
        "scale": ("choice", rrdbnet.SUPPORTED_SCALES, ""),
        "n_colors": _COLORS,
    },
    "srvgg": {
        "n_feats": ("int", 1, MAX_FEATS, ""),
        "num_conv": ("int", 1, MAX_RESBLOCKS, ""),
        "act_type": ("choice", srvgg.ACT_TYPES, ""),
        "scale": ("choice", srvgg.SUPPORTED_SCALES, ""),
        "n_colors": _COLORS,
    },
}


def validated_config(raw: object, family: str = "edsr") -> Any:
    """The config of ``family`` a file's JSON config describes, checked before anything is built.

    Checks the family is known, then each field (``FIELD_CHECKS``: integers are not bools,
    numbers are finite, every field within its limits; for EDSR ``n_resblocks`` 1..MAX_RESBLOCKS,
    ``n_feats`` 1..MAX_FEATS, ``n_colors`` = 3, a supported ``scale``, ``rgb_range`` in
    RGB_RANGE_LIMITS, ``res_scale`` in RES_SCALE_LIMITS), then that the network has at most
    MAX_PARAMETERS parameters (counted on a meta-device build: nothing is allocated). Missing
    fields take the config's defaults. Raises ``ConfigError`` naming the field; callers prefix
    their file name.
    """
    from sparsesr.models.registry import get_family

    config_type = get_family(family).config_type
    checks = FIELD_CHECKS[family]
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a JSON object, found {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in checks)
    if unknown:
        raise ConfigError(f"unknown config keys {unknown[:5]}; expected some of {sorted(checks)}")
    values = {}
    for key, value in raw.items():
        kind, *limits, note = checks[key]
        if kind == "int" and not (is_int(value) and limits[0] <= value <= limits[1]):
            raise ConfigError(f"config {key} must be an integer in {limits[0]}..{limits[1]}{note}, found {_shown(value)}")
        if kind == "choice" and not (type(value) in (int, str) and value in limits[0]):
            allowed = ", ".join(map(str, limits[0]))
            raise ConfigError(f"config {key} must be {'one of ' if len(limits[0]) > 1 else ''}{allowed}{note}, found {_shown(value)}")
        if kind == "number":
            low, high, open_low = limits
            inside = is_finite_number(value) and (low < value if open_low else low <= value) and value <= high
            if not inside:
                bounds = f"({low:g}, {high:g}]" if open_low else f"[{low:g}, {high:g}]"
                raise ConfigError(f"config {key} must be a number in {bounds}{note}, found {_shown(value)}")
            value = float(value)
        values[key] = value
    config = config_type(**values)
    n_params = parameter_count(config)
    if n_params > MAX_PARAMETERS:
        sizes = ", ".join(f"{k} {v}" for k, v in config.to_dict().items() if checks[k][0] == "int")
        raise ConfigError(f"config describes {n_params:,} parameters, more than the {MAX_PARAMETERS:,} this "
                          f"package loads ({family}: {sizes})")
    return config


def parameter_count(config: Any) -> int:
    """Number of values in the state dict of the network ``config`` describes (weights, biases, buffers)."""
    _, shapes, _ = _structure(config)
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

    Every family registers its modules in forward order, so these are the convs that see the
    image and that make it (EDSR ``head.0`` / ``tail.1``, BasicSR ``conv_first`` / ``conv_last``,
    SRVGG ``body.0`` / its last ``body.N``). The first and last convs are tiny (3 channels on one side), cost little, and are the most
    sensitive to pruning; pruning methods keep them dense too.
    """
    return conv_names[1:-1]


def expected_structure(config: Any) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """``(conv layer names, {state-dict key: shape})`` of the network ``config`` describes (any family)."""
    names, shapes, _ = _structure(config)
    return list(names), dict(shapes)


def expected_dtypes(config: Any) -> dict[str, torch.dtype]:
    """``{state-dict key: dtype}`` of the network ``config`` describes (float32, or e.g. int64 counters)."""
    return dict(_structure(config)[2])


@functools.lru_cache(maxsize=16)
def _structure(config: Any) -> tuple[tuple[str, ...], tuple[tuple[str, tuple[int, ...]], ...],
                                     tuple[tuple[str, torch.dtype], ...]]:
    # Built on the meta device: no memory is allocated for weights.
    with torch.device("meta"):
        model = model_from_config(config)
    state = model.state_dict()
    shapes = tuple((k, tuple(v.shape)) for k, v in state.items())
    return tuple(conv_layer_names(model)), shapes, tuple((k, v.dtype) for k, v in state.items())


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
