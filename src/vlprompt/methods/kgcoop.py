"""KgCoOp: Visual-Language Prompt Tuning with Knowledge-guided Context Optimization
(Yao et al., CVPR 2023).

CoOp (4 context tokens from "a photo of a") plus a regulariser that keeps the learned class text
features close to CLIP's hand-crafted ones:
``loss = CE + lambda * (1 - mean_c cos(t_c, t_c^hc))``, lambda = 8, where ``t^hc`` are the frozen,
normalised sentence features of the dataset template (``self.template``; the engine passes the
dataset's template, including KgCoOp's DTD variant) — METHODS.md §6.6, §10.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..clip.model import CLIP
from ..interop.layout import OfficialLayout, Rule
from .base import Features, Method, MethodConfig
from .prompts import TextPrompts, hand_crafted_text_features
from .registry import register_method


@dataclasses.dataclass
class KgCoOpConfig(MethodConfig):
    """KgCoOp settings; defaults = ``vit_b16_ep100_ctxv1`` with W = 8."""

    n_ctx: int = 4
    ctx_init: str = "a photo of a"
    #: weight lambda of the knowledge-guidance term (``TRAINER.COOP.W``)
    kg_weight: float = 8.0

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ValueError(f"kgcoop: n_ctx must be >= 1, got {self.n_ctx}")
        if self.kg_weight < 0:
            raise ValueError(f"kgcoop: kg_weight must be >= 0, got {self.kg_weight}")


@register_method
class KgCoOp(Method):
    """Learnable: ``ctx`` [M, Dt]. Teacher ``teacher_features`` [C, E] is a non-persistent buffer,
    computed once per class list on first use in ``loss``."""

    name = "kgcoop"
    frozen_image_tower = True
    template_variant = "kgcoop"  # DTD: "a photo of a {}, a type of texture."
    description = ("KgCoOp: CoOp regularised towards hand-crafted prompt features "
                   "(CVPR 2023)")
    Config = KgCoOpConfig
    #: checkpoint layout of the official trainer (``vlprompt.interop``); ``bias_vectors`` and
    #: ``meta_net`` are created there but never trained nor used in the forward pass
    official_layout = OfficialLayout(
        repo="htyao89/KgCoOp", source="KgCoOp/trainers/kgcoop.py", trainer="KgCoOp",
        models=("prompt_learner",), rules=(Rule("ctx", "ctx"),),
        ignored=("bias_vectors", "meta_net.linear1."),
        config={"TRAINER.COOP.N_CTX": "n_ctx", "TRAINER.COOP.CTX_INIT": "ctx_init",
                "TRAINER.COOP.W": "kg_weight"},
        shapes={"n_ctx": ("ctx", "dim0")}, text_prompts="prompts")

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: Optional[KgCoOpConfig] = None,
                 template: Optional[str] = None):
        super().__init__(clip, classnames, config, template)
        cfg = self.config
        self.prompts = TextPrompts(clip, self.classnames, cfg.n_ctx, cfg.ctx_init or None)
        self.ctx = nn.Parameter(self.prompts.init_context().to(clip.logit_scale.device))
        self.register_buffer("teacher_features", None, persistent=False)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = [c.replace("_", " ") for c in classnames]
        self.prompts.set_classnames(self.classnames)
        self.teacher_features = None

    def hand_crafted_features(self) -> Tensor:
        """Frozen normalised features of ``self.template`` for the current classes [C, E]."""
        if self.teacher_features is None:
            self.teacher_features = hand_crafted_text_features(
                self.clip, self.classnames, [self.template])
        return self.teacher_features

    def text_features(self) -> Tensor:
        """Learned class text features [C, E], unnormalised."""
        tp = self.prompts
        return self.clip.encode_text_embeddings(tp.assemble(self.ctx), tp.eot_indices)

    def forward_features(self, images: Tensor) -> Features:
        """Raw image [B, E] and text [C, E] features and their logits."""
        image_features = self.frozen_image_features(images)
        text = self.cached_class_features(self.text_features)
        return Features(image_features, text, self.logits(image_features, text))

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_features(images).logits

    def extra_loss_terms(self, images: Tensor, labels: Tensor, features: Features
                         ) -> tuple[list[Tensor], dict[str, float]]:
        """``[lambda * (1 - mean_c cos(t_c, t_c^hc))]`` and its unweighted part ``kg``."""
        text = features.text
        cos = (F.normalize(text, dim=-1) * self.hand_crafted_features().to(text.dtype)).sum(-1)
        kg = 1.0 - cos.mean()
        return [self.config.kg_weight * kg], {"kg": float(kg.detach())}

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        features = self.forward_features(images)
        ce = F.cross_entropy(features.logits, labels)
        terms, parts = self.extra_loss_terms(images, labels, features)
        total = ce
        for term in terms:
            total = total + term
        return total, {"ce": float(ce.detach()), **parts}
