"""CLIP-LoRA: low-rank adaptation of CLIP's attention for few-shot classification (Zanella &
Ben Ayed, CVPRW 2024; ``MaxZanella/CLIP-LoRA``), METHODS-SOTA.md §8.

Implemented from the specification only (the official repository has no licence). Every
attention block of both towers gets LoRA deltas on its q, k and v projections:
``q = W_q x + b_q + s * B_q A_q drop(x)``, r = 2, alpha = 1, s = alpha / sqrt(r), dropout 0.25 on
the delta's input, A kaiming_uniform(a=sqrt(5)), B zeros (so training starts at zero-shot CLIP).
The text prompt is "a photo of a {}." for every dataset; text features go through the adapted
text tower at every training step (cached in evaluation). Logits 100 cos(v, t); loss CE. The
deltas are the method's modules (``clip/lora.py``): the frozen CLIP is never written.

Optimisation (configs, not this module): AdamW lr 2e-4, wd 1e-2, betas (0.9, 0.999), cosine per
iteration over 500 x shots iterations to 1e-6, no warmup, batch 32.

Departures from the released code, per the specification (each with its switch):
- The few-shot images are vlprompt's (Dassl-equal) subsets, not the released sampler's (its own
  Python ``random`` draw), so the same seed selects other images. No switch.
- Evaluation can merge the deltas, ``(W + s B A) x`` (``merge: true``): equal up to rounding;
  off by default, so evaluation computes exactly what training does (the unmerged deltas).
- The released code keeps fp32 copies of the split q/k/v projections while the rest of CLIP runs
  in fp16; vlprompt computes the deltas in the tokens' dtype (fp32 reference semantics). Its
  fp16 autocast + GradScaler is ``train.precision=fp16``; ``auto`` picks bf16 where available.
- The released per-backbone position tables (which blocks to adapt) are not in the spec: only
  ``layers: null`` (every block, the released default "all") or an explicit list of blocks.
- Base-to-new / cross-dataset runs are vlprompt protocols, not the paper's (few-shot only).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..clip.lora import LORA_B_INITS, LORA_SCALINGS, LORA_TARGETS, LoRAStack
from ..clip.model import CLIP, Transformer
from ._fixed_text import FixedTextPrompts
from .base import VISUAL_PROMPTS, Method, MethodConfig
from .registry import register_method

ENCODERS = ("both", "text", "vision")


@dataclasses.dataclass
class CLIPLoRAConfig(MethodConfig):
    """CLIP-LoRA settings; defaults = the released command-line defaults (METHODS-SOTA.md §8)."""

    #: the prompt for every dataset; "dataset" = the dataset's hand-crafted template
    prompt_template: str = "a photo of a {}."
    #: towers to adapt: both, text or vision
    encoder: str = "both"
    #: 0-based blocks to adapt in each adapted tower (indices beyond a tower's depth are skipped
    #: for that tower); None = every block (position "all")
    layers: Optional[list] = None
    #: projections to adapt: a subset of q, k, v, out (stored as a list)
    params: Sequence[str] = ("q", "k", "v")
    #: LoRA rank r (0 = no deltas: zero-shot CLIP)
    r: int = 2
    alpha: float = 1.0
    #: "alpha/sqrt(r)" (released) or "alpha/r" (the original LoRA)
    scaling: str = "alpha/sqrt(r)"
    #: dropout on the deltas' input
    dropout: float = 0.25
    #: B's initialisation: "zeros" (released) or "kaiming" (a non-zero delta from step 0)
    init_b: str = "zeros"
    #: evaluate with merged weights W + s B A (equal up to rounding)
    merge: bool = False

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"clip_lora: encoder must be one of {', '.join(ENCODERS)}, "
                             f"got {self.encoder!r}")
        self.params = [str(p) for p in self.params]  # a list, as it comes back from JSON/YAML
        if not self.params or set(self.params) - set(LORA_TARGETS):
            raise ValueError(f"clip_lora: params must be a non-empty subset of "
                             f"{list(LORA_TARGETS)}, got {self.params}")
        if self.r < 0:
            raise ValueError(f"clip_lora: r must be >= 0, got {self.r}")
        if self.scaling not in LORA_SCALINGS:
            raise ValueError(f"clip_lora: scaling must be one of {', '.join(LORA_SCALINGS)}, "
                             f"got {self.scaling!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"clip_lora: dropout must be in [0, 1), got {self.dropout}")
        if self.init_b not in LORA_B_INITS:
            raise ValueError(f"clip_lora: init_b must be one of {', '.join(LORA_B_INITS)}, "
                             f"got {self.init_b!r}")
        if self.layers is not None:
            if (not isinstance(self.layers, (list, tuple))
                    or not all(isinstance(i, int) and i >= 0 for i in self.layers)):
                raise ValueError(f"clip_lora: layers must be a list of 0-based block indices or "
                                 f"null, got {self.layers!r}")
            self.layers = list(self.layers)


@register_method
class CLIPLoRA(Method):
    """Learnable: ``text_lora.blocks.<i>.<q|k|v>.{A [r, Dt], B [Dt, r]}`` and the same for
    ``vision_lora`` with Dv (absent for a tower ``encoder`` leaves frozen, or with r = 0)."""

    name = "clip_lora"
    requires = frozenset({VISUAL_PROMPTS})
    description = "CLIP-LoRA: low-rank deltas on q/k/v of every attention block (CVPRW 2024)"
    Config = CLIPLoRAConfig

    def __init__(self, clip: CLIP, classnames: Sequence[str],
                 config: Optional[CLIPLoRAConfig] = None, template: Optional[str] = None):
        super().__init__(clip, classnames, config, template)
        self.text_lora = self._stack(clip.transformer, "text")
        self.vision_lora = self._stack(clip.visual.transformer, "vision")
        cfg = self.config
        template = self.template if cfg.prompt_template == "dataset" else cfg.prompt_template
        self.prompts = FixedTextPrompts(clip, self.classnames, template)

    def _stack(self, transformer: Transformer, tower: str) -> Optional[LoRAStack]:
        cfg = self.config
        if cfg.r == 0 or cfg.encoder not in ("both", tower):
            return None
        layers = (None if cfg.layers is None
                  else [i for i in cfg.layers if int(i) < transformer.layers])
        return LoRAStack(transformer, cfg.params, cfg.r, cfg.alpha, cfg.scaling, cfg.dropout,
                         layers, cfg.init_b, cfg.merge)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = [c.replace("_", " ") for c in classnames]
        self.prompts.set_classnames(self.clip, self.classnames)

    def text_features(self) -> Tensor:
        """Class text features [C, E] through the adapted text tower (cached in evaluation;
        with the text tower frozen, cached always)."""
        if self.text_lora is None:
            with torch.no_grad():
                return self.prompts.encode(self.clip, [])
        return self.prompts.encode(self.clip, list(self.text_lora.parameters()),
                                   cache=not self.training, attn_deltas=self.text_lora.as_dict())

    def image_features(self, images: Tensor) -> Tensor:
        """Image features [B, E] through the adapted vision tower."""
        deltas = self.vision_lora.as_dict() if self.vision_lora is not None else None
        return self.clip.encode_image(images, attn_deltas=deltas)

    def forward(self, images: Tensor) -> Tensor:
        return self.logits(self.image_features(images), self.text_features())
