"""Memory bandwidth of this machine as torch sees it: a large tensor copy, 1 and N threads.

    python bench/bandwidth.py [--mb 64] [--threads 2]

Prints GB/s counting bytes read + written (a copy of M MB moves 2M MB), best of 10 copies, for a
buffer far larger than the caches and for one that fits in L3. docs/performance.md uses it for
the memory roof of its roofline.
"""
from __future__ import annotations

import argparse
import time

import torch


def copy_gbps(megabytes: int, threads: int, repeats: int = 10) -> float:
    torch.set_num_threads(threads)
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * megabytes * 2**20 / best / 1e9


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64, help="size of the large buffer in MiB (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="most threads to try (default 2)")
    args = parser.parse_args()
    for threads in range(1, args.threads + 1):
        for mb in (args.mb, 4):
            print(f"{threads} thread(s), {mb:4d} MiB copy: {copy_gbps(mb, threads):5.1f} GB/s (read + write)")
