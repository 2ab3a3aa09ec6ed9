"""Reduced precision: which half types run fast on this device, and the bf16 copy of a model for the CPU.

On the CPU the sparse kernel computes in fp32 only and PyTorch's fp16 convolutions are emulated
(about 40x slower than fp32). bf16 is fast only where oneDNN runs its convolutions on AMX-BF16
tiles (Intel Sapphire Rapids and later): there :class:`DenseBf16` runs the network's convs
dense, in bf16 with fp32 accumulation, channels-last. Anywhere else a half type asked for on the
CPU is replaced by fp32 with a one-line warning (:func:`compute_dtype`).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from sparsesr.runtime.conv import SparseConv2d
from sparsesr.runtime.cpuinfo import cpu_info

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The automatic tile for the bf16 CPU path: it keeps no activation buffers across calls (PyTorch
# allocates each op's output afresh), so large tiles pay page faults on every op.
BF16_CPU_MAX_TILE = 384


def cpu_has_amx_bf16() -> bool:
    """True when this CPU has AMX-BF16 tiles and PyTorch's oneDNN (which uses them) is built in."""
    return "amx_bf16" in cpu_info().flags and torch.backends.mkldnn.is_available()


def cpu_fast_half() -> tuple[torch.dtype, ...]:
    """The half types that run faster than fp32 on this CPU: bf16 with AMX-BF16, else none."""
    return (torch.bfloat16,) if cpu_has_amx_bf16() else ()


def compute_dtype(precision: str, device: torch.device, warn: Callable[[str], None]) -> torch.dtype:
    """The dtype to compute in for ``precision`` ("fp32", "fp16", "bf16") on ``device``: a half
    type without a fast path on the CPU becomes fp32, saying so once through ``warn``."""
    dtype = DTYPES[precision]
    if device.type == "cpu" and dtype != torch.float32 and dtype not in cpu_fast_half():
        needs = " (it needs a CPU with AMX-BF16)" if dtype == torch.bfloat16 else ""
        warn(f"{precision} has no fast CPU path here{needs}; running fp32")
        return torch.float32
    return dtype


class DenseBf16(nn.Module):
    """A bf16 copy of a runtime model (``sparsesr.load``, any family) for CPUs with AMX-BF16.

    Every ``SparseConv2d`` of the copy stores its weight dense and runs PyTorch's dense conv
    (oneDNN: bf16 in, fp32 accumulate) with its fused epilogue (activation, residual add, pixel
    shuffle); weights and activations are channels-last, the layout oneDNN's AMX kernels take
    without a reorder. Takes float input of any dtype, returns float32. The original model is
    left as it is; the copy holds no kept fp32 activation buffers.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        twin = copy.deepcopy(net)  # forward hooks come along: path counters see the copy's calls
        if hasattr(twin, "release_buffers"):
            twin.release_buffers()
        for conv in twin.modules():
            if isinstance(conv, SparseConv2d):
                conv.store_dense()
                if conv.backend != "auto":  # a forced "cpu" (fp32-only kernel) or "triton" cannot run bf16
                    conv.backend = "dense"  # "auto" takes dense by itself for bf16, and says why
        self.net = twin.to(dtype=torch.bfloat16, memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x.to(torch.bfloat16, memory_format=torch.channels_last))
        return y.to(torch.float32, memory_format=torch.contiguous_format)


def half_network(net: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A copy of ``net`` computing in ``dtype`` on ``device``: :class:`DenseBf16` for bf16 on the CPU,
    else the copy cast to ``dtype`` (it takes and returns ``dtype``)."""
    if device.type == "cpu" and dtype == torch.bfloat16:
        return DenseBf16(net)
    return copy.deepcopy(net).to(dtype)
