"""Time a model dense and sparse on this machine: the library behind ``sparsesr bench``.

>>> result = benchmark_model("x2", size=128, threads=2, repeats=5)
>>> result["speedup"], result["dense"]["median_ms"], result["sparse"]["median_ms"]

Method (docs/performance.md): ``warmup`` untimed calls, then ``repeats`` rounds in which the dense
and the sparse forward alternate, so that a burst of load from another process hits both; the
medians are compared and the min / max are kept as the spread. Each round records wall-clock time
(what a user waits for) and this process's CPU time (steadier on a shared machine; for N threads
it is up to N times the wall time).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from sparsesr.errors import SparseSRError
from sparsesr.models import arch_of
from sparsesr.runtime.backends import resolve_device


def bench_grid(standard: list, full: list) -> list:
    """For the bench/ suites: the standard subset, or ``full`` when SPARSESR_BENCH_FULL=1."""
    return full if os.environ.get("SPARSESR_BENCH_FULL", "0") == "1" else standard


@dataclass
class Timing:
    """Seconds per call of one function, one entry per timed round."""

    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)

    def record(self, fn: Callable[[], object]) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        self.cpu_s.append(time.process_time() - cpu)
        self.wall_s.append(time.perf_counter() - wall)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.wall_s) * 1e3

    def to_dict(self) -> dict:
        return {
            "median_ms": self.median_ms,
            "min_ms": min(self.wall_s) * 1e3,
            "max_ms": max(self.wall_s) * 1e3,
            "cpu_median_ms": statistics.median(self.cpu_s) * 1e3,
            "rounds": len(self.wall_s),
        }


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a CUDA synchronize when on a GPU, so the clock sees the kernels finish."""
    if device.type != "cuda":
        return fn

    def run() -> object:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def time_pair(dense: Callable[[], object], sparse: Callable[[], object], repeats: int = 5,
              warmup: int = 1) -> tuple[Timing, Timing]:
    """Time two functions in alternating rounds (dense, sparse, dense, ...) after ``warmup`` calls each."""
    if repeats < 1:
        raise SparseSRError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        dense()
        sparse()
    dense_timing, sparse_timing = Timing(), Timing()
    for _ in range(repeats):
        dense_timing.record(dense)
        sparse_timing.record(sparse)
    return dense_timing, sparse_timing


def load_for_bench(source: str | os.PathLike, device: torch.device, backend: str = "auto"):
    """The runtime model for ``source`` (embedded name, exported file or checkpoint) and its file sizes.

    A checkpoint is exported in memory (fp32, automatic layouts), as ``sparsesr.load`` does;
    the size reported is then that of the export it would write.
    """
    from sparsesr.format import export_bytes, is_sparse_model_file, parse_bytes, read_file
    from sparsesr.pretrained import resolve_model
    from sparsesr.runtime import load

    path = resolve_model(source)
    if is_sparse_model_file(path):
        model_file, file_bytes, in_memory = read_file(path), path.stat().st_size, False
    else:
        data = export_bytes(path, dtype="fp32", layout="auto")
        model_file, file_bytes, in_memory = parse_bytes(data, source=str(path)), len(data), True
    summary = model_file.summary()
    sizes = {
        "file": str(path),
        "file_bytes": file_bytes,
        "dense_fp32_bytes": summary["dense_fp32_bytes"],
        "size_ratio": file_bytes / summary["dense_fp32_bytes"],
        "exported_in_memory": in_memory,
        "sparsity": summary["sparsity"],
    }
    return load(model_file, device=str(device), backend=backend), sizes


def benchmark_model(
    source: str | os.PathLike,
    size: int = 128,
    threads: int | None = None,
    device: str = "auto",
    backend: str = "auto",
    repeats: int = 5,
    warmup: int = 1,
    per_layer: bool = False,
) -> dict:
    """Time one forward of ``source`` on a ``size`` x ``size`` RGB input, dense and sparse.

    Dense is the same network and weights with every conv forced to ``torch.conv2d``
    (``backend="dense"``); sparse uses ``backend`` ("auto": each layer takes its faster path).
    ``threads`` sets ``torch.set_num_threads`` for the run (None: leave it). Returns a dict with
    ``dense`` / ``sparse`` timings (median, min, max, CPU time; ms), ``speedup`` (dense median /
    sparse median), the path each layer took, file sizes and, with ``per_layer``, one row per conv.
    """
    if size < 1:
        raise SparseSRError(f"size must be a positive number of pixels, got {size}")
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch_device = resolve_device(device)
        model, sizes = load_for_bench(source, torch_device, backend)
        x = torch.rand(1, 3, size, size, device=torch_device)

        def forward(mode: str) -> Callable[[], object]:
            def run() -> object:
                model.set_backend(mode)
                with torch.no_grad():
                    return model(x)
            return synchronized(run, torch_device)

        dense, sparse = time_pair(forward("dense"), forward(backend), repeats, warmup)
        report = model.backend_report()  # after a sparse call: the paths the timed runs took
        paths: dict[str, int] = {}
        for layer in report["layers"]:
            paths[layer["path"]] = paths.get(layer["path"], 0) + 1
        result = {
            "model": str(source),
            "arch": arch_of(model.config),
            "scale": int(model.config.scale),
            "size": size,
            "device": str(torch_device),
            "threads": torch.get_num_threads(),
            "backend": backend,
            "repeats": repeats,
            "warmup": warmup,
            "dense": dense.to_dict(),
            "sparse": sparse.to_dict(),
            "speedup": dense.median_ms / sparse.median_ms,
            "paths": paths,
            "kernels": report["kernels"],
            **sizes,
        }
        if per_layer:
            result["layers"] = per_layer_times(model, x, backend, repeats, warmup)
        return result
    finally:
        torch.set_num_threads(saved_threads)


def per_layer_times(model, x: torch.Tensor, backend: str = "auto", repeats: int = 5, warmup: int = 1) -> list[dict]:
    """One row per ``SparseConv2d``: dense vs the path it takes, timed on the input it sees in a forward.

    The timing happens inside a forward pre-hook, on that layer's real input, so no activations
    are kept across layers. ``forward`` is called directly there (not ``conv(...)``), which skips
    the hooks and so does not recurse.
    """
    rows: list[dict] = []

    def time_layer(conv, args, kwargs) -> None:
        x_in = args[0]
        device = x_in.device

        def call(mode: str) -> Callable[[], object]:
            def run() -> object:
                conv.backend = mode
                return conv.forward(*args, **kwargs)
            return synchronized(run, device)

        dense, sparse = time_pair(call("dense"), call(backend), repeats, warmup)
        path, reason = conv.last_path, conv.last_reason  # the sparse call ran last
        h, w = x_in.shape[-2:]
        weight = conv.dense_weight()
        rows.append({
            "name": conv.name,
            "shape": [conv.out_channels, conv.in_channels, conv.kh, conv.kw],
            "layout": conv.layout,
            "path": path,
            "reason": reason,
            "sparsity": 1.0 - int(torch.count_nonzero(weight)) / weight.numel(),
            "dense_gflop": 2 * weight.numel() * h * w / 1e9,
            "dense_ms": dense.median_ms,
            "sparse_ms": sparse.median_ms,
            "speedup": dense.median_ms / sparse.median_ms,
        })

    handles = [conv.register_forward_pre_hook(time_layer, with_kwargs=True) for conv in model.sparse_convs()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.set_backend(backend)
    return rows


# --- peak memory of one forward, in a fresh process ------------------------------------------

_PEAK_MEMORY_CHILD = r"""
import json, resource, sys
import torch

args = json.loads(sys.argv[1])
if args["threads"]:
    torch.set_num_threads(args["threads"])


def reset_peak_rss():
    # Linux: writing 5 to clear_refs resets VmHWM to the current RSS, so the peak read after the
    # forward is the forward's own, not the import-time high-water mark of the libraries.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(field)


def peak_rss(resettable):
    if resettable:
        return rss("VmHWM")
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit


device = torch.device(args["device"])
if args["kind"] == "sparse":
    from sparsesr.runtime import load
    model = load(args["path"], device=str(device), backend=args["backend"])
else:
    from sparsesr.models.checkpoint import load_model
    model = load_model(args["path"]).to(device)
x = torch.rand(1, 3, args["size"], args["size"], device=device)
resettable = reset_peak_rss()
before = rss("VmRSS") if resettable else peak_rss(False)
if device.type == "cuda":
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    cuda_before = torch.cuda.memory_allocated(device)
with torch.no_grad():
    y = model(x)
result = {"rss_before_bytes": before, "rss_peak_bytes": peak_rss(resettable), "output_shape": list(y.shape),
          "peak_reset": resettable}
if device.type == "cuda":
    torch.cuda.synchronize(device)
    result["cuda_before_bytes"] = cuda_before
    result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
print("RESULT " + json.dumps(result))
"""


def peak_memory(path: str | os.PathLike, size: int = 128, device: str = "cpu", backend: str = "auto",
                threads: int | None = None, timeout_s: float = 600) -> dict:
    """Peak memory of one forward of the model in ``path``, measured in a fresh Python process.

    ``path`` is an exported sparse file (run with ``backend``) or a dense checkpoint (plain
    PyTorch eager). A fresh process, because the peak RSS only ever grows: in this process it
    would remember every earlier allocation. On Linux the child also resets its peak just before
    the forward (``/proc/self/clear_refs``; ``peak_reset`` says whether that worked), because the
    import of torch alone peaks above a small model's whole forward. Returns ``rss_before_bytes``
    (after imports and loading), ``rss_peak_bytes`` and ``forward_rss_bytes`` (their difference:
    what the forward added); on CUDA also ``cuda_peak_bytes`` (``torch.cuda.max_memory_allocated``).
    """
    from sparsesr.format import is_sparse_model_file

    device = str(resolve_device(device))  # a bad device string fails here, not as the child's traceback
    kind = "sparse" if is_sparse_model_file(path) else "dense"
    args = {"path": str(path), "size": size, "device": device, "backend": backend, "threads": threads, "kind": kind}
    proc = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_CHILD, json.dumps(args)], capture_output=True,
                          text=True, timeout=timeout_s)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SparseSRError(f"memory measurement of {path} failed (exit {proc.returncode}): {last}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["forward_rss_bytes"] = result["rss_peak_bytes"] - result["rss_before_bytes"]
    result.update(kind=kind, size=size, device=device, backend=backend if kind == "sparse" else "eager")
    return result


def format_result(result: dict) -> str:
    """``benchmark_model``'s result as the lines ``sparsesr bench`` prints."""
    dense, sparse = result["dense"], result["sparse"]
    paths = ", ".join(f"{n} {p}" for p, n in sorted(result["paths"].items()))
    lines = [
        f"{Path(result['file']).name}: {result['arch']} x{result['scale']}, {result['sparsity']:.1%} sparse; "
        f"input {result['size']}x{result['size']} on {result['device']}, {result['threads']} threads, "
        f"{result['repeats']} rounds after {result['warmup']} warm-up",
        f"  dense  (torch.conv2d)        median {dense['median_ms']:9.2f} ms  "
        f"[{dense['min_ms']:.2f} .. {dense['max_ms']:.2f}]  CPU {dense['cpu_median_ms']:.2f} ms",
        f"  sparse (backend={result['backend']:<5})       median {sparse['median_ms']:9.2f} ms  "
        f"[{sparse['min_ms']:.2f} .. {sparse['max_ms']:.2f}]  CPU {sparse['cpu_median_ms']:.2f} ms",
        f"  speedup x{result['speedup']:.2f}   (layers: {paths})",
        f"  size: file {result['file_bytes'] / 1024:.0f} KB vs dense fp32 {result['dense_fp32_bytes'] / 1024:.0f} KB "
        f"({result['size_ratio']:.1%}){' (exported in memory)' if result['exported_in_memory'] else ''}",
    ]
    if "layers" in result:
        width = max(16, *(len(row["name"]) for row in result["layers"]))  # RRDBNet: body.22.rdb3.conv5
        lines.append(f"  {'layer':<{width}} {'shape':<16} {'layout':<6} {'path':<6} {'sparsity':>8} "
                     f"{'dense ms':>9} {'sparse ms':>9} {'speedup':>7}")
        for row in result["layers"]:
            shape = "x".join(str(d) for d in row["shape"])
            # a layer that runs dense either way was timed twice the same: its "speedup" is noise
            speedup = "-" if row["path"] == "dense" else f"{row['speedup']:.2f}x"
            lines.append(f"  {row['name']:<{width}} {shape:<16} {row['layout']:<6} {row['path']:<6} "
                         f"{row['sparsity']:>8.1%} {row['dense_ms']:>9.3f} {row['sparse_ms']:>9.3f} {speedup:>7}")
    return "\n".join(lines)
