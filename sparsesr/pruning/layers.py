"""Which weights are prunable, and how sparse a model or checkpoint really is."""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from sparsesr.errors import ConfigError


def find_prunable(
    model: nn.Module, include: list[str] | None = None, exclude: Iterable[str] = ()
) -> list[tuple[str, nn.Conv2d]]:
    """The (module name, Conv2d) pairs to prune, in registration order.

    Only trainable convs count (a frozen conv, e.g. a mean-shift layer, is never pruned and is not
    "the first" either). Default: all of them except the first and the last, which map to and
    from image space and hold few weights. ``include`` replaces that default by regexes over the
    module names; ``exclude`` then removes matches.
    """
    convs = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and module.weight.requires_grad
    ]
    if include is None:
        selected = convs[1:-1]
    else:
        selected = [(n, m) for n, m in convs if any(re.search(p, n) for p in include)]
    selected = [(n, m) for n, m in selected if not any(re.search(p, n) for p in exclude)]
    if not selected:
        raise ConfigError(
            f"no prunable Conv2d found (include={include}, exclude={list(exclude)}); "
            f"the model's trainable Conv2d modules are: {[n for n, _ in convs] or 'none'}"
        )
    return selected


def layer_entry(shape: Iterable[int], numel: int, nonzeros: int) -> dict:
    return {"shape": list(shape), "numel": numel, "nonzeros": nonzeros, "sparsity": 1.0 - nonzeros / max(numel, 1)}


def summarize(layers: dict[str, dict]) -> dict:
    """Add the overall totals to a {name: layer_entry} dict."""
    numel = sum(entry["numel"] for entry in layers.values())
    nonzeros = sum(entry["nonzeros"] for entry in layers.values())
    return {"layers": layers, "numel": numel, "nonzeros": nonzeros, "sparsity": 1.0 - nonzeros / max(numel, 1)}


def sparsity_report(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], prunable_names: Iterable[str] | None = None
) -> dict:
    """Per-layer and overall sparsity, counted from the exact zeros in the weights themselves.

    ``prunable_names`` are state-dict keys (``"body.0.body.0.weight"``). Default for a model: the
    weights ``find_prunable`` selects. Default for a state dict: every 4-D floating ``*weight``
    tensor, first and last included, because a state dict cannot tell parameters from buffers
    (EDSR's mean-shift buffers are 4-D ``weight`` too); pass ``prunable_names`` for the pruned subset.
    Returns ``{"layers": {name: {shape, numel, nonzeros, sparsity}}, "numel", "nonzeros", "sparsity"}``.
    """
    if isinstance(model_or_state_dict, nn.Module):
        tensors = model_or_state_dict.state_dict()
        if prunable_names is None:
            prunable_names = [f"{name}.weight" for name, _ in find_prunable(model_or_state_dict)]
    else:
        tensors = model_or_state_dict
        if prunable_names is None:
            prunable_names = [
                key for key, value in tensors.items()
                if key.endswith("weight") and isinstance(value, torch.Tensor)
                and value.dim() == 4 and value.is_floating_point()
            ]
    layers = {}
    for name in prunable_names:
        if name not in tensors:
            raise ConfigError(f"no weight named {name!r} to report on; expected a state-dict key such as "
                              f"{next(iter(tensors), 'body.0.weight')!r}")
        weight = tensors[name]
        layers[name] = layer_entry(weight.shape, weight.numel(), int(torch.count_nonzero(weight)))
    return summarize(layers)
