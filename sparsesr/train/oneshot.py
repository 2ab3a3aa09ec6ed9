"""One-shot pruning of a saved checkpoint (``sparsesr prune``)."""
from __future__ import annotations

import math
import os

from sparsesr.errors import ConfigError
from sparsesr.fileio import sha256_of
from sparsesr.models import model_from_config
from sparsesr.models.checkpoint import load_state_dict_strict, save_checkpoint

# What `sparsesr prune --granularity` offers: unstructured, and the block shapes an export stores
# as BSR (8x1, 4x1 output-channel blocks) or that the Triton kernel runs (1x4). sparsesr.pruning
# itself takes any BHxBW.
GRANULARITIES = ("1x1", "4x1", "8x1", "1x4")


def prune_checkpoint(
    source: str | os.PathLike,
    out: str | os.PathLike,
    sparsity: float,
    granularity: str = "1x1",
    balance: str = "global",
    min_density: float = 0.0,
) -> dict:
    """Magnitude-prune ``source`` to ``sparsity`` and save it (exact zeros) to ``out``; return the report.

    ``source``: a checkpoint, an exported file or an embedded model name (see
    ``sparsesr.format.writer.load_source``). ``out`` must name a file, not a folder. The options
    are checked before anything is loaded.
    """
    from sparsesr.format.writer import load_source, output_file
    from sparsesr.pruning import one_shot_prune

    out = output_file(out)
    if granularity not in GRANULARITIES:
        raise ConfigError(f"--granularity {granularity}: expected one of {', '.join(GRANULARITIES)}")
    check_fraction("--sparsity", sparsity, upper_open=True)
    check_fraction("--min-density", min_density)
    ckpt, path = load_source(source)
    model = model_from_config(ckpt.config)
    load_state_dict_strict(model, ckpt.state_dict, source=str(path or "checkpoint"))
    report = one_shot_prune(model, sparsity, granularity=granularity, balance=balance, min_density=min_density)
    pruning = {
        "method": "magnitude",
        "one_shot": True,
        "sparsity": sparsity,
        "granularity": granularity,
        "balance": balance,
        "min_density": min_density,
        "source": {"path": str(path), "sha256": sha256_of(path)} if path else None,
        "report": report,
    }
    # What describes the network (family, preset, config) is written anew from the model.
    keep = {k: v for k, v in ckpt.metadata.items() if k not in ("format", "family", "arch", "config", "pruning")}
    save_checkpoint(out, model, {**keep, "pruning": pruning})
    return report


def check_fraction(option: str, value: float, upper_open: bool = False) -> float:
    """``value`` if it is a number in [0, 1] ([0, 1) with ``upper_open``), else ``ConfigError``."""
    interval = "[0, 1)" if upper_open else "[0, 1]"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0)
    if not ok:
        raise ConfigError(f"{option} {value}: expected a fraction in {interval}")
    return float(value)
