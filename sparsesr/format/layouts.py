"""Sparse layouts of a conv weight, and the compact index encodings used on disk.

Pure tensor functions, no I/O. A conv weight ``[C_out, C_in, kh, kw]`` is viewed as the matrix
``[C_out, K]`` with ``K = C_in*kh*kw`` (``weight.reshape(C_out, -1)``):

- CSR: ``row_ptr`` [C_out+1], ``col_idx`` [nnz] (ascending within a row), ``values`` [nnz].
- BSR: the same matrix cut into ``b_h x b_w`` blocks; ``block_row_ptr``, ``block_col_idx``
  (block-column index) and ``block_values`` [nnz_blocks, b_h, b_w], zero-padded at the edges.

Both are a *pattern* (row pointers + column indices of an ``[R, C]`` matrix) plus values, so the
on-disk index encodings below work on a pattern and serve CSR and BSR alike:

- ``absolute``: ``row_ptr`` + column indices in the smallest integer type that fits.
- ``delta8``: ``row_ptr`` + uint8 gaps between consecutive columns of a row (the first gap is
  the column itself). A gap above 255 is bridged by explicit zero entries ("fillers").
- ``bitmask``: one bit per matrix entry, row-major, 8 per byte, least significant bit first;
  no row pointers (they follow from the bits).
"""
from __future__ import annotations

import torch

INDEX_ENCODINGS = ("absolute", "delta8", "bitmask")
DELTA8_MAX_GAP = 255
# Output-channel block shapes that export looks for, largest first (see detect_block_shape).
BLOCK_SHAPES = ((8, 1), (4, 1))
# A layer counts as block-structured when its nonzeros fill at least this much of the nonzero
# blocks. Block-pruned weights fill 100% (a float weight is almost never exactly zero by chance);
# unstructured 90%-sparse weights fill ~29% of 4x1 blocks, so the two never get confused.
BLOCK_FILL_THRESHOLD = 0.95


def smallest_int_dtype(max_value: int) -> torch.dtype:
    """Smallest of uint8 / int16 / int32 / int64 holding ``0..max_value``."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if max_value <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


# --- dense <-> CSR / BSR ------------------------------------------------------------------


def dense_to_csr(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row_ptr, col_idx, values)`` (int64 indices) of ``weight.reshape(C_out, -1)``."""
    matrix = weight.reshape(weight.shape[0], -1)
    rows, cols = matrix.nonzero(as_tuple=True)  # row-major order: columns ascend within a row
    row_ptr = torch.zeros(matrix.shape[0] + 1, dtype=torch.int64)
    row_ptr[1:] = torch.bincount(rows, minlength=matrix.shape[0]).cumsum(0)
    return row_ptr, cols, matrix[rows, cols]


def csr_to_dense(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n_rows = shape[0]
    n_cols = 1
    for s in shape[1:]:
        n_cols *= s
    rows = torch.repeat_interleave(torch.arange(n_rows), (row_ptr[1:] - row_ptr[:-1]).long())
    dense = torch.zeros(n_rows * n_cols, dtype=values.dtype)
    dense[rows * n_cols + col_idx.long()] = values
    return dense.reshape(shape)


def _padded_blocks(matrix: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``[n_block_rows, n_block_cols, b_h, b_w]`` view of ``matrix`` zero-padded to whole blocks."""
    b_h, b_w = block
    rows, cols = matrix.shape
    n_br, n_bc = -(-rows // b_h), -(-cols // b_w)
    padded = matrix.new_zeros(n_br * b_h, n_bc * b_w)
    padded[:rows, :cols] = matrix
    return padded.reshape(n_br, b_h, n_bc, b_w).permute(0, 2, 1, 3)


def dense_to_bsr(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(block_row_ptr, block_col_idx, block_values)`` keeping every block with a nonzero."""
    blocks = _padded_blocks(weight.reshape(weight.shape[0], -1), block)
    keep = blocks.ne(0).any(dim=3).any(dim=2)  # [n_block_rows, n_block_cols]
    block_rows, block_cols = keep.nonzero(as_tuple=True)
    block_row_ptr = torch.zeros(keep.shape[0] + 1, dtype=torch.int64)
    block_row_ptr[1:] = torch.bincount(block_rows, minlength=keep.shape[0]).cumsum(0)
    return block_row_ptr, block_cols, blocks[block_rows, block_cols].contiguous()


def bsr_to_dense(
    block_row_ptr: torch.Tensor, block_col_idx: torch.Tensor, block_values: torch.Tensor, shape: tuple[int, ...]
) -> torch.Tensor:
    b_h, b_w = block_values.shape[1], block_values.shape[2]
    rows = shape[0]
    cols = 1
    for s in shape[1:]:
        cols *= s
    n_br, n_bc = -(-rows // b_h), -(-cols // b_w)
    block_rows = torch.repeat_interleave(torch.arange(n_br), (block_row_ptr[1:] - block_row_ptr[:-1]).long())
    blocks = block_values.new_zeros(n_br, n_bc, b_h, b_w)
    blocks[block_rows, block_col_idx.long()] = block_values
    padded = blocks.permute(0, 2, 1, 3).reshape(n_br * b_h, n_bc * b_w)
    return padded[:rows, :cols].reshape(shape).contiguous()  # padding entries are ignored


def block_fill(weight: torch.Tensor, block: tuple[int, int]) -> float:
    """Fraction of the entries of the nonzero blocks that are nonzero (1.0 = perfectly blocked)."""
    blocks = _padded_blocks(weight.reshape(weight.shape[0], -1).ne(0).to(torch.uint8), block)
    n_blocks = int(blocks.amax(dim=(2, 3)).sum())
    return 1.0 if n_blocks == 0 else int(blocks.sum()) / (n_blocks * block[0] * block[1])


def detect_block_shape(weight: torch.Tensor) -> tuple[int, int] | None:
    """The largest output-channel block shape whose blocks the zeros follow, else None."""
    for block in BLOCK_SHAPES:
        if weight.shape[0] >= block[0] and block_fill(weight, block) >= BLOCK_FILL_THRESHOLD:
            return block
    return None


# --- index encodings of a pattern (row_ptr, col_idx) of an [R, C] matrix --------------------


def encode_pattern(
    row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, n_cols: int, encoding: str
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Encode a pattern for disk: ``({"row_ptr"|"col_idx"|"col_delta"|"mask": tensor}, values)``.

    ``values`` has one entry (a scalar or a block) per pattern entry; ``delta8`` may insert zero
    fillers, so the values come back too.
    """
    row_ptr, col_idx = row_ptr.long(), col_idx.long()
    n_rows = row_ptr.numel() - 1
    if encoding == "absolute":
        nnz = col_idx.numel()
        return {
            "row_ptr": row_ptr.to(smallest_int_dtype(nnz)),
            "col_idx": col_idx.to(smallest_int_dtype(max(n_cols - 1, 0))),
        }, values
    if encoding == "bitmask":
        rows = torch.repeat_interleave(torch.arange(n_rows), row_ptr[1:] - row_ptr[:-1])
        bits = torch.zeros(n_rows * n_cols, dtype=torch.bool)
        bits[rows * n_cols + col_idx] = True
        return {"mask": pack_bits(bits)}, values
    if encoding == "delta8":
        return _encode_delta8(row_ptr, col_idx, values)
    raise ValueError(f"unknown index encoding {encoding!r}")


def _encode_delta8(
    row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    starts_row = torch.zeros(col_idx.numel(), dtype=torch.bool)
    starts_row[row_ptr[:-1][row_ptr[:-1] < row_ptr[1:]]] = True
    previous = torch.where(starts_row, 0, torch.roll(col_idx, 1))
    gaps = col_idx - previous
    # A gap above 255 gets zero-valued filler entries, each 255 further along the row.
    fillers = ((gaps - 1) // DELTA8_MAX_GAP).clamp(min=0)
    ends = (fillers + 1).cumsum(0)  # one past each real entry's position in the output
    n_out = int(ends[-1]) if ends.numel() else 0
    deltas = torch.full((n_out,), DELTA8_MAX_GAP, dtype=torch.uint8)
    deltas[ends - 1] = (gaps - DELTA8_MAX_GAP * fillers).to(torch.uint8)
    out_values = values.new_zeros((n_out,) + tuple(values.shape[1:]))
    out_values[ends - 1] = values
    new_row_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), ends])[row_ptr]
    return {"row_ptr": new_row_ptr.to(smallest_int_dtype(n_out)), "col_delta": deltas}, out_values


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bool vector -> uint8 bytes, 8 bits per byte, least significant bit first, zero padded."""
    n_bytes = -(-bits.numel() // 8)
    padded = torch.zeros(n_bytes * 8, dtype=torch.uint8)
    padded[: bits.numel()] = bits.to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (padded.reshape(n_bytes, 8) * weights).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """uint8 bytes -> bool vector of ``len(packed) * 8`` bits (the caller checks the padding)."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1).bool()


def pattern_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
