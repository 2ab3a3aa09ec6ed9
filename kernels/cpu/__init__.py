"""Direct sparse 2-D convolution on the CPU (the compiled extension ``_sparseconv``).

Kernels take tensors and return tensors; nothing here imports from ``sparsesr``.

    prepared = prepare_dense(weight)            # or prepare_csr(...) / prepare_bsr(...)
    y = conv2d(x, prepared, bias, relu=True)    # == relu(F.conv2d(x, weight, bias, padding=k//2))

Weights are re-arranged once at prepare time into *groups*: G consecutive output channels
(G = 1 for unstructured CSR, G = 4 for 4x1 / 8x1 output-channel blocks) sharing one ascending
list of nonzero positions ``k = (c_in * kh + ky) * kw + kx`` with G values each. The C kernel
turns the positions into offsets into a zero-padded input window per call. It is given every
array with its length and checks sizes, lengths and indices before it writes anything, so no
PreparedConv, however corrupted, makes it read or write out of bounds. See docs/cpu-kernel.md.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import stat
import tempfile
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_ABI_VERSION = 3  # the argument convention of _sparseconv.conv2d this file speaks (module.c)

try:
    from . import _sparseconv
    _IMPORT_ERROR: str | None = None
    if getattr(_sparseconv, "ABI_VERSION", 1) != _ABI_VERSION:  # sources updated, .so not rebuilt
        _IMPORT_ERROR = (f"extension is a stale build (interface {getattr(_sparseconv, 'ABI_VERSION', 1)}, "
                         f"expected {_ABI_VERSION}): rebuild it with pip install -e .")
        _sparseconv = None
except ImportError as exc:  # the build is optional (setup.py)
    _sparseconv = None
    _IMPORT_ERROR = f"extension not built: {exc}"

__all__ = [
    "PreparedConv", "available", "unavailable_reason", "isa", "supported_isas",
    "prepare_csr", "prepare_bsr", "prepare_dense", "conv2d", "should_use_sparse",
]

_ISA_CODES = {"scalar": 0, "avx2": 1, "avx512": 2}
_INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)
_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_MAX = 2**31 - 1
# The CPU does not change while the process runs: ask the extension once (it detected them at import).
_SUPPORTED_ISAS: tuple[str, ...] = (
    tuple(name for name, code in _ISA_CODES.items() if _sparseconv.isa_supported(code)) if _sparseconv else ())


def available() -> bool:
    """True when the compiled kernel can be used."""
    return _sparseconv is not None


def unavailable_reason() -> str | None:
    """Why the kernel cannot be used, or None when it can."""
    return _IMPORT_ERROR


def supported_isas() -> list[str]:
    """Code paths this machine can run, slowest first (empty without the extension)."""
    return list(_SUPPORTED_ISAS)


def isa() -> str:
    """The code path conv2d will run: ``$SPARSESR_CPU_ISA`` if set, else the fastest one."""
    return _default_isa()


def _default_isa() -> str:
    forced = os.environ.get("SPARSESR_CPU_ISA", "").strip().lower()
    if forced:
        return _check_isa(forced)
    if not _SUPPORTED_ISAS:
        raise RuntimeError(f"sparse CPU kernel unavailable ({_IMPORT_ERROR})")
    return _SUPPORTED_ISAS[-1]


def _check_isa(name: str) -> str:
    if name not in _ISA_CODES:
        raise ValueError(f"ISA must be one of {sorted(_ISA_CODES)}, got {name!r}")
    if name not in _SUPPORTED_ISAS:
        raise ValueError(f"ISA {name!r} is not supported on this CPU (supported: {list(_SUPPORTED_ISAS)})")
    return name


@dataclass(frozen=True, eq=False)
class PreparedConv:
    """A conv weight arranged for the kernel. Build it with prepare_csr / prepare_bsr / prepare_dense."""

    out_channels: int
    in_channels: int
    kh: int
    kw: int
    group: int              # output channels sharing one nonzero list: 1 or 4
    group_ptr: torch.Tensor  # int32 [n_groups + 1]
    nz_k: torch.Tensor       # int32 [n_entries], ascending within a group
    nz_val: torch.Tensor     # float32 [n_entries * group]
    nnz: int                 # nonzero weights (what the FLOP count uses)
    layout: str              # "csr", "bsr4x1", "bsr8x1", ... (what it was built from)

    def __post_init__(self) -> None:
        # Early, readable errors for a hand-built PreparedConv. The C kernel checks all of this
        # again on every call (tensors can be changed in place after construction).
        if self.group not in (1, 4):
            raise ValueError(f"group must be 1 or 4, got {self.group}")
        _check_kernel_size(self.in_channels, self.kh, self.kw)
        n_groups = -(-self.out_channels // self.group)
        for name, t, dtype in (("group_ptr", self.group_ptr, torch.int32), ("nz_k", self.nz_k, torch.int32),
                               ("nz_val", self.nz_val, torch.float32)):
            if t.dtype != dtype or t.dim() != 1 or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError(f"{name} must be a contiguous 1-D {dtype} CPU tensor, got {t.dtype} {tuple(t.shape)}")
        _check_pointers("group_ptr", self.group_ptr, n_groups, self.nz_k.numel())
        if self.nz_val.numel() != self.nz_k.numel() * self.group:
            raise ValueError(f"nz_val must have {self.nz_k.numel() * self.group} values, got {self.nz_val.numel()}")
        k_total = self.in_channels * self.kh * self.kw
        if self.nz_k.numel() and (self.nz_k.min() < 0 or self.nz_k.max() >= k_total):
            raise ValueError(f"nz_k must lie in [0, {k_total})")

    @property
    def density(self) -> float:
        return self.nnz / (self.out_channels * self.in_channels * self.kh * self.kw)

    def to_dense(self) -> torch.Tensor:
        """The weight as a dense float32 [C_out, C_in, kh, kw] tensor."""
        k_total = self.in_channels * self.kh * self.kw
        n_groups = self.group_ptr.numel() - 1
        counts = self.group_ptr[1:].long() - self.group_ptr[:-1].long()
        group_of_entry = torch.repeat_interleave(torch.arange(n_groups), counts)
        dense = torch.zeros(n_groups * self.group, k_total)
        values = self.nz_val.view(-1, self.group)
        for j in range(self.group):
            dense.index_put_((group_of_entry * self.group + j, self.nz_k.long()), values[:, j], accumulate=True)
        return dense[: self.out_channels].reshape(self.out_channels, self.in_channels, self.kh, self.kw)


# ---- preparing weights ------------------------------------------------------------------------


def _check_index(name: str, t: object, dims: int = 1) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype not in _INDEX_DTYPES or t.dim() != dims:
        found = f"{t.dtype} tensor with {t.dim()} dims" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a {dims}-D int16/int32/int64 tensor, got {found}")
    return t.detach().to("cpu", torch.int64)


def _check_values(name: str, t: object, dims: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype not in _VALUE_DTYPES or t.dim() != dims:
        found = f"{t.dtype} tensor with {t.dim()} dims" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a {dims}-D float32/float16/bfloat16 tensor, got {found}")
    return t.detach().to("cpu", torch.float32)


def _check_kernel_size(in_channels: int, kh: int, kw: int) -> None:
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if kh < 1 or kw < 1 or kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel size must be odd and >= 1 (padding k//2 keeps the size), got {kh}x{kw}")


def _check_pointers(name: str, ptr: torch.Tensor, n_rows: int, n_entries: int) -> None:
    if ptr.numel() != n_rows + 1:
        raise ValueError(f"{name} must have {n_rows + 1} entries, got {ptr.numel()}")
    if ptr[0] != 0 or ptr[-1] != n_entries or bool((ptr[1:] < ptr[:-1]).any()):
        raise ValueError(f"{name} must start at 0, never decrease and end at {n_entries}, "
                         f"got {ptr[0].item()}..{ptr[-1].item()}")


def _build(group_ids: torch.Tensor, ks: torch.Tensor, vals: torch.Tensor, n_groups: int, group: int,
           out_channels: int, in_channels: int, kh: int, kw: int, layout: str) -> PreparedConv:
    """Pack entries (group id, position k, `group` values) into the kernel's arrays."""
    keep = vals.ne(0).any(dim=1)  # an all-zero entry (padding, explicit zero) adds nothing
    group_ids, ks, vals = group_ids[keep], ks[keep], vals[keep]
    k_total = in_channels * kh * kw
    order = torch.argsort(group_ids * k_total + ks)  # ascending k inside a group: input locality
    group_ids, ks, vals = group_ids[order], ks[order], vals[order]
    counts = torch.bincount(group_ids, minlength=n_groups)
    group_ptr = torch.zeros(n_groups + 1, dtype=torch.int64)
    group_ptr[1:] = torch.cumsum(counts, 0)
    # the true nonzero count, without the padding rows of the last group
    valid_rows = (torch.arange(n_groups * group).view(n_groups, group) < out_channels)[group_ids]
    nnz = int((vals.ne(0) & valid_rows).sum())
    return PreparedConv(
        out_channels=out_channels, in_channels=in_channels, kh=kh, kw=kw, group=group,
        group_ptr=group_ptr.to(torch.int32), nz_k=ks.to(torch.int32).contiguous(),
        nz_val=vals.reshape(-1).contiguous(), nnz=nnz, layout=layout,
    )


def prepare_csr(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                in_channels: int, kh: int, kw: int) -> PreparedConv:
    """Prepare a CSR weight (rows = output channels, column k = (c_in*kh + ky)*kw + kx)."""
    _check_kernel_size(in_channels, kh, kw)
    row_ptr, col_idx = _check_index("row_ptr", row_ptr), _check_index("col_idx", col_idx)
    values = _check_values("values", values, 1)
    if col_idx.numel() != values.numel():
        raise ValueError(f"col_idx and values must have the same length, got {col_idx.numel()} and {values.numel()}")
    out_channels = row_ptr.numel() - 1
    if out_channels < 1:
        raise ValueError("row_ptr must have at least 2 entries (one output channel)")
    _check_pointers("row_ptr", row_ptr, out_channels, col_idx.numel())
    k_total = in_channels * kh * kw
    if col_idx.numel() and (col_idx.min() < 0 or col_idx.max() >= k_total):
        raise ValueError(f"col_idx must lie in [0, {k_total}), got {col_idx.min().item()}..{col_idx.max().item()}")
    rows = torch.repeat_interleave(torch.arange(out_channels), row_ptr[1:] - row_ptr[:-1])
    return _build(rows, col_idx, values.view(-1, 1), out_channels, 1, out_channels,
                  in_channels, kh, kw, "csr")


def prepare_bsr(block_row_ptr: torch.Tensor, block_col_idx: torch.Tensor, block_values: torch.Tensor,
                out_channels: int, in_channels: int, kh: int, kw: int) -> PreparedConv:
    """Prepare a BSR weight; block_values is [nnz_blocks, b_h, b_w] (padding entries ignored).

    Blocks of 4*m output channels (4x1, 8x1, ...) run on the 4-channel register tile; any other
    block shape is unpacked into single output channels.
    """
    _check_kernel_size(in_channels, kh, kw)
    if out_channels < 1:
        raise ValueError(f"out_channels must be >= 1, got {out_channels}")
    block_row_ptr = _check_index("block_row_ptr", block_row_ptr)
    block_col_idx = _check_index("block_col_idx", block_col_idx)
    block_values = _check_values("block_values", block_values, 3)
    n_blocks, b_h, b_w = block_values.shape
    if block_col_idx.numel() != n_blocks:
        raise ValueError(f"block_col_idx must have {n_blocks} entries (one per block), got {block_col_idx.numel()}")
    if b_h < 1 or b_w < 1:
        raise ValueError(f"blocks must be at least 1x1, got {b_h}x{b_w}")
    k_total = in_channels * kh * kw
    n_block_rows = -(-out_channels // b_h)
    n_block_cols = -(-k_total // b_w)
    _check_pointers("block_row_ptr", block_row_ptr, n_block_rows, n_blocks)
    if n_blocks and (block_col_idx.min() < 0 or block_col_idx.max() >= n_block_cols):
        raise ValueError(f"block_col_idx must lie in [0, {n_block_cols}), "
                         f"got {block_col_idx.min().item()}..{block_col_idx.max().item()}")
    block_rows = torch.repeat_interleave(torch.arange(n_block_rows), block_row_ptr[1:] - block_row_ptr[:-1])
    group = 4 if b_h % 4 == 0 else 1
    per_block = b_h // group  # groups per block row
    n_groups = -(-out_channels // group)
    # one entry per (block, sub-group s, block column t)
    blocks = block_values.view(n_blocks, per_block, group, b_w).permute(0, 1, 3, 2)  # [n, s, t, G]
    s = torch.arange(per_block).view(1, per_block, 1)
    t = torch.arange(b_w).view(1, 1, b_w)
    group_ids = (block_rows.view(-1, 1, 1) * per_block + s).expand(n_blocks, per_block, b_w)
    ks = (block_col_idx.view(-1, 1, 1) * b_w + t).expand(n_blocks, per_block, b_w)
    group_ids, ks, vals = group_ids.reshape(-1), ks.reshape(-1), blocks.reshape(-1, group)
    inside = (group_ids < n_groups) & (ks < k_total)  # drop padding past C_out / K
    if group == 1:
        inside &= group_ids < out_channels
    return _build(group_ids[inside], ks[inside], vals[inside], n_groups, group, out_channels,
                  in_channels, kh, kw, f"bsr{b_h}x{b_w}")


def prepare_dense(weight: torch.Tensor) -> PreparedConv:
    """Prepare a dense [C_out, C_in, kh, kw] weight whose zeros are the sparsity.

    If every group of 8 (else 4) consecutive output channels has the same zero pattern, the
    4-channel block tile is used; otherwise the weight runs as unstructured CSR.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.dtype not in _VALUE_DTYPES:
        found = f"{weight.dtype} tensor of shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 4-D float32/float16/bfloat16 [C_out, C_in, kh, kw] tensor, got {found}")
    out_channels, in_channels, kh, kw = weight.shape
    _check_kernel_size(in_channels, kh, kw)
    matrix = weight.detach().to("cpu", torch.float32).reshape(out_channels, -1)
    for b_h in (8, 4):
        n_block_rows = -(-out_channels // b_h)
        padded = torch.zeros(n_block_rows * b_h, matrix.shape[1])
        padded[:out_channels] = matrix
        mask = padded.ne(0).view(n_block_rows, b_h, -1)
        union = mask.any(dim=1, keepdim=True)
        rows_valid = (torch.arange(n_block_rows * b_h) < out_channels).view(n_block_rows, b_h, 1)
        if bool(((mask == union) | ~rows_valid).all()):  # same pattern in every real row
            blocks = padded.view(n_block_rows, b_h, -1)
            block_rows, cols = union.squeeze(1).nonzero(as_tuple=True)
            counts = torch.bincount(block_rows, minlength=n_block_rows)
            row_ptr = torch.zeros(n_block_rows + 1, dtype=torch.int64)
            row_ptr[1:] = torch.cumsum(counts, 0)
            values = blocks[block_rows, :, cols].unsqueeze(-1)  # [nnz_blocks, b_h, 1]
            return prepare_bsr(row_ptr, cols, values, out_channels, in_channels, kh, kw)
    rows, cols = matrix.nonzero(as_tuple=True)
    row_ptr = torch.zeros(out_channels + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=out_channels), 0)
    return prepare_csr(row_ptr, cols, matrix[rows, cols], in_channels, kh, kw)


# ---- running ----------------------------------------------------------------------------------


def _int_field(prepared: PreparedConv, name: str, low: int = 1) -> int:
    value = getattr(prepared, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"PreparedConv.{name} must be an int, got {type(value).__name__}")
    if not low <= value <= _INT32_MAX:
        raise ValueError(f"PreparedConv.{name} must be in [{low}, 2**31), got {value}")
    return value


def _weight_array(prepared: PreparedConv, name: str, dtype: torch.dtype) -> torch.Tensor:
    """One of prepared's arrays, whose memory the kernel reads as `dtype`: the layout must be right."""
    t = getattr(prepared, name)
    if (not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 1 or t.device.type != "cpu"
            or not t.is_contiguous()):
        found = (f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"
                 f"{'' if t.is_contiguous() else ', not contiguous'}" if isinstance(t, torch.Tensor)
                 else type(t).__name__)
        raise ValueError(f"PreparedConv.{name} must be a contiguous 1-D {dtype} CPU tensor, got {found}")
    return t


def _negative_slope(slope: float | torch.Tensor | None, c_out: int) -> torch.Tensor | None:
    """A LeakyReLU slope (float) or PReLU slopes (1 or c_out of them) as a float32 vector."""
    if slope is None:
        return None
    if isinstance(slope, torch.Tensor):
        if slope.dim() > 1 or slope.numel() not in (1, c_out) or not slope.is_floating_point():
            raise ValueError(f"negative_slope must be a float or a float tensor of 1 or {c_out} slopes, "
                             f"got a {slope.dtype} tensor of shape {tuple(slope.shape)}")
        slope = slope.detach().to("cpu", torch.float32).reshape(-1).contiguous()
    elif isinstance(slope, (int, float)) and not isinstance(slope, bool):
        slope = torch.tensor([float(slope)])
    else:
        raise ValueError(f"negative_slope must be a float or a tensor, got {type(slope).__name__}")
    if not bool(torch.isfinite(slope).all()):
        raise ValueError("negative_slope must be finite")
    return slope


def _array(t: torch.Tensor | None) -> tuple[int, int]:
    """What the extension takes for an array: its address and its length in elements."""
    return (t.data_ptr(), t.numel()) if t is not None else (0, 0)


def _activation(name: str, t: object, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu" or t.dtype != torch.float32:
        raise ValueError(f"{name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    return t.contiguous()


def conv2d(x: torch.Tensor, prepared: PreparedConv, bias: torch.Tensor | None = None, relu: bool = False,
           residual: torch.Tensor | None = None, res_scale: float = 1.0, isa: str | None = None,
           band_rows: int = 0, band_cols: int = 0, shuffle: int = 1,
           negative_slope: float | torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Stride-1 zero-padded conv with the fused epilogue ``residual + res_scale * act(conv + bias)``.

    ``act`` is ReLU with ``relu=True``; with ``negative_slope`` it is ``max(y, 0) + slope * min(y, 0)``:
    a float (LeakyReLU) or a tensor of one slope per output channel (PReLU; one element: shared).
    x is float32 NCHW on the CPU; ``isa`` forces a code path (default: ``isa()``);
    band_rows / band_cols override the cache tile size (0: automatic). ``shuffle=s`` > 1 stores
    the result pixel-shuffled, ``F.pixel_shuffle(conv2d(...), s)`` without the extra pass over
    memory (an upsampler's conv; no residual then). ``out``: a float32 contiguous CPU tensor of the
    output's shape to write into and return (a buffer kept across calls: a fresh large output costs
    page faults, ~20 ms for 64 MiB); it must not overlap x, the residual, the bias or the slope.
    """
    if _sparseconv is None:
        raise RuntimeError(f"sparse CPU kernel unavailable ({_IMPORT_ERROR})")
    if not isinstance(prepared, PreparedConv):
        raise ValueError(f"prepared must be a PreparedConv, got {type(prepared).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        found = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 4-D NCHW tensor, got {found}")
    n, c_in, h, w = x.shape
    if c_in != prepared.in_channels:
        raise ValueError(f"x must have {prepared.in_channels} channels, got {c_in}")
    if n < 1 or h < 1 or w < 1:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    x = _activation("x", x, (n, c_in, h, w))
    # The C side checks every size, length and index; here only what it cannot see (dtypes,
    # layouts) and what sizes the output allocation: c_out must agree with group_ptr's length.
    c_out, kh, kw, group = (_int_field(prepared, name) for name in ("out_channels", "kh", "kw", "group"))
    group_ptr = _weight_array(prepared, "group_ptr", torch.int32)
    nz_k = _weight_array(prepared, "nz_k", torch.int32)
    nz_val = _weight_array(prepared, "nz_val", torch.float32)
    if group not in (1, 4) or group_ptr.numel() != -(-c_out // group) + 1:
        raise ValueError(f"PreparedConv is inconsistent: group {group} (must be 1 or 4), {c_out} output channels "
                         f"and {group_ptr.numel()} group pointers")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (c_out,) or not bias.is_floating_point():
            found = f"{bias.dtype} tensor of shape {tuple(bias.shape)}" if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must be a floating-point tensor of shape ({c_out},), got {found}")
        bias = bias.detach().to("cpu", torch.float32).contiguous()
    if residual is not None:
        residual = _activation("residual", residual, (n, c_out, h, w))
    slope = _negative_slope(negative_slope, c_out)
    if slope is not None and relu:
        raise ValueError("relu=True and negative_slope are exclusive (ReLU is a slope of 0)")
    if not isinstance(shuffle, int) or shuffle < 1 or c_out % (shuffle * shuffle):
        raise ValueError(f"shuffle must be a positive int whose square divides the {c_out} output channels, "
                         f"got {shuffle!r}")
    if shuffle > 1 and residual is not None:
        raise ValueError("shuffle > 1 cannot be combined with a residual")
    for name, value in (("band_rows", band_rows), ("band_cols", band_cols)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT32_MAX:
            raise ValueError(f"{name} must be an int in [0, 2**31) (0: automatic), got {value!r}")
    code = _ISA_CODES[_check_isa(isa.lower()) if isa else _default_isa()]
    shape = (n, c_out // shuffle**2, h * shuffle, w * shuffle)
    if out is None:
        out = torch.empty(shape)
    elif not (isinstance(out, torch.Tensor) and out.device.type == "cpu" and out.dtype == torch.float32
              and tuple(out.shape) == shape and out.is_contiguous()):
        found = (f"a {out.dtype} tensor of shape {tuple(out.shape)} on {out.device}"
                 f"{'' if out.is_contiguous() else ', not contiguous'}") if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"out must be a contiguous float32 CPU tensor of shape {shape}, got {found}")
    _sparseconv.conv2d(
        _array(x), _array(out), _array(residual), _array(bias), _array(slope), _array(group_ptr), _array(nz_k),
        _array(nz_val),
        (n, c_in, h, w, c_out, kh, kw), group, shuffle, bool(relu), float(res_scale),
        max(1, torch.get_num_threads()), code, band_rows, band_cols, -1,
    )
    return out


# ---- sparse or dense? -------------------------------------------------------------------------

_DECISIONS: dict[str, bool] = {}
_DECISIONS_LOCK = threading.Lock()
_CACHE_MAX_BYTES = 1 << 20  # ~10,000 decisions; a larger file is not one this module wrote


def _cache_file() -> str:
    """``$SPARSESR_CACHE_DIR/cpu_dispatch.json``, by default in ``~/.cache/sparsesr``."""
    folder = os.environ.get("SPARSESR_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sparsesr")
    return os.path.join(folder, "cpu_dispatch.json")


@functools.lru_cache(maxsize=1)
def _machine_key() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def _best_times(dense, sparse, rounds: int = 5) -> tuple[float, float]:
    """The best of ``rounds`` timings of each of two calls, timed in turn (dense, sparse, dense, ...).

    In turn, not one after the other: on a shared machine a burst of load during one call's
    timings would otherwise decide the layer (seen: EDSR's 64->3 last conv decided dense while
    the kernel is 2.3x faster on it, and the cache file kept that decision).
    """
    dense(), sparse()  # warm-up
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, fn in enumerate((dense, sparse)):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def should_use_sparse(prepared: PreparedConv, h: int, w: int) -> bool:
    """Whether conv2d beats dense ``F.conv2d`` for this layer, measured once and cached.

    The decision is keyed by layer shape, density (5% buckets), group size, code path, thread
    count, CPU model and input size (at most 64x64, what it is timed on) and kept in memory and in
    ``cpu_dispatch.json`` in ``$SPARSESR_CACHE_DIR`` (default ``~/.cache/sparsesr``; set
    SPARSESR_CPU_DISPATCH_CACHE=0 to skip the file). A file that cannot be read or is not a
    JSON object of booleans is ignored, and replaced at the next measurement.
    """
    if _sparseconv is None:
        return False
    side_h, side_w = min(h, 64), min(w, 64)
    threads = torch.get_num_threads()
    # "t2": decisions timed in turn (_best_times); those of the older one-after-the-other timing
    # may be wrong and are never matched.
    key = "|".join(str(v) for v in (
        "t2", _machine_key(), _default_isa(), threads, prepared.out_channels, prepared.in_channels, prepared.kh,
        prepared.kw, prepared.group, round(prepared.density * 20), side_h, side_w))
    use_file = os.environ.get("SPARSESR_CPU_DISPATCH_CACHE", "1") != "0"
    with _DECISIONS_LOCK:
        if key not in _DECISIONS and use_file:
            _DECISIONS.update(_read_cache_file())
        if key in _DECISIONS:
            return _DECISIONS[key]
    x = torch.randn(1, prepared.in_channels, side_h, side_w)
    weight = prepared.to_dense()
    padding = (prepared.kh // 2, prepared.kw // 2)
    with torch.no_grad():
        dense, sparse = _best_times(lambda: F.conv2d(x, weight, padding=padding), lambda: conv2d(x, prepared))
    decision = sparse < dense
    with _DECISIONS_LOCK:
        _DECISIONS[key] = decision
        if use_file:
            _write_cache_file(key, decision)
    return decision


def _read_cache_file() -> dict[str, bool]:
    """The decisions in the cache file; {} for a missing, unreadable or invalid one (bad JSON,
    nesting too deep for the parser, wrong types, binary junk, too large, not a regular file)."""
    try:
        # O_NONBLOCK: opening a FIFO put there must not wait for a writer
        fd = os.open(_cache_file(), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return {}
    try:
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return {}
            raw = f.read(_CACHE_MAX_BYTES + 1)
        if len(raw) > _CACHE_MAX_BYTES:
            return {}
        data = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError: bad UTF-8 or JSON
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, bool)}


def _write_cache_file(key: str, decision: bool) -> None:
    """Add one decision, replacing the file atomically (readers see the old or the new one)."""
    path = _cache_file()
    try:  # a cache: failing to write it only costs a re-measurement next time
        data = _read_cache_file()
        data[key] = decision
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".cpu_dispatch.", suffix=".tmp")
        try:
            with open(fd, "w") as f:
                json.dump(data, f, indent=0, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError:
        pass
