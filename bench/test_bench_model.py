"""Whole model: the sparse runtime vs dense PyTorch eager on the same weights, in the same run.

    SPARSESR_BENCH_THREADS=2 python -m pytest bench/test_bench_model.py --benchmark-only -rs

Each case builds a preset with random weights (seed 0), magnitude-prunes it with
``one_shot_prune`` (per weight or per 4x1 / 8x1 block; first and last conv stay dense; EDSR with
one global ranking, the other families each layer alike), exports it
in memory (``export_bytes``, fp32, ``layout="auto"``: a layer stays dense where the sparse kernel
is not expected to win) and loads it with ``sparsesr.runtime.load``. Baselines, timed in the same
rounds: the pruned ``nn.Module`` in eager mode (``dense_ms``), the same in ``channels_last``
(``channels_last_ms``), and ONNX Runtime when it is installed (its own test, skipped with the
reason otherwise). On a CUDA GPU: the runtime's Triton kernels vs cuDNN in fp32 / tf32 / fp16 /
bf16. The standard set runs in a few minutes on 2 cores; SPARSESR_BENCH_FULL=1 adds EDSR (256
channels), x4 and 256x256 inputs.
"""
from __future__ import annotations

import io

import pytest
import torch

from sparsesr.benchmark import bench_grid
from sparsesr.format import export_bytes, parse_bytes
from sparsesr.models import build_model
from sparsesr.models.checkpoint import Checkpoint
from sparsesr.pruning import one_shot_prune
from sparsesr.runtime import load

SPARSITIES = [0.0, 0.5, 0.75, 0.9, 0.95]
STANDARD = (
    [("edsr-cpu", 2, 128, s, p) for p in ("1x1", "4x1") for s in SPARSITIES]
    + [("edsr-baseline", 2, 128, s, p) for p in ("1x1", "4x1") for s in (0.0, 0.9, 0.95)]
    # the other families (issue #14): ESRGAN's RRDBNet (16.7 M parameters: 64² keeps it to seconds),
    # MSRResNet, Real-ESRGAN's compact SRVGG
    + [("rrdbnet", 4, 64, s, "1x1") for s in (0.0, 0.9)]
    + [(arch, 4, 128, s, "1x1") for arch in ("msrresnet", "srvgg") for s in (0.0, 0.9)]
)
FULL = [(arch, scale, size, s, p) for arch in ("edsr-cpu", "edsr-baseline", "edsr") for scale in (2, 4)
        for size in (128, 256) for p in ("1x1", "4x1", "8x1") for s in SPARSITIES]
CASES = bench_grid(STANDARD, FULL)
IDS = [f"{a}-x{sc}-{z}px-{p}-{s:.0%}" for a, sc, z, s, p in CASES]


def pruned_pair(arch: str, scale: int, sparsity: float, pattern: str, device: str = "cpu"):
    """(dense nn.Module, sparse runtime model) with identical weights."""
    torch.manual_seed(0)
    model = build_model(arch, scale).eval()
    if sparsity > 0:
        # Random weights are scaled by 1/sqrt(fan-in): one global ranking would empty RRDBNet's
        # widest convs entirely, which no trained network does. EDSR's convs all have one fan-in.
        balance = "global" if arch.startswith("edsr") else "uniform"
        one_shot_prune(model, sparsity, granularity=pattern, balance=balance)
    checkpoint = Checkpoint(state_dict=model.state_dict(), arch=arch, config=model.config)
    data = export_bytes(checkpoint, dtype="fp32", layout="auto")
    sparse = load(parse_bytes(data), device=device, backend="auto")
    return model.to(device), sparse, len(data)


def model_info(arch, scale, size, sparsity, pattern, sparse, file_bytes) -> dict:
    layouts: dict[str, int] = {}
    for conv in sparse.sparse_convs():
        layouts[conv.layout] = layouts.get(conv.layout, 0) + 1
    return {"suite": "model", "arch": arch, "scale": scale, "size": size, "sparsity": sparsity,
            "pattern": pattern, "layouts": layouts, "file_bytes": file_bytes}


def record_paths(benchmark, sparse) -> None:
    """How many layers took each path in the timed sparse calls (after the run)."""
    paths: dict[str, int] = {}
    for layer in sparse.backend_report()["layers"]:
        paths[layer["path"]] = paths.get(layer["path"], 0) + 1
    benchmark.extra_info["paths"] = paths


@pytest.mark.parametrize("arch,scale,size,sparsity,pattern", CASES, ids=IDS)
def test_model_cpu(paired, benchmark, arch, scale, size, sparsity, pattern):
    dense, sparse, file_bytes = pruned_pair(arch, scale, sparsity, pattern)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-3, atol=1e-3)
    dense_cl = build_model(arch, scale).eval().to(memory_format=torch.channels_last)
    dense_cl.load_state_dict(dense.state_dict())
    x_cl = x.to(memory_format=torch.channels_last)
    benchmark.group = f"model {arch} x{scale} {size}px"
    paired(lambda: dense(x), lambda: sparse(x), baselines={"channels_last": lambda: dense_cl(x_cl)},
           **model_info(arch, scale, size, sparsity, pattern, sparse, file_bytes))
    record_paths(benchmark, sparse)


ORT_CASES = bench_grid([("edsr-cpu", 2, 128, s, "1x1") for s in (0.0, 0.9)] + [("edsr-baseline", 2, 128, 0.9, "1x1")],
                       [c for c in FULL if c[3] in (0.0, 0.9)])


@pytest.mark.parametrize("arch,scale,size,sparsity,pattern", ORT_CASES,
                         ids=[f"{a}-x{sc}-{z}px-{p}-{s:.0%}" for a, sc, z, s, p in ORT_CASES])
def test_model_onnxruntime(paired, benchmark, arch, scale, size, sparsity, pattern):
    """ONNX Runtime (CPU, same weights, same thread count) as the dense baseline."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install sparsesr[onnx])")
    dense, sparse, file_bytes = pruned_pair(arch, scale, sparsity, pattern)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    buffer = io.BytesIO()
    try:
        torch.onnx.export(dense, (x,), buffer, input_names=["lr"], output_names=["sr"], dynamo=False)
    except Exception as exc:  # noqa: BLE001 - the exporter's own dependencies may be missing
        pytest.skip(f"torch.onnx.export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    feed = {"lr": x.numpy()}
    benchmark.group = f"model {arch} x{scale} {size}px onnxruntime"
    info = model_info(arch, scale, size, sparsity, pattern, sparse, file_bytes)
    paired(lambda: session.run(None, feed), lambda: sparse(x), baselines={"torch_eager": lambda: dense(x)},
           **{**info, "suite": "model_onnxruntime", "dense_engine": "onnxruntime"})
    record_paths(benchmark, sparse)


PRECISIONS = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CUDA_CASES = bench_grid(
    [("edsr-baseline", 2, 256, s, "4x1") for s in (0.0, 0.9)] + [("edsr", 2, 256, s, "8x1") for s in (0.0, 0.9)],
    [c for c in FULL if c[0] != "edsr-cpu"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: Triton vs cuDNN is only timed on one")
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("arch,scale,size,sparsity,pattern", CUDA_CASES,
                         ids=[f"{a}-x{sc}-{z}px-{p}-{s:.0%}" for a, sc, z, s, p in CUDA_CASES])
def test_model_cuda(paired, benchmark, arch, scale, size, sparsity, pattern, precision):
    """Triton kernels (through the runtime) vs cuDNN, both in ``precision``.

    The runtime does not pass ``allow_tf32`` to the Triton kernels, so in the "tf32" case only
    cuDNN uses TF32 and Triton computes in IEEE fp32 (recorded as ``triton_precision``).
    """
    dtype = PRECISIONS[precision]
    dense, sparse, file_bytes = pruned_pair(arch, scale, sparsity, pattern, device="cuda")
    dense, sparse = dense.to(dtype), sparse.to(dtype)
    x = torch.rand(1, 3, size, size, device="cuda", dtype=dtype)
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        benchmark.group = f"model {arch} x{scale} {size}px cuda {precision}"
        info = model_info(arch, scale, size, sparsity, pattern, sparse, file_bytes)
        paired(lambda: dense(x), lambda: sparse(x), device="cuda", rounds=20, warmup=3,
               **{**info, "suite": "model_cuda", "precision": precision, "gpu": torch.cuda.get_device_name(),
                  "triton_precision": "fp32" if precision == "tf32" else precision})
        record_paths(benchmark, sparse)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved
