"""Triton CSR / BSR sparse convolution kernels against torch.nn.functional.conv2d.

Without a GPU the kernels run in triton's interpreter. Triton fixes that choice for the whole
process when it is first imported (its own helpers such as tl.zeros are jit-decorated then), so
TRITON_INTERPRET is set here, at collection, before this module imports triton. If another
module imported triton earlier without it, ``available()`` says so and this module skips; a
line in tests/conftest.py makes that impossible. With a GPU the same tests run compiled on it.
The GPU code path is also compiled for sm_90 (no GPU needed: triton ships ptxas).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the first `import triton` of the process
pytest.importorskip("triton")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sparsesr.kernels import triton as tk  # noqa: E402
from sparsesr.kernels.triton import launch  # noqa: E402

if not tk.available():
    pytest.skip(f"Triton kernels cannot run: {tk.unavailable_reason()}", allow_module_level=True)

DEVICE = "cpu" if launch._interpreting() else "cuda"
INDEX_DTYPES = [torch.int16, torch.int32, torch.int64]
TOLERANCE = {  # (atol, rtol) against an fp32 reference built from the same rounded inputs
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 2e-2),
}
HYPOTHESIS = settings(max_examples=12, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def fixed_config(monkeypatch):
    """On a GPU, skip autotuning in the correctness tests: every new shape would re-tune."""
    monkeypatch.setenv("SPARSESR_TRITON_AUTOTUNE", "0")


# --------------------------------------------------------------------------------------------
# Reference layouts (written independently of sparsesr.format) and helpers


def to_csr(weight: torch.Tensor, index_dtype: torch.dtype = torch.int32):
    """CSR of weight.reshape(C_out, -1): (row_ptr, col_idx, values)."""
    matrix = weight.reshape(weight.shape[0], -1)
    nonzero = matrix != 0
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), nonzero.sum(1).cumsum(0)])
    col_idx = nonzero.nonzero()[:, 1]  # row-major order: sorted within each row
    return row_ptr.to(index_dtype), col_idx.to(index_dtype), matrix[nonzero].contiguous()


def to_bsr(weight: torch.Tensor, b_h: int, b_w: int, index_dtype: torch.dtype = torch.int32,
           padding_value: float = float("nan")):
    """BSR of weight.reshape(C_out, -1) with b_h x b_w blocks.

    Padding entries of edge blocks are set to ``padding_value`` (NaN by default) so that a
    kernel that reads them instead of ignoring them fails the comparison.
    """
    matrix = weight.reshape(weight.shape[0], -1)
    c_out, k = matrix.shape
    rows, cols = math.ceil(c_out / b_h), math.ceil(k / b_w)
    padded = matrix.new_zeros(rows * b_h, cols * b_w)
    padded[:c_out, :k] = matrix
    is_padding = torch.ones_like(padded, dtype=torch.bool)
    is_padding[:c_out, :k] = False

    def blocks_of(t: torch.Tensor) -> torch.Tensor:  # [rows, cols, b_h, b_w]
        return t.reshape(rows, b_h, cols, b_w).transpose(1, 2)

    keep = blocks_of(padded).ne(0).any(-1).any(-1)
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), keep.sum(1).cumsum(0)])
    col_idx = keep.nonzero()[:, 1]
    values = blocks_of(padded)[keep].clone()
    values[blocks_of(is_padding)[keep]] = padding_value
    return row_ptr.to(index_dtype), col_idx.to(index_dtype), values.contiguous()


def sparse_weight(gen: torch.Generator, c_out: int, c_in: int, k: int, density: float,
                  block: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """Random weight with block-granular sparsity. With two or more block rows the first is
    empty and the last dense, so both edge cases occur in most draws."""
    weight = torch.randn(c_out, c_in * k * k, generator=gen)
    b_h, b_w = block
    rows, cols = math.ceil(c_out / b_h), math.ceil(c_in * k * k / b_w)
    keep = torch.rand(rows, cols, generator=gen) < density
    if rows >= 2:
        keep[0] = False
        keep[-1] = True
    mask = keep.repeat_interleave(b_h, 0).repeat_interleave(b_w, 1)[:c_out, : c_in * k * k]
    return (weight * mask).reshape(c_out, c_in, k, k)


def reference(x, weight, bias, relu, residual, res_scale):
    """The fused epilogue of common.md, in fp32 on the CPU, from the already-rounded inputs."""
    y = F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(),
                 padding=weight.shape[-1] // 2)
    if relu:
        y = F.relu(y)
    if residual is not None:
        y = residual.float() + res_scale * y
    return y


def on_device(*tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


def csr_conv(x, weight, bias=None, relu=False, residual=None, res_scale=1.0,
             index_dtype=torch.int32):
    """Run csr_conv2d on DEVICE from CPU tensors; the result comes back to the CPU."""
    k = weight.shape[-1]
    x, bias, residual, *csr = on_device(x, bias, residual, *to_csr(weight, index_dtype))
    return tk.csr_conv2d(x, *csr, bias, k, k, relu=relu, residual=residual,
                         res_scale=res_scale).cpu()


def bsr_conv(x, weight, block, bias=None, relu=False, residual=None, res_scale=1.0,
             index_dtype=torch.int32):
    k = weight.shape[-1]
    x, bias, residual, *bsr = on_device(x, bias, residual, *to_bsr(weight, *block, index_dtype))
    return tk.bsr_conv2d(x, *bsr, weight.shape[0], bias, k, k, relu=relu, residual=residual,
                         res_scale=res_scale).cpu()


def assert_matches(out, expected, dtype):
    atol, rtol = TOLERANCE[dtype]
    assert out.dtype == dtype
    assert out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------
# Correctness against F.conv2d

case = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1),
    "n": st.integers(1, 2),
    "c_in": st.integers(1, 5),
    "c_out": st.integers(1, 9),
    "h": st.integers(1, 7),
    "w": st.integers(1, 7),
    "k": st.sampled_from([1, 3]),
    "density": st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    "index_dtype": st.sampled_from(INDEX_DTYPES),
    "bias": st.booleans(),
    "relu": st.booleans(),
    "residual": st.booleans(),
})


def make_inputs(c, dtype=torch.float32, block=(1, 1)):
    gen = torch.Generator().manual_seed(c["seed"])
    x = torch.randn(c["n"], c["c_in"], c["h"], c["w"], generator=gen).to(dtype)
    weight = sparse_weight(gen, c["c_out"], c["c_in"], c["k"], c["density"], block).to(dtype)
    bias = torch.randn(c["c_out"], generator=gen).to(dtype) if c["bias"] else None
    residual = (torch.randn(c["n"], c["c_out"], c["h"], c["w"], generator=gen).to(dtype)
                if c["residual"] else None)
    return x, weight, bias, residual


@HYPOTHESIS
@given(c=case)
def test_csr_matches_conv2d(c):
    x, weight, bias, residual = make_inputs(c)
    out = csr_conv(x, weight, bias, c["relu"], residual, 0.25, c["index_dtype"])
    assert_matches(out, reference(x, weight, bias, c["relu"], residual, 0.25), torch.float32)


@HYPOTHESIS
@given(c=case, block=st.sampled_from([(4, 1), (8, 1), (1, 4), (2, 3), (3, 2), (16, 1)]))
def test_bsr_matches_conv2d(c, block):
    x, weight, bias, residual = make_inputs(c, block=block)
    out = bsr_conv(x, weight, block, bias, c["relu"], residual, 0.25, c["index_dtype"])
    assert_matches(out, reference(x, weight, bias, c["relu"], residual, 0.25), torch.float32)


HALF_CASE = dict(seed=3, n=2, c_in=5, c_out=7, h=5, w=6, k=3, density=0.5,
                 index_dtype=torch.int16, bias=True, relu=True, residual=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_csr_half_precision(dtype):
    x, weight, bias, residual = make_inputs(HALF_CASE, dtype)
    out = csr_conv(x, weight, bias, True, residual, 0.5, torch.int16)
    assert_matches(out, reference(x, weight, bias, True, residual, 0.5), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block", [(4, 1), (1, 4)])
def test_bsr_half_precision(dtype, block):
    x, weight, bias, residual = make_inputs(HALF_CASE, dtype, block)
    out = bsr_conv(x, weight, block, bias, True, residual, 0.5, torch.int16)
    assert_matches(out, reference(x, weight, bias, True, residual, 0.5), dtype)


def test_mixed_dtypes_follow_the_input():
    """fp32 weights and bias, bf16 residual, fp16 input: the output is fp16."""
    x, weight, bias, residual = make_inputs(dict(HALF_CASE, seed=4))
    x16, res16 = x.half(), residual.bfloat16()
    expected = reference(x16, weight.half(), bias, True, res16, 0.5)
    x16, res16, bias_d, *bsr = on_device(x16, res16, bias, *to_bsr(weight, 4, 1))
    out = tk.bsr_conv2d(x16, *bsr, 7, bias_d, 3, 3, relu=True, residual=res16, res_scale=0.5)
    assert_matches(out.cpu(), expected, torch.float16)


def test_5x5_kernel_and_wide_image():
    """Any odd kernel size; an image wider than one pixel tile (several tiles per row)."""
    c = dict(HALF_CASE, c_in=2, c_out=3, h=3, w=50, k=5)
    x, weight, bias, residual = make_inputs(c)
    expected = reference(x, weight, bias, True, residual, 0.5)
    assert_matches(csr_conv(x, weight, bias, True, residual, 0.5, torch.int64),
                   expected, torch.float32)
    assert_matches(bsr_conv(x, weight, (2, 1), bias, True, residual, 0.5, torch.int64),
                   expected, torch.float32)


@pytest.mark.parametrize("layout", ["csr", "bsr"])
def test_leaky_relu_and_prelu_epilogues(layout):
    """negative_slope: a float (LeakyReLU), or 1 or C_out slopes (PReLU), with a residual."""
    c = dict(seed=3, n=2, c_in=5, c_out=12, h=6, w=9, k=3, density=0.4,
             index_dtype=torch.int32, bias=True, relu=False, residual=True)
    x, weight, bias, residual = make_inputs(c, torch.float32, block=(4, 1))
    plain = reference(x, weight, bias, False, None, 1.0)
    k = weight.shape[-1]
    xd, bd, rd = on_device(x, bias, residual)
    if layout == "csr":
        arrays = on_device(*to_csr(weight, torch.int32))
        run = lambda **kw: tk.csr_conv2d(xd, *arrays, bd, k, k, **kw).cpu()  # noqa: E731
    else:
        arrays = on_device(*to_bsr(weight, 4, 1, torch.int32))
        run = lambda **kw: tk.bsr_conv2d(xd, *arrays, 12, bd, k, k, **kw).cpu()  # noqa: E731
    slopes = torch.rand(12) - 0.5
    assert_matches(run(negative_slope=0.2), F.leaky_relu(plain, 0.2), torch.float32)
    assert_matches(run(negative_slope=slopes.to(DEVICE)), F.prelu(plain, slopes), torch.float32)
    assert_matches(run(negative_slope=torch.tensor([0.3], device=DEVICE)), F.prelu(plain, torch.tensor([0.3])),
                   torch.float32)
    assert_matches(run(negative_slope=slopes.to(DEVICE), residual=rd, res_scale=0.5),
                   residual + 0.5 * F.prelu(plain, slopes), torch.float32)
    with pytest.raises(ValueError, match="exclusive"):
        run(negative_slope=0.2, relu=True)
    with pytest.raises(ValueError, match="1 or 12 entries"):
        run(negative_slope=torch.ones(5, device=DEVICE))


def test_all_zero_weight_gives_epilogue_of_zero():
    x = torch.randn(1, 3, 4, 4)
    weight = torch.zeros(6, 3, 3, 3)
    bias = torch.linspace(-1, 1, 6)
    residual = torch.randn(1, 6, 4, 4)
    expected = residual + 2.0 * F.relu(bias).view(1, 6, 1, 1)
    torch.testing.assert_close(csr_conv(x, weight, bias, True, residual, 2.0), expected)
    torch.testing.assert_close(bsr_conv(x, weight, (4, 1), bias, True, residual, 2.0), expected)


def test_out_of_range_columns_are_skipped_not_read():
    """Malformed indices must never read outside x: columns >= K contribute nothing."""
    x = torch.randn(1, 2, 3, 3)
    weight = torch.randn(2, 2, 3, 3)
    row_ptr, col_idx, values = to_csr(weight)
    bad_cols = torch.cat([col_idx, torch.tensor([10_000], dtype=col_idx.dtype)])
    bad_values = torch.cat([values, torch.tensor([1.0])])
    bad_row_ptr = row_ptr.clone()
    bad_row_ptr[-1] += 1  # the bogus nonzero belongs to the last row
    out = tk.csr_conv2d(*on_device(x, bad_row_ptr, bad_cols, bad_values), None, 3, 3)
    torch.testing.assert_close(out.cpu(), F.conv2d(x, weight, padding=1), atol=1e-4, rtol=1e-4)


def test_empty_batch_and_empty_image():
    weight = torch.randn(4, 3, 3, 3)
    for shape in [(0, 3, 5, 5), (1, 3, 0, 5)]:
        x = torch.randn(shape)
        assert csr_conv(x, weight).shape == (shape[0], 4, shape[2], shape[3])
        assert bsr_conv(x, weight, (4, 1)).shape == (shape[0], 4, shape[2], shape[3])


# --------------------------------------------------------------------------------------------
# Argument checks and availability


def test_invalid_arguments_raise_value_errors():
    weight = torch.randn(3, 2, 3, 3)
    x, row_ptr, col_idx, values = on_device(torch.randn(1, 2, 4, 4), *to_csr(weight))
    b_row_ptr, b_col_idx, b_values = on_device(*to_bsr(weight, 2, 1))
    bad_calls = {
        "NCHW": lambda: tk.csr_conv2d(x[0], row_ptr, col_idx, values, None, 3, 3),
        "float32, float16 or bfloat16": lambda: tk.csr_conv2d(
            x.double(), row_ptr, col_idx, values, None, 3, 3),
        "odd": lambda: tk.csr_conv2d(x, row_ptr, col_idx, values, None, 2, 3),
        "row_ptr must be one of": lambda: tk.csr_conv2d(
            x, row_ptr.float(), col_idx, values, None, 3, 3),
        "same length": lambda: tk.csr_conv2d(x, row_ptr, col_idx, values[:-1], None, 3, 3),
        "bias must have 3": lambda: tk.csr_conv2d(
            x, row_ptr, col_idx, values, x.new_zeros(4), 3, 3),
        "residual must have": lambda: tk.csr_conv2d(
            x, row_ptr, col_idx, values, None, 3, 3, residual=x.new_zeros(1, 3, 4, 5)),
        "block_row_ptr must have": lambda: tk.bsr_conv2d(
            x, b_row_ptr, b_col_idx, b_values, 5, None, 3, 3),
        "one entry per block": lambda: tk.bsr_conv2d(
            x, b_row_ptr, b_col_idx[:-1], b_values, 3, None, 3, 3),
        "block_values must have 3": lambda: tk.bsr_conv2d(
            x, b_row_ptr, b_col_idx, b_values[:, :, 0], 3, None, 3, 3),
        "out_channels": lambda: tk.bsr_conv2d(x, b_row_ptr, b_col_idx, b_values, 0, None, 3, 3),
        "at most 65535 images": lambda: tk.csr_conv2d(
            x.new_zeros(65536, 2, 1, 1), row_ptr, col_idx, values, None, 3, 3),
    }
    for message, call in bad_calls.items():
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.skipif(DEVICE != "cpu", reason="needs the interpreter")
def test_cpu_tensors_are_refused_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA device"):
        csr_conv(torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3))


def test_available_here():
    assert tk.available()
    assert tk.unavailable_reason() is None


def _run_python(code: str, **env_changes: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_import_and_availability_without_triton_or_gpu():
    """Importing the package must not import triton; asking available() must not either when
    the answer is no; a missing triton, or one imported before TRITON_INTERPRET was set, is
    reported instead of failing later."""
    done = _run_python("""
        import os, sys
        import sparsesr.kernels.triton as tk
        assert 'triton' not in sys.modules, 'triton imported eagerly'
        if not __import__('torch').cuda.is_available():
            print('no-gpu:', tk.unavailable_reason())
            assert 'triton' not in sys.modules, 'triton imported to answer no'
            import triton
            os.environ['TRITON_INTERPRET'] = '1'
            print('late:', tk.unavailable_reason())
        sys.modules['triton'] = None  # `import triton` fails from here on
        print('missing:', tk.unavailable_reason())
    """, TRITON_INTERPRET=None)
    assert done.returncode == 0, done.stderr
    assert "missing: triton is not importable" in done.stdout
    if DEVICE == "cpu":
        assert "no-gpu: no CUDA/ROCm GPU" in done.stdout
        assert "late: TRITON_INTERPRET=1 was set after triton was imported" in done.stdout


# --------------------------------------------------------------------------------------------
# The GPU code path without a GPU: compile for sm_90 (triton ships ptxas). Runs in a fresh
# process because this one may have triton in interpreter mode.

COMPILE_SCRIPT = """
    import json, sys, warnings
    warnings.simplefilter("ignore")
    import triton
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as exc:
        sys.exit(print(json.dumps({"skip": f"this triton has no CUDA backend ({exc})"})))
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    from sparsesr.kernels.triton import kernels

    def types(dtype):  # x, row_ptr, col_idx, values, bias, slope, residual, out, 5 ints, res_scale
        return [f"*{dtype}", "*i32", "*i16", f"*{dtype}", "*fp32", "*fp32", f"*{dtype}", f"*{dtype}",
                "i32", "i32", "i32", "i32", "i32", "fp32"]

    def compile_sm90(kernel, dtype, constants):
        fn = JITFunction(kernel)
        signature = dict(zip(fn.arg_names, types(dtype) + ["constexpr"] * len(constants)))
        constexprs = {(fn.arg_names.index(k),): v for k, v in constants.items()}
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 4, "num_stages": 3})
        return compiled.asm["ptx"]

    def bsr(dtype, precision, b_h, b_w, k):
        return dict(KH=k, KW=k, B_H=b_h, B_W=b_w, HAS_BIAS=True, RELU=False, SLOPE=2, HAS_RESIDUAL=True,
                    DOT_IN_FP32=False, INPUT_PRECISION=precision, BLOCK_CO=16, BW_PAD=b_w,
                    BLOCK_K=16, BLOCK_P=128)

    results = {}
    for name, kernel, dtype, constants in [
        ("bsr fp16 4x1 3x3", kernels.bsr_conv_kernel, "fp16", bsr("fp16", "ieee", 4, 1, 3)),
        ("bsr bf16 1x4 1x1", kernels.bsr_conv_kernel, "bf16", bsr("bf16", "ieee", 1, 4, 1)),
        ("bsr fp32 8x1 tf32", kernels.bsr_conv_kernel, "fp32", bsr("fp32", "tf32", 8, 1, 3)),
        ("csr fp32 3x3", kernels.csr_conv_kernel, "fp32", dict(
            KH=3, KW=3, HAS_BIAS=False, RELU=False, SLOPE=1, HAS_RESIDUAL=True, BLOCK_NZ=8, BLOCK_P=128)),
        ("csr bf16 1x1", kernels.csr_conv_kernel, "bf16", dict(
            KH=1, KW=1, HAS_BIAS=True, RELU=True, SLOPE=0, HAS_RESIDUAL=False, BLOCK_NZ=8, BLOCK_P=128)),
    ]:
        ptx = compile_sm90(kernel, dtype, constants)
        results[name] = {"mma": "mma" in ptx, "entry": f".entry {kernel.__name__}" in ptx}

    # The autotuned wrappers build, and a block wider than every K step gets a config of its own.
    from sparsesr.kernels.triton import launch
    tuned = launch._kernels(interpret=False, autotune=True)
    wide = launch._bsr_prune(tuned["bsr"].configs, {}, BW_PAD=128)
    results["autotune"] = {"tuned": tuned["autotuned"], "wide_block_k": wide[0].kwargs["BLOCK_K"]}
    print(json.dumps(results))
"""


def test_gpu_code_path_compiles_for_sm90():
    done = _run_python(COMPILE_SCRIPT, TRITON_INTERPRET=None)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in results:
        pytest.skip(results["skip"])
    assert results.pop("autotune") == {"tuned": True, "wide_block_k": 128}
    assert all(r["entry"] for r in results.values()), results
    # tl.dot must become tensor-core instructions in every BSR variant
    assert all(r["mma"] for name, r in results.items() if name.startswith("bsr")), results


# --------------------------------------------------------------------------------------------
# A real GPU, compiled and autotuned (skipped without one)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_autotuned_gpu_kernels_match_conv2d(dtype, monkeypatch):
    monkeypatch.setenv("SPARSESR_TRITON_AUTOTUNE", "1")
    c = dict(seed=5, n=2, c_in=24, c_out=40, h=19, w=33, k=3, density=0.3,
             index_dtype=torch.int32, bias=True, relu=True, residual=True)
    x, weight, bias, residual = make_inputs(c, dtype, block=(4, 1))
    expected = reference(x, weight, bias, True, residual, 0.1)
    assert_matches(csr_conv(x, weight, bias, True, residual, 0.1), expected, dtype)
    assert_matches(bsr_conv(x, weight, (4, 1), bias, True, residual, 0.1), expected, dtype)
