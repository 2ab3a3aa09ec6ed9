"""Pruners: masks on conv weights, applied in the forward pass, updated by a method's rule.

The training loop talks to every method the same way::

    pruner = build_pruner(model, method="dup", sparsity=0.9, end_step=10_000)
    pruner.before_training()
    for step in range(1, n_steps + 1):
        ...; loss.backward(); optimizer.step()
        pruner.after_step(step)
    pruner.finalize()          # zeros baked into the weights, hooks removed

How the mask reaches the forward pass: a forward pre-hook computes ``W*M`` and puts it in the
module's instance ``__dict__`` under ``"weight"``, which Python finds before ``nn.Module``'s
parameter lookup; a forward hook removes it again. The parameter itself stays registered as
``weight``, so ``state_dict()`` keys, the optimizer and DDP see the plain model.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sparsesr.errors import CheckpointError
from sparsesr.pruning.config import (
    DUPConfig, GMPConfig, MagnitudeConfig, PruneConfig, config_from_dict, parse_granularity,
)
from sparsesr.pruning.layers import find_prunable, layer_entry, sparsity_report, summarize
from sparsesr.pruning.masks import (
    block_scores, block_sizes, cubic_sparsity, expand_blocks, keep_top, reduce_to_blocks,
)


class _StraightThrough(torch.autograd.Function):
    """Forward: W*M. Backward: the gradient reaches all of W (DNS), so pruned weights keep learning."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return weight * mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _drop_masked_weight(module: nn.Module, args: Any, output: Any) -> None:
    module.__dict__.pop("weight", None)


class Pruner:
    """Masks for the prunable conv weights of ``model``, and the hooks that apply them.

    Subclasses decide the masks in ``_on_step``. ``forward_mode`` says how masks reach the forward:
    ``"hard"`` (W*M, pruned weights get zero gradient), ``"straight_through"`` (W*M, all of W gets
    the gradient) or ``"off"`` (W as is).
    """

    def __init__(self, model: nn.Module, config: PruneConfig) -> None:
        self.model = model
        self.config = config
        self.block = parse_granularity(config.granularity)
        prunable = find_prunable(model, config.include, config.exclude)
        self.modules = {f"{name}.weight": module for name, module in prunable}
        self.masks = {name: torch.ones_like(m.weight, dtype=torch.bool) for name, m in self.modules.items()}
        self.step: int | None = None  # last finished optimizer step seen; None = not started
        self.frozen = False
        self.finalized = False
        self._handles = []
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._make_pre_hook(name)))
            self._handles.append(module.register_forward_hook(_drop_masked_weight, always_call=True))

    # --- what the training loop calls -------------------------------------------------------
    @property
    def prunable_names(self) -> list[str]:
        """State-dict keys of the pruned weights, e.g. ``["body.0.body.0.weight", ...]``."""
        return list(self.modules)

    @property
    def forward_mode(self) -> str:
        return "hard"

    def scheduled_sparsity(self, step: int) -> float:
        return self.config.sparsity

    def before_training(self) -> None:
        """Step 0: prune what the method prunes before any training. No-op once started or resumed."""
        if self.step is not None:
            return
        self.step = 0
        self._on_step(0)

    def after_step(self, step: int) -> None:
        """Call after every ``optimizer.step()``; ``step`` = number of finished steps (1-based)."""
        if self.finalized:
            raise RuntimeError("after_step() called on a finalized pruner")
        if self.step is None:
            self.before_training()
        self.step = step
        self._on_step(step)

    @torch.no_grad()
    def finalize(self) -> None:
        """Bake the masks into the weights (exact zeros) and remove the hooks: the model is plain again."""
        if self.finalized:
            return
        self._zero_pruned()
        for handle in self._handles:
            handle.remove()
        for module in self.modules.values():
            module.__dict__.pop("weight", None)
        self._handles = []
        self.finalized = True

    def report(self) -> dict:
        """Per-layer {shape, numel, nonzeros, sparsity} of the masks, overall totals, and the state."""
        layers = {n: layer_entry(mask.shape, mask.numel(), int(mask.sum())) for n, mask in self.masks.items()}
        step = self.step or 0
        return {**summarize(layers), "method": self.config.method, "step": step, "frozen": self.frozen,
                "scheduled_sparsity": self.scheduled_sparsity(step)}

    @torch.no_grad()
    def effective_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """A copy of ``state_dict`` (default: the model's) holding the weights the forward pass uses.

        That is W*M with pruned weights exactly zero, except while ``dup`` searches with ``shrink``
        set: then the forward uses W itself (pruned weights shrunk, not zero) and W is returned.
        For checkpoints that must compute what the hooked model computes, or an EMA copy (same keys).
        """
        out = dict(self.model.state_dict() if state_dict is None else state_dict)
        if self.forward_mode == "off":
            return out
        for name, mask in self.masks.items():
            if name not in out:
                raise CheckpointError(f"state dict has no weight {name!r} to mask")
            out[name] = out[name] * mask.to(out[name].device)
        return out

    def state_dict(self) -> dict:
        """Masks and internal state; with the model's own state dict this resumes exactly."""
        return {
            "method": self.config.method,
            "config": self.config.to_dict(),
            "step": self.step,
            "frozen": self.frozen,
            "masks": {name: mask.detach().cpu().clone() for name, mask in self.masks.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        method = state.get("method")
        if method != self.config.method:
            raise CheckpointError(
                f"pruner state is for method {method!r}, but this pruner is {self.config.method!r}"
            )
        masks = state.get("masks", {})
        if set(masks) != set(self.masks):
            raise CheckpointError(
                f"pruner state has masks for {sorted(masks)}, expected masks for {sorted(self.masks)}"
            )
        for name, mask in masks.items():
            if tuple(mask.shape) != tuple(self.masks[name].shape):
                raise CheckpointError(
                    f"pruner mask {name!r} has shape {list(mask.shape)}, expected {list(self.masks[name].shape)}"
                )
        for name, mask in masks.items():
            self.masks[name] = mask.to(device=self.modules[name].weight.device, dtype=torch.bool).clone()
        self.step = state.get("step")
        self.frozen = bool(state.get("frozen", False))

    # --- shared machinery -----------------------------------------------------------------
    def _on_step(self, step: int) -> None:
        raise NotImplementedError

    def _make_pre_hook(self, name: str):
        # A closure rather than a bound method: copy.deepcopy(model) (e.g. for an EMA model)
        # then shares this pruner's masks instead of copying the whole pruner.
        def apply_mask(module: nn.Module, args: Any) -> None:
            mode = self.forward_mode
            if self.finalized or mode == "off":
                return
            weight = module._parameters["weight"]
            mask = self._mask_for(name, weight)
            if mode == "straight_through":
                module.__dict__["weight"] = _StraightThrough.apply(weight, mask)
            else:
                module.__dict__["weight"] = weight * mask
        return apply_mask

    def _mask_for(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        mask = self.masks[name]
        if mask.device != weight.device:  # the model was moved after the pruner was built
            mask = self.masks[name] = mask.to(weight.device)
        return mask

    def _weights(self) -> dict[str, torch.Tensor]:
        return {name: module._parameters["weight"] for name, module in self.modules.items()}

    @torch.no_grad()
    def _zero_pruned(self) -> None:
        # Keeps pruned weights exactly zero even when Adam's momentum or weight decay would move them.
        for name, weight in self._weights().items():
            weight.mul_(self._mask_for(name, weight))

    @torch.no_grad()
    def _decide_masks(self, sparsity: float, hysteresis: float = 0.0, regrow: bool = True) -> None:
        """Re-decide every mask so that ``sparsity`` of all prunable weights is pruned.

        Blocks are ranked by score (L2 norm; divided by the layer's RMS for "layer_normalized").
        Hysteresis multiplies live scores by (1+h) and pruned ones by (1-h) before one exact top-k:
        this is the rule "keep a live block iff score >= (1-h)T, restore a pruned one iff
        score >= (1+h)T" with T chosen so the schedule's sparsity is hit exactly.
        Without regrowth pruned blocks can never be chosen again.
        """
        cfg = self.config
        names, scores, sizes = [], [], []
        for name, weight in self._weights().items():
            mask = self._mask_for(name, weight)
            score = block_scores(weight, self.block)
            if cfg.balance == "layer_normalized":
                # The scale of the layer as it currently is: RMS of its live weights.
                values = weight.detach().float()
                live_values = values[mask] if mask.any() else values
                rms = live_values.square().mean().sqrt()
                score = score / rms.clamp_min(torch.finfo(torch.float32).tiny)
            is_live = reduce_to_blocks(mask, self.block)
            score = torch.where(is_live, score * (1.0 + hysteresis), score * (1.0 - hysteresis))
            if not regrow:
                score = score.masked_fill(~is_live, -math.inf)
            names.append(name)
            scores.append(score)
            sizes.append(block_sizes(weight.shape, self.block, weight.device))

        numels = [self.masks[n].numel() for n in names]
        floors = [math.ceil(cfg.min_density * n - 1e-9) for n in numels]  # 1e-9: 0.07*100 is 7.000...01
        if cfg.balance == "uniform":
            chosen = [
                keep_top(score, size, max(n - round(sparsity * n), floor))
                for score, size, n, floor in zip(scores, sizes, numels, floors)
            ]
        else:
            # min_density: each layer's best blocks up to its floor are kept before the global ranking.
            reserved = [keep_top(score, size, floor) for score, size, floor in zip(scores, sizes, floors)]
            ranked = torch.cat([torch.where(r, math.inf, s) for r, s in zip(reserved, scores)])
            total = sum(numels)
            kept = keep_top(ranked, torch.cat(sizes), total - round(sparsity * total))
            chosen = [c | r for c, r in zip(torch.split(kept, [s.numel() for s in scores]), reserved)]
        for name, block_mask in zip(names, chosen):
            self.masks[name] = expand_blocks(block_mask, self.masks[name].shape, self.block).contiguous()


class MagnitudePruner(Pruner):
    """One-shot magnitude pruning at step 0; the mask never changes and pruned weights stay zero."""

    def _on_step(self, step: int) -> None:
        if not self.frozen:
            self._decide_masks(self.config.sparsity)
            self.frozen = True
        self._zero_pruned()


class GMPPruner(Pruner):
    """Gradual magnitude pruning (Zhu & Gupta 2017): cubic schedule, once pruned always pruned."""

    config: GMPConfig

    def scheduled_sparsity(self, step: int) -> float:
        c = self.config
        if step < c.start_step:
            return 0.0
        return cubic_sparsity(step, c.start_step, c.end_step, c.initial_sparsity, c.sparsity)

    def _is_update_step(self, step: int) -> bool:
        c = self.config
        if self.frozen or step < c.start_step:
            return False
        return step >= c.end_step or (step - c.start_step) % c.update_every == 0

    def _on_step(self, step: int) -> None:
        if self._is_update_step(step):
            self._decide_masks(self.scheduled_sparsity(step), regrow=False)
            self.frozen = step >= self.config.end_step
        self._zero_pruned()


class DUPPruner(GMPPruner):
    """Dynamic unstructured pruning: GMP's schedule, plus regrowth, hysteresis and soft shrinkage.

    While searching (step <= end_step) masks are re-decided from all weights; with ``shrink=None``
    the forward uses W*M and pruned weights keep learning through a straight-through gradient;
    with ``shrink=alpha`` the forward uses W and pruned weights are multiplied by alpha after each
    step. After end_step the masks freeze, pruned weights are hard zero, and training fine-tunes.
    """

    config: DUPConfig

    @property
    def forward_mode(self) -> str:
        if self.frozen:
            return "hard"
        return "off" if self.config.shrink is not None else "straight_through"

    @torch.no_grad()
    def _on_step(self, step: int) -> None:
        c = self.config
        if self._is_update_step(step):
            self._decide_masks(self.scheduled_sparsity(step), hysteresis=c.hysteresis, regrow=c.regrow)
            self.frozen = step >= c.end_step
        if self.frozen:
            self._zero_pruned()
        elif c.shrink is not None:
            for name, weight in self._weights().items():
                mask = self._mask_for(name, weight)
                weight.copy_(torch.where(mask, weight, weight * c.shrink))


PRUNERS: dict[str, type[Pruner]] = {"dup": DUPPruner, "magnitude": MagnitudePruner, "gmp": GMPPruner}


def build_pruner(model: nn.Module, method: str = "dup", **options: Any) -> Pruner:
    """The pruner for ``method`` ("dup", "magnitude", "gmp") with ``options`` (the TOML [prune] keys).

    Raises ConfigError for an unknown method, an unknown option or a bad value.
    """
    config = config_from_dict({"method": method, **options})
    return PRUNERS[config.method](model, config)


def one_shot_prune(
    model: nn.Module,
    sparsity: float,
    granularity: str = "1x1",
    balance: str = "global",
    min_density: float = 0.0,
    include: str | list[str] | None = None,
    exclude: str | list[str] = (),
) -> dict:
    """Magnitude-prune ``model`` in place (exact zeros, no hooks left) and return its sparsity report."""
    config = MagnitudeConfig(sparsity=sparsity, granularity=granularity, balance=balance,
                             min_density=min_density, include=include, exclude=exclude)
    pruner = MagnitudePruner(model, config)
    pruner.before_training()
    pruner.finalize()
    return sparsity_report(model, pruner.prunable_names)


__all__ = [
    "Pruner", "MagnitudePruner", "GMPPruner", "DUPPruner", "PRUNERS", "build_pruner", "one_shot_prune",
]
