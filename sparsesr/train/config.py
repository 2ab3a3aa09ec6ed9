"""Training configuration: a TOML file, overridden from the command line.

Sections map to dataclasses; unknown keys are errors, so a typo never silently trains the
wrong thing. ``[prune]`` is handed to the pruning module as a plain dict; it validates it.

    [model]  arch, scale, init (a checkpoint to start from: fine-tuning / pruning)
    [data]   train (folders), holdout, patch_size, val_crop
    [train]  iterations, batch_size, lr, betas, schedule, milestones, gamma, min_lr,
             ema, val_every, save_every, log_every, seed, threads
    [prune]  method, sparsity, ... (see docs/pruning.md)
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from sparsesr.errors import ConfigError


@dataclass
class ModelSection:
    arch: str = "edsr-cpu"
    scale: int = 2
    init: str | None = None  # checkpoint to start from (fine-tuning, pruning a trained model)
    init_other_scale: bool = False  # allow `init` of another scale: all but its upsampler is loaded
    n_resblocks: int | None = None  # override the preset's depth / width (small test models)
    n_feats: int | None = None


@dataclass
class DataSection:
    train: list[str] = field(default_factory=lambda: ["../shared/data/train"])
    holdout: int = 10  # images of `train` kept out for validation
    patch_size: int = 48  # LR patch side
    val_crop: int = 0  # >0: validate on the central crop of this HR size (faster)


@dataclass
class TrainSection:
    iterations: int = 10000
    batch_size: int = 16
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    schedule: str = "cosine"  # "cosine" | "multistep" | "constant"
    milestones: list[int] = field(default_factory=list)  # multistep: steps where lr *= gamma
    gamma: float = 0.5
    min_lr: float = 1e-6  # cosine floor
    ema: float = 0.0  # EMA decay of the weights (0 = off), e.g. 0.999
    val_every: int = 1000
    save_every: int = 1000
    log_every: int = 50
    seed: int = 0
    threads: int = 0  # torch threads (0 = torch's default)


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    prune: dict[str, Any] | None = None

    def validate(self) -> "TrainConfig":
        t = self.train
        if t.iterations < 1 or t.batch_size < 1 or self.data.patch_size < 4:
            raise ConfigError("train.iterations and train.batch_size must be >= 1, data.patch_size >= 4")
        if t.schedule not in ("cosine", "multistep", "constant"):
            raise ConfigError(f"train.schedule must be cosine, multistep or constant, got {t.schedule!r}")
        if not 0.0 <= t.ema < 1.0:
            raise ConfigError(f"train.ema must be in [0, 1), got {t.ema}")
        if len(t.betas) != 2:
            raise ConfigError(f"train.betas must be two numbers, got {t.betas}")
        if isinstance(self.data.train, str):
            self.data.train = [self.data.train]
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection}


def config_from_dict(raw: dict, source: str = "config") -> TrainConfig:
    unknown = sorted(set(raw) - set(_SECTIONS) - {"prune"})
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; expected model, data, train, prune")
    sections = {}
    for name, cls in _SECTIONS.items():
        values = raw.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(values) - known)
        if bad:
            raise ConfigError(f"{source}: unknown key(s) {bad} in [{name}]; expected some of {sorted(known)}")
        sections[name] = cls(**values)
    prune = raw.get("prune")
    if prune is not None and not isinstance(prune, dict):
        raise ConfigError(f"{source}: [prune] must be a table")
    return TrainConfig(**sections, prune=dict(prune) if prune else None).validate()


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a TOML config (or the defaults when ``path`` is None) and apply ``section.key=value`` overrides."""
    raw: dict = {}
    source = str(path) if path else "defaults"
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(raw, source)


def apply_override(raw: dict, item: str) -> None:
    """Apply ``section.key=value`` where value is a TOML value (bare strings are allowed).

    ``section.key=none`` removes the key, so the field falls back to its default (TOML has no null;
    this is how an optional setting such as ``prune.shrink`` is switched off from the command line).
    """
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.iterations=500")
    if text.strip().lower() == "none":
        section, name = parts
        cls = _SECTIONS.get(section)
        known = {f.name for f in dataclasses.fields(cls)} if cls else set()
        table = raw.get(section)
        present = isinstance(table, dict) and name in table
        if not present and name not in known:  # a typo would otherwise pass silently
            raise ConfigError(f"override {item!r}: {section}.{name} is not a known setting, nothing to reset")
        if present:
            del table[name]
        return
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word such as a path or a method name
    raw.setdefault(parts[0], {})[parts[1]] = value
