"""The sparse runtime: export -> load -> run reproduces the pruned dense model on every backend here."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton fixes interpreter-or-not at its first import (per process), so this must happen at
    # collection, before anything imports triton (tests/test_triton_kernels.py does the same).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sparsesr import runtime
from sparsesr.errors import SparseFormatError
from sparsesr.format import export, read_file
from sparsesr.format import writer
from sparsesr.models import build_model
from sparsesr.models.checkpoint import Checkpoint, save_checkpoint
from sparsesr.runtime import BackendError, FusedResBlock, SparseConv2d, backends

CPU_KERNEL = backends.unavailable_reason("cpu") is None
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _quiet_kernels(monkeypatch):
    # The CPU kernel caches its dense-vs-sparse timings in ~/.cache; tests leave no files behind.
    # export --layout auto must not depend on timings either: the documented thresholds decide.
    monkeypatch.setenv("SPARSESR_CPU_DISPATCH_CACHE", "0")
    monkeypatch.setattr(writer, "_cpu_kernel", lambda: None)


def pruned_model(scale: int = 2, sparsity: float = 0.9, block: int = 1, size: tuple[int, int] | None = (2, 16),
                 seed: int = 0) -> torch.nn.Module:
    """A random EDSR (``size`` = (blocks, channels), None = the real edsr-baseline) whose middle
    convs are magnitude-pruned in ``block`` x 1 output-channel blocks."""
    torch.manual_seed(seed)
    overrides = {} if size is None else {"n_resblocks": size[0], "n_feats": size[1]}
    model = build_model("edsr-baseline", scale, **overrides).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    for name in names[1:-1]:
        weight = model.get_submodule(name).weight.data
        blocks = weight.view(-1, block, weight[0].numel())  # [C_out / block, block, K]
        scores = blocks.abs().sum(1, keepdim=True).expand_as(blocks)
        threshold = scores.flatten().kthvalue(int(sparsity * scores.numel())).values
        blocks[scores <= threshold] = 0
    return model


def checkpoint_of(model: torch.nn.Module) -> Checkpoint:
    return Checkpoint(state_dict=model.state_dict(), arch="edsr-custom", config=model.config)


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y - reference).norm() / reference.norm())


def run(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


NEEDS_CPU_KERNEL = pytest.mark.skipif(not CPU_KERNEL, reason="CPU kernel not built")
# auto on CPU input picks the CPU kernel or dense per layer, so it gets the fp32 cases only.
CASES = [(backend, dtype) for backend in ("dense", "cpu") for dtype in ("fp32", "fp16")] + [("auto", "fp32")]


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("layout", ["csr", "bsr"])
@pytest.mark.parametrize("backend, dtype", [pytest.param(*case, marks=NEEDS_CPU_KERNEL if case[0] == "cpu" else ())
                                            for case in CASES])
def test_reproduces_the_pruned_dense_model(tmp_path, scale, layout, dtype, backend):
    model = pruned_model(scale, block=4 if layout == "bsr" else 1)
    export(checkpoint_of(model), tmp_path / "m.safetensors", dtype=dtype, layout=layout)
    sparse = runtime.load(tmp_path / "m.safetensors", device="cpu", backend=backend)
    x = torch.rand(2, 3, 12, 10)
    y, reference = run(sparse, x), run(model, x)
    assert y.shape == (2, 3, 12 * scale, 10 * scale)
    assert relative_error(y, reference) < TOLERANCE[dtype]
    report = sparse.backend_report()
    paths = {row["name"]: row["path"] for row in report["layers"]}
    assert sparse.head[0].layout == sparse.tail[1].layout == "dense"
    assert [m.shuffle for m in sparse.tail[0] if isinstance(m, SparseConv2d)] == [2] * (scale // 2)  # fused
    if backend in ("dense", "cpu"):  # a forced backend runs every layer, stored dense or not
        assert set(paths.values()) == {backend}
    assert all(row["reason"] != "not run yet" for row in report["layers"])


@pytest.fixture(scope="module")
def edsr_baseline(tmp_path_factory) -> tuple[torch.nn.Module, object]:
    """The real EDSR-baseline x2, 90% pruned, exported as fp16 (--layout auto, thresholds)."""
    model = pruned_model(2, size=None)
    path = tmp_path_factory.mktemp("edsr") / "m.safetensors"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(writer, "_cpu_kernel", lambda: None)
        export(checkpoint_of(model), path, dtype="fp16", layout="auto")
    return model, path


@pytest.mark.parametrize("backend", ["dense", pytest.param("cpu", marks=NEEDS_CPU_KERNEL)])
def test_edsr_baseline(edsr_baseline, backend):
    model, path = edsr_baseline
    sparse = runtime.load(path, device="cpu", backend=backend)
    assert sparse.body[0].body[0].layout == "csr"
    x = torch.rand(1, 3, 16, 16)
    assert relative_error(run(sparse, x), run(model, x)) < TOLERANCE["fp16"]


@pytest.mark.parametrize("layout", ["csr", "bsr"])
@pytest.mark.parametrize("scale", [2, 4])
def test_triton_interpreted(tmp_path, layout, scale):
    pytest.importorskip("triton")
    if (reason := backends.unavailable_reason("triton")) is not None:
        pytest.skip(f"Triton kernels unavailable: {reason}")
    model = pruned_model(scale, size=(1, 8), block=4 if layout == "bsr" else 1)
    export(checkpoint_of(model), tmp_path / "m.safetensors", dtype="fp32", layout=layout)
    sparse = runtime.load(tmp_path / "m.safetensors", device="cpu", backend="triton")
    x = torch.rand(1, 3, 6, 5)
    assert relative_error(run(sparse, x), run(model, x)) < TOLERANCE["fp32"]
    paths = {row["name"]: row["path"] for row in sparse.backend_report()["layers"]}
    assert paths["body.0.body.0"] == paths["tail.0.0"] == "triton"


def test_triton_interpreted_fp16(tmp_path):
    pytest.importorskip("triton")
    if (reason := backends.unavailable_reason("triton")) is not None:
        pytest.skip(f"Triton kernels unavailable: {reason}")
    model = pruned_model(2, size=(1, 8))
    export(checkpoint_of(model), tmp_path / "m.safetensors", dtype="fp16", layout="csr")
    sparse = runtime.load(tmp_path / "m.safetensors", device="cpu", backend="triton")
    x = torch.rand(1, 3, 6, 5)
    assert relative_error(run(sparse, x), run(model, x)) < TOLERANCE["fp16"]


def test_structure_fuses_relu_and_residual(tmp_path):
    model = pruned_model(2)
    export(checkpoint_of(model), tmp_path / "m.safetensors", layout="csr")
    sparse = runtime.load(tmp_path / "m.safetensors", device="cpu")
    assert not sparse.training
    assert all(isinstance(block, FusedResBlock) for block in list(sparse.body)[:-1])
    assert sparse.body[0].body[0].relu and not sparse.body[0].body[2].relu
    assert not any(isinstance(m, torch.nn.Conv2d) for m in sparse.modules())
    convs = [name for name, m in sparse.named_modules() if isinstance(m, SparseConv2d)]
    assert convs == list(read_file(tmp_path / "m.safetensors").layers)  # same names as the file
    assert all(t.device.type == "cpu" for t in sparse.buffers())  # nothing left on the meta device


def test_loads_a_plain_checkpoint(tmp_path):
    model = pruned_model(2)
    save_checkpoint(tmp_path / "ckpt.safetensors", model)
    sparse = runtime.load(tmp_path / "ckpt.safetensors", device="cpu", backend="dense")
    assert sparse.body[0].body[0].layout == "csr"  # exported in memory with --layout auto
    x = torch.rand(1, 3, 8, 8)
    assert relative_error(run(sparse, x), run(model, x)) < TOLERANCE["fp32"]


def test_dense_path_matches_conv2d_epilogue():
    """The fused epilogue of the dense fallback: residual + res_scale * relu(conv + bias)."""
    from sparsesr.format.reader import ConvLayer

    torch.manual_seed(0)
    weight = torch.randn(8, 4, 3, 3) * (torch.rand(8, 4, 3, 3) < 0.5)
    from sparsesr.format import layouts

    row_ptr, col_idx, values = layouts.dense_to_csr(weight)
    layer = ConvLayer(name="c", layout="csr", shape=(8, 4, 3, 3), dtype="fp32", sparsity=0.5, stored_bytes=0,
                      tensors={"row_ptr": row_ptr.int(), "col_idx": col_idx.int(), "values": values}, index="absolute")
    bias = torch.randn(8)
    conv = SparseConv2d(layer, bias, relu=True, backend="dense")
    x, residual = torch.randn(2, 4, 7, 5), torch.randn(2, 8, 7, 5)
    expected = residual + 0.1 * torch.relu(torch.nn.functional.conv2d(x, weight, bias, padding=1))
    assert torch.allclose(conv(x, residual=residual, res_scale=0.1), expected, atol=1e-5)
    assert conv.report()["path"] == "dense"


def test_forcing_an_unavailable_backend_is_a_clear_error(tmp_path, monkeypatch):
    model = pruned_model(2)
    export(checkpoint_of(model), tmp_path / "m.safetensors")
    monkeypatch.setattr(backends, "unavailable_reason", lambda name: f"{name} is switched off for this test")
    with pytest.raises(BackendError, match="'triton' was requested but is unavailable: triton is switched off"):
        runtime.load(tmp_path / "m.safetensors", device="cpu", backend="triton")
    with pytest.raises(BackendError, match="unknown backend"):
        runtime.load(tmp_path / "m.safetensors", device="cpu", backend="fast")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="no CUDA GPU"):
            runtime.load(tmp_path / "m.safetensors", device="cuda")
    # auto falls back to dense and says why
    sparse = runtime.load(tmp_path / "m.safetensors", device="cpu")
    run(sparse, torch.rand(1, 3, 8, 8))
    row = {r["name"]: r for r in sparse.backend_report()["layers"]}["body.0.body.0"]
    assert row["path"] == "dense" and "cpu is switched off" in row["reason"]


def test_backend_report_names_the_kernels(tmp_path):
    model = pruned_model(2)
    export(checkpoint_of(model), tmp_path / "m.safetensors")
    report = runtime.load(tmp_path / "m.safetensors", device="cpu").backend_report()
    assert set(report["kernels"]) == {"cpu", "triton"}
    assert report["kernels"]["cpu"]["available"] == CPU_KERNEL
    assert (report["kernels"]["cpu"]["reason"] is None) == CPU_KERNEL
    assert [row["path"] for row in report["layers"]] == [None] * len(report["layers"])  # nothing ran yet


def test_set_backend(tmp_path):
    model = pruned_model(2)
    export(checkpoint_of(model), tmp_path / "m.safetensors")
    sparse = runtime.load(tmp_path / "m.safetensors", device="cpu")
    sparse.set_backend("dense")
    run(sparse, torch.rand(1, 3, 8, 8))
    assert {row["path"] for row in sparse.backend_report()["layers"]} == {"dense"}


def test_damaged_file_raises_format_error(tmp_path):
    model = pruned_model(2)
    export(checkpoint_of(model), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SparseFormatError):
        runtime.load(tmp_path / "m.safetensors", device="cpu")


@NEEDS_CPU_KERNEL
@pytest.mark.parametrize("kernel_faster", [True, False])
def test_auto_runs_layers_stored_dense_on_the_cpu_kernel_where_measured_faster(tmp_path, monkeypatch, kernel_faster):
    """EDSR's first and last convs are stored dense; on the CPU the kernel's crossover decides them too."""
    model = pruned_model()
    export(checkpoint_of(model), tmp_path / "m.safetensors", dtype="fp32", layout="csr")
    cpu = backends.kernel("cpu")
    asked = []

    def measured(prepared, h, w):
        asked.append(prepared.out_channels)
        return kernel_faster

    monkeypatch.setattr(cpu, "should_use_sparse", measured)
    sparse = runtime.load(tmp_path / "m.safetensors", device="cpu", backend="auto")
    x = torch.rand(1, 3, 9, 11)
    assert relative_error(run(sparse, x), run(model, x)) < TOLERANCE["fp32"]
    paths = {row["name"]: row["path"] for row in sparse.backend_report()["layers"]}
    expected = "cpu" if kernel_faster else "dense"
    assert paths["head.0"] == paths["tail.1"] == paths["body.0.body.0"] == expected
    assert 3 in asked  # the 16 -> 3 last conv was measured, not assumed
