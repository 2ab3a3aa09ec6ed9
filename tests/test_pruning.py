"""Tests for sparsesr.pruning on tiny models (each test runs in well under a second)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sparsesr.errors import CheckpointError, ConfigError
from sparsesr.pruning import (
    build_pruner, config_from_dict, cubic_sparsity, find_prunable, image_convs, one_shot_prune, sparsity_report,
)
from sparsesr.pruning.masks import block_grid


class TinyResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * self.body(x)


class TinyEDSR(nn.Module):
    """EDSR-shaped: head conv, residual blocks, body conv, upsampler conv, tail conv."""

    def __init__(self, channels: int = 8, blocks: int = 2) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(*[TinyResBlock(channels) for _ in range(blocks)],
                                  nn.Conv2d(channels, channels, 3, padding=1))
        self.tail = nn.Sequential(nn.Conv2d(channels, 4 * channels, 3, padding=1), nn.PixelShuffle(2),
                                  nn.Conv2d(channels, 3, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return self.tail(h + self.body(h))


def tiny_sequential() -> nn.Sequential:
    # Odd channel counts so 4x1 / 8x1 / 1x4 blocks do not tile the matrices exactly.
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(6, 10, 3, padding=1), nn.ReLU(), nn.Conv2d(10, 3, 1))


def train(model: nn.Module, pruner, steps: range, lr: float = 1e-2, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step in steps:
        x = torch.randn(2, 3, 6, 6, generator=gen)
        loss = model(x).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.after_step(step)


def kept(pruner) -> int:
    return sum(int(mask.sum()) for mask in pruner.masks.values())


pytestmark = pytest.mark.usefixtures("seeded_one_thread")


# --- selection of layers ----------------------------------------------------------------------
def test_default_targets_skip_first_and_last_conv_and_frozen_convs() -> None:
    model = TinyEDSR()
    names = [name for name, _ in find_prunable(model)]
    assert names == ["body.0.body.0", "body.0.body.2", "body.1.body.0", "body.1.body.2", "body.2", "tail.0"]
    model.head.weight.requires_grad_(False)  # a frozen conv (like EDSR's mean shift) is not "the first"
    assert [name for name, _ in find_prunable(model)][0] == "body.0.body.2"


class OutOfOrder(nn.Module):
    """Registers the conv that writes the output first: only running the model tells the ends apart."""

    class config:  # what image_convs reads to size its probe input, as on sparsesr's families
        n_colors = 3

    def __init__(self) -> None:
        super().__init__()
        self.to_image = nn.Conv2d(8, 3, 3, padding=1)
        self.from_image = nn.Conv2d(3, 8, 3, padding=1)
        self.middle = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_image(self.middle(self.from_image(x)))


def test_the_convs_left_dense_are_the_ones_that_read_and_write_the_image() -> None:
    model = OutOfOrder().train()
    rng_state = torch.get_rng_state()
    assert image_convs(model) == ("from_image", "to_image")
    assert [name for name, _ in find_prunable(model)] == ["middle.0", "middle.1"]
    assert model.training and torch.equal(torch.get_rng_state(), rng_state)  # the probe changes nothing
    # without config.n_colors there is nothing to probe with: registration order decides
    assert image_convs(TinyEDSR()) == ("head", "tail.2")


def test_include_and_exclude_regexes() -> None:
    model = TinyEDSR()
    names = [n for n, _ in find_prunable(model, include=[r"^body\.\d+\.body"], exclude=[r"body\.1\."])]
    assert names == ["body.0.body.0", "body.0.body.2"]
    with pytest.raises(ConfigError, match="no prunable Conv2d"):
        find_prunable(model, include=["nothing-matches"])


# --- configuration ----------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"method": "rigl", "sparsity": 0.5}, "prune.method must be one of"),
    ({"method": "gmp", "sparsity": 0.5, "end_step": 4, "hysteresis": 0.1}, "unknown option prune.hysteresis"),
    ({"method": "dup", "sparsity": 0.5, "end_step": 4, "hysteris": 0.1}, "did you mean 'hysteresis'"),
    ({"method": "dup", "sparsity": 0.5}, "prune.end_step is required"),
    ({"method": "magnitude", "sparsity": 1.0}, r"prune.sparsity must be in \[0, 1\)"),
    ({"method": "magnitude", "sparsity": 0.9, "min_density": 0.2}, "min_density must be at most"),
    ({"method": "magnitude", "sparsity": 0.5, "granularity": "4-1"}, "granularity must look like"),
    ({"method": "magnitude", "sparsity": 0.5, "balance": "layer"}, "balance must be one of"),
    ({"method": "gmp", "sparsity": 0.5, "start_step": 10, "end_step": 5}, "end_step must be an integer >= 10"),
    ({"method": "dup", "sparsity": 0.5, "end_step": 5, "shrink": 1.5}, "shrink must be in"),
    ({"method": "magnitude", "sparsity": 0.5, "include": "("}, "invalid regex"),
])
def test_bad_config_raises_config_error(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(options)


def test_config_round_trips_through_a_plain_dict() -> None:
    config = config_from_dict({"method": "dup", "sparsity": 0.9, "end_step": 100, "include": "body"})
    assert config.include == ["body"]
    assert config_from_dict(config.to_dict()) == config


# --- schedule and exact sparsity ----------------------------------------------------------------
def test_cubic_schedule_formula() -> None:
    assert cubic_sparsity(0, 0, 100, 0.0, 0.9) == 0.0
    assert cubic_sparsity(100, 0, 100, 0.0, 0.9) == 0.9
    assert cubic_sparsity(50, 0, 100, 0.0, 0.9) == pytest.approx(0.9 * (1 - 0.5 ** 3))
    assert cubic_sparsity(500, 0, 100, 0.1, 0.9) == 0.9


@pytest.mark.parametrize("method", ["dup", "gmp"])
@pytest.mark.parametrize("balance", ["global", "layer_normalized", "uniform"])
def test_masks_hit_the_scheduled_sparsity_at_every_update(method: str, balance: str) -> None:
    model = TinyEDSR()
    pruner = build_pruner(model, method, sparsity=0.8, start_step=2, end_step=8, update_every=3,
                          initial_sparsity=0.2, balance=balance)
    pruner.before_training()
    total = sum(mask.numel() for mask in pruner.masks.values())
    seen = []
    for step in range(1, 11):
        train(model, pruner, range(step, step + 1), seed=step)
        if step in (2, 5, 8):  # start, start + update_every, end
            target = cubic_sparsity(step, 2, 8, 0.2, 0.8)
            if balance == "uniform":  # rounded per layer
                expected = sum(m.numel() - round(target * m.numel()) for m in pruner.masks.values())
            else:
                expected = total - round(target * total)
            assert kept(pruner) == expected
            seen.append(kept(pruner))
        elif step == 1:
            assert kept(pruner) == total  # before start_step nothing is pruned
    assert seen == sorted(seen, reverse=True) and pruner.frozen
    assert kept(pruner) == seen[-1]  # frozen after end_step


def test_uniform_balance_gives_every_layer_the_same_sparsity() -> None:
    model = TinyEDSR()
    with torch.no_grad():
        model.tail[0].weight.mul_(100.0)  # a global ranking would keep all of this layer
    report = one_shot_prune(model, 0.75, balance="uniform")
    for entry in report["layers"].values():
        assert entry["nonzeros"] == entry["numel"] - round(0.75 * entry["numel"])


def test_layer_normalized_balance_ignores_a_layers_scale() -> None:
    reports = {}
    for balance in ("global", "layer_normalized"):
        torch.manual_seed(0)
        model = TinyEDSR()
        with torch.no_grad():
            model.tail[0].weight.mul_(100.0)
        reports[balance] = one_shot_prune(model, 0.75, balance=balance)["layers"]["tail.0.weight"]
    torch.manual_seed(0)
    reference = one_shot_prune(TinyEDSR(), 0.75, balance="layer_normalized")["layers"]["tail.0.weight"]
    # raw magnitudes: the scaled layer keeps far more than its share
    assert reports["global"]["sparsity"] < reference["sparsity"] - 0.2
    assert reports["layer_normalized"]["nonzeros"] == reference["nonzeros"]  # scale does not matter


@pytest.mark.parametrize("balance", ["global", "layer_normalized", "uniform"])
def test_min_density_is_respected(balance: str) -> None:
    model = TinyEDSR()
    with torch.no_grad():
        model.body[0].body[0].weight.mul_(1e-3)  # this layer would be pruned away entirely
    report = one_shot_prune(model, 0.85, balance=balance, min_density=0.1)
    for name, entry in report["layers"].items():
        assert entry["nonzeros"] >= math.ceil(0.1 * entry["numel"]), name
    if balance == "global":
        assert report["layers"]["body.0.body.0.weight"]["nonzeros"] == math.ceil(0.1 * 576)
        total = report["numel"]
        assert report["nonzeros"] == total - round(0.85 * total)


# --- regrowth ---------------------------------------------------------------------------------
def test_dup_pruned_weights_get_gradients_and_can_come_back() -> None:
    model = TinyEDSR()
    pruner = build_pruner(model, "dup", sparsity=0.5, end_step=4, update_every=2, hysteresis=0.0)
    pruner.before_training()
    train(model, pruner, range(1, 3))  # update at step 2: 1 - (1 - 2/4)^3 = 87.5% of 50%
    name = "body.0.body.0.weight"
    weight, mask = model.body[0].body[0].weight, pruner.masks[name]
    assert not mask.all()
    model.zero_grad()
    model(torch.randn(1, 3, 6, 6)).abs().mean().backward()
    assert weight.grad[~mask].abs().sum() > 0  # straight-through: pruned weights still learn
    index = tuple(torch.nonzero(~mask)[0])
    with torch.no_grad():
        weight[index] = 10.0  # as if gradient steps had grown it
    pruner.after_step(3)
    pruner.after_step(4)  # update at end_step
    assert pruner.masks[name][index]


@pytest.mark.parametrize("method", ["magnitude", "gmp"])
def test_magnitude_and_gmp_never_regrow_and_keep_pruned_weights_zero(method: str) -> None:
    model = TinyEDSR()
    options = {"end_step": 4, "update_every": 2} if method == "gmp" else {}
    pruner = build_pruner(model, method, sparsity=0.5, **options)
    pruner.before_training()
    train(model, pruner, range(1, 3))
    name = "body.0.body.0.weight"
    weight, before = model.body[0].body[0].weight, pruner.masks[name].clone()
    index = tuple(torch.nonzero(~before)[0])
    model.zero_grad()
    model(torch.randn(1, 3, 6, 6)).abs().mean().backward()
    assert weight.grad[~before].abs().sum() == 0  # no gradient reaches pruned weights
    with torch.no_grad():
        weight[index] = 10.0
    train(model, pruner, range(3, 7))  # Adam with momentum from before the pruning
    assert not pruner.masks[name][index]
    assert (pruner.masks[name] <= before).all()  # the mask only shrinks
    for n, module in pruner.modules.items():
        assert (module.weight[~pruner.masks[n]] == 0).all()


# --- hysteresis and shrink --------------------------------------------------------------------
def count_flips(hysteresis: float) -> int:
    torch.manual_seed(0)
    model = tiny_sequential()
    pruner = build_pruner(model, "dup", sparsity=0.5, end_step=40, update_every=1, initial_sparsity=0.5,
                          hysteresis=hysteresis)
    pruner.before_training()  # prunes 50% at step 0, so every flip counted below is a real change
    gen = torch.Generator().manual_seed(1)
    flips = 0
    for step in range(1, 41):
        previous = {n: m.clone() for n, m in pruner.masks.items()}
        with torch.no_grad():  # a random walk of the weights, the same for both runs
            for module in pruner.modules.values():
                module.weight.add_(0.05 * torch.randn(module.weight.shape, generator=gen))
        pruner.after_step(step)
        flips += sum(int((previous[n] != pruner.masks[n]).sum()) for n in previous)
        total = sum(m.numel() for m in pruner.masks.values())
        assert kept(pruner) == total - round(0.5 * total)  # the fix-up keeps the sparsity exact
    return flips


def test_hysteresis_reduces_mask_flips() -> None:
    # The same weight trajectory each time; only the hysteresis differs.
    assert count_flips(0.3) < count_flips(0.1) < count_flips(0.0)


def test_shrink_multiplies_pruned_weights_by_alpha_until_frozen() -> None:
    model = tiny_sequential()
    pruner = build_pruner(model, "dup", sparsity=0.5, initial_sparsity=0.5, start_step=1, end_step=3,
                          update_every=1, shrink=0.5, hysteresis=0.0)
    pruner.before_training()
    pruner.after_step(1)  # first update (50%) + first shrink
    name, module = next(iter(pruner.modules.items()))
    mask = pruner.masks[name].clone()
    assert not mask.all()
    before = module.weight.detach().clone()
    x = torch.randn(1, module.in_channels, 5, 5)
    # during the search the forward uses W itself (pruned weights shrunk, not zeroed)
    assert torch.equal(module(x), nn.functional.conv2d(x, before, module.bias, padding=1))
    assert torch.equal(pruner.effective_state_dict()[name], before)
    pruner.after_step(2)
    assert torch.equal(pruner.masks[name], mask)  # nothing changed the weights, so same ranking
    assert torch.equal(module.weight[~mask], 0.5 * before[~mask])
    assert torch.equal(module.weight[mask], before[mask])
    pruner.after_step(3)  # end_step: frozen, pruned weights hard zero
    assert pruner.frozen and (module.weight[~pruner.masks[name]] == 0).all()


def test_shrink_zero_is_hard_zero_during_search() -> None:
    model = tiny_sequential()
    pruner = build_pruner(model, "dup", sparsity=0.5, end_step=10, update_every=5, shrink=0.0)
    pruner.before_training()
    train(model, pruner, range(1, 6))
    assert not pruner.frozen
    for name, module in pruner.modules.items():
        assert (module.weight[~pruner.masks[name]] == 0).all()


# --- blocks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["4x1", "8x1", "1x4"])
def test_block_masks_are_block_aligned(granularity: str) -> None:
    b_h, b_w = map(int, granularity.split("x"))
    model = tiny_sequential()  # C_out 6 and 10, K 54: blocks do not tile exactly
    pruner = build_pruner(model, "dup", sparsity=0.6, end_step=4, update_every=2, granularity=granularity)
    pruner.before_training()
    train(model, pruner, range(1, 5))
    total = sum(m.numel() for m in pruner.masks.values())
    target_kept = total - round(0.6 * total)
    assert target_kept <= kept(pruner) < target_kept + b_h * b_w  # at most one block over
    for mask in pruner.masks.values():
        matrix = mask.reshape(mask.shape[0], -1)
        n_rows, n_cols = block_grid(mask.shape, (b_h, b_w))
        padded = torch.zeros(n_rows * b_h, n_cols * b_w, dtype=torch.int8)
        padded[: matrix.shape[0], : matrix.shape[1]] = matrix.to(torch.int8)
        padded[matrix.shape[0]:, :] = -1  # padding: ignored
        padded[:, matrix.shape[1]:] = -1
        blocks = padded.reshape(n_rows, b_h, n_cols, b_w).permute(0, 2, 1, 3).reshape(n_rows * n_cols, -1)
        for block in blocks:
            real = block[block >= 0]
            assert real.numel() == 0 or (real == real[0]).all()


# --- forward equivalence, finalize, state dict ----------------------------------------------------
def test_masked_forward_equals_forward_with_zeros_baked_in() -> None:
    model = TinyEDSR()
    pruner = build_pruner(model, "dup", sparsity=0.7, end_step=4, update_every=2)
    pruner.before_training()
    train(model, pruner, range(1, 4))  # still searching: pruned weights are non-zero in W
    assert any((m.weight[~pruner.masks[n]] != 0).any() for n, m in pruner.modules.items())
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        masked = model(x)
    pruner.finalize()
    with torch.no_grad():
        baked = model(x)
    torch.testing.assert_close(baked, masked, rtol=0, atol=0)
    for module in pruner.modules.values():
        assert not module._forward_pre_hooks and not module._forward_hooks
        assert "weight" not in module.__dict__
    report = sparsity_report(model)
    assert report["nonzeros"] == kept(pruner)


def test_effective_state_dict_gives_a_plain_model_the_masked_forward() -> None:
    model = TinyEDSR()
    pruner = build_pruner(model, "dup", sparsity=0.7, end_step=6, update_every=2)
    pruner.before_training()
    train(model, pruner, range(1, 4))
    ema = copy.deepcopy(model)  # e.g. an EMA copy: its hooks read the same masks
    plain = TinyEDSR()
    plain.load_state_dict(pruner.effective_state_dict())
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(ema(x), model(x), rtol=0, atol=0)
    plain.load_state_dict(pruner.effective_state_dict(ema.state_dict()))
    assert sparsity_report(plain)["nonzeros"] == kept(pruner)


def test_state_dict_keys_stay_plain() -> None:
    model = TinyEDSR()
    keys = list(model.state_dict())
    pruner = build_pruner(model, "dup", sparsity=0.5, end_step=2, update_every=1)
    pruner.before_training()
    train(model, pruner, range(1, 3))
    assert list(model.state_dict()) == keys
    fresh = TinyEDSR()
    fresh.load_state_dict(model.state_dict())  # strict: loadable by a plain model


def test_state_dict_round_trip_resumes_exactly() -> None:
    options = dict(sparsity=0.8, end_step=12, update_every=2, hysteresis=0.1, shrink=0.9)
    model = TinyEDSR()
    pruner = build_pruner(model, "dup", **options)
    pruner.before_training()
    train(model, pruner, range(1, 7), seed=1)
    saved_model, saved_pruner = copy.deepcopy(model.state_dict()), pruner.state_dict()

    resumed_model = TinyEDSR()
    resumed_model.load_state_dict(saved_model)
    resumed = build_pruner(resumed_model, "dup", **options)
    resumed.load_state_dict(saved_pruner)
    resumed.before_training()  # harmless after a resume
    assert all(torch.equal(resumed.masks[n], pruner.masks[n]) for n in pruner.masks)

    # Continue both with the same batches (fresh optimizers for both: optimizer state is not ours).
    train(model, pruner, range(7, 13), seed=2)
    train(resumed_model, resumed, range(7, 13), seed=2)
    assert all(torch.equal(resumed.masks[n], pruner.masks[n]) for n in pruner.masks)
    assert resumed.frozen and resumed.step == pruner.step == 12


def test_load_state_dict_rejects_a_mismatched_state() -> None:
    pruner = build_pruner(TinyEDSR(), "dup", sparsity=0.5, end_step=2)
    with pytest.raises(CheckpointError, match="method"):
        pruner.load_state_dict({**pruner.state_dict(), "method": "gmp"})
    other = build_pruner(TinyEDSR(channels=4), "dup", sparsity=0.5, end_step=2)
    with pytest.raises(CheckpointError, match="shape"):
        pruner.load_state_dict(other.state_dict())


# --- one-shot and reports -------------------------------------------------------------------------
def test_one_shot_prune_on_a_plain_sequential() -> None:
    model = tiny_sequential()
    x = torch.randn(1, 3, 5, 5)
    assert set(one_shot_prune(copy.deepcopy(model), 0.5, include=".*", exclude="^6$")["layers"]) == {
        "0.weight", "2.weight", "4.weight"}
    report = one_shot_prune(model, 0.5, include=[".*"])  # all four convs this time
    assert set(report["layers"]) == {"0.weight", "2.weight", "4.weight", "6.weight"}
    assert report["nonzeros"] == report["numel"] - round(0.5 * report["numel"])
    assert not any(m._forward_pre_hooks for m in model.modules())
    model(x)  # a plain model again
    from_state = sparsity_report(model.state_dict(), list(report["layers"]))
    assert from_state["nonzeros"] == report["nonzeros"]
    default = sparsity_report(model.state_dict())  # every conv weight of a state dict
    assert default["layers"] == from_state["layers"]
    assert sparsity_report(model)["numel"] == 324 + 540  # a model: the default selection (2 and 4)
    with pytest.raises(ConfigError, match="no weight named"):
        sparsity_report(model, ["missing.weight"])


def test_pruner_report_lists_every_layer() -> None:
    model = TinyEDSR()
    pruner = build_pruner(model, "magnitude", sparsity=0.6)
    pruner.before_training()
    report = pruner.report()
    assert report["method"] == "magnitude" and report["frozen"]
    assert report["layers"]["tail.0.weight"]["shape"] == [32, 8, 3, 3]
    assert report["sparsity"] == pytest.approx(0.6, abs=1 / report["numel"])
