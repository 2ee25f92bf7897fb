"""Every registered method on a tiny ResNet CLIP: those whose ``requires`` the ResNet tower meets
train (gradients reach their tensors, CLIP untouched); the others refuse it in one line naming
the method and the backbones it needs. A new method lands in one of the two rows by its
``requires`` alone."""

from __future__ import annotations

import pytest
import torch

from vlprompt.clip.model import CLIPConfig, build_clip
from vlprompt.methods import build_method, get_method, list_methods

from .conftest import CLASSNAMES, TINY_OVERRIDES, colour_batch

#: the text-prompt methods the issue names (they must stay usable on ResNets)
TEXT_ONLY = {"zeroshot", "coop", "cocoop", "kgcoop", "prograd", "tcp"}


@pytest.fixture(scope="module")
def tiny_rn():
    torch.manual_seed(0)
    clip = build_clip(CLIPConfig(embed_dim=32, image_size=32, vision_kind="resnet",
                                 vision_stage_layers=(1, 1, 1, 1), vision_width=16,
                                 vision_heads=8, text_width=64, text_layers=2, text_heads=2))
    clip.backbone_name = "RN-tiny"
    return clip.eval().requires_grad_(False)


def test_text_only_methods_require_nothing_visual():
    for name in TEXT_ONLY:
        assert "visual_prompts" not in get_method(name).requires, name


@pytest.mark.parametrize("name", list_methods())
def test_method_runs_on_a_resnet_or_refuses_it(name, tiny_rn):
    cls = get_method(name)
    torch.manual_seed(0)
    if not set(cls.requires) <= set(tiny_rn.capabilities):
        with pytest.raises(ValueError) as err:
            build_method(name, tiny_rn, CLASSNAMES, **TINY_OVERRIDES.get(name, {}))
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{name} ")
        assert "needs a ViT backbone" in message and "RN-tiny is a ResNet" in message
        return
    before = {k: v.clone() for k, v in tiny_rn.state_dict().items()}
    method = build_method(name, tiny_rn, CLASSNAMES, **TINY_OVERRIDES.get(name, {}))
    images, labels = colour_batch(4, torch.Generator().manual_seed(0))
    method.eval()
    with torch.no_grad():
        assert method(images).shape == (4, len(CLASSNAMES))
    if not cls.trainable:
        return
    method.train()
    loss, _ = method.loss(images, labels)
    loss.backward()
    grads = [p.grad for p in method.named_trainable_parameters().values()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    for k, v in tiny_rn.state_dict().items():
        assert torch.equal(v, before[k]), k
