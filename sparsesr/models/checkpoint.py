"""Reading and writing model checkpoints.

sparsesr checkpoints are safetensors files whose ``__metadata__`` holds the architecture and its
config as JSON, so a file is self-describing. ``.pt``/``.pth`` state dicts with EDSR-PyTorch key
names are read too, also inside BasicSR's ``params`` / ``params_ema`` wrapping (with
``torch.load(weights_only=True)``: never plain unpickling), their architecture inferred from the
keys and shapes. BasicSR's own EDSR key names (``conv_first``...) are not read yet.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sparsesr.errors import CheckpointError, ConfigError
from sparsesr.fileio import atomic_write_bytes, canonical_safetensors
from sparsesr.models import arch_of, model_from_config
from sparsesr.models.edsr import EDSRConfig

CHECKPOINT_FORMAT = "sparsesr-checkpoint"
_TORCH_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin"}


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    arch: str
    config: EDSRConfig
    metadata: dict = field(default_factory=dict)  # everything else the file said (step, metrics, pruning...)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, metadata: dict | None = None) -> None:
    """Write ``model``'s weights and config to a safetensors file, atomically.

    ``metadata`` values may be any JSON-serialisable objects; they come back from
    ``load_checkpoint`` as the same objects. The metadata also records ``weights_sha256``
    (``weights_sha256(tensors)``) so a reader can detect changed weights. Non-finite weights
    (NaN, inf) are refused with a ``CheckpointError``: such a model is never worth keeping.
    """
    from safetensors.torch import save

    config: EDSRConfig = model.config
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: refusing to save non-finite weights ({name} holds NaN or inf)")
    # The digest goes last so that metadata copied from another checkpoint cannot override it.
    meta = {"format": CHECKPOINT_FORMAT, "arch": arch_of(config), "config": config.to_dict(), **(metadata or {}),
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
        value = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}\t{str(value.dtype).removeprefix('torch.')}\t{list(value.shape)}\n".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a sparsesr safetensors checkpoint or an EDSR-PyTorch state dict (also BasicSR-wrapped).

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
    if "config" in metadata:
        config = _validated(metadata["config"], f"{path}: bad config in metadata")
    else:
        config = infer_config(state_dict, source=str(path))
    check_state_dict(config, state_dict, source=str(path))
    return Checkpoint(state_dict=state_dict, arch=arch_of(config), config=config, metadata=metadata)


def load_model(path: str | os.PathLike) -> nn.Module:
    """Build the network a checkpoint describes and load its weights (eval mode, CPU)."""
    ckpt = load_checkpoint(path)
    model = model_from_config(ckpt.config)
    load_state_dict_strict(model, ckpt.state_dict, source=str(path))
    return model.eval()


def check_state_dict(config: EDSRConfig, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise ``CheckpointError`` unless ``state_dict`` holds exactly the tensors ``config``'s network
    has, with their shapes, as finite dense floating-point CPU tensors. Builds nothing (the
    expected shapes come from the meta device)."""
    from sparsesr.format.spec import expected_structure

    _validated(config.to_dict(), f"{source}: bad config")  # a Checkpoint built in code skipped load_checkpoint
    _, expected = expected_structure(config)
    problems = _structure_problems(expected, {k: tuple(v.shape) for k, v in state_dict.items()})
    if problems:
        wanted = sum(math.prod(s) for s in expected.values())
        found = sum(v.numel() for v in state_dict.values())
        raise CheckpointError(f"{source}: the tensors do not match the config ({config.n_resblocks} blocks x "
                              f"{config.n_feats} channels, x{config.scale}: {wanted:,} values; the file holds "
                              f"{found:,}): {problems}")
    for key, tensor in state_dict.items():
        if tensor.layout != torch.strided or tensor.device.type != "cpu" or not tensor.is_floating_point():
            raise CheckpointError(f"{source}: tensor {key!r} is a {str(tensor.dtype).removeprefix('torch.')} "
                                  f"{tensor.layout} tensor on {tensor.device.type}, expected dense floating point")
        if not bool(torch.isfinite(tensor).all()):
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


def _validated(raw: object, prefix: str) -> EDSRConfig:
    from sparsesr.format.spec import validated_config  # here: sparsesr.format imports this module

    try:
        return validated_config(raw)
    except ConfigError as exc:
        raise CheckpointError(f"{prefix}: {exc}") from None


def infer_config(state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> EDSRConfig:
    """Recover an EDSR config from parameter names and shapes (for files without metadata)."""
    head = state_dict.get("head.0.weight")
    if head is None or head.dim() != 4:
        raise CheckpointError(f"{source}: not an EDSR state dict (no 'head.0.weight' conv weight)")
    n_feats, n_colors = int(head.shape[0]), int(head.shape[1])
    blocks = {int(m.group(1)) for k in state_dict if (m := re.fullmatch(r"body\.(\d+)\.body\.0\.weight", k))}
    n_resblocks = len(blocks)
    if n_resblocks == 0 or blocks != set(range(n_resblocks)):
        raise CheckpointError(f"{source}: residual blocks body.N.body.0 missing or not numbered 0..N-1")
    ups = [state_dict[k] for k in sorted(state_dict) if re.fullmatch(r"tail\.0\.\d+\.weight", k)]
    if len(ups) == 1 and ups[0].shape[0] == 9 * n_feats:
        scale = 3
    elif ups and all(u.shape[0] == 4 * n_feats for u in ups):
        scale = 2 ** len(ups)
    else:
        raise CheckpointError(f"{source}: cannot infer the scale from the upsampler convs tail.0.*")
    # EDSR-PyTorch trains only its large model (32 x 256) with residual scaling 0.1.
    res_scale = 0.1 if (n_resblocks, n_feats) == (32, 256) else 1.0
    inferred = {"n_resblocks": n_resblocks, "n_feats": n_feats, "res_scale": res_scale, "scale": scale, "n_colors": n_colors}
    return _validated(inferred, f"{source}: unsupported architecture (inferred from the shapes)")


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
