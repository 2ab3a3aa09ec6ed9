"""Where one forward's time goes: per-module times of the sparse runtime and of PyTorch eager.

    python bench/breakdown.py [--arch edsr-baseline] [--scale 2] [--size 128] [--sparsity 0.9]
                              [--pattern 1x1] [--threads 2]

Same weights as bench/test_bench_model.py (random, magnitude-pruned, exported in memory). Each
module is timed with forward hooks over a few forwards (best of them), residual blocks as one
module; the last lines give the whole forward (median) with the minor page faults it caused
(`getrusage`), and one conv layer called alone and right after a dense conv, to show what a fresh
output allocation costs. Run it on a quiet machine.
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


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def steps(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The forward's top-level steps: mean shifts, head, each residual block, the upsampler's parts, last conv."""
    return ([("sub_mean", model.sub_mean)] + [(f"head.{i}", m) for i, m in enumerate(model.head)]
            + [(f"body.{i}", m) for i, m in enumerate(model.body)]
            + [(f"tail.0.{i}", m) for i, m in enumerate(model.tail[0])]
            + [(f"tail.{i}", m) for i, m in enumerate(model.tail) if i > 0] + [("add_mean", model.add_mean)])


def module_times(model: torch.nn.Module, x: torch.Tensor, rounds: int = 3) -> dict[str, float]:
    """Best time per step of the forward (see ``steps``), in ms."""
    times: dict[str, list[float]] = {}
    hooks = []
    for name, module in steps(model):
        def pre(m, args):
            m._started = time.perf_counter()

        def post(m, args, out, name=name):
            times.setdefault(name, []).append((time.perf_counter() - m._started) * 1e3)
        hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    for _ in range(rounds):
        model(x)
    for hook in hooks:
        hook.remove()
    return {name: min(t) for name, t in times.items()}


def forward_stats(fn, rounds: int = 5) -> tuple[float, int]:
    """(median ms, median minor page faults) of fn()."""
    ms, faults = [], []
    for _ in range(rounds):
        before, start = minor_faults(), time.perf_counter()
        fn()
        ms.append((time.perf_counter() - start) * 1e3)
        faults.append(minor_faults() - before)
    return statistics.median(ms), int(statistics.median(faults))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="edsr-baseline")
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--pattern", default="1x1", choices=["1x1", "4x1", "8x1"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    dense, sparse, _ = pruned_pair(args.arch, args.scale, args.sparsity, args.pattern)
    x = torch.rand(1, 3, args.size, args.size)
    sparse(x), dense(x)  # warm-up: packing, dispatch calibration
    sparse_ms, dense_ms = module_times(sparse, x), module_times(dense, x)
    paths = {conv.name: conv.last_path for conv in sparse.sparse_convs()}
    print(f"{args.arch} x{args.scale}, {args.size}², {args.sparsity:.0%} {args.pattern}, {args.threads} threads")
    print(f"{'module':16s} {'dense ms':>9s} {'sparse ms':>9s}  path of its convs")
    for name in dense_ms:
        conv_paths = sorted({p for conv, p in paths.items() if conv == name or conv.startswith(name + ".")})
        print(f"{name:16s} {dense_ms[name]:9.2f} {sparse_ms.get(name, 0.0):9.2f}  {','.join(conv_paths)}")
    for label, model in (("dense", dense), ("sparse", sparse)):
        ms, faults = forward_stats(lambda: model(x))
        print(f"whole forward, {label}: {ms:.1f} ms, {faults} minor page faults")


if __name__ == "__main__":
    main()
