"""The generic sparse runtime (issue #14): every family's exported file runs like its pruned dense
network on every backend here, with the fusions the trace finds; untraceable code stays correct."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import fx, nn

if not torch.cuda.is_available():
    # Triton fixes interpreter-or-not at its first import (per process): before anything imports it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sparsesr
from sparsesr.format import export, read_file
from sparsesr.format import layouts
from sparsesr.format.reader import ConvLayer, SparseModelFile
from sparsesr.models import build_model
from sparsesr.models.checkpoint import save_checkpoint
from sparsesr.runtime import SparseConv2d, SparseModel, backends
from sparsesr.runtime import sparsify as sparsify_module
from sparsesr.runtime.kept import KeptOutputs
from sparsesr.runtime.sparsify import sparsify

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}  # relative error of the output's norm
CPU_REASON = backends.unavailable_reason("cpu")
TRITON_REASON = backends.unavailable_reason("triton")
BACKENDS = ["dense",
            pytest.param("cpu", marks=pytest.mark.skipif(CPU_REASON is not None, reason=f"CPU kernel: {CPU_REASON}")),
            pytest.param("triton", marks=pytest.mark.skipif(TRITON_REASON is not None, reason=f"Triton: {TRITON_REASON}"))]

# name -> (preset, scale, overrides, expected fusions: (activations, shuffles, residual adds), modules left)
CASES = {
    # conv_first, 2 x conv1, upconv1, upconv2 (LeakyReLU after the shuffle), conv_hr; 2 blocks + the input skip
    "msrresnet-x4": ("msrresnet", 4, {"num_block": 2, "n_feats": 8}, (6, 2, 3), set()),
    # 3 dense blocks x 4 LeakyReLUs + conv_up1, conv_up2, conv_hr; 3 x conv5 * 0.2 + conv_body (an RRDB's
    # x + rdb3(..) * 0.2 is not a conv's output: stays a plain add)
    "rrdbnet-x4": ("rrdbnet", 4, {"num_block": 1, "n_feats": 8, "num_grow_ch": 4}, (15, 0, 4), set()),
    # the same behind a reflect pad to even sizes and a pixel unshuffle (both stay torch ops)
    "rrdbnet-x2": ("rrdbnet", 2, {"num_block": 1, "n_feats": 8, "num_grow_ch": 4}, (15, 0, 4), set()),
    # PReLU per channel after every conv but the last, which is shuffled (the input skip is added after it)
    "srvgg-prelu-x4": ("srvgg-cpu", 4, {"num_conv": 2, "n_feats": 8}, (3, 1, 0), set()),
    "srvgg-leaky-x2": ("srvgg-cpu", 2, {"num_conv": 2, "n_feats": 8, "act_type": "leakyrelu"}, (3, 1, 0), set()),
}


@pytest.fixture(autouse=True)
def _quiet_kernels(monkeypatch):
    monkeypatch.setenv("SPARSESR_CPU_DISPATCH_CACHE", "0")  # no timing cache files left behind
    monkeypatch.setenv("SPARSESR_TRITON_AUTOTUNE", "0")


def pruned(case: str, sparsity: float = 0.9) -> nn.Module:
    """The case's network, random non-default biases / PReLU slopes, the middle convs ~90% zeros."""
    preset, scale, overrides, _, _ = CASES[case]
    torch.manual_seed(0)
    model = build_model(preset, scale, **overrides).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(-0.2, 0.3)
        for conv in convs[1:-1]:  # the first and last convs are stored dense anyway
            w = conv.weight
            w[w.abs() <= w.abs().flatten().kthvalue(int(sparsity * w.numel())).values] = 0
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """(case, dtype) -> (pruned dense module, exported file): a checkpoint saved, then exported."""
    out = {}
    for case in CASES:
        model = pruned(case)
        folder = tmp_path_factory.mktemp(case)
        save_checkpoint(folder / "c.safetensors", model)
        for dtype in ("fp32", "fp16"):
            export(folder / "c.safetensors", folder / f"{dtype}.sparsesr.safetensors", dtype=dtype)
            out[case, dtype] = model, folder / f"{dtype}.sparsesr.safetensors"
    return out


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y - reference).norm() / reference.norm())


def fusions(model: nn.Module) -> tuple[int, int, int]:
    """(convs with an activation fused, pixel-shuffled convs, conv calls taking a residual)."""
    convs = [m for m in model.modules() if isinstance(m, SparseConv2d)]
    acts = sum(c.relu or c.negative_slope is not None for c in convs)
    residuals = sum("residual" in node.kwargs for gm in model.modules() if isinstance(gm, fx.GraphModule)
                    for node in gm.graph.nodes)
    return acts, sum(c.shuffle > 1 for c in convs), residuals


def modules_left(model: nn.Module) -> set[str]:
    """Layers other than the sparse convs and kept buffers (the activations and shuffles not fused)."""
    return {type(m).__name__ for m in model.modules()
            if not list(m.children()) and not isinstance(m, (SparseConv2d, fx.GraphModule, KeptOutputs))}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_family_runs_like_its_pruned_dense_network(exported, case, dtype, backend):
    model, path = exported[case, dtype]
    sparse = sparsesr.load(path, device="cpu", backend=backend)
    assert isinstance(sparse, SparseModel) and not sparse.training
    x = torch.rand(1, 3, 8, 8) if backend == "triton" else torch.rand(2, 3, 9, 7)  # the interpreter is slow
    y, reference = run(sparse, x), run(model, x)
    assert y.shape == reference.shape
    assert relative_error(y, reference) < TOLERANCE[dtype]
    paths = {row["path"] for row in sparse.backend_report()["layers"]}
    if backend == "triton":  # the convs stored dense (first and last) run with torch
        assert paths == {"triton", "dense"}
    else:
        assert paths == {backend}
    assert fusions(sparse) == CASES[case][3]
    assert modules_left(sparse) == CASES[case][4]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["msrresnet-x4", "srvgg-prelu-x4"])
def test_bsr_files(tmp_path, case, backend):
    model = pruned(case)
    save_checkpoint(tmp_path / "c.safetensors", model)
    export(tmp_path / "c.safetensors", tmp_path / "m.safetensors", layout="bsr")
    assert "bsr" in {layer.layout for layer in read_file(tmp_path / "m.safetensors").layers.values()}
    sparse = sparsesr.load(tmp_path / "m.safetensors", device="cpu", backend=backend)
    x = torch.rand(1, 3, 8, 8)
    assert relative_error(run(sparse, x), run(model, x)) < TOLERANCE["fp32"]
    assert fusions(sparse) == CASES[case][3]


@pytest.mark.parametrize("case", list(CASES))
def test_the_runtime_model_interface(exported, case):
    model, path = exported[case, "fp32"]
    sparse = sparsesr.load(path, device="cpu")
    family = {"srvgg-cpu": "srvgg"}.get(CASES[case][0], CASES[case][0])
    assert (sparse.family, sparse.scale, sparse.n_colors) == (family, model.config.scale, 3)
    assert sparse.config == model.config and sparse.model_file_source == str(path)
    widest = max(m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d))  # RRDBNet: 8 + 4 * 4
    assert sparse.n_feats == max(widest, model.config.n_feats)
    names = [conv.name for conv in sparse.sparse_convs()]
    assert sorted(names) == sorted(read_file(path).layers)  # every conv of the file, once
    assert not any(isinstance(m, nn.Conv2d) for m in sparse.modules())
    assert all(t.device.type == "cpu" for t in [*sparse.buffers(), *sparse.parameters()])  # none left on meta
    sparse.set_backend("dense")
    x = torch.rand(1, 3, 5, 6)
    assert relative_error(run(sparse, x), run(model, x)) < TOLERANCE["fp32"]
    assert {row["path"] for row in sparse.backend_report()["layers"]} == {"dense"}
    twin = copy.deepcopy(sparse)  # upscaling copies the network for half precision
    assert torch.equal(run(twin, x), run(sparse, x))


@pytest.mark.parametrize("case", list(CASES))
def test_without_a_trace_nothing_is_fused_and_the_output_is_the_same(exported, case, monkeypatch):
    def untraceable(module):
        raise fx.proxy.TraceError("symbolically traced variables cannot be used as inputs to control flow")

    monkeypatch.setattr(sparsify_module, "_trace", untraceable)
    model, path = exported[case, "fp32"]
    sparse = sparsesr.load(path, device="cpu", backend="dense")
    assert fusions(sparse) == (0, 0, 0)
    assert modules_left(sparse) == {type(m).__name__ for m in model.modules()
                                    if not list(m.children()) and not isinstance(m, nn.Conv2d)}
    x = torch.rand(1, 3, 7, 5)
    assert relative_error(run(sparse, x), run(model, x)) < TOLERANCE["fp32"]


def test_a_plain_checkpoint_loads_too(exported, tmp_path):
    model, _ = exported["srvgg-prelu-x4", "fp32"]
    torch.save({"params_ema": model.state_dict()}, tmp_path / "net.pth")  # Real-ESRGAN's own layout
    sparse = sparsesr.load(tmp_path / "net.pth", device="cpu", backend="dense")
    x = torch.rand(1, 3, 6, 6)
    assert sparse.family == "srvgg" and relative_error(run(sparse, x), run(model, x)) < TOLERANCE["fp32"]


# --- sparsify on a network of no family: BatchNorm, ineligible convs, broadcasting residuals ------------


class Odd(nn.Module):
    """Layers the families do not have: BatchNorm (an int64 counter), a dilated conv (stays dense),
    a PReLU after BatchNorm (not a conv's output), a residual that broadcasts, a conv used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_first = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.PReLU(8)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.twice = nn.Conv2d(8, 8, 1)
        self.conv_last = nn.Conv2d(8, 3, 3, padding=1)
        self.register_buffer("offset", torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv_first(x)))
        y = y + self.relu(self.mid(self.dilated(y)))
        y = self.relu(self.twice(self.twice(y)))  # one module, two calls: its epilogue cannot serve both
        return self.conv_last(y) * 0.5 + self.offset


def model_file_of(model: nn.Module) -> SparseModelFile:
    """A file as the writer stores it (conv weights CSR, every other tensor fp32), without a family."""
    state = model.state_dict()
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            weight = state.pop(f"{name}.weight")
            row_ptr, col_idx, values = layouts.dense_to_csr(weight)
            layers[name] = ConvLayer(name=name, layout="csr", shape=tuple(weight.shape), dtype="fp32", sparsity=0.0,
                                     stored_bytes=0, index="absolute",
                                     tensors={"row_ptr": row_ptr.int(), "col_idx": col_idx.int(), "values": values})
    return SparseModelFile(arch="odd", config=None, layers=layers, tensors={k: v.float() for k, v in state.items()},
                           family="odd", source="odd.safetensors")


@pytest.fixture(scope="module")
def odd() -> nn.Module:
    torch.manual_seed(3)
    model = Odd()
    with torch.no_grad():
        for _ in range(3):  # running statistics and num_batches_tracked = 3
            model(torch.rand(2, 3, 6, 6))
        model.act.weight.uniform_(-0.5, 0.5)
        model.offset.uniform_(-1, 1)
    return model.eval()


@pytest.mark.parametrize("backend", ["dense", pytest.param("cpu", marks=BACKENDS[1].marks)])
def test_sparsify_keeps_what_it_cannot_fuse_dense(odd, backend):
    model_file = model_file_of(odd)
    with torch.device("meta"):
        network = Odd()
    sparse = sparsify(network, model_file, backend=backend).eval()
    counter = sparse.bn.num_batches_tracked  # stored as fp32, back to the module's int64
    assert counter.dtype == torch.int64 and int(counter) == 3
    assert torch.equal(sparse.bn.running_var, odd.bn.running_var)
    assert type(sparse.dilated) is nn.Conv2d and torch.equal(sparse.dilated.weight, odd.dilated.weight)
    assert sparse.mid.relu and isinstance(sparse.twice, SparseConv2d) and not sparse.twice.relu
    assert modules_left(sparse) == {"BatchNorm2d", "PReLU", "Conv2d", "ReLU"}
    assert fusions(sparse) == (1, 0, 2)  # mid's ReLU; y + relu(mid), conv_last * 0.5 + offset (broadcasts)
    assert sparse.conv_last.out_channels == 3 and sparse.offset.shape == (1, 3, 1, 1)
    x = torch.rand(2, 3, 7, 9)
    torch.testing.assert_close(run(sparse, x), run(odd, x), atol=1e-5, rtol=1e-4)
    assert model_file.tensors["bn.num_batches_tracked"].dtype == torch.float32  # the file's tensors untouched


def test_a_tensor_missing_from_the_file_is_one_error_line(odd):
    from sparsesr.errors import BackendError

    model_file = model_file_of(odd)
    del model_file.tensors["bn.running_mean"]
    with torch.device("meta"):
        network = Odd()
    with pytest.raises(BackendError, match=r"^odd.safetensors: the network has a tensor 'bn.running_mean' that is not"):
        sparsify(network, model_file)


def test_eligibility():
    assert sparsify_module.is_eligible(nn.Conv2d(4, 4, 3, padding=1))
    assert sparsify_module.is_eligible(nn.Conv2d(4, 4, (1, 5), padding=(0, 2), bias=False))
    assert sparsify_module.is_eligible(nn.Conv2d(4, 4, 3, padding="same"))
    for conv in (nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.Conv2d(4, 4, 3, padding=2, dilation=2),
                 nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 4, 3, padding=0),
                 nn.Conv2d(4, 4, 2, padding=1), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                 type("MyConv", (nn.Conv2d,), {})(4, 4, 3, padding=1)):
        assert not sparsify_module.is_eligible(conv), conv


# --- kept output buffers (issue #12): convs read only by convs write into buffers kept across forwards ---

NEEDS_CPU_KERNEL = pytest.mark.skipif(CPU_REASON is not None, reason=f"CPU kernel: {CPU_REASON}")


def kept_buffers(model: nn.Module) -> dict[tuple, torch.Tensor]:
    """Every buffer the model's ``KeptOutputs`` hold, keyed (which module, thread, slot)."""
    return {(i, *key): t for i, k in enumerate(m for m in model.modules() if isinstance(m, KeptOutputs))
            for key, t in k.held.items()}


def set_kept(model: nn.Module, enabled: bool) -> None:
    for m in model.modules():
        if isinstance(m, KeptOutputs):
            m.enabled = enabled


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    start_a, start_b = a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()
    return start_a < start_b + b.untyped_storage().nbytes() and start_b < start_a + a.untyped_storage().nbytes()


@NEEDS_CPU_KERNEL
@pytest.mark.parametrize("case", list(CASES))
def test_kept_buffers_are_reused_and_never_returned(exported, case):
    sparse = sparsesr.load(exported[case, "fp32"][1], device="cpu", backend="cpu")
    x1, x2 = torch.rand(1, 3, 12, 10), torch.rand(1, 3, 12, 10)
    y1 = run(sparse, x1)
    first, kept = y1.clone(), kept_buffers(sparse)
    assert kept  # every family has convs read only by convs (MSRResNet's body, RRDBNet's conv_up2 / conv_hr, ...)
    y2 = run(sparse, x2)
    assert {k: t.data_ptr() for k, t in kept_buffers(sparse).items()} == {k: t.data_ptr() for k, t in kept.items()}
    assert torch.equal(y1, first)  # the second forward wrote into its buffers, not into the first result
    assert not any(overlaps(y, t) for y in (y1, y2) for t in kept.values())


@NEEDS_CPU_KERNEL
@pytest.mark.parametrize("case", list(CASES))
def test_kept_buffers_give_the_same_results_as_fresh_outputs(exported, case):
    sparse = sparsesr.load(exported[case, "fp32"][1], device="cpu", backend="cpu")
    sizes = [(2, 3, 12, 10), (1, 3, 12, 10), (2, 3, 9, 7), (1, 3, 5, 6)]  # the largest first, then its front
    inputs = [torch.rand(size) for size in sizes]
    with_kept = [run(sparse, inputs[0])]
    grown = {k: (t.data_ptr(), t.numel()) for k, t in kept_buffers(sparse).items()}
    assert grown
    with_kept += [run(sparse, x) for x in inputs[1:]]
    assert {k: (t.data_ptr(), t.numel()) for k, t in kept_buffers(sparse).items()} == grown  # not reallocated
    set_kept(sparse, False)
    fresh = [run(sparse, x) for x in inputs]
    for y, reference in zip(with_kept, fresh):
        assert torch.equal(y, reference)
    assert {k: (t.data_ptr(), t.numel()) for k, t in kept_buffers(sparse).items()} == grown  # off: untouched


def test_kept_slots_are_shared_by_lifetime():
    """A long residual chain takes three slots, and no call writes into a slot whose value is still to be read."""
    torch.manual_seed(0)
    network = build_model("msrresnet", 4, num_block=6, n_feats=8).eval()
    with torch.device("meta"):
        meta = build_model("msrresnet", 4, num_block=6, n_feats=8)
    graph = sparsify(meta, model_file_of(network)).graph
    nodes = list(graph.nodes)
    writes = {node: node.kwargs["out"].args[2] for node in nodes if "out" in node.kwargs}
    assert len(writes) == 6 * 2 + 1 + 3  # conv_first, the blocks, upconv1, upconv2, conv_hr: not conv_last
    assert set(writes.values()) == {0, 1, 2}
    occupant: dict[int, fx.Node] = {}
    for i, node in enumerate(nodes):
        if node in writes:
            previous = occupant.get(writes[node])
            assert previous is None or all(nodes.index(user) < i for user in previous.users), node
            occupant[writes[node]] = node
    output = next(node for node in nodes if node.op == "output")
    assert "out" not in output.args[0].kwargs  # the caller keeps what the network returns


@NEEDS_CPU_KERNEL
@pytest.mark.parametrize("case", ["msrresnet-x4", "srvgg-prelu-x4"])
def test_release_buffers_frees_the_kept_outputs(exported, case):
    sparse = sparsesr.load(exported[case, "fp32"][1], device="cpu", backend="cpu")
    x = torch.rand(1, 3, 12, 10)
    y = run(sparse, x)
    held = sum(t.numel() * t.element_size() for t in kept_buffers(sparse).values())
    assert held > 0 and sparse.release_buffers() == held and kept_buffers(sparse) == {}
    assert sparse.release_buffers() == 0
    assert torch.equal(run(sparse, x), y) and kept_buffers(sparse)  # allocated again, same result
    twin = copy.deepcopy(sparse)  # the half-precision copy upscaling makes: its own, empty to start
    assert kept_buffers(twin) == {} and torch.equal(run(twin, x), y)


def test_no_kept_outputs_on_the_dense_backend(exported):
    sparse = sparsesr.load(exported["msrresnet-x4", "fp32"][1], device="cpu", backend="dense")
    run(sparse, torch.rand(1, 3, 8, 8))
    assert kept_buffers(sparse) == {} and sparse.release_buffers() == 0
