"""Reading and writing model checkpoints.

sparsesr checkpoints are safetensors files whose ``__metadata__`` holds the architecture and its
config as JSON, so a file is self-describing. Official EDSR-PyTorch and BasicSR ``.pt``/``.pth``
state dicts are read too (with ``torch.load(weights_only=True)``: never plain unpickling), their
architecture inferred from the keys and shapes.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sparsesr.errors import CheckpointError, ConfigError
from sparsesr.fileio import atomic_write_bytes
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
    ``load_checkpoint`` as the same objects.
    """
    from safetensors.torch import save

    config: EDSRConfig = model.config
    meta = {"format": CHECKPOINT_FORMAT, "arch": arch_of(config), "config": config.to_dict(), **(metadata or {})}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # safetensors' save_file creates files readable by the owner only: write the bytes ourselves.
    atomic_write_bytes(path, save(tensors, metadata={k: json.dumps(v) for k, v in meta.items()}))


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a sparsesr safetensors checkpoint or an official EDSR-PyTorch / BasicSR state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix.lower() in _TORCH_SUFFIXES:
        state_dict, metadata = _read_torch(path), {}
    else:
        state_dict, metadata = _read_safetensors(path)
    if metadata.get("format") == "sparsesr":
        raise CheckpointError(f"{path}: this is an exported sparse model; load it with sparsesr.load()")
    state_dict = _normalise_keys(state_dict)
    if "config" in metadata:
        try:
            config = EDSRConfig.from_dict(metadata["config"])
        except (ConfigError, TypeError) as exc:
            raise CheckpointError(f"{path}: bad config in metadata: {exc}") from None
    else:
        config = infer_config(state_dict, source=str(path))
    return Checkpoint(state_dict=state_dict, arch=metadata.get("arch", arch_of(config)), config=config, metadata=metadata)


def load_model(path: str | os.PathLike) -> nn.Module:
    """Build the network a checkpoint describes and load its weights (eval mode, CPU)."""
    ckpt = load_checkpoint(path)
    model = model_from_config(ckpt.config)
    load_state_dict_strict(model, ckpt.state_dict, source=str(path))
    return model.eval()


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load weights, naming any missing, unexpected or mis-shaped keys in one error line."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if mismatched:
        problems.append(f"mismatched shapes {_few(mismatched)}")
    if problems:
        raise CheckpointError(f"{source}: does not match the architecture: " + "; ".join(problems))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()})


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
    try:
        return EDSRConfig(n_resblocks=n_resblocks, n_feats=n_feats, res_scale=res_scale, scale=scale, n_colors=n_colors)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from None


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
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
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
