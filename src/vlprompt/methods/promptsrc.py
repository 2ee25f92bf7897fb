"""PromptSRC: Self-regulating Prompts (Khattak et al., ICCV 2023), METHODS.md §6.7, §10.

IVLP's independent deep prompts (4 text tokens from "a photo of a", 4 vision tokens, depth 9 in
both towers) trained with three self-regularising terms on top of cross-entropy:

* ``25 * L1(norm(prompted text feats), norm(teacher text feats))`` — the teacher is the
  unnormalised mean over 60 templates of ``encode_text``, normalised afterwards;
* ``10 * L1(norm(prompted image feat), norm(frozen image feat))``;
* ``KL(p_zero-shot || p_prompted)`` at temperature 1, summed and divided by ``logits.numel()``,
  where the zero-shot logits pair the frozen image feature with the teacher text features.

Gaussian prompt aggregation (GPA): after epoch e (1-based) the prompts are added to a running sum
with weight g(e) proportional to N(e; mu, sigma^2), normalised over the epochs of the run; the sum
replaces the prompts when training ends (``on_train_end``). The sum is checkpointed through
``extra_state_tensors`` so resumed runs aggregate the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..clip.model import CLIP
from ..clip.templates import PROMPTSRC_TEMPLATES
from ..interop.layout import CUSTOM_CLIP_BACKBONE, OfficialLayout
from .base import Features
from .ivlp import IVLP, VPT_SHALLOW_RULES, IVLPConfig
from .prompts import hand_crafted_text_features
from .registry import register_method

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PromptSRCConfig(IVLPConfig):
    """PromptSRC settings; defaults = ``PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml``
    (base-to-new). Cross-dataset: depth 3, gpa_mean 6, gpa_std 10; few-shot: see configs."""

    n_ctx_text: int = 4
    n_ctx_vision: int = 4
    depth_text: int = 9
    depth_vision: int = 9
    text_loss_weight: float = 25.0
    image_loss_weight: float = 10.0
    kl_weight: float = 1.0
    #: GPA: mean and std (in epochs, 1-based) of the Gaussian epoch weights
    gpa_mean: float = 15.0
    gpa_std: float = 1.0
    #: templates of the frozen text teacher; None = PromptSRC's 60
    #: (``clip.templates.PROMPTSRC_TEMPLATES``)
    teacher_templates: Optional[list[str]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.depth_vision < 1:
            raise ValueError(f"promptsrc: depth_vision must be >= 1, got {self.depth_vision}")
        for name in ("text_loss_weight", "image_loss_weight", "kl_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"promptsrc: {name} must be >= 0, got {getattr(self, name)}")
        if not self.gpa_std > 0:
            raise ValueError(f"promptsrc: gpa_std must be > 0, got {self.gpa_std}")
        if self.teacher_templates is not None:
            if isinstance(self.teacher_templates, str) or not self.teacher_templates:
                raise ValueError("promptsrc: teacher_templates must be a non-empty list of "
                                 "templates such as ['a photo of a {}.'] "
                                 "(or null for the default 60)")
            bad = [t for t in self.teacher_templates if "{}" not in t]
            if bad:
                raise ValueError(f"promptsrc: teacher templates need a '{{}}' for the class "
                                 f"name: {bad[:3]}")
            self.teacher_templates = list(self.teacher_templates)


def gpa_weights(max_epochs: int, mean: float, std: float) -> list[float]:
    """Normalised Gaussian weights of epochs 1..max_epochs (computed in log space, so a mean far
    outside the run still gives finite weights that sum to 1)."""
    logs = [-0.5 * ((e - mean) / std) ** 2 for e in range(1, max_epochs + 1)]
    top = max(logs)
    w = [math.exp(v - top) for v in logs]
    total = sum(w)
    return [v / total for v in w]


def _buffer_name(param_name: str) -> str:
    return "gpa_sum__" + param_name.replace(".", "__")


@register_method
class PromptSRC(IVLP):
    """IVLP prompts + self-regulating losses + GPA. Teacher text features [C, E] are a
    non-persistent buffer computed once per class list on first use; the GPA running sums are
    non-persistent buffers exported by ``extra_state_tensors`` as ``gpa.<param>`` and
    ``gpa.epochs``."""

    name = "promptsrc"
    description = "PromptSRC: self-regulating independent V-L prompts with GPA (ICCV 2023)"
    Config = PromptSRCConfig
    #: checkpoint layout of the official trainer (IVLP's, plus the frozen zero-shot image tower
    #: ``ZS_image_encoder``); the saved prompts are the GPA aggregate, so it fills ``gpa.*``
    official_layout = OfficialLayout(
        repo="muzairkhattak/PromptSRC", source="trainers/promptsrc.py", trainer="PromptSRC",
        models=("VLPromptLearner",),
        rules=VPT_SHALLOW_RULES,
        config={"TRAINER.PROMPTSRC.N_CTX_TEXT": "n_ctx_text",
                "TRAINER.PROMPTSRC.N_CTX_VISION": "n_ctx_vision",
                "TRAINER.PROMPTSRC.CTX_INIT": "ctx_init",
                "TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT": "depth_text",
                "TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION": "depth_vision",
                "TRAINER.PROMPTSRC.TEXT_LOSS_WEIGHT": "text_loss_weight",
                "TRAINER.PROMPTSRC.IMAGE_LOSS_WEIGHT": "image_loss_weight",
                "TRAINER.PROMPTSRC.GPA_MEAN": "gpa_mean", "TRAINER.PROMPTSRC.GPA_STD": "gpa_std"},
        shapes={"n_ctx_text": ("text.ctx", "dim0"), "n_ctx_vision": ("vision.shallow", "dim0"),
                "depth_text": (("text.ctx", "text.deep.prompts"), "layers"),
                "depth_vision": (("vision.shallow", "vision.deep.prompts"), "layers")},
        backbone={"prompt_learner.ZS_image_encoder.": "visual.", **CUSTOM_CLIP_BACKBONE},
        tokens="prompt_learner.", text_prompts="text.text", fill=("gpa",))

    def __init__(self, clip: CLIP, classnames: Sequence[str],
                 config: Optional[PromptSRCConfig] = None, template: Optional[str] = None):
        super().__init__(clip, classnames, config, template)
        self.register_buffer("teacher_features", None, persistent=False)
        for name, p in self.named_trainable_parameters().items():
            self.register_buffer(_buffer_name(name), torch.zeros_like(p.detach()), persistent=False)
        self.register_buffer("gpa_epochs", torch.zeros(1, dtype=torch.long), persistent=False)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.teacher_features = None

    # ------------------------------------------------------------------ teacher
    def teacher_templates(self) -> list[str]:
        """The configured teacher templates, or PromptSRC's 60."""
        return list(self.config.teacher_templates or PROMPTSRC_TEMPLATES)

    def teacher_text_features(self) -> Tensor:
        """Normalised mean over the teacher templates of the frozen text features [C, E]."""
        if self.teacher_features is None:
            self.teacher_features = hand_crafted_text_features(
                self.clip, self.classnames, self.teacher_templates(), normalize_each=False)
        return self.teacher_features

    # ------------------------------------------------------------------ loss
    def forward_features(self, images: Tensor) -> Features:
        """Raw prompted image [B, E] and text [C, E] features and their logits."""
        text = self.cached_class_features(self.text_features)  # [C, E]
        image = self.image_features(images)  # [B, E]
        return Features(image, text, self.logits(image, text))

    def extra_loss_terms(self, images: Tensor, labels: Tensor, features: Features
                         ) -> tuple[list[Tensor], dict[str, float]]:
        """The weighted text L1, image L1 and KL terms and their unweighted parts."""
        return self._regularisers(images, F.normalize(features.text, dim=-1),
                                  F.normalize(features.image, dim=-1), features.logits)

    def _regularisers(self, images: Tensor, text: Tensor, image: Tensor, logits: Tensor
                      ) -> tuple[list[Tensor], dict[str, float]]:
        """The self-regulating terms from normalised text [C, E] and image [B, E] features and
        the logits [B, C]."""
        cfg = self.config
        scale = self.clip.logit_scale.exp()
        teacher_text = self.teacher_text_features().to(text.dtype)
        with torch.no_grad():
            zs_image = F.normalize(self.clip.encode_image(images), dim=-1).to(image.dtype)
            zs_logits = scale * zs_image @ teacher_text.t()
        l_text = F.l1_loss(text, teacher_text)
        l_image = F.l1_loss(image, zs_image)
        kl = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(zs_logits, dim=1),
                      reduction="sum", log_target=True) / logits.numel()
        terms = [cfg.text_loss_weight * l_text, cfg.image_loss_weight * l_image,
                 cfg.kl_weight * kl]
        return terms, {"l1_text": float(l_text.detach()), "l1_image": float(l_image.detach()),
                       "kl": float(kl.detach())}

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        # normalised once, shared by the logits and the terms (``extra_loss_terms`` normalises
        # again: same values, gradients equal up to rounding)
        text = F.normalize(self.text_features(), dim=-1)  # [C, E]
        image = F.normalize(self.image_features(images), dim=-1)  # [B, E]
        logits = self.clip.add_logit_bias(self.clip.logit_scale.exp() * image @ text.t())  # [B, C]
        ce = F.cross_entropy(logits, labels)
        terms, parts = self._regularisers(images, text, image, logits)
        total = ce
        for term in terms:
            total = total + term
        return total, {"ce": float(ce.detach()), **parts}

    # ------------------------------------------------------------------ GPA
    def _gpa_names(self) -> list[str]:
        return list(self.named_trainable_parameters())

    def on_epoch_end(self, epoch: int, max_epochs: int) -> None:
        """Add this epoch's prompts to the running sum with its Gaussian weight."""
        if not 0 <= epoch < max_epochs:
            raise ValueError(f"promptsrc: epoch {epoch} outside 0..{max_epochs - 1}")
        weight = gpa_weights(max_epochs, self.config.gpa_mean, self.config.gpa_std)[epoch]
        with torch.no_grad():
            for name, p in self.named_trainable_parameters().items():
                getattr(self, _buffer_name(name)).add_(p.detach(), alpha=weight)
            self.gpa_epochs += 1

    def on_train_end(self) -> None:
        """Replace the prompts by the Gaussian-weighted aggregate (if any epoch was aggregated)."""
        if int(self.gpa_epochs) == 0:
            logger.warning("promptsrc: no epoch was aggregated; keeping the last prompts")
            return
        with torch.no_grad():
            for name, p in self.named_trainable_parameters().items():
                p.copy_(getattr(self, _buffer_name(name)))
        logger.info("promptsrc: loaded the GPA aggregate of %d epochs", int(self.gpa_epochs))

    def extra_state_tensors(self) -> dict[str, Tensor]:
        state = {f"gpa.{name}": getattr(self, _buffer_name(name)).detach().clone()
                 for name in self._gpa_names()}
        state["gpa.epochs"] = self.gpa_epochs.detach().clone()
        return state

    def load_extra_state_tensors(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name in self._gpa_names():
                getattr(self, _buffer_name(name)).copy_(state[f"gpa.{name}"])
            self.gpa_epochs.copy_(state["gpa.epochs"])
