"""TOMML (vlprompt design, METHODS.md §3.3): reduction to CoCoOp, CTP/TFT against hand
computations, the text-to-image contrastive term, the shared chunked per-sample text encoder,
parameter count and configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import vlprompt
from vlprompt.clip.model import CLIPConfig, build_clip
from vlprompt.clip.tokenizer import tokenize
from vlprompt.methods import build_method, get_method, make_config
from vlprompt.methods.prompts import encode_per_sample_prompts
from vlprompt.methods.tomml import joint_attention, text_to_image_contrastive

from .conftest import CLASSNAMES, colour_batch

OFF = {"ctp": False, "tft": False, "contrastive_weight": 0.0}


def _images(n=3, seed=0):
    return colour_batch(n, torch.Generator().manual_seed(seed))


def _build(name, clip, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_method(name, clip, CLASSNAMES, **overrides)


def _perturb(method, seed=1):
    """Move every trainable tensor off its initial value (so gamma = 0 does not hide TFT)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.named_trainable_parameters().values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------- reduction
def test_all_switches_off_is_exactly_cocoop(tiny_clip):
    x, y = _images(4)
    cocoop = _build("cocoop", tiny_clip)
    tomml = _build("tomml", tiny_clip, **OFF)
    assert set(tomml.named_trainable_parameters()) == set(cocoop.named_trainable_parameters())
    _perturb(cocoop)
    tomml.load_trainable_state_dict(cocoop.trainable_state_dict())
    ref_loss, ref_parts = cocoop.loss(x, y)
    loss, parts = tomml.loss(x, y)
    assert torch.equal(tomml(x), cocoop(x))
    assert torch.equal(loss, ref_loss) and parts == ref_parts
    loss.backward()
    ref_loss.backward()
    for n, p in cocoop.named_trainable_parameters().items():
        assert torch.equal(tomml.named_trainable_parameters()[n].grad, p.grad)


def test_tft_with_zero_gate_equals_tft_off(tiny_clip):
    """gamma starts at 0, so TFT starts from plain CLIP image features."""
    x, _ = _images(3)
    on = _build("tomml", tiny_clip)
    off = _build("tomml", tiny_clip, tft=False)
    assert float(on.tft_gate.detach()) == 0.0
    with torch.no_grad():
        torch.testing.assert_close(on(x), off(x), rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------- components
def test_joint_attention_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    q, tokens, scale = torch.randn(3, 8, generator=g), torch.randn(2, 5, 8, generator=g), 7.0
    out = joint_attention(q, tokens, torch.tensor(scale))
    for b in range(2):
        for i in range(3):
            w = torch.softmax(scale * F.cosine_similarity(q[i][None], tokens[b], dim=-1), dim=0)
            torch.testing.assert_close(out[b, i], w @ tokens[b])
    per_sample = torch.randn(2, 3, 8, generator=g)
    out = joint_attention(per_sample, tokens, torch.tensor(scale))
    torch.testing.assert_close(out[1], joint_attention(per_sample[1], tokens[1:2],
                                                       torch.tensor(scale))[0])


def test_ctp_context_is_class_specific_and_matches_hand_computation(tiny_clip):
    x, _ = _images(2)
    method = _build("tomml", tiny_clip, template="a photo of a {}.")
    _perturb(method)
    with torch.no_grad():
        f, tokens = tiny_clip.encode_image(x, return_tokens=True)
        ctx = method.context(*method.frozen_image(x))  # [B, C, M, Dt]
        queries = F.normalize(tiny_clip.encode_text(tokenize(
            [f"a photo of a {c}." for c in CLASSNAMES])), dim=-1)
        scale = tiny_clip.logit_scale.exp()
        for b in range(2):
            keys = torch.cat([f[b:b + 1], tokens[b, 1:]])  # global feature + patches
            for c in range(len(CLASSNAMES)):
                w = torch.softmax(scale * F.cosine_similarity(queries[c][None], keys), dim=0)
                u = F.normalize(w @ keys, dim=-1)
                expected = method.ctx + method.meta_net(u)[None]
                torch.testing.assert_close(ctx[b, c], expected, rtol=1e-5, atol=1e-5)
    assert ctx.shape == (2, len(CLASSNAMES), 4, 64)
    assert not torch.allclose(ctx[:, 0], ctx[:, 1])  # classes get different image signals


def test_tft_logits_match_hand_computation(tiny_clip):
    x, _ = _images(2)
    method = _build("tomml", tiny_clip)
    _perturb(method)
    with torch.no_grad():
        method.tft_gate.fill_(0.7)
        logits = method(x)
        f, tokens = tiny_clip.encode_image(x, return_tokens=True)
        text = method.text_features(method.context(f, tokens[:, 1:]))  # [B, C, E]
        scale = tiny_clip.logit_scale.exp()
        for b in range(2):
            for c in range(len(CLASSNAMES)):
                w = torch.softmax(scale * F.cosine_similarity(text[b, c][None], tokens[b, 1:]), 0)
                v = f[b] + 0.7 * (w @ tokens[b, 1:])
                expected = scale * F.cosine_similarity(v, text[b, c], dim=0)
                torch.testing.assert_close(logits[b, c], expected, rtol=1e-5, atol=1e-4)


def test_text_to_image_contrastive_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    logits = 5 * torch.randn(5, 4, generator=g)
    labels = torch.tensor([0, 2, 0, 1, 2])  # class 3 absent; 0 and 2 have two images each
    expected = []
    for c in (0, 1, 2):
        log_p = torch.log_softmax(logits[:, c], dim=0)
        expected.append(-log_p[labels == c].mean())
    torch.testing.assert_close(text_to_image_contrastive(logits, labels),
                               torch.stack(expected).mean())


def test_loss_is_ce_plus_weighted_contrastive(tiny_clip):
    x, y = _images(4)
    method = _build("tomml", tiny_clip, contrastive_weight=0.5)
    with torch.no_grad():
        total, parts = method.loss(x, y)
        logits = method(x)
    assert parts["ce"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    assert parts["t2i"] == pytest.approx(float(text_to_image_contrastive(logits, y)), rel=1e-5)
    assert float(total) == pytest.approx(parts["ce"] + 0.5 * parts["t2i"], rel=1e-5)


def test_set_classnames_resets_the_class_queries(tiny_clip):
    method = _build("tomml", tiny_clip)
    with torch.no_grad():
        method(_images(1)[0])
    assert method.class_queries.shape[0] == len(CLASSNAMES)
    method.set_classnames(["cyan", "grey"])
    assert method.class_queries is None
    with torch.no_grad():
        assert method(_images(1)[0]).shape == (1, 2)


# ---------------------------------------------------------------------------- chunking
@pytest.mark.parametrize("chunk", [0, 1, 5, 7])
def test_per_class_context_chunks_match_per_image_assembly(tiny_clip, chunk):
    """[B, C, M, D] contexts (CTP) through the shared chunked encoder = one assemble() per image."""
    method = _build("tomml", tiny_clip)
    tp = method.prompts
    ctx = torch.randn(3, len(CLASSNAMES), 4, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = encode_per_sample_prompts(tiny_clip, tp, ctx, chunk)
        for b in range(3):
            ref = tiny_clip.encode_text_embeddings(tp.assemble(ctx[b]), tp.eot_indices)
            torch.testing.assert_close(got[b], ref, rtol=1e-5, atol=1e-5)


def test_per_sample_encoder_rejects_bad_context(tiny_clip):
    method = _build("tomml", tiny_clip)
    with pytest.raises(ValueError, match="context must be"):
        encode_per_sample_prompts(tiny_clip, method.prompts, torch.zeros(2, 3, 64))


def test_ctp_chunked_gradients_equal_unchunked(tiny_clip):
    x, y = _images(3)
    grads = []
    for size, ckpt in ((0, False), (5, True)):
        method = _build("tomml", tiny_clip, text_chunk_size=size, checkpoint_chunks=ckpt)
        method.loss(x, y)[0].backward()
        grads.append(method.meta_net.linear1.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5,
                               atol=1e-5 * float(grads[0].abs().max()))


# ---------------------------------------------------------------------------- config, count
def test_bad_configs_raise():
    with pytest.raises(ValueError, match="contrastive_weight"):
        make_config(get_method("tomml"), {"contrastive_weight": -1.0})
    with pytest.raises(ValueError):
        make_config(get_method("tomml"), {"text_chunk_size": -1})


def test_trainable_parameter_count_vit_b16():
    """CoCoOp's 35,360 (4 x 512 context + 512-32-512 meta-net) + the TFT gate."""
    clip = build_clip(CLIPConfig(vision_layers=1, text_layers=1))  # counts do not depend on depth
    clip.requires_grad_(False)
    method = build_method("tomml", clip, ["cat", "dog"])
    assert method.num_trainable_parameters() == 35_360 + 1
    assert build_method("tomml", clip, ["cat"], tft=False).num_trainable_parameters() == 35_360


CONFIG_DIR = Path(vlprompt.__file__).parent / "configs" / "tomml"


@pytest.mark.parametrize("protocol", ["base2new", "fewshot", "xd"])
def test_shipped_configs(protocol):
    data = yaml.safe_load((CONFIG_DIR / f"{protocol}.yaml").read_text())
    cfg = make_config(get_method("tomml"), data["method"])
    assert (cfg.ctp, cfg.tft, cfg.contrastive_weight, cfg.n_ctx) == (True, True, 1.0, 4)
    train = data["train"]
    assert (train["lr"], train["max_epoch"], train["warmup_epoch"]) == (0.002, 10, 1)
    assert train["batch_size"] > 1  # the text -> image term needs several images
