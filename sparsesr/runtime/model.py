"""Assemble a runnable network from an exported file: any family, with ``SparseConv2d`` convs.

EDSR files get ``SparseEDSR`` (hand-fused residual blocks, mean shifts folded into the first and
last convs); every other family gets ``SparseModel`` (``sparsify``: fusions found by tracing).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from sparsesr.format import SparseModelFile, export_bytes, is_sparse_model_file, parse_bytes, read_file
from sparsesr.models.edsr import EDSR, ResBlock
from sparsesr.models.registry import family_of, get_family
from sparsesr.runtime import backends
from sparsesr.runtime.conv import SparseConv2d
from sparsesr.runtime.kept import KeptOutputs
from sparsesr.runtime.sparsify import sparsify


class RuntimeModel(nn.Module):
    """What callers (upscaling, eval, bench) need to know of a runtime model, whatever its family.

    Subclasses set ``config`` (the family's config) and ``model_file_source`` (where it came from).
    """

    config: object
    model_file_source: str

    @property
    def family(self) -> str:
        return family_of(self.config).name

    @property
    def scale(self) -> int:
        return int(self.config.scale)

    @property
    def n_colors(self) -> int:
        return int(self.config.n_colors)

    @property
    def n_feats(self) -> int:
        """The widest feature map a conv reads, in channels (memory estimates for tiling): the
        trunk's ``n_feats``, more where features are concatenated (RRDBNet's dense blocks)."""
        widths = [m.in_channels for m in self.modules() if isinstance(m, (SparseConv2d, nn.Conv2d))]
        return max([int(self.config.n_feats), *widths])

    def sparse_convs(self) -> list[SparseConv2d]:
        return [m for m in self.modules() if isinstance(m, SparseConv2d)]

    def set_backend(self, backend: str) -> None:
        """Force every layer to ``backend`` ("auto", "triton", "cpu" or "dense")."""
        device = next(iter(self.buffers())).device.type
        backends.check_backend(backend, device)
        for conv in self.sparse_convs():
            conv.backend = backend

    def backend_report(self) -> dict:
        """Per layer: layout, requested backend, the path its last call took and why; kernel availability."""
        return {"layers": [conv.report() for conv in self.sparse_convs()], "kernels": backends.report()}

    def release_buffers(self) -> int:
        """Free the activation buffers kept across forwards (every ``KeptOutputs`` of the model);
        returns the bytes released. The next forward allocates them again. For a long-lived model
        (such as the engine ``sparsesr.upscale`` caches) after a large image: a 1024² tile of the
        64-channel ``x2`` keeps about 2 GiB."""
        return sum(m.release() for m in self.modules() if isinstance(m, KeptOutputs))


class FusedResBlock(nn.Module):
    """EDSR's residual block with its ReLU and residual add fused into the convs' epilogues.

    ``body`` keeps the original indices (0 = first conv, now with the ReLU fused; 1 = where the
    ReLU was; 2 = second conv, adding ``x + res_scale * y``), so layer names match the file.
    """

    def __init__(self, conv1: SparseConv2d, conv2: SparseConv2d, res_scale: float) -> None:
        super().__init__()
        conv1.relu = True
        self.body = nn.Sequential(conv1, nn.Identity(), conv2)
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body[2](self.body[0](x), residual=x, res_scale=self.res_scale)


class SparseEDSR(RuntimeModel, EDSR):
    """EDSR whose convs are ``SparseConv2d``, built from a validated ``SparseModelFile`` of an EDSR."""

    def __init__(self, model_file: SparseModelFile, backend: str = "auto") -> None:
        with torch.device("meta"):  # the dense layers built here are replaced right away
            super().__init__(model_file.config)
        tensors = model_file.tensors
        for name, layer in model_file.layers.items():
            parent_name, _, child = name.rpartition(".")
            conv = SparseConv2d(layer, tensors.get(f"{name}.bias"), backend=backend)
            setattr(self.get_submodule(parent_name), child, conv)
        for i, block in enumerate(self.body):
            if isinstance(block, ResBlock):
                self.body[i] = FusedResBlock(block.body[0], block.body[2], block.res_scale)
        for sequence in self.tail.modules():  # upsampler: conv + PixelShuffle -> one shuffled conv
            if isinstance(sequence, nn.Sequential):
                for i in range(len(sequence) - 1):
                    conv, shuffle = sequence[i], sequence[i + 1]
                    if isinstance(conv, SparseConv2d) and isinstance(shuffle, nn.PixelShuffle):
                        conv.shuffle = shuffle.upscale_factor
                        sequence[i + 1] = nn.Identity()  # keeps the names of the layers after it
        for module_name, module in self.named_modules():  # mean shifts: plain buffers from the file
            if not isinstance(module, SparseConv2d):
                for buffer_name, _ in list(module.named_buffers(recurse=False)):
                    setattr(module, buffer_name, tensors[f"{module_name}.{buffer_name}"].clone())
        self.model_file_source = model_file.source
        self._kept_outputs = KeptOutputs()  # slots: "head", "mid", "turn0/1", the upsampler's conv names
        self._fold_mean_shifts()

    def _fold_mean_shifts(self) -> None:
        """Fold the mean shifts and the ``rgb_range`` scalings into the first and last convs.

        EDSR computes ``add_mean(tail(...)) / R`` at the output size: two extra passes over the
        largest tensor of the network. ``add_mean`` is ``z + R m`` (an identity 1x1 conv plus a
        bias), so the last conv takes ``W / R`` and ``(b + R m) / R``: the same result, no pass.
        At the input, ``head(sub_mean(R x)) = head(R (x - m))``; scaling the head's weights by R
        and feeding ``x - m`` keeps the zero padding where it was (the padded zeros of ``x - m``
        are the padded zeros of ``R (x - m)``), so borders are unchanged too. Only for identity
        mean shifts (every EDSR file); anything else keeps the plain path.
        """
        eye = torch.eye(self.config.n_colors).view_as(self.sub_mean.weight)
        if not (torch.equal(self.sub_mean.weight, eye) and torch.equal(self.add_mean.weight, eye)):
            self._input_shift = None
            return
        r = float(self.config.rgb_range)
        head, last = self.head[0], self.tail[-1]
        # New tensors, not in-place: the buffers may share memory with the SparseModelFile's.
        head.scale_values(r)
        last.scale_values(1.0 / r)
        last.bias = (last.bias + self.add_mean.bias) / r if last.bias is not None else self.add_mean.bias / r
        # sub_mean's bias is -R m, so the input shift is m
        self.register_buffer("_input_shift", (self.sub_mean.bias / -r).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._input_shift is None:
            return super().forward(x)
        # Every activation but the output goes into a kept buffer (see KeptOutputs): the head's
        # output (the body's long skip), one for the blocks' middle activation, two that the blocks
        # write in turn (each reading the other's), and the upsampler's. They are only read later
        # in this forward. A path that ignores `out` returns a new tensor.
        kept, head = self._kept_outputs, self.head[0]
        skip = head(x - self._input_shift, out=kept(head, x, "head"))
        y, turn = skip, 0
        for block in self.body[:-1]:
            if isinstance(block, FusedResBlock):
                conv1, conv2 = block.body[0], block.body[2]
                mid = conv1(y, out=kept(conv1, y, "mid"))
                y = conv2(mid, residual=y, res_scale=block.res_scale, out=kept(conv2, mid, f"turn{turn}"))
                turn ^= 1
            else:
                y = block(y)
        # the body's long skip (skip + body(skip)) as the residual of its last conv's epilogue
        last = self.body[-1]
        y = last(y, residual=skip, out=kept(last, y, f"turn{turn}"))
        for module in self.tail[0]:  # the upsampler
            y = module(y, out=kept(module, y, module.name)) if isinstance(module, SparseConv2d) else module(y)
        return self.tail[1](y)  # a new tensor: the caller's to keep


class SparseModel(RuntimeModel):
    """Any family's network with ``SparseConv2d`` convs and traced fusions (``sparsify``)."""

    def __init__(self, model_file: SparseModelFile, backend: str = "auto") -> None:
        super().__init__()
        self.config = model_file.config
        with torch.device("meta"):  # every tensor comes from the file: nothing to allocate here
            network = get_family(model_file.family).build(model_file.config)
        self.net = sparsify(network, model_file, backend)
        self.model_file_source = model_file.source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load(path: str | os.PathLike | SparseModelFile, device: str = "auto", backend: str = "auto") -> RuntimeModel:
    """Load an exported sparsesr file (or a plain checkpoint, exported in memory) for inference.

    ``path``: an exported file, a checkpoint, an embedded model name (``x2``, ``x4``, ``fast``;
    an existing file of that name wins) or a ``SparseModelFile``.
    ``device``: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N" (else ``BackendError``).
    ``backend``: "auto" picks per layer and per call (see ``SparseConv2d``); "triton", "cpu" or
    "dense" force one path and raise ``BackendError`` if it cannot run here.
    Returns the model in eval mode: a ``SparseEDSR`` for EDSR files, a ``SparseModel`` for the other
    families. Invalid files raise ``SparseFormatError`` / ``CheckpointError``.
    """
    from sparsesr.pretrained import resolve_model

    device = backends.resolve_device(device)
    backends.check_backend(backend, device.type)
    if isinstance(path, SparseModelFile):
        model_file = path
    else:
        path = resolve_model(path)
        if is_sparse_model_file(path):
            model_file = read_file(path)
        else:  # a dense or pruned checkpoint: export it in memory, keeping the auto layouts
            model_file = parse_bytes(export_bytes(path, dtype="fp32", layout="auto"), source=str(path))
    runtime_model = SparseEDSR if model_file.family == "edsr" else SparseModel
    return runtime_model(model_file, backend=backend).to(device).eval()
