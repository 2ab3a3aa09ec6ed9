"""Triton sparse convolution against cuDNN on the EDSR layers, in the same run.

    pytest bench/test_bench_triton.py --benchmark-columns=median,ops --benchmark-sort=name

Layers (docs/triton-kernels.md has their roofline): 64->64 3x3, 256->256 3x3 and 64->256 1x1 on
one 256x256 image. Precisions: fp32 (no TF32 anywhere), tf32 (cuDNN and tl.dot allowed TF32)
and fp16. Weights are pruned by magnitude (CSR: single weights; BSR: 4x1 / 16x1 blocks of
output channels by block norm) to 50-95 %. Each sparse case also records, in ``extra_info``, the
cuDNN time of the same layer and precision measured in this run and ``speedup_vs_cudnn``, so the
report never compares numbers from different runs or machines. Skipped without a CUDA GPU.
"""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU: the Triton kernels are only timed on one", allow_module_level=True)

from sparsesr.kernels import triton as tk  # noqa: E402

if not tk.available():
    pytest.skip(f"Triton kernels cannot run: {tk.unavailable_reason()}", allow_module_level=True)

SIZE = 256
LAYERS = {  # name: (C_in, C_out, k)
    "64to64_3x3": (64, 64, 3),
    "256to256_3x3": (256, 256, 3),
    "64to256_1x1": (64, 256, 1),
}
PRECISIONS = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16}
SPARSITIES = [0.5, 0.75, 0.9, 0.95]
FORMATS = ["csr", "bsr4x1", "bsr16x1"]


@contextlib.contextmanager
def cudnn_tf32(enabled: bool):
    """cuDNN's TF32 switch, set for one timing and restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(autouse=True, scope="module")
def cudnn_autotuning():
    """Let cuDNN pick its fastest algorithm, as the Triton kernels pick their config."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    yield
    torch.backends.cudnn.benchmark = saved


@functools.cache
def layer_inputs(layer: str, precision: str):
    c_in, c_out, k = LAYERS[layer]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, c_in, SIZE, SIZE, generator=gen)
    weight = torch.randn(c_out, c_in, k, k, generator=gen) / (c_in * k * k) ** 0.5
    bias = torch.randn(c_out, generator=gen) * 0.1
    dtype = PRECISIONS[precision]
    return x.cuda().to(dtype), weight.cuda().to(dtype), bias.cuda().to(dtype)


def prune(weight: torch.Tensor, sparsity: float, block_h: int) -> torch.Tensor:
    """Zero the fraction ``sparsity`` of weights (block_h = 1) or of block_h x 1 blocks with
    the smallest magnitude (L2 norm for blocks)."""
    c_out = weight.shape[0]
    matrix = weight.reshape(c_out // block_h, block_h, -1)
    scores = matrix.float().norm(dim=1)  # [block rows, K]
    n_cut = int(round(sparsity * scores.numel()))
    threshold = scores.flatten().kthvalue(max(n_cut, 1)).values
    keep = (scores > threshold) if n_cut else torch.ones_like(scores, dtype=torch.bool)
    return (matrix * keep[:, None, :]).reshape(weight.shape)


def block_height(fmt: str) -> int:
    return 1 if fmt == "csr" else int(fmt.removeprefix("bsr").split("x")[0])


def sparse_args(weight: torch.Tensor, fmt: str) -> list[torch.Tensor]:
    """(row_ptr, col_idx, values) in the CSR / BSR layouts of common.md, on weight's device.
    torch's own CSR/BSR conversion happens to produce exactly these layouts."""
    matrix = weight.reshape(weight.shape[0], -1).cpu()
    if fmt == "csr":
        sparse = matrix.to_sparse_csr()
    else:
        sparse = matrix.to_sparse_bsr((block_height(fmt), 1))
    parts = sparse.crow_indices().int(), sparse.col_indices().int(), sparse.values()
    return [t.to(weight.device) for t in parts]


def gpu_time(fn, repeats: int = 50) -> float:
    """Median seconds of ``fn`` on the GPU, measured with CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def dense_call(layer: str, precision: str, weight: torch.Tensor | None = None):
    x, dense_weight, bias = layer_inputs(layer, precision)
    weight = dense_weight if weight is None else weight
    padding = weight.shape[-1] // 2
    return lambda: F.relu(F.conv2d(x, weight, bias, padding=padding))


@functools.cache
def cudnn_seconds(layer: str, precision: str) -> float:
    with cudnn_tf32(precision == "tf32"):
        return gpu_time(dense_call(layer, precision))


def synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("layer", list(LAYERS))
def test_cudnn_dense(benchmark, layer, precision):
    c_in, c_out, k = LAYERS[layer]
    benchmark.group = f"{layer} {precision}"
    benchmark.extra_info.update(layer=layer, precision=precision, format="dense", sparsity=0.0,
                                gflop=2 * c_in * c_out * k * k * SIZE * SIZE / 1e9)
    with cudnn_tf32(precision == "tf32"):
        benchmark(synced(dense_call(layer, precision)))


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("layer", list(LAYERS))
def test_triton_sparse(benchmark, layer, precision, fmt, sparsity):
    if fmt == "csr" and precision == "tf32":
        pytest.skip("the CSR kernel has no tensor-core path: tf32 is its fp32 case")
    x, weight, bias = layer_inputs(layer, precision)
    c_in, c_out, k = LAYERS[layer]
    pruned = prune(weight, sparsity, block_height(fmt))
    indices = sparse_args(pruned, fmt)
    if fmt == "csr":
        def call():
            return tk.csr_conv2d(x, *indices, bias, k, k, relu=True)
    else:
        def call():
            return tk.bsr_conv2d(x, *indices, c_out, bias, k, k, relu=True,
                                 allow_tf32=precision == "tf32")

    # Same answer as an fp32 cuDNN conv of the same (rounded) inputs, before any timing.
    with cudnn_tf32(False):
        expected = F.relu(F.conv2d(x.float(), pruned.float(), bias.float(), padding=k // 2))
    tolerance = 1e-3 if precision == "fp32" else 2e-2
    torch.testing.assert_close(call().float(), expected, atol=tolerance, rtol=tolerance)

    sparse_seconds = gpu_time(call)  # also runs the autotuner before timing
    dense_seconds = cudnn_seconds(layer, precision)
    density = 1 - sparsity
    benchmark.group = f"{layer} {precision}"
    benchmark.extra_info.update(
        layer=layer, precision=precision, format=fmt, sparsity=sparsity,
        gflop_useful=2 * c_in * c_out * k * k * SIZE * SIZE * density / 1e9,
        cudnn_median_s=dense_seconds, triton_median_s=sparse_seconds,
        speedup_vs_cudnn=dense_seconds / sparse_seconds, flop_ideal_speedup=1 / density,
    )
    benchmark(synced(call))
