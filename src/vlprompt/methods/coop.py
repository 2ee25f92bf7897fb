"""CoOp — Context Optimization (Zhou et al., IJCV 2022, "Learning to Prompt for Vision-Language
Models"): M learnable context vectors replace the hand-written words of the prompt
``[SOT][ctx_1..ctx_M][class].[EOT]``; only they are trained, with cross-entropy
(METHODS.md §6.2; ``KaiyangZhou/CoOp trainers/coop.py``)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..interop.layout import OfficialLayout, Rule
from .base import Features, Method
from .prompts import FrozenFeatureCache, TextPrompts
from .registry import register_method


@register_method
class CoOp(Method):
    """Learnable context ``ctx``: [M, D] shared by all classes, or [C, M, D] with ``csc``.

    Text features depend only on ``ctx`` and the class list, so outside training (no grad) they
    are computed once and reused until ``ctx`` changes.
    """

    name = "coop"
    frozen_image_tower = True
    description = "CoOp: M learnable context vectors shared by the classes (or class-specific)"
    #: checkpoint layout of the official trainer (``vlprompt.interop``)
    official_layout = OfficialLayout(
        repo="KaiyangZhou/CoOp", source="trainers/coop.py", trainer="CoOp",
        models=("prompt_learner",), rules=(Rule("ctx", "ctx"),),
        config={"TRAINER.COOP.N_CTX": "n_ctx", "TRAINER.COOP.CTX_INIT": "ctx_init",
                "TRAINER.COOP.CLASS_TOKEN_POSITION": "class_token_position",
                "TRAINER.COOP.CSC": "csc"},
        shapes={"n_ctx": ("ctx", "dim-2"), "csc": ("ctx", "ndim3")}, text_prompts="prompts")

    @dataclasses.dataclass
    class Config:
        #: number of context vectors M
        n_ctx: int = 16
        #: initial words (e.g. "a photo of a"); empty = random N(0, 0.02^2)
        ctx_init: str = ""
        #: where the class name goes: "end", "middle" or "front"
        class_token_position: str = "end"
        #: class-specific context (one context per class)
        csc: bool = False

        def __post_init__(self) -> None:
            if self.n_ctx < 1:
                raise ValueError(f"coop: n_ctx must be >= 1, got {self.n_ctx}")
            if self.class_token_position not in ("end", "middle", "front"):
                raise ValueError("coop: class_token_position must be end, middle or front, got "
                                 f"{self.class_token_position!r}")

    def __init__(self, clip, classnames, config=None, template=None):
        super().__init__(clip, classnames, config, template)
        cfg = self.config
        self.prompts = TextPrompts(clip, self.classnames, cfg.n_ctx, ctx_init=cfg.ctx_init or None,
                                   class_position=cfg.class_token_position)
        base = self.prompts.init_context()  # [M, D]
        if cfg.csc:
            C = len(self.classnames)
            if cfg.ctx_init:
                ctx = base.unsqueeze(0).repeat(C, 1, 1)  # [C, M, D]
            else:
                ctx = torch.randn(C, cfg.n_ctx, clip.text_width) * 0.02
        else:
            ctx = base
        self.ctx = nn.Parameter(ctx.to(self.device))
        self._cache = FrozenFeatureCache()

    @property
    def class_specific(self) -> bool:
        return bool(self.config.csc)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        names = [c.replace("_", " ") for c in classnames]
        if self.config.csc and len(names) != self.ctx.shape[0]:
            raise ValueError(f"coop: class-specific context was learned for {self.ctx.shape[0]} "
                             f"classes and cannot be applied to {len(names)} other classes")
        self.classnames = names
        self.prompts.set_classnames(names)
        self._cache.clear()

    def text_features(self) -> Tensor:
        """Unnormalised text features [C, E] of the learned prompts."""
        embeddings = self.prompts.assemble(self.ctx)  # [C, L, D]
        return self.clip.encode_text_embeddings(embeddings, self.prompts.eot_indices)

    def _text_features_cached(self) -> Tensor:
        """``text_features``, reused across batches when nothing can change them (no grad)."""
        return self._cache.get(self.ctx, self.prompts.tokens, self.text_features)

    def forward_features(self, images: Tensor) -> Features:
        """Raw image [B, E] and text [C, E] features (fp32) and their logits."""
        image_features = self.frozen_image_features(images).float()
        text_features = self._text_features_cached().float()
        return Features(image_features, text_features, self.logits(image_features, text_features))

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_features(images).logits

    def extra_loss_terms(self, images: Tensor, labels: Tensor, features: Features
                         ) -> tuple[list[Tensor], dict[str, float]]:
        """None: CoOp's loss is cross-entropy only."""
        return [], {}

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        logits = self(images)
        ce = F.cross_entropy(logits, labels)
        acc = (logits.argmax(dim=-1) == labels).float().mean()
        return ce, {"ce": float(ce.detach()), "acc": 100.0 * float(acc)}
