"""The bf16 CPU path (issue #12): CPU flag parsing, ``DenseBf16`` against fp32 for every family, and
the warn-and-run-fp32 fallback where the CPU has no AMX-BF16. Both branches run on any CPU: the flag
detection is monkeypatched, and bf16 convolutions run (slowly) on any x86 CPU, so sizes are tiny."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import sparsesr
from sparsesr import peers
from sparsesr.cli import main
from sparsesr.evaluate import evaluate, load_eval_model
from sparsesr.format import export
from sparsesr.models import build_model
from sparsesr.models.checkpoint import save_checkpoint
from sparsesr.runtime import SparseConv2d, backends, cpuinfo, precision
from sparsesr.runtime.precision import BF16_CPU_MAX_TILE, DenseBf16
from sparsesr.upscaling import UpscaleEngine, UpscaleOptions, release_memory

from conftest import write_smooth_images

pytestmark = pytest.mark.usefixtures("one_thread")

CPU_REASON = backends.unavailable_reason("cpu")
# bf16 keeps 8 significant bits (relative rounding 2^-9 per value); a few layers stay well under this.
BF16_TOLERANCE = 2e-2

X86_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
model name\t: Intel(R) Xeon(R) Platinum 8592+
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: not the first
flags\t\t: fpu
"""
X86_ZEN4 = X86_AMX.replace("Intel(R) Xeon(R) Platinum 8592+", "AMD EPYC 9R14").replace(
    " amx_bf16 amx_tile amx_int8", "").replace("model\t\t: 207", "model\t\t: 17").replace("family\t: 6", "family\t: 25")
AARCH64 = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics bf16
CPU implementer\t: 0x41
"""

# name -> (preset, scale, overrides): small networks of each family the runtime assembles
FAMILIES = {
    "edsr": ("edsr-cpu", 2, {"n_resblocks": 2, "n_feats": 16}),
    "msrresnet": ("msrresnet", 4, {"num_block": 2, "n_feats": 8}),
    "rrdbnet": ("rrdbnet", 2, {"num_block": 1, "n_feats": 8, "num_grow_ch": 4}),
    "srvgg": ("srvgg-cpu", 4, {"num_conv": 2, "n_feats": 8}),
}


@pytest.fixture(autouse=True)
def _quiet_kernels(monkeypatch):
    monkeypatch.setenv("SPARSESR_CPU_DISPATCH_CACHE", "0")  # no timing cache files left behind


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """family -> an exported file of a small random network, its middle convs ~90% zeros (stored sparse)."""
    out = {}
    for family, (preset, scale, overrides) in FAMILIES.items():
        torch.manual_seed(0)
        model = build_model(preset, scale, **overrides).eval()
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.uniform_(-0.2, 0.3)
            for conv in convs[1:-1]:
                w = conv.weight
                w[w.abs() <= w.abs().flatten().kthvalue(int(0.9 * w.numel())).values] = 0
        folder = tmp_path_factory.mktemp(family)
        save_checkpoint(folder / "c.safetensors", model)
        export(folder / "c.safetensors", folder / "m.sparsesr.safetensors", dtype="fp32")
        out[family] = folder / "m.sparsesr.safetensors"
    return out


def _amx(monkeypatch, present: bool) -> None:
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: present)


def _relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y - reference).norm() / reference.norm())


# --- CPU flags --------------------------------------------------------------------------------


def test_cpuinfo_reads_the_first_processor_of_x86_and_aarch64():
    info = cpuinfo.parse_cpuinfo(X86_AMX)
    assert info.model_name == "Intel(R) Xeon(R) Platinum 8592+" and (info.family, info.model) == ("6", "207")
    assert {"avx512_bf16", "amx_bf16"} <= info.flags and "fpu" in info.flags and len(info.flags) == 8
    assert "amx_bf16" not in cpuinfo.parse_cpuinfo(X86_ZEN4).flags
    arm = cpuinfo.parse_cpuinfo(AARCH64)
    assert arm.model_name is None and arm.family is None and {"asimd", "bf16"} <= arm.flags
    assert cpuinfo.parse_cpuinfo("") == cpuinfo.CpuInfo()


@pytest.mark.parametrize("text, amx", [(X86_AMX, True), (X86_ZEN4, False), (AARCH64, False)])
def test_amx_detection_and_cpu_description_follow_the_flags(monkeypatch, text, amx):
    monkeypatch.setattr(cpuinfo, "cpu_info", lambda: cpuinfo.parse_cpuinfo(text))
    monkeypatch.setattr(precision, "cpu_info", lambda: cpuinfo.parse_cpuinfo(text))
    assert precision.cpu_has_amx_bf16() is (amx and torch.backends.mkldnn.is_available())
    description = peers.cpu_description()
    assert ("AMX-BF16" in description) is amx
    if text is X86_AMX:
        assert description == "Intel(R) Xeon(R) Platinum 8592+, family 6 model 207 (AVX-512, AVX512_BF16, AMX-BF16)"
    elif text is X86_ZEN4:
        assert description == "AMD EPYC 9R14, family 25 model 17 (AVX-512, AVX512_BF16)"
    else:
        assert description.endswith("(NEON)")


# --- DenseBf16 --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dense_bf16_matches_fp32_and_leaves_the_original_exact(exported, family):
    net = sparsesr.load(exported[family], device="cpu")
    x = torch.rand(1, 3, 11, 9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = net(x)
        copy = DenseBf16(net)
        y = copy(x)
        again = net(x)
    assert y.dtype == torch.float32 and y.shape == reference.shape and y.is_contiguous()
    assert 0 < _relative_error(y, reference) < BF16_TOLERANCE  # > 0: bf16 really ran
    convs, twins = net.sparse_convs(), copy.net.sparse_convs()
    assert len(twins) == len(convs) and {c.layout for c in twins} == {"dense"}
    assert all(c._values.dtype == torch.bfloat16 and c._values.is_contiguous(memory_format=torch.channels_last)
               for c in twins)
    assert {row["path"] for row in copy.net.backend_report()["layers"]} == {"dense"}
    # the original: still sparse, fp32, and bit-identical
    assert "csr" in {c.layout for c in convs} and all(c._values.dtype == torch.float32 for c in convs)
    assert torch.equal(again, reference)


@pytest.mark.skipif(CPU_REASON is not None, reason=f"CPU kernel: {CPU_REASON}")
def test_dense_bf16_of_a_model_forced_to_the_cpu_kernel_drops_its_kept_buffers(exported):
    net = sparsesr.load(exported["edsr"], device="cpu", backend="cpu")
    x = torch.rand(1, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = net(x)  # fills the kept activation buffers
        copy = DenseBf16(net)
        y = copy(x)
    assert _relative_error(y, reference) < BF16_TOLERANCE
    assert {c.backend for c in copy.net.sparse_convs()} == {"dense"}
    assert {c.backend for c in net.sparse_convs()} == {"cpu"}
    assert copy.net.release_buffers() == 0  # the copy holds none: the bf16 path never uses them
    assert net.release_buffers() > 0  # the original's are still there


# --- the engine: fast path with AMX, warn + fp32 without -------------------------------------


def _engine(path, warn, **options) -> UpscaleEngine:
    return UpscaleEngine.load(path, UpscaleOptions(device="cpu", **options), warn=warn)


def test_bf16_with_amx_runs_the_dense_bf16_copy(exported, monkeypatch):
    _amx(monkeypatch, True)
    seen = []
    engine = _engine(exported["edsr"], seen.append, precision="bf16")
    assert seen == [] and engine.dtype == torch.bfloat16
    pixels = torch.rand(3, 13, 12, generator=torch.Generator().manual_seed(3))
    y = engine.upscale_pixels(pixels)
    assert isinstance(engine._half_net, DenseBf16) and engine.dtype == torch.bfloat16
    reference = _engine(exported["edsr"], seen.append, precision="fp32").upscale_pixels(pixels)
    assert 0 < _relative_error(y, reference) < BF16_TOLERANCE and seen == []
    assert all(c._values.dtype == torch.float32 for c in engine.net.sparse_convs())  # fp32 stays for a fallback
    n = len(engine.net.sparse_convs())
    assert engine.backend_summary().startswith(f"dense {n}/{n} layers on cpu")  # the copy's calls are counted


@pytest.mark.parametrize("name, amx", [("fp16", False), ("fp16", True), ("bf16", False)])
def test_a_half_type_without_a_fast_cpu_path_warns_once_and_runs_fp32(exported, monkeypatch, name, amx):
    _amx(monkeypatch, amx)
    seen = []
    engine = _engine(exported["edsr"], seen.append, precision=name)
    needs = " (it needs a CPU with AMX-BF16)" if name == "bf16" else ""
    assert seen == [f"{name} has no fast CPU path here{needs}; running fp32"]
    pixels = torch.rand(3, 9, 8, generator=torch.Generator().manual_seed(4))
    y = engine.upscale_pixels(pixels)
    assert engine.dtype == torch.float32 and engine._half_net is None and len(seen) == 1
    assert torch.equal(y, _engine(exported["edsr"], None, precision="fp32").upscale_pixels(pixels))


@pytest.mark.parametrize("amx", [False, True])
def test_the_default_on_the_cpu_is_fp32_even_with_amx(exported, monkeypatch, amx):
    _amx(monkeypatch, amx)
    seen = []
    assert _engine(exported["edsr"], seen.append).dtype == torch.float32 and seen == []
    assert UpscaleOptions().precision == "auto"


def test_the_bf16_path_caps_the_automatic_tile_and_a_fallback_gets_its_own(exported, monkeypatch):
    _amx(monkeypatch, True)
    monkeypatch.setattr("sparsesr.upscaling.engine.auto_tile_size", lambda *a, **k: 0)  # "it all fits"
    engine = _engine(exported["edsr"], lambda m: None, precision="bf16")
    big, small = torch.zeros(1, 3, 500, 700), torch.zeros(1, 3, BF16_CPU_MAX_TILE, 200)
    assert engine._tile_size(big) == BF16_CPU_MAX_TILE and engine._tile_size(small) == 0
    assert _engine(exported["edsr"], None, precision="bf16", tile=600)._tile_size(big) == 600  # asked for: kept
    engine._fall_back("gave non-finite values")
    assert engine.dtype == torch.float32 and engine._tile_size(big) == 0


def test_sparsesr_upscale_takes_precision_bf16(exported, monkeypatch):
    _amx(monkeypatch, True)
    image = torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(5))
    try:
        y = sparsesr.upscale(image, model=str(exported["edsr"]), device="cpu", precision="bf16")
        reference = sparsesr.upscale(image, model=str(exported["edsr"]), device="cpu", precision="fp32")
    finally:
        release_memory()
    assert y.shape == (3, 20, 20) and y.dtype == torch.float32
    assert 0 < _relative_error(y, reference) < BF16_TOLERANCE


# --- sparsesr eval --precision ----------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_smooth_images(tmp_path_factory.mktemp("hr"), [(24, 20), (18, 22)])


def test_eval_bf16_scores_the_dense_bf16_copy(exported, images, monkeypatch):
    _amx(monkeypatch, True)
    fp32 = load_eval_model(str(exported["edsr"]), device="cpu")
    bf16 = load_eval_model(str(exported["edsr"]), device="cpu", precision="bf16")
    assert "bfloat16 on cpu" in bf16.description and "sparse runtime on cpu" in fp32.description
    lr = torch.rand(1, 3, 8, 9, generator=torch.Generator().manual_seed(6))
    assert 0 < _relative_error(bf16.fn(lr), fp32.fn(lr)) < BF16_TOLERANCE
    scores = [evaluate(m.fn, images, 2, progress=False)[images.name]["psnr"] for m in (fp32, bf16)]
    assert abs(scores[0] - scores[1]) < 0.5


def test_eval_cli_bf16_without_amx_warns_and_scores_fp32(exported, images, monkeypatch, capsys):
    _amx(monkeypatch, False)
    args = ["eval", "--model", str(exported["edsr"]), "-d", str(images), "--device", "cpu", "--json", "-q"]
    assert main(args) == 0
    reference = json.loads(capsys.readouterr().out)
    assert main([*args, "--precision", "bf16"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == reference
    assert err == "sparsesr eval: warning: bf16 has no fast CPU path here (it needs a CPU with AMX-BF16); running fp32\n"


def test_eval_bicubic_refuses_bf16_in_one_line(images, capsys):
    assert main(["eval", "--model", "bicubic", "--precision", "bf16", "-d", str(images)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "sparsesr eval: error: --precision bf16 applies to networks; bicubic is computed in float64\n"
    assert main(["eval", "--model", "bicubic", "--precision", "fp32", "-d", str(images), "-q"]) == 0
