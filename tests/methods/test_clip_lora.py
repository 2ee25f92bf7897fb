"""CLIP-LoRA (METHODS-SOTA.md §8, implemented from the spec): the zero-B and rank-0 reductions
to zero-shot CLIP, logits/loss/gradients against a formula reference on shared weights, towers
and projections selected by config, merging, the evaluation text cache, and the configs."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import vlprompt
from vlprompt.clip.tokenizer import tokenize
from vlprompt.config import resolve_config
from vlprompt.methods import build_method, get_method, make_config

from ..clip import reference_towers as ref
from .conftest import CLASSNAMES, NEW_CLASSNAMES, colour_batch


def _lora(clip, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_method("clip_lora", clip, CLASSNAMES, **overrides)


def _zero_shot(clip):
    return build_method("zeroshot", clip, CLASSNAMES, template="a photo of a {}.")


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("overrides", [{}, {"r": 0}, {"params": ["q", "k", "v", "out"]}])
def test_zero_b_or_rank_zero_equals_zero_shot(tiny_clip, mode, overrides):
    """The released init (B = 0) is zero-shot CLIP with "a photo of a {}.", dropout or not."""
    method = _lora(tiny_clip, **overrides)
    method.train(mode == "train")
    images, _ = colour_batch(5, torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(method(images), _zero_shot(tiny_clip)(images),
                                   rtol=1e-6, atol=1e-5)
    if overrides.get("r") == 0:
        assert method.num_trainable_parameters() == 0


def _reference(method, images, labels):
    """Logits and CE from the formulas: q = W_q x + b_q + s (x A_q^T) B_q^T (eval, no dropout),
    every block of both towers, all 77 text tokens."""
    def deltas(stack):
        def f(m):
            return lambda x: (x @ m.A.t()) @ m.B.t() * m.scale
        return {i: {t: f(getattr(b, t)) for t in ("q", "k", "v", "out")
                    if getattr(b, t) is not None} for i, b in stack.as_dict().items()}
    tokens = tokenize([f"a photo of a {c}." for c in CLASSNAMES])
    text = ref.encode_text(method.clip, tokens, deltas=deltas(method.text_lora))
    image = ref.encode_image(method.clip, images, deltas=deltas(method.vision_lora))
    scale = method.clip.logit_scale.exp()
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    return logits, F.cross_entropy(logits, labels)


#: relative tolerance of the formula checks: float64 shows the implementations agree to
#: rounding; float32 is the precision runs use
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scaling", ["alpha/sqrt(r)", "alpha/r"])
def test_logits_loss_and_gradients_match_the_formulas(tiny_clip, scaling, dtype):
    clip = copy.deepcopy(tiny_clip).to(dtype)
    method = _lora(clip, init_b="kaiming", scaling=scaling, r=4, alpha=2.0).to(dtype)
    block = method.vision_lora.as_dict()[0]
    assert block.q.scale == pytest.approx(2 / math.sqrt(4) if scaling == "alpha/sqrt(r)" else 0.5)
    method.eval()  # dropout off: the formula has no randomness
    images, labels = colour_batch(4, torch.Generator().manual_seed(0))
    images = images.to(dtype)
    params = list(method.named_trainable_parameters().items())
    loss, _ = method.loss(images, labels)
    logits = method(images)
    grads = torch.autograd.grad(loss, [p for _, p in params])
    ref_logits, ref_loss = _reference(method, images, labels)
    ref_grads = torch.autograd.grad(ref_loss, [p for _, p in params])
    tol = TOLERANCE[dtype]
    assert ref.rel(logits, ref_logits) <= tol
    assert ref.rel(loss, ref_loss) <= tol
    assert ref.rel(_zero_shot(clip)(images), ref_logits) > 1e-3  # the deltas acted
    for (name, _), g, r in zip(params, grads, ref_grads, strict=True):
        # float32 gradients of 12k-element sums: a few ulps more than the logits
        assert ref.rel(g, r) <= (tol if dtype == torch.float64 else 5 * tol), name


def test_at_init_only_b_gets_a_gradient(tiny_clip):
    """With B = 0 the first gradient reaches B only (A's is exactly zero) — why the contract
    test uses init_b=kaiming."""
    method = _lora(tiny_clip)
    method.train()
    loss, _ = method.loss(*colour_batch(4, torch.Generator().manual_seed(0)))
    loss.backward()
    for name, p in method.named_trainable_parameters().items():
        assert (p.grad.abs().sum() > 0) == name.endswith(".B"), name


def test_towers_layers_and_projections_by_config(tiny_clip):
    both = _lora(tiny_clip)
    names = set(both.named_trainable_parameters())
    assert "text_lora.blocks.0.q.A" in names and "vision_lora.blocks.1.v.B" in names
    assert not any(".out." in n for n in names)
    assert both.num_trainable_parameters() == 2 * 2 * 3 * 2 * (64 + 64)
    vision = _lora(tiny_clip, encoder="vision", layers=[1], params=["q", "out"])
    assert vision.text_lora is None
    assert sorted(vision.named_trainable_parameters()) == [
        "vision_lora.blocks.1.out.A", "vision_lora.blocks.1.out.B",
        "vision_lora.blocks.1.q.A", "vision_lora.blocks.1.q.B"]
    text = _lora(tiny_clip, encoder="text", layers=[0, 7])  # 7 is beyond the 2-block tower
    assert text.vision_lora is None and list(text.text_lora.blocks) == ["0"]


def test_merged_evaluation_equals_unmerged(tiny_clip):
    images, _ = colour_batch(3, torch.Generator().manual_seed(0))
    out = {}
    for merge in (False, True):
        method = _lora(tiny_clip, init_b="kaiming", merge=merge)
        method.eval()
        with torch.no_grad():
            out[merge] = method(images)
    assert ref.rel(out[True], out[False]) <= 1e-5


def test_dropout_only_in_training(tiny_clip):
    method = _lora(tiny_clip, init_b="kaiming")
    images, _ = colour_batch(3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        method.train()
        a, b = method(images), method(images)
        method.eval()
        c, d = method(images), method(images)
    assert not torch.equal(a, b) and torch.equal(c, d)


def test_evaluation_text_cache_follows_steps_and_classes(tiny_clip):
    method = _lora(tiny_clip, init_b="kaiming")
    images, _ = colour_batch(3, torch.Generator().manual_seed(0))
    method.eval()
    with torch.no_grad():
        a = method(images)
        assert method.text_features() is method.text_features()  # cached
        method.text_lora.blocks["0"].q.B.mul_(2.0)
        assert not torch.equal(method(images), a)
        method.set_classnames(NEW_CLASSNAMES)
        assert method(images).shape == (3, len(NEW_CLASSNAMES))


@pytest.mark.parametrize("overrides", [{"encoder": "image"}, {"params": ["w"]}, {"params": []},
                                       {"r": -1}, {"scaling": "alpha"}, {"dropout": 1.0},
                                       {"init_b": "normal"}, {"layers": [-1]},
                                       {"layers": "all"}])
def test_bad_configs_raise(overrides):
    with pytest.raises(ValueError):
        make_config(get_method("clip_lora"), overrides)


CONFIG_DIR = Path(vlprompt.__file__).parent / "configs" / "clip_lora"


def test_shipped_configs_match_the_released_settings():
    for protocol in ("base2new", "fewshot", "xd"):
        data = yaml.safe_load((CONFIG_DIR / f"{protocol}.yaml").read_text())
        cfg = make_config(get_method("clip_lora"), data["method"])
        assert cfg == get_method("clip_lora").Config()  # the YAMLs spell out the defaults
    for shots in (1, 2, 4, 8, 16):
        t = resolve_config("clip_lora", "fewshot", shots=shots, dataset="dtd")["train"]
        assert t["max_steps"] == 500 * shots
        assert (t["optimizer"], t["lr"], t["weight_decay"], t["adam_betas"], t["batch_size"],
                t["lr_scheduler"], t["min_lr"], t["warmup_epoch"]) == \
            ("adamw", 2e-4, 1e-2, [0.9, 0.999], 32, "cosine_step", 1e-6, 0)
    assert resolve_config("clip_lora", "base2new", shots=16)["train"]["max_steps"] == 8000
    assert resolve_config("clip_lora", "xd", shots=16, dataset="imagenet")["train"][
        "max_steps"] == 8000
