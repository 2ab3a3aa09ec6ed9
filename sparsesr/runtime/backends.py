"""Which sparse kernels can run here, and why not when they cannot.

The kernel packages are optional (the C extension may not have been built, triton may be missing
or have no GPU), so they are imported defensively: any failure makes that backend unavailable,
with the reason kept for ``backend_report()`` and ``sparsesr info --runtime``. ``resolve_device``
turns every ``--device`` / ``device=`` string of the package into a torch device.
"""
from __future__ import annotations

import functools
import os
import re
from types import ModuleType

import torch

from sparsesr.errors import BackendError

BACKENDS = ("auto", "triton", "cpu", "dense")


@functools.cache
def _import(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        module = __import__(f"sparsesr.kernels.{name}", fromlist=["available"])
    except Exception as exc:  # noqa: BLE001 - a broken optional kernel must not break loading
        return None, f"cannot import sparsesr.kernels.{name} ({type(exc).__name__}: {exc})"
    if not hasattr(module, "available"):
        return None, f"sparsesr.kernels.{name} has no available() (not implemented yet)"
    return module, None


def kernel(name: str) -> ModuleType | None:
    """The kernel module ``"cpu"`` or ``"triton"`` if it can run here, else None."""
    module, _ = _import(name)
    return module if module is not None and module.available() else None


def unavailable_reason(name: str) -> str | None:
    """Why kernel ``name`` cannot run here, or None when it can."""
    module, reason = _import(name)
    if module is None:
        return reason
    if module.available():
        return None
    explain = getattr(module, "unavailable_reason", None)
    return (explain() if explain else None) or "available() is false"


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch device for a ``--device`` value: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    ``auto`` is CUDA when a GPU is visible (under torchrun, rank ``LOCAL_RANK``'s own GPU), else
    the CPU. Anything else, CUDA without a GPU, or ``cuda:N`` past the last GPU raises
    ``BackendError``, before torch sees the string (its own errors are tracebacks).
    """
    text = str(name).strip().lower()
    if text == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local_rank = os.environ.get("LOCAL_RANK", "")
        return torch.device("cuda", (int(local_rank) if local_rank.isdigit() else 0) % torch.cuda.device_count())
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d{1,6}))?", text)
    if match is None:
        raise BackendError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise BackendError(f"--device {name}: no CUDA GPU is available here; use --device cpu or auto")
    if match[1] is None:
        return torch.device("cuda")
    index, count = int(match[1]), torch.cuda.device_count()
    if index >= count:
        raise BackendError(f"--device {name}: there is no CUDA device {index}; this machine has cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def check_backend(backend: str, device_type: str) -> None:
    """Raise ``BackendError`` if ``backend`` was forced but cannot run on ``device_type``."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend in ("triton", "cpu") and (reason := unavailable_reason(backend)):
        raise BackendError(f"backend {backend!r} was requested but is unavailable: {reason}")
    if backend == "cpu" and device_type != "cpu":
        raise BackendError(f"backend 'cpu' runs on the CPU, but the model is placed on {device_type!r}")


def report() -> dict[str, dict]:
    """Availability of each kernel, for ``backend_report()``."""
    out = {}
    for name in ("cpu", "triton"):
        reason = unavailable_reason(name)
        entry = {"available": reason is None, "reason": reason}
        module = kernel(name)
        if name == "cpu" and module is not None and hasattr(module, "isa"):
            entry["isa"] = module.isa()
        out[name] = entry
    return out
