"""Export a (pruned) checkpoint to the compressed sparsesr file (docs/format.md)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparsesr import __version__
from sparsesr.errors import ConfigError, OutputPathError
from sparsesr.fileio import atomic_write_bytes, canonical_safetensors, sha256_of
from sparsesr.format import layouts
from sparsesr.format.reader import is_sparse_model_file, parse_bytes, read_file
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
from sparsesr.models.checkpoint import Checkpoint, check_state_dict, load_checkpoint, load_state_dict_strict

EXPORT_LAYOUTS = ("auto",) + LAYOUTS

# --layout auto: a layer's layout depends on its weights alone (docs/format.md "Choosing layouts"),
# so one checkpoint gives the same file on every machine; which kernel runs a layer fastest is
# decided per machine and per input size by the runtime. A sparse-eligible layer is stored bsr
# when its zeros follow 8x1 / 4x1 blocks and at least BSR_MIN_SPARSITY of it is zero, csr when it
# is unstructured and at least CSR_MIN_SPARSITY is zero, else dense. The thresholds are the CPU
# kernel's measured crossovers, where sparse starts to pay off on any machine.
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
    """Write ``source`` (a checkpoint or exported file, an embedded model name, or a loaded
    ``Checkpoint``; see ``load_source``) as a sparsesr file at ``out_path`` (a file, not a folder).

    ``dtype`` is the storage type of conv weights (fp32 / fp16 / bf16; biases stay fp32).
    ``layout`` forces every sparse-eligible conv to ``dense`` / ``csr`` / ``bsr``, or lets
    ``auto`` choose per layer (``choose_layout``). The same input gives the same bytes on every
    machine. The file is validated by the reader before it is written, and written atomically.
    """
    out_path = output_file(out_path)
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
    ckpt, path = load_source(source)
    provenance = {"source": path and path.name, "source_sha256": path and sha256_of(path)}
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
    # EDSR files say nothing (absent = edsr), so they keep the bytes of earlier versions.
    if ckpt.family != "edsr":
        metadata["family"] = ckpt.family
    return canonical_safetensors(save(tensors, metadata=metadata))


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
        chosen = choose_layout(weight, layout) if name in eligible else "dense"
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


def choose_layout(weight: torch.Tensor, layout: str = "auto") -> str:
    """The layout ``export`` stores a sparse-eligible ``weight`` in: ``layout`` unless it is ``auto``,
    then the rule above (a pure function of the zeros: no timing, no machine dependence)."""
    if layout != "auto":
        return layout
    sparsity = 1.0 - int(torch.count_nonzero(weight)) / weight.numel()
    if layouts.detect_block_shape(weight) is not None:
        return "bsr" if sparsity >= BSR_MIN_SPARSITY else "dense"
    return "csr" if sparsity >= CSR_MIN_SPARSITY else "dense"


def output_file(path: str | os.PathLike, option: str = "-o") -> Path:
    """``path`` as a file to write, or ``OutputPathError`` if it names a folder.

    Refused rather than guessed: ``-o out/`` used to write a file called ``out``.
    """
    text = os.fspath(path)
    if text.endswith(("/", os.sep)) or (os.altsep and text.endswith(os.altsep)):
        raise OutputPathError(f"{option} {text}: ends in a path separator; name the output file, "
                              f"e.g. {option} {text.rstrip('/' + os.sep)}/model.safetensors")
    if Path(text).is_dir():
        raise OutputPathError(f"{option} {text}: is a folder; name the output file, e.g. {option} {Path(text) / 'model.safetensors'}")
    return Path(text)


def load_source(source: str | os.PathLike | Checkpoint) -> tuple[Checkpoint, Path | None]:
    """The checkpoint to export or prune, and its file (None for a ``Checkpoint``).

    ``source`` may be a checkpoint file, an exported file (densified: it can be re-exported
    with another dtype or layout, or pruned further), or an embedded model name (``x2``...; see
    ``sparsesr.pretrained.resolve_model``).
    """
    if isinstance(source, Checkpoint):
        # Built in memory, but held to the same rules as a file before a network is built from it.
        check_state_dict(source.config, source.state_dict, source="checkpoint")
        return source, None
    from sparsesr.pretrained import resolve_model

    path = resolve_model(source)
    if is_sparse_model_file(path):
        return read_file(path).to_checkpoint(), path
    return load_checkpoint(path), path
