"""The training loop: dense training, fine-tuning, and pruning during training.

One function, ``train(config, out_dir)``. Every batch is a pure function of (seed, step, rank),
so a run that is stopped and resumed with ``resume=True`` continues exactly where it stopped,
and under ``torchrun`` each process draws its own batches without a sampler to keep in sync.

Files written to ``out_dir`` (all atomically):
  state.pt            resumable state: raw weights, optimizer, schedule, EMA, pruning masks, step
  last.safetensors    the model as it would be used (masks applied), every ``save_every`` steps
  best.safetensors    the model with the best validation PSNR so far
  model.safetensors   the final model (pruned runs: exact zeros baked in)
  log.jsonl           one JSON object per logged step and per validation
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sparsesr.errors import ConfigError
from sparsesr.fileio import atomic_path, sha256_of
from sparsesr.models import build_model, model_from_config
from sparsesr.models.checkpoint import load_checkpoint, load_state_dict_strict, save_checkpoint
from sparsesr.train.config import TrainConfig


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    seconds: float
    val_psnr: float | None
    val_ssim: float | None
    model_path: Path


def train(config: TrainConfig, out_dir: str | os.PathLike, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train (and optionally prune) a model as ``config`` says; see the module docstring for outputs."""
    from sparsesr.data.datasets import SRImageDataset, SRPatchDataset, list_images, split_holdout

    out_dir = Path(out_dir)
    rank, world = _init_distributed()
    cfg, tcfg = config, config.train
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    if cfg.prune and tcfg.ema:
        raise ConfigError("train.ema cannot be combined with [prune]: the average of masked weights is not masked")
    torch.manual_seed(tcfg.seed)

    model, init_meta = _initial_model(cfg)
    pruner = _build_pruner(model, cfg.prune) if cfg.prune else None
    optimizer = torch.optim.Adam(model.parameters(), lr=tcfg.lr, betas=tuple(tcfg.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    ema = copy.deepcopy(model).eval().requires_grad_(False) if tcfg.ema else None

    paths = list_images(cfg.data.train)
    train_paths, val_paths = split_holdout(paths, cfg.data.holdout, seed=0)
    dataset = SRPatchDataset(
        train_paths, cfg.model.scale, patch_size=cfg.data.patch_size, augment=True, seed=tcfg.seed,
        length=tcfg.iterations * tcfg.batch_size * world,
    )
    val_set = SRImageDataset(val_paths, cfg.model.scale) if val_paths else None

    step, best_psnr, history = 0, -math.inf, []
    state_path = out_dir / "state.pt"
    if resume:
        if not state_path.is_file():
            raise ConfigError(f"{state_path}: nothing to resume (no training state in {out_dir})")
        step, best_psnr = _load_state(state_path, model, optimizer, scheduler, ema, pruner)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        if pruner is not None:
            pruner.before_training()
    if rank == 0:
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    meta = {"train_config": cfg.to_dict(), **init_meta}
    bar = tqdm(total=tcfg.iterations, initial=step, desc="train", disable=not progress or rank != 0, dynamic_ncols=True)
    start, start_step = time.time(), step
    last_val: dict | None = None
    while step < tcfg.iterations:
        lr_batch, hr_batch = _batch(dataset, step, rank, world, tcfg.batch_size)
        net.train()
        loss = F.l1_loss(net(lr_batch), hr_batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        if pruner is not None:
            pruner.after_step(step)
        if ema is not None:
            _update_ema(ema, model, tcfg.ema)
        bar.update(1)
        postfix = {"loss": f"{loss.item():.4f}"}
        if last_val:
            postfix["val_psnr"] = f"{last_val['psnr']:.2f}"
        bar.set_postfix(postfix, refresh=False)
        if rank == 0 and (step % tcfg.log_every == 0 or step == tcfg.iterations):
            _log(out_dir, {"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0], "time": time.time() - start})
        if val_set is not None and rank == 0 and (step % tcfg.val_every == 0 or step == tcfg.iterations):
            last_val = validate(ema or model, val_set, cfg.model.scale, val_crop=cfg.data.val_crop)
            _log(out_dir, {"step": step, "val": last_val})
            history.append({"step": step, **last_val})
            if last_val["psnr"] > best_psnr:
                best_psnr = last_val["psnr"]
                _save_model(out_dir / "best.safetensors", ema or model, pruner, {**meta, "step": step, "val": last_val})
        if rank == 0 and (step % tcfg.save_every == 0 or step == tcfg.iterations):
            _save_state(state_path, step, best_psnr, model, optimizer, scheduler, ema, pruner)
            _save_model(out_dir / "last.safetensors", ema or model, pruner, {**meta, "step": step, "val": last_val})
    bar.close()

    if world > 1:
        _check_replicas_agree(model, out_dir, rank)
    final = ema or model
    final_meta = {**meta, "step": step, "val": last_val}
    if pruner is not None:
        pruner.finalize()
        final_meta["pruning"] = {"config": cfg.prune, "report": pruner.report()}
    model_path = out_dir / "model.safetensors"
    if rank == 0:
        save_checkpoint(model_path, final, final_meta)
    seconds = time.time() - start
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(
        out_dir=out_dir,
        steps=step - start_step,
        seconds=seconds,
        val_psnr=last_val["psnr"] if last_val else None,
        val_ssim=last_val["ssim"] if last_val else None,
        model_path=model_path,
    )


@torch.no_grad()
def validate(model: nn.Module, val_set, scale: int, val_crop: int = 0) -> dict:
    """Mean Y-channel PSNR / SSIM of ``model`` over whole validation images (8-bit, crop = scale)."""
    from sparsesr.evaluate import score_pair

    was_training = model.training
    model.eval()
    scores = []
    for lr, hr, _name in val_set:
        if val_crop:
            lr, hr = _center_crop(lr, hr, val_crop, scale)
        scores.append(score_pair(model, lr, hr, scale))
    model.train(was_training)
    n = len(scores)
    return {"psnr": sum(p for p, _ in scores) / n, "ssim": sum(s for _, s in scores) / n, "images": n}


def _center_crop(lr: torch.Tensor, hr: torch.Tensor, size: int, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = lr.shape[-2:]
    s = max(1, size // scale)
    top, left = max(0, (h - s) // 2), max(0, (w - s) // 2)
    lr = lr[..., top : top + s, left : left + s]
    hr = hr[..., top * scale : (top + s) * scale, left * scale : (left + s) * scale]
    return lr, hr


def _batch(dataset, step: int, rank: int, world: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Sample i of the whole run is dataset[i]: deterministic, disjoint across ranks, resumable.
    first = (step * world + rank) * batch_size
    pairs = [dataset[first + j] for j in range(batch_size)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def _initial_model(cfg: TrainConfig) -> tuple[nn.Module, dict]:
    if not cfg.model.init:
        sizes = {k: v for k in ("n_resblocks", "n_feats") if (v := getattr(cfg.model, k)) is not None}
        return build_model(cfg.model.arch, cfg.model.scale, **sizes), {}
    ckpt = load_checkpoint(cfg.model.init)
    init = {"path": str(cfg.model.init), "sha256": sha256_of(cfg.model.init)}
    if ckpt.config.scale == cfg.model.scale:
        model = model_from_config(ckpt.config)
        load_state_dict_strict(model, ckpt.state_dict, source=cfg.model.init)
        return model, {"init": init}
    if not cfg.model.init_other_scale:
        raise ConfigError(f"model.init {cfg.model.init} is a x{ckpt.config.scale} model, but model.scale is "
                          f"{cfg.model.scale} (set model.init_other_scale = true to start from it without its upsampler)")
    # A model of another scale shares everything but the upsampler (the usual way to start x4
    # from x2): load those weights and leave the new upsampler freshly initialised.
    model = model_from_config(dataclasses.replace(ckpt.config, scale=cfg.model.scale))
    fresh = {k: v for k, v in model.state_dict().items() if k.startswith("tail.0.")}
    load_state_dict_strict(model, {**{k: v for k, v in ckpt.state_dict.items() if not k.startswith("tail.0.")}, **fresh},
                           source=cfg.model.init)
    init["transferred_from_scale"] = ckpt.config.scale
    return model, {"init": init}


def _build_pruner(model: nn.Module, options: dict):
    from sparsesr.pruning import build_pruner

    options = dict(options)
    method = options.pop("method", None)
    if method is None:
        raise ConfigError("[prune] needs a method (dup, magnitude or gmp)")
    return build_pruner(model, method=method, **options)


def _lr_lambda(cfg: TrainConfig):
    t = cfg.train
    floor = t.min_lr / t.lr

    def factor(step: int) -> float:
        if t.schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, t.iterations) / t.iterations))
        if t.schedule == "multistep":
            return t.gamma ** sum(step >= m for m in t.milestones)
        return 1.0

    return factor


@torch.no_grad()
def _update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def _init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _check_replicas_agree(model: nn.Module, out_dir: Path, rank: int) -> None:
    """DDP keeps replicas identical; check it, so a broken setup cannot go unnoticed."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    values = [float(g) for g in gathered]
    agree = max(values) - min(values) <= 1e-9 * max(1.0, abs(values[0]))
    if rank == 0:
        _log(out_dir, {"replicas": values, "replicas_agree": agree})
    if not agree:
        raise RuntimeError(f"DDP replicas diverged: parameter checksums {values}")


def _save_model(path: Path, model: nn.Module, pruner, metadata: dict) -> None:
    if pruner is None:
        save_checkpoint(path, model, metadata)
        return
    # Save what the network computes (W * M), not the raw weights the search keeps training.
    effective = copy.deepcopy(model)
    effective.load_state_dict(pruner.effective_state_dict())
    save_checkpoint(path, effective, {**metadata, "pruning": {"report": pruner.report()}})


def _save_state(path: Path, step: int, best_psnr: float, model, optimizer, scheduler, ema, pruner) -> None:
    state = {
        "step": step,
        "best_psnr": best_psnr,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "pruner": pruner.state_dict() if pruner is not None else None,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path, model, optimizer, scheduler, ema, pruner) -> tuple[int, float]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])
    if pruner is not None:
        if state["pruner"] is None:
            raise ConfigError(f"{path}: the saved run has no pruning state, but the config has [prune]")
        pruner.load_state_dict(state["pruner"])
    return int(state["step"]), float(state["best_psnr"])


def _log(out_dir: Path, record: dict) -> None:
    with open(out_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
