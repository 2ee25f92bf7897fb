"""Trainable-parameter counts on a ViT-B/16-shaped CLIP equal METHODS.md (§6, §7.4)."""

from __future__ import annotations

import pytest

from vlprompt.clip.model import CLIPConfig, build_clip
from vlprompt.methods import build_method, list_methods

# name -> (config overrides, expected count). IVLP and MaPLe-xd are derived from the shapes:
# IVLP 2*12*512 + 2*12*768; MaPLe depth 3: 2*512 + 2*2*512 + 3*(512*768 + 768).
EXPECTED = {
    "coop": ({"n_ctx": 16}, 8_192),
    "cocoop": ({}, 35_360),
    "kgcoop": ({}, 2_048),
    "vpt": ({}, 73_728),
    "maple": ({}, 3_555_072),
    "promptsrc": ({}, 46_080),
    "ivlp": ({}, 30_720),
    # ProGrad = CoOp's 16 x 512; TCP = 4 x 512 + (512*128 + 128) + (128*2048 + 2048)
    "prograd": ({}, 8_192),
    "tcp": ({}, 331_904),
    # METHODS-SOTA.md §1, §8: MMA = 8 blocks x (33,312 text + 49,952 vision + 1,056 shared);
    # CLIP-LoRA = 12 blocks x 3 (q, k, v) x r=2 x (768 + 768 vision, 512 + 512 text)
    "mma": ({}, 674_560),
    "clip_lora": ({}, 184_320),
}
BASELINES = ["cocoop", "kgcoop", "vpt", "maple", "promptsrc", "ivlp"]


@pytest.fixture(scope="module")
def vit_b16():
    """A randomly initialised CLIP with ViT-B/16's shapes (built once: a few seconds)."""
    clip = build_clip(CLIPConfig())
    clip.requires_grad_(False)
    return clip.eval()


def test_baselines_are_registered():
    assert set(BASELINES) <= set(list_methods())


@pytest.mark.parametrize("name", [n for n in EXPECTED if n in list_methods()])
def test_trainable_parameter_count(name, vit_b16):
    overrides, expected = EXPECTED[name]
    method = build_method(name, vit_b16, ["cat", "dog"], **overrides)
    assert method.num_trainable_parameters() == expected


def test_maple_cross_dataset_depth3_count(vit_b16):
    method = build_method("maple", vit_b16, ["cat", "dog"], depth=3)
    assert method.num_trainable_parameters() == 2 * 512 + 2 * 2 * 512 + 3 * (512 * 768 + 768)
    assert len(method.prompts.couplings) == 2


def test_promptsrc_gpa_state_mirrors_trainable_tensors(vit_b16):
    method = build_method("promptsrc", vit_b16, ["cat", "dog"])
    extra = method.extra_state_tensors()
    params = method.named_trainable_parameters()
    assert set(extra) == {f"gpa.{n}" for n in params} | {"gpa.epochs"}
    assert sum(extra[f"gpa.{n}"].numel() for n in params) == 46_080
