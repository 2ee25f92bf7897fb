"""IVLP: independent vision-language deep prompting, the baseline of MaPLe (Khattak et al., CVPR
2023, ``muzairkhattak/multimodal-prompt-learning trainers/independentVL.py``) and the prompt
structure of PromptSRC without its losses.

Text: ``n_ctx_text`` context tokens from "a photo of a" at positions 1..n (with n = 2 the prompt
string keeps all four words and "of a" stays fixed) plus independent deep prompts before text
blocks 1..depth_text-1. Vision: ``n_ctx_vision`` tokens appended before ``ln_pre`` plus independent
deep prompts before vision blocks 1..depth_vision-1 (``depth_vision = 0``: no vision prompts, i.e.
deep language prompting). No coupling between the towers; loss: cross-entropy.

Defaults: the official IVLP base-to-new config ``IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml`` — 2+2
tokens, depth 12 in both towers, LR 0.0035, 5 epochs, batch 4 — the row the MaPLe README reports as
"independent V-L prompting" (82.15 / 74.07 / 77.90, METHODS.md §6.4, §7.1). Depth 9 (MaPLe's depth)
is not what that row used; the 4+4, depth-9, 20-epoch variant is PromptSRC's structure, which
PromptSRC's README reports separately (use ``promptsrc`` for it, or override the fields).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from torch import Tensor

from ..clip.model import CLIP
from ..interop.layout import CUSTOM_CLIP_BACKBONE, OfficialLayout, Rule
from .base import VISUAL_PROMPTS, Method, MethodConfig
from .deep_prompts import TextDeepPrompts, VisionPrompts
from .registry import register_method


@dataclasses.dataclass
class IVLPConfig(MethodConfig):
    """Independent V-L prompting settings; defaults = ``IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml``."""

    n_ctx_text: int = 2
    n_ctx_vision: int = 2
    ctx_init: str = "a photo of a"
    #: prompted text blocks (>= 1; capped at the tower's depth)
    depth_text: int = 12
    #: prompted vision blocks (0 = no vision prompts; capped at the tower's depth)
    depth_vision: int = 12

    def __post_init__(self) -> None:
        who = type(self).__name__
        if self.n_ctx_text < 1:
            raise ValueError(f"{who}: n_ctx_text must be >= 1, got {self.n_ctx_text}")
        if self.depth_text < 1:
            raise ValueError(f"{who}: depth_text must be >= 1 (use vpt for vision-only prompting), "
                             f"got {self.depth_text}")
        if self.n_ctx_vision < 0 or self.depth_vision < 0:
            raise ValueError(f"{who}: n_ctx_vision and depth_vision must be >= 0, got "
                             f"{self.n_ctx_vision} and {self.depth_vision}")
        if (self.n_ctx_vision == 0) != (self.depth_vision == 0):
            raise ValueError(f"{who}: n_ctx_vision={self.n_ctx_vision} and depth_vision="
                             f"{self.depth_vision}: set both to 0 to disable vision prompts")


#: where the official IVLP-style trainers keep the prompts (also PromptSRC's): the text context,
#: and per-block ``VPT_shallow`` parameters of both towers' blocks 1.. (vlprompt counts from 0)
VPT_SHALLOW_RULES = (
    Rule("prompt_learner.ctx", "text.ctx"),
    Rule("text_encoder.transformer.resblocks.{i}.VPT_shallow", "text.deep.prompts[{i}]",
         offset=-1),
    Rule("image_encoder.VPT", "vision.shallow"),
    Rule("image_encoder.transformer.resblocks.{i}.VPT_shallow", "vision.deep.prompts[{i}]",
         offset=-1))


@register_method
class IVLP(Method):
    """Learnable: ``text.ctx`` [n_t, Dt], ``text.deep.prompts`` [depth_t-1, n_t, Dt],
    ``vision.shallow`` [n_v, Dv], ``vision.deep.prompts`` [depth_v-1, n_v, Dv]."""

    name = "ivlp"
    requires = frozenset({VISUAL_PROMPTS})
    description = "IVLP: independent vision and language deep prompts (MaPLe's baseline)"
    Config = IVLPConfig
    #: checkpoint layout of the official trainer, which registers the whole ``CustomCLIP`` as
    #: "VLPromptLearner"; the deep prompts are ``VPT_shallow`` parameters of the CLIP blocks
    official_layout = OfficialLayout(
        repo="muzairkhattak/multimodal-prompt-learning", source="trainers/independentVL.py",
        trainer="IVLP", models=("VLPromptLearner",),
        rules=VPT_SHALLOW_RULES,
        config={"TRAINER.IVLP.N_CTX_TEXT": "n_ctx_text",
                "TRAINER.IVLP.N_CTX_VISION": "n_ctx_vision", "TRAINER.IVLP.CTX_INIT": "ctx_init",
                "TRAINER.IVLP.PROMPT_DEPTH_TEXT": "depth_text",
                "TRAINER.IVLP.PROMPT_DEPTH_VISION": "depth_vision"},
        shapes={"n_ctx_text": ("text.ctx", "dim0"), "n_ctx_vision": ("vision.shallow", "dim0"),
                "depth_text": (("text.ctx", "text.deep.prompts"), "layers"),
                "depth_vision": (("vision.shallow", "vision.deep.prompts"), "layers")},
        backbone=CUSTOM_CLIP_BACKBONE, tokens="prompt_learner.", text_prompts="text.text")

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: Optional[IVLPConfig] = None,
                 template: Optional[str] = None):
        super().__init__(clip, classnames, config, template)
        cfg = self.config
        self.text = TextDeepPrompts(clip, self.classnames, cfg.n_ctx_text, cfg.ctx_init,
                                    cfg.depth_text)
        self.vision = (VisionPrompts(clip, cfg.n_ctx_vision, cfg.depth_vision)
                       if cfg.depth_vision > 0 else None)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = [c.replace("_", " ") for c in classnames]
        self.text.set_classnames(self.classnames)

    def image_features(self, images: Tensor) -> Tensor:
        """Prompted image features [B, E], unnormalised."""
        if self.vision is None:
            return self.clip.encode_image(images)
        return self.vision.encode(self.clip, images)

    def text_features(self) -> Tensor:
        """Prompted class text features [C, E], unnormalised."""
        return self.text.encode(self.clip)

    def forward(self, images: Tensor) -> Tensor:
        return self.logits(self.image_features(images),
                           self.cached_class_features(self.text_features))
