"""DPT (METHODS.md §2, §10): parameter count, the per-block prompt insertion, the CAVPT generator
and every loss term against hand computations, the guidance-stage switch, and the optimiser
groups."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlprompt.clip.model import CLIPConfig, build_clip
from vlprompt.config import TrainConfig
from vlprompt.engine.optim import build_optimizer, set_epoch_lr
from vlprompt.methods import build_method

from .conftest import CLASSNAMES, NEW_CLASSNAMES, colour_batch


@pytest.fixture(scope="module")
def vit_b16():
    clip = build_clip(CLIPConfig())
    clip.requires_grad_(False)
    return clip.eval()


def _dpt(clip, seed=0, classnames=CLASSNAMES, **overrides):
    torch.manual_seed(seed)
    return build_method("dpt", clip, classnames, **overrides)


def _batch(n=4, seed=0):
    return colour_batch(n, torch.Generator().manual_seed(seed))


def test_parameter_count_on_vit_b16(vit_b16):
    """§2.5: ctx 16*512 + VPT 11*10*768 + one CAVPT block 1,043,712 + aux classifier 768*C."""
    for names in (["cat", "dog"], [f"c{i}" for i in range(5)]):
        method = build_method("dpt", vit_b16, names)
        cavpt = (512 * 768 + 768) + 2 * 768 * 32 + 768 * 768 + 10 * 768 + 4 * 768
        assert cavpt == 1_043_712
        assert method.num_trainable_parameters() == 8_192 + 84_480 + cavpt + 768 * len(names)
        assert tuple(method.vpt.shape) == (11, 10, 768)
    # without CAVPT (the official VLP trainer): VPT in all 12 blocks + the text context
    vlp = build_method("dpt", vit_b16, ["cat", "dog"], cavpt_depth=0)
    assert vlp.num_trainable_parameters() == 8_192 + 12 * 10 * 768


def _manual_image_features(method, images, class_text):
    """The vision tower written out block by block: append the block's prompts, run it, drop
    them (CAVPT from the detached block input), as in ``Transformer_VPTD.forward``."""
    visual = method.clip.visual
    x = visual.ln_pre(visual.embed(images))
    n_vpt = method.vpt.shape[0] if method.vpt is not None else 0
    aux = []
    for i, block in enumerate(visual.transformer.resblocks):
        if i < n_vpt:
            p = method.vpt[i].unsqueeze(0).expand(x.shape[0], -1, -1)
        else:
            layer = method.cavpt[i - n_vpt]
            kv = torch.cat([x.detach(), layer.kv_tokens.expand(x.shape[0], -1, -1)], dim=1)
            q0 = layer.meta_net(class_text)
            scores = layer.q_proj(q0) @ layer.k_proj(kv).transpose(1, 2) / math.sqrt(
                layer.q_proj.out_features)
            out = layer.v_out(scores.softmax(-1) @ kv)
            aux.append(method.aux_classifiers[i - n_vpt](layer.ln(out)))
            p = layer.ln2(out + q0)
        x = block(torch.cat([x, p], dim=1))[:, : x.shape[1]]
    return visual.ln_post(x[:, 0]) @ visual.proj, aux


@pytest.mark.parametrize("cavpt_depth", [0, 1, 2])
def test_image_tower_matches_block_by_block_reference(tiny_clip, cavpt_depth):
    method = _dpt(tiny_clip, cavpt_depth=cavpt_depth)
    images, _ = _batch()
    with torch.no_grad():
        z0, idx = method.select_classes(images)
        class_text = method.text_features()[idx]  # [B, K, E]
        got, aux = method.encode_image(images, class_text)
        want, want_aux = _manual_image_features(method, images, class_text)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(aux) == len(want_aux) == cavpt_depth
    for a, b in zip(aux, want_aux):
        assert a.shape == (4, min(10, len(CLASSNAMES)), len(CLASSNAMES))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the prompts change the features (not an identity)
    assert not torch.allclose(got, method.clip.encode_image(images), atol=1e-4)


def test_zero_shot_selection_uses_the_template_features(tiny_clip):
    template = "a photo of a {}, a type of colour."
    method = _dpt(tiny_clip, top_k=2)
    method.template = template
    images, _ = _batch(5)
    z0, idx = method.select_classes(images)
    from vlprompt.clip.zeroshot import hand_crafted_text_features
    ref = F.normalize(tiny_clip.encode_image(images), dim=-1) @ hand_crafted_text_features(
        tiny_clip, CLASSNAMES, [template]).t()
    assert idx.shape == (5, 2)
    assert torch.equal(idx, ref.argsort(dim=1, descending=True)[:, :2])
    # K is clipped to the number of classes
    assert _dpt(tiny_clip).select_classes(images)[1].shape == (5, len(CLASSNAMES))


def test_cavpt_keys_are_detached_and_queries_carry_text_gradient(tiny_clip):
    """No gradient reaches the VPT tokens through the CAVPT keys; the text context gets gradient
    through the CAVPT queries (unnormalised learned text features of the selected classes)."""
    method = _dpt(tiny_clip, cavpt_depth=1)
    images, labels = _batch()
    z0, idx = method.select_classes(images)
    class_text = method.text_features()[idx]
    _, aux = method.encode_image(images, class_text)
    aux[0].sum().backward()  # the aux logits depend on the block input only through the keys
    assert method.vpt.grad is None or method.vpt.grad.abs().sum() == 0
    assert method.ctx.grad is not None and method.ctx.grad.abs().sum() > 0


def test_loss_terms_match_hand_computation(tiny_clip):
    method = _dpt(tiny_clip, top_k=2)
    method.train()
    images, labels = _batch(6, seed=3)
    torch.manual_seed(0)
    total, parts = method.loss(images, labels)

    scale = tiny_clip.logit_scale.exp()
    with torch.no_grad():
        z0 = F.normalize(tiny_clip.encode_image(images), dim=-1)
        t_hc = method.hand_crafted_features()
        idx = (z0 @ t_hc.t()).topk(2, dim=1).indices
        text = method.text_features()
        image, aux = _manual_image_features(method, images, text[idx])
        t_n, v_n = F.normalize(text, dim=-1), F.normalize(image, dim=-1)
        ce = F.cross_entropy(scale * v_n @ t_n.t(), labels)
        ce1 = F.cross_entropy(scale * z0 @ t_n.t(), labels)
        ce2 = F.cross_entropy(scale * v_n @ t_hc.t(), labels)
        # aux: soft-target CE (one-hot over all classes) on the slots whose class is the label
        rows, targets = [], []
        for b in range(6):
            for k in range(2):
                if idx[b, k] == labels[b]:
                    rows.append(aux[0][b, k])
                    targets.append(F.one_hot(labels[b], len(CLASSNAMES)).float())
        assert rows, "the test batch must contain selected labels"
        aux_ce = F.cross_entropy(torch.stack(rows), torch.stack(targets))
    assert parts["ce"] == pytest.approx(float(ce), rel=1e-5)
    assert parts["ce_text"] == pytest.approx(float(ce1), rel=1e-5)
    assert parts["ce_image"] == pytest.approx(float(ce2), rel=1e-5)
    assert parts["aux"] == pytest.approx(float(aux_ce), rel=1e-5)
    expected = ce1 + ce2 + 0.1 * ce + 0.3 * aux_ce
    assert float(total.detach()) == pytest.approx(float(expected), rel=1e-5)

    # after the guidance epochs: CE on the prompted logits + the aux term only
    method.on_epoch_end(29, 60)
    assert method.epoch == 30
    total2, parts2 = method.loss(images, labels)
    assert "ce_text" not in parts2 and "ce_image" not in parts2
    assert float(total2.detach()) == pytest.approx(float(ce + 0.3 * aux_ce), rel=1e-5)


def test_aux_loss_is_skipped_when_no_selected_class_is_the_label(tiny_clip):
    method = _dpt(tiny_clip, top_k=1)
    images, _ = _batch(4)
    _, idx = method.select_classes(images)
    wrong = (idx[:, 0] + 1) % len(CLASSNAMES)  # labels that are never the top-1 choice
    total, parts = method.loss(images, wrong)
    assert "aux" not in parts and torch.isfinite(total)


def test_epoch_survives_checkpoint_round_trip(tiny_clip):
    method = _dpt(tiny_clip)
    method.on_epoch_end(34, 60)
    state = method.trainable_state_dict()
    assert int(state["epoch"]) == 35
    fresh = _dpt(tiny_clip, seed=1)
    assert fresh.epoch == 0
    fresh.load_trainable_state_dict(state)
    assert fresh.epoch == 35


def test_new_classes_get_fresh_aux_classifiers_and_logits_follow(tiny_clip):
    method = _dpt(tiny_clip)
    images, _ = _batch(3)
    method.set_classnames(NEW_CLASSNAMES)
    assert method.aux_classifiers[0].out_features == len(NEW_CLASSNAMES)
    with torch.no_grad():
        assert method(images).shape == (3, len(NEW_CLASSNAMES))
    loss, parts = method.loss(images, torch.tensor([0, 1, 2]))
    assert torch.isfinite(loss)


def test_three_parameter_groups_with_their_own_lr_and_warmup(tiny_clip):
    method = _dpt(tiny_clip)
    groups = method.param_groups(0.01)
    assert len(groups) == 3
    assert groups[0]["params"] == [method.vpt]
    cavpt = set(map(id, method.cavpt.parameters())) | set(map(id, method.aux_classifiers.parameters()))
    assert set(map(id, groups[1]["params"])) == cavpt
    assert groups[2]["params"] == [method.ctx]
    everything = [p for g in groups for p in g["params"]]
    assert len(everything) == len(method.named_trainable_parameters())
    cfg = TrainConfig(max_epoch=60, lr=0.01, warmup_epoch=10)
    opt = build_optimizer(method, cfg)
    assert set_epoch_lr(opt, 0, cfg) == [1e-5, 1e-5, 1e-5]
    assert set_epoch_lr(opt, 1, cfg) == pytest.approx([1e-5, 1e-5, 0.001 * (1 + math.cos(0))])
    assert set_epoch_lr(opt, 10, cfg) == pytest.approx(
        [0.01, 0.01, 0.001 * (1 + math.cos(math.pi * 9 / 60))])


def test_bad_config_values_are_rejected(tiny_clip):
    with pytest.raises(ValueError, match="top_k"):
        build_method("dpt", tiny_clip, CLASSNAMES, top_k=0)
    with pytest.raises(ValueError, match="cavpt_depth"):
        build_method("dpt", tiny_clip, CLASSNAMES, cavpt_depth=-1)
