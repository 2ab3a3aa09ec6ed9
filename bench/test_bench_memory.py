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
from upscale_memory import measure as upscale_peak_memory
from sparsesr.format import export
from sparsesr.models import build_model
from sparsesr.models.checkpoint import Checkpoint, save_checkpoint
from sparsesr.pruning import one_shot_prune

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Whole upscales of a 4000x3000 photo-sized input with the default x2 model (bench/upscale_memory.py):
# the 8-bit result written band by band, with the automatic tile and with explicit smaller ones. One
# case in the standard set: each is a few minutes of compute on 2 cores.
UPSCALE_CASES = bench_grid([("file", 0)],
                           [(path, tile) for path in ("uint8", "file", "pixels") for tile in (0, 256, 512)])
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


@pytest.mark.parametrize("path,tile", UPSCALE_CASES, ids=[f"upscale-4000x3000-{p}-tile{t or 'auto'}" for p, t in UPSCALE_CASES])
def test_upscale_peak_memory(benchmark, bench_threads, path, tile):
    """Peak RSS of a 4000x3000 x2 upscale (12 Mpx in, 48 Mpx out) in a fresh process, on the CPU.

    Before the banded tiling (2026-11), ``--path file`` peaked at 2107 MiB: the float32 output
    (549 MiB) was allocated whatever the tile, then copied by the clamp and the encoder's rounding.
    """
    result = benchmark.pedantic(upscale_peak_memory, args=(3000, 4000, path, tile), kwargs={"threads": bench_threads},
                                rounds=1, iterations=1)
    benchmark.group = "memory upscale 4000x3000"
    # No "suite" key: bench/report.py's tables would need a column set for these rows first.
    benchmark.extra_info.update({"kind": "upscale_memory", "path": path, "tile": tile, "device": "cpu",
                                 "threads": bench_threads, **{k: result[k] for k in (
                                     "rss_before_bytes", "rss_peak_bytes", "upscale_bytes", "float_output_bytes",
                                     "seconds")}})
    if path.startswith("uint8"):  # the banded path: well below one float copy of the output
        assert result["upscale_bytes"] < result["float_output_bytes"]
