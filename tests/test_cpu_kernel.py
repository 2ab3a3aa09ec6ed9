"""The compiled CPU sparse convolution (sparsesr.kernels.cpu) against torch.nn.functional.conv2d."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sparsesr.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"CPU kernel not built: {cpu.unavailable_reason()}")

ISAS = cpu.supported_isas() if cpu.available() else []


# ---- helpers ----------------------------------------------------------------------------------


def sparse_weight(c_out: int, c_in: int, k: int, density: float, block: int = 1, seed: int = 0) -> torch.Tensor:
    """Random weight whose zeros follow a pattern shared by `block` consecutive output channels."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out, c_in, k, k, generator=gen)
    n_block_rows = -(-c_out // block)
    keep = torch.rand(n_block_rows, c_in * k * k, generator=gen) < density
    keep = keep.repeat_interleave(block, dim=0)[:c_out]
    return weight * keep.view_as(weight)


def to_csr(weight: torch.Tensor, index_dtype: torch.dtype = torch.int64):
    matrix = weight.reshape(weight.shape[0], -1)
    rows, cols = matrix.nonzero(as_tuple=True)
    row_ptr = torch.zeros(matrix.shape[0] + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=matrix.shape[0]), 0)
    return row_ptr.to(index_dtype), cols.to(index_dtype), matrix[rows, cols]


def to_bsr(weight: torch.Tensor, b_h: int, b_w: int, padding_value: float = 0.0,
           index_dtype: torch.dtype = torch.int64):
    """BSR per the shared convention; padding past C_out / K is filled with `padding_value`."""
    c_out = weight.shape[0]
    matrix = weight.reshape(c_out, -1)
    k_total = matrix.shape[1]
    n_br, n_bc = -(-c_out // b_h), -(-k_total // b_w)
    padded = torch.full((n_br * b_h, n_bc * b_w), padding_value)
    padded[:c_out, :k_total] = matrix
    blocks = padded.view(n_br, b_h, n_bc, b_w).permute(0, 2, 1, 3)  # [br, bc, b_h, b_w]
    real = torch.zeros(n_br * b_h, n_bc * b_w, dtype=torch.bool)
    real[:c_out, :k_total] = matrix != 0
    present = real.view(n_br, b_h, n_bc, b_w).any(dim=3).any(dim=1)  # [br, bc]
    block_rows, block_cols = present.nonzero(as_tuple=True)
    row_ptr = torch.zeros(n_br + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(torch.bincount(block_rows, minlength=n_br), 0)
    return row_ptr.to(index_dtype), block_cols.to(index_dtype), blocks[block_rows, block_cols].contiguous()


def reference(x, weight, bias=None, relu=False, residual=None, res_scale=1.0):
    y = F.conv2d(x, weight, bias, padding=(weight.shape[2] // 2, weight.shape[3] // 2))
    if relu:
        y = F.relu(y)
    if residual is not None:
        y = residual + res_scale * y
    return y


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale)


# ---- correctness ------------------------------------------------------------------------------

SHAPES = [  # (n, c_in, c_out, k, h, w)
    (1, 3, 5, 3, 1, 1),
    (1, 5, 70, 3, 7, 33),
    (2, 64, 64, 3, 33, 7),
    (1, 70, 3, 3, 1, 33),
    (1, 64, 70, 1, 7, 7),
    (1, 3, 64, 1, 33, 1),
    (1, 64, 64, 3, 33, 33),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("block", [1, 4, 8])
def test_matches_conv2d(isa, shape, block):
    n, c_in, c_out, k, h, w = shape
    weight = sparse_weight(c_out, c_in, k, density=0.2, block=block, seed=sum(shape) + block)
    x = torch.randn(n, c_in, h, w)
    prepared = cpu.prepare_dense(weight)
    assert prepared.group == (4 if block > 1 else 1)
    assert_matches(cpu.conv2d(x, prepared, isa=isa), reference(x, weight))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("block", [1, 4])
def test_fused_epilogue(isa, block):
    weight = sparse_weight(70, 64, 3, density=0.1, block=block)
    x, bias = torch.randn(2, 64, 9, 19), torch.randn(70)
    residual = torch.randn(2, 70, 9, 19)
    prepared = cpu.prepare_dense(weight)
    assert_matches(cpu.conv2d(x, prepared, bias), reference(x, weight, bias))
    assert_matches(cpu.conv2d(x, prepared, bias, relu=True), reference(x, weight, bias, relu=True))
    out = cpu.conv2d(x, prepared, bias, relu=True, residual=residual, res_scale=0.1, isa=isa)
    assert_matches(out, reference(x, weight, bias, relu=True, residual=residual, res_scale=0.1))
    out = cpu.conv2d(x, prepared, residual=residual, res_scale=-2.0, isa=isa)
    assert_matches(out, reference(x, weight, residual=residual, res_scale=-2.0))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("scale,h,w", [(2, 1, 1), (2, 7, 33), (2, 16, 16), (3, 5, 9)])
def test_fused_pixel_shuffle(isa, block, scale, h, w):
    """shuffle=s stores F.pixel_shuffle(conv, s) directly, with every band and register-tile shape."""
    c_out = 4 * scale * scale
    weight = sparse_weight(c_out, 5, 3, density=0.3, block=block, seed=h * w)
    x, bias = torch.randn(2, 5, h, w), torch.randn(c_out)
    prepared = cpu.prepare_dense(weight)
    expected = F.pixel_shuffle(reference(x, weight, bias, relu=True), scale)
    for band_rows in (0, 1, 5):
        out = cpu.conv2d(x, prepared, bias, relu=True, shuffle=scale, isa=isa, band_rows=band_rows)
        assert out.shape == expected.shape
        assert_matches(out, expected)


@pytest.mark.parametrize("isa", ISAS)
def test_empty_and_dense_rows(isa):
    weight = sparse_weight(8, 16, 3, density=0.1)
    weight[0] = 0.0                       # an output channel with no nonzeros: bias only
    weight[3] = torch.randn(16, 3, 3)      # a fully dense output channel
    weight[7] = 0.0
    x, bias = torch.randn(1, 16, 12, 20), torch.randn(8)
    prepared = cpu.prepare_dense(weight)
    out = cpu.conv2d(x, prepared, bias, relu=True, isa=isa)
    assert_matches(out, reference(x, weight, bias, relu=True))
    assert torch.equal(out[0, 0], torch.full((12, 20), max(bias[0].item(), 0.0)))


@pytest.mark.parametrize("isa", ISAS)
def test_all_zero_and_fully_dense_weight(isa):
    x = torch.randn(1, 6, 10, 17)
    zero = torch.zeros(5, 6, 3, 3)
    dense = torch.randn(5, 6, 3, 3)
    assert_matches(cpu.conv2d(x, cpu.prepare_dense(zero), isa=isa), reference(x, zero))
    assert_matches(cpu.conv2d(x, cpu.prepare_dense(dense), isa=isa), reference(x, dense))


@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_csr_index_and_value_dtypes(index_dtype, value_dtype):
    weight = sparse_weight(9, 7, 3, density=0.3).to(value_dtype)
    row_ptr, col_idx, values = to_csr(weight, index_dtype)
    prepared = cpu.prepare_csr(row_ptr, col_idx, values, 7, 3, 3)
    assert prepared.layout == "csr" and prepared.nnz == int((weight != 0).sum())
    x = torch.randn(1, 7, 11, 13)
    assert_matches(cpu.conv2d(x, prepared), reference(x, weight.float()))


@pytest.mark.parametrize("b_h,b_w", [(4, 1), (8, 1), (2, 1), (1, 4), (4, 2)])
@pytest.mark.parametrize("c_out", [5, 64, 70])
def test_bsr_blocks_with_padding(b_h, b_w, c_out):
    weight = sparse_weight(c_out, 6, 3, density=0.25, block=b_h, seed=c_out)
    # garbage in the padding past C_out / K must be ignored
    row_ptr, col_idx, values = to_bsr(weight, b_h, b_w, padding_value=7.0, index_dtype=torch.int32)
    prepared = cpu.prepare_bsr(row_ptr, col_idx, values.half().float(), c_out, 6, 3, 3)
    assert prepared.group == (4 if b_h % 4 == 0 else 1)
    weight = weight.half().float()
    torch.testing.assert_close(prepared.to_dense(), weight)
    x = torch.randn(2, 6, 9, 34)
    for isa in ISAS:
        assert_matches(cpu.conv2d(x, prepared, isa=isa), reference(x, weight))


def test_prepare_dense_detects_blocks():
    assert cpu.prepare_dense(sparse_weight(64, 8, 3, 0.2, block=8)).layout == "bsr8x1"
    assert cpu.prepare_dense(sparse_weight(70, 8, 3, 0.2, block=4)).layout == "bsr4x1"
    unstructured = cpu.prepare_dense(sparse_weight(64, 8, 3, 0.2, block=1))
    assert unstructured.layout == "csr" and unstructured.group == 1
    weight = sparse_weight(70, 8, 3, 0.2, block=8)
    prepared = cpu.prepare_dense(weight)
    assert prepared.nnz == int((weight != 0).sum())
    assert prepared.density == pytest.approx(prepared.nnz / weight.numel())
    torch.testing.assert_close(prepared.to_dense(), weight)


def test_forced_isa_environment(monkeypatch):
    monkeypatch.setenv("SPARSESR_CPU_ISA", "scalar")
    assert cpu.isa() == "scalar"
    weight, x = sparse_weight(4, 3, 3, 0.5), torch.randn(1, 3, 5, 6)
    assert_matches(cpu.conv2d(x, cpu.prepare_dense(weight)), reference(x, weight))
    monkeypatch.setenv("SPARSESR_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="ISA"):
        cpu.isa()
    monkeypatch.delenv("SPARSESR_CPU_ISA")
    assert cpu.isa() == ISAS[-1]


def test_unsupported_isa_is_rejected():
    missing = [name for name in ("avx2", "avx512") if name not in ISAS]
    if not missing:
        pytest.skip("every ISA is supported here")
    with pytest.raises(ValueError, match="not supported"):
        cpu.conv2d(torch.randn(1, 3, 4, 4), cpu.prepare_dense(torch.randn(2, 3, 3, 3)), isa=missing[0])


@pytest.mark.parametrize("block", [1, 4])
def test_tile_sizes_do_not_change_the_result(block):
    # bands of 1..5 rows: unstructured register tiles cover 1, 2 or 3 rows
    weight = sparse_weight(12, 16, 3, 0.2, block=block)
    x = torch.randn(2, 16, 23, 45)
    expected = reference(x, weight)
    for rows, cols in [(1, 1), (1, 7), (2, 45), (3, 16), (4, 40), (5, 45), (100, 100)]:
        for isa in ISAS:
            out = cpu.conv2d(x, cpu.prepare_dense(weight), band_rows=rows, band_cols=cols, isa=isa)
            assert_matches(out, expected)


@pytest.mark.parametrize("block", [1, 4])
def test_input_channel_chunks(monkeypatch, block):
    """Partial sums wait in the stage between input-channel chunks (forced small chunks here)."""
    weight = sparse_weight(70, 13, 3, density=0.3, block=block)
    x, bias, residual = torch.randn(1, 13, 10, 37), torch.randn(70), torch.randn(1, 70, 10, 37)
    expected = reference(x, weight, bias, relu=True, residual=residual, res_scale=0.5)
    prepared = cpu.prepare_dense(weight)
    for chunk in ("1", "5"):
        monkeypatch.setenv("SPARSESR_CPU_CHUNK", chunk)
        for isa in ISAS:
            for band_rows in (1, 5):  # 5: register tiles of 3 and 2 rows
                out = cpu.conv2d(x, prepared, bias, relu=True, residual=residual, res_scale=0.5, isa=isa,
                                 band_rows=band_rows)
                assert_matches(out, expected)


@pytest.mark.parametrize("pool", ["default", "pthreads"])
def test_non_contiguous_input_and_threads(monkeypatch, pool):
    # default: the OpenMP team torch loaded (GOMP_parallel); pthreads: threads started per call
    if pool == "pthreads":
        monkeypatch.setenv("SPARSESR_CPU_POOL", "pthreads")
    weight = sparse_weight(8, 6, 3, 0.3)
    x = torch.randn(1, 12, 14, 9)[:, ::2]  # channel stride 2
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert_matches(cpu.conv2d(x, cpu.prepare_dense(weight)), reference(x, weight))
            big = torch.randn(1, 6, 40, 300)  # many tiles: every thread gets some
            assert_matches(cpu.conv2d(big, cpu.prepare_dense(weight), band_rows=2), reference(big, weight))
    finally:
        torch.set_num_threads(previous)


def test_concurrent_calls_from_python_threads():
    """The GIL is released during compute: calls from several threads must not interfere."""
    from concurrent.futures import ThreadPoolExecutor

    weights = [sparse_weight(16, 8, 3, 0.3, block=1 + 3 * (i % 2), seed=i) for i in range(4)]
    inputs = [torch.randn(1, 8, 21, 30) for _ in range(4)]
    prepared = [cpu.prepare_dense(w) for w in weights]
    with ThreadPoolExecutor(max_workers=4) as pool:
        outs = list(pool.map(lambda i: cpu.conv2d(inputs[i], prepared[i]), range(4)))
    for x, w, out in zip(inputs, weights, outs):
        assert_matches(out, reference(x, w))


# ---- bad inputs -------------------------------------------------------------------------------


def test_bad_inputs_raise_value_error():
    weight = sparse_weight(4, 3, 3, 0.5)
    prepared = cpu.prepare_dense(weight)
    x = torch.randn(1, 3, 5, 5)
    bad_calls = [
        lambda: cpu.conv2d(torch.randn(1, 4, 5, 5), prepared),          # channel count
        lambda: cpu.conv2d(x.double(), prepared),                        # dtype
        lambda: cpu.conv2d(x[0], prepared),                              # 3-D
        lambda: cpu.conv2d(x, weight),                                   # not prepared
        lambda: cpu.conv2d(x, prepared, bias=torch.randn(5)),            # bias shape
        lambda: cpu.conv2d(x, prepared, residual=torch.randn(1, 4, 5, 4)),  # residual shape
        lambda: cpu.conv2d(x, prepared, isa="sse9"),
        lambda: cpu.conv2d(x, prepared, shuffle=3),                      # 4 channels: not 3 x 3
        lambda: cpu.conv2d(x, prepared, shuffle=0),
        lambda: cpu.conv2d(x, prepared, shuffle=2, residual=torch.randn(1, 4, 5, 5)),
        lambda: cpu.conv2d(torch.randn(0, 3, 5, 5), prepared),           # empty
        lambda: cpu.prepare_dense(torch.randn(4, 3, 2, 2)),              # even kernel
        lambda: cpu.prepare_dense(torch.randn(4, 3, 3)),                 # 3-D weight
        lambda: cpu.prepare_dense(torch.randn(4, 3, 3, 3).double()),
        lambda: cpu.prepare_csr(torch.tensor([0, 1]), torch.tensor([27]), torch.ones(1), 3, 3, 3),  # col >= K
        lambda: cpu.prepare_csr(torch.tensor([0, 2]), torch.tensor([1]), torch.ones(1), 3, 3, 3),   # row_ptr end
        lambda: cpu.prepare_csr(torch.tensor([1, 1]), torch.tensor([1]), torch.ones(1), 3, 3, 3),   # row_ptr start
        lambda: cpu.prepare_csr(torch.tensor([0, 1]), torch.tensor([1.0]), torch.ones(1), 3, 3, 3),  # float index
        lambda: cpu.prepare_csr(torch.tensor([0, 1]), torch.tensor([1]), torch.ones(2), 3, 3, 3),   # lengths
        lambda: cpu.prepare_bsr(torch.tensor([0, 1]), torch.tensor([0]), torch.ones(1, 4), 4, 3, 3, 3),  # 2-D blocks
        lambda: cpu.prepare_bsr(torch.tensor([0, 1]), torch.tensor([7]), torch.ones(1, 4, 4), 4, 3, 3, 3),  # block col
        lambda: cpu.prepare_bsr(torch.tensor([0, 1, 1]), torch.tensor([0]), torch.ones(1, 4, 1), 4, 3, 3, 3),  # rows
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()
    # a hand-built PreparedConv is checked too: the C kernel trusts its arrays
    with pytest.raises(ValueError, match="nz_k"):
        dataclasses.replace(prepared, nz_k=prepared.nz_k + 1000)
    with pytest.raises(ValueError, match="group_ptr"):
        dataclasses.replace(prepared, group_ptr=prepared.group_ptr.long())


# ---- sparse or dense --------------------------------------------------------------------------


def fake_timings(dense: float, sparse: float, calls: list):
    """A stand-in for cpu._best_time: should_use_sparse times dense first, then sparse."""
    def best_time(fn, repeats=3):
        calls.append(fn)
        return dense if len(calls) % 2 == 1 else sparse
    return best_time


def test_should_use_sparse_follows_the_measurement_and_caches(monkeypatch):
    monkeypatch.setenv("SPARSESR_CPU_DISPATCH_CACHE", "0")
    monkeypatch.setattr(cpu, "_DECISIONS", {})
    calls = []
    monkeypatch.setattr(cpu, "_best_time", fake_timings(dense=2.0, sparse=1.0, calls=calls))
    prepared = cpu.prepare_dense(sparse_weight(8, 8, 3, 0.1))
    assert cpu.should_use_sparse(prepared, 128, 128) is True
    assert cpu.should_use_sparse(prepared, 256, 256) is True  # same key: no new measurement
    assert len(calls) == 2
    monkeypatch.setattr(cpu, "_best_time", fake_timings(dense=1.0, sparse=2.0, calls=calls))
    half = cpu.prepare_dense(sparse_weight(8, 8, 3, 0.5))
    assert cpu.should_use_sparse(half, 64, 64) is False
    assert len(calls) == 4


def test_should_use_sparse_file_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSESR_CPU_DISPATCH_CACHE", "1")
    monkeypatch.setattr(cpu, "_CACHE_FILE", str(tmp_path / "cpu_dispatch.json"))
    monkeypatch.setattr(cpu, "_DECISIONS", {})
    calls = []
    monkeypatch.setattr(cpu, "_best_time", fake_timings(dense=1.0, sparse=2.0, calls=calls))
    prepared = cpu.prepare_dense(sparse_weight(8, 8, 3, 0.5))
    assert cpu.should_use_sparse(prepared, 32, 32) is False
    monkeypatch.setattr(cpu, "_DECISIONS", {})  # a new process: only the file remembers
    assert cpu.should_use_sparse(prepared, 32, 32) is False
    assert len(calls) == 2 and (tmp_path / "cpu_dispatch.json").exists()


def test_should_use_sparse_really_measures(monkeypatch):
    monkeypatch.setenv("SPARSESR_CPU_DISPATCH_CACHE", "0")
    monkeypatch.setattr(cpu, "_DECISIONS", {})
    prepared = cpu.prepare_dense(sparse_weight(16, 16, 3, 0.05))
    assert isinstance(cpu.should_use_sparse(prepared, 20, 20), bool)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_does_not_hang(tmp_path):
    # libgomp's thread team does not survive fork(); the kernel must not use it in a child.
    script = tmp_path / "fork.py"
    script.write_text(
        "import os, signal, torch\n"
        "from sparsesr.kernels import cpu\n"
        "torch.set_num_threads(2)\n"
        "w = torch.randn(8, 8, 3, 3); w[w.abs() < 1] = 0\n"
        "p = cpu.prepare_dense(w); x = torch.randn(1, 8, 64, 64)\n"
        "cpu.conv2d(x, p)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    signal.alarm(30)\n"
        "    y = cpu.conv2d(x, p)\n"
        "    torch.set_num_threads(1)  # torch's own team does not survive fork either\n"
        "    ok = torch.allclose(y, torch.nn.functional.conv2d(x, w, padding=1), atol=1e-3)\n"
        "    os._exit(0 if ok else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "raise SystemExit(os.waitstatus_to_exitcode(status))\n"
    )
    done = subprocess.run([sys.executable, str(script)], timeout=120)
    assert done.returncode == 0
