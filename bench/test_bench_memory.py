"""Peak memory of one forward: dense PyTorch eager vs the sparse runtime, each in a fresh process.

    python -m pytest bench/test_bench_memory.py --benchmark-only

``sparsesr.benchmark.peak_memory`` runs the forward in a child process and reports its RSS before
the forward and the peak RSS during it (Linux: the peak is reset just before the forward), and on
CUDA ``torch.cuda.max_memory_allocated``.
The dense child loads the pruned checkpoint as a plain ``nn.Module``; the sparse child loads the
exported file (``backend="auto"``, so it includes the CPU kernel's one-time weight packing and
dispatch calibration). The timed call is the sparse child process, start-up included: it is
not a latency, only what pytest-benchmark needs to keep the record.
"""
from __future__ import annotations

import pytest
import torch

from sparsesr.benchmark import bench_grid, peak_memory
from sparsesr.format import export
from sparsesr.models import build_model
from sparsesr.models.checkpoint import Checkpoint, save_checkpoint
from sparsesr.pruning import one_shot_prune

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = bench_grid(
    [("edsr-baseline", 128, 0.9, "1x1"), ("edsr-baseline", 128, 0.9, "4x1"), ("edsr-baseline", 256, 0.9, "1x1")],
    [(a, z, s, p) for a in ("edsr-cpu", "edsr-baseline", "edsr") for z in (128, 256)
     for s in (0.5, 0.9, 0.95) for p in ("1x1", "4x1")],
)


@pytest.mark.parametrize("arch,size,sparsity,pattern", CASES, ids=[f"{a}-{z}px-{p}-{s:.0%}" for a, z, s, p in CASES])
def test_peak_memory(benchmark, tmp_path, bench_threads, arch, size, sparsity, pattern):
    torch.manual_seed(0)
    model = build_model(arch, 2)
    one_shot_prune(model, sparsity, granularity=pattern)
    checkpoint_path, sparse_path = tmp_path / "dense.safetensors", tmp_path / "model.sparsesr.safetensors"
    save_checkpoint(checkpoint_path, model)
    export(Checkpoint(state_dict=model.state_dict(), arch=arch, config=model.config), sparse_path)
    dense = peak_memory(checkpoint_path, size, device=DEVICE, threads=bench_threads)
    sparse = benchmark.pedantic(peak_memory, args=(sparse_path, size),
                                kwargs={"device": DEVICE, "threads": bench_threads}, rounds=1, iterations=1)
    assert dense["output_shape"] == sparse["output_shape"]
    benchmark.group = f"memory {arch} {size}px"
    info = {"suite": "memory", "arch": arch, "scale": 2, "size": size, "sparsity": sparsity, "pattern": pattern,
            "device": DEVICE, "threads": bench_threads}
    for name, result in (("dense", dense), ("sparse", sparse)):
        info[f"{name}_rss_peak_bytes"] = result["rss_peak_bytes"]
        info[f"{name}_forward_rss_bytes"] = result["forward_rss_bytes"]
        if "cuda_peak_bytes" in result:
            info[f"{name}_cuda_peak_bytes"] = result["cuda_peak_bytes"]
    benchmark.extra_info.update(info)
