"""The compiled CPU sparse convolution (sparsesr.kernels.cpu) against torch.nn.functional.conv2d."""
from __future__ import annotations

import collections
import copy
import dataclasses
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import types

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
def test_leaky_relu_and_prelu_epilogues(isa, block):
    """negative_slope: LeakyReLU (a float) or PReLU (one slope per channel, or one shared)."""
    weight = sparse_weight(70, 16, 3, density=0.3, block=block, seed=block)
    x, bias = torch.randn(2, 16, 9, 19), torch.randn(70)
    residual = torch.randn(2, 70, 9, 19)
    prepared = cpu.prepare_dense(weight)
    plain = reference(x, weight, bias)
    assert_matches(cpu.conv2d(x, prepared, bias, negative_slope=0.2, isa=isa), F.leaky_relu(plain, 0.2))
    slopes = torch.rand(70) - 0.5  # negative slopes too: PReLU learns any sign
    assert_matches(cpu.conv2d(x, prepared, bias, negative_slope=slopes, isa=isa), F.prelu(plain, slopes))
    assert_matches(cpu.conv2d(x, prepared, bias, negative_slope=torch.tensor([0.25]), isa=isa),
                   F.prelu(plain, torch.tensor([0.25])))
    out = cpu.conv2d(x, prepared, bias, negative_slope=slopes, residual=residual, res_scale=0.2, isa=isa)
    assert_matches(out, residual + 0.2 * F.prelu(plain, slopes))
    shuffled = cpu.conv2d(x[:, :, :5], cpu.prepare_dense(weight[:64]), bias[:64], negative_slope=0.1, shuffle=2,
                          isa=isa)
    assert_matches(shuffled, F.pixel_shuffle(F.leaky_relu(reference(x[:, :, :5], weight[:64], bias[:64]), 0.1), 2))


def test_negative_slope_is_checked():
    prepared, x = cpu.prepare_dense(sparse_weight(8, 4, 3, 0.5)), torch.randn(1, 4, 5, 5)
    for bad, message in ((torch.ones(3), "1 or 8 slopes"), (torch.ones(8, 1), "1 or 8 slopes"),
                         (torch.ones(8, dtype=torch.int32), "1 or 8 slopes"), ("0.2", "a float or a tensor"),
                         (float("nan"), "finite"), (True, "a float or a tensor")):
        with pytest.raises(ValueError, match=message):
            cpu.conv2d(x, prepared, negative_slope=bad)
    with pytest.raises(ValueError, match="exclusive"):
        cpu.conv2d(x, prepared, relu=True, negative_slope=0.2)


def test_out_is_written_and_checked():
    weight = sparse_weight(8, 4, 3, 0.5)
    prepared, x, bias = cpu.prepare_dense(weight), torch.randn(1, 4, 5, 6), torch.randn(8)
    out = torch.full((1, 8, 5, 6), float("nan"))
    y = cpu.conv2d(x, prepared, bias=bias, relu=True, out=out)
    assert y is out
    assert_matches(out, F.relu(reference(x, weight, bias)))
    shuffled = torch.empty(1, 2, 10, 12)
    assert cpu.conv2d(x, prepared, shuffle=2, out=shuffled) is shuffled
    assert_matches(shuffled, F.pixel_shuffle(reference(x, weight, None), 2))
    for bad, fragment in ((torch.empty(1, 8, 5, 5), "shape (1, 8, 5, 6)"), (torch.empty(1, 8, 5, 6, dtype=torch.float64), "float64"),
                          (torch.empty(1, 8, 6, 5).transpose(2, 3), "not contiguous"), ("buffer", "got str")):
        with pytest.raises(ValueError, match=re.escape(fragment)):
            cpu.conv2d(x, prepared, out=bad)
    same = torch.randn(1, 4, 5, 6)  # in place over the input: refused by the C checks, input untouched
    kept = same.clone()
    with pytest.raises(ValueError, match="overlaps"):
        cpu.conv2d(same, cpu.prepare_dense(sparse_weight(4, 4, 3, 0.5)), out=same)
    assert torch.equal(same, kept)


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
    # a hand-built PreparedConv is checked when it is built (and by the C kernel at every call)
    with pytest.raises(ValueError, match="nz_k"):
        dataclasses.replace(prepared, nz_k=prepared.nz_k + 1000)
    with pytest.raises(ValueError, match="group_ptr"):
        dataclasses.replace(prepared, group_ptr=prepared.group_ptr.long())


def test_hand_built_prepared_conv_is_rejected_by_the_kernel_too():
    """Tensors can be changed after PreparedConv checked them; conv2d must still refuse them."""
    prepared = cpu.prepare_dense(sparse_weight(4, 3, 3, 0.5))
    x = torch.randn(1, 3, 5, 5)
    prepared.nz_k[-1] = 10**6  # in place: PreparedConv.__post_init__ never sees it
    with pytest.raises(ValueError, match=r"nz_k\[\d+\] = 1000000"):
        cpu.conv2d(x, prepared)
    prepared.nz_k[-1] = 0
    prepared.group_ptr[1] = prepared.group_ptr[-1] + 1
    with pytest.raises(ValueError, match="group_ptr decreases"):
        cpu.conv2d(x, prepared)


# ---- the extension checks its arguments ----------------------------------------------------

RAW_ORDER = ("x", "out", "residual", "bias", "slope", "group_ptr", "nz_k", "nz_val", "sizes", "group", "shuffle",
             "relu", "res_scale", "threads", "isa", "band_rows", "band_cols", "stream")


def raw_call(x_: torch.Tensor, out_: torch.Tensor, prepared: cpu.PreparedConv, **changes) -> None:
    """_sparseconv.conv2d on a valid set of arguments for x_, with `changes` applied."""
    n, c_in, h, w = x_.shape
    args = {"x": cpu._array(x_), "out": cpu._array(out_), "residual": (0, 0), "bias": (0, 0), "slope": (0, 0),
            "group_ptr": cpu._array(prepared.group_ptr), "nz_k": cpu._array(prepared.nz_k),
            "nz_val": cpu._array(prepared.nz_val),
            "sizes": (n, c_in, h, w, prepared.out_channels, prepared.kh, prepared.kw), "group": prepared.group,
            "shuffle": 1, "relu": False, "res_scale": 1.0, "threads": 1, "isa": cpu._ISA_CODES[cpu.isa()],
            "band_rows": 0, "band_cols": 0, "stream": -1}
    args.update(changes)
    cpu._sparseconv.conv2d(*(args[name] for name in RAW_ORDER))


def _raw_setup() -> types.SimpleNamespace:
    s = types.SimpleNamespace(x=torch.randn(1, 8, 5, 6), res=torch.randn(1, 8, 5, 6), bias=torch.randn(8), keep=[])
    s.p = cpu.prepare_dense(sparse_weight(8, 8, 3, 0.3, seed=5))  # c_in == c_out: out can alias x
    s.out = torch.full((1, 8, 5, 6), float("nan"))
    s.n_k = s.p.nz_k.numel()
    return s


def changed(s: types.SimpleNamespace, t: torch.Tensor, i: int, value: int) -> tuple[int, int]:
    """(address, length) of a copy of t with t[i] = value (kept alive in s)."""
    s.keep.append(t.clone())
    s.keep[-1][i] = value
    return cpu._array(s.keep[-1])


def ptr(t: torch.Tensor, offset: int = 0) -> int:
    return t.data_ptr() + offset


# (id, changes to a valid call, message expected); a claimed length is never more than the real one
RAW_CASES = [
    ("x length", lambda s: {"x": (ptr(s.x), 239)}, "x has 239 floats, expected n.c_in.h.w = 240"),
    ("out length", lambda s: {"out": (ptr(s.out), 239)}, "out has 239 floats, expected n.c_out.h.w = 240"),
    ("sizes vs lengths", lambda s: {"sizes": (1, 8, 4, 6, 8, 3, 3)}, "x has 240 floats, expected n.c_in.h.w = 192"),
    ("c_out vs out", lambda s: {"sizes": (1, 8, 5, 6, 7, 3, 3)}, "out has 240 floats, expected n.c_out.h.w = 210"),
    ("c_out = INT32_MAX", lambda s: {"sizes": (1, 8, 5, 6, 2**31 - 1, 3, 3), "group": 4},
     "out has 240 floats, expected n.c_out.h.w = 64424509410"),
    ("residual length", lambda s: {"residual": (ptr(s.res), 234)}, "residual has 234 floats"),
    ("bias length", lambda s: {"bias": (ptr(s.bias), 7)}, "bias has 7 floats, expected c_out = 8"),
    ("slope length", lambda s: {"slope": (ptr(s.bias), 7)}, r"slope has 7 floats, expected 1 \(LeakyReLU\) or c_out = 8"),
    ("slope with relu", lambda s: {"slope": (ptr(s.bias), 1), "relu": True}, "relu and a negative slope are exclusive"),
    ("out overlaps slope", lambda s: {"slope": (ptr(s.out, 4 * 100), 8)}, "out overlaps"),
    ("group_ptr length", lambda s: {"group_ptr": (ptr(s.p.group_ptr), 8)}, "group_ptr has 8 entries, expected .* 9"),
    ("nz_val length", lambda s: {"nz_val": (ptr(s.p.nz_val), s.n_k - 1)}, "nz_val has .* values, expected 1 per entry"),
    ("nz_k length", lambda s: {"nz_k": (ptr(s.p.nz_k), s.n_k - 1)}, "nz_val has .* values, expected 1 per entry"),
    ("NULL array", lambda s: {"x": (0, 240)}, "NULL or not aligned"),
    ("NULL weights", lambda s: {"nz_k": (0, s.n_k)}, "NULL or not aligned"),
    ("misaligned array", lambda s: {"nz_k": (ptr(s.p.nz_k, 1), s.n_k - 1), "nz_val": (ptr(s.p.nz_val), s.n_k - 1)},
     "NULL or not aligned"),
    ("out overlaps x", lambda s: {"out": (ptr(s.x), 240)}, "out overlaps x"),
    ("out overlaps residual", lambda s: {"out": (ptr(s.res), 240), "residual": (ptr(s.res), 240)}, "out overlaps"),
    ("out overlaps bias", lambda s: {"bias": (ptr(s.out, 4 * 100), 8)}, "out overlaps"),
    ("negative length", lambda s: {"bias": (ptr(s.bias), -1)}, "bias has a negative length -1"),
    ("negative address", lambda s: {"x": (-4, 240)}, r"x has an address outside \[0, 2\*\*64\)"),
    ("group_ptr[0]", lambda s: {"group_ptr": changed(s, s.p.group_ptr, 0, 1)}, r"group_ptr\[0\] = 1, expected 0"),
    ("group_ptr decreasing", lambda s: {"group_ptr": changed(s, s.p.group_ptr, 3, -5)}, "group_ptr decreases"),
    ("group_ptr past the end", lambda s: {"group_ptr": changed(s, s.p.group_ptr, 7, 2**31 - 1)}, "group_ptr decreases"),
    ("group_ptr end", lambda s: {"group_ptr": changed(s, s.p.group_ptr, 8, s.n_k - 1)},
     r"group_ptr\[8\] = \d+, expected the \d+ entries of nz_k"),
    ("nz_k negative", lambda s: {"nz_k": changed(s, s.p.nz_k, 0, -1)}, r"nz_k\[0\] = -1, expected a position in \[0, .* = 72\)"),
    ("nz_k past K", lambda s: {"nz_k": changed(s, s.p.nz_k, s.n_k - 1, 72)}, r"nz_k\[\d+\] = 72, expected"),
    ("nz_k INT32_MIN", lambda s: {"nz_k": changed(s, s.p.nz_k, 1, -2**31)}, r"nz_k\[1\] = -2147483648"),
    ("empty image", lambda s: {"sizes": (1, 8, 0, 6, 8, 3, 3)}, "sizes must be >= 1"),
    ("no output channel", lambda s: {"sizes": (1, 8, 5, 6, 0, 3, 3)}, "sizes must be >= 1"),
    ("even kernel", lambda s: {"sizes": (1, 8, 5, 6, 8, 2, 3)}, "kernel size must be odd and >= 1, got 2x3"),
    ("group 2", lambda s: {"group": 2}, "group must be 1 or 4 output channels, got 2"),
    ("group 0", lambda s: {"group": 0}, "group must be 1 or 4 output channels, got 0"),
    ("group 4 of 8 channels", lambda s: {"group": 4}, "group_ptr has 9 entries, expected .* 3"),
    ("shuffle 3 of 8 channels", lambda s: {"shuffle": 3}, "shuffle must be >= 1 with shuffle.2 dividing c_out=8"),
    ("shuffle 0", lambda s: {"shuffle": 0}, "shuffle must be"),
    ("shuffle with residual", lambda s: {"shuffle": 2, "residual": (ptr(s.res), 240)}, "cannot be combined"),
    ("ISA out of range", lambda s: {"isa": 3}, "ISA 3 is not supported"),
    ("ISA negative", lambda s: {"isa": -1}, "ISA -1 is not supported"),
    *[(f"ISA {name} not on this CPU", lambda s, code=code: {"isa": code}, f"ISA {code} is not supported")
      for name, code in cpu._ISA_CODES.items() if name not in ISAS],
    ("positions beyond int32", lambda s: {"sizes": (1, 8, 5, 6, 8, 16385, 16385)}, "exceed int32"),
]


@pytest.mark.parametrize("changes,message", [c[1:] for c in RAW_CASES], ids=[c[0] for c in RAW_CASES])
def test_extension_rejects_inconsistent_arguments(changes, message):
    s = _raw_setup()
    raw_call(s.x, s.out, s.p)  # the unchanged call is valid
    s.out.fill_(float("nan"))
    with pytest.raises(ValueError, match=message) as info:
        raw_call(s.x, s.out, s.p, **changes(s))
    assert "\n" not in str(info.value)
    assert torch.isnan(s.out).all()  # rejected before anything was written


def test_extension_rejects_a_window_too_large_for_int32_offsets():
    # 46339^2 positions fit int32, but a 1 x 5 image padded by that kernel does not
    x, out = torch.randn(1, 1, 1, 5), torch.empty(1, 1, 1, 5)
    with pytest.raises(ValueError, match="input window of a tile"):
        raw_call(x, out, cpu.prepare_dense(torch.zeros(1, 1, 1, 1)), sizes=(1, 1, 1, 5, 1, 46339, 46339))


def test_extension_argument_types():
    s = _raw_setup()
    for changes in ({"x": ptr(s.x)}, {"nz_k": (1.5, 3)}, {"bias": (0, 0, 0)}, {"out": None}):
        with pytest.raises(TypeError, match="must be an .address, length. tuple"):
            raw_call(s.x, s.out, s.p, **changes)
    assert cpu._sparseconv.ABI_VERSION == cpu._ABI_VERSION


def test_stale_build_is_not_used(tmp_path):
    """A .so built from older sources speaks another argument convention: never call it (dense fallback)."""
    package = tmp_path / "stalecpu"
    package.mkdir()
    (package / "__init__.py").write_text(open(cpu.__file__).read())
    (package / "_sparseconv.py").write_text("def isa_supported(code):\n    return True\n")  # no ABI_VERSION
    spec = importlib.util.spec_from_file_location("stalecpu", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    stale = importlib.util.module_from_spec(spec)
    sys.modules["stalecpu"] = stale  # for its relative import of _sparseconv
    try:
        spec.loader.exec_module(stale)
    finally:
        sys.modules.pop("stalecpu", None), sys.modules.pop("stalecpu._sparseconv", None)
    assert not stale.available() and "stale build" in stale.unavailable_reason()
    assert stale.supported_isas() == []


def test_isa_detection_matches_the_cpu_flags(monkeypatch):
    """The extension detects the ISAs once at import; they must be what the CPU reports."""
    monkeypatch.delenv("SPARSESR_CPU_ISA", raising=False)
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags here")
    if not {"sse2"} <= flags:
        pytest.skip("not an x86 CPU")
    on_cpu = {"scalar", *(["avx2"] if {"avx2", "fma"} <= flags else []), *(["avx512"] if "avx512f" in flags else [])}
    built = {name for name, code in cpu._ISA_CODES.items() if cpu._sparseconv.ISAS_COMPILED >> code & 1}
    expected = [name for name in cpu._ISA_CODES if name in on_cpu & built]
    assert cpu.supported_isas() == expected
    assert cpu.isa() == expected[-1]
    for name, code in cpu._ISA_CODES.items():
        assert cpu._sparseconv.isa_supported(code) is (name in expected)
    assert cpu._sparseconv.isa_supported(-1) is False and cpu._sparseconv.isa_supported(3) is False


# ---- fuzz: corrupted prepared weights --------------------------------------------------------

FUZZ_CASES = 1200  # ~4 s on an idle core; every case runs the public conv2d and the extension directly


def _fuzz_bases() -> list[cpu.PreparedConv]:
    return [
        cpu.prepare_dense(sparse_weight(7, 5, 3, 0.3, seed=1)),            # csr 3x3
        cpu.prepare_dense(sparse_weight(10, 6, 3, 0.3, block=4, seed=2)),  # 4x1, last group padded
        cpu.prepare_dense(sparse_weight(16, 4, 3, 0.3, block=8, seed=3)),  # 8x1
        cpu.prepare_dense(sparse_weight(6, 4, 1, 0.5, seed=4)),            # 1x1
        cpu.prepare_dense(torch.zeros(5, 3, 3, 3)),                       # no nonzeros at all
    ]


_ODD_VALUES = [0, -1, 1, 2, 3, 4, 5, 2**31 - 1, 2**31, 2**63, -2**31, 3.0, "3", None, True]


def _mutate(rng: random.Random, base: cpu.PreparedConv) -> tuple[cpu.PreparedConv, str]:
    """A copy of base with 1-3 corruptions that bypass PreparedConv's own checks."""
    bad, kinds = copy.copy(base), []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["k value", "k random", "ptr value", "ptr swap", "ptr shift", "truncate", "extend",
                           "empty", "permute k", "reorder group", "field", "dtype", "layout"])
        kinds.append(kind)
        name = rng.choice(["group_ptr", "nz_k", "nz_val"])
        t = getattr(bad, name)
        k_total = base.in_channels * base.kh * base.kw
        gp, ks = bad.group_ptr, bad.nz_k
        is_index = isinstance(ks, torch.Tensor) and ks.dtype == torch.int32 and ks.dim() == 1
        value = t
        if kind == "k value" and is_index and ks.numel():
            value, name = ks.clone(), "nz_k"
            value[rng.randrange(ks.numel())] = rng.choice(
                [-1, -2**31, k_total, k_total + rng.randint(1, 99), 2**31 - 1, rng.randrange(k_total)])
        elif kind == "k random" and is_index:
            value, name = torch.randint(-2**31, 2**31 - 1, ks.shape, dtype=torch.int32), "nz_k"
        elif kind in ("ptr value", "ptr swap", "ptr shift") and isinstance(gp, torch.Tensor) \
                and gp.dtype == torch.int32 and gp.dim() == 1 and gp.numel():
            value, name = gp.clone(), "group_ptr"
            i, j = rng.randrange(gp.numel()), rng.randrange(gp.numel())
            if kind == "ptr value":
                value[i] = rng.choice([-1, -2**31, int(gp[-1]) + 1, 2**31 - 1, rng.randint(0, max(int(gp[-1]), 0))])
            elif kind == "ptr swap":
                value[i], value[j] = gp[j].item(), gp[i].item()
            else:
                value[min(i, j):max(i, j) + 1] += rng.choice([-1, 1])
        elif kind == "truncate" and isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel():
            value = t[: -rng.randint(1, min(3, t.numel()))].clone()
        elif kind == "extend" and isinstance(t, torch.Tensor) and t.dim() == 1:
            extra = torch.randint(-5, k_total + 5, (rng.randint(1, 4),)).to(t.dtype)
            value = torch.cat([t, extra])
        elif kind == "empty" and isinstance(t, torch.Tensor):
            value = t[:0].clone()
        elif kind == "permute k" and is_index:  # other weights, still valid
            value, name = ks[torch.randperm(ks.numel())], "nz_k"
        elif kind == "reorder group" and is_index and isinstance(gp, torch.Tensor) and gp.dim() == 1 \
                and gp.numel() > 1:
            # unsorted positions inside one group, values moved along: the same weights
            g = rng.randrange(gp.numel() - 1)
            lo, hi = int(gp[g]), int(gp[g + 1])
            if 0 <= lo < hi <= ks.numel() and isinstance(bad.nz_val, torch.Tensor) \
                    and bad.nz_val.numel() == ks.numel() * bad.group:
                perm = torch.arange(ks.numel())
                perm[lo:hi] = lo + torch.randperm(hi - lo)
                object.__setattr__(bad, "nz_val", bad.nz_val.view(-1, bad.group)[perm].reshape(-1))
                value, name = ks[perm], "nz_k"
        elif kind == "field":
            name = rng.choice(["out_channels", "in_channels", "kh", "kw", "group"])
            current = getattr(bad, name)
            value = rng.choice(_ODD_VALUES + ([current - 1, current + 1, current * 2] if isinstance(current, int) else []))
        elif kind == "dtype" and isinstance(t, torch.Tensor):
            value = t.to(rng.choice([torch.int64, torch.int16, torch.uint8, torch.float32, torch.float64, torch.bool]))
        elif kind == "layout" and isinstance(t, torch.Tensor):
            value = rng.choice([lambda: t.repeat_interleave(2)[::2], lambda: t.view(1, -1), lambda: t.tolist(),
                                lambda: None, lambda: t.numpy()])()
        object.__setattr__(bad, name, value)
    return bad, "+".join(kinds)


def _fuzz_reference(bad: cpu.PreparedConv, x, bias, relu, residual, res_scale, shuffle) -> torch.Tensor:
    weight = bad.to_dense()  # only called when the kernel accepted bad: then it is consistent
    out = reference(x, weight, bias, relu, residual, res_scale)
    return F.pixel_shuffle(out, shuffle) if shuffle > 1 else out


def _as_words(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t's memory as far as it fills whole 4-byte words, read as dtype (what the raw call sees)."""
    if not t.numel():
        return torch.empty(0, dtype=dtype)
    # a fresh stride-1 copy: a 1-element tensor of stride 2 counts as contiguous, but cannot be viewed
    flat = torch.empty(t.numel(), dtype=t.dtype).copy_(t.reshape(-1))
    raw = flat.view(torch.uint8)
    return raw[: raw.numel() // 4 * 4].view(dtype)


def test_fuzz_corrupted_prepared_weights():
    """Corrupted PreparedConv objects: conv2d raises a one-line ValueError / TypeError or returns
    exactly the dense conv of what it was given, and never crashes. The same corruption is also
    passed to the extension directly (arrays reinterpreted as the int32 / float32 words they
    hold, so every claimed length is true), where only the C checks stand in the way."""
    rng = random.Random(1234)
    torch.manual_seed(1234)
    bases = _fuzz_bases()
    stats = {"public accepted": 0, "public rejected": 0, "raw accepted": 0, "raw rejected": 0}
    reasons = collections.Counter()  # the first word of each raw rejection: which checks were hit
    for case in range(FUZZ_CASES):
        base = rng.choice(bases)
        bad, kinds = _mutate(rng, base)
        c_in = bad.in_channels if isinstance(bad.in_channels, int) and 1 <= bad.in_channels <= 12 \
            and not isinstance(bad.in_channels, bool) else base.in_channels
        n, h, w = rng.randint(1, 2), rng.randint(1, 9), rng.randint(1, 9)
        x = torch.randn(n, c_in, h, w)
        c_out = bad.out_channels if isinstance(bad.out_channels, int) and 1 <= bad.out_channels <= 64 \
            and not isinstance(bad.out_channels, bool) else base.out_channels
        bias = torch.randn(c_out) if rng.random() < 0.3 else None
        residual = torch.randn(n, c_out, h, w) if rng.random() < 0.2 else None
        shuffle = 2 if residual is None and c_out % 4 == 0 and rng.random() < 0.2 else 1
        relu, isa, band_rows = rng.random() < 0.5, rng.choice(ISAS), rng.randint(0, 4)
        context = f"case {case}: {kinds}"

        try:
            out = cpu.conv2d(x, bad, bias, relu=relu, residual=residual, res_scale=0.5, isa=isa,
                             band_rows=band_rows, shuffle=shuffle)
        except (ValueError, TypeError) as exc:
            assert "\n" not in str(exc), context
            stats["public rejected"] += 1
        else:
            assert_matches(out, _fuzz_reference(bad, x, bias, relu, residual, 0.5, shuffle))
            stats["public accepted"] += 1

        arrays = [bad.group_ptr, bad.nz_k, bad.nz_val]
        if not all(isinstance(t, torch.Tensor) for t in arrays):
            continue
        words = copy.copy(bad)
        for name, t, dtype in zip(("group_ptr", "nz_k", "nz_val"), arrays, (torch.int32, torch.int32, torch.float32)):
            object.__setattr__(words, name, _as_words(t, dtype))
        object.__setattr__(words, "in_channels", c_in)
        out = torch.full((n * c_out * h * w,), float("nan"))
        try:
            cpu._sparseconv.conv2d(
                cpu._array(x), cpu._array(out), cpu._array(residual), cpu._array(bias), (0, 0),
                cpu._array(words.group_ptr), cpu._array(words.nz_k), cpu._array(words.nz_val),
                (n, c_in, h, w, words.out_channels, words.kh, words.kw), words.group, shuffle, relu, 0.5, 1,
                cpu._ISA_CODES[isa], band_rows, 0, -1)
        except (ValueError, TypeError, OverflowError) as exc:
            assert "\n" not in str(exc), context
            assert torch.isnan(out).all(), context  # rejected before anything was written
            stats["raw rejected"] += 1
            reasons[re.sub(r"^_sparseconv.conv2d: |[\[ =(,].*$", "", str(exc))] += 1
        else:
            expected = _fuzz_reference(words, x, bias, relu, residual, 0.5, shuffle)
            assert_matches(out.view(expected.shape), expected)
            stats["raw accepted"] += 1
    print(f"fuzz: {FUZZ_CASES} cases, {stats}, raw rejections by check: {dict(reasons.most_common())}")
    # both outcomes must occur, or the corruptions (or the checks) are not doing their job
    assert min(stats.values()) >= FUZZ_CASES // 50, stats



# ---- sparse or dense --------------------------------------------------------------------------


def fake_timings(dense: float, sparse: float, calls: list):
    """A stand-in for cpu._best_times: records both calls, returns the given times."""
    def best_times(dense_fn, sparse_fn, rounds=5):
        calls.extend((dense_fn, sparse_fn))
        return dense, sparse
    return best_times


def test_should_use_sparse_follows_the_measurement_and_caches(monkeypatch):
    monkeypatch.setenv("SPARSESR_CPU_DISPATCH_CACHE", "0")
    monkeypatch.setattr(cpu, "_DECISIONS", {})
    calls = []
    monkeypatch.setattr(cpu, "_best_times", fake_timings(dense=2.0, sparse=1.0, calls=calls))
    prepared = cpu.prepare_dense(sparse_weight(8, 8, 3, 0.1))
    assert cpu.should_use_sparse(prepared, 128, 128) is True
    assert cpu.should_use_sparse(prepared, 256, 256) is True  # same key: no new measurement
    assert len(calls) == 2
    monkeypatch.setattr(cpu, "_best_times", fake_timings(dense=1.0, sparse=2.0, calls=calls))
    half = cpu.prepare_dense(sparse_weight(8, 8, 3, 0.5))
    assert cpu.should_use_sparse(half, 64, 64) is False
    assert len(calls) == 4


def test_should_use_sparse_file_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSESR_CPU_DISPATCH_CACHE", "1")
    monkeypatch.setenv("SPARSESR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu, "_DECISIONS", {})
    calls = []
    monkeypatch.setattr(cpu, "_best_times", fake_timings(dense=1.0, sparse=2.0, calls=calls))
    prepared = cpu.prepare_dense(sparse_weight(8, 8, 3, 0.5))
    assert cpu.should_use_sparse(prepared, 32, 32) is False
    monkeypatch.setattr(cpu, "_DECISIONS", {})  # a new process: only the file remembers
    assert cpu.should_use_sparse(prepared, 32, 32) is False
    assert len(calls) == 2 and (tmp_path / "cpu_dispatch.json").exists()


def test_should_use_sparse_decides_from_the_times_it_measured(monkeypatch, tmp_path):
    """The real _best_times times the real dense conv and the real kernel on a clock that each of
    them advances by a known cost: the decision, and the decision cached, must follow the costs."""
    monkeypatch.setenv("SPARSESR_CPU_DISPATCH_CACHE", "1")
    monkeypatch.setenv("SPARSESR_CACHE_DIR", str(tmp_path))
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(cpu, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    outputs = {"dense": [], "sparse": []}

    def costing(name, fn, cost):
        def run(*args, **kwargs):
            clock.now += cost[name]
            outputs[name].append(fn(*args, **kwargs))
            return outputs[name][-1]
        return run

    cost = {}
    monkeypatch.setattr(cpu, "F", types.SimpleNamespace(conv2d=costing("dense", F.conv2d, cost)))
    monkeypatch.setattr(cpu, "conv2d", costing("sparse", cpu.conv2d, cost))
    prepared = cpu.prepare_dense(sparse_weight(16, 16, 3, 0.05))
    for dense_cost, sparse_cost in [(2e-3, 1e-3), (1e-3, 2e-3)]:
        monkeypatch.setattr(cpu, "_DECISIONS", {})
        for path in tmp_path.iterdir():
            path.unlink()
        cost.update(dense=dense_cost, sparse=sparse_cost)
        outputs["dense"].clear(), outputs["sparse"].clear()
        decision = cpu.should_use_sparse(prepared, 20, 20)
        assert decision is (sparse_cost < dense_cost)
        # both really ran, a warm-up and 5 timed calls each, on the same input
        assert len(outputs["dense"]) == len(outputs["sparse"]) == 6
        assert_matches(outputs["sparse"][-1], outputs["dense"][-1])
        assert list(json.loads((tmp_path / "cpu_dispatch.json").read_text()).values()) == [decision]
        monkeypatch.setattr(cpu, "_DECISIONS", {})  # a new process: the file answers, nothing is timed
        assert cpu.should_use_sparse(prepared, 20, 20) is decision
        assert len(outputs["sparse"]) == 6


def test_dispatch_times_dense_and_sparse_in_turn(monkeypatch):
    """A burst of load must hit both: timings alternate, and a slow spell in the first rounds
    (here every call of round 1 and 2 costs 10x) does not decide the layer."""
    clock = types.SimpleNamespace(now=0.0, order=[])
    monkeypatch.setattr(cpu, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))

    def costing(name, cost):
        def run():
            clock.order.append(name)
            burst = 10.0 if 2 < len(clock.order) <= 6 else 1.0  # the warm-ups are calls 1 and 2
            clock.now += cost * burst
        return run

    dense, sparse = cpu._best_times(costing("d", 2e-3), costing("s", 1e-3))
    assert clock.order == ["d", "s"] * 6
    assert (dense, sparse) == pytest.approx((2e-3, 1e-3))


def test_dispatch_key_names_the_timing(monkeypatch, tmp_path):
    """Decisions cached by the older, one-after-the-other timing are never matched."""
    monkeypatch.setenv("SPARSESR_CPU_DISPATCH_CACHE", "1")
    key = cache_key_of(monkeypatch, tmp_path, cpu.prepare_dense(sparse_weight(8, 8, 3, 0.1)))
    assert key.startswith("t2|")


# Cache files this module never writes; each must be ignored (the layer is measured) and replaced.
POISONED_CACHES = {
    "deep nesting": lambda key: b"[" * 100_000,
    "deep nesting in a value": lambda key: b'{"k": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "truncated JSON": lambda key: json.dumps({key: False}).encode()[:-3],
    "binary junk": lambda key: random.Random(0).randbytes(4096),
    "invalid UTF-8": lambda key: b'{"' + key.encode() + b'": false, "\xff\xfe": true}',
    "not an object": lambda key: json.dumps([key, False]).encode(),
    "wrong value types": lambda key: json.dumps({key: "false", "b": 0, "c": None}).encode(),
    "huge integer": lambda key: b'{"a": ' + b"1" * 100_000 + b"}",
    "empty": lambda key: b"",
    # valid but larger than any file this module writes: not read at all
    "too large": lambda key: json.dumps({key: False, "padding": "0" * cpu._CACHE_MAX_BYTES}).encode(),
}


def cache_key_of(monkeypatch, tmp_path, prepared) -> str:
    """The key should_use_sparse files the layer under (from a clean run in its own folder)."""
    monkeypatch.setenv("SPARSESR_CACHE_DIR", str(tmp_path / "clean"))
    monkeypatch.setattr(cpu, "_DECISIONS", {})
    cpu.should_use_sparse(prepared, 32, 32)
    (key,) = json.loads((tmp_path / "clean" / "cpu_dispatch.json").read_text())
    return key


@pytest.mark.parametrize("poison", list(POISONED_CACHES) + ["directory", "fifo", "device"])
def test_invalid_cache_file_is_ignored_and_replaced(monkeypatch, tmp_path, poison):
    monkeypatch.setenv("SPARSESR_CPU_DISPATCH_CACHE", "1")
    calls = []
    monkeypatch.setattr(cpu, "_best_times", fake_timings(dense=2.0, sparse=1.0, calls=calls))
    prepared = cpu.prepare_dense(sparse_weight(8, 8, 3, 0.5))
    key = cache_key_of(monkeypatch, tmp_path, prepared)
    folder = tmp_path / "poisoned"
    folder.mkdir()
    path = folder / "cpu_dispatch.json"
    if poison == "directory":
        path.mkdir()
    elif poison == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        os.mkfifo(path)  # opening it for reading must not wait for a writer
    elif poison == "device":
        if not os.path.exists("/dev/zero"):
            pytest.skip("no /dev/zero")
        path.symlink_to("/dev/zero")  # endless: must not be read
    else:
        path.write_bytes(POISONED_CACHES[poison](key))
    monkeypatch.setenv("SPARSESR_CACHE_DIR", str(folder))
    monkeypatch.setattr(cpu, "_DECISIONS", {})
    calls.clear()
    assert cpu.should_use_sparse(prepared, 32, 32) is True  # measured, not read from the junk
    assert len(calls) == 2
    assert [p.name for p in folder.iterdir()] == ["cpu_dispatch.json"]  # no temporary file left
    if poison == "directory":
        assert path.is_dir()  # cannot be replaced; still nothing breaks
        return
    assert path.is_file() and not path.is_symlink()
    assert json.loads(path.read_text()) == {key: True}  # replaced by a valid file
    monkeypatch.setattr(cpu, "_DECISIONS", {})
    assert cpu.should_use_sparse(prepared, 32, 32) is True and len(calls) == 2  # and it is used


def test_valid_cache_file_is_trusted(monkeypatch, tmp_path):
    """The counterpart of the poisoned files: a well-formed file's answer is used as it is."""
    monkeypatch.setenv("SPARSESR_CPU_DISPATCH_CACHE", "1")
    calls = []
    monkeypatch.setattr(cpu, "_best_times", fake_timings(dense=2.0, sparse=1.0, calls=calls))
    prepared = cpu.prepare_dense(sparse_weight(8, 8, 3, 0.5))
    key = cache_key_of(monkeypatch, tmp_path, prepared)
    (tmp_path / "cpu_dispatch.json").write_text(json.dumps({key: False, "other": True}))
    monkeypatch.setenv("SPARSESR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu, "_DECISIONS", {})
    calls.clear()
    assert cpu.should_use_sparse(prepared, 32, 32) is False and calls == []

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
