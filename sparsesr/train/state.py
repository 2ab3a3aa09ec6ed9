"""The resumable training state ``state.pt``: written with a checksum, checked before use.

The file is one header line, ``sparsesr-train-state v2 sha256=<hex>\n``, followed by the
``torch.save`` bytes of the state; the digest covers every byte after the header, so any
change (a flipped bit, a truncated copy) is caught before a single value is used. The state is
read with ``torch.load(weights_only=True)``: never arbitrary unpickling.

States written before checksums existed (a plain ``torch.save`` of the state dict) are still
read; ``load_train_state`` says they were not verified, and the structure and finiteness checks
apply to them as to any other.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from sparsesr.errors import CheckpointError
from sparsesr.fileio import atomic_write_bytes

STATE_FORMAT = "sparsesr-train-state"
STATE_VERSION = 2  # 1: the unversioned, unchecked state of earlier releases
_HEADER = re.compile(rb"sparsesr-train-state v(\d+) sha256=([0-9a-f]{64})")
STATE_KEYS = ("step", "best_psnr", "model", "optimizer", "scheduler", "ema", "pruner")


def save_train_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` (see ``STATE_KEYS``) to ``path`` atomically, with the SHA-256 of its bytes.

    Refuses (``CheckpointError``) a state whose weights or optimizer moments are not finite:
    resuming from it could only continue a diverged run.
    """
    check_state(state, Path(path))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = f"{STATE_FORMAT} v{STATE_VERSION} sha256={hashlib.sha256(payload).hexdigest()}\n".encode()
    atomic_write_bytes(path, header + payload)


def load_train_state(path: str | os.PathLike) -> tuple[dict[str, Any], bool]:
    """Read and check a training state; return ``(state, verified)``.

    ``verified`` is False for a state written before checksums (accepted, not verifiable).
    Every problem (unreadable, truncated, empty, checksum mismatch, wrong structure, bad
    step, non-finite values) is one ``CheckpointError`` naming the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the training state ({exc.strerror or exc})") from None
    if not data:
        raise CheckpointError(f"{path}: the training state is empty (0 bytes)")
    if data.startswith(STATE_FORMAT.encode()):
        end = data.find(b"\n", 0, 200)
        match = _HEADER.fullmatch(data[:end]) if end > 0 else None
        if match is None:
            raise CheckpointError(f"{path}: damaged training state header")
        version = int(match[1])
        if version != STATE_VERSION:
            newer = "written by a newer sparsesr" if version > STATE_VERSION else "not supported"
            raise CheckpointError(f"{path}: training state version {version} is {newer}")
        payload, recorded = data[end + 1:], match[2].decode()
        actual = hashlib.sha256(payload).hexdigest()
        if actual != recorded:
            raise CheckpointError(f"{path}: checksum mismatch, the training state is corrupt or truncated "
                                  f"(its bytes hash to {actual[:16]}..., the header records {recorded[:16]}...)")
        state, verified = _torch_load(payload, path), True
    else:
        state, verified = _torch_load(data, path), False  # a plain torch.save from before checksums
    check_state(state, path)
    return state, verified


def check_state(state: Any, path: Path) -> None:
    """Raise ``CheckpointError`` unless ``state`` has the structure the training loop saves and finite values."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a sparsesr training state (a {type(state).__name__}, expected a dict)")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a sparsesr training state (missing {', '.join(missing)})")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: bad step {step!r} in the training state (expected an integer >= 0)")
    best = state["best_psnr"]
    if isinstance(best, bool) or not isinstance(best, (int, float)) or math.isnan(best):
        raise CheckpointError(f"{path}: bad best_psnr {best!r} in the training state")
    for key in ("model", "ema"):
        if key == "model" or state[key] is not None:
            _tensor_dict(state[key], f"{key} weights", path)
    optimizer = state["optimizer"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        raise CheckpointError(f"{path}: bad optimizer state in the training state")
    for moments in optimizer["state"].values():
        if not isinstance(moments, dict):
            raise CheckpointError(f"{path}: bad optimizer state in the training state")
        _check_finite({k: v for k, v in moments.items() if isinstance(v, torch.Tensor)}, "optimizer state", path)
    scheduler = state["scheduler"]
    last_epoch = scheduler.get("last_epoch") if isinstance(scheduler, dict) else None
    if isinstance(last_epoch, bool) or not isinstance(last_epoch, int):
        raise CheckpointError(f"{path}: bad learning-rate schedule in the training state")
    if last_epoch != step:  # the schedule advances once per step: anything else is not one consistent state
        raise CheckpointError(f"{path}: inconsistent training state: step {step}, but the schedule is at step {last_epoch}")
    pruner = state["pruner"]
    if pruner is not None:
        if not isinstance(pruner, dict):
            raise CheckpointError(f"{path}: bad pruning state in the training state")
        _tensor_dict(pruner.get("masks"), "pruning masks", path)
        if pruner.get("step") != step:
            raise CheckpointError(f"{path}: inconsistent training state: step {step}, "
                                  f"but the pruning masks are from step {pruner.get('step')!r}")


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None."""
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def _tensor_dict(value: Any, what: str, path: Path) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()):
        raise CheckpointError(f"{path}: bad {what} in the training state (expected a dict of tensors)")
    _check_finite(value, what, path)


def _check_finite(tensors: dict[str, torch.Tensor], what: str, path: Path) -> None:
    bad = first_non_finite(tensors)
    if bad is not None:
        raise CheckpointError(f"{path}: non-finite values (NaN or inf) in the {what} ({bad}); the run had diverged")


def _torch_load(data: bytes, path: Path) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for truncated, random or unsafe bytes
        text = str(exc)
        # weights_only refusals open with advice to load unsafely; what went wrong comes later.
        head, marker, tail = text.partition("WeightsUnpickler error:")
        lines = [line.strip() for line in (tail if marker else head).splitlines() if line.strip()]
        reason = (lines or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: not a readable training state ({type(exc).__name__}: {reason})") from None
