"""Kept output buffers on vs off: the sparse runtime forward of MSRResNet x4 and SRVGG x4.

    python bench/allocator.py [--size 256] [--rounds 5] [--threads 2]

Same weights as bench/test_bench_model.py (random, pruned to 90 %, exported in memory, backend
"auto"). For each model, rounds alternate a forward with the kept buffers (``KeptOutputs``) and
one with them switched off (every conv output a fresh tensor), so that load from other processes
hits both; it prints the median ms and minor page faults (``getrusage``) per forward, and the ratios.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bench_model import pruned_pair  # noqa: E402  (bench/ is not a package)

from sparsesr.runtime.kept import KeptOutputs  # noqa: E402


def set_kept(model: torch.nn.Module, enabled: bool) -> None:
    for m in model.modules():
        if isinstance(m, KeptOutputs):
            m.enabled = enabled


def timed(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, int]:
    """(ms, minor page faults) of one forward."""
    faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    model(x)
    return (time.perf_counter() - start) * 1e3, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    x = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    print(f"x4, {args.size}², 90 % pruned, {args.threads} threads, median of {args.rounds} rounds")
    print(f"{'model':10s} {'kept ms':>9s} {'fresh ms':>9s} {'ratio':>6s} {'kept faults':>12s} {'fresh faults':>13s}  paths")
    for arch in ("msrresnet", "srvgg"):
        _, sparse, _ = pruned_pair(arch, 4, 0.9, "1x1")
        for enabled in (True, False):  # warm-up: packing, dispatch calibration, the buffers
            set_kept(sparse, enabled)
            sparse(x)
        runs: dict[bool, list[tuple[float, int]]] = {True: [], False: []}
        for _ in range(args.rounds):
            for enabled in (True, False):
                set_kept(sparse, enabled)
                runs[enabled].append(timed(sparse, x))
        kept_ms, fresh_ms = (statistics.median(ms for ms, _ in runs[e]) for e in (True, False))
        kept_faults, fresh_faults = (int(statistics.median(f for _, f in runs[e])) for e in (True, False))
        paths: dict[str, int] = {}
        for conv in sparse.sparse_convs():
            paths[conv.last_path] = paths.get(conv.last_path, 0) + 1
        held = sparse.release_buffers() / 2**20
        print(f"{arch:10s} {kept_ms:9.1f} {fresh_ms:9.1f} {fresh_ms / kept_ms:6.2f} {kept_faults:12d} {fresh_faults:13d}  "
              f"{paths}, {held:.0f} MiB kept")


if __name__ == "__main__":
    main()
