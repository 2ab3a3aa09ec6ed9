"""``SparseConv2d``: a conv layer that keeps its weight in the file's layout and picks a kernel per call.

Dispatch (``backend="auto"``), decided on every call from the input:
- CUDA input and Triton available -> the Triton kernel for the layout (csr / bsr); a layer stored
  dense runs dense (cuDNN);
- CPU input and the compiled CPU kernel available -> that kernel where its measured crossover
  (``should_use_sparse``) says it beats dense at this image size, else dense. This holds for layers
  stored dense too: oneDNN is slow on convs with few output channels (EDSR's last conv, 64 -> 3),
  where the kernel's direct convolution wins;
- anything else -> dense: ``torch.conv2d`` on the densified weight (always correct).
A forced backend (``"triton"``, ``"cpu"``, ``"dense"``) skips the choice; ``"triton"`` runs the
layers stored dense with torch. Every path computes
the same fused epilogue: ``y = conv(x) + bias``, the activation if set (ReLU, LeakyReLU or PReLU:
see ``fuse_activation``), then ``residual + res_scale*y``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsesr.format.reader import ConvLayer
from sparsesr.runtime import backends


_VALUES_BUFFER = {"dense": "weight", "csr": "values", "bsr": "block_values"}


class SparseConv2d(nn.Module):
    """Stride-1, zero-padded conv whose weight is stored dense, CSR or BSR (docs/format.md)."""

    def __init__(self, layer: ConvLayer, bias: torch.Tensor | None, relu: bool = False, backend: str = "auto") -> None:
        super().__init__()
        self.name = layer.name
        self.layout = layer.layout
        self.out_channels, self.in_channels, self.kh, self.kw = layer.shape
        self.block = layer.block
        self.relu = relu
        # Other activations fused into the epilogue (fuse_activation): LeakyReLU's slope, or
        # PReLU's slopes (1 or C_out of them, a buffer so that .to(device) moves them).
        self.leaky_slope: float | None = None
        self.register_buffer("prelu_weight", None)
        self.shuffle = 1  # > 1: the output is pixel-shuffled (an upsampler's conv + nn.PixelShuffle)
        self.backend = backend
        # Values are kept in fp32 for computing (the file may store fp16/bf16); .half() etc. work as usual.
        for key, tensor in layer.tensors.items():
            self.register_buffer(key, tensor.float() if tensor.is_floating_point() else tensor.contiguous())
        self.register_buffer("bias", None if bias is None else bias.float())
        self.last_path: str | None = None
        self.last_reason = "not run yet"
        self._dense_cache: tuple[tuple, torch.Tensor] | None = None
        self._cpu_cache: tuple[tuple, object] | None = None
        self._cpu_faster: dict[tuple[int, int], bool] = {}  # (H, W) -> CPU kernel beats dense

    def extra_repr(self) -> str:
        block = f", block={self.block}" if self.block else ""
        shuffle = f", shuffle={self.shuffle}" if self.shuffle > 1 else ""
        act = (f", leaky_relu={self.leaky_slope}" if self.leaky_slope is not None else
               f", prelu={self.prelu_weight.numel()}" if self.prelu_weight is not None else f", relu={self.relu}")
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=({self.kh}, {self.kw}), "
                f"layout={self.layout}{block}{act}{shuffle}, backend={self.backend}")

    def fuse_activation(self, module: nn.Module) -> bool:
        """Take ``module`` (the activation right after this conv) into the epilogue.

        ReLU, LeakyReLU and PReLU (one slope or one per output channel) are fused; returns False,
        changing nothing, for anything else or when an activation is already fused.
        """
        if self.relu or self.leaky_slope is not None or self.prelu_weight is not None:
            return False
        if isinstance(module, nn.ReLU):
            self.relu = True
        elif isinstance(module, nn.LeakyReLU):
            self.leaky_slope = float(module.negative_slope)
        elif isinstance(module, nn.PReLU) and module.weight.numel() in (1, self.out_channels):
            self.prelu_weight = module.weight.detach().float().reshape(-1).clone()
        else:
            return False
        return True

    @property
    def negative_slope(self) -> float | torch.Tensor | None:
        """The fused LeakyReLU / PReLU slope(s), or None (no activation, or ReLU)."""
        return self.prelu_weight if self.prelu_weight is not None else self.leaky_slope

    def scale_values(self, factor: float) -> None:
        """Multiply the weight by ``factor`` (a new tensor: the old one may be shared) and drop the
        kernels' prepared copies of it."""
        name = _VALUES_BUFFER[self.layout]
        setattr(self, name, getattr(self, name) * factor)
        self._dense_cache = self._cpu_cache = None

    def store_dense(self) -> None:
        """Keep the weight as a dense tensor (layout "dense"), dropping the sparse one and the
        kernels' prepared copies: for a copy that only runs dense convs (the bf16 CPU path)."""
        if self.layout != "dense":
            weight = self.dense_weight(self._values.dtype).clone()
            for name, _ in list(self.named_buffers(recurse=False)):
                if name not in ("bias", "prelu_weight"):
                    delattr(self, name)
            self.register_buffer("weight", weight)
            self.layout, self.block = "dense", None
        self._dense_cache = self._cpu_cache = None
        self._cpu_faster = {}

    @property
    def _values(self) -> torch.Tensor:
        """The float tensor of the weight (dense weight, CSR values or BSR block values)."""
        return getattr(self, _VALUES_BUFFER[self.layout])

    def output_shape(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        n, _, h, w = x.shape
        s = self.shuffle
        return n, self.out_channels // (s * s), h * s, w * s

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, res_scale: float = 1.0,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """``out``: where the CPU kernel path writes (a float32 contiguous tensor of ``output_shape(x)``
        kept by the caller across calls); the other paths ignore it. Use the returned tensor."""
        if self.shuffle > 1 and residual is not None:
            raise ValueError(f"{self.name}: a pixel-shuffled conv takes no residual")
        if residual is not None and (residual.shape != (x.shape[0], self.out_channels, *x.shape[2:])
                                     or residual.dtype != x.dtype):
            # The kernels add a residual of the output's shape and dtype only; any other (one that
            # broadcasts, or promotes) is added after the conv, as the unfused network would.
            return residual.add(self.forward(x), alpha=res_scale)
        path, reason = self._choose_path(x)
        if path == "cpu":  # the kernel stores the shuffled layout directly: no extra pass over memory
            cpu = backends.kernel("cpu")
            y = cpu.conv2d(x, self._cpu_prepared(), bias=self.bias, relu=self.relu, residual=residual,
                           res_scale=res_scale, shuffle=self.shuffle, negative_slope=self.negative_slope, out=out)
        else:
            run = self._run_triton if path == "triton" else self._run_dense
            y = run(x, residual, res_scale)
            if self.shuffle > 1:
                y = F.pixel_shuffle(y, self.shuffle)
        self.last_path, self.last_reason = path, reason
        return y

    # --- dispatch ----------------------------------------------------------------------------

    def path_for(self, x: torch.Tensor) -> str:
        """The path ``forward(x)`` takes: "cpu" (the only one that writes into ``out``), "triton" or "dense"."""
        return self._choose_path(x)[0]

    def _choose_path(self, x: torch.Tensor) -> tuple[str, str]:
        device = x.device.type
        if self.layout == "dense" and (self.backend == "triton" or device == "cuda"):
            return "dense", "stored dense in the file"
        if self.backend != "auto":
            return self.backend, f"backend={self.backend} requested"
        if device == "cuda":
            reason = backends.unavailable_reason("triton")
            return ("triton", "CUDA input, Triton kernel") if reason is None else ("dense", f"Triton unavailable: {reason}")
        if device == "cpu":
            reason = backends.unavailable_reason("cpu")
            if reason is not None:
                return "dense", f"CPU kernel unavailable: {reason}"
            if x.dtype != torch.float32:
                return "dense", f"CPU kernel computes in float32, input is {str(x.dtype).removeprefix('torch.')}"
            h, w = x.shape[-2:]
            if (h, w) not in self._cpu_faster:  # the kernel caches too; this skips its key building
                self._cpu_faster[(h, w)] = bool(backends.kernel("cpu").should_use_sparse(self._cpu_prepared(), h, w))
            if self._cpu_faster[(h, w)]:
                return "cpu", f"CPU kernel measured faster than dense at {h}x{w}"
            return "dense", f"dense measured faster than the CPU kernel at {h}x{w}"
        return "dense", f"no sparse kernel for device {device!r}"

    # --- the three paths -----------------------------------------------------------------------

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``[C_out, C_in, kh, kw]`` weight, densified once per device/dtype and cached."""
        from sparsesr.format import layouts

        values = self._values
        dtype = dtype or values.dtype
        if self.layout == "dense":
            return self.weight.to(dtype)
        key = (values.data_ptr(), values.device, dtype)
        if self._dense_cache is None or self._dense_cache[0] != key:
            shape = (self.out_channels, self.in_channels, self.kh, self.kw)
            if self.layout == "csr":
                dense = layouts.csr_to_dense(self.row_ptr.cpu(), self.col_idx.cpu(), self.values.cpu(), shape)
            else:
                dense = layouts.bsr_to_dense(self.block_row_ptr.cpu(), self.block_col_idx.cpu(),
                                             self.block_values.cpu(), shape)
            self._dense_cache = (key, dense.to(device=values.device, dtype=dtype))
        return self._dense_cache[1]

    def _run_dense(self, x: torch.Tensor, residual: torch.Tensor | None, res_scale: float) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.conv2d(x, self.dense_weight(x.dtype), bias, padding=(self.kh // 2, self.kw // 2))
        if self.relu:
            y = F.relu(y)
        elif self.prelu_weight is not None:
            y = F.prelu(y, self.prelu_weight.to(x.dtype))
        elif self.leaky_slope is not None:
            y = F.leaky_relu(y, self.leaky_slope)
        if residual is not None:
            y = residual.add(y, alpha=res_scale)
        return y

    def _run_triton(self, x: torch.Tensor, residual: torch.Tensor | None, res_scale: float) -> torch.Tensor:
        triton = backends.kernel("triton")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        epilogue = dict(relu=self.relu, residual=residual, res_scale=res_scale, negative_slope=self.negative_slope)
        if self.layout == "csr":
            return triton.csr_conv2d(x, self.row_ptr, self.col_idx, self.values.to(x.dtype), bias,
                                     self.kh, self.kw, **epilogue)
        return triton.bsr_conv2d(x, self.block_row_ptr, self.block_col_idx, self.block_values.to(x.dtype),
                                 self.out_channels, bias, self.kh, self.kw, **epilogue)

    def _cpu_prepared(self) -> object:
        """The CPU kernel's packed form of the weight, prepared once (per values tensor)."""
        values = self._values
        key = (values.data_ptr(), values.dtype)
        if self._cpu_cache is None or self._cpu_cache[0] != key:
            cpu = backends.kernel("cpu")
            if self.layout == "dense":
                prepared = cpu.prepare_dense(self.weight.float())
            elif self.layout == "csr":
                prepared = cpu.prepare_csr(self.row_ptr, self.col_idx, self.values.float(),
                                           self.in_channels, self.kh, self.kw)
            else:
                prepared = cpu.prepare_bsr(self.block_row_ptr, self.block_col_idx, self.block_values.float(),
                                           self.out_channels, self.in_channels, self.kh, self.kw)
            self._cpu_cache = (key, prepared)
        return self._cpu_cache[1]

    def report(self) -> dict:
        return {"name": self.name, "layout": self.layout, "block": list(self.block) if self.block else None,
                "backend": self.backend, "path": self.last_path, "reason": self.last_reason}
