"""File size: dense fp32 safetensors vs the exported sparsesr file, per sparsity, pattern and dtype.

    python -m pytest bench/test_bench_size.py --benchmark-only

Random weights (seed 0) magnitude-pruned with ``one_shot_prune``; the layout is forced to match
the pattern (``csr`` for 1x1, ``bsr`` for 4x1 blocks, ``dense`` at 0 %) so sizes do not depend on
this machine's kernel timings (``layout="auto"`` would). The timed call is ``export_bytes``
(export time); the sizes are in ``extra_info``.
"""
from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import save

from sparsesr.benchmark import bench_grid
from sparsesr.format import export_bytes
from sparsesr.models import build_model
from sparsesr.models.checkpoint import Checkpoint
from sparsesr.pruning import one_shot_prune

SPARSITIES = [0.0, 0.5, 0.75, 0.9, 0.95]
ARCHS = bench_grid(["edsr-cpu", "edsr-baseline"], ["edsr-cpu", "edsr-baseline", "edsr"])
CASES = [(arch, s, p) for arch in ARCHS for p in ("1x1", "4x1") for s in SPARSITIES]
LAYOUT = {"1x1": "csr", "4x1": "bsr"}


@functools.lru_cache(maxsize=2)
def pruned_checkpoint(arch: str, sparsity: float, pattern: str) -> Checkpoint:
    torch.manual_seed(0)
    model = build_model(arch, 2)
    if sparsity > 0:
        one_shot_prune(model, sparsity, granularity=pattern)
    return Checkpoint(state_dict=model.state_dict(), arch=arch, config=model.config)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("arch,sparsity,pattern", CASES, ids=[f"{a}-{p}-{s:.0%}" for a, s, p in CASES])
def test_file_size(benchmark, arch, sparsity, pattern, dtype):
    checkpoint = pruned_checkpoint(arch, sparsity, pattern)
    layout = LAYOUT[pattern] if sparsity > 0 else "dense"
    dense_bytes = len(save({k: v.float().contiguous() for k, v in checkpoint.state_dict.items()}))
    data = benchmark.pedantic(export_bytes, args=(checkpoint,), kwargs={"dtype": dtype, "layout": layout},
                              rounds=1, iterations=1)
    assert len(data) > 0
    benchmark.group = f"size {arch}"
    benchmark.extra_info.update(suite="size", arch=arch, scale=2, sparsity=sparsity, pattern=pattern, dtype=dtype,
                                layout=layout, dense_fp32_bytes=dense_bytes, file_bytes=len(data),
                                size_ratio=len(data) / dense_bytes)
