"""Names and limits of the file format (docs/format.md), shared by the writer and the reader."""
from __future__ import annotations

import functools
import json

import torch
from torch import nn

from sparsesr.models import model_from_config
from sparsesr.models.edsr import EDSRConfig

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
MAX_COLORS = 4
MAX_BLOCK_SIDE = 64


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
