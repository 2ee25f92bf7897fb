"""The method-controlled backward (``Method.combines_gradients``): the engine hands a method each
loss term's gradient of the whole optimiser batch — summed over ``grad_accum`` chunks, averaged
over processes, unscaled from AMP's loss scale — and steps on what the method combines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import vlprompt
from vlprompt.config import TrainConfig
from vlprompt.engine import NonFiniteLossError, train_method
from vlprompt.engine import train as T
from vlprompt.methods.coop import CoOp
from vlprompt.methods.prograd import project_gradient

NAMES = ["forest", "river", "highway"]


def tensor_data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(3, 3, 32, 32, generator=g)
    y = torch.arange(n) % 3
    return TensorDataset(protos[y] + 0.5 * torch.randn(n, 3, 32, 32, generator=g), y)


def cfg(**kw):
    base = dict(max_epoch=1, lr=0.05, batch_size=8, num_workers=0, print_freq=100,
                warmup_epoch=0, momentum=0.0, weight_decay=0.0, lr_scheduler="constant")
    base.update(kw)
    return TrainConfig(**base)


class TwoTerms(CoOp):
    """CE plus an auxiliary term (minus the mean squared logit) whose gradients the method combines:
    ``combine="project"`` removes the CE gradient's component against the auxiliary one
    (ProGrad's rule, nonlinear), ``"ce"`` keeps the CE gradient alone."""

    name = "_two_terms"  # not registered: used directly
    combines_gradients = True

    def __init__(self, *args, combine="project", aux_scale=1.0, **kw):
        super().__init__(*args, **kw)
        self.combine, self.aux_scale, self.received = combine, aux_scale, []

    def terms(self, images, labels):
        logits = self(images)
        return {"ce": F.cross_entropy(logits, labels),
                "aux": -self.aux_scale * logits.pow(2).mean() / 100.0}

    def loss_terms(self, images, labels):
        terms = self.terms(images, labels)
        return terms, {k: float(v.detach()) for k, v in terms.items()}

    def combine_gradients(self, grads):
        self.received.append({k: [g.clone() for g in v] for k, v in grads.items()})
        if self.combine == "ce":
            return grads["ce"]
        return [project_gradient(d, a, 1.0) for d, a in zip(grads["ce"], grads["aux"])]


def build(world, cls=TwoTerms, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(world.clip, NAMES, CoOp.Config(n_ctx=4), **kw)


def rel_err(a, b):
    """Relative error over the whole tensor (the batch order differs: summation rounding)."""
    return float((a - b).norm() / b.norm())


def full_batch_grads(method, data):
    x, y = data.tensors
    terms = method.terms(x, y)
    return {k: torch.autograd.grad(v, [method.ctx], retain_graph=True)[0]
            for k, v in terms.items()}


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_the_method_receives_each_terms_whole_batch_gradient(world, accum):
    data = tensor_data()
    method = build(world)
    expected = full_batch_grads(method, data)
    start = method.ctx.detach().clone()
    train_method(method, data, cfg(grad_accum=accum), show_progress=False)
    (received,) = method.received
    for k in ("ce", "aux"):
        assert rel_err(received[k][0], expected[k]) < 1e-5
    # the step is the method's combination of the whole-batch gradients, whatever the chunking
    # (the projection is active here: combining per chunk would give other steps)
    step = project_gradient(expected["ce"], expected["aux"], 1.0)
    assert float(torch.dot(expected["ce"].flatten(), expected["aux"].flatten())) < 0
    assert not torch.allclose(step, expected["ce"], rtol=1e-3)
    assert rel_err(start - method.ctx.detach(), 0.05 * step) < 1e-5


def test_keeping_one_term_equals_the_default_backward(world):
    data = tensor_data()
    combined = build(world, combine="ce")
    plain = build(world, cls=CoOp)
    torch.testing.assert_close(combined.ctx, plain.ctx, rtol=0, atol=0)
    for method in (combined, plain):
        train_method(method, data, cfg(max_epoch=3, batch_size=4, grad_accum=2, momentum=0.9),
                     show_progress=False)
    assert torch.equal(combined.ctx.detach(), plain.ctx.detach())


def _loop(method, scaler):
    config = cfg()
    optimizer = T.build_optimizer(method, config)
    params = list(method.named_trainable_parameters().values())
    return T._Loop(method, config, torch.device("cpu"), optimizer, params, scaler, None, None,
                   lambda progress: None)


def test_amp_loss_scale_is_removed_before_combining_and_overflow_skips_the_step(world):
    x, y = tensor_data().tensors
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)):
        method = build(world)
        T._step(_loop(method, scaler), x, y, "test")
        results.append((method.ctx.detach().clone(), method.received[0]))
    (plain, got_plain), (scaled, got_scaled) = results
    assert torch.equal(plain, scaled)  # the scale is a power of two: exact
    for k in ("ce", "aux"):
        assert torch.equal(got_plain[k][0], got_scaled[k][0])
    # a term whose scaled gradient overflows: no step, the scale backs off, nothing combined
    method = build(world, aux_scale=1e33)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    before = method.ctx.detach().clone()
    T._step(_loop(method, scaler), x, y, "test")
    assert torch.equal(method.ctx.detach(), before) and scaler.get_scale() == 2.0 ** 15
    assert method.received == [] and method.ctx.grad is None


class NaNTerm(TwoTerms):
    name = "_nan_term"

    def terms(self, images, labels):
        terms = super().terms(images, labels)
        terms["aux"] = terms["aux"] * float("nan")
        return terms


def test_a_non_finite_term_stops_training(world):
    method = build(world, cls=NaNTerm)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 1.*parts=.*aux"):
        train_method(method, tensor_data(), cfg(), show_progress=False)


SCRIPT = """
import sys, json
import torch
torch.set_num_threads(1)
from vlprompt.clip.load import load_clip
from vlprompt.engine import distributed as D, train_method
from vlprompt.methods import build_method
from tests.engine.test_method_backward import cfg, tensor_data
clip_path, out = sys.argv[1:3]
D.init_distributed("cpu")
torch.manual_seed(0)
method = build_method("prograd", load_clip(clip_path), ["forest", "river", "highway"],
                      template="a type of pet, a photo of a {}.")
train_method(method, tensor_data(16), cfg(max_epoch=3, batch_size=8, lr=0.01, momentum=0.9),
             device="cpu", show_progress=False)
assert D.world_size() == 2
with open(f"{out}.rank{D.rank()}.json", "w") as f:
    json.dump(method.ctx.detach().tolist(), f)
"""


def test_two_processes_combine_the_averaged_gradients(world, tmp_path):
    """ProGrad's projection on 2 processes x 4 images equals 1 process x 8 images: both terms'
    gradients are all-reduced before the projection (projecting per process would differ)."""
    from vlprompt.methods import build_method

    script = tmp_path / "ddp_prograd.py"
    script.write_text(SCRIPT)
    out = tmp_path / "ctx"
    root = str(Path(vlprompt.__file__).resolve().parents[2])
    src = str(Path(vlprompt.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, root]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(world.clip_path), str(out)],
        env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.tensor(json.loads(Path(f"{out}.rank{r}.json").read_text())) for r in (0, 1)]
    assert torch.equal(ranks[0], ranks[1])
    torch.manual_seed(0)
    single = build_method("prograd", world.clip, NAMES, template="a type of pet, a photo of a {}.")
    conflicts, combine = [], single.combine_gradients

    def counting(grads):
        conflicts.append(float(torch.dot(grads["ce"][0].flatten(), grads["kd"][0].flatten())) < 0)
        return combine(grads)
    single.combine_gradients = counting
    start = single.ctx.detach().clone()
    train_method(single, tensor_data(16), cfg(max_epoch=3, batch_size=8, lr=0.01, momentum=0.9),
                 show_progress=False)
    # the updates agree to ~5e-6 (summation order); projecting per process moves a step by ~4e-2
    assert rel_err(ranks[0] - start, single.ctx.detach() - start) < 1e-4
    assert len(conflicts) == 6 and any(conflicts)  # the projection acted
