"""``sparsesr info``: what is in a checkpoint or an exported sparse file."""
from __future__ import annotations

import os
from pathlib import Path


def describe_model_file(path: str | os.PathLike) -> dict:
    """Per-layer shape, nonzeros and sparsity of a checkpoint or exported file.

    Returns ``{"path", "kind", "family", "arch", "model", "scale", "config", "layers": [{name, shape,
    layout, sparsity, nnz, bytes}], "sparsity", "size_bytes", ...}`` (the same rows as
    ``sparsesr.format.describe``) where ``model`` is one line naming the family, preset and config,
    and the top-level ``sparsity`` is over the pruned (sparse-eligible) layers: every conv but the
    first and the last.
    """
    from sparsesr.format import is_sparse_model_file

    path = Path(path)
    if is_sparse_model_file(path):
        from sparsesr.format import describe

        info = {"path": str(path), "kind": "exported", **describe(path)}
    else:
        info = _describe_checkpoint(path)
    info["model"] = model_line(info["family"], info["arch"], info["config"])
    return info


def model_line(family: str, arch: str, config: dict) -> str:
    """``"srvgg (srvgg-cpu preset) x4: n_feats 32, num_conv 8, act_type prelu, n_colors 3"``."""
    from sparsesr.models import get_family

    name = get_family(family).build.__name__
    preset = "custom" if arch.endswith("-custom") else f"{arch} preset"
    fields = ", ".join(f"{k} {v}" for k, v in config.items() if k != "scale")
    return f"{family} ({name}, {preset}) x{config.get('scale')}: {fields}"


def _describe_checkpoint(path: Path) -> dict:
    from sparsesr.errors import CheckpointError
    from sparsesr.format.spec import expected_structure, sparse_eligible
    from sparsesr.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    convs, _ = expected_structure(ckpt.config)  # forward order (file keys are sorted by name)
    missing = [f"{n}.weight" for n in convs if f"{n}.weight" not in ckpt.state_dict]
    if missing:
        raise CheckpointError(f"{path}: missing conv weights {', '.join(missing[:5])}")
    eligible = set(sparse_eligible(convs))
    layers, numel, nonzeros = [], 0, 0
    for name in convs:
        w = ckpt.state_dict[f"{name}.weight"]
        nz = int((w != 0).sum())
        layers.append({"name": name, "shape": list(w.shape), "layout": "dense", "dtype": str(w.dtype).replace("torch.", ""),
                       "sparsity": 1 - nz / w.numel(), "nnz": nz, "bytes": w.numel() * w.element_size(),
                       "pruned": name in eligible})
        if name in eligible:
            numel, nonzeros = numel + w.numel(), nonzeros + nz
    return {
        "path": str(path),
        "kind": "checkpoint",
        "family": ckpt.family,
        "arch": ckpt.arch,
        "scale": ckpt.config.scale,
        "config": ckpt.config.to_dict(),
        "layers": layers,
        "numel": numel,
        "nonzeros": nonzeros,
        "sparsity": 1 - nonzeros / numel if numel else 0.0,
        "size_bytes": path.stat().st_size,
        "pruning": ckpt.metadata.get("pruning"),
        "val": ckpt.metadata.get("val"),
    }
