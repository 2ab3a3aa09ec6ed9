"""sparsesr: dynamic unstructured pruning for super-resolution, and sparse kernels to run it."""
from __future__ import annotations

__version__ = "0.1.0"
