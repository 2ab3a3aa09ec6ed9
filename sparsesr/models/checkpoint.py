"""Reading and writing model checkpoints.

sparsesr checkpoints are safetensors files whose ``__metadata__`` holds the architecture family,
preset and config as JSON, so a file is self-describing (files without ``family`` are EDSR).
Native state dicts of every family (``sparsesr.models.registry``: EDSR-PyTorch and BasicSR EDSR,
MSRResNet, ESRGAN / Real-ESRGAN RRDBNet, SRVGGNetCompact) are read too, as ``.pt``/``.pth`` (also
inside BasicSR's ``params`` / ``params_ema`` wrapping; with ``torch.load(weights_only=True)``:
never plain unpickling) or safetensors without our metadata; their family and config are
inferred from the keys and shapes (docs/architectures.md).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsesr.errors import CheckpointError, ConfigError
from sparsesr.fileio import atomic_write_bytes, canonical_safetensors
from sparsesr.models import arch_of, model_from_config
from sparsesr.models.edsr import EDSRConfig
from sparsesr.models.registry import detect_family, family_of, get_family

CHECKPOINT_FORMAT = "sparsesr-checkpoint"
_TORCH_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin"}


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    arch: str
    config: Any  # the family's config (EDSRConfig, MSRResNetConfig, ...)
    metadata: dict = field(default_factory=dict)  # everything else the file said (step, metrics, pruning...)
    family: str = ""  # "edsr", "msrresnet", "rrdbnet", "srvgg"; filled in from the config when left out

    def __post_init__(self) -> None:
        name = family_of(self.config).name
        if self.family and self.family != name:
            raise CheckpointError(f"checkpoint family {self.family!r} does not match its {type(self.config).__name__} ({name!r})")
        self.family = name


def save_checkpoint(path: str | os.PathLike, model: nn.Module, metadata: dict | None = None) -> None:
    """Write ``model``'s weights and config to a safetensors file, atomically.

    ``metadata`` values may be any JSON-serialisable objects; they come back from
    ``load_checkpoint`` as the same objects. The metadata also records ``weights_sha256``
    (``weights_sha256(tensors)``) so a reader can detect changed weights. Non-finite weights
    (NaN, inf) are refused with a ``CheckpointError``: such a model is never worth keeping.
    """
    from safetensors.torch import save

    config = model.config
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: refusing to save non-finite weights ({name} holds NaN or inf)")
    # The digest goes last so that metadata copied from another checkpoint cannot override it.
    meta = {"format": CHECKPOINT_FORMAT, "family": family_of(config).name, "arch": arch_of(config),
            "config": config.to_dict(), **(metadata or {}),
            "weights_sha256": weights_sha256(tensors)}
    # safetensors' save_file creates files readable by the owner only: write the bytes ourselves.
    # Canonical header: the same model and metadata give the same bytes in every process.
    atomic_write_bytes(path, canonical_safetensors(save(tensors, metadata={k: json.dumps(v) for k, v in meta.items()})))


def weights_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors in key order: for each, ``"<key>\\t<dtype>\\t<shape>\\n"`` then its raw bytes.

    Recomputing it over the tensors ``load_checkpoint`` returns checks them against the value
    ``save_checkpoint`` recorded as ``weights_sha256``.
    """
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key].detach().to("cpu")
        # A fresh row-major copy: .contiguous() keeps odd strides of 0-d / 1-element tensors (and
        # of some views), on which .view(uint8) fails. The bytes, so the digest, are the same.
        value = torch.empty(value.shape, dtype=value.dtype).copy_(value)
        digest.update(f"{key}\t{str(value.dtype).removeprefix('torch.')}\t{list(value.shape)}\n".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a sparsesr safetensors checkpoint or a native state dict of any family (.pth, also
    BasicSR-wrapped, or safetensors without our metadata).

    Nothing in the file is trusted: its config (from the metadata, or inferred from the shapes)
    gets the same limits as an exported file's (``sparsesr.format.spec.validated_config``), and
    every tensor the config implies must be present with its shape, no other one, all finite,
    before anything is built. So the network a checkpoint makes is never larger than the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix.lower() in _TORCH_SUFFIXES:
        state_dict, metadata = _read_torch(path), {}
    else:
        state_dict, metadata = _read_safetensors(path)
    if metadata.get("format") == "sparsesr":
        raise CheckpointError(f"{path}: this is an exported sparse model; load it with sparsesr.load()")
    recorded = metadata.get("weights_sha256")  # files written before the digest existed have none
    if recorded is not None and recorded != weights_sha256(state_dict):
        raise CheckpointError(f"{path}: the weights do not match the digest recorded when the file was saved "
                              "(weights_sha256): the file is corrupt or was edited")
    state_dict = _normalise_keys(state_dict)
    renamed = False
    if "config" in metadata:
        # Files written before there were other families say none: they are EDSR.
        config = _validated(metadata["config"], f"{path}: bad config in metadata", metadata.get("family", "edsr"))
    else:
        family, config, detected = detect_family(state_dict, source=str(path))
        config = _validated(config.to_dict(), f"{path}: unsupported architecture (inferred from the shapes)", family.name)
        renamed, state_dict = set(detected) != set(state_dict), detected
    try:
        check_state_dict(config, state_dict, source=str(path))
    except CheckpointError as exc:
        if not renamed:
            raise
        # the keys it names are the module's, not the file's: say so
        raise CheckpointError(f"{exc} (key names as mapped to the {family_of(config).name} module's)") from None
    return Checkpoint(state_dict=state_dict, arch=arch_of(config), config=config, metadata=metadata)


def load_model(path: str | os.PathLike) -> nn.Module:
    """Build the network a checkpoint describes and load its weights (eval mode, CPU)."""
    ckpt = load_checkpoint(path)
    model = model_from_config(ckpt.config)
    load_state_dict_strict(model, ckpt.state_dict, source=str(path))
    return model.eval()


def check_state_dict(config: Any, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise ``CheckpointError`` unless ``state_dict`` holds exactly the tensors ``config``'s network
    (any family) has, with their shapes, as finite dense CPU tensors: floating point where the
    network's are, else of the network's own dtype (e.g. BatchNorm's int64 ``num_batches_tracked``).
    Builds nothing (the expected shapes come from the meta device)."""
    from sparsesr.format.spec import expected_dtypes, expected_structure

    family = family_of(config).name
    _validated(config.to_dict(), f"{source}: bad config", family)  # a Checkpoint built in code skipped load_checkpoint
    _, expected = expected_structure(config)
    problems = _structure_problems(expected, {k: tuple(v.shape) for k, v in state_dict.items()})
    if problems:
        wanted = sum(math.prod(s) for s in expected.values())
        found = sum(v.numel() for v in state_dict.values())
        sizes = ", ".join(f"{k} {v}" for k, v in config.to_dict().items())
        raise CheckpointError(f"{source}: the tensors do not match the config ({family}: {sizes}: {wanted:,} "
                              f"values; the file holds {found:,}): {problems}")
    dtypes = expected_dtypes(config)
    for key, tensor in state_dict.items():
        wanted_float = dtypes[key].is_floating_point
        dtype_ok = tensor.is_floating_point() if wanted_float else tensor.dtype == dtypes[key]
        if tensor.layout != torch.strided or tensor.device.type != "cpu" or not dtype_ok:
            wanted_text = "floating point" if wanted_float else str(dtypes[key]).removeprefix("torch.")
            raise CheckpointError(f"{source}: tensor {key!r} is a {str(tensor.dtype).removeprefix('torch.')} "
                                  f"{tensor.layout} tensor on {tensor.device.type}, expected dense {wanted_text}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: tensor {key!r} holds NaN or infinite values")


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load weights, naming any missing, unexpected or mis-shaped keys in one error line."""
    expected = model.state_dict()
    problems = _structure_problems({k: tuple(v.shape) for k, v in expected.items()},
                                   {k: tuple(v.shape) for k, v in state_dict.items()})
    if problems:
        raise CheckpointError(f"{source}: does not match the architecture: {problems}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()})


def _structure_problems(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> str:
    """Missing, unexpected and mis-shaped keys in one line ("" when the two agree)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [f"{k} expected {expected[k]} found {found[k]}"
                  for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if mismatched:
        problems.append(f"mismatched shapes {_few(mismatched)}")
    return "; ".join(problems)


def _validated(raw: object, prefix: str, family: object = "edsr") -> Any:
    from sparsesr.format.spec import validated_config  # here: sparsesr.format imports this module

    try:
        get_family(family)  # type: ignore[arg-type] - a file's "family" may be anything
        return validated_config(raw, family)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise CheckpointError(f"{prefix}: {exc}") from None


def infer_config(state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> EDSRConfig:
    """Recover an EDSR config from EDSR-PyTorch parameter names and shapes (files without metadata;
    ``detect_family`` does this for every family)."""
    family, config, _ = detect_family(state_dict, source)
    if family.name != "edsr":
        raise CheckpointError(f"{source}: not an EDSR state dict (its keys are a {family.name} network's)")
    return _validated(config.to_dict(), f"{source}: unsupported architecture (inferred from the shapes)")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    metadata = {}
    for key, value in raw_meta.items():
        try:
            metadata[key] = json.loads(value)
        except json.JSONDecodeError:
            metadata[key] = value  # plain strings written by other tools
    return tensors, metadata


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad or unsafe pickles
        raise CheckpointError(f"{path}: cannot read as a PyTorch weights file ({_first_line(exc)})") from None
    # BasicSR wraps weights in params / params_ema (prefer the EMA weights); others in state_dict.
    for wrapper in ("params_ema", "params", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return obj


def _normalise_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DataParallel / DDP checkpoints prefix every key with "module.".
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
