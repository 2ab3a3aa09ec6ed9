"""Export trained checkpoints as the package's embedded models, with their measured scores.

    python tools/ship_models.py NAME=RUN_DIR [NAME=RUN_DIR ...]     e.g.  x2=runs/dup-x2-s75 fast=runs/dup-x2-s90

For each pair: reads RUN_DIR/model.safetensors and RUN_DIR/eval.json (from `sparsesr eval --json`),
records the scores in the checkpoint's metadata as ``quality``, and exports it (fp16, auto layout)
to sparsesr/assets/models/<file of NAME in sparsesr.pretrained>.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from sparsesr.format import export
from sparsesr.models import model_from_config
from sparsesr.models.checkpoint import load_checkpoint, load_state_dict_strict, save_checkpoint
from sparsesr.pretrained import EMBEDDED_MODELS, model_dir


def ship(name: str, run_dir: Path) -> None:
    entry = EMBEDDED_MODELS.get(name)
    if entry is None:
        raise SystemExit(f"unknown embedded model {name!r}; expected one of {sorted(EMBEDDED_MODELS)}")
    ckpt = load_checkpoint(run_dir / "model.safetensors")
    scores = json.loads((run_dir / "eval.json").read_text())
    model = model_from_config(ckpt.config)
    load_state_dict_strict(model, ckpt.state_dict)
    keep = {k: v for k, v in ckpt.metadata.items() if k not in ("format", "arch", "config")}
    keep["quality"] = {dataset: {"psnr": row["psnr"], "ssim": row["ssim"]} for dataset, row in scores.items()}
    keep["trained_in"] = str(run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / f"{run_dir.name}.safetensors"
        save_checkpoint(source, model, keep)
        report = export(source, model_dir() / entry.filename, dtype="fp16", layout="auto")
    print(f"{name}: {run_dir} -> {report.path} ({report.size_bytes:,} bytes, sparsity {report.sparsity:.3f})")


if __name__ == "__main__":
    for pair in sys.argv[1:]:
        name, _, run = pair.partition("=")
        ship(name, Path(run))
