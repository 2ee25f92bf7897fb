"""SGD + constant warmup + cosine, per epoch, against torch's own CosineAnnealingLR."""

import math

import pytest
import torch

from vlprompt.config import TrainConfig
from vlprompt.engine.optim import build_optimizer, lr_at_epoch, set_epoch_lr
from vlprompt.methods import build_method


def test_schedule_values_per_epoch():
    cfg = TrainConfig(max_epoch=5, lr=0.002, warmup_epoch=1, warmup_lr=1e-5)
    got = [lr_at_epoch(e, cfg.lr, cfg) for e in range(5)]
    # Dassl: epoch 0 at the warmup LR, then CosineAnnealingLR(T_max=max_epoch) from its step 0
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.max_epoch)
    ref = [1e-5]
    for _ in range(4):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        cosine.step()
    assert got == pytest.approx(ref, rel=1e-9)
    assert got[1] == 0.002 and got[2] == pytest.approx(0.001 * (1 + math.cos(math.pi / 5)))
    no_warmup = TrainConfig(max_epoch=4, lr=0.1, warmup_epoch=0)
    assert lr_at_epoch(0, 0.1, no_warmup) == 0.1
    assert lr_at_epoch(2, 0.1, no_warmup) == pytest.approx(0.05)
    const = TrainConfig(max_epoch=4, lr=0.1, lr_scheduler="constant")
    assert [lr_at_epoch(e, 0.1, const) for e in range(3)] == [1e-5, 0.1, 0.1]


def test_optimizer_settings_and_per_group_lrs(world):
    coop = build_method("coop", world.clip, ["a", "b"], n_ctx=2)
    extra = torch.nn.Parameter(torch.zeros(3))
    coop.register_parameter("extra", extra)
    coop.param_groups = lambda lr: [{"params": [coop.ctx], "lr": lr},
                                    {"params": [extra], "lr": lr * 10}]
    cfg = TrainConfig(max_epoch=3, lr=0.01)
    opt = build_optimizer(coop, cfg)
    assert isinstance(opt, torch.optim.SGD)
    g = opt.param_groups
    assert g[0]["momentum"] == 0.9 and g[0]["weight_decay"] == 5e-4 and not g[0]["nesterov"]
    assert set_epoch_lr(opt, 0, cfg) == [1e-5, 1e-5]
    assert set_epoch_lr(opt, 1, cfg) == [0.01, 0.1]
    assert set_epoch_lr(opt, 2, cfg) == pytest.approx([0.005 * (1 + math.cos(math.pi / 3)),
                                                       0.05 * (1 + math.cos(math.pi / 3))])


def test_per_group_warmup_overrides_the_config(world):
    coop = build_method("coop", world.clip, ["a", "b"], n_ctx=2)
    extra = torch.nn.Parameter(torch.zeros(3))
    coop.register_parameter("extra", extra)
    coop.param_groups = lambda lr: [{"params": [coop.ctx], "lr": 0.002, "warmup_epoch": 1},
                                    {"params": [extra], "lr": lr}]
    cfg = TrainConfig(max_epoch=6, lr=0.01, warmup_epoch=3)
    opt = build_optimizer(coop, cfg)
    assert set_epoch_lr(opt, 0, cfg) == [1e-5, 1e-5]
    assert set_epoch_lr(opt, 1, cfg) == [0.002, 1e-5]
    assert set_epoch_lr(opt, 3, cfg) == pytest.approx(
        [0.001 * (1 + math.cos(2 * math.pi / 6)), 0.01])


def test_method_without_parameters_cannot_be_optimised(world):
    zs = build_method("zeroshot", world.clip, ["a", "b"])
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(zs, TrainConfig())
