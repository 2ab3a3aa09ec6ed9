"""sparsesr: dynamic unstructured pruning for super-resolution, and sparse kernels to run it."""
from __future__ import annotations

__version__ = "0.1.0"


def load(path, device: str = "auto", backend: str = "auto"):
    """Load an exported sparse model file (or a checkpoint) for inference; see ``sparsesr.runtime.load``."""
    from sparsesr.runtime import load as _load

    return _load(path, device=device, backend=backend)
