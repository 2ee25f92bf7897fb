"""CoCoOp: Conditional Prompt Learning for Vision-Language Models (Zhou et al., CVPR 2022).

A small meta-network maps each image's (normalised) feature to a shift pi_b that is added to all
context vectors, so every image gets its own C class prompts: B x C text-tower passes per batch
(METHODS.md §6.3, §10). The official code runs batch 1; here the B x C prompts go through the text
tower in chunks of ``text_chunk_size`` prompts, so larger batches fit in memory and give the same
numbers whatever the chunk size. With ``checkpoint_chunks`` the chunks' activations are recomputed
in the backward pass, which bounds training memory as well (exact, ~30% slower).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Optional, Sequence, Union

from torch import Tensor, nn

from ..clip.model import CLIP
from ..interop.layout import OfficialLayout, Rule
from .base import Features, Method, MethodConfig
from .prompts import TextPrompts, encode_per_sample_prompts
from .registry import register_method


@dataclasses.dataclass
class CoCoOpConfig(MethodConfig):
    """CoCoOp settings; defaults = ``vit_b16_c4_ep10_batch1_ctxv1``."""

    n_ctx: int = 4
    ctx_init: str = "a photo of a"
    #: meta-net hidden width = embed_dim // meta_reduction (512 -> 32 for ViT-B/16)
    meta_reduction: int = 16
    #: prompts per text-tower call (B x C prompts are split into chunks); 0 = one call; "auto":
    #: what fits a quarter of the free memory (``prompts.auto_chunk_size``). Chunks give the same
    #: numbers up to float rounding (GEMM kernels may differ by size), so the default is a fixed
    #: size: a resumed run then ends bit-identical to an uninterrupted one
    text_chunk_size: Union[int, str] = 1024
    #: recompute each chunk's activations in backward (bounds training memory)
    checkpoint_chunks: bool = False

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ValueError(f"cocoop: n_ctx must be >= 1, got {self.n_ctx}")
        if self.meta_reduction < 1:
            raise ValueError(f"cocoop: meta_reduction must be >= 1, got {self.meta_reduction}")
        if self.text_chunk_size != "auto" and (isinstance(self.text_chunk_size, bool) or not
                                               isinstance(self.text_chunk_size, int)
                                               or self.text_chunk_size < 0):
            raise ValueError(f"cocoop: text_chunk_size must be an integer >= 0 (0 = no "
                             f"chunking) or auto, got {self.text_chunk_size!r}")


@register_method
class CoCoOp(Method):
    """Learnable: ``ctx`` [M, Dt]; ``meta_net`` Linear(E -> E/16) -> ReLU -> Linear(E/16 -> Dt)."""

    name = "cocoop"
    frozen_image_tower = True
    description = "CoCoOp: image-conditional context via a meta-net (CVPR 2022)"
    Config = CoCoOpConfig
    #: checkpoint layout of the official trainer (``vlprompt.interop``)
    official_layout = OfficialLayout(
        repo="KaiyangZhou/CoOp", source="trainers/cocoop.py", trainer="CoCoOp",
        models=("prompt_learner",), rules=(Rule("ctx", "ctx"), Rule("meta_net.", "meta_net.")),
        config={"TRAINER.COCOOP.N_CTX": "n_ctx", "TRAINER.COCOOP.CTX_INIT": "ctx_init"},
        shapes={"n_ctx": ("ctx", "dim0")}, text_prompts="prompts")

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: Optional[CoCoOpConfig] = None,
                 template: Optional[str] = None):
        super().__init__(clip, classnames, config, template)
        cfg = self.config
        device = clip.logit_scale.device
        self.prompts = TextPrompts(clip, self.classnames, cfg.n_ctx, cfg.ctx_init or None)
        self.ctx = nn.Parameter(self.prompts.init_context().to(device))  # [M, Dt]
        hidden = max(1, clip.embed_dim // cfg.meta_reduction)
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(clip.embed_dim, hidden, device=device)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(hidden, clip.text_width, device=device)),
        ]))

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = [c.replace("_", " ") for c in classnames]
        self.prompts.set_classnames(self.classnames)

    def conditional_context(self, image_features: Tensor) -> Tensor:
        """Image features [B, E] (unnormalised) -> per-image context [B, M, Dt]; class-specific
        image vectors [B, C, E] give per-image-and-class context [B, C, M, Dt] (TOMML's CTP)."""
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        shift = self.meta_net(image_features.to(self.ctx.dtype))  # [..., Dt]
        return self.ctx + shift.unsqueeze(-2)  # [B, M, Dt] or [B, C, M, Dt]

    def text_features(self, ctx: Tensor) -> Tensor:
        """Per-image context [B, M, Dt] -> class text features [B, C, E] (unnormalised)."""
        return encode_per_sample_prompts(self.clip, self.prompts, ctx,
                                         self.config.text_chunk_size,
                                         self.config.checkpoint_chunks)

    def forward_features(self, images: Tensor) -> Features:
        """Raw image features [B, E], per-image text features [B, C, E] and their logits."""
        image_features = self.frozen_image_features(images)  # [B, E]
        text = self.text_features(self.conditional_context(image_features))  # [B, C, E]
        return Features(image_features, text, self.logits(image_features, text))

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_features(images).logits

    def extra_loss_terms(self, images: Tensor, labels: Tensor, features: Features
                         ) -> tuple[list[Tensor], dict[str, float]]:
        """None: CoCoOp's loss is cross-entropy only."""
        return [], {}
