"""Export a (pruned) checkpoint to the compressed sparsesr file (docs/format.md)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparsesr import __version__
from sparsesr.errors import ConfigError
from sparsesr.fileio import atomic_write_bytes, sha256_of
from sparsesr.format import layouts
from sparsesr.format.reader import parse_bytes
from sparsesr.format.spec import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LAYOUTS,
    VALUE_DTYPES,
    conv_layer_names,
    sparse_eligible,
    weight_tensor_names,
)
from sparsesr.models import arch_of, model_from_config
from sparsesr.models.checkpoint import Checkpoint, load_checkpoint, load_state_dict_strict

EXPORT_LAYOUTS = ("auto",) + LAYOUTS

# --layout auto keeps a layer sparse only where the sparse kernel is expected to beat dense
# convolution: its sparsity must reach the crossover measured for the CPU kernel (thresholds
# below, docs/format.md "Choosing layouts"), and when the CPU kernel is built, its own measured
# decision on this machine (``should_use_sparse`` at AUTO_REFERENCE_SIZE^2 inputs) must agree.
# The thresholds also keep files portable: a barely sparse layer stays dense for the GPU too,
# where sparse kernels break even only at 60-90% sparsity (docs/format.md).
AUTO_REFERENCE_SIZE = 128
CSR_MIN_SPARSITY = 0.6
BSR_MIN_SPARSITY = 0.3


@dataclass
class ExportReport:
    """What ``export`` wrote: per-layer rows and totals (the same fields as ``describe``)."""

    path: str
    layers: list[dict]
    sparsity: float
    size_bytes: int
    dense_fp32_bytes: int

    @property
    def size_ratio(self) -> float:
        return self.size_bytes / self.dense_fp32_bytes

    def to_dict(self) -> dict:
        return {"path": self.path, "layers": self.layers, "sparsity": self.sparsity, "size_bytes": self.size_bytes,
                "dense_fp32_bytes": self.dense_fp32_bytes, "size_ratio": self.size_ratio}


def export(
    source: str | os.PathLike | Checkpoint,
    out_path: str | os.PathLike,
    dtype: str = "fp32",
    layout: str = "auto",
) -> ExportReport:
    """Write ``source`` (a checkpoint path or a loaded ``Checkpoint``) as a sparsesr file.

    ``dtype`` is the storage type of conv weights (fp32 / fp16 / bf16; biases stay fp32).
    ``layout`` forces every sparse-eligible conv to ``dense`` / ``csr`` / ``bsr``, or lets
    ``auto`` choose per layer. The file is validated by the reader before it is written, and
    written atomically.
    """
    data = export_bytes(source, dtype=dtype, layout=layout)
    summary = parse_bytes(data, source=str(out_path)).summary()
    atomic_write_bytes(out_path, data)
    return ExportReport(path=str(out_path), layers=summary["layers"], sparsity=summary["sparsity"],
                        size_bytes=len(data), dense_fp32_bytes=summary["dense_fp32_bytes"])


def export_bytes(source: str | os.PathLike | Checkpoint, dtype: str = "fp32", layout: str = "auto") -> bytes:
    """The bytes of the sparsesr file for ``source`` (see ``export``)."""
    from safetensors.torch import save

    if dtype not in VALUE_DTYPES:
        raise ConfigError(f"export dtype must be one of {list(VALUE_DTYPES)}, got {dtype!r}")
    if layout not in EXPORT_LAYOUTS:
        raise ConfigError(f"export layout must be one of {list(EXPORT_LAYOUTS)}, got {layout!r}")
    if isinstance(source, Checkpoint):
        ckpt, provenance = source, {"source": None, "source_sha256": None}
    else:
        ckpt = load_checkpoint(source)
        provenance = {"source": Path(source).name, "source_sha256": sha256_of(source)}
    provenance.update(_pruning_provenance(ckpt.metadata.get("pruning")), exporter=f"sparsesr {__version__}")
    if "quality" in ckpt.metadata:  # measured scores recorded in the checkpoint (tools/ship_models.py)
        provenance["quality"] = ckpt.metadata["quality"]

    model = model_from_config(ckpt.config)
    load_state_dict_strict(model, ckpt.state_dict, source=str(provenance["source"] or "checkpoint"))
    tensors, layer_meta = _encode_model(model, VALUE_DTYPES[dtype], dtype, layout)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "arch": arch_of(ckpt.config),
        "scale": str(ckpt.config.scale),
        "config": json.dumps(ckpt.config.to_dict()),
        "layers": json.dumps(layer_meta),
        "provenance": json.dumps(provenance),
    }
    return save(tensors, metadata=metadata)


def _pruning_provenance(pruning) -> dict:
    """``pruning_method`` and the checkpoint's pruning settings, without its per-layer report
    (the file has its own per-layer sparsity)."""
    if not isinstance(pruning, dict):
        return {"pruning_method": None, "pruning": pruning}
    method = pruning.get("method")
    for part in ("config", "report"):  # sparsesr.train keeps it in one of these
        if method is None and isinstance(pruning.get(part), dict):
            method = pruning[part].get("method")
    return {"pruning_method": method, "pruning": {k: v for k, v in pruning.items() if k != "report"}}


def _encode_model(model: nn.Module, value_dtype: torch.dtype, dtype_name: str,
                  layout: str) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    conv_names = conv_layer_names(model)
    eligible = set(sparse_eligible(conv_names))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    layer_meta: dict[str, dict] = {}
    for name in conv_names:
        weight = state.pop(f"{name}.weight").to(value_dtype)
        chosen = _choose_layout(weight, layout) if name in eligible else "dense"
        stored, meta = encode_weight(name, weight, chosen)
        tensors.update(stored)
        layer_meta[name] = {**meta, "dtype": dtype_name}
    # Biases, the mean shifts and anything else: dense fp32.
    tensors.update({k: v.float().contiguous() for k, v in state.items()})
    return tensors, layer_meta


def encode_weight(name: str, weight: torch.Tensor, layout: str, index: str | None = None,
                  block: tuple[int, int] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata record for one conv weight in ``layout``.

    ``index`` picks the index encoding (default: whichever stores this layer in fewest bytes);
    ``block`` the BSR block shape (default: the detected one, else 4x1).
    """
    sparsity = 1.0 - int(torch.count_nonzero(weight)) / weight.numel()
    meta = {"layout": layout, "shape": list(weight.shape), "sparsity": sparsity}
    if layout == "dense":
        return {f"{name}.weight": weight.contiguous()}, {**meta, "nnz": weight.numel()}
    if layout == "csr":
        row_ptr, col_idx, values = layouts.dense_to_csr(weight)
        n_cols, block = weight[0].numel(), None
    else:
        block = block or layouts.detect_block_shape(weight) or layouts.BLOCK_SHAPES[-1]
        row_ptr, col_idx, values = layouts.dense_to_bsr(weight, block)
        n_cols = -(-weight[0].numel() // block[1])
    best = None
    for candidate in [index] if index else layouts.INDEX_ENCODINGS:
        pattern, stored_values = layouts.encode_pattern(row_ptr, col_idx, values, n_cols, candidate)
        size = layouts.pattern_nbytes(pattern) + stored_values.numel() * stored_values.element_size()
        if best is None or size < best[0]:
            best = (size, candidate, pattern, stored_values)
    _, index, pattern, stored_values = best
    names = weight_tensor_names(name, layout, index)
    tensors = dict(zip(names, list(pattern.values()) + [stored_values.contiguous()]))
    meta.update(index=index, nnz=stored_values.shape[0])
    if block is not None:
        meta["block"] = list(block)
    return tensors, meta


def _choose_layout(weight: torch.Tensor, layout: str) -> str:
    if layout != "auto":
        return layout
    block = layouts.detect_block_shape(weight)
    candidate = "bsr" if block else "csr"
    return candidate if _sparse_expected_faster(weight, candidate, block) else "dense"


def _sparse_expected_faster(weight: torch.Tensor, layout: str, block: tuple[int, int] | None) -> bool:
    sparsity = 1.0 - int(torch.count_nonzero(weight)) / weight.numel()
    if sparsity < (BSR_MIN_SPARSITY if layout == "bsr" else CSR_MIN_SPARSITY):
        return False
    cpu = _cpu_kernel()
    if cpu is None:
        return True
    matrix = weight.float()
    if layout == "bsr":
        prepared = cpu.prepare_bsr(*layouts.dense_to_bsr(matrix, block), *weight.shape)
    else:
        prepared = cpu.prepare_csr(*layouts.dense_to_csr(matrix), *weight.shape[1:])
    return bool(cpu.should_use_sparse(prepared, AUTO_REFERENCE_SIZE, AUTO_REFERENCE_SIZE))


def _cpu_kernel():
    """The compiled CPU kernel module if it is built (format never needs it otherwise)."""
    try:
        from sparsesr.kernels import cpu
    except ImportError:
        return None
    return cpu if cpu.available() else None
