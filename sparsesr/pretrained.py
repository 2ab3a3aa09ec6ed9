"""The models shipped inside the package, by name: ``x2`` (default x2), ``x4`` (default x4), ``fast``.

Files live in ``sparsesr/assets/models/`` (or the folder named by ``SPARSESR_MODEL_DIR``, which
tests and users with their own set of models can point elsewhere). Sparsity, size and quality are
read from each file, not written here, so the table cannot go stale.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sparsesr.errors import ModelNotFoundError


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    filename: str
    scale: int
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel("x2", "edsr-baseline-x2.sparsesr.safetensors", 2, "default x2: EDSR-baseline (64 channels) 90% sparse, best quality"),
        EmbeddedModel("x4", "edsr-cpu-x4.sparsesr.safetensors", 4, "default x4: pruned EDSR, balanced quality and speed"),
        EmbeddedModel("fast", "edsr-cpu-x2-fast.sparsesr.safetensors", 2, "x2: small EDSR (32 channels) 90% sparse, fastest, softer"),
    )
}
DEFAULT_FOR_SCALE = {2: "x2", 4: "x4"}


def model_dir() -> Path:
    """Where embedded model files are looked up: ``$SPARSESR_MODEL_DIR`` or ``sparsesr/assets/models``."""
    override = os.environ.get("SPARSESR_MODEL_DIR")
    return Path(override) if override else Path(__file__).parent / "assets" / "models"


def default_model_name(scale: float) -> str:
    """The embedded model for a requested scale: the exact one if it exists, else the largest below
    it (or x2), whose output is then resized to ``scale``."""
    if int(scale) == scale and int(scale) in DEFAULT_FOR_SCALE:
        return DEFAULT_FOR_SCALE[int(scale)]
    return "x4" if scale > 4 else "x2"


def resolve_model(name_or_path: str | os.PathLike | None, scale: float = 2, also: tuple[str, ...] = ()) -> Path:
    """A model file path from what a user typed: the one resolver of every command and of ``sparsesr.load``.

    An existing file wins (a file called ``x2`` in the current folder is that file); else an
    embedded name (``x2``, ``x4``, ``fast``; None = the default for ``scale``). Anything else
    raises ``ModelNotFoundError`` listing the embedded names and ``also`` (names the caller
    handles itself, e.g. ``bicubic``).
    """
    if name_or_path is None:
        name_or_path = default_model_name(scale)
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if name in EMBEDDED_MODELS:
        embedded = model_dir() / EMBEDDED_MODELS[name].filename
        if not embedded.is_file():
            raise ModelNotFoundError(f"no embedded {name} model in this installation (expected {embedded}); "
                                     "name a model file instead")
        return embedded
    names = ", ".join([*also, *EMBEDDED_MODELS])
    what = "a folder" if path.is_dir() else "no such file"
    raise ModelNotFoundError(f"{name}: {what}, and not an embedded model ({names})")


def list_models() -> list[dict]:
    """One row per embedded model: name, scale, description, file, present, sparsity, size, PSNR."""
    from sparsesr.format import read_file

    rows = []
    for model in EMBEDDED_MODELS.values():
        path = model_dir() / model.filename
        row = {"name": model.name, "scale": model.scale, "description": model.description, "file": str(path),
               "present": path.is_file(), "sparsity": None, "size_bytes": None, "psnr": None}
        if row["present"]:
            summary = read_file(path).summary()
            row.update(sparsity=summary["sparsity"], size_bytes=summary["size_bytes"],
                       psnr=_psnr_of(summary.get("provenance") or {}))
        rows.append(row)
    return rows


def _psnr_of(provenance: dict) -> dict | None:
    """``{dataset: PSNR}`` from the file's provenance ``quality`` record (a dict or a JSON string)."""
    quality = provenance.get("quality")
    if isinstance(quality, str):
        try:
            quality = json.loads(quality)
        except ValueError:
            return None
    if not isinstance(quality, dict):
        return None
    psnr = {}
    for dataset, value in quality.items():
        if isinstance(value, dict) and isinstance(value.get("psnr"), (int, float)):
            psnr[dataset] = float(value["psnr"])
        elif isinstance(value, (int, float)):
            psnr[dataset] = float(value)
    return psnr or None
