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
    # METHODS-SOTA.md §4: DePT on CoOp (16 x 512) + FiLM 2,048 + head 513 x C (C = 2 here)
    "dept": ({}, 8_192 + 2_048 + 513 * 2),
    # METHODS-SOTA.md §3: CoPrompt = MaPLe (n 2, J 9) + 2 adapters x (512*128 + 128*512)
    "coprompt": ({}, 3_817_216),
    # METHODS-SOTA.md §5: MMRL = R 5 x 512 + 7 x (512*768 + 768) + 7 x (512*512 + 512) + 768*512
    "mmrl": ({}, 4_992_256),
    # METHODS-SOTA.md §6: HiCroPL trains 12 x 16 x (512 + 768) prompts in released mode
    "hicropl": ({"mapper": "released_inplace"}, 245_760),
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


def test_coprompt_count_at_its_largest_dataset_setting(vit_b16):
    """n 4, J 12 (ImageNet, Caltech, Cars, SUN, UCF): MaPLe's 2,048 + 393,984 + 11*4*512 +
    11*393,984, plus the adapters' 262,144."""
    method = build_method("coprompt", vit_b16, ["cat", "dog"], n_ctx=4, depth=12)
    assert method.num_trainable_parameters() == 5_014_528
    adapters = sum(p.numel() for n, p in method.named_trainable_parameters().items()
                   if "adapter" in n)
    assert adapters == 262_144


def test_hicropl_registered_and_functional_counts(vit_b16):
    """Prompts 245,760 + text->vision 8,466,432 + vision->text 4,202,496 + LKP 6 x 1,052,672 +
    6 x 2,365,440 + proxies 7,680 = 33,431,040 registered (all trained in functional mode);
    cross-dataset (n 2, depth 6, k 5): 20,316,416 registered, 15,360 trained in released mode."""
    released = build_method("hicropl", vit_b16, ["cat", "dog"], mapper="released_inplace")
    functional = build_method("hicropl", vit_b16, ["cat", "dog"])
    assert released.num_registered_parameters() == 33_431_040
    assert functional.num_trainable_parameters() == 33_431_040
    assert sum(p.numel() for p in functional.text_to_vision.parameters()) == 8_466_432
    assert sum(p.numel() for p in functional.vision_to_text.parameters()) == 4_202_496
    xd = build_method("hicropl", vit_b16, ["cat", "dog"], mapper="released_inplace", n_ctx=2,
                      depth=6, cross_layer=5)
    assert (xd.num_registered_parameters(), xd.num_trainable_parameters()) == (20_316_416, 15_360)
