"""Zero-shot classification with hand-crafted prompts (Radford et al., 2021): class text features
from one template or an ensemble, CLIP's logit scale, cosine similarity."""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import CLIP


@torch.no_grad()
def hand_crafted_text_features(clip: CLIP, classnames: Sequence[str],
                               templates: Union[str, Sequence[str]] = "a photo of a {}.",
                               normalize_each: bool = True, batch_size: int = 256) -> Tensor:
    """Frozen text features of hand-crafted prompts, averaged over templates: [C, E], normalised.

    ``normalize_each``: normalise each template's features before averaging (CLIP's ensembling);
    False averages the raw features (PromptSRC's teacher), normalised only at the end.
    ``_`` in class names becomes a space, as in every CoOp-family trainer.
    """
    if isinstance(templates, str):
        templates = [templates]
    names = [c.replace("_", " ") for c in classnames]
    device = clip.logit_scale.device
    total = None
    for template in templates:
        texts = [template.format(n) for n in names]
        feats = []
        for i in range(0, len(texts), batch_size):
            tokens = clip.tokenizer.tokenize(texts[i: i + batch_size],
                                             clip.context_length).to(device)
            feats.append(clip.encode_text(tokens).float())
        f = torch.cat(feats)  # [C, E]
        if normalize_each:
            f = F.normalize(f, dim=-1)
        total = f if total is None else total + f
    return F.normalize(total / len(templates), dim=-1)


class ZeroShotClassifier(nn.Module):
    """``logits = logit_scale.exp() * cos(image, text_c)`` over fixed class text features
    (+ ``logit_bias`` for a sigmoid head, SigLIP: ``clip.add_logit_bias``)."""

    def __init__(self, clip: CLIP, classnames: Sequence[str],
                 templates: Union[str, Sequence[str]] = "a photo of a {}."):
        super().__init__()
        self.clip = clip
        self.classnames = [c.replace("_", " ") for c in classnames]
        self.register_buffer("text_features", hand_crafted_text_features(clip, classnames, templates))

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        image = F.normalize(self.clip.encode_image(images).float(), dim=-1)  # [B, E]
        logits = self.clip.logit_scale.exp().float() * image @ self.text_features.t()  # [B,C]
        return self.clip.add_logit_bias(logits)

    @torch.no_grad()
    def predict(self, images: Tensor, topk: int = 5) -> tuple[Tensor, Tensor]:
        """Top-k (probabilities, class indices), each [B, k]."""
        probs = self(images).softmax(dim=-1)
        return probs.topk(min(topk, probs.shape[-1]), dim=-1)
