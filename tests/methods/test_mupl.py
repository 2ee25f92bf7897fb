"""MuPL (vlprompt design, METHODS.md §4.3): reduction to CoCoOp, FTP and TVP against hand
computations, switches, parameter count and configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import vlprompt
from vlprompt.clip.model import CLIPConfig, build_clip
from vlprompt.methods import build_method, get_method, make_config
from vlprompt.methods.tomml import TOMML, text_to_image_contrastive

from .conftest import CLASSNAMES, colour_batch

OFF = {"ftp": False, "tvp": False, "contrastive_weight": 0.0}


def _images(n=3, seed=0):
    return colour_batch(n, torch.Generator().manual_seed(seed))


def _build(clip, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_method("mupl", clip, CLASSNAMES, **overrides)


def _perturb(method, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.named_trainable_parameters().values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def test_mupl_extends_tomml():
    assert issubclass(get_method("mupl"), TOMML)


def test_all_switches_off_is_exactly_cocoop(tiny_clip):
    x, y = _images(4)
    torch.manual_seed(0)
    cocoop = build_method("cocoop", tiny_clip, CLASSNAMES)
    mupl = _build(tiny_clip, **OFF)
    assert set(mupl.named_trainable_parameters()) == set(cocoop.named_trainable_parameters())
    _perturb(cocoop)
    mupl.load_trainable_state_dict(cocoop.trainable_state_dict())
    assert torch.equal(mupl(x), cocoop(x))
    (loss, parts), (ref, ref_parts) = mupl.loss(x, y), cocoop.loss(x, y)
    assert torch.equal(loss, ref) and parts == ref_parts


def test_ftp_gives_each_context_token_its_own_semantic(tiny_clip):
    x, _ = _images(2)
    method = _build(tiny_clip, tvp=False)
    _perturb(method)
    with torch.no_grad():
        f, tokens = tiny_clip.encode_image(x, return_tokens=True)
        ctx = method.context(f, tokens[:, 1:])  # [B, M, Dt]
        scale = tiny_clip.logit_scale.exp()
        for b in range(2):
            patches = tokens[b, 1:]
            for j in range(4):
                w = torch.softmax(scale * F.cosine_similarity(method.part_queries[j][None],
                                                              patches), dim=0)
                g = F.normalize(w @ patches, dim=0)
                torch.testing.assert_close(ctx[b, j], method.ctx[j] + method.meta_net(g),
                                           rtol=1e-5, atol=1e-5)
    assert ctx.shape == (2, 4, 64)
    # the same prompt for every class of one image: text features come from [B, M, Dt]
    assert not torch.allclose(ctx[0, 0] - method.ctx[0], ctx[0, 1] - method.ctx[1])


@pytest.mark.parametrize("top_k", [2, 10])
def test_tvp_prompts_from_the_top_k_class_texts(tiny_clip, top_k):
    x, _ = _images(2)
    method = _build(tiny_clip, top_k=top_k, n_vision_tokens=3)
    _perturb(method)
    f = torch.randn(2, 32, generator=torch.Generator().manual_seed(2))
    text = torch.randn(2, len(CLASSNAMES), 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        shallow, deep = method.visual_prompts(f, text)
        k = min(top_k, len(CLASSNAMES))
        assert shallow.shape == (2, k + 3, 64) and set(deep) == {1}  # tiny tower: 2 blocks
        scale = tiny_clip.logit_scale.exp()
        for b in range(2):
            cos = F.cosine_similarity(f[b][None], text[b])  # [C]
            top, idx = cos.sort(descending=True)
            w = torch.softmax(scale * top[:k], dim=0)
            kept = w[:, None] * F.normalize(text[b, idx[:k]], dim=-1)
            for layer, prompts in ((0, shallow), (1, deep[1])):
                torch.testing.assert_close(prompts[b, :k], method.tvp_proj[layer](kept),
                                           rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(shallow[b, k:], method.vision.shallow)
            torch.testing.assert_close(deep[1][b, k:], method.vision.deep.prompts[0])


def test_tvp_logits_use_the_prompted_image_pass(tiny_clip):
    x, _ = _images(2)
    method = _build(tiny_clip, ftp=False)
    _perturb(method)
    with torch.no_grad():
        logits = method(x)
        f = tiny_clip.encode_image(x)
        text = method.text_features(method.conditional_context(f))
        shallow, deep = method.visual_prompts(f, text)
        v = tiny_clip.encode_image(x, prompts=shallow, deep_prompts=deep)
        expected = tiny_clip.logit_scale.exp() * torch.einsum(
            "be,bce->bc", F.normalize(v, dim=-1), F.normalize(text, dim=-1))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(v, f)


def test_tft_composes_with_tvp_and_loss_terms(tiny_clip):
    x, y = _images(4)
    method = _build(tiny_clip, tft=True, n_vision_tokens=0, contrastive_weight=2.0)
    assert method.vision is None and "tft_gate" in method.named_trainable_parameters()
    total, parts = method.loss(x, y)
    with torch.no_grad():
        logits = method(x)
    assert parts["ce"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    assert parts["t2i"] == pytest.approx(float(text_to_image_contrastive(logits, y)), rel=1e-5)
    assert float(total.detach()) == pytest.approx(parts["ce"] + 2.0 * parts["t2i"], rel=1e-5)


@pytest.mark.parametrize("overrides", [{"ctp": True}, {"top_k": 0}, {"n_vision_tokens": -1},
                                       {"visual_depth": 0}, {"contrastive_weight": -0.1}])
def test_bad_configs_raise(overrides):
    with pytest.raises(ValueError):
        make_config(get_method("mupl"), overrides)


def test_trainable_parameter_count_vit_b16():
    """ctx 4x512 + meta-net 33,312 (CoCoOp's 35,360) + part queries 4x512 + 9 x Linear(512->768)
    + N_v = 4 learnable visual tokens at 9 layers (4x768 shallow + 8x4x768 deep)."""
    clip = build_clip(CLIPConfig(text_layers=1))  # ViT-B/16 image tower (12 blocks)
    clip.requires_grad_(False)
    method = build_method("mupl", clip, ["cat", "dog"])
    expected = 35_360 + 4 * 512 + 9 * (512 * 768 + 768) + 9 * 4 * 768
    assert expected == 3_610_912
    assert method.num_trainable_parameters() == expected
    assert len(method.tvp_proj) == 9 and method.vision.deep.prompts.shape == (8, 4, 768)


CONFIG_DIR = Path(vlprompt.__file__).parent / "configs" / "mupl"


@pytest.mark.parametrize("protocol", ["base2new", "fewshot", "xd"])
def test_shipped_configs(protocol):
    data = yaml.safe_load((CONFIG_DIR / f"{protocol}.yaml").read_text())
    cfg = make_config(get_method("mupl"), data["method"])
    assert (cfg.ftp, cfg.tvp, cfg.ctp, cfg.tft) == (True, True, False, False)
    assert (cfg.top_k, cfg.n_vision_tokens, cfg.visual_depth) == (10, 4, 9)
    train = data["train"]
    assert (train["lr"], train["max_epoch"], train["warmup_epoch"]) == (0.002, 10, 1)
    assert train["batch_size"] > 1
