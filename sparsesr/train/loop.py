"""The training loop: dense training, fine-tuning, and pruning during training.

One function, ``train(config, out_dir)``. Every batch is a pure function of (seed, step, rank),
so a run that is stopped and resumed with ``resume=True`` continues exactly where it stopped,
and under ``torchrun`` each process draws its own batches without a sampler to keep in sync.

Files written to ``out_dir`` (all atomically; see ``runlog`` for what that means for the log):
  config.json         the run's config, written when it starts; ``resume`` trains with it
  state.pt            resumable state: raw weights, optimizer, schedule, EMA, pruning masks, step,
                      with a SHA-256 checksum (``sparsesr.train.state``)
  last.safetensors    the model as it would be used (masks applied), every ``save_every`` steps
  best.safetensors    the model with the best validation PSNR so far
  model.safetensors   the final model (pruned runs: exact zeros baked in)
  log.jsonl           one JSON object per logged step and per validation; a resume from step N
                      first drops the records of steps after N, then notes the resume

Nothing non-finite is ever saved: when the loss or a weight becomes NaN or infinite, training
stops with a ``TrainingError`` naming the step.
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
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sparsesr.errors import CheckpointError, ConfigError, TrainingError
from sparsesr.fileio import atomic_write_bytes, sha256_of
from sparsesr.models import PRESETS, build_model, family_of, model_from_config
from sparsesr.models.checkpoint import load_checkpoint, load_state_dict_strict, save_checkpoint
from sparsesr.train.config import SCALES, TrainConfig, check_resume_config, read_saved_config
from sparsesr.train.runlog import append_record, truncate_log, write_log
from sparsesr.train.state import first_non_finite, load_train_state, save_train_state


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    seconds: float
    val_psnr: float | None
    val_ssim: float | None
    model_path: Path


def train(config: TrainConfig | None, out_dir: str | os.PathLike, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train (and optionally prune) a model as ``config`` says; see the module docstring for outputs.

    ``resume=True`` continues the run saved in ``out_dir`` with the config it was started with
    (its ``config.json``): ``config`` may then be None, and a given one must not differ from the
    saved one (``config.RESUME_MAY_CHANGE`` excepted), or ``ConfigError`` names the keys.
    """
    from sparsesr.data.datasets import SRImageDataset, SRPatchDataset, list_images, split_holdout

    out_dir = Path(out_dir)
    state_path, log_path, config_path = out_dir / "state.pt", out_dir / "log.jsonl", out_dir / "config.json"
    saved_config = None
    if resume:
        if not state_path.is_file():
            raise ConfigError(f"{state_path}: nothing to resume (no training state in {out_dir})")
        saved_config = read_saved_config(out_dir)
        if config is None:
            if saved_config is None:
                raise ConfigError(f"{config_path}: no saved config to resume with; pass the run's config")
            config = saved_config
        elif saved_config is not None:
            check_resume_config(saved_config, config.validate(), config_path)
    elif config is None:
        raise ConfigError("a config is needed to start a run (config=None only resumes one)")
    cfg = config.validate()
    tcfg = cfg.train
    rank, world = _init_distributed()
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
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
    saved_step: int | None = None  # the step state.pt holds, for the message if training diverges
    if resume:
        step, best_psnr, verified = _load_state(state_path, cfg, model, optimizer, scheduler, ema, pruner)
        saved_step = step
        if rank == 0:
            if saved_config is None:  # config.json was lost; the caller vouched for this config
                _write_config(config_path, cfg)
            # The steps after `step` are trained again: their records from the leg that was cut
            # off would otherwise appear twice (and a torn last line is dropped here too).
            dropped = truncate_log(log_path, step)
            _log(out_dir, {"resume": {"from_step": step, "dropped_records": dropped,
                                      "state_checksum": "verified" if verified else
                                      "none (state.pt was written by an older sparsesr; not verifiable)"}})
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        if pruner is not None:
            pruner.before_training()
        if rank == 0:
            # Starting over: a state left by an earlier run here must not be resumed with this
            # run's config.json, and its log records are not this run's.
            state_path.unlink(missing_ok=True)
            write_log(log_path, [])
            _write_config(config_path, cfg)

    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    meta = {"train_config": cfg.to_dict(), **init_meta}
    bar = tqdm(total=tcfg.iterations, initial=step, desc="train", disable=not progress or rank != 0, dynamic_ncols=True)
    start, start_step = time.time(), step
    last_val: dict | None = None
    while step < tcfg.iterations:
        lr_batch, hr_batch = _batch(dataset, step, rank, world, tcfg.batch_size)
        net.train()
        loss = F.l1_loss(net(lr_batch), hr_batch)
        loss_value = loss.item()
        if world == 1 and not math.isfinite(loss_value):  # under DDP the weight check below stops every rank alike
            raise TrainingError(_diverged(step + 1, f"the loss is {loss_value}", state_path, saved_step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        if pruner is not None:
            pruner.after_step(step)
        bad = first_non_finite(dict(model.named_parameters()))
        if bad is not None:
            raise TrainingError(_diverged(step, f"weight {bad} is not finite (loss {loss_value:.4g})", state_path, saved_step))
        if ema is not None:
            _update_ema(ema, model, tcfg.ema)
        bar.update(1)
        postfix = {"loss": f"{loss_value:.4f}"}
        if last_val:
            postfix["val_psnr"] = f"{last_val['psnr']:.2f}"
        bar.set_postfix(postfix, refresh=False)
        if rank == 0 and (step % tcfg.log_every == 0 or step == tcfg.iterations):
            _log(out_dir, {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "time": time.time() - start})
        if val_set is not None and rank == 0 and (step % tcfg.val_every == 0 or step == tcfg.iterations):
            last_val = validate(ema or model, val_set, cfg.model.scale, val_crop=cfg.data.val_crop)
            _log(out_dir, {"step": step, "val": last_val})
            history.append({"step": step, **last_val})
            if last_val["psnr"] > best_psnr:
                best_psnr = last_val["psnr"]
                _save_model(out_dir / "best.safetensors", ema or model, pruner, {**meta, "step": step, "val": last_val})
        if rank == 0 and (step % tcfg.save_every == 0 or step == tcfg.iterations):
            _save_state(state_path, step, best_psnr, model, optimizer, scheduler, ema, pruner)
            saved_step = step
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
        return build_model(cfg.model.arch, cfg.model.scale, **cfg.model.sizes()), {}
    ckpt = load_checkpoint(cfg.model.init)
    init = {"path": str(cfg.model.init), "sha256": sha256_of(cfg.model.init)}
    arch_family = family_of(PRESETS[cfg.model.arch]).name
    if ckpt.family != arch_family:  # the run's config.json would otherwise name the wrong network
        raise ConfigError(f"model.init {cfg.model.init} is a {ckpt.family} checkpoint, but model.arch "
                          f"{cfg.model.arch!r} is {arch_family}; set model.arch to a {ckpt.family} preset")
    if ckpt.config.scale == cfg.model.scale:
        model = model_from_config(ckpt.config)
        load_state_dict_strict(model, ckpt.state_dict, source=cfg.model.init)
        return model, {"init": init}
    if not cfg.model.init_other_scale:
        raise ConfigError(f"model.init {cfg.model.init} is a x{ckpt.config.scale} model, but model.scale is "
                          f"{cfg.model.scale} (set model.init_other_scale = true to start from it without its "
                          "scale-dependent tensors, e.g. the upsampler)")
    # A model of another scale shares everything but the tensors whose shapes depend on the scale
    # (the usual way to start x4 from x2): load the rest and leave those freshly initialised.
    config = dataclasses.replace(ckpt.config, scale=cfg.model.scale)  # the family's scales: checked with model.arch
    model = model_from_config(config)
    fresh = scale_dependent_keys(config)
    kept = {k: v for k, v in ckpt.state_dict.items() if k not in fresh}
    load_state_dict_strict(model, {**kept, **{k: v for k, v in model.state_dict().items() if k in fresh}},
                           source=cfg.model.init)
    init["transferred_from_scale"] = ckpt.config.scale
    init["fresh"] = sorted(fresh & set(model.state_dict()))
    return model, {"init": init}


def scale_dependent_keys(config: Any) -> set[str]:
    """State-dict keys of ``config``'s family whose tensors depend on the scale (missing at some
    scale the family supports, or shaped differently there), with the rest of their module, so a
    layer starts over whole. EDSR and MSRResNet: the upsampler; SRVGG: the last conv; RRDBNet: the
    first conv, which reads the pixel-unshuffled input at x2.

    Found by comparing the structures at every supported scale (built on the meta device), so a
    family needs no list of its own; and per family rather than per pair of scales, so x2 -> x4
    gets a whole new upsampler even where its first stage has the x2 shape.
    """
    from sparsesr.format.spec import expected_structure

    structures = []
    for scale in SCALES:
        try:
            structures.append(expected_structure(dataclasses.replace(config, scale=scale))[1])
        except ConfigError:  # a scale this family does not support
            continue
    everywhere = set.intersection(*(set(s) for s in structures))
    stable = {k for k in everywhere if len({s[k] for s in structures}) == 1}
    keys = set.union(*(set(s) for s in structures))
    modules = {k.rpartition(".")[0] for k in keys - stable}
    return {k for k in keys if k.rpartition(".")[0] in modules}


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
    save_train_state(path, {
        "step": step,
        "best_psnr": best_psnr,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "pruner": pruner.state_dict() if pruner is not None else None,
    })


def _load_state(path: Path, cfg: TrainConfig, model, optimizer, scheduler, ema, pruner) -> tuple[int, float, bool]:
    """Restore everything from ``path``; return (step, best PSNR, whether a checksum verified it)."""
    state, verified = load_train_state(path)  # checked: structure, checksum, finite values
    step = state["step"]
    if step > cfg.train.iterations:
        raise CheckpointError(f"{path}: the state is at step {step}, beyond train.iterations = {cfg.train.iterations}")
    load_state_dict_strict(model, state["model"], source=str(path))
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: the optimizer state does not fit this model ({exc})") from None
    # Adam's moments are not shape-checked by load_state_dict; a mismatch would fail mid-step.
    for param, moments in optimizer.state.items():
        for name, value in moments.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                raise CheckpointError(f"{path}: the optimizer state does not fit this model "
                                      f"({name} of shape {list(value.shape)} for a parameter of shape {list(param.shape)})")
    scheduler.load_state_dict(state["scheduler"])
    if (ema is None) != (state["ema"] is None):
        has = "has no" if state["ema"] is None else "has"
        raise CheckpointError(f"{path}: the state {has} EMA weights, but train.ema is {cfg.train.ema:g}")
    if ema is not None:
        load_state_dict_strict(ema, state["ema"], source=f"{path} (EMA weights)")
    if (pruner is None) != (state["pruner"] is None):
        has = "has no" if state["pruner"] is None else "has"
        raise CheckpointError(f"{path}: the state {has} pruning masks, but the config "
                              + ("has [prune]" if pruner is not None else "has no [prune]"))
    if pruner is not None:
        try:
            pruner.load_state_dict(state["pruner"])
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    return step, float(state["best_psnr"]), verified


def _diverged(step: int, what: str, state_path: Path, saved_step: int | None) -> str:
    kept = f"{state_path} holds step {saved_step}" if saved_step is not None else "no state was saved yet"
    return f"training diverged at step {step}: {what}; nothing non-finite was saved ({kept}); a lower train.lr may help"


def _write_config(path: Path, cfg: TrainConfig) -> None:
    atomic_write_bytes(path, (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())


def _log(out_dir: Path, record: dict) -> None:
    append_record(out_dir / "log.jsonl", record)
