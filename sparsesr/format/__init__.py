"""The compressed model file: spec'd layouts (dense / csr / bsr), export, validating loader.

>>> report = export("pruned.safetensors", "model.sparsesr.safetensors", dtype="fp16")
>>> model_file = read_file("model.sparsesr.safetensors")   # raises SparseFormatError if damaged
>>> describe("model.sparsesr.safetensors")["size_ratio"]

The layout on disk is specified in docs/format.md.
"""
from __future__ import annotations

from sparsesr.format.writer import ExportReport, export, export_bytes
from sparsesr.format.reader import ConvLayer, SparseModelFile, describe, is_sparse_model_file, parse_bytes, read_file
from sparsesr.format.spec import FORMAT_NAME, FORMAT_VERSION

__all__ = [
    "ConvLayer", "ExportReport", "FORMAT_NAME", "FORMAT_VERSION", "SparseModelFile",
    "describe", "export", "export_bytes", "is_sparse_model_file", "parse_bytes", "read_file",
]
