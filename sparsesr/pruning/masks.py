"""Mask arithmetic: block scores, the cubic schedule, and choosing which blocks to keep.

A weight ``[C_out, C_in, kh, kw]`` is viewed as the matrix ``[C_out, K]`` (``weight.reshape(C_out, -1)``,
as in the CSR/BSR layouts) and cut into blocks of ``b_h`` rows x ``b_w`` columns. The matrix is
zero-padded up to whole blocks; padded entries are never counted as weights. With ``1x1`` blocks
every weight is its own block, so unstructured pruning is the same code path.
"""
from __future__ import annotations

import math

import torch


def cubic_sparsity(step: int, start_step: int, end_step: int, initial: float, final: float) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))**3, clamped to [t0, t1]."""
    if step >= end_step:
        return final
    if step <= start_step:
        return initial
    progress = (step - start_step) / (end_step - start_step)
    return final + (initial - final) * (1.0 - progress) ** 3


def block_grid(shape: torch.Size, block: tuple[int, int]) -> tuple[int, int]:
    """(n_block_rows, n_block_cols) of a weight of this shape."""
    rows, cols = shape[0], math.prod(shape[1:])
    return math.ceil(rows / block[0]), math.ceil(cols / block[1])


def _padded_blocks(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The weight as [n_block_rows, b_h, n_block_cols, b_w], zero-padded to whole blocks."""
    b_h, b_w = block
    matrix = weight.reshape(weight.shape[0], -1)
    n_rows, n_cols = block_grid(weight.shape, block)
    pad_cols, pad_rows = n_cols * b_w - matrix.shape[1], n_rows * b_h - matrix.shape[0]
    matrix = torch.nn.functional.pad(matrix, (0, pad_cols, 0, pad_rows))
    return matrix.reshape(n_rows, b_h, n_cols, b_w)


def block_sizes(shape: torch.Size, block: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """Number of real (unpadded) weights in each block, flattened, int64."""
    ones = torch.ones(shape, device=device)
    return _padded_blocks(ones, block).sum(dim=(1, 3)).flatten().long()


def block_scores(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """L2 norm of every block, flattened (float32).

    Edge blocks that are partly padding are scored as RMS x sqrt(b_h*b_w), i.e. as if the padding
    had the block's average energy, so they are not ranked low just for being small.
    """
    squares = _padded_blocks(weight.detach().float().square(), block).sum(dim=(1, 3)).flatten()
    sizes = block_sizes(weight.shape, block, weight.device).float()
    return torch.sqrt(squares * (block[0] * block[1]) / sizes)


def expand_blocks(block_mask: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    """Flat block mask -> element mask of ``shape`` (padding cut off)."""
    b_h, b_w = block
    n_rows, n_cols = block_grid(shape, block)
    grid = block_mask.reshape(n_rows, n_cols)
    full = grid.repeat_interleave(b_h, dim=0).repeat_interleave(b_w, dim=1)
    return full[: shape[0], : math.prod(shape[1:])].reshape(shape)


def reduce_to_blocks(mask: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Element mask -> flat block mask: a block is live if any of its weights is live."""
    return _padded_blocks(mask.to(torch.uint8), block).amax(dim=(1, 3)).flatten().bool()


def keep_top(scores: torch.Tensor, sizes: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask over blocks: the highest-scored blocks until at least ``keep`` weights are kept.

    With 1x1 blocks exactly ``keep`` weights are kept; with larger blocks at most one block more
    than needed (sparsity ends up at most one block below the target). Ties go to the lower index.
    """
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    if keep <= 0 or scores.numel() == 0:
        return chosen
    order = torch.argsort(scores, descending=True, stable=True)
    kept_so_far = torch.cumsum(sizes[order], dim=0)
    n_blocks = int(torch.searchsorted(kept_so_far, torch.tensor([keep], device=kept_so_far.device))[0]) + 1
    chosen[order[:n_blocks]] = True
    return chosen
