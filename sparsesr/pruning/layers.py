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
    "the first" either). Default: all of them except the conv that reads the image and the one
    that writes the output (``image_convs``), which hold few weights and are the most sensitive.
    ``include`` replaces that default by regexes over the module names; ``exclude`` then removes
    matches.
    """
    convs = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and module.weight.requires_grad
    ]
    if include is None:
        ends = set(image_convs(model, convs)) if convs else set()
        selected = [(n, m) for n, m in convs if n not in ends]
    else:
        selected = [(n, m) for n, m in convs if any(re.search(p, n) for p in include)]
    selected = [(n, m) for n, m in selected if not any(re.search(p, n) for p in exclude)]
    if not selected:
        raise ConfigError(
            f"no prunable Conv2d found (include={include}, exclude={list(exclude)}); "
            f"the model's trainable Conv2d modules are: {[n for n, _ in convs] or 'none'}"
        )
    return selected


def image_convs(model: nn.Module, convs: list[tuple[str, nn.Conv2d]] | None = None) -> tuple[str, str]:
    """Names of the first and the last of ``convs`` (default: the trainable ones) that a forward
    pass runs: the conv that reads the image and the one that writes the output.

    Found by running ``model`` once on an 8x8 zero image with hooks on the convs, so any
    architecture is read correctly (EDSR ``head.0`` / ``tail.1``, MSRResNet and RRDBNet
    ``conv_first`` / ``conv_last``, SRVGG ``body.0`` / its last conv). That needs the number of
    image channels: ``model.config.n_colors``, which every sparsesr family has. Without it, or if
    that forward pass fails, the first and last in registration order are taken.
    """
    if convs is None:
        convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad]
    order = _forward_order(model, convs)
    names = order or [name for name, _ in convs]
    return names[0], names[-1]


def _forward_order(model: nn.Module, convs: list[tuple[str, nn.Conv2d]]) -> list[str]:
    """The names of ``convs`` in the order one forward pass runs them ([] if it cannot be run)."""
    channels = getattr(getattr(model, "config", None), "n_colors", None)
    if not isinstance(channels, int) or not convs:
        return []
    weight = convs[0][1].weight
    if weight.device.type == "meta":
        return []
    order: list[str] = []
    handles = [m.register_forward_hook(lambda *_, name=name: order.append(name)) for name, m in convs]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            # Zeros, not random values: probing must not consume the caller's random stream.
            model(torch.zeros(1, channels, 8, 8, dtype=weight.dtype, device=weight.device))
    except (RuntimeError, ValueError, TypeError):
        return []
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return order


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
