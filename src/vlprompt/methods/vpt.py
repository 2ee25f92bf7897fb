"""VPT-deep: Visual Prompt Tuning (Jia et al., ECCV 2022), in the form the MaPLe/COMMA tables use
(``muzairkhattak/multimodal-prompt-learning trainers/vpt.py``, METHODS.md §6.4, §10).

8 learnable vision tokens in every block: appended after the patch tokens before ``ln_pre`` at
block 0, replacing the last 8 tokens before blocks 1..L-1. The classifier is the frozen text
feature of the fixed prompt "a photo of a {}." for every dataset (not the dataset template).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from torch import Tensor

from ..clip.model import CLIP
from ..interop.layout import CUSTOM_CLIP_BACKBONE, OfficialLayout, Rule
from .base import VISUAL_PROMPTS, Method, MethodConfig
from .deep_prompts import VisionPrompts
from .prompts import hand_crafted_text_features
from .registry import register_method


@dataclasses.dataclass
class VPTConfig(MethodConfig):
    """VPT-deep settings; defaults = ``VPT/vit_b16_c2_ep5_batch4_4.yaml``."""

    n_ctx_vision: int = 8
    #: number of prompted vision blocks; None = all (12 for ViT-B/16)
    depth: Optional[int] = None
    #: the fixed text prompt of the frozen classifier (the same for every dataset, as in the code)
    text_template: str = "a photo of a {}."

    def __post_init__(self) -> None:
        if self.n_ctx_vision < 1:
            raise ValueError(f"vpt: n_ctx_vision must be >= 1, got {self.n_ctx_vision}")
        if self.depth is not None and self.depth < 1:
            raise ValueError(f"vpt: depth must be >= 1 or None (all blocks), got {self.depth}")
        if "{}" not in self.text_template:
            raise ValueError(f"vpt: text_template must contain '{{}}', got {self.text_template!r}")


@register_method
class VPT(Method):
    """Learnable: ``vision.shallow`` [n, Dv], ``vision.deep.prompts`` [depth-1, n, Dv].
    ``text_features`` [C, E] (frozen classifier) is a non-persistent buffer."""

    name = "vpt"
    requires = frozenset({VISUAL_PROMPTS})
    description = ("VPT-deep: learnable vision tokens in every block, frozen text classifier "
                   "(ECCV 2022)")
    Config = VPTConfig
    #: checkpoint layout of the official trainer (the whole ``CustomCLIP`` registered as
    #: "prompt_learner"; the text side is fixed, so there are no token buffers)
    official_layout = OfficialLayout(
        repo="muzairkhattak/multimodal-prompt-learning", source="trainers/vpt.py", trainer="VPT",
        models=("prompt_learner",),
        rules=(Rule("image_encoder.VPT", "vision.shallow"),
               Rule("image_encoder.transformer.resblocks.{i}.VPT_shallow",
                    "vision.deep.prompts[{i}]", offset=-1)),
        config={"TRAINER.VPT.N_CTX_VISION": "n_ctx_vision",
                "TRAINER.VPT.PROMPT_DEPTH_VISION": "depth"},
        shapes={"n_ctx_vision": ("vision.shallow", "dim0"),
                "depth": (("vision.shallow", "vision.deep.prompts"), "layers")},
        backbone=CUSTOM_CLIP_BACKBONE)

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: Optional[VPTConfig] = None,
                 template: Optional[str] = None):
        super().__init__(clip, classnames, config, template)
        self.vision = VisionPrompts(clip, self.config.n_ctx_vision, self.config.depth)
        self.register_buffer("text_features", None, persistent=False)
        self.set_classnames(self.classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = [c.replace("_", " ") for c in classnames]
        self.text_features = hand_crafted_text_features(self.clip, self.classnames,
                                                        [self.config.text_template])

    def forward(self, images: Tensor) -> Tensor:
        return self.logits(self.vision.encode(self.clip, images), self.text_features)
