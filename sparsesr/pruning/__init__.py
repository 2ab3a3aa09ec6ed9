"""Pruning of conv weights in any ``nn.Module``: dynamic (dup), one-shot (magnitude), gradual (gmp).

Imports only torch and the standard library, so it works on any model. See docs/pruning.md.
"""
from __future__ import annotations

from sparsesr.pruning.config import (
    CONFIGS, DUPConfig, GMPConfig, MagnitudeConfig, PruneConfig, config_from_dict, parse_granularity,
)
from sparsesr.pruning.layers import find_prunable, image_convs, sparsity_report
from sparsesr.pruning.masks import cubic_sparsity
from sparsesr.pruning.pruner import (
    PRUNERS, DUPPruner, GMPPruner, MagnitudePruner, Pruner, build_pruner, one_shot_prune,
)

__all__ = [
    "build_pruner", "one_shot_prune", "sparsity_report", "find_prunable", "image_convs", "cubic_sparsity",
    "Pruner", "DUPPruner", "MagnitudePruner", "GMPPruner", "PRUNERS",
    "PruneConfig", "DUPConfig", "GMPConfig", "MagnitudeConfig", "CONFIGS", "config_from_dict",
    "parse_granularity",
]
