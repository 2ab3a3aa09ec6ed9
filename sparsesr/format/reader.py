"""The validating loader: read an exported file and check everything before anyone uses it.

Nothing in the file is trusted. The header is parsed by hand (length, JSON, metadata strings),
the tensors by safetensors, then every fact the rest of the package relies on is checked:
format name and version, the architecture config (within limits, so building it is cheap), every
expected tensor present and no other, dtypes, shapes, row pointers (start at 0, non-decreasing,
end at nnz), column / block indices in range and strictly ascending within a row, metadata
agreeing with the tensors, finite values. The first violation raises one ``SparseFormatError``
naming the layer and the problem.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparsesr.errors import ConfigError, SparseFormatError
from sparsesr.format import layouts
from sparsesr.format.spec import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_DTYPES,
    LAYOUTS,
    MAX_BLOCK_SIDE,
    MAX_HEADER_BYTES,
    VALUE_DTYPES,
    dense_fp32_nbytes,
    expected_structure,
    is_finite_number,
    is_int,
    sparse_eligible,
    validated_config,
    weight_tensor_names,
)
from typing import Any

from sparsesr.models import arch_of
from sparsesr.models.checkpoint import Checkpoint
from sparsesr.models.registry import get_family

SPARSITY_TOLERANCE = 1e-6


@dataclass
class ConvLayer:
    """One conv weight as stored, decoded to its canonical layout (int32 indices).

    ``tensors`` holds ``weight`` (dense), ``row_ptr``/``col_idx``/``values`` (csr) or
    ``block_row_ptr``/``block_col_idx``/``block_values`` (bsr). Values keep the stored dtype.
    """

    name: str
    layout: str
    shape: tuple[int, int, int, int]
    dtype: str
    sparsity: float
    stored_bytes: int
    tensors: dict[str, torch.Tensor]
    index: str | None = None
    block: tuple[int, int] | None = None

    @property
    def nnz(self) -> int:
        """Stored entries (csr: values, bsr: blocks, dense: all weights)."""
        if self.layout == "dense":
            return self.tensors["weight"].numel()
        return (self.tensors["values"] if self.layout == "csr" else self.tensors["block_values"]).shape[0]

    def to_dense(self) -> torch.Tensor:
        """The ``[C_out, C_in, kh, kw]`` weight, in the stored dtype."""
        t = self.tensors
        if self.layout == "dense":
            return t["weight"]
        if self.layout == "csr":
            return layouts.csr_to_dense(t["row_ptr"], t["col_idx"], t["values"], self.shape)
        return layouts.bsr_to_dense(t["block_row_ptr"], t["block_col_idx"], t["block_values"], self.shape)


@dataclass
class SparseModelFile:
    """A validated sparsesr model file."""

    arch: str
    config: Any  # the family's config
    layers: dict[str, ConvLayer]  # in forward order
    tensors: dict[str, torch.Tensor]  # biases and the other dense tensors (fp32)
    family: str = "edsr"  # "edsr", "msrresnet", "rrdbnet", "srvgg" (files without one are EDSR)
    provenance: dict = field(default_factory=dict)
    format_version: str = FORMAT_VERSION
    size_bytes: int = 0
    source: str = ""

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with every conv weight densified to fp32."""
        state = {f"{name}.weight": layer.to_dense().float() for name, layer in self.layers.items()}
        return {**state, **self.tensors}

    def to_checkpoint(self) -> Checkpoint:
        """The file as a dense checkpoint (fp32 weights), e.g. to prune or re-export it.

        The pruning settings and quality scores of the provenance come along as checkpoint
        metadata, so a re-export records them again.
        """
        provenance = self.provenance
        metadata = {}
        pruning = provenance.get("pruning")
        if isinstance(pruning, dict) or provenance.get("pruning_method") is not None:
            metadata["pruning"] = {"method": provenance.get("pruning_method"), **(pruning if isinstance(pruning, dict) else {})}
        if "quality" in provenance:
            metadata["quality"] = provenance["quality"]
        return Checkpoint(state_dict=self.dense_state_dict(), arch=self.arch, config=self.config, metadata=metadata,
                          family=self.family)

    def summary(self) -> dict:
        """Per-layer rows and totals, as ``describe()`` and the export report show them."""
        rows = [
            {
                "name": layer.name,
                "shape": list(layer.shape),
                "layout": layer.layout,
                "dtype": layer.dtype,
                "index": layer.index,
                "block": list(layer.block) if layer.block else None,
                "sparsity": layer.sparsity,
                "nnz": layer.nnz,
                "bytes": layer.stored_bytes,
            }
            for layer in self.layers.values()
        ]
        eligible = [self.layers[n] for n in sparse_eligible(list(self.layers))]
        n_weights = sum(math.prod(layer.shape) for layer in eligible)
        n_zeros = sum(layer.sparsity * math.prod(layer.shape) for layer in eligible)
        shapes = {f"{n}.weight": layer.shape for n, layer in self.layers.items()}
        shapes.update({k: tuple(v.shape) for k, v in self.tensors.items()})
        dense_bytes = dense_fp32_nbytes(shapes)
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "family": self.family,
            "arch": self.arch,
            "scale": self.config.scale,
            "config": self.config.to_dict(),
            "provenance": self.provenance,
            "layers": rows,
            "sparsity": n_zeros / n_weights if n_weights else 0.0,
            "size_bytes": self.size_bytes,
            "dense_fp32_bytes": dense_bytes,
            "size_ratio": self.size_bytes / dense_bytes,
        }


def read_file(path: str | os.PathLike) -> SparseModelFile:
    """Read and fully validate an exported sparsesr model file (raises ``SparseFormatError``)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SparseFormatError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    return parse_bytes(data, source=str(path))


def describe(path: str | os.PathLike) -> dict:
    """Per-layer layout, shape, sparsity and bytes of an exported file, plus totals."""
    return read_file(path).summary()


def is_sparse_model_file(path: str | os.PathLike) -> bool:
    """Cheap sniff: does this file's safetensors header say ``format: sparsesr``?"""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            if not 0 < n <= MAX_HEADER_BYTES:
                return False
            header = json.loads(f.read(n))
        return header.get("__metadata__", {}).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def parse_bytes(data: bytes, source: str = "<memory>") -> SparseModelFile:
    """Validate the bytes of a sparsesr file and return its decoded contents."""
    metadata, tensors = _read_safetensors(data, source)
    return _Validator(metadata, tensors, source).run(size_bytes=len(data))


# --- safetensors container ------------------------------------------------------------------


def _read_safetensors(data: bytes, source: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors.torch import load as load_tensors

    if len(data) < 8:
        raise SparseFormatError(f"{source}: not a safetensors file: {len(data)} bytes, expected at least 8")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > min(len(data) - 8, MAX_HEADER_BYTES):
        raise SparseFormatError(
            f"{source}: not a safetensors file or truncated: header length {header_len} "
            f"exceeds the {len(data) - 8} bytes that follow"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise SparseFormatError(f"{source}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SparseFormatError(f"{source}: safetensors header is a {type(header).__name__}, expected an object")
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SparseFormatError(f"{source}: no sparsesr metadata (__metadata__ of strings) in the header")
    try:
        tensors = load_tensors(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise SparseFormatError(f"{source}: damaged safetensors data ({_first_line(exc)})") from None
    return metadata, tensors


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# --- validation -------------------------------------------------------------------------------


class _Validator:
    """Checks one file; each ``_check_*`` raises ``SparseFormatError`` on the first problem."""

    def __init__(self, metadata: dict[str, str], tensors: dict[str, torch.Tensor], source: str) -> None:
        self.metadata = metadata
        self.tensors = tensors
        self.source = source
        self.used: set[str] = set()

    def fail(self, problem: str, layer: str | None = None) -> SparseFormatError:
        where = f"layer {layer}: " if layer else ""
        return SparseFormatError(f"{self.source}: {where}{problem}")

    def run(self, size_bytes: int) -> SparseModelFile:
        fmt = self.metadata.get("format")
        if fmt != FORMAT_NAME:
            raise self.fail(f"not a sparsesr model file: metadata format is {fmt!r}, expected {FORMAT_NAME!r}")
        version = self.metadata.get("format_version")
        if version != FORMAT_VERSION:
            raise self.fail(f"unsupported format_version {version!r}, this reader understands {FORMAT_VERSION!r}")
        family = self.metadata.get("family", "edsr")  # files written before the other families are EDSR
        config = self._config(family)
        arch = self.metadata.get("arch")
        if arch != arch_of(config):
            raise self.fail(f"metadata arch is {arch!r} but the config describes {arch_of(config)!r}")
        if self.metadata.get("scale") != str(config.scale):
            raise self.fail(f"metadata scale is {self.metadata.get('scale')!r}, config says {config.scale}")
        provenance = self._json("provenance", required=False)
        provenance = {} if provenance is None else provenance
        if not isinstance(provenance, dict):
            raise self.fail("metadata provenance must be a JSON object")

        conv_names, shapes = expected_structure(config)
        layer_meta = self._json("layers")
        if not isinstance(layer_meta, dict):
            raise self.fail("metadata layers must be a JSON object mapping layer names to records")
        if set(layer_meta) != set(conv_names):
            missing = sorted(set(conv_names) - set(layer_meta))
            extra = sorted(set(layer_meta) - set(conv_names))
            raise self.fail(f"metadata layers do not match the architecture: missing {missing[:5]}, unexpected {extra[:5]}")
        layers = {name: self._layer(name, layer_meta[name], shapes[f"{name}.weight"]) for name in conv_names}

        conv_weights = {f"{name}.weight" for name in conv_names}
        others = {key: self._tensor(key, (torch.float32,), shape, layer=None)
                  for key, shape in shapes.items() if key not in conv_weights}
        unexpected = sorted(set(self.tensors) - self.used)
        if unexpected:
            raise self.fail(f"unexpected tensors {unexpected[:5]}" + (f" ({len(unexpected)} in all)" if len(unexpected) > 5 else ""))
        return SparseModelFile(arch=arch, config=config, layers=layers, tensors=others, family=family, provenance=provenance,
                               format_version=version, size_bytes=size_bytes, source=self.source)

    # -- metadata --

    def _json(self, key: str, required: bool = True):
        if key not in self.metadata:
            if required:
                raise self.fail(f"metadata has no {key!r} entry")
            return None
        try:
            return json.loads(self.metadata[key])
        except (ValueError, RecursionError) as exc:
            raise self.fail(f"metadata {key!r} is not valid JSON ({exc})") from None

    def _config(self, family: str) -> Any:
        try:
            get_family(family)
        except ConfigError as exc:
            raise self.fail(f"bad metadata family: {exc}") from None
        try:  # the same checks as for a checkpoint's config (sparsesr.models.checkpoint)
            return validated_config(self._json("config"), family)
        except ConfigError as exc:
            raise self.fail(f"bad metadata config: {exc}") from None

    # -- tensors --

    def _tensor(self, key: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...] | None,
                layer: str | None, dims: int | None = None) -> torch.Tensor:
        t = self.tensors.get(key)
        if t is None:
            raise self.fail(f"tensor {key!r} is missing", layer)
        self.used.add(key)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise self.fail(f"tensor {key!r} has dtype {str(t.dtype).removeprefix('torch.')}, expected {names}", layer)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise self.fail(f"tensor {key!r} has shape {list(t.shape)}, expected {list(shape)}", layer)
        if dims is not None and t.dim() != dims:
            raise self.fail(f"tensor {key!r} has {t.dim()} dimensions, expected {dims}", layer)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise self.fail(f"tensor {key!r} holds NaN or infinite values", layer)
        return t

    def _layer(self, name: str, meta, shape: tuple[int, ...]) -> ConvLayer:
        if not isinstance(meta, dict):
            raise self.fail("metadata record must be a JSON object", name)
        layout, dtype_name, index = meta.get("layout"), meta.get("dtype"), meta.get("index")
        if not isinstance(layout, str) or layout not in LAYOUTS:
            raise self.fail(f"layout {layout!r}, expected one of {list(LAYOUTS)}", name)
        if not isinstance(dtype_name, str) or dtype_name not in VALUE_DTYPES:
            raise self.fail(f"dtype {dtype_name!r}, expected one of {list(VALUE_DTYPES)}", name)
        if meta.get("shape") != list(shape):
            raise self.fail(f"metadata shape {meta.get('shape')!r}, the architecture needs {list(shape)}", name)
        if layout == "dense":
            index = None
        elif not isinstance(index, str) or index not in layouts.INDEX_ENCODINGS:
            raise self.fail(f"index encoding {index!r}, expected one of {list(layouts.INDEX_ENCODINGS)}", name)
        value_dtype = (VALUE_DTYPES[dtype_name],)
        names = weight_tensor_names(name, layout, index)
        c_out, k = shape[0], math.prod(shape[1:])
        block = None

        if layout == "dense":
            tensors = {"weight": self._tensor(names[0], value_dtype, shape, name)}
        elif layout == "csr":
            values = self._tensor(names[-1], value_dtype, None, name, dims=1)
            row_ptr, col_idx = self._pattern(name, names, index, c_out, k, values.shape[0])
            tensors = {"row_ptr": row_ptr, "col_idx": col_idx, "values": values}
        else:
            block = meta.get("block")
            if not (isinstance(block, list) and len(block) == 2 and all(is_int(b) for b in block)
                    and 1 <= block[0] <= min(c_out, MAX_BLOCK_SIDE) and 1 <= block[1] <= min(k, MAX_BLOCK_SIDE)):
                raise self.fail(f"block {block!r}, expected [b_h, b_w] with 1 <= b_h <= min(C_out, {MAX_BLOCK_SIDE}) "
                                f"and 1 <= b_w <= min(K, {MAX_BLOCK_SIDE})", name)
            block = (block[0], block[1])
            values = self._tensor(names[-1], value_dtype, None, name, dims=3)
            if tuple(values.shape[1:]) != block:
                raise self.fail(f"block_values have blocks of {list(values.shape[1:])}, metadata says {list(block)}", name)
            n_block_rows, n_block_cols = -(-c_out // block[0]), -(-k // block[1])
            row_ptr, col_idx = self._pattern(name, names, index, n_block_rows, n_block_cols, values.shape[0])
            tensors = {"block_row_ptr": row_ptr, "block_col_idx": col_idx, "block_values": values}

        layer = ConvLayer(name=name, layout=layout, shape=tuple(shape), dtype=dtype_name, sparsity=0.0,
                          stored_bytes=sum(self.tensors[n].numel() * self.tensors[n].element_size() for n in names),
                          tensors=tensors, index=index, block=block)
        layer.sparsity = 1.0 - _count_nonzero(layer) / math.prod(shape)
        stated = meta.get("sparsity")
        if not (is_finite_number(stated) and abs(stated - layer.sparsity) <= SPARSITY_TOLERANCE):
            raise self.fail(f"metadata sparsity {stated!r} but the weights are {layer.sparsity:.6f} sparse", name)
        if meta.get("nnz") != layer.nnz:
            raise self.fail(f"metadata nnz {meta.get('nnz')!r} but {layer.nnz} entries are stored", name)
        return layer

    def _pattern(self, layer: str, names: tuple[str, ...], index: str, n_rows: int, n_cols: int,
                 nnz: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode and check the index tensors of an ``[n_rows, n_cols]`` pattern with ``nnz`` entries."""
        if index == "bitmask":
            mask = self._tensor(names[0], (torch.uint8,), (-(-n_rows * n_cols // 8),), layer)
            bits = layouts.unpack_bits(mask)
            if bool(bits[n_rows * n_cols :].any()):
                raise self.fail(f"tensor {names[0]!r} has bits set past the {n_rows}x{n_cols} matrix", layer)
            bits = bits[: n_rows * n_cols].reshape(n_rows, n_cols)
            if int(bits.sum()) != nnz:
                raise self.fail(f"mask has {int(bits.sum())} bits set but {nnz} values are stored", layer)
            rows, cols = bits.nonzero(as_tuple=True)
            row_ptr = torch.zeros(n_rows + 1, dtype=torch.int64)
            row_ptr[1:] = bits.sum(dim=1).cumsum(0)
            return row_ptr.int(), cols.int()

        row_ptr = self._tensor(names[0], INDEX_DTYPES, (n_rows + 1,), layer).long()
        what = names[0].rsplit(".", 1)[-1]
        if int(row_ptr[0]) != 0:
            raise self.fail(f"{what} starts at {int(row_ptr[0])}, expected 0", layer)
        if bool((row_ptr[1:] < row_ptr[:-1]).any()):
            raise self.fail(f"{what} decreases", layer)
        if int(row_ptr[-1]) != nnz:
            raise self.fail(f"{what} ends at {int(row_ptr[-1])}, expected nnz = {nnz} (the number of stored values)", layer)
        # Positions that begin a row: their column is not compared with the previous entry's.
        row_start = torch.zeros(nnz, dtype=torch.bool)
        row_start[row_ptr[:-1][row_ptr[:-1] < row_ptr[1:]]] = True
        col_name = names[1].rsplit(".", 1)[-1]

        if index == "delta8":
            deltas = self._tensor(names[1], (torch.uint8,), (nnz,), layer).long()
            if bool((deltas[~row_start] == 0).any()):
                raise self.fail(f"{col_name} has a zero gap inside a row (duplicate column)", layer)
            cols = deltas.cumsum(0)
            before_row = torch.cat([cols.new_zeros(1), cols])[row_ptr[:-1]]  # running sum before each row
            cols = cols - torch.repeat_interleave(before_row, row_ptr[1:] - row_ptr[:-1])
        else:
            cols = self._tensor(names[1], INDEX_DTYPES, (nnz,), layer).long()
            if bool((cols[1:] <= cols[:-1])[~row_start[1:]].any()):
                raise self.fail(f"{col_name} not strictly ascending within a row", layer)
        if nnz and (int(cols.min()) < 0 or int(cols.max()) >= n_cols):
            raise self.fail(f"{col_name} out of range: found {int(cols.min())}..{int(cols.max())}, expected 0..{n_cols - 1}", layer)
        return row_ptr.int(), cols.int()


def _count_nonzero(layer: ConvLayer) -> int:
    """Nonzero weights, without densifying (a hostile file may describe a huge, empty layer)."""
    t = layer.tensors
    if layer.layout == "dense":
        return int(torch.count_nonzero(t["weight"]))
    if layer.layout == "csr":
        return int(torch.count_nonzero(t["values"]))
    # BSR: entries of the zero padding past the last row / column of the matrix do not count.
    b_h, b_w = layer.block
    c_out, k = layer.shape[0], math.prod(layer.shape[1:])
    row_ptr = t["block_row_ptr"].long()
    block_rows = torch.repeat_interleave(torch.arange(row_ptr.numel() - 1), row_ptr[1:] - row_ptr[:-1])
    rows_inside = (c_out - block_rows[:, None] * b_h) > torch.arange(b_h)  # [nnz_blocks, b_h]
    cols_inside = (k - t["block_col_idx"].long()[:, None] * b_w) > torch.arange(b_w)  # [nnz_blocks, b_w]
    inside = rows_inside[:, :, None] & cols_inside[:, None, :]
    return int(torch.count_nonzero(t["block_values"].ne(0) & inside))
