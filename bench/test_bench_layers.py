"""One conv layer on the CPU: the sparse kernel vs dense ``F.conv2d`` (oneDNN), in the same run.

    SPARSESR_BENCH_THREADS=2 python -m pytest bench/test_bench_layers.py --benchmark-only

Layers of EDSR: 3x3 64->64 (EDSR-baseline body), 3x3 256->256 (EDSR body), 1x1 64->256.
Weights are random and magnitude-pruned with ``sparsesr.pruning.one_shot_prune`` per weight
(``1x1``, stored CSR) or per 4x1 / 8x1 block of output channels (BSR). The standard set is a
subset that runs in about a minute on 2 cores; SPARSESR_BENCH_FULL=1 runs layers x sparsities
x patterns x sizes (189 cases; the 256-channel layer at 256x256 alone takes minutes).
The GPU layer benchmark (Triton vs cuDNN) is bench/test_bench_triton.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsesr.kernels import cpu
from sparsesr.benchmark import bench_grid
from sparsesr.pruning import one_shot_prune

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"CPU kernel not built: {cpu.unavailable_reason()}")

LAYERS = {  # name: (C_in, C_out, kernel size)
    "64to64_3x3": (64, 64, 3),
    "256to256_3x3": (256, 256, 3),
    "64to256_1x1": (64, 256, 1),
}
SPARSITIES = [0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98]
PATTERNS = ["1x1", "4x1", "8x1"]
SIZES = [64, 128, 256]

STANDARD = (
    [("64to64_3x3", 128, s, p) for p in PATTERNS for s in SPARSITIES]
    + [("256to256_3x3", 64, s, p) for p in ("1x1", "4x1") for s in (0.0, 0.9, 0.95)]
    + [("64to256_1x1", 128, s, p) for p in ("1x1", "4x1") for s in (0.0, 0.9)]
)
FULL = [(layer, size, s, p) for layer in LAYERS for size in SIZES for p in PATTERNS for s in SPARSITIES]
CASES = bench_grid(STANDARD, FULL)


def pruned_conv(layer: str, sparsity: float, pattern: str) -> nn.Conv2d:
    c_in, c_out, k = LAYERS[layer]
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2)
    if sparsity > 0:
        one_shot_prune(nn.Sequential(conv), sparsity, granularity=pattern, include=[".*"])
    return conv


@pytest.mark.parametrize("layer,size,sparsity,pattern", CASES,
                         ids=[f"{l}-{z}px-{p}-{s:.0%}" for l, z, s, p in CASES])
def test_layer(paired, benchmark, layer, size, sparsity, pattern):
    c_in, c_out, k = LAYERS[layer]
    conv = pruned_conv(layer, sparsity, pattern)
    weight, bias = conv.weight.detach(), conv.bias.detach()
    prepared = cpu.prepare_dense(weight)
    x = torch.randn(1, c_in, size, size, generator=torch.Generator().manual_seed(1))

    def dense():
        return F.conv2d(x, weight, bias, padding=k // 2)

    def sparse():
        return cpu.conv2d(x, prepared, bias)

    torch.testing.assert_close(sparse(), dense(), rtol=1e-4, atol=1e-3)  # time only correct results
    benchmark.group = f"layer {layer} {size}px"
    dense_gflop = 2 * weight.numel() * size * size / 1e9
    record = paired(dense, sparse, suite="layer", layer=layer, size=size, sparsity=sparsity, pattern=pattern,
                    layout=prepared.layout, isa=cpu.isa(), nnz=prepared.nnz,
                    actual_sparsity=1 - prepared.nnz / weight.numel(), dense_gflop=dense_gflop)
    benchmark.extra_info["dense_gflops"] = dense_gflop / (record["dense_ms"] / 1e3)
    benchmark.extra_info["sparse_effective_gflops"] = 2 * prepared.nnz * size * size / 1e9 / (record["sparse_ms"] / 1e3)
