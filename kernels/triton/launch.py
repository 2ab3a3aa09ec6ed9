"""Python launchers for the Triton sparse convolution kernels.

They check shapes, dtypes and devices (raising ``ValueError`` with what was expected and what
was found), pick a grid and a configuration, and launch. Only cheap checks are made: reading the
contents of the index tensors would synchronise the GPU on every call. Validating the sparse
structure is the file loader's job; the kernels only make sure that malformed indices can never
read outside the tensors (out-of-range columns are skipped, row pointers are clamped to nnz).

Triton is imported at first use, never at import time, so this module loads without triton.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from typing import Any

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------------------------
# Availability


def _interpreting() -> bool:
    """Whether TRITON_INTERPRET asks for triton's CPU interpreter (read without importing it)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


@functools.cache  # triton's helpers never change after its import
def _mode_conflict(interpreting: bool) -> str | None:
    """Triton jit-decorates its own helpers (tl.zeros, tl.cdiv, ...) when it is imported, so
    the TRITON_INTERPRET value at that moment holds for the whole process. Report a change."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return None
    if interpreting and isinstance(tl.zeros, JITFunction):
        return ("TRITON_INTERPRET=1 was set after triton was imported; "
                "set it before the first import")
    if not interpreting and isinstance(tl.zeros, InterpretedFunction):
        return "triton was imported with TRITON_INTERPRET=1, which has been unset since"
    return None


def unavailable_reason() -> str | None:
    """Why the Triton kernels cannot run here, or None when they can.

    Does not import triton when the answer is already "no" (no GPU, no interpreter), so that
    asking does not fix triton's interpreter setting for the rest of the process.
    """
    if "triton" not in sys.modules and importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    interpreting = _interpreting()
    if not interpreting and not torch.cuda.is_available():
        return "no CUDA/ROCm GPU is visible and TRITON_INTERPRET=1 is not set"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    return _mode_conflict(interpreting)


def available() -> bool:
    """True when triton is importable and either a GPU or the interpreter can run the kernels."""
    return unavailable_reason() is None


def _require_available() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the Triton kernels cannot run: {reason}")


# --------------------------------------------------------------------------------------------
# Kernel objects and configurations


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _bsr_prune(configs: list, named_args: dict, **kwargs: Any) -> list:
    """Keep configs whose K step holds at least one whole block (BLOCK_K >= BW_PAD)."""
    bw_pad = kwargs["BW_PAD"]
    kept = [c for c in configs if c.kwargs["BLOCK_K"] >= bw_pad]
    if kept:
        return kept
    import triton
    return [triton.Config({"BLOCK_P": 64, "BLOCK_K": bw_pad}, num_warps=4, num_stages=2)]


@functools.cache
def _kernels(interpret: bool, autotune: bool) -> dict[str, Any]:
    """The launchable kernels for one mode, built once per mode.

    ``triton.jit`` is applied here rather than in kernels.py, so the module can be imported in
    either mode. Autotuning benchmarks on a device, so it is only added when compiling for a GPU
    (and not switched off with SPARSESR_TRITON_AUTOTUNE=0); otherwise the launchers pass a
    fixed config (see ``_fixed_tile``).
    """
    import triton

    from . import kernels

    bsr = triton.jit(kernels.bsr_conv_kernel)
    csr = triton.jit(kernels.csr_conv_kernel)
    if interpret or not autotune:
        return {"bsr": bsr, "csr": csr, "autotuned": False}

    # (BLOCK_P, BLOCK_K, warps, stages); BLOCK_K x BLOCK_P = 64 x 128 already needs ~176
    # registers per thread on sm_90, so larger tiles are left out.
    bsr_configs = [
        triton.Config({"BLOCK_P": p, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for p, k, w, s in [
            (64, 16, 4, 2), (64, 32, 4, 3), (128, 16, 4, 3), (128, 32, 4, 3),
            (128, 32, 8, 3), (256, 16, 8, 3), (256, 32, 8, 3), (128, 64, 8, 3),
        ]
    ]
    csr_configs = [
        triton.Config({"BLOCK_P": p, "BLOCK_NZ": nz}, num_warps=w)
        for p, nz, w in [
            (64, 8, 2), (128, 8, 4), (128, 16, 4), (256, 8, 4), (256, 16, 8), (512, 8, 8),
        ]
    ]
    # Image size and channel counts change the best tile; triton adds the dtypes to the key.
    shape_key = ["C_in", "H", "W", "C_out", "KH", "KW"]
    bsr = triton.autotune(bsr_configs, key=shape_key + ["B_H", "B_W", "INPUT_PRECISION"],
                          prune_configs_by={"early_config_prune": _bsr_prune})(bsr)
    csr = triton.autotune(csr_configs, key=shape_key)(csr)
    return {"bsr": bsr, "csr": csr, "autotuned": True}


def _current_kernels() -> dict[str, Any]:
    _require_available()
    autotune = os.environ.get("SPARSESR_TRITON_AUTOTUNE", "1") != "0"
    return _kernels(_interpreting(), autotune)


def _fixed_tile(pixels: int, interpret: bool) -> int:
    """Pixel tile when not autotuning. tl.dot needs every dimension >= 16. The interpreter pays
    per program rather than per element, so there few, large tiles run fastest."""
    if not interpret:
        return 128
    return min(128, max(16, _next_pow2(pixels)))


# --------------------------------------------------------------------------------------------
# Argument checks


def _check_x(x: torch.Tensor, kh: int, kw: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        found = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be an NCHW tensor (4 dimensions), found {found}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, found {x.dtype}")
    for name, size in (("kh", kh), ("kw", kw)):
        if not isinstance(size, int) or size < 1 or size % 2 == 0:
            raise ValueError(f"{name} must be a positive odd int (padding is {name}//2), "
                             f"found {size!r}")
    if not _interpreting() and x.device.type != "cuda":
        raise ValueError(
            f"x must be on a CUDA device (or set TRITON_INTERPRET=1 before importing triton), "
            f"found device {x.device}"
        )


def _check_tensor(name: str, t: torch.Tensor, x: torch.Tensor, dims: int,
                  dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, found {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimension(s), found shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must be one of {allowed}, found {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on the same device as x ({x.device}), found {t.device}")


def _check_epilogue(bias: torch.Tensor | None, residual: torch.Tensor | None, x: torch.Tensor,
                    out_shape: tuple[int, int, int, int]) -> None:
    if bias is not None:
        _check_tensor("bias", bias, x, 1, FLOAT_DTYPES)
        if bias.numel() != out_shape[1]:
            raise ValueError(f"bias must have {out_shape[1]} entries (one per output channel), "
                             f"found {bias.numel()}")
    if residual is not None:
        _check_tensor("residual", residual, x, 4, FLOAT_DTYPES)
        if tuple(residual.shape) != out_shape:
            raise ValueError(f"residual must have the output's shape {out_shape}, "
                             f"found {tuple(residual.shape)}")


def _slope_tensor(negative_slope: float | torch.Tensor | None, relu: bool, x: torch.Tensor,
                  out_channels: int) -> tuple[torch.Tensor | None, int]:
    """(slopes on x's device, SLOPE flag): 0 none, 1 one shared slope, 2 one per output channel."""
    if negative_slope is None:
        return None, 0
    if relu:
        raise ValueError("relu=True and negative_slope are exclusive (ReLU is a slope of 0)")
    if isinstance(negative_slope, torch.Tensor):
        _check_tensor("negative_slope", negative_slope, x, 1, FLOAT_DTYPES)
        if negative_slope.numel() not in (1, out_channels):
            raise ValueError(f"negative_slope must have 1 or {out_channels} entries (one per output "
                             f"channel), found {negative_slope.numel()}")
        return negative_slope.contiguous(), 1 if negative_slope.numel() == 1 else 2
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise ValueError(f"negative_slope must be a float or a tensor, found {type(negative_slope).__name__}")
    return torch.tensor([float(negative_slope)], device=x.device), 1


def _check_sizes(x: torch.Tensor, out_channels: int) -> None:
    # The batch is grid axis 1 (at most 65535 programs on CUDA); offsets inside one image are
    # computed in int32 (batch offsets in int64).
    n, c_in, h, w = x.shape
    if n > 65535:
        raise ValueError(f"the batch must have at most 65535 images, found {n}")
    if max(c_in, out_channels) * h * w > _INT32_MAX:
        raise ValueError(f"one image must hold fewer than 2**31 elements per tensor, found "
                         f"{max(c_in, out_channels)} channels x {h} x {w}")


# --------------------------------------------------------------------------------------------
# Launchers


def csr_conv2d(
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    kh: int,
    kw: int,
    relu: bool = False,
    residual: torch.Tensor | None = None,
    res_scale: float = 1.0,
    negative_slope: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Stride-1, zero-padded convolution with a CSR weight, plus the fused epilogue
    ``residual + res_scale * act(conv + bias)``: act is ReLU (``relu``), LeakyReLU (a float
    ``negative_slope``), PReLU (a tensor of 1 or C_out slopes) or none.

    ``row_ptr`` [C_out+1], ``col_idx`` [nnz], ``values`` [nnz] describe the weight as a
    ``[C_out, C_in*kh*kw]`` matrix (column ``(c_in*kh + ky)*kw + kx``). Returns
    ``[N, C_out, H, W]`` in x's dtype; accumulation is fp32.
    """
    _check_x(x, kh, kw)
    _check_tensor("row_ptr", row_ptr, x, 1, INDEX_DTYPES)
    _check_tensor("col_idx", col_idx, x, 1, INDEX_DTYPES)
    _check_tensor("values", values, x, 1, FLOAT_DTYPES)
    if row_ptr.numel() < 2:
        raise ValueError(f"row_ptr must have C_out+1 >= 2 entries, found {row_ptr.numel()}")
    if col_idx.numel() != values.numel():
        raise ValueError(f"col_idx and values must have the same length (nnz), found "
                         f"{col_idx.numel()} and {values.numel()}")
    n, c_in, h, w = x.shape
    c_out = row_ptr.numel() - 1
    out_shape = (n, c_out, h, w)
    _check_epilogue(bias, residual, x, out_shape)
    slope, slope_flag = _slope_tensor(negative_slope, relu, x, c_out)
    _check_sizes(x, c_out)

    out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    kernels = _current_kernels()
    args = (
        x, row_ptr.contiguous(), col_idx.contiguous(), values.contiguous(),
        bias.contiguous() if bias is not None else x,  # dummy pointer, never read
        slope if slope is not None else x,  # dummy pointer, never read
        residual if residual is not None else x,  # dummy pointer, never read
        out, c_in, h, w, c_out, col_idx.numel(), float(res_scale),
    )
    flags = dict(KH=kh, KW=kw, HAS_BIAS=bias is not None, RELU=bool(relu), SLOPE=slope_flag,
                 HAS_RESIDUAL=residual is not None)

    def grid(meta: dict) -> tuple[int, int]:
        return (c_out * _cdiv(h * w, meta["BLOCK_P"]), n)

    if kernels["autotuned"]:
        kernels["csr"][grid](*args, **flags)
    else:
        interpret = _interpreting()
        config = {"BLOCK_P": _fixed_tile(h * w, interpret), "BLOCK_NZ": 32 if interpret else 8}
        kernels["csr"][grid(config)](*args, **flags, **config)
    return out


def bsr_conv2d(
    x: torch.Tensor,
    block_row_ptr: torch.Tensor,
    block_col_idx: torch.Tensor,
    block_values: torch.Tensor,
    out_channels: int,
    bias: torch.Tensor | None,
    kh: int,
    kw: int,
    relu: bool = False,
    residual: torch.Tensor | None = None,
    res_scale: float = 1.0,
    allow_tf32: bool = False,
    negative_slope: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Stride-1, zero-padded convolution with a BSR weight, plus the fused epilogue (as
    ``csr_conv2d``'s: ReLU, LeakyReLU or PReLU, residual).

    ``block_values`` is [nnz_blocks, b_h, b_w]; ``block_row_ptr`` has ceil(out_channels/b_h)+1
    entries; ``block_col_idx`` holds block-column indices (column // b_w). Padding entries of
    edge blocks are ignored. fp16/bf16 use tensor cores; fp32 uses them as TF32 only when
    ``allow_tf32`` is set (ignored by the interpreter). Returns ``[N, out_channels, H, W]``
    in x's dtype; accumulation is fp32.
    """
    _check_x(x, kh, kw)
    _check_tensor("block_row_ptr", block_row_ptr, x, 1, INDEX_DTYPES)
    _check_tensor("block_col_idx", block_col_idx, x, 1, INDEX_DTYPES)
    _check_tensor("block_values", block_values, x, 3, FLOAT_DTYPES)
    if not isinstance(out_channels, int) or out_channels < 1:
        raise ValueError(f"out_channels must be a positive int, found {out_channels!r}")
    n_blocks, b_h, b_w = block_values.shape
    if b_h < 1 or b_w < 1:
        raise ValueError(f"block_values must be [nnz_blocks, b_h, b_w] with b_h, b_w >= 1, "
                         f"found shape {tuple(block_values.shape)}")
    n_block_rows = _cdiv(out_channels, b_h)
    if block_row_ptr.numel() != n_block_rows + 1:
        raise ValueError(f"block_row_ptr must have ceil({out_channels}/{b_h})+1 = "
                         f"{n_block_rows + 1} entries, found {block_row_ptr.numel()}")
    if block_col_idx.numel() != n_blocks:
        raise ValueError(f"block_col_idx must have one entry per block ({n_blocks}), "
                         f"found {block_col_idx.numel()}")
    n, c_in, h, w = x.shape
    out_shape = (n, out_channels, h, w)
    _check_epilogue(bias, residual, x, out_shape)
    slope, slope_flag = _slope_tensor(negative_slope, relu, x, out_channels)
    _check_sizes(x, out_channels)

    out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    interpret = _interpreting()
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    kernels = _current_kernels()
    args = (
        x, block_row_ptr.contiguous(), block_col_idx.contiguous(), block_values.contiguous(),
        bias.contiguous() if bias is not None else x,  # dummy pointer, never read
        slope if slope is not None else x,  # dummy pointer, never read
        residual if residual is not None else x,  # dummy pointer, never read
        out, c_in, h, w, out_channels, n_blocks, float(res_scale),
    )
    bw_pad = _next_pow2(b_w)
    flags = dict(
        KH=kh, KW=kw, B_H=b_h, B_W=b_w,
        HAS_BIAS=bias is not None, RELU=bool(relu), SLOPE=slope_flag, HAS_RESIDUAL=residual is not None,
        # The interpreter cannot tl.dot bf16 operands (triton-lang/triton#11584).
        DOT_IN_FP32=interpret and x.dtype == torch.bfloat16,
        INPUT_PRECISION="tf32" if allow_tf32 and x.dtype == torch.float32 else "ieee",
        BLOCK_CO=max(16, _next_pow2(b_h)), BW_PAD=bw_pad,
    )

    def grid(meta: dict) -> tuple[int, int]:
        return (n_block_rows * _cdiv(h * w, meta["BLOCK_P"]), n)

    if kernels["autotuned"]:
        kernels["bsr"][grid](*args, **flags)
    else:
        config = {"BLOCK_P": _fixed_tile(h * w, interpret), "BLOCK_K": max(16, bw_pad)}
        kernels["bsr"][grid(config)](*args, **flags, **config)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
