"""MaPLe: Multi-modal Prompt Learning (Khattak et al., CVPR 2023), METHODS.md §6.5, §10.

Two text context tokens initialised from "a photo" (the prompt string keeps "a photo of a {}.",
positions 1..2 are learned), text prompts in the first ``depth`` = 9 blocks, and vision prompts
coupled to them: the shallow vision prompt is Linear(Dt -> Dv)(ctx), the deep vision prompt before
block i is a separate Linear(Dt -> Dv) of the text prompt of block i. Loss: cross-entropy.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from torch import Tensor

from ..clip.model import CLIP
from ..interop.layout import CUSTOM_CLIP_BACKBONE, OfficialLayout, Rule
from .base import VISUAL_PROMPTS, Features, Method, MethodConfig
from .deep_prompts import CoupledPrompts
from .registry import register_method


@dataclasses.dataclass
class MaPLeConfig(MethodConfig):
    """MaPLe settings; defaults = ``MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml`` (cross-dataset and
    domain generalisation use depth 3)."""

    n_ctx: int = 2
    ctx_init: str = "a photo of a"
    #: prompted blocks in both towers (J); capped at the shallower tower
    depth: int = 9

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ValueError(f"maple: n_ctx must be >= 1, got {self.n_ctx}")
        if self.depth < 1:
            raise ValueError(f"maple: depth must be >= 1, got {self.depth}")


@register_method
class MaPLe(Method):
    """Learnable (in ``prompts``): ``ctx`` [n, Dt], ``proj`` Dt->Dv, ``text_deep.prompts``
    [J-1, n, Dt], ``couplings`` J-1 x (Dt->Dv)."""

    name = "maple"
    requires = frozenset({VISUAL_PROMPTS})
    description = "MaPLe: coupled vision-language deep prompts (CVPR 2023)"
    Config = MaPLeConfig
    #: checkpoint layout of the official trainer, which registers the whole ``CustomCLIP``
    #: (frozen CLIP included) as "MultiModalPromptLearner" (``vlprompt.interop``)
    official_layout = OfficialLayout(
        repo="muzairkhattak/multimodal-prompt-learning", source="trainers/maple.py",
        trainer="MaPLe", models=("MultiModalPromptLearner",),
        rules=(Rule("prompt_learner.ctx", "prompts.ctx"),
               Rule("prompt_learner.proj.", "prompts.proj."),
               Rule("prompt_learner.compound_prompts_text.{i}", "prompts.text_deep.prompts[{i}]"),
               Rule("prompt_learner.compound_prompt_projections.{i}.", "prompts.couplings.{i}.")),
        config={"TRAINER.MAPLE.N_CTX": "n_ctx", "TRAINER.MAPLE.CTX_INIT": "ctx_init",
                "TRAINER.MAPLE.PROMPT_DEPTH": "depth"},
        shapes={"n_ctx": ("prompts.ctx", "dim0"),
                "depth": (("prompts.ctx", "prompts.text_deep.prompts"), "layers")},
        backbone=CUSTOM_CLIP_BACKBONE, tokens="prompt_learner.", text_prompts="prompts.text")

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: Optional[MaPLeConfig] = None,
                 template: Optional[str] = None):
        super().__init__(clip, classnames, config, template)
        cfg = self.config
        self.prompts = CoupledPrompts(clip, self.classnames, cfg.n_ctx, cfg.ctx_init, cfg.depth)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = [c.replace("_", " ") for c in classnames]
        self.prompts.set_classnames(self.classnames)

    def forward_features(self, images: Tensor) -> Features:
        """Raw prompted image [B, E] and text [C, E] features and their logits."""
        text = self.cached_class_features(lambda: self.prompts.encode_text(self.clip))  # [C, E]
        image = self.prompts.encode_image(self.clip, images)  # [B, E]
        return Features(image, text, self.logits(image, text))

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_features(images).logits

    def extra_loss_terms(self, images: Tensor, labels: Tensor, features: Features
                         ) -> tuple[list[Tensor], dict[str, float]]:
        """None: MaPLe's loss is cross-entropy only."""
        return [], {}
