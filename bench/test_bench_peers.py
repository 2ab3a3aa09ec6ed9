"""sparsesr against the engines a user could run the same weights on (issue #12, docs/performance.md).

Each case times one forward on sparsesr, PyTorch eager, ONNX Runtime, OpenVINO (f32 and its default
precision) and DeepSparse in alternating rounds (`sparsesr.peers.compare_engines`), after checking
that every engine's output agrees with PyTorch's. Missing engines are reported as skipped rows
(`tools/install_peers.sh` installs them). Cases: EDSR-baseline x2 at 128² with random
magnitude-pruned weights, and the shipped `x2` and `fast` models at 256².

    python -m pytest bench/test_bench_peers.py --benchmark-only -q     (bench/run.sh runs it)
"""
from __future__ import annotations

import pytest
import torch

from conftest import ROUNDS, THREADS
from sparsesr.benchmark import bench_grid
from sparsesr.format import export_bytes
from sparsesr.models import build_model
from sparsesr.models.checkpoint import Checkpoint
from sparsesr.peers import compare_engines
from sparsesr.pruning import one_shot_prune

RANDOM = bench_grid(
    [("edsr-baseline", 128, s, "1x1") for s in (0.0, 0.5, 0.9, 0.95)] + [("edsr-baseline", 128, 0.9, "4x1")],
    [("edsr-baseline", size, s, p) for size in (128, 256) for p in ("1x1", "4x1") for s in (0.0, 0.5, 0.75, 0.9, 0.95)],
)
SHIPPED = [("x2", 256), ("fast", 256)]


def _record(benchmark, result: dict, **info) -> None:
    rows = {row["engine"]: row for row in result["rows"]}
    benchmark.extra_info.update(suite="peers", threads=result["threads"], cpu=result["cpu"], size=result["size"],
                                fastest_peer=result["fastest_peer"], lead=result["lead"], **info)
    for name, row in rows.items():
        key = name.replace("-", "_")
        if "median_ms" in row:
            benchmark.extra_info[f"{key}_ms"] = row["median_ms"]
            benchmark.extra_info[f"{key}_precision"] = row["precision"]
            benchmark.extra_info[f"{key}_rel_error"] = row["rel_error"]
        else:
            benchmark.extra_info[f"{key}_skipped"] = row["skipped"]
    # The timings are compare_engines' alternating rounds above, in extra_info; pytest-benchmark
    # only needs one call to keep the case in its JSON (its own statistics are not used).
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


@pytest.mark.parametrize("arch,size,sparsity,pattern", RANDOM,
                         ids=[f"{a}-{z}px-{p}-{s:.0%}" for a, z, s, p in RANDOM])
def test_peers_random(benchmark, tmp_path, arch, size, sparsity, pattern):
    torch.manual_seed(0)
    model = build_model(arch, 2).eval()
    if sparsity > 0:
        one_shot_prune(model, sparsity, granularity=pattern)
    path = tmp_path / "model.safetensors"
    path.write_bytes(export_bytes(Checkpoint(state_dict=model.state_dict(), arch=arch, config=model.config),
                                  dtype="fp32", layout="auto"))
    result = compare_engines(path, size=size, threads=THREADS, repeats=ROUNDS, workdir=tmp_path)
    _record(benchmark, result, model=f"{arch} ×2 random", arch=arch, scale=2, sparsity=sparsity, pattern=pattern)


@pytest.mark.parametrize("name,size", SHIPPED, ids=[f"{n}-{z}px" for n, z in SHIPPED])
def test_peers_shipped(benchmark, tmp_path, name, size):
    from sparsesr.format import describe
    from sparsesr.pretrained import resolve_model

    summary = describe(resolve_model(name))
    result = compare_engines(name, size=size, threads=THREADS, repeats=ROUNDS, workdir=tmp_path)
    _record(benchmark, result, model=f"shipped `{name}`", arch=summary.get("arch", "?"), scale=summary.get("scale", 2),
            sparsity=round(summary["sparsity"], 3), pattern="shipped")
