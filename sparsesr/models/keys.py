"""State-dict helpers shared by the families' ``detect`` functions."""
from __future__ import annotations

import re
from dataclasses import asdict, fields
from typing import Any

import torch

from sparsesr.errors import CheckpointError, ConfigError


class WrongFamily(CheckpointError):
    """The keys are not this family's (``detect_family`` then tries the next family)."""


def conv_weight(state_dict: dict[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    """``state_dict[key]`` as a 4-d conv weight, or ``WrongFamily`` saying it is not ``what``
    (e.g. "an EDSR") and what was expected."""
    value = state_dict.get(key)
    if value is None or value.dim() != 4:
        found = "none" if value is None else f"shape {list(value.shape)}"
        raise WrongFamily(f"not {what} state dict (expected a conv weight {key!r}, found {found})")
    return value


def numbered(state_dict: dict[str, torch.Tensor], pattern: str, what: str) -> int:
    """How many blocks ``pattern`` (a regex with one group, the index) numbers 0..N-1."""
    found = {int(m.group(1)) for k in state_dict if (m := re.fullmatch(pattern, k))}
    if not found or found != set(range(len(found))):
        raise CheckpointError(f"{what} missing or not numbered 0..N-1")
    return len(found)


def renamed(state_dict: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Keys rewritten by the first matching ``(regex, replacement)`` rule (others unchanged)."""
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in rules:
            new, n = re.subn(f"^{pattern}$", replacement, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def make_config(config_type: type, **values: Any) -> Any:
    """The config the shapes describe; its own checks become a ``CheckpointError``."""
    try:
        return config_type(**values)
    except ConfigError as exc:
        raise CheckpointError(f"unsupported architecture (inferred from the shapes): {exc}") from None


def config_to_dict(config: Any) -> dict:
    return asdict(config)


def config_from_dict(config_type: type, data: dict) -> Any:
    known = {f.name for f in fields(config_type)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {config_type.__name__} keys {unknown}; expected some of {sorted(known)}")
    return config_type(**data)
