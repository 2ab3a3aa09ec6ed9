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
from sparsesr.models import build_model
from sparsesr.models.checkpoint import Checkpoint, save_checkpoint
from sparsesr.runtime import BackendError, FusedResBlock, SparseConv2d, backends

CPU_KERNEL = backends.unavailable_reason("cpu") is None
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _quiet_kernels(monkeypatch):
    # The CPU kernel caches its dense-vs-sparse timings in ~/.cache; tests leave no files behind.
    monkeypatch.setenv("SPARSESR_CPU_DISPATCH_CACHE", "0")


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
    """The real EDSR-baseline x2, 90% pruned, exported as fp16 (--layout auto)."""
    model = pruned_model(2, size=None)
    path = tmp_path_factory.mktemp("edsr") / "m.safetensors"
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


@pytest.mark.parametrize("layout", ["csr", "bsr"])
@pytest.mark.parametrize("activation", [torch.nn.ReLU(), torch.nn.LeakyReLU(0.2), torch.nn.PReLU(8),
                                        torch.nn.PReLU(1)], ids=["relu", "leaky", "prelu", "prelu1"])
def test_fused_activations_on_every_backend(layout, activation):
    """fuse_activation takes ReLU / LeakyReLU / PReLU into the epilogue; every path computes it."""
    from sparsesr.format import layouts
    from sparsesr.format.reader import ConvLayer

    torch.manual_seed(1)
    if isinstance(activation, torch.nn.PReLU):
        with torch.no_grad():
            activation.weight.uniform_(-0.5, 0.5)
    weight = torch.randn(8, 4, 3, 3) * (torch.rand(8, 1, 3, 3) < 0.5)  # 8x1 blocks share a pattern
    if layout == "csr":
        row_ptr, col_idx, values = layouts.dense_to_csr(weight)
        tensors = {"row_ptr": row_ptr.int(), "col_idx": col_idx.int(), "values": values}
    else:
        row_ptr, col_idx, values = layouts.dense_to_bsr(weight, (4, 1))
        tensors = {"block_row_ptr": row_ptr.int(), "block_col_idx": col_idx.int(), "block_values": values}
    layer = ConvLayer(name="c", layout=layout, shape=(8, 4, 3, 3), dtype="fp32", sparsity=0.5, stored_bytes=0,
                      tensors=tensors, index="absolute", block=(4, 1) if layout == "bsr" else None)
    bias = torch.randn(8)
    x, residual = torch.randn(2, 4, 7, 5), torch.randn(2, 8, 7, 5)
    expected = residual + 0.5 * activation(torch.nn.functional.conv2d(x, weight, bias, padding=1)).detach()
    for backend in ["dense"] + (["cpu"] if CPU_KERNEL else []) + (["triton"] if backends.unavailable_reason("triton") is None else []):
        conv = SparseConv2d(layer, bias, backend=backend)
        assert conv.fuse_activation(activation)
        assert not conv.fuse_activation(torch.nn.ReLU())  # one activation per epilogue
        torch.testing.assert_close(conv(x, residual=residual, res_scale=0.5), expected, atol=1e-5, rtol=1e-4)
        assert conv.report()["path"] == backend
    assert not SparseConv2d(layer, bias).fuse_activation(torch.nn.GELU())
    assert not SparseConv2d(layer, bias).fuse_activation(torch.nn.PReLU(3))  # neither 1 nor C_out slopes


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


# --- devices, names, hostile checkpoints, shipped files -----------------------------------------


def test_resolve_device():
    """#15.3: one function turns every --device / device= string into a torch device."""
    from sparsesr.runtime.backends import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:x", "cuda:-1", "cpu:0", "", "mps", "cuda:1:2"):
        with pytest.raises(BackendError, match=f"--device {bad}: expected auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        assert resolve_device("cuda:0") == torch.device("cuda", 0)
        with pytest.raises(BackendError, match=f"there is no CUDA device {count}"):
            resolve_device(f"cuda:{count}")
    else:
        for name in ("cuda", "cuda:0"):
            with pytest.raises(BackendError, match="no CUDA GPU is available"):
                resolve_device(name)


def test_bad_devices_are_backend_errors_everywhere(tmp_path):
    import sparsesr
    from sparsesr.upscaling.engine import _pick_device

    model = pruned_model(2)
    export(checkpoint_of(model), tmp_path / "m.safetensors")
    for load in (runtime.load, sparsesr.load):
        with pytest.raises(BackendError, match="--device tpu: expected auto, cpu, cuda or cuda:N"):
            load(tmp_path / "m.safetensors", device="tpu")
    with pytest.raises(BackendError, match="--device tpu"):
        _pick_device("tpu")
    assert _pick_device("cpu") == "cpu"


def test_load_takes_embedded_names(tmp_path, monkeypatch):
    """#15.10: sparsesr.load("x2") like `upscale --model x2`; an existing file of that name wins."""
    import sparsesr
    from sparsesr.errors import ModelNotFoundError

    sparse = sparsesr.load("x2", device="cpu")
    assert sparse.config.scale == 2 and sparse.model_file_source.endswith("edsr-baseline-x2.sparsesr.safetensors")
    monkeypatch.chdir(tmp_path)
    export(checkpoint_of(pruned_model(4)), tmp_path / "x2")
    assert runtime.load("x2", device="cpu").config.scale == 4
    with pytest.raises(ModelNotFoundError, match=r"x9: no such file, and not an embedded model \(x2, x4, fast\)"):
        runtime.load("x9", device="cpu")


def test_load_refuses_a_hostile_checkpoint_before_building(tmp_path, monkeypatch):
    """#15.13: `upscale --model` sends a file without sparsesr metadata through the checkpoint path."""
    import json

    from safetensors.torch import save as save_tensors

    from sparsesr.errors import CheckpointError
    from sparsesr.format import writer

    def refuse(config):
        raise AssertionError(f"a network was built for {config}")

    monkeypatch.setattr(writer, "model_from_config", refuse)  # the old code allocated 57.6 GB here
    path = tmp_path / "e.safetensors"
    path.write_bytes(save_tensors({"head.0.weight": torch.zeros(1, 3, 3, 3)},
                                  metadata={"config": json.dumps({"n_resblocks": 1, "n_feats": 40000, "scale": 2})}))
    with pytest.raises(CheckpointError, match="n_feats must be an integer in 1..2048, found 40000"):
        runtime.load(path, device="cpu")


def test_shipped_models_still_load_and_run():
    """Files written by this version (the embedded models) pass the stricter reader and run."""
    from sparsesr.pretrained import EMBEDDED_MODELS, model_dir

    for name, entry in EMBEDDED_MODELS.items():
        path = model_dir() / entry.filename
        assert path.is_file(), path
        model_file = read_file(path)
        assert model_file.config.scale == entry.scale
        sparse = runtime.load(path, device="cpu", backend="dense")
        y = run(sparse, torch.rand(1, 3, 8, 8))
        assert y.shape == (1, 3, 8 * entry.scale, 8 * entry.scale) and bool(torch.isfinite(y).all()), name


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_mean_shifts_are_folded_into_the_first_and_last_convs(scale, one_thread):
    """No pass of its own for add_mean / sub_mean or the rgb_range scalings, the same output to
    rounding (borders included: odd sizes), and loading twice from one parsed file gives the same
    model (the fold must not touch the file's tensors)."""
    from sparsesr.format import export_bytes, parse_bytes
    from sparsesr.models import build_model
    from sparsesr.models.checkpoint import Checkpoint
    from sparsesr.pruning import one_shot_prune
    from sparsesr.runtime import load

    torch.manual_seed(scale)
    dense = build_model("edsr-cpu", scale, n_resblocks=2, n_feats=8).eval()
    one_shot_prune(dense, 0.8)
    model_file = parse_bytes(export_bytes(Checkpoint(state_dict=dense.state_dict(), arch="edsr-cpu", config=dense.config)))
    x = torch.rand(2, 3, 13, 11)
    with torch.no_grad():
        want = dense(x)
        for backend in ("dense", "cpu", "dense"):
            if backend == "cpu" and not __import__("sparsesr.kernels.cpu", fromlist=["available"]).available():
                continue
            model = load(model_file, backend=backend)
            calls = []
            for shift in (model.sub_mean, model.add_mean):
                shift.register_forward_hook(lambda *args: calls.append(1))
            torch.testing.assert_close(model(x), want, atol=2e-6, rtol=1e-5)
            assert not calls, "a mean shift ran as a pass of its own"


@NEEDS_CPU_KERNEL
@pytest.mark.parametrize("scale", [2, 4])
def test_activations_go_to_kept_buffers(tmp_path, scale):
    """Every conv but the last writes into buffers kept across forwards (a fresh large output is
    page faults: at a 1024² tile of the 64-channel x2 they took 45 % of the forward): the head's
    output, the blocks' middle and two that the blocks write in turn, and the upsampler's. What the
    model returns is never one of them, and results do not depend on the reuse."""
    import threading

    model = pruned_model(scale=scale)
    export(checkpoint_of(model), tmp_path / "m.safetensors")
    sparse = runtime.load(tmp_path / "m.safetensors", device="cpu", backend="cpu")
    ups = [m for m in sparse.tail[0] if isinstance(m, SparseConv2d)]
    x1, x2, small = torch.rand(1, 3, 12, 10), torch.rand(1, 3, 12, 10), torch.rand(1, 3, 5, 7)
    y1 = run(sparse, x1)
    kept = {k: v.data_ptr() for k, v in sparse._kept_outputs.held.items()}
    assert sorted(name for _, name in kept) == sorted(["head", "mid", "turn0", "turn1"] + [conv.name for conv in ups])
    y2 = run(sparse, x2)
    assert {k: v.data_ptr() for k, v in sparse._kept_outputs.held.items()} == kept  # reused, not reallocated
    assert y1.data_ptr() not in kept.values() and y2.data_ptr() not in kept.values()
    for x, y in ((x1, y1), (x2, y2), (small, run(sparse, small))):  # a smaller input uses the buffers' front
        assert relative_error(y, run(model, x)) < TOLERANCE["fp32"]
    assert {k: v.data_ptr() for k, v in sparse._kept_outputs.held.items()} == kept

    inputs = [torch.rand(1, 3, 9 + i, 8) for i in range(4)]
    outputs: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        for _ in range(3):
            outputs[i] = run(sparse, inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, x in enumerate(inputs):  # each thread had its own buffers
        assert relative_error(outputs[i], run(model, x)) < TOLERANCE["fp32"]


@NEEDS_CPU_KERNEL
def test_release_buffers_frees_the_kept_activations(tmp_path):
    model = pruned_model()
    export(checkpoint_of(model), tmp_path / "m.safetensors")
    sparse = runtime.load(tmp_path / "m.safetensors", device="cpu", backend="cpu")
    x = torch.rand(1, 3, 12, 10)
    y = run(sparse, x)
    held = sum(t.numel() * 4 for t in sparse._kept_outputs.held.values())
    assert held > 0 and sparse.release_buffers() == held and sparse._kept_outputs.held == {}
    torch.testing.assert_close(run(sparse, x), y)  # allocated again, same result
    assert sparse._kept_outputs.held


def test_no_kept_buffer_on_the_dense_backend(tmp_path):
    model = pruned_model()
    export(checkpoint_of(model), tmp_path / "m.safetensors")
    sparse = runtime.load(tmp_path / "m.safetensors", device="cpu", backend="dense")
    run(sparse, torch.rand(1, 3, 8, 8))
    assert sparse._kept_outputs.held == {}
