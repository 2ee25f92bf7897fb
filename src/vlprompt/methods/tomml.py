"""TOMML: Task-Oriented Multi-Modal Mutual Learning (Long et al., ICCV 2023, arXiv 2303.17169).

**This is vlprompt's own design, not a reproduction.** The authors have released no code and only
the abstract was available, so vlprompt implements the design of METHODS.md §3.3, which follows
the abstract point by point; every component has a switch so its effect can be ablated, and with
all switches off (``ctp=False, tft=False, contrastive_weight=0``) the method *is* CoCoOp, its
parent (same parameters, same logits, same loss).

* **CTP** (class-aware text prompt, image -> text). Class queries ``q_c`` are CLIP's frozen
  features of the hand-crafted prompt (``self.template``). Each class query attends over the
  image's projected patch tokens plus its global feature, giving a class-specific image vector
  ``u_{b,c}`` [B, C, E]; CoCoOp's meta-net maps it to a bias added to class c's context, so every
  (image, class) pair has its own prompt (B x C text passes, chunked). Off: ``u_{b,c} = f_b``.
* **TFT** (text-guided feature tuning, text -> image).
  ``v_{b,c} = f_b + gamma * Attn(query=t_{b,c}, keys/values=F_b)``, gamma a learnable scalar
  initialised at 0 (training starts from plain CLIP features). Off: ``v_{b,c} = f_b``.
* Logits ``tau * cos(v_{b,c}, t_{b,c})``, tau = CLIP's logit scale.
* **Loss** = cross-entropy over classes (image -> text) + ``contrastive_weight`` x a text -> image
  InfoNCE: for each class present in the batch, its column of logits is a softmax over the
  batch's images, and the class's images are its positives (mean over them, then over classes).

Attention (METHODS.md says "single-head cross-attention" without projections): vlprompt uses
identity projections in CLIP's joint space, where the text features and the ``ln_post`` + ``proj``
patch tokens are already aligned: ``softmax(tau * cos(q, k)) @ v`` with ``v`` the unnormalised
tokens and tau CLIP's logit scale. The only parameters beyond CoCoOp's are therefore gamma.

Protocol defaults as CoCoOp's (4 context tokens from "a photo of a", SGD lr 0.002, 10 epochs, 1
warm-up epoch); batch 4 rather than 1, since the text -> image term needs several images per batch
and the B x C text passes run in chunks (``text_chunk_size``, ``checkpoint_chunks``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..clip.model import CLIP
from .base import VISUAL_PROMPTS
from .cocoop import CoCoOp, CoCoOpConfig
from .prompts import hand_crafted_text_features
from .registry import register_method


@dataclasses.dataclass
class TOMMLConfig(CoCoOpConfig):
    """TOMML settings (vlprompt design, METHODS.md §3.3); CoCoOp's fields keep their defaults."""

    #: class-aware text prompt: class-specific image signal in each class's prompt
    ctp: bool = True
    #: text-guided feature tuning: image feature re-weighted by each class's text feature
    tft: bool = True
    #: weight of the text -> image contrastive term (0 = cross-entropy only)
    contrastive_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.contrastive_weight >= 0:
            raise ValueError(f"{type(self).__name__}: contrastive_weight must be >= 0, got "
                             f"{self.contrastive_weight}")


def joint_attention(queries: Tensor, tokens: Tensor, scale: Tensor) -> Tensor:
    """Single-head, projection-free cross-attention in CLIP's joint space.

    queries [Q, E] (shared by the batch) or [B, Q, E]; tokens [B, K, E].
    Returns ``softmax(scale * cos(q, k)) @ tokens`` [B, Q, E] (values are the raw tokens).
    """
    if queries.dim() == 2:
        queries = queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
    queries = queries.to(tokens.dtype)
    scores = F.normalize(queries, dim=-1) @ F.normalize(tokens, dim=-1).transpose(1, 2)  # [B,Q,K]
    return (scale * scores).softmax(dim=-1) @ tokens


def text_to_image_contrastive(logits: Tensor, labels: Tensor) -> Tensor:
    """InfoNCE over the batch's images for each class present in the batch.

    logits [B, C] (already scaled); the images labelled c are the positives of class c. Returns
    the mean over present classes of the mean over their positives of ``-log softmax_b``.
    """
    log_p = F.log_softmax(logits.float(), dim=0)  # softmax over images, per class
    pos = F.one_hot(labels, logits.shape[1]).to(log_p.dtype)  # [B, C]
    count = pos.sum(dim=0)  # [C]
    present = count > 0
    per_class = -(log_p * pos).sum(dim=0)[present] / count[present]
    return per_class.mean()


@register_method
class TOMML(CoCoOp):
    """Learnable: CoCoOp's ``ctx`` [M, Dt] and ``meta_net``; with TFT, ``tft_gate`` [1] (gamma).
    Class queries [C, E] are a non-persistent buffer computed once per class list."""

    name = "tomml"
    #: reads the frozen tower's patch tokens (``frozen_image``), not only its features
    frozen_image_tower = False
    requires = frozenset({VISUAL_PROMPTS})
    description = ("TOMML: class-aware text prompts + text-guided feature tuning "
                   "(vlprompt design after ICCV 2023)")
    Config = TOMMLConfig

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: Optional[TOMMLConfig] = None,
                 template: Optional[str] = None):
        super().__init__(clip, classnames, config, template)
        if self.config.tft:
            self.tft_gate = nn.Parameter(torch.zeros(1, device=self.device))  # gamma
        self.register_buffer("class_queries", None, persistent=False)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.class_queries = None

    # ------------------------------------------------------------------ pieces
    def hand_crafted_queries(self) -> Tensor:
        """Frozen normalised text features of ``self.template`` for the current classes [C, E]."""
        if self.class_queries is None:
            self.class_queries = hand_crafted_text_features(self.clip, self.classnames,
                                                            [self.template])
        return self.class_queries

    def needs_patches(self) -> bool:
        return self.config.ctp or self.config.tft

    def frozen_image(self, images: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Unprompted image tower: global feature f [B, E] and, when a component uses them, the
        ``ln_post`` + ``proj`` patch tokens F [B, N_p, E] (else None)."""
        if not self.needs_patches():
            return self.clip.encode_image(images), None
        f, tokens = self.clip.encode_image(images, return_tokens=True)  # [B, E], [B, 1+N_p, E]
        return f, tokens[:, self.clip.visual.num_prefix_tokens:]  # past CLS (SigLIP has none)

    def context(self, f: Tensor, patches: Optional[Tensor]) -> Tensor:
        """CTP: per-image-and-class context [B, C, M, Dt]; off: CoCoOp's [B, M, Dt]."""
        if not self.config.ctp:
            return self.conditional_context(f)
        keys = torch.cat([f.unsqueeze(1), patches], dim=1)  # [B, 1+N_p, E]
        u = joint_attention(self.hand_crafted_queries(), keys, self.clip.logit_scale.exp())
        return self.conditional_context(u)  # u: [B, C, E]

    def tune_image(self, image: Tensor, patches: Optional[Tensor], text: Tensor) -> Tensor:
        """TFT: per-class image features [B, C, E] = image + gamma * Attn(text, patches); off:
        ``image`` unchanged ([B, E])."""
        if not self.config.tft:
            return image
        attended = joint_attention(text, patches, self.clip.logit_scale.exp())  # [B, C, E]
        return image.unsqueeze(1).to(attended.dtype) + self.tft_gate.to(attended.dtype) * attended

    def image_side(self, images: Tensor, f: Tensor, patches: Optional[Tensor],
                   text: Tensor) -> Tensor:
        """Image features paired with ``text`` [B, C, E]: [B, E] or per-class [B, C, E]."""
        return self.tune_image(f, patches, text)

    def features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(image features [B, E] or [B, C, E], text features [B, C, E]), unnormalised."""
        f, patches = self.frozen_image(images)
        text = self.text_features(self.context(f, patches))  # [B, C, E]
        return self.image_side(images, f, patches, text), text

    def pair_logits(self, image: Tensor, text: Tensor) -> Tensor:
        """``tau * cos`` of image [B, E] or [B, C, E] with text [B, C, E] -> [B, C]."""
        if image.dim() == 2:
            return self.logits(image, text)
        cos = (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(dim=-1)
        return self.clip.add_logit_bias(self.clip.logit_scale.exp() * cos)

    # ------------------------------------------------------------------ interface
    def forward(self, images: Tensor) -> Tensor:
        return self.pair_logits(*self.features(images))

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        logits = self(images)
        ce = F.cross_entropy(logits, labels)
        weight = self.config.contrastive_weight
        if weight == 0:
            return ce, {"ce": float(ce.detach())}
        t2i = text_to_image_contrastive(logits, labels)
        total = ce + weight * t2i
        return total, {"ce": float(ce.detach()), "t2i": float(t2i.detach())}
