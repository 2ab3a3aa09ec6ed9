"""Pruning configuration: one dataclass per method, built from a plain dict (the TOML ``[prune]``).

Every option is checked when the config is built, so a typo or an impossible value fails
before training starts, with a message naming what was expected.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sparsesr.errors import ConfigError

BALANCES = ("global", "layer_normalized", "uniform")


def parse_granularity(granularity: str) -> tuple[int, int]:
    """``"1x1"`` -> (1, 1), ``"4x1"`` -> (4, 1): block height (output channels) x width (columns)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(granularity))
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise ConfigError(
            f"prune.granularity must look like '1x1', '4x1', '8x1' or '1x4', got {granularity!r}"
        )
    return int(match[1]), int(match[2])


@dataclass(kw_only=True)
class PruneConfig:
    """Options every method shares.

    sparsity:     final fraction of prunable weights that are zero, in [0, 1).
    granularity:  "1x1" (unstructured) or "BHxBW" blocks of the [C_out, C_in*kh*kw] matrix.
    balance:      "global" (one ranking of raw scores), "layer_normalized" (scores divided by
                  the layer's RMS, then one ranking) or "uniform" (same sparsity in every layer).
    min_density:  every layer keeps at least this fraction of its weights.
    include:      regexes (re.search on module names) selecting the prunable Conv2d modules;
                  None = every trainable Conv2d except the ones that read the image and
                  write the output (``find_prunable``).
    exclude:      regexes removing modules from that selection.
    """

    method: ClassVar[str] = ""

    sparsity: float
    granularity: str = "1x1"
    balance: str = "global"
    min_density: float = 0.0
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sparsity = _fraction("sparsity", self.sparsity, upper_open=True)
        parse_granularity(self.granularity)
        if self.balance not in BALANCES:
            raise ConfigError(f"prune.balance must be one of {', '.join(BALANCES)}; got {self.balance!r}")
        self.min_density = _fraction("min_density", self.min_density)
        if self.min_density > 1.0 - self.sparsity + 1e-12:
            raise ConfigError(
                f"prune.min_density must be at most 1 - sparsity = {1.0 - self.sparsity:g} "
                f"(no layer can keep more than the whole model does); got {self.min_density:g}"
            )
        if self.include is not None:
            self.include = _regex_list("include", self.include)
        self.exclude = _regex_list("exclude", self.exclude)

    def to_dict(self) -> dict[str, Any]:
        """The plain dict this config was built from (with defaults filled in), method included."""
        return {"method": self.method, **dataclasses.asdict(self)}


@dataclass(kw_only=True)
class MagnitudeConfig(PruneConfig):
    """One-shot global magnitude pruning before training; the mask never changes."""

    method: ClassVar[str] = "magnitude"


@dataclass(kw_only=True)
class GMPConfig(PruneConfig):
    """Gradual magnitude pruning (Zhu & Gupta 2017): cubic schedule, no regrowth.

    start_step / end_step: the schedule runs from initial_sparsity at start_step to sparsity at
    end_step (optimizer steps, 1-based; start_step 0 means "before the first step").
    update_every: masks are re-decided every this many steps (and always at end_step).
    """

    method: ClassVar[str] = "gmp"

    end_step: int
    start_step: int = 0
    update_every: int = 100
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.start_step = _integer("start_step", self.start_step, minimum=0)
        self.end_step = _integer("end_step", self.end_step, minimum=self.start_step)
        self.update_every = _integer("update_every", self.update_every, minimum=1)
        self.initial_sparsity = _fraction("initial_sparsity", self.initial_sparsity)
        if self.initial_sparsity > self.sparsity:
            raise ConfigError(
                f"prune.initial_sparsity must not exceed sparsity ({self.sparsity:g}); "
                f"got {self.initial_sparsity:g}"
            )


@dataclass(kw_only=True)
class DUPConfig(GMPConfig):
    """Dynamic unstructured pruning: GMP's schedule plus regrowth, hysteresis and soft shrinkage.

    regrow:     re-decide masks from all weights, pruned ones included (False = GMP-like).
    hysteresis: h in [0, 1); a pruned weight returns only if its score > (1+h)T, a live one is
                cut only if its score < (1-h)T.
    shrink:     None = pruned weights keep their values and the forward pass uses W*M (DNS);
                alpha in [0, 1) = the forward pass uses W and pruned weights are multiplied by
                alpha after every optimizer step until the masks freeze (ISS-P; 0 = hard zero).
    """

    method: ClassVar[str] = "dup"

    regrow: bool = True
    hysteresis: float = 0.1
    shrink: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.regrow, bool):
            raise ConfigError(f"prune.regrow must be true or false; got {self.regrow!r}")
        self.hysteresis = _fraction("hysteresis", self.hysteresis, upper_open=True)
        if self.shrink is not None:
            self.shrink = _fraction("shrink", self.shrink, upper_open=True)


CONFIGS: dict[str, type[PruneConfig]] = {c.method: c for c in (DUPConfig, MagnitudeConfig, GMPConfig)}


def config_from_dict(options: dict[str, Any]) -> PruneConfig:
    """Build the config of ``options["method"]`` (default "dup"), rejecting unknown keys."""
    options = dict(options)
    method = options.pop("method", "dup")
    if method not in CONFIGS:
        raise ConfigError(f"prune.method must be one of {', '.join(CONFIGS)}; got {method!r}")
    config_class = CONFIGS[method]
    known = [f.name for f in dataclasses.fields(config_class)]
    for key in options:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(
                f"unknown option prune.{key} for method {method!r}{suggestion}; "
                f"expected one of: {', '.join(known)}"
            )
    missing = [
        f.name for f in dataclasses.fields(config_class)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        and f.name not in options
    ]
    if missing:
        raise ConfigError(f"prune.{missing[0]} is required for method {method!r} and was not given")
    return config_class(**options)


def _fraction(name: str, value: Any, upper_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"prune.{name} must be a number; got {value!r}")
    value = float(value)
    if not (0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0):
        interval = "[0, 1)" if upper_open else "[0, 1]"
        raise ConfigError(f"prune.{name} must be in {interval}; got {value:g}")
    return value


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"prune.{name} must be an integer >= {minimum}; got {value!r}")
    return value


def _regex_list(name: str, value: Any) -> list[str]:
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"prune.{name} must be a regex or a list of regexes; got {value!r}")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"prune.{name} has an invalid regex {pattern!r}: {exc}") from None
    return list(patterns)
