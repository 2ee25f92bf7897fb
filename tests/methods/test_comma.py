"""COMMA (METHODS.md §5, §10): parameter counts, the attention-transform generator and the
co-articulated vision-prompt chain, the released-code (frozen, gradient-free) vs. paper
(trainable) generators, and the all-positions KD term against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlprompt.clip.model import CLIPConfig, build_clip
from vlprompt.clip.tokenizer import tokenize
from vlprompt.methods import build_method
from vlprompt.methods.comma import AttentionTransform, COMMAConfig

from .conftest import CLASSNAMES, colour_batch

# METHODS.md §5.2 (ViT-B/16, J = 9): ctx + proj + text deep prompts = 403,200 trained; one
# attention transform = 691,392; the released code registers 5,946,624, which includes its
# 12,288-value `compound_prompts_image` (overwritten every forward; not registered here).
TRAINED_RELEASED = 403_200
PER_TRANSFORM = 691_392
REGISTERED_RELEASED = 5_946_624
IMAGE_PROMPT_PARAM = 8 * 2 * 768


@pytest.fixture(scope="module")
def vit_b16():
    clip = build_clip(CLIPConfig())
    clip.requires_grad_(False)
    return clip.eval()


@pytest.fixture(scope="module")
def clip3():
    """Tiny CLIP with 3 blocks per tower, so depth 3 has two generators and a real chain."""
    torch.manual_seed(0)
    clip = build_clip(CLIPConfig(embed_dim=32, image_size=32, patch_size=8, vision_width=48,
                                 vision_layers=3, vision_heads=2, text_width=32, text_layers=3,
                                 text_heads=2))
    clip.requires_grad_(False)
    return clip.eval()


def _images(n=4, seed=0):
    return colour_batch(n, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- parameter counts
def test_released_counts_match_methods_md(vit_b16):
    m = build_method("comma", vit_b16, ["cat", "dog"])
    assert m.num_trainable_parameters() == TRAINED_RELEASED
    gens = m.prompts.generators
    assert len(gens) == 8 and not list(gens.parameters())
    frozen = sum(b.numel() for b in gens.buffers())
    assert frozen == 8 * PER_TRANSFORM
    assert TRAINED_RELEASED + frozen + IMAGE_PROMPT_PARAM == REGISTERED_RELEASED
    assert sum(v.numel() for v in m.extra_state_tensors().values()) == frozen
    names = set(m.named_trainable_parameters())
    assert names == {"prompts.ctx", "prompts.proj.weight", "prompts.proj.bias",
                     "prompts.text_deep.prompts"}


def test_paper_mode_trains_the_generators(vit_b16):
    m = build_method("comma", vit_b16, ["cat", "dog"], train_generators=True)
    assert m.num_trainable_parameters() == TRAINED_RELEASED + 8 * PER_TRANSFORM  # 5,934,336
    assert m.extra_state_tensors() == {}


def test_cross_dataset_depth3_count(vit_b16):
    m = build_method("comma", vit_b16, ["cat", "dog"], depth=3)
    assert m.num_trainable_parameters() == 2 * 512 + (512 * 768 + 768) + 2 * 2 * 512
    assert len(m.prompts.generators) == 2


# ---------------------------------------------------------------------- generator
def test_attention_transform_matches_hand_formula():
    torch.manual_seed(0)
    t_mod = AttentionTransform(text_width=6, vision_width=8, reduction=4)
    v, t = torch.randn(3, 8), torch.randn(2, 6)
    tp = t @ t_mod.fc.weight.t() + t_mod.fc.bias  # [2, 8]
    a = torch.softmax(v @ tp.t() / math.sqrt(8), dim=-1)  # [3, 2], rows over text tokens
    mixed = F.layer_norm(a @ tp, (8,), t_mod.ln.weight, t_mod.ln.bias)
    l1, l2 = t_mod.mlp[0], t_mod.mlp[2]
    assert l1.out_features == 2
    expected = torch.relu(mixed @ l1.weight.t() + l1.bias) @ l2.weight.t() + l2.bias
    torch.testing.assert_close(t_mod(v, t), expected)


@pytest.mark.parametrize("train_generators", [False, True])
def test_vision_prompts_are_chained_from_both_branches(clip3, train_generators):
    m = build_method("comma", clip3, CLASSNAMES, depth=3, train_generators=train_generators)
    p = m.prompts
    shallow, deep = p.vision_prompts()
    v1 = p.proj(p.ctx)
    v2 = p.generators[0](v1, p.ctx)
    v3 = p.generators[1](v2, p.text_deep.prompts[0])
    torch.testing.assert_close(shallow, v1)
    assert sorted(deep) == [1, 2]
    torch.testing.assert_close(deep[1], v2)
    torch.testing.assert_close(deep[2], v3)
    assert deep[2].requires_grad == train_generators
    # the logits use exactly these prompts
    images, _ = _images(2)
    with torch.no_grad():
        img = clip3.encode_image(images, prompts=shallow, deep_prompts=deep)
        text = p.encode_text(clip3)
        torch.testing.assert_close(m(images), m.logits(img, text))


def _image_only_grads(method, images):
    """Gradients of a loss that depends on the image branch only."""
    method.zero_grad(set_to_none=True)
    method.image_features(images).pow(2).sum().backward()
    return {n: p.grad for n, p in method.named_trainable_parameters().items()}


def test_released_mode_generated_prompts_carry_no_gradient(clip3):
    m = build_method("comma", clip3, CLASSNAMES, depth=3)
    grads = _image_only_grads(m, _images(2)[0])
    # the text deep prompts reach the image tower only through the (detached) generators
    assert grads["prompts.text_deep.prompts"] is None
    assert grads["prompts.proj.weight"].abs().sum() > 0  # V_1 = proj(ctx) is trained
    assert grads["prompts.ctx"].abs().sum() > 0


def test_paper_mode_gradients_flow_through_the_generators(clip3):
    m = build_method("comma", clip3, CLASSNAMES, depth=3, train_generators=True)
    grads = _image_only_grads(m, _images(2)[0])
    assert grads["prompts.text_deep.prompts"][0].abs().sum() > 0  # P_2 feeds V_3
    for n, g in grads.items():
        if n.startswith("prompts.generators."):
            assert g is not None and g.abs().sum() > 0, n


# ---------------------------------------------------------------------- KD loss
def _hidden(clip, emb, eot, deep=None, k=1):
    hs = []
    clip.encode_text_embeddings(emb, eot, deep_prompts=deep, hidden_states=hs, truncate=False)
    return hs[-k:]


@pytest.mark.parametrize("kd_layers", [1, 2])
def test_kd_term_matches_hand_computation(clip3, kd_layers):
    template = "a photo of a {}, a type of colour."
    m = build_method("comma", clip3, CLASSNAMES, template=template, depth=3, kd_layers=kd_layers,
                     kd_weight=0.7)
    images, labels = _images(4)
    with torch.no_grad():
        loss, parts = m.loss(images, labels)
        p = m.prompts
        learned = _hidden(clip3, p.text.assemble(p.ctx), p.text.eot_indices,
                          p.text_deep.as_dict(), kd_layers)
        tokens = tokenize([template.format(c) for c in CLASSNAMES])
        target = _hidden(clip3, clip3.embed_tokens(tokens), tokens.argmax(-1), None, kd_layers)
        assert learned[0].shape == (len(CLASSNAMES), 77, 32)  # all 77 positions
        terms = [1 - F.cosine_similarity(a, b, dim=-1, eps=1e-7).mean()
                 for a, b in zip(learned, target)]
        kd = sum(terms) / len(terms)
        ce = F.cross_entropy(m(images), labels)
    assert parts["kd"] == pytest.approx(float(kd), abs=1e-5)
    assert parts["ce"] == pytest.approx(float(ce), abs=1e-5)
    assert float(loss) == pytest.approx(float(ce) + 0.7 * float(kd), abs=1e-5)
    assert parts["kd"] > 1e-3


def test_kd_is_zero_when_the_prompt_is_the_template(clip3):
    """Depth 1 and ctx = 'a photo' of 'a photo of a {}.': the learned prompt IS the template."""
    m = build_method("comma", clip3, CLASSNAMES, template="a photo of a {}.", depth=1)
    with torch.no_grad():
        _, parts = m.loss(*_images(4))
    assert abs(parts["kd"]) < 1e-5


def test_kd_weight_zero_is_cross_entropy(clip3):
    m = build_method("comma", clip3, CLASSNAMES, depth=3, kd_weight=0.0)
    images, labels = _images(4)
    with torch.no_grad():
        loss, parts = m.loss(images, labels)
        ce = F.cross_entropy(m(images), labels)
    assert set(parts) == {"ce"}
    torch.testing.assert_close(loss, ce)


def test_teacher_cached_per_class_list(clip3):
    m = build_method("comma", clip3, CLASSNAMES, depth=3)
    first = m.template_hidden_states()
    assert m.template_hidden_states() is first
    assert first.shape == (1, 4, 77, 32) and "teacher_hidden" not in m.state_dict()
    m.set_classnames(["cyan", "grey"])
    assert m.teacher_hidden is None
    assert m.template_hidden_states().shape == (1, 2, 77, 32)


def test_truncated_and_full_length_text_features_agree(clip3):
    m = build_method("comma", clip3, CLASSNAMES, depth=3)
    with torch.no_grad():
        torch.testing.assert_close(m.text_features(), m.text_features(hidden_states=[]),
                                   rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- checkpoint, config
def test_frozen_generators_travel_with_the_checkpoint(clip3):
    torch.manual_seed(0)
    a = build_method("comma", clip3, CLASSNAMES, depth=3)
    torch.manual_seed(1)
    b = build_method("comma", clip3, CLASSNAMES, depth=3)
    key = "generators.0.fc.weight"
    assert key in a.extra_state_tensors()
    assert not torch.equal(a.extra_state_tensors()[key], b.extra_state_tensors()[key])
    b.load_trainable_state_dict(a.trainable_state_dict())
    images, _ = _images(2)
    with torch.no_grad():
        assert torch.equal(a(images), b(images))
    bad = a.trainable_state_dict()
    bad[key] = torch.zeros(3)
    with pytest.raises(ValueError, match="generator tensor"):
        b.load_trainable_state_dict(bad)


@pytest.mark.parametrize("field,value", [("n_ctx", 0), ("depth", 0), ("kd_weight", -1.0),
                                         ("kd_layers", 0), ("generator_reduction", 0),
                                         ("train_generators", "yes")])
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        COMMAConfig(**{field: value})


def test_kd_layers_beyond_text_depth_is_an_error(clip3):
    with pytest.raises(ValueError, match="kd_layers"):
        build_method("comma", clip3, CLASSNAMES, kd_layers=4)


def test_paper_mode_meets_the_gradient_and_checkpoint_contract(clip3):
    """The contract matrix runs the default (released) mode; the paper switch must meet it too."""
    torch.manual_seed(0)
    m = build_method("comma", clip3, CLASSNAMES, depth=3, train_generators=True)
    trainable = m.named_trainable_parameters()
    others = {n for n, _ in m.named_parameters() if not n.startswith("clip.")}
    assert others == set(trainable) and any(n.startswith("prompts.generators.") for n in others)
    loss, _ = m.loss(*_images(4))
    loss.backward()
    for n, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    torch.manual_seed(1)
    fresh = build_method("comma", clip3, CLASSNAMES, depth=3, train_generators=True)
    fresh.load_trainable_state_dict(m.trainable_state_dict())
    images, _ = _images(2, seed=5)
    with torch.no_grad():
        assert torch.equal(m(images), fresh(images))


def test_packaged_configs_resolve_to_methods_md_settings():
    from vlprompt.config import resolve_config

    for protocol, depth, lr, epochs in [("base2new", 9, 0.0035, 5), ("fewshot", 9, 0.0035, 5),
                                        ("xd", 3, 0.0026, 2)]:
        cfg = resolve_config("comma", protocol)
        assert cfg["method"]["depth"] == depth and cfg["method"]["kd_weight"] == 1.0
        assert cfg["method"]["train_generators"] is False and cfg["method"]["kd_layers"] == 1
        assert cfg["train"]["lr"] == lr and cfg["train"]["max_epoch"] == epochs
        assert cfg["train"]["batch_size"] == 4
