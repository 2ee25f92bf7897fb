"""Contract matrix over the method registry: every registered method (present and future) must
train only its own tensors, leave CLIP untouched, learn a learnable task, switch classes, and
round-trip its checkpoint bit-exactly."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlprompt.methods import build_method, get_method, list_methods, make_config

from .conftest import CLASSNAMES, NEW_CLASSNAMES, TINY_OVERRIDES, colour_batch

METHODS = list_methods()


def _build(name, clip, classnames=CLASSNAMES, template=None, seed=0):
    torch.manual_seed(seed)
    return build_method(name, clip, classnames, template=template, **TINY_OVERRIDES.get(name, {}))


def _images(n=4, seed=0):
    return colour_batch(n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", METHODS)
def test_gradients_reach_exactly_the_trainable_tensors(name, tiny_clip):
    method = _build(name, tiny_clip)
    method.train()
    images, labels = _images()
    trainable = method.named_trainable_parameters()
    if not get_method(name).trainable:
        assert trainable == {} and method.num_trainable_parameters() == 0
        return
    assert trainable, f"{name} declares itself trainable but has no trainable tensors"
    assert not any(n.startswith("clip.") for n in trainable)
    loss, parts = method.loss(images, labels)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert parts and all(isinstance(v, float) for v in parts.values())
    loss.backward()
    for n, p in trainable.items():
        assert p.grad is not None, f"{name}: no gradient reached {n}"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name}: zero grad in {n}"
    for n, p in method.clip.named_parameters():
        assert not p.requires_grad and p.grad is None, f"{name}: CLIP parameter {n} got a gradient"
    # every parameter outside CLIP is trainable (trainability is structural)
    others = {n for n, _ in method.named_parameters() if not n.startswith("clip.")}
    assert others == set(trainable)


@pytest.mark.parametrize("name", METHODS)
def test_frozen_clip_unchanged_after_optimiser_step(name, tiny_clip):
    before = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    method = _build(name, tiny_clip)
    if not get_method(name).trainable:
        return
    method.train()
    opt = torch.optim.SGD(method.param_groups(0.01), lr=0.01, momentum=0.9, weight_decay=5e-4)
    images, labels = _images()
    for _ in range(2):
        loss, _ = method.loss(images, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = tiny_clip.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"{name} changed CLIP tensor {k}"
    assert not tiny_clip.training


@pytest.mark.parametrize("name", METHODS)
def test_learns_a_synthetic_task(name, tiny_clip):
    """60 SGD steps on colour-coded images: the loss must fall and accuracy must rise."""
    method = _build(name, tiny_clip)
    if not get_method(name).trainable:  # zero-shot: nothing to learn
        assert method.num_trainable_parameters() == 0
        return
    test_x, test_y = colour_batch(32, torch.Generator().manual_seed(123))

    def evaluate():
        method.eval()
        with torch.no_grad():
            loss, _ = method.loss(test_x, test_y)
            acc = (method(test_x).argmax(1) == test_y).float().mean().item()
        return float(loss), acc

    loss0, acc0 = evaluate()
    opt = torch.optim.SGD(method.param_groups(0.003), lr=0.003, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    method.train()
    for _ in range(60):
        x, y = colour_batch(8, gen)
        loss, _ = method.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss1, acc1 = evaluate()
    assert loss1 < 0.7 * loss0, f"{name}: loss {loss0:.3f} -> {loss1:.3f}"
    assert acc1 >= acc0 + 0.15 and acc1 >= 0.5, f"{name}: accuracy {acc0:.2f} -> {acc1:.2f}"


@pytest.mark.parametrize("name", METHODS)
def test_set_classnames_switches_classes(name, tiny_clip):
    method = _build(name, tiny_clip, template="a photo of a {}, a type of colour.")
    method.eval()
    images, labels = _images(3)
    with torch.no_grad():
        base = method(images)
        assert base.shape == (3, len(CLASSNAMES))
        method.loss(images, torch.tensor([0, 1, 3]))  # builds any per-class-list teacher
        method.set_classnames(NEW_CLASSNAMES)
        assert method.classnames == [c.replace("_", " ") for c in NEW_CLASSNAMES]
        new = method(images)
        assert new.shape == (3, len(NEW_CLASSNAMES)) and torch.isfinite(new).all()
        # training losses must follow the new classes too (teachers are per class list)
        loss, _ = method.loss(images, torch.tensor([0, 1, 2]))
        assert torch.isfinite(loss)
        method.set_classnames(CLASSNAMES)
        again = method(images)
    torch.testing.assert_close(again, base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_trainable_state_dict_round_trips_bit_exactly(name, tiny_clip, tmp_path):
    method = _build(name, tiny_clip, seed=0)
    if get_method(name).trainable:
        method.train()
        opt = torch.optim.SGD(method.param_groups(0.01), lr=0.01)
        images, labels = _images()
        loss, _ = method.loss(images, labels)
        loss.backward()
        opt.step()
        method.on_epoch_end(0, 2)  # methods with running state (PromptSRC GPA) fill it
    state = method.trainable_state_dict()
    expected = set(method.named_trainable_parameters()) | set(method.extra_state_tensors())
    assert set(state) == expected
    assert not any(k.startswith("clip.") for k in state)
    # only trainable tensors (+ declared extras): no class-dependent buffers, no teachers
    buffers = {n for n, _ in method.named_buffers() if not n.startswith("clip.")}
    assert not (set(method.named_trainable_parameters()) & buffers)

    path = tmp_path / "prompts.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = load_file(str(path))

    fresh = _build(name, tiny_clip, seed=1)
    fresh.load_trainable_state_dict(loaded)
    for k, v in fresh.trainable_state_dict().items():
        assert torch.equal(v, state[k]), f"{name}: {k} differs after loading"
    method.eval()
    fresh.eval()
    images, _ = _images(2, seed=5)
    with torch.no_grad():
        assert torch.equal(method(images), fresh(images))
    with pytest.raises(KeyError):
        fresh.load_trainable_state_dict({**loaded, "bogus": torch.zeros(1)})


@pytest.mark.parametrize("name", METHODS)
def test_config_round_trips_through_json(name):
    cls = get_method(name)
    cfg = make_config(cls, TINY_OVERRIDES.get(name, {}))
    restored = make_config(cls, json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert restored == cfg
    with pytest.raises(ValueError, match="unknown config field"):
        make_config(cls, {"no_such_field": 1})
