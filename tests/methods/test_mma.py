"""MMA (METHODS-SOTA.md §1): logits, loss and gradients against a formula reference on shared
weights, the released gradient rescaling and its switch, the scale-0 reduction to zero-shot CLIP,
initialisation, layer range, the evaluation text cache, and the shipped configs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import vlprompt
from vlprompt.clip.model import CLIPConfig, build_clip
from vlprompt.clip.tokenizer import tokenize
from vlprompt.config import resolve_config
from vlprompt.methods import build_method, get_method, make_config

from ..clip import reference_towers as ref
from .conftest import CLASSNAMES, NEW_CLASSNAMES, colour_batch, counting_text_tower

BOTH_BLOCKS = {"adapter_start": 0, "adapter_end": 1}  # the tiny CLIP has 2 blocks per tower


def _mma(clip, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_method("mma", clip, CLASSNAMES, **{**BOTH_BLOCKS, **overrides})


def _reference(method, images, labels):
    """Logits and CE from the formulas, all 77 text tokens:
    out_i = block_i(x) + s U_i(S_i(D_i(ln_1(x)))), with the released rescaling done by tensor
    hooks (x's gradient x s, the branch output's x 1/s)."""
    cfg = method.config
    s = cfg.adapter_scale

    def branch_for(adapters):
        def branch(i, x, block):
            key = str(i)
            if key not in adapters:
                return torch.zeros_like(x)
            a, shared = adapters[key], method.shared[key]
            if cfg.grad_rescale and x.requires_grad:
                x = x * 1.0
                x.register_hook(lambda g: g * s)
            h = F.relu(ref.layer_norm(block.ln_1, x) @ a.down[0].weight.t() + a.down[0].bias)
            h = F.relu(h @ shared[0].weight.t() + shared[0].bias)
            y = (h @ a.up.weight.t() + a.up.bias) * s
            if cfg.grad_rescale:
                y.register_hook(lambda g: g / s)
            return y
        return branch

    tokens = tokenize([f"a photo of a {c}." for c in CLASSNAMES])
    text = ref.encode_text(method.clip, tokens, branch=branch_for(method.text))
    image = ref.encode_image(method.clip, images, branch=branch_for(method.vision))
    scale = method.clip.logit_scale.exp()  # exp(4.6052): 100.003, CLIP's stored value
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    return logits, F.cross_entropy(logits, labels)


#: relative tolerance of the formula checks: float64 shows the implementations agree to
#: rounding; float32 is the precision runs use
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rescale", [True, False])
def test_logits_loss_and_gradients_match_the_formulas(tiny_clip, rescale, dtype):
    clip = copy.deepcopy(tiny_clip).to(dtype)
    method = _mma(clip, grad_rescale=rescale, adapter_scale=0.05).to(dtype)  # a scale that shows
    method.train()
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
    plain = build_method("zeroshot", clip, CLASSNAMES)(images)
    assert ref.rel(plain, ref_logits) > 1e-3  # the adapters acted
    for (name, _), g, r in zip(params, grads, ref_grads, strict=True):
        assert ref.rel(g, r) <= (tol if dtype == torch.float64 else 5 * tol), name


def test_grad_rescale_multiplies_adapter_gradients_by_one_over_scale(tiny_clip):
    """The released rescaling equals exact autograd followed by grad x 1/s on every MMA tensor
    (METHODS-SOTA.md §1); the logits are the same either way."""
    images, labels = colour_batch(4, torch.Generator().manual_seed(0))
    out = {}
    for rescale in (True, False):
        method = _mma(tiny_clip, grad_rescale=rescale)
        method.train()
        loss, _ = method.loss(images, labels)
        loss.backward()
        out[rescale] = (float(loss.detach()), {n: p.grad for n, p in
                                      method.named_trainable_parameters().items()})
    assert out[True][0] == out[False][0]
    s = 0.001
    for name, g in out[True][1].items():
        assert ref.rel(g, out[False][1][name] / s) <= 1e-5, name


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_scale_zero_equals_zero_shot_with_the_same_prompt(tiny_clip, mode):
    method = _mma(tiny_clip, adapter_scale=0.0, grad_rescale=False)
    zs = build_method("zeroshot", tiny_clip, CLASSNAMES, template="a photo of a {}.")
    method.train(mode == "train")
    images, _ = colour_batch(5, torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(method(images), zs(images), rtol=1e-6, atol=1e-5)


def test_shared_adapter_serves_both_towers(tiny_clip):
    method = _mma(tiny_clip)
    images, labels = colour_batch(4, torch.Generator().manual_seed(0))
    text_only = F.cross_entropy(method.logits(tiny_clip.encode_image(images),
                                              method.text_features()), labels)
    image_only = F.cross_entropy(method.logits(method.image_features(images),
                                               method.text_features().detach()), labels)
    shared = list(method.shared.parameters())
    for loss in (text_only, image_only):
        grads = torch.autograd.grad(loss, shared, retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads)


@pytest.fixture(scope="module")
def vit_b16_mma():
    """MMA on a randomly initialised CLIP with ViT-B/16's shapes (built once)."""
    clip = build_clip(CLIPConfig()).requires_grad_(False).eval()
    torch.manual_seed(0)
    return build_method("mma", clip, CLASSNAMES)


def test_initialisation(tiny_clip, vit_b16_mma):
    method = _mma(tiny_clip)
    for name, p in method.named_trainable_parameters().items():
        if name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
    w = vit_b16_mma.vision["4"].down[0].weight.detach()
    assert abs(float(w.std()) - (2 / 32) ** 0.5) < 0.01  # kaiming_normal fan_out (32), relu
    w = vit_b16_mma.text["4"].up.weight.detach()
    assert abs(float(w.std()) - (2 / 512) ** 0.5) < 0.005  # fan_out 512


def test_layer_range_at_vit_b16_shapes_and_capping(tiny_clip, vit_b16_mma, caplog):
    big = vit_b16_mma
    assert sorted(map(int, big.text)) == list(range(4, 12)) == sorted(map(int, big.shared))
    assert big.text["4"].down[0].weight.shape == (32, 512)
    assert big.vision["11"].up.weight.shape == (768, 32)
    small = build_method("mma", tiny_clip, CLASSNAMES)  # 4..11 on 2 blocks: capped to block 1
    assert list(small.text) == list(small.vision) == ["1"]
    assert "exceed" in caplog.text


@pytest.mark.parametrize("overrides", [{"adapter_start": 5, "adapter_end": 4},
                                       {"adapter_start": -1}, {"adapter_dim": 0},
                                       {"adapter_scale": 0.0}])
def test_bad_configs_raise(overrides):
    with pytest.raises(ValueError):
        make_config(get_method("mma"), overrides)


def test_evaluation_text_cache_follows_steps_loads_and_classes(tiny_clip):
    method = _mma(tiny_clip)
    images, _ = colour_batch(3, torch.Generator().manual_seed(0))
    method.eval()
    with counting_text_tower(tiny_clip) as calls:
        with torch.no_grad():
            a = method(images)
            b = method(images)
            assert torch.equal(a, b) and len(calls) == 1
            method.text["1"].up.bias.add_(0.5)  # an in-place change (as an optimiser step)
            c = method(images)
            assert len(calls) == 2 and not torch.equal(a, c)
            method.set_classnames(NEW_CLASSNAMES)
            assert method(images).shape == (3, len(NEW_CLASSNAMES)) and len(calls) == 3
        method.train()
        method(images)
        method(images)
        assert len(calls) == 5  # training recomputes every step


def test_template_field(tiny_clip):
    template = "a photo of a {}, a type of colour."
    released = build_method("mma", tiny_clip, CLASSNAMES, template=template)
    expected = tokenize([f"a photo of a {c}." for c in CLASSNAMES])
    assert torch.equal(released.prompts.tokens, expected)
    dataset = build_method("mma", tiny_clip, CLASSNAMES, template=template,
                           prompt_template="dataset")
    assert torch.equal(dataset.prompts.tokens, tokenize([template.format(c) for c in CLASSNAMES]))


CONFIG_DIR = Path(vlprompt.__file__).parent / "configs" / "mma"


def test_shipped_configs_match_the_official_settings():
    for protocol in ("base2new", "fewshot", "xd"):
        data = yaml.safe_load((CONFIG_DIR / f"{protocol}.yaml").read_text())
        make_config(get_method("mma"), data["method"])
    b2n = resolve_config("mma", "base2new", dataset="eurosat", shots=16)
    t = b2n["train"]
    assert (t["optimizer"], t["lr"], t["max_epoch"], t["batch_size"], t["warmup_epoch"],
            t["lr_scheduler"], t["momentum"], t["weight_decay"]) == \
        ("sgd", 0.0015, 5, 16, 0, "cosine", 0.9, 5e-4)
    m = b2n["method"]
    assert (m["adapter_start"], m["adapter_end"], m["adapter_dim"], m["adapter_scale"],
            m["grad_rescale"], m["prompt_template"]) == (4, 11, 32, 0.001, True, "a photo of a {}.")
    assert resolve_config("mma", "base2new", dataset="imagenet")["train"]["batch_size"] == 128
    xd = resolve_config("mma", "xd", dataset="imagenet")["train"]
    assert (xd["lr"], xd["max_epoch"], xd["batch_size"], xd["warmup_epoch"]) == \
        (0.0015, 5, 128, 0)
