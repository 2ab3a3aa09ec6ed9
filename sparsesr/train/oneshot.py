"""One-shot pruning of a saved checkpoint (``sparsesr prune``)."""
from __future__ import annotations

import os

from sparsesr.fileio import sha256_of
from sparsesr.models import model_from_config
from sparsesr.models.checkpoint import load_checkpoint, load_state_dict_strict, save_checkpoint


def prune_checkpoint(
    source: str | os.PathLike,
    out: str | os.PathLike,
    sparsity: float,
    granularity: str = "1x1",
    balance: str = "global",
    min_density: float = 0.0,
) -> dict:
    """Magnitude-prune ``source`` to ``sparsity`` and save it (exact zeros) to ``out``; return the report."""
    from sparsesr.pruning import one_shot_prune

    ckpt = load_checkpoint(source)
    model = model_from_config(ckpt.config)
    load_state_dict_strict(model, ckpt.state_dict, source=str(source))
    report = one_shot_prune(model, sparsity, granularity=granularity, balance=balance, min_density=min_density)
    pruning = {
        "method": "magnitude",
        "one_shot": True,
        "sparsity": sparsity,
        "granularity": granularity,
        "balance": balance,
        "min_density": min_density,
        "source": {"path": str(source), "sha256": sha256_of(source)},
        "report": report,
    }
    keep = {k: v for k, v in ckpt.metadata.items() if k not in ("format", "arch", "config", "pruning")}
    save_checkpoint(out, model, {**keep, "pruning": pruning})
    return report
