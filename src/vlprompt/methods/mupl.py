"""MuPL: Mutual Prompt Learning (Long et al., IJCV 2024, DOI 10.1007/s11263-024-02243-z), the
journal extension of TOMML (arXiv 2303.17169).

**This is vlprompt's own design, not a reproduction.** No code has been released and only the
abstract was available, so vlprompt implements the design of METHODS.md §4.3, with a switch per
component; with ``ftp=False, tvp=False, contrastive_weight=0`` the method *is* CoCoOp (same
parameters, logits and loss). It extends :class:`~vlprompt.methods.tomml.TOMML` (same frozen
pass, chunked B x C text passes, attention and contrastive term); TOMML's ``ctp``/``tft`` switches
stay available and default to off (``ctp`` and ``ftp`` both shape the text context, so they are
exclusive; ``tft`` composes with ``tvp`` and then tunes the prompted image feature).

* **FTP** (fine-grained text prompt, image -> text). M learnable part queries [M, E], one per
  context token, attend over the image's projected patch tokens (TOMML's projection-free
  joint-space attention) -> M semantics g_{b,j}; CoCoOp's meta-net maps each to the bias of *its
  own* context token j. The prompt is shared by the classes of one image. Off: every token gets
  the bias of f_b (CoCoOp).
* **TVP** (text-reorganised visual prompt, text -> image). The image-conditioned class features
  t_{b,.} are ranked by cos(f_b, t_{b,c}); the top K (clipped to C) are kept, weighted by their
  softmax scores (tau = CLIP's logit scale) and mapped by one Linear(E -> Dv) per prompted layer
  into K visual prompt tokens, followed by N_v learnable tokens (VPT-deep style). Prompts are
  appended after the patch tokens and replaced before vision blocks 1..J-1 (MaPLe-style depth
  J = ``visual_depth``); a second, prompted image pass gives v_b. Off: v_b = f_b.
* Logits ``tau * cos(v_b, t_{b,c})``; loss = CE + ``contrastive_weight`` x text -> image InfoNCE.

Cost: two image-tower passes (the first without gradient) and B x C text passes per step.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..clip.model import CLIP
from .deep_prompts import PROMPT_INIT_STD, VisionPrompts, resolve_depth
from .registry import register_method
from .tomml import TOMML, TOMMLConfig, joint_attention


@dataclasses.dataclass
class MuPLConfig(TOMMLConfig):
    """MuPL settings (vlprompt design, METHODS.md §4.3)."""

    ctp: bool = False
    tft: bool = False
    #: fine-grained text prompt: one image semantic per context token
    ftp: bool = True
    #: text-reorganised visual prompt: top-K class text features -> visual prompts
    tvp: bool = True
    #: classes kept for the visual prompt (clipped to the number of classes)
    top_k: int = 10
    #: learnable visual tokens N_v after the K text-derived ones (0 = none)
    n_vision_tokens: int = 4
    #: prompted vision blocks J (capped at the tower's depth)
    visual_depth: int = 9

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ctp and self.ftp:
            raise ValueError("mupl: ctp and ftp both set the text context; enable at most one")
        if self.top_k < 1:
            raise ValueError(f"mupl: top_k must be >= 1, got {self.top_k}")
        if self.n_vision_tokens < 0:
            raise ValueError(f"mupl: n_vision_tokens must be >= 0, got {self.n_vision_tokens}")
        if self.visual_depth < 1:
            raise ValueError(f"mupl: visual_depth must be >= 1, got {self.visual_depth}")


@register_method
class MuPL(TOMML):
    """Learnable: CoCoOp's ``ctx`` and ``meta_net``; with FTP ``part_queries`` [M, E]; with TVP
    ``tvp_proj`` J x Linear(E -> Dv) and, when N_v > 0, ``vision.shallow`` [N_v, Dv] and
    ``vision.deep.prompts`` [J-1, N_v, Dv]; with TFT, ``tft_gate`` [1]."""

    name = "mupl"
    description = ("MuPL: fine-grained text prompts + text-reorganised visual prompts "
                   "(vlprompt design after IJCV 2024)")
    Config = MuPLConfig

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: Optional[MuPLConfig] = None,
                 template: Optional[str] = None):
        super().__init__(clip, classnames, config, template)
        cfg, device = self.config, self.device
        if cfg.ftp:
            self.part_queries = nn.Parameter(
                torch.randn(cfg.n_ctx, clip.embed_dim, device=device) * PROMPT_INIT_STD)
        if cfg.tvp:
            depth = resolve_depth(cfg.visual_depth, clip.visual.num_layers, "vision")
            self.tvp_proj = nn.ModuleList([nn.Linear(clip.embed_dim, clip.vision_width,
                                                     device=device) for _ in range(depth)])
            self.vision = (VisionPrompts(clip, cfg.n_vision_tokens, depth)
                           if cfg.n_vision_tokens > 0 else None)

    def needs_patches(self) -> bool:
        return super().needs_patches() or self.config.ftp

    # ------------------------------------------------------------------ FTP
    def context(self, f: Tensor, patches: Optional[Tensor]) -> Tensor:
        """FTP: per-image context [B, M, Dt], token j shifted by the meta-net of semantic j."""
        if not self.config.ftp:
            return super().context(f, patches)
        parts = joint_attention(self.part_queries, patches, self.clip.logit_scale.exp())  # [B,M,E]
        parts = F.normalize(parts, dim=-1)
        return self.ctx + self.meta_net(parts.to(self.ctx.dtype))  # [B, M, Dt]

    # ------------------------------------------------------------------ TVP
    def visual_prompts(self, f: Tensor, text: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        """(shallow [B, K+N_v, Dv], {block i: [B, K+N_v, Dv]}) from the top-K class texts."""
        k = min(self.config.top_k, text.shape[1])
        text_n = F.normalize(text, dim=-1)  # [B, C, E]
        scores = torch.einsum("be,bce->bc", F.normalize(f, dim=-1).to(text_n.dtype), text_n)
        top, idx = scores.topk(k, dim=1)  # [B, K]
        weights = (self.clip.logit_scale.exp() * top).softmax(dim=1)  # [B, K]
        kept = text_n.gather(1, idx.unsqueeze(-1).expand(-1, -1, text_n.shape[-1]))  # [B, K, E]
        kept = weights.unsqueeze(-1) * kept
        B = f.shape[0]
        learned = None
        if self.vision is not None:
            learned = [self.vision.shallow] + [p for p in self.vision.deep.as_dict().values()]
        layers = []
        for i, proj in enumerate(self.tvp_proj):
            tokens = proj(kept.to(proj.weight.dtype))  # [B, K, Dv]
            if learned is not None:
                tokens = torch.cat([tokens, learned[i].unsqueeze(0).expand(B, -1, -1)], dim=1)
            layers.append(tokens)
        return layers[0], {i: p for i, p in enumerate(layers) if i > 0}

    def image_side(self, images: Tensor, f: Tensor, patches: Optional[Tensor],
                   text: Tensor) -> Tensor:
        """TVP: second, prompted image pass v_b [B, E] (then TFT when enabled); off: f."""
        image = f
        if self.config.tvp:
            shallow, deep = self.visual_prompts(f, text)
            image = self.clip.encode_image(images, prompts=shallow, deep_prompts=deep)
        return self.tune_image(image, patches, text)
