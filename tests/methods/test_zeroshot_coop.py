"""Zero-shot CLIP and CoOp: identities, parameter counts, gradients, class positions."""

import pytest
import torch
import torch.nn.functional as F

from vlprompt.clip.fingerprint import backbone_fingerprint
from vlprompt.clip.model import CLIPConfig, build_clip
from vlprompt.clip.templates import IMAGENET_TEMPLATES_SELECT
from vlprompt.clip.tokenizer import tokenize
from vlprompt.methods import build_method
from vlprompt.methods.prompts import hand_crafted_text_features

NAMES = ["cat", "sea_lion", "annual crop land"]


def test_coop_photo_init_equals_zeroshot_prompt(tiny_clip):
    coop = build_method("coop", tiny_clip, NAMES, ctx_init="a photo of a", n_ctx=4).eval()
    zs = build_method("zeroshot", tiny_clip, NAMES, template="a photo of a {}.")
    with torch.no_grad():
        learned = coop.text_features()
        reference = tiny_clip.encode_text(tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES]))
    assert torch.equal(learned, reference)
    assert torch.allclose(F.normalize(learned, dim=-1), zs.text_features, atol=1e-6)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(coop(images), zs(images), atol=1e-4)


def test_coop_parameter_count_on_vit_b16_shape():
    torch.manual_seed(0)
    clip = build_clip(CLIPConfig())  # ViT-B/16 shapes: text width 512
    coop = build_method("coop", clip, ["a", "b"])
    assert coop.num_trainable_parameters() == 16 * 512 == 8192
    assert set(coop.trainable_state_dict()) == {"ctx"}
    assert tuple(coop.ctx.shape) == (16, 512)


def test_coop_random_init_statistics(tiny_clip):
    torch.manual_seed(1)
    coop = build_method("coop", tiny_clip, NAMES, n_ctx=16, csc=True)
    assert tuple(coop.ctx.shape) == (3, 16, 64)
    assert abs(float(coop.ctx.detach().std()) - 0.02) < 0.003


def test_gradients_reach_exactly_the_trainable_tensors(tiny_clip):
    coop = build_method("coop", tiny_clip, NAMES, n_ctx=4).train()
    before = backbone_fingerprint(tiny_clip, recompute=True)
    loss, parts = coop.loss(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert set(parts) == {"ce", "acc"}
    trainable = coop.named_trainable_parameters()
    assert list(trainable) == ["ctx"]
    assert coop.ctx.grad is not None and coop.ctx.grad.abs().sum() > 0
    for name, p in tiny_clip.named_parameters():
        assert p.grad is None, name
        assert not p.requires_grad
    assert backbone_fingerprint(tiny_clip, recompute=True) == before


@pytest.mark.parametrize("position", ["front", "middle"])
def test_class_token_positions_match_the_written_prompt(tiny_clip, position):
    coop = build_method("coop", tiny_clip, ["sea lion", "cat"], n_ctx=4, class_token_position=position)
    x = tiny_clip.embed_tokens(tokenize(["X"]))[0, 1]  # the embedding of the word "X"
    with torch.no_grad():
        coop.ctx.copy_(x.expand(4, -1))
        got = coop.text_features()
        texts = {"front": "{} X X X X.", "middle": "X X {} X X."}[position]
        ref = tiny_clip.encode_text(tokenize([texts.format(n) for n in ["sea lion", "cat"]]))
    assert torch.allclose(got, ref, atol=1e-5)


def test_class_specific_context_cannot_move_to_other_classes(tiny_clip):
    coop = build_method("coop", tiny_clip, NAMES, n_ctx=2, csc=True)
    with pytest.raises(ValueError, match="class-specific"):
        coop.set_classnames(["a", "b"])
    shared = build_method("coop", tiny_clip, NAMES, n_ctx=2)
    shared.set_classnames(["a", "b"])
    assert shared(torch.randn(1, 3, 32, 32)).shape == (1, 2)


def test_coop_eval_cache_follows_context_updates(tiny_clip):
    coop = build_method("coop", tiny_clip, NAMES, n_ctx=4).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first = coop(images)
        assert torch.equal(coop(images), first)
        noise = torch.randn_like(coop.ctx)
        coop.ctx.add_(noise)
        second = coop(images)
        coop.ctx.data.sub_(noise)  # an edit the version counter does not see
        third = coop(images)
    assert not torch.allclose(first, second)
    assert torch.allclose(first, third, atol=1e-5)


def test_zeroshot_ensembles_and_bad_value(tiny_clip):
    zs = build_method("zeroshot", tiny_clip, NAMES, templates="select7")
    ref = hand_crafted_text_features(tiny_clip, NAMES, IMAGENET_TEMPLATES_SELECT)
    assert len(IMAGENET_TEMPLATES_SELECT) == 7
    assert torch.allclose(zs.text_features, ref)
    assert zs.num_trainable_parameters() == 0 and not zs.trainable
    zs.set_classnames(["a", "b"])
    assert zs(torch.randn(2, 3, 32, 32)).shape == (2, 2)
    with pytest.raises(ValueError, match="templates"):
        build_method("zeroshot", tiny_clip, NAMES, templates="nine")
    with pytest.raises(ValueError, match="valid fields"):
        build_method("coop", tiny_clip, NAMES, n_context=4)
