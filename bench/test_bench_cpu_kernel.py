"""CPU sparse convolution vs dense torch.nn.functional.conv2d (oneDNN), measured in the same run.

    python -m pytest bench/test_bench_cpu_kernel.py --benchmark-only \
        --benchmark-columns=min,median,rounds --benchmark-sort=name

Each test benchmarks the sparse kernel with pytest-benchmark and times the dense conv on the
same input right before it; `extra_info` holds both times, the speedup (dense / sparse, best
of the rounds) and the effective GFLOP/s (2 * nnz * pixels / time). Weights are random and
magnitude-pruned (per element, or per 4x1 output-channel block by block L1 norm).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from sparsesr.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"CPU kernel not built: {cpu.unavailable_reason()}")

ROUNDS = 5


def pruned_weight(c_out: int, c_in: int, sparsity: float, block: int, seed: int = 0) -> torch.Tensor:
    """Magnitude-prune a random 3x3 weight: single weights (block=1) or block x 1 channel groups."""
    weight = torch.randn(c_out, c_in, 3, 3, generator=torch.Generator().manual_seed(seed))
    scores = weight.reshape(c_out // block, block, -1).abs().sum(dim=1)  # [groups, K]
    n_pruned = int(sparsity * scores.numel())
    if n_pruned == 0:
        return weight
    threshold = scores.flatten().kthvalue(n_pruned).values
    keep = (scores > threshold).repeat_interleave(block, dim=0)
    return weight * keep.view_as(weight)


def best_time(fn, rounds: int = ROUNDS) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def record(benchmark, dense_s: float, flops: float, dense_flops: float) -> None:
    sparse_s = benchmark.stats.stats.min
    benchmark.extra_info.update({
        "threads": torch.get_num_threads(),
        "isa": cpu.isa(),
        "dense_ms": round(dense_s * 1e3, 3),
        "sparse_ms": round(sparse_s * 1e3, 3),
        "speedup": round(dense_s / sparse_s, 2),
        "sparse_effective_gflops": round(flops / sparse_s / 1e9, 1),
        "dense_gflops": round(dense_flops / dense_s / 1e9, 1),
    })


@pytest.mark.parametrize("pattern", ["unstructured", "4x1"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.95])
@pytest.mark.parametrize("size", [128, 256])
def test_layer_64x64_3x3(benchmark, size, sparsity, pattern):
    block = 4 if pattern == "4x1" else 1
    weight = pruned_weight(64, 64, sparsity, block)
    prepared = cpu.prepare_dense(weight)
    assert prepared.group == block
    x = torch.randn(1, 64, size, size)
    with torch.no_grad():
        dense_s = best_time(lambda: F.conv2d(x, weight, padding=1))
        out = benchmark.pedantic(cpu.conv2d, args=(x, prepared), rounds=ROUNDS, warmup_rounds=1)
        torch.testing.assert_close(out, F.conv2d(x, weight, padding=1), rtol=1e-4, atol=1e-3)
    pixels = size * size
    record(benchmark, dense_s, 2 * prepared.nnz * pixels, 2 * weight.numel() * pixels)


@pytest.mark.parametrize("config", ["unstructured-0.9", "4x1-0.9"])
def test_edsr_body_stack(benchmark, config):
    """The 16 residual blocks of EDSR-baseline (32 convs, 64 ch) at 128x128, fused epilogues."""
    pattern, sparsity = config.split("-")
    block = 4 if pattern == "4x1" else 1
    weights = [pruned_weight(64, 64, float(sparsity), block, seed=i) for i in range(32)]
    weights = [w * (2.0 / (w.ne(0).sum() / 64)).sqrt() for w in weights]  # He scale: no blow-up
    biases = [torch.randn(64) * 0.01 for _ in range(32)]
    prepared = [cpu.prepare_dense(w) for w in weights]
    x = torch.randn(1, 64, 128, 128)

    def dense() -> torch.Tensor:
        h = x
        for i in range(0, 32, 2):
            body = F.relu(F.conv2d(h, weights[i], biases[i], padding=1))
            h = h + 0.1 * F.conv2d(body, weights[i + 1], biases[i + 1], padding=1)
        return h

    def sparse() -> torch.Tensor:
        h = x
        for i in range(0, 32, 2):
            body = cpu.conv2d(h, prepared[i], biases[i], relu=True)
            h = cpu.conv2d(body, prepared[i + 1], biases[i + 1], residual=h, res_scale=0.1)
        return h

    with torch.no_grad():
        dense_s = best_time(dense, rounds=2)
        out = benchmark.pedantic(sparse, rounds=2, warmup_rounds=1)
        torch.testing.assert_close(out, dense(), rtol=1e-3, atol=1e-3)
    pixels = 128 * 128
    nnz = sum(p.nnz for p in prepared)
    record(benchmark, dense_s, 2 * nnz * pixels, 2 * sum(w.numel() for w in weights) * pixels)


def load_build(path: str):
    """Another build of the extension (e.g. of an older commit), loaded next to the installed one."""
    spec = importlib.util.spec_from_file_location("sparseconv_other._sparseconv", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_with(build, fn):
    """Call fn with cpu.conv2d running on `build` (None: the installed one)."""
    if build is None:
        return fn()
    installed, cpu._sparseconv = cpu._sparseconv, build
    try:
        return fn()
    finally:
        cpu._sparseconv = installed


def cpu_time_table(sizes=(128, 256), sparsities=(0.5, 0.9, 0.95), threads: int = 1,
                   against: str | None = None, rounds: int = 5) -> None:
    """Print dense vs sparse per layer in *process CPU time*.

    On a shared machine wall-clock times swing with other people's load; CPU time of this
    process is steadier. Each round times dense, the installed kernel and (with ``against``,
    the path of another build's ``_sparseconv*.so``) that build, interleaved; a time is the
    best of 2 calls, the table shows medians over the rounds, ratios per round.
    Run: python bench/test_bench_cpu_kernel.py [--threads N] [--against OLD.so]
    """
    torch.set_num_threads(threads)
    builds = {"sparse": None}
    if against:
        builds["against"] = load_build(against)

    def cpu_time(fn, calls: int = 2) -> float:
        best = float("inf")
        for _ in range(calls):
            start = time.process_time()
            fn()
            best = min(best, time.process_time() - start)
        return best

    print(f"threads={threads} isa={cpu.isa()}  (process CPU time, medians of {rounds} interleaved rounds)")
    for size in sizes:
        x = torch.randn(1, 64, size, size)
        for sparsity in sparsities:
            for block in (1, 4):
                weight = pruned_weight(64, 64, sparsity, block)
                prepared = cpu.prepare_dense(weight)
                fns = {"dense": lambda: F.conv2d(x, weight, padding=1)}
                for name, build in builds.items():
                    fns[name] = lambda build=build: run_with(build, lambda: cpu.conv2d(x, prepared))
                    torch.testing.assert_close(fns[name](), fns["dense"](), rtol=1e-4, atol=1e-3)
                times = {name: [] for name in fns}
                for _ in range(rounds):
                    for name, fn in fns.items():
                        times[name].append(cpu_time(fn))
                dense_s = statistics.median(times["dense"])
                line = (f"64->64 3x3 {size}x{size} {sparsity:.0%} {prepared.layout:7s} "
                        f"dense {dense_s * 1e3:7.2f} ms")
                for name in builds:
                    ratio = statistics.median(d / s for d, s in zip(times["dense"], times[name]))
                    sparse_s = statistics.median(times[name])
                    line += (f" | {name} {sparse_s * 1e3:7.2f} ms x{ratio:5.2f} "
                             f"eff {2 * prepared.nnz * size * size / sparse_s / 1e9:5.1f} GFLOP/s")
                print(line)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="dense vs sparse CPU kernel per layer, CPU time")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--against", help="another build's _sparseconv*.so to compare in the same process")
    parser.add_argument("--sizes", default="128,256")
    args = parser.parse_args()
    with torch.no_grad():
        cpu_time_table(sizes=tuple(int(v) for v in args.sizes.split(",")), threads=args.threads,
                       against=args.against)
