"""Deep prompt modules shared by the multi-layer prompting methods.

* ``DeepPromptStack`` — independent learnable prompts for blocks ``1 .. depth-1`` of one tower
  (the per-layer prompts of VPT-deep, IVLP and PromptSRC, and MaPLe's text prompts).
* ``VisionPrompts`` — shallow prompts appended after the patch tokens plus a deep stack
  (VPT-deep: Jia et al., ECCV 2022; the vision branch of IVLP/PromptSRC).
* ``TextDeepPrompts`` — the CoOp-style context at positions ``1 .. n`` plus a deep stack replacing
  those positions before blocks ``1 .. depth-1`` (the language branch of IVLP/PromptSRC).
* ``CoupledPrompts`` — MaPLe's vision-language coupling (Khattak et al., CVPR 2023): text prompts
  per layer, and vision prompts computed from them by one Linear(text -> vision width) per layer.

Everything goes through the CLIP core's entry points (``encode_text_embeddings(...,
deep_prompts=...)``, ``encode_image(..., prompts=..., deep_prompts=...)``); the placement rules
(append before ``ln_pre``, replace the last n vision tokens / text positions 1..n) live there
(METHODS.md §10). On a tokenizer without a start token (SigLIP) the text positions are 0..n-1
(``clip.prompt_start``); SigLIP's attention-pooling head pools the vision prompt tokens with the
patches.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..clip.model import CLIP
from .prompts import TextPrompts

logger = logging.getLogger(__name__)

#: std of the N(0, std^2) initialisation of randomly initialised prompts (all official codes)
PROMPT_INIT_STD = 0.02


def resolve_depth(depth: Optional[int], layers: int, what: str) -> int:
    """Prompt depth for a tower with ``layers`` blocks: ``None`` means every block; a depth above
    the tower's block count is capped (logged), so paper configs also run on small test models."""
    if depth is None:
        return layers
    if depth > layers:
        logger.warning("%s prompt depth %d exceeds the %d blocks of the tower; using %d",
                       what, depth, layers, layers)
        return layers
    return depth


def _device(clip: CLIP) -> torch.device:
    return clip.logit_scale.device


class DeepPromptStack(nn.Module):
    """Independent prompts for blocks ``1 .. depth-1``: ``prompts`` [depth-1, n, D], N(0, 0.02^2).

    With ``depth <= 1`` the stack is empty (no parameter). ``as_dict()`` gives the
    ``{block: [n, D]}`` mapping the CLIP core's ``deep_prompts`` arguments take.
    """

    def __init__(self, n_tokens: int, width: int, depth: int,
                 device: Optional[torch.device] = None):
        super().__init__()
        self.n_tokens, self.width, self.depth = n_tokens, width, depth
        if depth > 1:
            self.prompts = nn.Parameter(
                torch.randn(depth - 1, n_tokens, width, device=device) * PROMPT_INIT_STD)
        else:
            self.register_parameter("prompts", None)

    def as_dict(self, prompts: Optional[Tensor] = None) -> dict[int, Tensor]:
        """``{i: prompts[i-1]}`` for blocks 1..depth-1 (``prompts`` defaults to the parameter;
        callers may pass transformed prompts of the same leading size)."""
        prompts = self.prompts if prompts is None else prompts
        if prompts is None:
            return {}
        return {i + 1: prompts[i] for i in range(prompts.shape[0])}


class VisionPrompts(nn.Module):
    """Vision-tower prompts: ``shallow`` [n, Dv] appended after the patch tokens (before
    ``ln_pre``) and ``deep`` [depth-1, n, Dv] replacing the last n tokens before blocks 1..depth-1.
    """

    def __init__(self, clip: CLIP, n_tokens: int, depth: Optional[int]):
        super().__init__()
        depth = resolve_depth(depth, clip.visual.num_layers, "vision")
        self.shallow = nn.Parameter(
            torch.randn(n_tokens, clip.vision_width, device=_device(clip)) * PROMPT_INIT_STD)
        self.deep = DeepPromptStack(n_tokens, clip.vision_width, depth, device=_device(clip))

    def encode(self, clip: CLIP, images: Tensor) -> Tensor:
        """Prompted image features [B, E], unnormalised."""
        return clip.encode_image(images, prompts=self.shallow, deep_prompts=self.deep.as_dict())


class TextDeepPrompts(nn.Module):
    """Language-tower prompts: context ``ctx`` [n, Dt] at positions 1..n (initialised from the
    words of ``ctx_init`` when given) and ``deep`` [depth-1, n, Dt] replacing those positions
    before blocks 1..depth-1. ``text`` holds the fixed tokens of every class prompt."""

    def __init__(self, clip: CLIP, classnames: Sequence[str], n_tokens: int,
                 ctx_init: Optional[str], depth: Optional[int]):
        super().__init__()
        depth = resolve_depth(depth, clip.transformer.layers, "text")
        self.text = TextPrompts(clip, classnames, n_tokens, ctx_init or None)
        self.ctx = nn.Parameter(self.text.init_context().to(_device(clip)))  # [n, Dt]
        self.deep = DeepPromptStack(n_tokens, clip.text_width, depth, device=_device(clip))

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.text.set_classnames(classnames)

    def encode(self, clip: CLIP) -> Tensor:
        """Prompted class text features [C, E], unnormalised."""
        return clip.encode_text_embeddings(self.text.assemble(self.ctx), self.text.eot_indices,
                                           deep_prompts=self.deep.as_dict())


class CoupledPrompts(nn.Module):
    """MaPLe's coupled vision-language prompts.

    Parameters (text width Dt, vision width Dv, J = depth):
      ``ctx`` [n, Dt] — text context at positions 1..n (block 0);
      ``proj`` Linear(Dt -> Dv) — shallow vision prompts = proj(ctx);
      ``text_deep.prompts`` [J-1, n, Dt] — text prompts replacing positions 1..n before
      blocks 1..J-1;
      ``couplings`` J-1 x Linear(Dt -> Dv) — vision prompts before block i = couplings[i-1](text
      prompt i); gradients flow through every coupling into the text prompts.
    The same depth applies to both towers (capped at the shallower one).

    ``couplings=False`` leaves the per-layer Linear couplings out, for subclasses that generate
    the deep vision prompts differently (COMMA) by overriding ``vision_prompts``.
    """

    def __init__(self, clip: CLIP, classnames: Sequence[str], n_tokens: int,
                 ctx_init: Optional[str], depth: int, couplings: bool = True):
        super().__init__()
        depth = resolve_depth(depth, min(clip.transformer.layers, clip.visual.num_layers),
                              "coupled")
        device = _device(clip)
        self.text = TextPrompts(clip, classnames, n_tokens, ctx_init or None)
        self.ctx = nn.Parameter(self.text.init_context().to(device))  # [n, Dt]
        self.proj = nn.Linear(clip.text_width, clip.vision_width, device=device)
        self.text_deep = DeepPromptStack(n_tokens, clip.text_width, depth, device=device)
        self.couplings = nn.ModuleList(
            [nn.Linear(clip.text_width, clip.vision_width, device=device)
             for _ in range(depth - 1 if couplings else 0)])

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.text.set_classnames(classnames)

    def vision_prompts(self) -> tuple[Tensor, dict[int, Tensor]]:
        """(shallow [n, Dv], {block i: [n, Dv]}) computed from the text prompts."""
        shallow = self.proj(self.ctx)
        deep = {i: layer(p) for (i, p), layer
                in zip(self.text_deep.as_dict().items(), self.couplings)}
        return shallow, deep

    def encode_text(self, clip: CLIP, hidden_states: Optional[list] = None,
                    truncate: bool = True) -> Tensor:
        """Prompted class text features [C, E], unnormalised (``hidden_states``/``truncate`` as
        in ``CLIP.encode_text_embeddings``; COMMA reads the block outputs of all positions)."""
        return clip.encode_text_embeddings(self.text.assemble(self.ctx), self.text.eot_indices,
                                           deep_prompts=self.text_deep.as_dict(),
                                           hidden_states=hidden_states, truncate=truncate)

    def encode_image(self, clip: CLIP, images: Tensor) -> Tensor:
        """Prompted image features [B, E], unnormalised."""
        shallow, deep = self.vision_prompts()
        return clip.encode_image(images, prompts=shallow, deep_prompts=deep)
