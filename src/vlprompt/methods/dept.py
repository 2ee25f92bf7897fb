"""DePT — Decoupled Prompt Tuning (Zhang et al., CVPR 2024), METHODS-SOTA.md §4: a composable
add-on on a base prompt-learning method (``base``: coop, cocoop, kgcoop, maple or promptsrc),
re-implemented from the spec text (the release is GPL-2.0 and was not read).

The base method runs unchanged and hands over, from one forward (``Method.forward_features``),
its raw (unnormalised) image features v [B, E], text features t [C, E] (CoCoOp: per image,
[B, C, E]) and its logits s = 100 cos(v, t). DePT adds

* FiLM_v, FiLM_t: channel-wise ``gamma * x + beta`` with gamma [E] = 1, beta [E] = 0 at init;
* a head H = Linear(E -> C_train, bias), PyTorch's default init, over the training classes.

Training: ``L = (1 - lam) CE(s, y) + lam CE(H([FiLM_t(t_y); FiLM_v(v)]), [y; y]) + extra`` with
lam = ``head_weight`` = 0.7, t_y the label's text feature (CoCoOp: t_b[y_b]) and ``extra`` the
base method's own terms (``Method.extra_loss_terms``, e.g. KgCoOp's ``W (1 - mean cos)``).
Test: on the training classes or a subset of them (``Method.training_class_index``: the base
split, ImageNet and its variants for an ImageNet run; A/R keep H's rows of their 200 classes)
``(1 - lam) s + lam H(FiLM_v(v))[:, rows]``; on other classes (new split, other datasets) s.
The head and FiLM train at ``lr_mult`` = 6.5 x the base LR (their own parameter group, the one
schedule: the warmup holds every group at ``warmup_lr``, the cosine starts from each group's LR).

Switches: ``test_time_fusion: false`` scores the training classes with H alone (released
``TEST_TIME_FUSION``); ``head: similarity`` replaces H by cosine logits of the FiLM features
(released ``TYPE``); ``film: false`` drops FiLM (released ``FILM.LINEAR_PROBE``).

Departures from the released code, as the spec describes it (each with its switch):

* Which classes get the fused logits is decided from the class names (every current class is a
  training class), not from the dataset's name (the release fuses on the training list and on
  datasets whose name contains "ImageNet"). The two agree on every protocol except a target
  dataset whose names all happen to be training names; ``fuse_subsets: false`` fuses only on
  the exact training list (the release's rule for every non-ImageNet dataset).
* A training loss on non-training classes (the release never computes one) drops the head term:
  the base method's loss. No switch needed.
* H and FiLM are fp32 parameters at every precision (the release keeps them in CLIP's dtype,
  fp16 under fp16); autocast runs them in half precision on GPU. No switch.
* ``head: similarity`` is read as ``logit_scale.exp() cos(x, FiLM_t(t_c))`` over the current
  classes for the same 2B rows (the spec only names it "cosine logits of the FiLM features");
  [DESIGN].
* PromptSRC + DePT settings are not in the release ([UNKNOWN]): PromptSRC's own base-to-new
  prompt and loss settings with DePT's 10-epoch schedule (GPA's mean 15 then lies past the run,
  so the aggregate is ~the last epoch, DePT's selection rule); GPA aggregates the base's prompts
  only, the head and FiLM keep their last values. Override with ``base_config``.

Base settings: ``base_settings`` holds DePT's setting of each base (its ``configs.py``, spec §4;
where a base is missing, the base's own defaults), ``base_config`` overrides fields of the
selected base last, e.g. ``method.base=maple method.base_config={depth: 3}``. Train settings
cannot follow ``base``: DePT's CoCoOp runs need ``train.lr=0.002 train.batch_size=1`` (see the
configs). Trainable parameters on top of the base's: 4E (FiLM) + (E + 1) C_train (H), i.e.
2,048 + 513 C at ViT-B/16.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..clip.model import CLIP
from .base import Features, Method, MethodConfig
from .registry import get_method, make_config, register_method

#: the base methods DePT wraps (each implements ``forward_features`` and ``extra_loss_terms``)
SUPPORTED_BASES = ("coop", "cocoop", "kgcoop", "maple", "promptsrc")
#: DePT's settings of each base (release ``configs.py``, METHODS-SOTA.md §4); PromptSRC's are
#: unknown, so it keeps its own defaults
DEPT_BASE_SETTINGS: dict[str, dict] = {
    "coop": {"n_ctx": 16, "ctx_init": ""},
    "cocoop": {"n_ctx": 4, "ctx_init": "a photo of a"},
    "kgcoop": {"n_ctx": 4, "ctx_init": "a photo of a", "kg_weight": 2.0},
    "maple": {"n_ctx": 2, "ctx_init": "a photo of a", "depth": 9},
    "promptsrc": {},
}
HEADS = ("linear", "similarity")


@dataclasses.dataclass
class DePTConfig(MethodConfig):
    """DePT settings; defaults = the release's base-to-new settings on CoOp."""

    #: the wrapped method (one of ``SUPPORTED_BASES``)
    base: str = "coop"
    #: DePT's settings per base method (base name -> that method's config fields)
    base_settings: dict = dataclasses.field(
        default_factory=lambda: copy.deepcopy(DEPT_BASE_SETTINGS))
    #: config fields of the selected base, applied after ``base_settings[base]``
    base_config: dict = dataclasses.field(default_factory=dict)
    #: lambda: weight of the head's CE in training and of the head's logits at test
    head_weight: float = 0.7
    #: LR multiplier of the head and FiLM (release ``LR_EXP``)
    lr_mult: float = 6.5
    #: "linear" (H, E -> C_train) or "similarity" (cosine logits of the FiLM features)
    head: str = "linear"
    #: FiLM on the features before the head (false: identity)
    film: bool = True
    #: on the training classes, mix base and head logits (false: the head alone)
    test_time_fusion: bool = True
    #: fuse on any subset of the training classes (false: only on the exact training list)
    fuse_subsets: bool = True

    def __post_init__(self) -> None:
        if self.base not in SUPPORTED_BASES:
            raise ValueError(f"dept: base must be one of {', '.join(SUPPORTED_BASES)}, got "
                             f"{self.base!r}")
        for name in ("base_settings", "base_config"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"dept: {name} must be a mapping, got {getattr(self, name)!r}")
        unknown = sorted(set(self.base_settings) - set(SUPPORTED_BASES))
        if unknown:
            raise ValueError(f"dept: base_settings names unsupported base(s) {unknown}; "
                             f"supported: {', '.join(SUPPORTED_BASES)}")
        for base, fields in self.base_settings.items():
            if not isinstance(fields, dict):
                raise ValueError(f"dept: base_settings.{base} must be a mapping, got {fields!r}")
            if base != self.base:
                make_config(get_method(base), fields)  # a typo fails now, for every base
        self.base_method_config()
        if not 0.0 <= self.head_weight <= 1.0:
            raise ValueError(f"dept: head_weight must be in [0, 1], got {self.head_weight}")
        if not self.lr_mult > 0:
            raise ValueError(f"dept: lr_mult must be > 0, got {self.lr_mult}")
        if self.head not in HEADS:
            raise ValueError(f"dept: head must be linear or similarity, got {self.head!r}")

    def base_fields(self) -> dict:
        """The selected base's config fields: ``base_settings[base]``, then ``base_config``."""
        return {**self.base_settings.get(self.base, {}), **self.base_config}

    def base_method_config(self):
        """The selected base's ``Config`` (validated)."""
        return make_config(get_method(self.base), self.base_fields())


class FiLM(nn.Module):
    """Channel-wise affine transform ``gamma * x + beta``; gamma [E] = 1, beta [E] = 0 at init
    (exactly the identity)."""

    def __init__(self, dim: int, device: Optional[torch.device] = None):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, device=device))
        self.beta = nn.Parameter(torch.zeros(dim, device=device))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma + self.beta


@register_method
class DePT(Method):
    """Learnable: the base method's tensors (``base.*``), ``film_v``/``film_t`` (gamma, beta
    [E] each), ``head`` Linear(E -> C_train). The rows of H that score the current classes are
    the non-persistent buffer ``class_rows`` [C] (None: not all current classes are training
    classes)."""

    name = "dept"
    description = ("DePT: decoupled prompt tuning, FiLM + a linear head on a base method's "
                   "features (CVPR 2024; method.base=coop|cocoop|kgcoop|maple|promptsrc)")
    Config = DePTConfig

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: Optional[DePTConfig] = None,
                 template: Optional[str] = None):
        super().__init__(clip, classnames, config, template)
        cfg = self.config
        # the base first, so it draws the same initial values as on its own with the same seed
        self.base = get_method(cfg.base)(clip, list(classnames), cfg.base_method_config(),
                                         template=template)
        E, device = clip.embed_dim, self.device
        self.film_v = FiLM(E, device) if cfg.film else None
        self.film_t = FiLM(E, device) if cfg.film else None
        self.head = (nn.Linear(E, len(self.training_classnames), device=device)
                     if cfg.head == "linear" else None)
        # rows of H scoring the current classes (a buffer, so it follows ``.to(device)``)
        self.register_buffer("class_rows", self._current_rows(), persistent=False)

    @classmethod
    def template_variant_for(cls, config: Optional[dict] = None) -> str:
        base = (config or {}).get("base") or DePTConfig.base
        return get_method(base).template_variant_for(config)

    @property
    def class_specific(self) -> bool:
        return self.base.class_specific

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.base.set_classnames(classnames)
        self.classnames = list(self.base.classnames)
        self.class_rows = self._current_rows()

    def _current_rows(self) -> Optional[Tensor]:
        rows = self.training_class_index()
        return None if rows is None else torch.tensor(rows, device=self.device)

    # ------------------------------------------------------------------ head
    def _film(self, film: Optional[FiLM], x: Tensor) -> Tensor:
        return x if film is None else film(x)

    def _head(self, x: Tensor, text: Tensor) -> Tensor:
        """Head logits of features x [N, E]: H over the training classes [N, C_train], or
        (similarity) scaled cosines with FiLM_t of the current text features ([C, E], or one
        [C, E] per row: [N, C, E]) -> [N, C]."""
        if self.head is None:
            return self.logits(x, self._film(self.film_t, text))
        return self.head(x.to(self.head.weight.dtype))

    def _fusion_rows(self) -> Optional[Tensor]:
        """Rows of H for the current classes when they get the head's logits, else None."""
        if self.class_rows is None:
            return None
        if not self.config.fuse_subsets and self.classnames != self.training_classnames:
            return None
        return self.class_rows

    def head_loss(self, features: Features, labels: Tensor) -> Optional[Tensor]:
        """``CE(head([FiLM_t(t_y); FiLM_v(v)]), [y; y])`` (2B rows); None when a current class
        is not a training class (the linear head has no row for it)."""
        if self.head is not None and self.class_rows is None:
            return None
        text, B = features.text, labels.shape[0]
        if text.dim() == 3:  # per-image text (CoCoOp): sample b uses t_b[y_b]
            label_text = text[torch.arange(B, device=text.device), labels]  # [B, E]
            row_text = torch.cat([text, text])  # [2B, C, E]
        else:
            label_text, row_text = text[labels], text  # [B, E], [C, E]
        x = torch.cat([self._film(self.film_t, label_text),
                       self._film(self.film_v, features.image)])  # [2B, E]
        target = labels if self.head is None else self.class_rows[labels]  # [B]
        return F.cross_entropy(self._head(x, row_text), torch.cat([target, target]))

    @property
    def frozen_image_tower(self) -> bool:  # type: ignore[override]
        """As its base method's: the heads read only the features the base computes."""
        return self.base.frozen_image_tower

    # ------------------------------------------------------------------ forward / loss
    def forward(self, images: Tensor) -> Tensor:
        features = self.base.forward_features(images)
        rows = self._fusion_rows()
        if rows is None:
            return features.logits
        head = self._head(self._film(self.film_v, features.image), features.text)  # [B, C*]
        if self.head is not None:
            head = head[:, rows]  # [B, C_train] -> [B, C]
        if not self.config.test_time_fusion:
            return head
        lam = self.config.head_weight
        return (1 - lam) * features.logits + lam * head

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        features = self.base.forward_features(images)
        ce = F.cross_entropy(features.logits, labels)
        terms, parts = self.base.extra_loss_terms(images, labels, features)
        head = self.head_loss(features, labels)
        lam = self.config.head_weight
        total = ce if head is None else (1 - lam) * ce + lam * head
        for term in terms:
            total = total + term
        out = {"ce": float(ce.detach())}
        if head is not None:
            out["ce_head"] = float(head.detach())
        return total, {**out, **parts}

    # ------------------------------------------------------------------ engine hooks
    def _own_parameters(self) -> list[nn.Parameter]:
        modules = (self.film_v, self.film_t, self.head)
        return [p for m in modules if m is not None for p in m.parameters()]

    def param_groups(self, lr: float) -> list[dict]:
        """The base's groups at ``lr``, plus the head and FiLM at ``lr * lr_mult``."""
        groups = self.base.param_groups(lr)
        own = self._own_parameters()
        if own:
            groups.append({"params": own, "lr": lr * self.config.lr_mult})
        return groups

    def extra_state_tensors(self) -> dict[str, Tensor]:
        return {f"base.{k}": v for k, v in self.base.extra_state_tensors().items()}

    def load_extra_state_tensors(self, state: dict[str, Tensor]) -> None:
        self.base.load_extra_state_tensors({k[len("base."):]: v for k, v in state.items()})

    def on_epoch_end(self, epoch: int, max_epochs: int) -> None:
        self.base.on_epoch_end(epoch, max_epochs)

    def on_train_end(self) -> None:
        self.base.on_train_end()
