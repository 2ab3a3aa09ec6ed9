"""Run exported sparse models: ``SparseConv2d``, backend dispatch, model assembly from a file (any
family; ``sparsesr.runtime.sparsify`` turns a network's convs sparse and fuses their epilogues).

>>> model = load("model.sparsesr.safetensors")          # device="auto", backend="auto"
>>> y = model(x)                                         # x: [N, 3, H, W] RGB in [0, 1]
>>> model.backend_report()["layers"][1]["path"]          # "cpu", "triton" or "dense"
"""
from __future__ import annotations

from sparsesr.runtime.backends import BACKENDS, BackendError
from sparsesr.runtime.conv import SparseConv2d
from sparsesr.runtime.model import FusedResBlock, RuntimeModel, SparseEDSR, SparseModel, load

__all__ = ["BACKENDS", "BackendError", "FusedResBlock", "RuntimeModel", "SparseConv2d", "SparseEDSR", "SparseModel",
           "load"]
