"""The same weights on the inference engines people deploy with, timed against sparsesr.

>>> result = compare_engines("x2", size=256, threads=2)
>>> [(row["engine"], row.get("median_ms")) for row in result["rows"]]

The engines (each optional; a missing one is reported with the reason, never an error):

- ``sparsesr``: the sparse runtime (``backend="auto"``), the thing being measured;
- ``pytorch``: the dense-equivalent network in PyTorch eager (oneDNN);
- ``onnxruntime``, ``openvino-f32`` (``INFERENCE_PRECISION_HINT=f32``), ``openvino`` (its default
  precision: bf16 on CPUs with AVX512_BF16, f32 elsewhere; the row says which it used) and
  ``deepsparse`` (Neural Magic's sparsity-aware engine), all fed one ONNX export of the
  dense-equivalent network (the pruned weights with their zeros, so a sparsity-aware engine
  sees the same sparsity).

Before any timing each engine's output is compared with PyTorch's on the same input; an engine
whose relative error (``||y - y_ref|| / ||y_ref||``) is above its tolerance is reported as
disagreeing and not timed. The rounds alternate between engines, so a burst of load from another
process hits them all (the method of ``sparsesr.benchmark``).
"""
from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from sparsesr.errors import SparseSRError

ENGINES = ("sparsesr", "pytorch", "onnxruntime", "openvino-f32", "openvino", "deepsparse")
PEERS = ENGINES[1:]

# Relative-error bounds before timing: fp32 engines must agree to rounding; a bf16 engine keeps
# ~3 significant digits, so its bound is looser (and its precision is named in the result).
FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 2e-2
# ONNX opset of the export: DeepSparse 1.8 (its bundled ONNX Runtime) refuses opsets above 19.
ONNX_OPSET = 17

INSTALL_HINT = "tools/install_peers.sh installs onnxruntime, openvino and deepsparse 1.8.0"


@dataclass
class Engine:
    """One engine, ready to run: ``run`` maps an NCHW float32 array to the output array."""

    name: str
    precision: str
    run: Callable[[np.ndarray], np.ndarray]


def cpu_description() -> str:
    """CPU model name and the vector ISA that matters for these kernels, e.g.
    ``AMD EPYC 7B13 (AVX2)``; every quoted time names the machine it was measured on."""
    from sparsesr.runtime.cpuinfo import cpu_info

    info = cpu_info()
    name = info.model_name
    if name is None:
        import platform

        name = platform.processor() or platform.machine() or "unknown CPU"
    if info.family is not None:  # VMs often hide the model name ("AMD EPYC"); family/model still tell Zen 1..4
        name += f", family {info.family} model {info.model or '?'}"
    isa = [label for flag, label in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512_BF16"), ("amx_bf16", "AMX-BF16"),
                                     ("avx2", "AVX2"), ("asimd", "NEON")) if flag in info.flags]
    if "AVX-512" in isa and "AVX2" in isa:
        isa.remove("AVX2")  # implied
    return f"{name} ({', '.join(isa) or 'no AVX2'})"


def dense_equivalent(source: str | os.PathLike) -> nn.Module:
    """The plain PyTorch network with the pruned weights of ``source`` (embedded name, exported
    file or checkpoint), zeros included: what a user would run on a dense engine."""
    from sparsesr.format import is_sparse_model_file, read_file
    from sparsesr.models import get_family
    from sparsesr.models.checkpoint import load_model
    from sparsesr.pretrained import resolve_model

    path = resolve_model(source)
    if not is_sparse_model_file(path):
        return load_model(path).float().eval()
    model_file = read_file(path)
    model = get_family(model_file.family).build(model_file.config)
    model.load_state_dict({k: v.float() for k, v in model_file.dense_state_dict().items()})
    return model.float().eval()


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> Path:
    """``model`` as an ONNX file with the static input shape of ``example`` (static shapes let the
    engines plan their memory and DeepSparse requires them)."""
    import warnings

    path = Path(path)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        # dynamo=False: the TorchScript exporter needs neither onnxscript nor a recent onnx, which
        # DeepSparse 1.8's pins (onnx < 1.15) rule out.
        torch.onnx.export(model, (example,), str(path), input_names=["lr"], output_names=["sr"],
                          opset_version=ONNX_OPSET, dynamo=False)
    return path


def unavailable_reason(name: str) -> str | None:
    """Why engine ``name`` cannot run here (None when it can)."""
    module = {"onnxruntime": "onnxruntime", "openvino": "openvino", "openvino-f32": "openvino",
              "deepsparse": "deepsparse"}.get(name)
    if name not in ENGINES:
        raise SparseSRError(f"unknown engine {name!r}; expected one of {', '.join(ENGINES)}")
    if module is None:
        return None
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed ({INSTALL_HINT})"
    return None


# DeepSparse 1.8.0 aborts the whole process (a C++ assertion, SIGABRT) on some graphs, RRDBNet's
# among them, instead of raising: it compiles in a child process first, where an abort is a result.
_DEEPSPARSE_PROBE = ("import os, sys; os.environ.setdefault('NM_DISABLE_ANALYTICS', '1'); import deepsparse; "
                     "deepsparse.compile_model(sys.argv[1], batch_size=1, num_cores=int(sys.argv[2]))")


def deepsparse_compile_error(onnx_path: str | os.PathLike, threads: int, timeout_s: float = 600) -> str | None:
    """Why DeepSparse cannot compile ``onnx_path`` (None when it can), found in a child process."""
    try:
        proc = subprocess.run([sys.executable, "-c", _DEEPSPARSE_PROBE, str(onnx_path), str(threads)],
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"compiling took more than {timeout_s:.0f} s"
    if proc.returncode == 0:
        return None
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    said = next((line for line in lines if line.startswith(("Assertion", "RuntimeError", "ValueError"))),
                lines[-1] if lines else "")
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    return f"DeepSparse {how}: {said[:200]}" if said else f"DeepSparse {how}"


def build_engine(name: str, onnx_path: str | os.PathLike, threads: int) -> Engine:
    """Compile ``onnx_path`` on engine ``name`` with ``threads`` threads."""
    onnx_path = str(onnx_path)
    if name == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        return Engine(name, "fp32", lambda x: session.run(None, {"lr": x})[0])
    if name in ("openvino", "openvino-f32"):
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if name == "openvino-f32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        compiled = ov.Core().compile_model(onnx_path, "CPU", config)
        chosen = compiled.get_property("INFERENCE_PRECISION_HINT")  # what it chose, e.g. bf16
        precision = chosen.get_type_name() if hasattr(chosen, "get_type_name") else str(chosen)
        request = compiled.create_infer_request()
        return Engine(name, {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(precision, precision),
                      lambda x: request.infer([x])[0].copy())
    if name == "deepsparse":
        os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # no network calls from a benchmark
        error = deepsparse_compile_error(onnx_path, threads)
        if error:
            raise SparseSRError(error)
        import deepsparse

        engine = deepsparse.compile_model(onnx_path, batch_size=1, num_cores=threads)
        return Engine(name, "fp32", lambda x: engine([x])[0])
    raise SparseSRError(f"{name!r} is not an ONNX engine; expected one of {', '.join(PEERS[1:])}")


def relative_error(y: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm((y - reference).ravel()) / max(np.linalg.norm(reference.ravel()), 1e-30))


def compare_engines(
    source: str | os.PathLike,
    size: int = 256,
    threads: int | None = None,
    repeats: int = 5,
    warmup: int = 1,
    engines: tuple[str, ...] = ENGINES,
    workdir: str | os.PathLike | None = None,
) -> dict:
    """Time one forward of ``source`` on a ``size`` x ``size`` input on each of ``engines``.

    Returns ``{"model", "size", "threads", "cpu", "rows": [...], "fastest_peer", "lead"}``; each row
    has ``engine``, and either ``skipped`` (the reason) or ``precision``, ``rel_error`` (vs PyTorch
    fp32), ``median_ms``/``min_ms``/``max_ms`` and ``vs_sparsesr`` (its median / sparsesr's: above
    1 means sparsesr is faster). ``lead`` is the fastest timed peer's median over sparsesr's.
    """
    from sparsesr.runtime import load

    if size < 1 or repeats < 1 or warmup < 0:
        raise SparseSRError(f"size and repeats must be positive and warmup non-negative, got {size}, {repeats}, {warmup}")
    for name in engines:
        unavailable_reason(name)  # unknown names fail before any work
    saved_threads = torch.get_num_threads()
    threads = threads or saved_threads
    torch.set_num_threads(threads)
    try:
        dense = dense_equivalent(source)
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            reference = dense(x).numpy()
        rows: list[dict] = []
        runners: dict[str, Callable[[], object]] = {}
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            onnx_path = None
            for name in engines:
                row: dict = {"engine": name}
                rows.append(row)
                reason = unavailable_reason(name)
                if reason:
                    row["skipped"] = reason
                    continue
                if name == "sparsesr":
                    sparse = load(source, device="cpu")
                    engine = Engine(name, "fp32", lambda a, m=sparse: _torch_run(m, a))
                elif name == "pytorch":
                    engine = Engine(name, "fp32", lambda a: _torch_run(dense, a))
                else:
                    if onnx_path is None:
                        onnx_path = export_onnx(dense, x, Path(tmp) / "model.onnx")
                    try:
                        engine = build_engine(name, onnx_path, threads)
                    except Exception as exc:  # an engine that cannot compile this model is a result too
                        row["skipped"] = f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                        continue
                x_np = x.numpy()
                y = np.asarray(engine.run(x_np), dtype=np.float32)
                error = relative_error(y, reference) if y.shape == reference.shape else math.inf
                tolerance = FP32_TOLERANCE if engine.precision == "fp32" else BF16_TOLERANCE
                row.update(precision=engine.precision, rel_error=error)
                if error > tolerance:
                    row["skipped"] = f"output disagrees with PyTorch: relative error {error:.2e} > {tolerance:.0e}"
                    continue
                runners[name] = lambda run=engine.run, a=x_np: run(a)
            timings = _alternate(runners, repeats, warmup)
        for row in rows:
            if row["engine"] in timings:
                row.update(timings[row["engine"]])
        base = timings.get("sparsesr", {}).get("median_ms")
        peers = [r for r in rows if r["engine"] != "sparsesr" and "median_ms" in r]
        for row in peers:
            row["vs_sparsesr"] = row["median_ms"] / base if base else None
        fastest = min(peers, key=lambda r: r["median_ms"], default=None)
        return {
            "model": str(source), "size": size, "threads": threads, "cpu": cpu_description(),
            "repeats": repeats, "warmup": warmup, "rows": rows,
            "fastest_peer": fastest["engine"] if fastest else None,
            "lead": fastest["median_ms"] / base if fastest and base else None,
        }
    finally:
        torch.set_num_threads(saved_threads)


def _torch_run(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _alternate(runners: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, dict]:
    for _ in range(warmup):
        for run in runners.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return {name: {"median_ms": statistics.median(s) * 1e3, "min_ms": min(s) * 1e3, "max_ms": max(s) * 1e3,
                   "rounds": len(s)} for name, s in seconds.items()}


def format_comparison(result: dict) -> str:
    """``compare_engines``'s result as the table ``sparsesr bench --peers`` prints."""
    lines = [f"{Path(str(result['model'])).name}: {result['size']}x{result['size']} input, {result['threads']} threads, "
             f"{result['repeats']} alternating rounds; {result['cpu']}",
             f"  {'engine':<13} {'precision':<9} {'median ms':>10} {'min..max ms':>17} {'rel. error':>10} {'vs sparsesr':>11}"]
    for row in result["rows"]:
        if "median_ms" not in row:
            lines.append(f"  {row['engine']:<13} skipped: {row['skipped']}")
            continue
        spread = f"{row['min_ms']:.1f}..{row['max_ms']:.1f}"
        versus = f"{row['vs_sparsesr']:.2f}x" if row.get("vs_sparsesr") else "-"
        lines.append(f"  {row['engine']:<13} {row['precision']:<9} {row['median_ms']:>10.1f} {spread:>17} "
                     f"{row['rel_error']:>10.1e} {versus:>11}")
    if result["lead"]:
        word = "faster" if result["lead"] >= 1 else "slower"
        lines.append(f"  sparsesr vs the fastest peer ({result['fastest_peer']}): {result['lead']:.2f}x ({word})")
    return "\n".join(lines)
