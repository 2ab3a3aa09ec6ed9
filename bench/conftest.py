"""Shared settings and the paired dense-vs-sparse timer of the benchmark suites.

Environment (bench/run.sh sets these):
    SPARSESR_BENCH_FULL=1       run the whole grid instead of the standard few-minute subset
                                (sparsesr.benchmark.bench_grid picks the cases)
    SPARSESR_BENCH_THREADS=N    torch threads (default 2)
    SPARSESR_BENCH_ROUNDS=N     timed rounds per case (default 5)

Every timing case runs dense and sparse *in the same test*, alternating round by round (the dense
call runs in pytest-benchmark's untimed ``setup``), so a burst of load from another process hits
both. ``extra_info`` gets ``dense_ms``, ``sparse_ms`` (medians, wall clock), their CPU-time
medians and ``speedup`` = dense / sparse; bench/report.py turns them into tables and plots.
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

THREADS = int(os.environ.get("SPARSESR_BENCH_THREADS", "2"))
ROUNDS = int(os.environ.get("SPARSESR_BENCH_ROUNDS", "5"))


@pytest.fixture(scope="session", autouse=True)
def bench_threads():
    """Every suite runs at THREADS torch threads and without autograd (inference only)."""
    saved_threads, saved_grad = torch.get_num_threads(), torch.is_grad_enabled()
    torch.set_num_threads(THREADS)
    torch.set_grad_enabled(False)
    yield THREADS
    torch.set_grad_enabled(saved_grad)
    torch.set_num_threads(saved_threads)


def _synced(fn, device: torch.device):
    if device.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize(device)
    return run


@pytest.fixture
def paired(benchmark):
    """``paired(dense_fn, sparse_fn, device=..., rounds=..., **info)``: time both, record in extra_info.

    pytest-benchmark's own statistics are those of ``sparse_fn``; the ratio uses the medians of
    the interleaved rounds recorded here (same clock for both).
    """

    def measure(dense_fn, sparse_fn, device: torch.device | str = "cpu", rounds: int = ROUNDS,
                warmup: int = 1, baselines: dict | None = None, **info) -> dict:
        """``baselines``: more dense variants ({name: fn}, e.g. channels_last), timed in the same
        rounds and recorded as ``<name>_ms`` and ``speedup_vs_<name>``."""
        device = torch.device(device)
        fns = {"dense": dense_fn, **(baselines or {}), "sparse": sparse_fn}
        fns = {kind: _synced(fn, device) for kind, fn in fns.items()}
        wall = {kind: [] for kind in fns}
        cpu = {kind: [] for kind in fns}

        def timed(kind: str, fn):
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fn()
            cpu[kind].append(time.process_time() - start_cpu)
            wall[kind].append(time.perf_counter() - start_wall)

        def untimed_by_pytest_benchmark():
            for kind, fn in fns.items():
                if kind != "sparse":
                    timed(kind, fn)

        for _ in range(warmup):
            for fn in fns.values():
                fn()
        benchmark.pedantic(lambda: timed("sparse", fns["sparse"]), setup=untimed_by_pytest_benchmark,
                           rounds=rounds, iterations=1, warmup_rounds=0)
        dense_ms = statistics.median(wall["dense"]) * 1e3
        sparse_ms = statistics.median(wall["sparse"]) * 1e3
        record = {
            **info,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "rounds": rounds,
            "dense_ms": dense_ms,
            "sparse_ms": sparse_ms,
            "speedup": dense_ms / sparse_ms,
            "dense_min_ms": min(wall["dense"]) * 1e3,
            "dense_max_ms": max(wall["dense"]) * 1e3,
            "sparse_min_ms": min(wall["sparse"]) * 1e3,
            "sparse_max_ms": max(wall["sparse"]) * 1e3,
            "dense_cpu_ms": statistics.median(cpu["dense"]) * 1e3,
            "sparse_cpu_ms": statistics.median(cpu["sparse"]) * 1e3,
        }
        for kind in baselines or {}:
            ms = statistics.median(wall[kind]) * 1e3
            record[f"{kind}_ms"] = ms
            record[f"speedup_vs_{kind}"] = ms / sparse_ms
        benchmark.extra_info.update(record)
        return record

    return measure
