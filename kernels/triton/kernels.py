"""Triton kernels for sparse convolution as implicit GEMM (see docs/triton-kernels.md).

Convolution is read as a matrix product ``out[co, p] = sum_k W[co, k] * X[k, p]``: ``W`` is the
weight viewed as ``[C_out, K]`` with column ``k = (c_in*KH + ky)*KW + kx`` (the CSR/BSR column
order of the file format), ``p`` is an output pixel, and ``X[k, p]`` is the input pixel that tap
``(ky, kx)`` of channel ``c_in`` sees from ``p``. ``X`` is never built (no im2col): each program
computes the input addresses for the columns it needs and loads them with a border mask, which
is exactly zero padding.

The functions here are deliberately left undecorated: ``launch.py`` wraps them with
``triton.jit`` (and ``triton.autotune`` on a GPU) at first use, in the mode (compiled or
interpreted) that triton itself was imported in. Everything is inline, with no helper
functions, because a helper would need its own ``triton.jit`` at import time. Importing this
module imports triton; ``sparsesr.kernels.triton`` only does so lazily.
"""
from __future__ import annotations

import triton.language as tl


def bsr_conv_kernel(
    x_ptr, block_row_ptr, block_col_idx, block_values, bias_ptr, slope_ptr, residual_ptr, out_ptr,
    C_in, H, W, C_out, n_blocks, res_scale,
    KH: tl.constexpr, KW: tl.constexpr,
    B_H: tl.constexpr, B_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, SLOPE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr, BW_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One program: one block row (B_H output channels, padded to BLOCK_CO) x BLOCK_P pixels.

    Epilogue: + bias, then ReLU (RELU) or ``max(y, 0) + slope * min(y, 0)`` with one shared slope
    (SLOPE = 1: LeakyReLU, or a 1-slope PReLU) or one per output channel (SLOPE = 2: PReLU),
    then ``residual + res_scale * y``.

    Each step takes BLOCK_K // BW_PAD nonzero blocks of the row and lays their B_W columns side
    by side as the K dimension of one ``tl.dot`` (K must be >= 16, and a 4x1 block alone has
    only one column).
    """
    # Grid: (block rows x pixel tiles, N). Block rows vary fastest, so the programs running
    # together read the same input tile (L2 reuse), and axis 0 has no 65535 limit.
    n_block_rows = tl.cdiv(C_out, B_H)
    pid_row = tl.program_id(0) % n_block_rows
    pid_p = tl.program_id(0) // n_block_rows
    pid_n = tl.program_id(1)
    HW = H * W
    K = C_in * KH * KW

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < HW
    oy = offs_p // W
    ox = offs_p % W
    # Batch offsets in int64: N * C * H * W may pass 2**31 for large batches of big images.
    x_img = x_ptr + pid_n.to(tl.int64) * C_in * HW

    offs_co = tl.arange(0, BLOCK_CO)
    co_in_block = offs_co < B_H
    lanes = tl.arange(0, BLOCK_K)
    lane_block = lanes // BW_PAD  # which of this step's blocks a K lane belongs to
    lane_col = lanes % BW_PAD  # which column inside that block

    # Clamped, so that a malformed row pointer cannot make the loop read outside the arrays.
    start = tl.maximum(tl.load(block_row_ptr + pid_row).to(tl.int32), 0)
    end = tl.minimum(tl.load(block_row_ptr + pid_row + 1).to(tl.int32), n_blocks)

    acc = tl.zeros([BLOCK_CO, BLOCK_P], dtype=tl.float32)
    for first in range(start, end, BLOCK_K // BW_PAD):
        blk = first + lane_block
        lane_ok = (blk < end) & (lane_col < B_W)
        block_col = tl.load(block_col_idx + blk, mask=lane_ok, other=0).to(tl.int32)
        col = block_col * B_W + lane_col
        # Columns past K only exist as zero padding of the last block column.
        lane_ok = lane_ok & (col < K) & (col >= 0)

        # block_values[blk, co, c] sits at (blk * B_H + co) * B_W + c.
        w_ptrs = block_values + (blk[None, :] * B_H + offs_co[:, None]) * B_W + lane_col[None, :]
        w = tl.load(w_ptrs, mask=co_in_block[:, None] & lane_ok[None, :], other=0.0)

        # Column -> (input channel, tap offset). The input address is then a per-column
        # offset plus the pixel index, so the [BLOCK_K, BLOCK_P] tile costs one add per element.
        c_in = col // (KH * KW)
        dy = (col % (KH * KW)) // KW - KH // 2
        dx = col % KW - KW // 2
        iy = oy[None, :] + dy[:, None]
        ix = ox[None, :] + dx[:, None]
        x_ok = lane_ok[:, None] & p_ok[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        x_ptrs = x_img + (c_in * HW + dy * W + dx)[:, None] + offs_p[None, :]
        x_tile = tl.load(x_ptrs, mask=x_ok, other=0.0)

        if DOT_IN_FP32:
            # The interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584).
            acc = tl.dot(w.to(tl.float32), x_tile.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w.to(x_tile.dtype), x_tile, acc, input_precision=INPUT_PRECISION)

    # Epilogue: y = acc + bias; activation; y = residual + res_scale * y; store in the output dtype.
    co = pid_row * B_H + offs_co
    co_ok = co_in_block & (co < C_out)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[:, None]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    if SLOPE == 1:
        acc = tl.maximum(acc, 0.0) + tl.load(slope_ptr).to(tl.float32) * tl.minimum(acc, 0.0)
    if SLOPE == 2:
        slope = tl.load(slope_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[:, None]
        acc = tl.maximum(acc, 0.0) + slope * tl.minimum(acc, 0.0)
    out_offsets = pid_n.to(tl.int64) * C_out * HW + co[:, None] * HW + offs_p[None, :]
    out_mask = co_ok[:, None] & p_ok[None, :]
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + out_offsets, mask=out_mask, other=0.0)
        acc = residual.to(tl.float32) + res_scale * acc
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def csr_conv_kernel(
    x_ptr, row_ptr, col_idx, values, bias_ptr, slope_ptr, residual_ptr, out_ptr,
    C_in, H, W, C_out, nnz, res_scale,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, SLOPE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_NZ: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One program: one output channel x BLOCK_P pixels, walking that row's nonzeros.

    BLOCK_NZ nonzeros are taken per step: their weights are broadcast over the pixel tile,
    multiplied with the gathered input rows and summed, all in fp32 (no tensor cores: a CSR row
    has no second dimension to feed them).
    """
    # Grid: (C_out x pixel tiles, N), output channels fastest (see bsr_conv_kernel).
    row = tl.program_id(0) % C_out
    pid_p = tl.program_id(0) // C_out
    pid_n = tl.program_id(1)
    HW = H * W
    K = C_in * KH * KW

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < HW
    oy = offs_p // W
    ox = offs_p % W
    x_img = x_ptr + pid_n.to(tl.int64) * C_in * HW

    # Clamped, so that a malformed row pointer cannot make the loop read outside the arrays.
    start = tl.maximum(tl.load(row_ptr + row).to(tl.int32), 0)
    end = tl.minimum(tl.load(row_ptr + row + 1).to(tl.int32), nnz)

    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for first in range(start, end, BLOCK_NZ):
        nz = first + tl.arange(0, BLOCK_NZ)
        nz_ok = nz < end
        col = tl.load(col_idx + nz, mask=nz_ok, other=0).to(tl.int32)
        nz_ok = nz_ok & (col < K) & (col >= 0)  # out-of-range columns are ignored, never read
        w = tl.load(values + nz, mask=nz_ok, other=0.0).to(tl.float32)

        c_in = col // (KH * KW)  # column -> input channel and tap offset, as in bsr
        dy = (col % (KH * KW)) // KW - KH // 2
        dx = col % KW - KW // 2
        iy = oy[None, :] + dy[:, None]
        ix = ox[None, :] + dx[:, None]
        x_ok = nz_ok[:, None] & p_ok[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        x_ptrs = x_img + (c_in * HW + dy * W + dx)[:, None] + offs_p[None, :]
        x_tile = tl.load(x_ptrs, mask=x_ok, other=0.0)
        acc += tl.sum(w[:, None] * x_tile.to(tl.float32), axis=0)

    # Epilogue, as in bsr_conv_kernel.
    if HAS_BIAS:
        acc += tl.load(bias_ptr + row).to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    if SLOPE != 0:
        slope = tl.load(slope_ptr + (row if SLOPE == 2 else 0)).to(tl.float32)
        acc = tl.maximum(acc, 0.0) + slope * tl.minimum(acc, 0.0)
    out_offsets = (pid_n.to(tl.int64) * C_out + row) * HW + offs_p
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + out_offsets, mask=p_ok, other=0.0)
        acc = residual.to(tl.float32) + res_scale * acc
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=p_ok)
