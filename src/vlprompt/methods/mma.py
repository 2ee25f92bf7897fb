"""MMA: Multi-Modal Adapter for vision-language models (Yang et al., CVPR 2024;
``ZjjConan/Multi-Modal-Adapter``), METHODS-SOTA.md §1.

No learnable tokens: the text prompt is the frozen "a photo of a {class}.". In blocks
``adapter_start .. adapter_end`` (0-based, both towers) a bottleneck branch runs parallel to the
block: it reads the block input x through the block's own frozen ``ln_1`` and is added after
the MLP residual (the core's post-block hook),

    out = block(x) + s * U(S(D(ln_1(x))))

with tower-specific D = Linear(d -> 32) + ReLU and U = Linear(32 -> d), and S = Linear(32 -> 32)
+ ReLU shared by the two towers at block i (its gradient sums both). s = ``adapter_scale``
= 0.001. Weights kaiming_normal(fan_out, relu), biases 0. Logits 100 cos(v, t); loss CE.

Gradient rescaling (``grad_rescale``, released behaviour, default): the branch is wrapped as
``grad_scale(., 1/s)`` at its output and ``grad_scale(x, s)`` at its input, so x receives the
exact gradient of ``s * A(.)`` while the adapter parameters receive 1/s = 1000 x their exact
gradient. ``grad_rescale=False`` is plain autograd (needs a ~1000x larger LR to match).

Departures from the released code (each with the setting that restores it):
- The evaluation text-feature cache is invalidated when the adapters or the class list change;
  the released code fills it on the first evaluation call and never refreshes it (only matters
  when one model is evaluated, trained further and evaluated again, or on other classes).
  No switch: the released value is only correct in the case the cache reproduces.
- The slot-0 adapter (on the token embeddings / after ``ln_pre``) is not implemented; it is off
  in every released config (ADAPTER_START 5), so ``adapter_start >= 0`` covers them all.
- Layer indices are 0-based: ``adapter_start: 4, adapter_end: 11`` = ADAPTER_START 5 /
  ADAPTER_END 12. On towers shallower than the range (tiny test models) the range is capped at
  the shallower tower's last block (logged); ViT-B/16 and L/14 are unaffected.
- Under fp16 the released adapters are cast ``.half()``; the shipped configs use amp (fp32
  adapters), which is what vlprompt does at every precision. The released amp is fp16 autocast
  with a GradScaler; vlprompt's ``train.precision: auto`` picks bf16 where the GPU has it
  (``train.precision=fp16`` restores fp16 + GradScaler).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..clip.model import CLIP, grad_scale
from ..interop.layout import OfficialLayout, Rule, Setting
from ._fixed_text import FixedTextPrompts
from .base import VISUAL_PROMPTS, Method, MethodConfig
from .registry import register_method

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class MMAConfig(MethodConfig):
    """MMA settings; defaults = ``MultiModalAdapter/vit_b16_ep5.yaml``."""

    #: the frozen prompt (TEXT_CTX_INIT "a photo of a" + " {class}."); "dataset" = the dataset's
    #: hand-crafted template
    prompt_template: str = "a photo of a {}."
    #: first and last adapted block, 0-based and inclusive (released 1-based: 5 and 12)
    adapter_start: int = 4
    adapter_end: int = 11
    #: bottleneck width (ADAPTER_DIM)
    adapter_dim: int = 32
    #: s, the branch's output scale (ADAPTER_SCALE)
    adapter_scale: float = 0.001
    #: released gradient rescaling: adapter parameters get 1/s x their exact gradient
    grad_rescale: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.adapter_start <= self.adapter_end:
            raise ValueError(f"mma: need 0 <= adapter_start <= adapter_end, got "
                             f"{self.adapter_start} and {self.adapter_end}")
        if self.adapter_dim < 1:
            raise ValueError(f"mma: adapter_dim must be >= 1, got {self.adapter_dim}")
        if self.grad_rescale and self.adapter_scale == 0:
            raise ValueError("mma: grad_rescale divides the gradient by adapter_scale; "
                             "use grad_rescale=false with adapter_scale=0")


class Bottleneck(nn.Module):
    """A tower's adapter at one block: ``down`` = Linear(d -> h) + ReLU, ``up`` = Linear(h -> d)."""

    def __init__(self, width: int, hidden: int, device: Optional[torch.device] = None):
        super().__init__()
        self.down = nn.Sequential(nn.Linear(width, hidden, device=device), nn.ReLU())
        self.up = nn.Linear(hidden, width, device=device)


def _kaiming_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)


def adapter_layers(start: int, end: int, clip: CLIP) -> list[int]:
    """Blocks ``start..end`` capped at the shallower tower's last block (logged when capped)."""
    last = min(clip.transformer.layers, clip.visual.num_layers) - 1
    if end > last:
        capped = (min(start, last), last)
        logger.warning("mma: adapter blocks %d..%d exceed the towers (last shared block %d); "
                       "using %d..%d", start, end, last, *capped)
        start, end = capped
    return list(range(start, end + 1))


@register_method
class MMA(Method):
    """Learnable, per adapted block i: ``text.<i>`` Bottleneck(Dt, h), ``vision.<i>``
    Bottleneck(Dv, h), ``shared.<i>`` Linear(h, h) + ReLU."""

    name = "mma"
    requires = frozenset({VISUAL_PROMPTS})
    description = "MMA: multi-modal adapters with a shared projection (CVPR 2024)"
    Config = MMAConfig
    #: the official ``AdapterLearner`` holds ModuleLists indexed 1..12 (slot 0 = the token
    #: embedding adapter, off): slot i = block i-1. Its fixed prompt buffers ``token_embedding``
    #: [C, 77, Dt] and ``tokenized_prompts`` [C, 77] are deleted by the official load_model.
    official_layout = OfficialLayout(
        repo="ZjjConan/Multi-Modal-Adapter", source="trainers/mmadapter.py",
        trainer="MultiModalAdapter", models=("adapter_learner",),
        rules=(Rule("text_adapter.{i}.", "text.{i}.", offset=-1),
               Rule("visual_adapter.{i}.", "vision.{i}.", offset=-1),
               Rule("shared_adapter.{i}.", "shared.{i}.", offset=-1)),
        config={"TRAINER.MMADAPTER.ADAPTER_START": Setting("adapter_start", offset=-1),
                "TRAINER.MMADAPTER.ADAPTER_END": Setting("adapter_end", offset=-1),
                "TRAINER.MMADAPTER.ADAPTER_DIM": "adapter_dim",
                "TRAINER.MMADAPTER.ADAPTER_SCALE": "adapter_scale",
                "TRAINER.MMADAPTER.TEXT_CTX_INIT": Setting("prompt_template", suffix=" {}.")},
        shapes={"adapter_start": ("text.*.up.weight", "first"),
                "adapter_end": ("text.*.up.weight", "last"),
                "adapter_dim": ("shared.*.0.weight", "dim0")},
        ignored=("token_embedding", "tokenized_prompts"))

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: Optional[MMAConfig] = None,
                 template: Optional[str] = None):
        super().__init__(clip, classnames, config, template)
        cfg = self.config
        device, h = self.device, cfg.adapter_dim
        layers = adapter_layers(cfg.adapter_start, cfg.adapter_end, clip)
        self.text = nn.ModuleDict({str(i): Bottleneck(clip.text_width, h, device) for i in layers})
        self.vision = nn.ModuleDict(
            {str(i): Bottleneck(clip.vision_width, h, device) for i in layers})
        self.shared = nn.ModuleDict(
            {str(i): nn.Sequential(nn.Linear(h, h, device=device), nn.ReLU()) for i in layers})
        for part in (self.text, self.vision, self.shared):
            _kaiming_init(part)
        template = self.template if cfg.prompt_template == "dataset" else cfg.prompt_template
        self.prompts = FixedTextPrompts(clip, self.classnames, template)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = [c.replace("_", " ") for c in classnames]
        self.prompts.set_classnames(self.clip, self.classnames)

    # ------------------------------------------------------------------ the branch
    def branch(self, x: Tensor, block: nn.Module, adapter: Bottleneck, shared: nn.Module) -> Tensor:
        """``s * U(S(D(ln_1(x))))`` for block input x [N, T, D], with the released gradient
        rescaling when ``grad_rescale``."""
        s = self.config.adapter_scale
        if self.config.grad_rescale:
            x = grad_scale(x, s)
        h = block.ln_1(x).to(adapter.up.weight.dtype)  # fp32 adapters on a reduced-precision CLIP
        y = (adapter.up(shared(adapter.down(h))) * s).to(x.dtype)  # [N, T, D]
        return grad_scale(y, 1.0 / s) if self.config.grad_rescale else y

    def _post_hook(self, adapters: nn.ModuleDict):
        def post_hook(i: int, x_in: Tensor, x_out: Tensor, block: nn.Module) -> Tensor:
            key = str(i)
            if key not in adapters:
                return x_out
            return x_out + self.branch(x_in, block, adapters[key], self.shared[key])
        return post_hook

    # ------------------------------------------------------------------ features
    def text_features(self) -> Tensor:
        """Adapted class text features [C, E], unnormalised (cached in evaluation)."""
        learned = [p for part in (self.text, self.shared) for p in part.parameters()]
        return self.prompts.encode(self.clip, learned, cache=not self.training,
                                   post_hook=self._post_hook(self.text))

    def image_features(self, images: Tensor) -> Tensor:
        """Adapted image features [B, E], unnormalised."""
        return self.clip.encode_image(images, post_hook=self._post_hook(self.vision))

    def forward(self, images: Tensor) -> Tensor:
        return self.logits(self.image_features(images), self.text_features())
