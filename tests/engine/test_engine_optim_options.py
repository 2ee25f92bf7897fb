"""Optimiser and schedule options: Dassl Adam/AdamW (betas, eps), ``min_lr``, the per-step cosine,
and ``max_steps`` / ``shots_steps`` iteration budgets with exact resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import TensorDataset

from vlprompt.config import TrainConfig, resolve_config
from vlprompt.engine import train_method
from vlprompt.engine.optim import build_optimizer, lr_at_epoch, lr_at_step
from vlprompt.methods import build_method
from vlprompt.methods.coop import CoOp

NAMES = ["forest", "river", "highway"]


def tensor_data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(3, 3, 32, 32, generator=g)
    y = torch.arange(n) % 3
    return TensorDataset(protos[y] + 0.3 * torch.randn(n, 3, 32, 32, generator=g), y)


def cfg(**kw):
    base = dict(max_epoch=2, lr=0.01, batch_size=4, num_workers=0, print_freq=100,
                checkpoint_every_minutes=0)
    base.update(kw)
    return TrainConfig(**base)


def coop(world):
    torch.manual_seed(0)
    return build_method("coop", world.clip, NAMES, n_ctx=4)


@pytest.fixture
def step_lrs():
    """The first group's LR at every optimiser step of any optimiser (a global step hook)."""
    seen = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    yield seen
    handle.remove()


def test_adam_and_adamw_use_dassl_settings(world):
    method = coop(world)
    for name, cls in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        opt = build_optimizer(method, TrainConfig(optimizer=name, adam_eps=1e-3, lr=0.002))
        group = opt.param_groups[0]
        assert type(opt) is cls and group["eps"] == 1e-3 and group["betas"] == (0.9, 0.999)
        assert group["weight_decay"] == 5e-4 and not group["amsgrad"]
    assert TrainConfig().adam_eps == 1e-8 and TrainConfig().adam_betas == [0.9, 0.999]
    opt = build_optimizer(method, TrainConfig(optimizer="adam", adam_betas=[0.8, 0.99]))
    assert opt.param_groups[0]["betas"] == (0.8, 0.99)
    assert isinstance(build_optimizer(method, TrainConfig()), torch.optim.SGD)  # default


def test_adam_training_equals_a_plain_torch_adam_loop(world):
    """Dataset = one batch: every step sees all images, so a hand-written loop is the same."""
    data = tensor_data(4)
    trained = coop(world)
    train_method(trained, data, cfg(max_epoch=3, optimizer="adam", adam_eps=1e-3,
                                    warmup_epoch=0, lr_scheduler="constant"), show_progress=False)
    manual = coop(world)
    opt = torch.optim.Adam([manual.ctx], lr=0.01, eps=1e-3, weight_decay=5e-4)
    x, y = data.tensors
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(manual(x), y).backward()
        opt.step()
    torch.testing.assert_close(trained.ctx.detach(), manual.ctx.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad, message", [
    ({"optimizer": "rmsprop"}, "train.optimizer must be sgd, adam or adamw, got 'rmsprop'"),
    ({"lr_scheduler": "linear"}, "train.lr_scheduler must be cosine, constant or cosine_step"),
    ({"adam_eps": 0.0}, "train.adam_eps must be > 0, got 0.0"),
    ({"adam_betas": [0.9]}, r"train.adam_betas must be two numbers in \[0, 1\), got \[0.9\]"),
    ({"adam_betas": [0.9, 1.0]}, "train.adam_betas must be two numbers"),
    ({"min_lr": -1e-6}, "train.min_lr must be >= 0"),
    ({"max_steps": 0}, "train.max_steps must be an integer >= 1 or null, got 0"),
    ({"max_steps": 2.5}, "train.max_steps must be an integer >= 1 or null, got 2.5"),
])
def test_bad_values_give_one_line_errors(bad, message):
    with pytest.raises(ValueError, match=message) as err:
        TrainConfig(**bad)
    assert "\n" not in str(err.value)


def test_min_lr_floors_the_epoch_cosine_and_zero_keeps_it_bit_identical():
    for e in range(12):
        config = TrainConfig(max_epoch=10, warmup_epoch=2)
        old = config.warmup_lr if e < 2 else 0.002 * (1 + math.cos(math.pi * (e - 2) / 10)) / 2
        assert lr_at_epoch(e, 0.002, config) == old  # exactly the previous formula
    config = TrainConfig(max_epoch=5, lr=0.1, warmup_epoch=0, min_lr=1e-3)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5, eta_min=1e-3)
    expected = []
    for _ in range(5):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert [lr_at_epoch(e, 0.1, config) for e in range(5)] == pytest.approx(expected, rel=1e-9)


def test_cosine_step_follows_torch_cosine_annealing_per_iteration():
    """CLIP-LoRA's schedule: CosineAnnealingLR(T_max = total iterations, eta_min) stepped after
    every optimiser step, no warmup."""
    config = TrainConfig(lr=2e-4, lr_scheduler="cosine_step", warmup_epoch=0, min_lr=1e-6)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2e-4)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40, eta_min=1e-6)
    expected = []
    for _ in range(40):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    got = [lr_at_step(s, 2e-4, config, steps_per_epoch=7, total_steps=40) for s in range(40)]
    assert got == pytest.approx(expected, rel=1e-6)
    # a warmup counts whole epochs of steps, then the cosine is not re-counted (as per epoch)
    warm = TrainConfig(lr=0.1, lr_scheduler="cosine_step", warmup_epoch=1, warmup_lr=1e-5)
    assert [lr_at_step(s, 0.1, warm, 3, 12) for s in (0, 2)] == [1e-5, 1e-5]
    assert lr_at_step(3, 0.1, warm, 3, 12) == 0.1
    assert lr_at_step(9, 0.1, warm, 3, 12) == pytest.approx(0.05 * (1 + math.cos(math.pi / 2)))


def test_max_steps_runs_exactly_that_many_steps_across_epochs(world, step_lrs):
    # 12 images, batch 4: 3 steps an epoch; 7 steps = epochs of 3, 3 and 1
    method = coop(world)
    result = train_method(method, tensor_data(), cfg(max_epoch=100, max_steps=7,
                                                     lr_scheduler="cosine_step", warmup_epoch=0),
                          show_progress=False)
    assert len(step_lrs) == 7
    assert result["finished"] and result["epochs"] == 3 and len(result["loss_history"]) == 3
    assert step_lrs == pytest.approx([0.005 * (1 + math.cos(math.pi * s / 7)) for s in range(7)])
    # per-epoch schedules see the epochs the budget reaches (here 3)
    step_lrs.clear()
    train_method(coop(world), tensor_data(), cfg(max_steps=7, warmup_epoch=0),
                 show_progress=False)
    per_epoch = [0.005 * (1 + math.cos(math.pi * e / 3)) for e in (0, 0, 0, 1, 1, 1, 2)]
    assert step_lrs == pytest.approx(per_epoch)


class Killed(BaseException):
    """An injected kill (BaseException: nothing may catch it)."""


class KilledAt(CoOp):
    name = "coop"  # not registered; its checkpoints are CoOp's
    kill_at = -1

    def loss(self, images, labels):
        KilledAt.calls += 1
        if KilledAt.calls == self.kill_at:
            raise Killed
        return super().loss(images, labels)


@pytest.mark.parametrize("kill_at", [3, 5, 7])  # mid-epoch 2 and the short last epoch
def test_max_steps_resume_is_bit_identical(world, tmp_path, kill_at):
    config = cfg(max_steps=7, lr_scheduler="cosine_step", warmup_epoch=0, optimizer="adam",
                 checkpoint_every_steps=1)
    reference = coop(world)
    train_method(reference, tensor_data(), config, run_dir=tmp_path / "ref", show_progress=False)

    torch.manual_seed(0)
    method = KilledAt(world.clip, NAMES, CoOp.Config(n_ctx=4))
    KilledAt.calls, method.kill_at = 0, kill_at
    with pytest.raises(Killed):
        train_method(method, tensor_data(), config, run_dir=tmp_path / "run", show_progress=False)
    torch.manual_seed(1)  # the resumed run must not depend on the fresh process's state
    resumed = build_method("coop", world.clip, NAMES, n_ctx=4)
    result = train_method(resumed, tensor_data(), config, run_dir=tmp_path / "run",
                          show_progress=False)
    assert result["finished"] and result["epochs"] == 3
    assert torch.equal(resumed.ctx.detach(), reference.ctx.detach())


def test_shots_steps_and_explicit_settings(tmp_path):
    user = tmp_path / "steps.yaml"
    user.write_text("train:\n  shots_steps: {1: 500, 4: 2000, 16: 8000}\n")
    assert resolve_config("coop", config_file=user, shots=4)["train"]["max_steps"] == 2000
    assert resolve_config("coop", config_file=user, shots=2)["train"]["max_steps"] is None
    explicit = resolve_config("coop", config_file=user, overrides=["max_steps=10"], shots=4)
    assert explicit["train"]["max_steps"] == 10
    # an explicit epoch count beats a packaged/derived step budget
    epochs = resolve_config("coop", config_file=user, overrides=["max_epoch=2"], shots=4)
    assert epochs["train"]["max_steps"] is None and epochs["train"]["max_epoch"] == 2
    with pytest.raises(ValueError, match="train.max_steps must be an integer"):
        resolve_config("coop", overrides=["max_steps=many"])


def test_run_folders_made_before_the_new_fields_keep_their_identity():
    """A stored config without the new train fields (older vlprompt) matches one that has them at
    their defaults; a non-default value is still a different run."""
    from vlprompt.engine.run import _compare_config

    current = resolve_config("coop", "base2new")
    new_fields = ("adam_eps", "adam_betas", "min_lr", "max_steps", "shots_steps")
    old = {"method": current["method"],
           "train": {k: v for k, v in current["train"].items() if k not in new_fields}}
    assert _compare_config(old, current) == []
    changed = resolve_config("coop", "base2new", overrides=["min_lr=1e-6"])
    assert _compare_config(old, changed) == ["train.min_lr: None -> 1e-06"]
