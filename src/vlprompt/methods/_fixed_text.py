"""Frozen class prompts for methods that learn no tokens but change the towers (MMA's adapters,
CLIP-LoRA's attention deltas), and an evaluation cache of the features computed from them.

``prompts.FrozenFeatureCache`` keys on one context tensor; these methods' text features depend on
many modules, so ``TensorsFeatureCache`` keys on all of them.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..clip.model import CLIP
from ..perf import SWITCHES


class TensorsFeatureCache:
    """Reuse features while none of the tensors they were computed from can have changed.

    Bypassed (and cleared) when gradients are enabled or ``active`` is False (train mode, where
    dropout makes each pass differ). The key catches optimiser steps and loads (version
    counters), edits through ``.data`` (the tensors' sum), moves, a new class list (``tokens``
    identity) and autocast changes.
    """

    def __init__(self) -> None:
        self._entry: Optional[tuple[tuple, Tensor]] = None

    def clear(self) -> None:
        self._entry = None

    def get(self, tensors: Sequence[Tensor], tokens: Tensor, compute: Callable[[], Tensor],
            active: bool = True) -> Tensor:
        if torch.is_grad_enabled() or not active or not SWITCHES.cache_text_features:
            self._entry = None
            return compute()
        device = tokens.device
        total = float(sum(t.detach().double().sum() for t in tensors)) if tensors else 0.0
        key = (tuple((t._version, t.data_ptr()) for t in tensors), total, device, id(tokens),
               torch.is_autocast_enabled(device.type))
        if self._entry is None or self._entry[0] != key:
            self._entry = (key, compute())
        return self._entry[1]


class FixedTextPrompts(nn.Module):
    """``template.format(class)`` for every class: token ids ``tokens`` [C, L] and embeddings
    ``embeddings`` [C, L, Dt] as non-persistent buffers (rebuilt by ``set_classnames``)."""

    def __init__(self, clip: CLIP, classnames: Sequence[str], template: str):
        super().__init__()
        self.template = template
        self._cache = TensorsFeatureCache()
        self.set_classnames(clip, classnames)

    def set_classnames(self, clip: CLIP, classnames: Sequence[str]) -> None:
        names = [c.replace("_", " ") for c in classnames]
        device = clip.logit_scale.device
        tokens = clip.tokenizer.tokenize([self.template.format(n) for n in names],
                                         clip.context_length)
        with torch.no_grad():
            embeddings = clip.embed_tokens(tokens.to(device))  # [C, L, Dt]
        self.register_buffer("tokens", tokens.to(device), persistent=False)
        self.register_buffer("embeddings", embeddings, persistent=False)
        self._cache.clear()

    def encode(self, clip: CLIP, learned: Sequence[Tensor], cache: bool = True,
               **text_kwargs) -> Tensor:
        """Class text features [C, E], unnormalised, from ``clip.encode_text_embeddings(...,
        **text_kwargs)``; cached while ``cache`` and no gradient is recorded, keyed on the
        ``learned`` tensors the features depend on."""
        def compute() -> Tensor:
            return clip.encode_text_embeddings(self.embeddings, clip.text_pool_indices(self.tokens),
                                               **text_kwargs)
        return self._cache.get(learned, self.tokens, compute, active=cache)
