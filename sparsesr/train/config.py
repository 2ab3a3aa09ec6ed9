"""Training configuration: a TOML file, overridden from the command line.

Sections map to dataclasses; unknown keys are errors, so a typo never silently trains the
wrong thing, and every value is checked against its field's type and range (one-line
``ConfigError`` naming the key). ``[prune]`` is kept as a plain dict and checked by
``sparsesr.pruning.config_from_dict``.

    [model]  arch (a preset of any family), scale, init (a checkpoint to start from: fine-tuning /
             pruning), init_other_scale, size overrides (n_feats, n_resblocks, num_block, ...)
    [data]   train (folders), holdout, patch_size, val_crop
    [train]  iterations, batch_size, lr, betas, schedule, milestones, gamma, min_lr,
             ema, val_every, save_every, log_every, seed, threads
    [prune]  method, sparsity, ... (see docs/pruning.md)

A run's config is saved as ``config.json`` in its output folder; ``resume_config`` reads it
back so a resumed run trains exactly what it started with.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from sparsesr.errors import ConfigError

SCHEDULES = ("cosine", "multistep", "constant")
SCALES = (2, 3, 4)  # what the data pipeline makes; a family may support fewer (RRDBNet: 2 and 4)
# [model] keys that override a preset's sizes, each a field of some family's config; a preset
# takes only its own family's (EDSR n_resblocks; MSRResNet, RRDBNet num_block; RRDBNet num_grow_ch;
# SRVGG num_conv; all n_feats).
SIZE_KEYS = ("n_resblocks", "n_feats", "num_block", "num_grow_ch", "num_conv")
# Added after config.json files existed: left out of to_dict() while unset, so a run that does not
# use them writes (and compares on resume) the same config.json as before.
_LATER_SIZE_KEYS = ("num_block", "num_grow_ch", "num_conv")
# Settings that may differ between the legs of a resumed run: they choose how the machine runs
# the job, not what is trained. Everything else must match the run's saved config.json.
RESUME_MAY_CHANGE = ("train.threads",)


@dataclass
class ModelSection:
    arch: str = "edsr-cpu"
    scale: int = 2
    init: str | None = None  # checkpoint to start from (fine-tuning, pruning a trained model)
    init_other_scale: bool = False  # allow `init` of another scale: all but its scale-dependent tensors are loaded
    # Override the preset's sizes (small test models); None = the preset's. See SIZE_KEYS.
    n_resblocks: int | None = None  # EDSR
    n_feats: int | None = None  # every family
    num_block: int | None = None  # MSRResNet, RRDBNet
    num_grow_ch: int | None = None  # RRDBNet
    num_conv: int | None = None  # SRVGG

    def sizes(self) -> dict[str, int]:
        """The size overrides that are set, as ``preset_config`` keyword arguments."""
        return {k: v for k in SIZE_KEYS if (v := getattr(self, k)) is not None}


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
        """Check every value's type and range (ints are accepted for floats and stored as floats)."""
        if isinstance(self.data.train, str):
            self.data.train = [self.data.train]
        for name, cls in _SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, cls):
                raise ConfigError(f"[{name}] must be a {cls.__name__}, got {type(section).__name__}")
            for f in dataclasses.fields(cls):
                key = f"{name}.{f.name}"
                setattr(section, f.name, _check_type(key, getattr(section, f.name), _field_types(cls)[f.name]))
        _check_ranges(self)
        if self.prune is not None:
            _check_prune(self.prune)
            if self.train.ema:
                raise ConfigError("train.ema cannot be combined with [prune]: the average of masked weights is not masked")
        return self

    def to_dict(self) -> dict:
        as_dict = dataclasses.asdict(self)
        for key in _LATER_SIZE_KEYS:
            if as_dict["model"][key] is None:
                del as_dict["model"][key]
        return as_dict


_SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection}


def config_from_dict(raw: dict, source: str = "config") -> TrainConfig:
    """Build and validate a config from ``{section: {key: value}}`` (a parsed TOML or config.json)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a table of sections, got {type(raw).__name__}")
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
        sections[name] = cls(**copy.deepcopy(values))
    prune = raw.get("prune")
    if prune is not None and not isinstance(prune, dict):
        raise ConfigError(f"{source}: [prune] must be a table")
    try:
        return TrainConfig(**sections, prune=copy.deepcopy(prune) if prune else None).validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> TrainConfig:
    """Read a TOML config (or the defaults when ``path`` is None) and apply ``section.key=value`` overrides."""
    raw: dict = {}
    overrides = list(overrides)
    source = (str(path) if path else "defaults") + (" with --set" if overrides else "")
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a folder, not a config file") from None
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
    if raw.get(parts[0]) is None:  # absent, or `"prune": null` in a saved config.json
        raw[parts[0]] = {}
    if not isinstance(raw[parts[0]], dict):
        raise ConfigError(f"override {item!r}: [{parts[0]}] is not a table")
    raw[parts[0]][parts[1]] = value


def read_saved_config(out_dir: str | Path) -> TrainConfig | None:
    """The config a run in ``out_dir`` was started with (its ``config.json``), or None if there is none."""
    path = Path(out_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable config.json ({exc})") from None
    return config_from_dict(raw, str(path))


def resume_config(out_dir: str | Path, path: str | Path | None = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """The config to resume the run in ``out_dir`` with: its saved ``config.json``.

    ``path`` / ``overrides`` are optional; given, they must describe the same run (keys in
    ``RESUME_MAY_CHANGE`` excepted), else a ``ConfigError`` names every key that differs.
    Overrides without ``path`` apply to the saved config.
    """
    out_dir = Path(out_dir)
    overrides = list(overrides)
    if not (out_dir / "state.pt").is_file():
        raise ConfigError(f"{out_dir / 'state.pt'}: nothing to resume (no training state in {out_dir})")
    saved = read_saved_config(out_dir)
    if saved is None:  # a run whose config.json was lost: only an explicit config can say what it was
        if path is None and not overrides:
            raise ConfigError(f"{out_dir / 'config.json'}: no saved config to resume with; give the run's config with -c/--set")
        return load_config(path, overrides)
    if path is not None:
        given = load_config(path, overrides)
    else:
        raw = saved.to_dict()
        for item in overrides:
            apply_override(raw, item)
        given = config_from_dict(raw, "--set")
    check_resume_config(saved, given, out_dir / "config.json")
    return given


def check_resume_config(saved: TrainConfig, given: TrainConfig, source: str | Path = "config.json") -> None:
    """Raise ``ConfigError`` naming each key where ``given`` differs from the ``saved`` run config."""
    differing = [k for k in config_differences(saved, given) if k not in RESUME_MAY_CHANGE]
    if (saved.prune is None) != (given.prune is None):  # one prunes, the other not: say just that
        differing = [k for k in differing if not k.startswith("prune.")]
    elif "prune" in differing:  # both prune: the prune.* keys say where they differ
        differing.remove("prune")
    if not differing:
        return
    flat_saved, flat_given = _flatten(saved), _flatten(given)
    shown = ", ".join(f"{k} (saved {_show(flat_saved.get(k, _MISSING))}, given {_show(flat_given.get(k, _MISSING))})"
                      for k in differing)
    raise ConfigError(
        f"{source}: a resumed run must keep its config, but the given config differs in {shown}; "
        f"resume without -c/--set to use the saved config, or train into a new --out"
    )


def config_differences(a: TrainConfig, b: TrainConfig) -> list[str]:
    """The ``section.key`` names whose values differ between two validated configs (``prune``
    when only one of them prunes)."""
    flat_a, flat_b = _flatten(a), _flatten(b)
    return sorted(k for k in set(flat_a) | set(flat_b) if flat_a.get(k, _MISSING) != flat_b.get(k, _MISSING))


_MISSING = object()


def _flatten(config: TrainConfig) -> dict[str, Any]:
    as_dict = config.to_dict()
    flat = {f"{section}.{key}": value for section in _SECTIONS for key, value in as_dict[section].items()}
    if config.prune is None:
        flat["prune"] = None
    else:
        # Compare what the pruner will use, defaults filled in: {sparsity: 0.9} equals
        # {sparsity: 0.9, granularity: "1x1"}.
        from sparsesr.pruning import config_from_dict as prune_config

        normalized = prune_config(config.prune).to_dict()
        flat["prune"] = normalized
        flat.update({f"prune.{k}": v for k, v in normalized.items()})
    return flat


def _show(value: Any) -> str:
    return "unset" if value is _MISSING else json.dumps(value)


# --- validation -------------------------------------------------------------------------------

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _field_types(cls: type) -> dict[str, Any]:
    # Annotations are strings (postponed evaluation); resolve them once per class.
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


_HINTS: dict[type, dict[str, Any]] = {}


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """``value`` if it is of type ``tp`` (ints widened to float for float fields), else ConfigError."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_type(key, value, inner)
    if typing.get_origin(tp) is list:
        (item_type,) = args
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_plural(item_type)}, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if tp is float:
        # bool is an int subclass: `lr = true` must not pass as 1.0
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected {_TYPE_NAMES[tp]}, got {value!r}")
        return value
    raise TypeError(f"{key}: no check for field type {tp!r}")  # a new field type: extend _check_type


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(tp, str(tp))


def _at_least(key: str, value: int | float, minimum: int | float) -> None:
    if value < minimum:
        raise ConfigError(f"{key}: must be >= {minimum}, got {value!r}")


def _check_ranges(cfg: TrainConfig) -> None:
    m, d, t = cfg.model, cfg.data, cfg.train
    if m.scale not in SCALES:
        raise ConfigError(f"model.scale: expected one of {', '.join(map(str, SCALES))}, got {m.scale!r}")
    if m.init is not None and not m.init.strip():
        raise ConfigError("model.init: expected a checkpoint path, got an empty string")
    _check_model(m)
    if not d.train or not all(p.strip() for p in d.train):
        raise ConfigError(f"data.train: expected one or more folder paths, got {d.train!r}")
    _at_least("data.holdout", d.holdout, 0)
    _at_least("data.patch_size", d.patch_size, 4)
    _at_least("data.val_crop", d.val_crop, 0)
    for key in ("iterations", "batch_size", "val_every", "save_every", "log_every"):
        _at_least(f"train.{key}", getattr(t, key), 1)
    for key in ("seed", "threads"):
        _at_least(f"train.{key}", getattr(t, key), 0)
    if t.lr <= 0:
        raise ConfigError(f"train.lr: must be > 0, got {t.lr!r}")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise ConfigError(f"train.betas: expected two numbers in [0, 1), got {t.betas!r}")
    if t.schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule: expected cosine, multistep or constant, got {t.schedule!r}")
    for i, milestone in enumerate(t.milestones):
        _at_least(f"train.milestones[{i}]", milestone, 1)
    if t.gamma <= 0:
        raise ConfigError(f"train.gamma: must be > 0, got {t.gamma!r}")
    _at_least("train.min_lr", t.min_lr, 0.0)
    if t.schedule == "cosine" and t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr: the cosine floor must not exceed train.lr ({t.lr:g}), got {t.min_lr:g}")
    if not 0.0 <= t.ema < 1.0:
        raise ConfigError(f"train.ema: must be in [0, 1), got {t.ema!r}")


def _check_model(m: ModelSection) -> None:
    """The preset exists, takes the size overrides given, and builds at ``m.scale``."""
    from sparsesr.models import PRESETS, family_of, list_archs, preset_config

    if m.arch not in list_archs():
        raise ConfigError(f"model.arch: expected one of {', '.join(list_archs())}, got {m.arch!r}")
    preset = PRESETS[m.arch]
    own = [f.name for f in dataclasses.fields(preset) if f.name in SIZE_KEYS]
    for key, value in m.sizes().items():
        if key not in own:
            raise ConfigError(f"model.{key}: not a size of {m.arch!r} ({family_of(preset).name} family); "
                              f"its sizes are {', '.join(own)}")
        _at_least(f"model.{key}", value, 1)
    try:  # the family's own limits, e.g. RRDBNet only x2 and x4
        preset_config(m.arch, m.scale, **m.sizes())
    except ConfigError as exc:
        raise ConfigError(f"model.arch {m.arch!r} at model.scale {m.scale}: {exc}") from None


def _check_prune(prune: dict[str, Any]) -> None:
    from sparsesr.pruning import config_from_dict as prune_config

    if "method" not in prune:
        raise ConfigError("[prune] needs a method (dup, magnitude or gmp)")
    prune_config(prune)  # raises a one-line ConfigError naming the prune.* key
