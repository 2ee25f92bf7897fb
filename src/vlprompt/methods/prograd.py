"""ProGrad — Prompt-aligned Gradient (Zhu et al., ICCV 2023, "Prompt-aligned Gradient for Prompt
Tuning"; ``BeierZhu/Prompt-align`` ``ProGrad.public/trainers/prograd.py`` and
``Dassl.ProGrad.pytorch/dassl/engine/trainer.py prograd_backward_and_update``).

CoOp (16 context vectors) trained on cross-entropy only, but each step's gradient is first
aligned with the zero-shot CLIP's knowledge (METHODS-SOTA.md §7): with
``L_ce = CE(z, y)`` and ``L_kd = mean_b sum_c -softmax(z_zs / T)_c log softmax(z / T)_c T^2``
(z the prompted logits, z_zs = 100 cos(v, t_hc) the zero-shot logits of the hand-crafted template),
per parameter tensor ``g_d = dL_ce`` and ``g_g = dL_kd``; when they conflict (cos < 0) the step
uses ``g_d - lambda (g_d . g_g/|g_g|) g_g/|g_g|``, otherwise ``g_d``. ``L_kd`` is never added to
the loss. The engine computes both gradients over the whole optimiser batch (all chunks and
processes, unscaled) before the projection (``Method.combines_gradients``).

Context initialisation (``ctx_from_template``, the released ``CTX_INIT: True``): the template's
words before ``{}`` (w of them) become the last w context vectors, the first 16 - w are zeros; the
prompt text is ``"X" * (16 - w) + words + " {class}."``, so tokens of the words beyond the w-th
(BPE splits "pet," in two) stay fixed after the context. The released code takes the template from
its own per-dataset table (``a type of pet, a photo of a {}.``, ...); vlprompt's configs set it per
dataset (``template``); left empty, the dataset's CoOp template is used.

Departures from the released code (each with the switch that restores it):

* Zero gradient norms: the released projection divides by ``|g_g|`` and ``|g_d|`` unguarded (a NaN
  step when either is zero); here a zero ``g_g`` or ``g_d`` means no projection. No switch (the
  released behaviour is a NaN).
* Precision: the zero-shot teacher shares the student's frozen image features (one image pass;
  the released code runs a second, fp32 CLIP beside an fp16 student without loss scaling).
  Identical in fp32 (vlprompt's reference precision); under autocast the teacher sees the
  autocast image features and the engine's fp16 loss scale is removed before the projection
  (``train.precision=fp32`` gives the released teacher and an fp32 student). The released
  ``amp`` mode cannot run ProGrad (its loss is a tuple there).
* Text after ``{}`` other than the final "." is dropped from the learned prompt (the released
  prompt is always ``prefix + class + "."``; its own templates never have such text); the teacher
  keeps the whole template. No switch needed for the released templates.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..clip.model import CLIP
from ..interop.layout import OfficialLayout, Rule
from .coop import CoOp
from .prompts import TextPrompts, hand_crafted_text_features
from .registry import register_method


@dataclasses.dataclass
class ProGradConfig(CoOp.Config):
    """ProGrad settings; defaults = the released ``rn50*.yaml`` + ``prograd.sh`` (16 context
    vectors, class at the end, shared context, initialised from the template, lambda 1, T 1)."""

    n_ctx: int = 16
    #: initialise the context from ``template``'s words, left-padded with zeros (``CTX_INIT:
    #: True``); false: CoOp's rule (``ctx_init`` words, or N(0, 0.02^2) when empty)
    ctx_from_template: bool = True
    #: the hand-crafted template of the teacher and of the initialisation ("{}" = class name);
    #: empty: the dataset's template
    template: str = ""
    #: strength lambda of the projection (``LOSS.LAMBDA``; README: 0.8 for 8/16 shots on
    #: Flowers102, DTD, EuroSAT)
    prograd_lambda: float = 1.0
    #: distillation temperature T (``LOSS.T``)
    temperature: float = 1.0
    #: project conflicting gradients; false trains plain CoOp (the reduction)
    projection: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ctx_from_template and self.ctx_init:
            raise ValueError("prograd: set ctx_init only with ctx_from_template=false (the "
                             "context is initialised from the template)")
        if self.template and "{}" not in self.template:
            raise ValueError(f"prograd: template must contain '{{}}', got {self.template!r}")
        if self.prograd_lambda < 0:
            raise ValueError(f"prograd: prograd_lambda must be >= 0, got {self.prograd_lambda}")
        if self.temperature <= 0:
            raise ValueError(f"prograd: temperature must be > 0, got {self.temperature}")


def project_gradient(g_d: Tensor, g_g: Tensor, lam: float) -> Tensor:
    """ProGrad's update for one tensor: ``g_d`` minus ``lam`` times its component along ``g_g``
    when the two point apart (negative cosine), else ``g_d``. No host sync (``torch.where``)."""
    unit = g_g / g_g.norm().clamp_min(torch.finfo(g_g.dtype).tiny)  # 0 when g_g == 0
    along = torch.dot(g_d.flatten(), unit.flatten())  # sign of cos(g_d, g_g); 0 when either is 0
    return g_d - torch.where(along < 0, lam * along, torch.zeros_like(along)) * unit


def template_context(clip: CLIP, template: str, n_ctx: int) -> tuple[str, Tensor]:
    """The released ``CTX_INIT`` rule: (prompt prefix, initial context [n_ctx, D]).

    The template's w words before ``{}`` fill the last w context slots with the embeddings of
    their first w tokens; the first n_ctx - w slots are zeros and read "X" in the prompt text."""
    words = template.split("{}")[0].strip()
    w = len(words.split())
    if w > n_ctx:
        raise ValueError(f"prograd: the template {template!r} has {w} words before '{{}}', more "
                         f"than n_ctx={n_ctx}; raise n_ctx or set ctx_from_template=false")
    ctx = torch.zeros(n_ctx, clip.text_width)
    if w:
        tokens = clip.tokenizer.tokenize([words], clip.context_length)
        s = clip.prompt_start
        with torch.no_grad():
            ctx[n_ctx - w:] = clip.embed_tokens(tokens.to(clip.logit_scale.device))[
                0, s: s + w].float().cpu()
    prefix = " ".join(["X"] * (n_ctx - w) + ([words] if w else []))
    return prefix, ctx


@register_method
class ProGrad(CoOp):
    """CoOp's ``ctx`` [M, D]; the zero-shot teacher ``teacher_features`` [C, E] is a
    non-persistent buffer computed once per class list."""

    name = "prograd"
    description = ("ProGrad: CoOp whose gradient is projected off the zero-shot CLIP's "
                   "conflicting direction (ICCV 2023)")
    Config = ProGradConfig
    #: the official trainer registers CoOp's ``PromptLearner`` (``ctx``, token buffers) itself;
    #: its Dassl fork saves no ``val_result``. The zero-shot teacher is not saved.
    official_layout = OfficialLayout(
        repo="BeierZhu/Prompt-align", source="ProGrad.public/trainers/prograd.py",
        trainer="ProGrad", models=("prompt_learner",), rules=(Rule("ctx", "ctx"),),
        config={"TRAINER.COOP.N_CTX": "n_ctx", "TRAINER.COOP.CTX_INIT": "ctx_from_template",
                "TRAINER.COOP.CLASS_TOKEN_POSITION": "class_token_position",
                "TRAINER.COOP.CSC": "csc", "LOSS.LAMBDA": "prograd_lambda",
                "LOSS.T": "temperature"},
        shapes={"n_ctx": ("ctx", "dim-2"), "csc": ("ctx", "ndim3")}, text_prompts="prompts")

    def __init__(self, clip: CLIP, classnames: Sequence[str],
                 config: Optional[ProGradConfig] = None, template: Optional[str] = None):
        super().__init__(clip, classnames, config, template)
        cfg = self.config
        self.prograd_template = cfg.template or self.template
        if cfg.ctx_from_template:
            prefix, ctx = template_context(clip, self.prograd_template, cfg.n_ctx)
            self.prompts = TextPrompts(clip, self.classnames, cfg.n_ctx, ctx_init=prefix,
                                       class_position=cfg.class_token_position)
            with torch.no_grad():
                self.ctx.copy_(ctx.to(self.ctx.device).expand_as(self.ctx))
        self.register_buffer("teacher_features", None, persistent=False)

    @property
    def combines_gradients(self) -> bool:  # type: ignore[override]
        return bool(self.config.projection)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.teacher_features = None

    def zero_shot_features(self) -> Tensor:
        """Frozen normalised teacher text features [C, E] of ``prograd_template`` (fp32)."""
        if self.teacher_features is None:
            with torch.autocast(self.device.type, enabled=False):
                self.teacher_features = hand_crafted_text_features(
                    self.clip, self.classnames, [self.prograd_template])
        return self.teacher_features

    def loss_terms(self, images: Tensor, labels: Tensor
                   ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """{"ce": L_ce, "kd": L_kd} (the gradients ``combine_gradients`` projects) and parts."""
        image = self.frozen_image_features(images).float()  # [B, E]
        logits = self.logits(image, self.text_features().float())  # [B, C]
        with torch.no_grad():
            teacher = self.logits(image, self.zero_shot_features())  # [B, C]
        T = self.config.temperature
        ce = F.cross_entropy(logits, labels)
        soft = F.softmax(teacher / T, dim=-1)
        kd = (-soft * F.log_softmax(logits / T, dim=-1)).sum(-1).mean() * T * T
        acc = (logits.argmax(dim=-1) == labels).float().mean()
        return {"ce": ce, "kd": kd}, {"ce": float(ce.detach()), "kd": float(kd.detach()),
                                      "acc": 100.0 * float(acc)}

    def combine_gradients(self, grads: dict[str, list[Tensor]]) -> list[Tensor]:
        lam = self.config.prograd_lambda
        return [project_gradient(d, g, lam) for d, g in zip(grads["ce"], grads["kd"])]

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The objective, CE (what ProGrad minimises; ``L_kd`` only steers its gradient, through
        ``combine_gradients``), with the ``kd`` part when projecting."""
        if not self.config.projection:
            return super().loss(images, labels)
        terms, parts = self.loss_terms(images, labels)
        return terms["ce"], parts
