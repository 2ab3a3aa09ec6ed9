"""The architecture families: how to build each from its config and recognise its state dicts.

>>> family, config, state_dict = detect_family(torch.load("RealESRGAN_x4plus.pth")["params_ema"], "file")
>>> family.name, config.scale
('rrdbnet', 4)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from sparsesr.errors import CheckpointError, ConfigError
from sparsesr.models import edsr, msrresnet, rrdbnet, srvgg
from sparsesr.models.keys import WrongFamily


@dataclass(frozen=True)
class Family:
    """One architecture family. ``detect`` maps a native state dict to ``(config, state dict with
    the module's key names)`` and raises ``CheckpointError`` when the keys are not this family's."""

    name: str
    config_type: type
    build: Callable[[Any], nn.Module]
    detect: Callable[[dict[str, torch.Tensor]], tuple[Any, dict[str, torch.Tensor]]]


# In detection order: EDSR first (files without metadata were EDSR before the other families).
_FAMILIES = {f.name: f for f in (
    Family("edsr", edsr.EDSRConfig, edsr.EDSR, edsr.detect),
    Family("msrresnet", msrresnet.MSRResNetConfig, msrresnet.MSRResNet, msrresnet.detect),
    Family("rrdbnet", rrdbnet.RRDBNetConfig, rrdbnet.RRDBNet, rrdbnet.detect),
    Family("srvgg", srvgg.SRVGGConfig, srvgg.SRVGGNetCompact, srvgg.detect),
)}


def list_families() -> list[str]:
    return list(_FAMILIES)


def get_family(name: str) -> Family:
    if not isinstance(name, str) or name not in _FAMILIES:
        raise ConfigError(f"unknown architecture family {name!r}; expected one of {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def family_of(config: Any) -> Family:
    for family in _FAMILIES.values():
        if type(config) is family.config_type:
            return family
    raise ConfigError(f"no architecture family has config type {type(config).__name__}; "
                      f"expected one of {', '.join(f.config_type.__name__ for f in _FAMILIES.values())}")


def detect_family(state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> tuple[Family, Any, dict[str, torch.Tensor]]:
    """The family whose keys ``state_dict`` has, its config (from the shapes; not yet checked
    against limits) and the state dict renamed to the module's keys. Raises one
    ``CheckpointError`` saying what each family expected when none matches."""
    refusals = []
    for family in _FAMILIES.values():
        try:
            config, renamed = family.detect(dict(state_dict))
        except WrongFamily as exc:
            refusals.append(str(exc))
            continue
        except CheckpointError as exc:  # this family's keys, but inconsistent
            raise CheckpointError(f"{source}: {exc}") from None
        return family, config, renamed
    raise CheckpointError(f"{source}: no known architecture ({', '.join(_FAMILIES)}) matches the keys: "
                          + "; ".join(refusals))
