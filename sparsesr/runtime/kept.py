"""Conv output buffers kept across forwards (``KeptOutputs``), shared by every runtime model.

On the CPU a fresh large tensor is new pages on every call (above glibc's mmap threshold, 32 MiB
at most, freed memory goes back to the system), and the page faults can cost more than the conv
itself: a 64 MiB upsampler output took 27 ms fresh against 7 ms into a kept buffer, and a 1024²
forward of the 64-channel x2 went from 8.4 s to 4.5 s with its activations kept.
"""
from __future__ import annotations

import threading

import torch
from torch import nn

from sparsesr.runtime.conv import SparseConv2d


class KeptOutputs(nn.Module):
    """One buffer per (thread, slot), for convs whose output is only read later in the same forward.

    ``kept(conv, x, slot)`` is the buffer to pass as ``conv(x, out=...)``, or None where the conv's
    path ignores ``out`` (not the CPU kernel; then holding one would waste memory). A buffer grows
    to the largest output seen and smaller ones (edge tiles) use its front. Concurrent forwards from
    other threads get their own. A module (with no parameters) so that traced graphs can call it
    and ``RuntimeModel.release_buffers`` finds every one; ``enabled = False`` turns it off (bench).
    """

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[tuple[int, object], torch.Tensor] = {}
        self.enabled = True

    def forward(self, conv: SparseConv2d, x: torch.Tensor, slot: object) -> torch.Tensor | None:
        if not self.enabled or x.device.type != "cpu" or x.dtype != torch.float32 or conv.path_for(x) != "cpu":
            return None
        shape = conv.output_shape(x)
        numel = shape[0] * shape[1] * shape[2] * shape[3]
        key = (threading.get_ident(), slot)
        kept = self.held.get(key)
        if kept is None or kept.numel() < numel:
            kept = self.held[key] = torch.empty(numel)
        return kept[:numel].view(shape)

    def release(self) -> int:
        """Drop every buffer; returns the bytes they held."""
        released = sum(t.numel() * t.element_size() for t in self.held.values())
        self.held.clear()
        return released

    def __deepcopy__(self, memo: dict) -> "KeptOutputs":
        copy = KeptOutputs()  # a copy (e.g. the half-precision twin) starts empty: nothing to share
        copy.enabled = self.enabled
        return copy

    def extra_repr(self) -> str:
        return f"{len(self.held)} held" if self.held else ""
