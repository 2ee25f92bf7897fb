"""The training loop on in-memory tensors: frozen backbone, non-finite loss, grad accumulation,
checkpoint contents."""


import pytest
import torch
from torch.utils.data import TensorDataset

from vlprompt.clip.fingerprint import backbone_fingerprint
from vlprompt.config import TrainConfig
from vlprompt.engine import NonFiniteLossError, train_method
from vlprompt.engine.checkpoint import read_header, read_tensors
from vlprompt.methods import build_method
from vlprompt.methods.coop import CoOp

NAMES = ["forest", "river", "highway"]


def tensor_data(n_per_class=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(3, 3, 32, 32, generator=g)
    y = torch.arange(3).repeat_interleave(n_per_class)
    return TensorDataset(protos[y] + 0.3 * torch.randn(len(y), 3, 32, 32, generator=g), y)


def cfg(**kw):
    base = dict(max_epoch=2, lr=0.01, batch_size=4, num_workers=0, print_freq=100)
    base.update(kw)
    return TrainConfig(**base)


def test_training_moves_only_the_prompts_and_writes_a_checkpoint(world, tmp_path):
    torch.manual_seed(0)
    coop = build_method("coop", world.clip, NAMES, n_ctx=4)
    before_clip, before_ctx = backbone_fingerprint(world.clip, recompute=True), coop.ctx.detach().clone()
    result = train_method(coop, tensor_data(), cfg(), run_dir=tmp_path, show_progress=False)
    assert result["finished"] and result["epochs"] == 2 and len(result["loss_history"]) == 2
    assert backbone_fingerprint(world.clip, recompute=True) == before_clip
    assert not torch.equal(coop.ctx.detach(), before_ctx)
    header = read_header(tmp_path)
    tensors, _ = read_tensors(tmp_path)
    assert header["method"] == "coop" and header["epoch"] == 2 and header["finished"]
    assert header["classnames"] == NAMES and header["backbone_fingerprint"] == before_clip
    assert set(tensors) == {"ctx"} and torch.equal(tensors["ctx"], coop.ctx.detach())
    assert (tmp_path / "checkpoints" / "000003" / "checkpoint.safetensors").stat().st_size < 10_000


class _Breaks(CoOp):
    name = "_breaks_clip"  # not registered: used directly

    def on_epoch_end(self, epoch, max_epochs):
        with torch.no_grad():
            self.clip.ln_final.weight.add_(1.0)


def test_a_method_that_changes_the_frozen_clip_is_caught(world):
    torch.manual_seed(0)
    clip = build_method("coop", world.clip, NAMES).clip  # same object
    state = {k: v.clone() for k, v in clip.state_dict().items()}
    try:
        method = _Breaks(clip, NAMES, CoOp.Config(n_ctx=2))
        with pytest.raises(RuntimeError, match="frozen CLIP changed"):
            train_method(method, tensor_data(), cfg(max_epoch=1), show_progress=False)
    finally:
        clip.load_state_dict(state)


class _NaNAtEpoch2(CoOp):
    name = "_nan"
    epoch = 0

    def on_epoch_end(self, epoch, max_epochs):
        self.epoch = epoch + 1

    def loss(self, images, labels):
        loss, parts = super().loss(images, labels)
        if self.epoch >= 1:
            loss = loss * float("nan")
        return loss, parts


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(world, tmp_path):
    method = _NaNAtEpoch2(world.clip, NAMES, CoOp.Config(n_ctx=2))
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 1.*parts=.*ce.*lower train.lr"):
        train_method(method, tensor_data(), cfg(max_epoch=3), run_dir=tmp_path, show_progress=False)
    header = read_header(tmp_path)
    assert header["epoch"] == 1 and not header["finished"]


def test_gradient_accumulation_gives_the_same_update(world):
    results = []
    for accum in (1, 2):
        torch.manual_seed(0)
        coop = build_method("coop", world.clip, NAMES, n_ctx=4)
        train_method(coop, tensor_data(), cfg(grad_accum=accum, warmup_epoch=0), show_progress=False)
        results.append(coop.ctx.detach().clone())
    assert torch.allclose(results[0], results[1], atol=1e-5)
    assert not torch.equal(results[0], torch.zeros_like(results[0]))
