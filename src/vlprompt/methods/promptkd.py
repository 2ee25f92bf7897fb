"""PromptKD: unsupervised prompt distillation for vision-language models (Li et al., CVPR 2024;
``zhengli97/PromptKD``), METHODS-SOTA.md §9. **Transductive**: it trains on the unlabeled train
images of *all* classes (base and new), so its numbers are reported apart from inductive methods.

Stage 1, the teacher, is a PromptSRC run of vlprompt on a larger backbone (the paper: ViT-L/14,
``configs/promptkd/teacher.yaml``). ``teacher: auto`` makes the chain one run: the engine trains
(or reuses) the teacher in ``<run>/teacher/`` on the same dataset, classes, shots and seed, then
distils the student (``Method.teacher_recipe``); ``teacher: <run folder>`` uses a finished one.

Stage 2, the student (this method, on the run's backbone, ViT-B/16 in the paper): IVLP-style
vision-only prompts (4 tokens, depth 9, N(0, 0.02^2); appended before ``ln_pre``, replacing the
last 4 tokens before blocks 1..8) and a projector Phi = Linear(E, E_T) - BatchNorm1d(E_T) - ReLU -
Linear(E_T, E_T) (the released 1x1 convolutions on [B, E, 1, 1], the same function and
initialisation), E_T the teacher's embedding width. There is no student text tower: the class
embeddings are the teacher's prompted text features t_T [C, E_T] (normalised, computed once per
class list, no gradient). With ``f_s = norm(Phi(E_img(x)))`` and the teacher's
``z_T = s norm(E_img^T(x)) t_T^T`` (s = 100), the student's logits are ``z_S = s f_s t_T^T`` and the
loss ``kd_weight * T^2 * KL(softmax(z_T / T) || softmax(z_S / T)) / (B C)`` (summed KL; labels
unused, the released CE_WEIGHT is 0).

Departures from the released code (``trainers/promptkd.py``), with the setting that restores
each where one exists:
- Model selection: the released config selects the epoch with the best *base test* accuracy
  (``TEST.FINAL_MODEL best_val`` on a val split that its dataset classes map to the base test
  set) and reports the new-class accuracy of that epoch. vlprompt tests the last epoch (the
  default ``train.select: last``); test-set selection is not offered (it is not a valid
  protocol). No switch.
- t_T is computed once per class list (released: every step; exact).
- The student has no text prompts: the released code also builds (and, through its name filter,
  marks trainable) 16,384 text-tower prompt values that never reach the loss; they do not exist
  here. The trainable count is 1,013,760 at ViT-B/16 with a ViT-L/14 teacher, as derived.
- Widths come from the backbones (released: the projector is hard-coded 512 -> 768).
- The teacher is a vlprompt PromptSRC run (its checkpoint format), not the released ``.pth``
  files; ``vlprompt import`` reads official PromptSRC checkpoints into a run folder that
  ``teacher:`` accepts.
- Reference semantics are fp32 (released: fp16): ``train.precision=fp16`` on a GPU.
- Cross-dataset PromptKD (an ImageNet teacher distilled into a student per target dataset, on
  each target's unlabeled train split) is not a plan the ``xd`` protocol makes; only base-to-new
  (and ``vlprompt train`` on any dataset) is packaged.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import ClassVar, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..clip.model import CLIP
from .base import VISUAL_PROMPTS, Method, MethodConfig
from .deep_prompts import VisionPrompts
from .registry import register_method

logger = logging.getLogger(__name__)

#: the packaged teacher settings (PromptKD's PromptSRC ViT-L/14 config)
TEACHER_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "promptkd" / "teacher.yaml"


class TeacherRecipe(NamedTuple):
    """A run the engine must finish before this method trains (``Method.teacher_recipe``)."""

    method: str
    backbone: str
    config_file: Optional[str]
    overrides: tuple[str, ...]


@dataclasses.dataclass
class PromptKDConfig(MethodConfig):
    """PromptKD settings; defaults = ``configs/trainers/PromptKD/vit_b16_c2_ep20_batch8_4+4ctx``."""

    #: "auto" (the engine trains the teacher in ``<run>/teacher/`` first) or the folder of a
    #: finished vlprompt run of the teacher method
    teacher: str = "auto"
    #: the teacher method and backbone of ``teacher: auto`` (paper: PromptSRC on ViT-L/14)
    teacher_method: str = "promptsrc"
    teacher_backbone: str = "ViT-L/14"
    #: ``key=value`` overrides for the teacher run, after ``configs/promptkd/teacher.yaml``
    teacher_overrides: list = dataclasses.field(default_factory=list)
    n_ctx_vision: int = 4
    #: prompted vision blocks (block 0's tokens appended, blocks 1..depth-1 replaced)
    depth: int = 9
    kd_weight: float = 1000.0
    temperature: float = 1.0
    #: the logits' scale (released: CLIP's exp(logit_scale) = 100 for both models)
    logit_scale: float = 100.0

    def __post_init__(self) -> None:
        if not self.teacher:
            raise ValueError("promptkd: teacher must be 'auto' or a run folder")
        if self.n_ctx_vision < 1 or self.depth < 1:
            raise ValueError(f"promptkd: n_ctx_vision and depth must be >= 1, got "
                             f"{self.n_ctx_vision} and {self.depth}")
        if not self.temperature > 0 or not self.logit_scale > 0 or self.kd_weight < 0:
            raise ValueError("promptkd: temperature and logit_scale must be > 0, kd_weight >= 0")
        if not all(isinstance(o, str) and "=" in o for o in self.teacher_overrides):
            raise ValueError(f"promptkd: teacher_overrides must be key=value strings, got "
                             f"{self.teacher_overrides!r}")


def projector(width_in: int, width_out: int, device: torch.device) -> nn.Sequential:
    """Phi: Linear - BatchNorm1d - ReLU - Linear (the released 1x1 convolutions)."""
    return nn.Sequential(nn.Linear(width_in, width_out, device=device),
                         nn.BatchNorm1d(width_out, device=device), nn.ReLU(),
                         nn.Linear(width_out, width_out, device=device))


@register_method
class PromptKD(Method):
    """Learnable: ``vision.shallow`` [4, Dv], ``vision.deep.prompts`` [depth-1, 4, Dv] and the
    projector ``project`` (its BatchNorm statistics are checkpointed with them). The teacher
    (a trained method on its own frozen backbone) is held frozen, outside the module tree, and
    never saved: the checkpoint's config names its run folder."""

    name = "promptkd"
    requires = frozenset({VISUAL_PROMPTS})
    description = ("PromptKD: a PromptSRC teacher distilled into vision prompts on unlabeled "
                   "images (CVPR 2024)")
    Config = PromptKDConfig
    transductive: ClassVar[bool] = True

    def __init__(self, clip: CLIP, classnames: Sequence[str],
                 config: Optional[PromptKDConfig] = None, template: Optional[str] = None,
                 teacher: Optional[Method] = None):
        """``teacher``: a method object to distil (``vlprompt bench`` gives a random-weight one);
        None (the engine's way): the finished run ``config.teacher`` names."""
        super().__init__(clip, classnames, config, template)
        cfg = self.config
        if teacher is None:
            teacher = self._load_teacher(cfg)
        teacher.requires_grad_(False)
        teacher.eval()
        if teacher.clip.image_size != clip.image_size:
            raise ValueError(f"promptkd: the teacher's backbone takes {teacher.clip.image_size}px "
                             f"images, the student's {clip.image_size}px; use backbones of one "
                             f"input size")
        # outside the module tree (trainability is structural, and the teacher is never saved);
        # ``_apply`` moves and casts it with the method
        self._teacher = [teacher]
        self.vision = VisionPrompts(clip, cfg.n_ctx_vision, cfg.depth)
        self.project = projector(clip.embed_dim, teacher.clip.embed_dim, self.device)
        self.register_buffer("teacher_text", None, persistent=False)

    def _load_teacher(self, cfg: PromptKDConfig) -> Method:
        if cfg.teacher == "auto":
            raise ValueError("promptkd: teacher 'auto' is resolved by the engine ('vlprompt "
                             "train/run'); to build the method directly pass teacher=<run folder>")
        from ..engine.run import load_trained_method  # the teacher is a finished run

        return load_trained_method(cfg.teacher, self.classnames)

    # ------------------------------------------------------------------ engine seams
    @classmethod
    def teacher_recipe(cls, config: dict) -> Optional[TeacherRecipe]:
        """The teacher run of ``teacher: auto`` (``config``: the method fields as resolved)."""
        cfg = cls.Config(**config)
        if cfg.teacher != "auto":
            return None
        return TeacherRecipe(cfg.teacher_method, cfg.teacher_backbone, str(TEACHER_CONFIG),
                             tuple(cfg.teacher_overrides))

    @property
    def teacher(self) -> Method:
        """The frozen teacher: a trained method on its own backbone, always in eval mode."""
        return self._teacher[0]

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if "_teacher" in self.__dict__:  # .to(device) / .float() reach the teacher too
            self.teacher._apply(fn, *args, **kwargs)
        return self

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = [c.replace("_", " ") for c in classnames]
        self.teacher.set_classnames(self.classnames)
        self.teacher_text = None

    def extra_state_tensors(self) -> dict[str, Tensor]:
        """The projector's BatchNorm running statistics (they change the test logits)."""
        return {f"project.{n}": b.detach().clone() for n, b in self.project.named_buffers()}

    def load_extra_state_tensors(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for n, b in self.project.named_buffers():
                b.copy_(state[f"project.{n}"])

    # ------------------------------------------------------------------ features
    def teacher_text_features(self) -> Tensor:
        """t_T [C, E_T]: the teacher's normalised prompted text features of the current classes."""
        if self.teacher_text is None:
            with torch.no_grad():
                t = self.teacher.text_features()
            self.teacher_text = F.normalize(t.float(), dim=-1)
        return self.teacher_text

    def student_features(self, images: Tensor) -> Tensor:
        """f_s [B, E_T], normalised."""
        feats = self.vision.encode(self.clip, images)  # [B, E]
        return F.normalize(self.project(feats.to(self.project[0].weight.dtype)), dim=-1)

    def forward(self, images: Tensor) -> Tensor:
        t = self.teacher_text_features()
        f_s = self.student_features(images)
        return self.config.logit_scale * f_s @ t.to(f_s.dtype).t()

    def teacher_logits(self, images: Tensor) -> Tensor:
        """z_T [B, C]: the frozen teacher's logits on the same images."""
        with torch.no_grad():
            image = F.normalize(self.teacher.image_features(images).float(), dim=-1)
        return self.config.logit_scale * image @ self.teacher_text_features().t()

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The distillation loss; ``labels`` are not used (the training images are unlabeled)."""
        cfg = self.config
        z_s = self(images)  # [B, C]
        z_t = self.teacher_logits(images).to(z_s.dtype)
        temp = cfg.temperature
        kl = F.kl_div(F.log_softmax(z_s / temp, dim=1), F.softmax(z_t / temp, dim=1),
                      reduction="sum") * temp * temp / z_s.numel()
        return cfg.kd_weight * kl, {"kd": float(kl.detach())}
