"""CoPrompt: Consistency-guided Prompt learning (Roy & Etemad, ICLR 2024), METHODS-SOTA.md §3.

MaPLe's coupled prompts (``CoPrompt`` subclasses ``MaPLe``: same tensors, same placement), plus
two feature adapters used at training and test time,
``v' = norm(a_v·A_v(v) + (1−a_v)·v)``, ``t' = norm(a_t·A_t(t) + (1−a_t)·t)`` (a_v 0.1, a_t 0.2;
A = Linear(E→E/4, no bias) + ReLU + Linear(E/4→E, no bias) + ReLU, PyTorch's default init),
logits ``100·v'·t'ᵀ``, and a consistency loss towards the frozen CLIP:

    L = CE(logits(x₁), y) + λ·[(1 − mean_c cos(t'_c, d_r,c)) + (1 − mean_b cos(v'_b, z_b))]

d_r [C, E] = the normalised frozen features of the r-th LLM description of every class (one r per
step, shared by the classes), z = normalised frozen image features of a *second* augmented view
x₂ of the same image (``train_views`` 2, ``train_augment`` "resize_randaugment": Resize((S, S)) +
Dassl RandAugment(2, 10), no crop or flip). ``distill: mse`` replaces each (1 − cos) by the MSE
of the normalised features. λ, depth and n_ctx are per dataset (``configs/coprompt/*.yaml``).

The descriptions are read from ``descriptions`` (or ``$VLPROMPT_DESCRIPTIONS``) in the official
format (``vlprompt.data.descriptions``) for ``description_dataset`` or, when empty, the run's
dataset (the engine calls ``set_dataset``); they are needed by ``loss`` only, so evaluation on
other datasets needs none.

Departures from the released code (ShuvenduRoy/CoPrompt@a2a6c12e36 ``trainers/coprompt.py``),
with the switch that restores each where one exists:

* reference semantics are fp32; released: fp16 CLIP, prompts and adapters (``train.precision``);
* widths come from the backbone (released: 512/768 literals; equal at ViT-B/16);
* the description index r is drawn from a generator keyed on (a seed drawn from the run's torch
  RNG at construction, the number of training ``loss`` calls so far), checkpointed with the
  tensors: the same uniform draw as the released Python ``random.randint``, but exact on resume
  and the same on every process. With ``train.grad_accum`` k > 1 each chunk draws its own r
  (released: one per step; k = 1, the default, is the released behaviour);
* an input with one view (``[B, 3, S, S]``, e.g. ``train_views: 1`` or a library caller) is
  also the teacher's view;
* the per-dataset table of ``trainers/constants.py`` is the default through the configs'
  ``datasets:`` blocks; a dataset outside it gets the yaml's W = 1.0, as released;
* class-name matching of the description files and long descriptions: see
  ``vlprompt.data.descriptions``.
The released trainer registers the whole model (frozen CLIPs included) with the optimiser, and
computes unused hand-crafted text features; neither changes the result.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..clip.model import CLIP
from ..data.descriptions import description_features, load_descriptions
from ..data.transforms import AUGMENTATIONS
from .maple import MaPLe, MaPLeConfig
from .registry import register_method

DISTILL = ("cosine", "mse")


@dataclasses.dataclass
class CoPromptConfig(MaPLeConfig):
    """CoPrompt settings; defaults = ``configs/trainers/coprompt.yaml`` (n 2, depth 9, W 1.0);
    the per-dataset values (``trainers/constants.py``) come from the packaged configs."""

    #: λ, weight of the two consistency terms (``TRAINER.W``)
    consistency_weight: float = 1.0
    #: consistency measure (``TRAINER.DISTILL``): "cosine" or "mse"
    distill: str = "cosine"
    #: mixing weights of the adapted features (released ``image_adapter_m``/``text_adapter_m``)
    image_adapter_mix: float = 0.1
    text_adapter_mix: float = 0.2
    #: adapter bottleneck: E -> E // reduction -> E
    adapter_reduction: int = 4
    #: training views per image (``DATALOADER.K_TRANSFORMS``): view 0 trains, view 1 is the
    #: frozen image teacher's input; 1 = the teacher sees the training view
    views: int = 2
    #: training augmentation of every view: "resize_randaugment" (released) or "standard"
    augment: str = "resize_randaugment"
    #: folder (or file) of the LLM descriptions, official ``gpt_file`` format; empty:
    #: ``$VLPROMPT_DESCRIPTIONS``
    descriptions: str = ""
    #: whose descriptions; empty: the run's dataset
    description_dataset: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.distill not in DISTILL:
            raise ValueError(f"coprompt: distill must be cosine or mse, got {self.distill!r}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"coprompt: augment must be one of {', '.join(AUGMENTATIONS)}, "
                             f"got {self.augment!r}")
        if self.views not in (1, 2):
            raise ValueError(f"coprompt: views must be 1 or 2, got {self.views}")
        if self.consistency_weight < 0:
            raise ValueError(f"coprompt: consistency_weight must be >= 0, got "
                             f"{self.consistency_weight}")
        for name in ("image_adapter_mix", "text_adapter_mix"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"coprompt: {name} must be in [0, 1], got {getattr(self, name)}")
        if self.adapter_reduction < 1:
            raise ValueError(f"coprompt: adapter_reduction must be >= 1, got "
                             f"{self.adapter_reduction}")


class FeatureAdapter(nn.Module):
    """Linear(E -> E/r, no bias) + ReLU + Linear(E/r -> E, no bias) + ReLU (CLIP-Adapter's
    block, as released): ``fc[0].weight`` [E/r, E], ``fc[2].weight`` [E, E/r]."""

    def __init__(self, width: int, reduction: int, device: Optional[torch.device] = None):
        super().__init__()
        hidden = max(1, width // reduction)
        self.fc = nn.Sequential(nn.Linear(width, hidden, bias=False, device=device), nn.ReLU(),
                                nn.Linear(hidden, width, bias=False, device=device), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


def _mix_normalize(adapter: FeatureAdapter, x: Tensor, mix: float) -> Tensor:
    """``norm(mix·A(x) + (1−mix)·x)``."""
    return F.normalize(mix * adapter(x) + (1.0 - mix) * x, dim=-1)


@register_method
class CoPrompt(MaPLe):
    """Learnable: MaPLe's ``prompts`` (see ``MaPLe``), ``image_adapter`` and ``text_adapter``
    (``FeatureAdapter`` on E). Frozen, non-persistent: ``description_bank`` [n_desc, C, E].
    Checkpointed extra state: ``description_draws`` = (seed, draws so far), int64."""

    name = "coprompt"
    description = ("CoPrompt: MaPLe + feature adapters + consistency to frozen CLIP on LLM "
                   "descriptions and a second view (ICLR 2024)")
    Config = CoPromptConfig
    #: the official trainer registers its whole CustomCLIP as "MultiModalPromptLearner": MaPLe's
    #: prompt-learner keys plus ``adapter_image``/``adapter_text`` and the frozen CLIPs
    #: (``image_encoder``, ``text_encoder`` and the teacher ``model_distill``, checked against the
    #: backbone); ``description_draws`` is vlprompt's own (ShuvenduRoy/CoPrompt@a2a6c12e36)
    official_layout = dataclasses.replace(
        MaPLe.official_layout, repo="ShuvenduRoy/CoPrompt", source="trainers/coprompt.py",
        trainer="CoPrompt",
        rules=MaPLe.official_layout.rules + tuple(
            dataclasses.replace(MaPLe.official_layout.rules[1], official=theirs, ours=ours)
            for theirs, ours in (("adapter_image.", "image_adapter."),
                                 ("adapter_text.", "text_adapter."))),
        config={"TRAINER.CoPrompt.N_CTX": "n_ctx", "TRAINER.CoPrompt.CTX_INIT": "ctx_init",
                "TRAINER.CoPrompt.PROMPT_DEPTH": "depth", "TRAINER.W": "consistency_weight",
                "TRAINER.DISTILL": "distill"},
        backbone={"model_distill.": "", **MaPLe.official_layout.backbone},
        keep=("description_draws",))

    def __init__(self, clip: CLIP, classnames: Sequence[str],
                 config: Optional[CoPromptConfig] = None, template: Optional[str] = None):
        super().__init__(clip, classnames, config, template)
        cfg, device = self.config, clip.logit_scale.device
        self.image_adapter = FeatureAdapter(clip.embed_dim, cfg.adapter_reduction, device)
        self.text_adapter = FeatureAdapter(clip.embed_dim, cfg.adapter_reduction, device)
        self.register_buffer("description_bank", None, persistent=False)
        self.dataset: Optional[str] = None
        # the description draw's seed follows the run's seed (the engine seeds torch first)
        seed = int(torch.randint(0, 2 ** 62, ()).item())
        self._draws = torch.tensor([seed, 0], dtype=torch.int64)
        self.last_description_index: Optional[int] = None

    # ------------------------------------------------------------------ engine seams
    @property
    def train_views(self) -> int:
        return self.config.views

    @property
    def train_augment(self) -> str:
        return self.config.augment

    def set_dataset(self, dataset: str) -> None:
        """The dataset the current classes come from (whose descriptions ``loss`` reads)."""
        if dataset != self.dataset:
            self.dataset = dataset
            self.description_bank = None

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.description_bank = None

    def extra_state_tensors(self) -> dict[str, Tensor]:
        return {"description_draws": self._draws.clone()}

    def load_extra_state_tensors(self, state: dict[str, Tensor]) -> None:
        self._draws = state["description_draws"].detach().to("cpu", torch.int64).clone()

    # ------------------------------------------------------------------ features
    def features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Adapted, normalised (image [B, E], class text [C, E]) features."""
        cfg = self.config
        text = self.cached_class_features(lambda: self.prompts.encode_text(self.clip))  # [C, E]
        image = self.prompts.encode_image(self.clip, images)  # [B, E]
        return (_mix_normalize(self.image_adapter, image, cfg.image_adapter_mix),
                _mix_normalize(self.text_adapter, text, cfg.text_adapter_mix))

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() == 5:
            images = images[:, 0]  # [B, V, 3, S, S]: the training view
        image, text = self.features(images)
        return self.clip.add_logit_bias(self.clip.logit_scale.exp() * image @ text.t())  # [B, C]

    def descriptions(self) -> Tensor:
        """Normalised frozen description features of the current classes [n_desc, C, E]."""
        if self.description_bank is None:
            dataset = self.config.description_dataset or self.dataset
            if not dataset:
                raise ValueError("coprompt: which dataset's LLM descriptions? The engine names "
                                 "it; otherwise set the config field description_dataset")
            texts = load_descriptions(self.config.descriptions or None, dataset, self.classnames)
            self.description_bank = description_features(self.clip, texts, "per_description")
        return self.description_bank

    def description_index(self, count: int) -> int:
        """The row of the description bank this step uses; a training pass advances the draw."""
        seed, draws = (int(v) for v in self._draws)
        key = (seed * 6364136223846793005 + draws * 1442695040888963407 + 1) % (2 ** 63 - 1)
        index = int(torch.randint(count, (), generator=torch.Generator().manual_seed(key)))
        if self.training and torch.is_grad_enabled():
            self._draws[1] += 1
        self.last_description_index = index
        return index

    # ------------------------------------------------------------------ loss
    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        student, teacher = _views(images)
        image, text = self.features(student)
        logits = self.clip.add_logit_bias(self.clip.logit_scale.exp() * image @ text.t())
        ce = F.cross_entropy(logits, labels)
        bank = self.descriptions()
        target_text = bank[self.description_index(bank.shape[0])].to(text.dtype)  # [C, E]
        with torch.no_grad():
            target_image = F.normalize(self.clip.encode_image(teacher), dim=-1).to(image.dtype)
        if self.config.distill == "cosine":
            text_term = 1.0 - F.cosine_similarity(text, target_text, dim=-1, eps=1e-7).mean()
            image_term = 1.0 - F.cosine_similarity(image, target_image, dim=-1, eps=1e-7).mean()
        else:
            text_term = F.mse_loss(text, target_text)
            image_term = F.mse_loss(image, target_image)
        total = ce + self.config.consistency_weight * (text_term + image_term)
        return total, {"ce": float(ce.detach()), "text": float(text_term.detach()),
                       "image": float(image_term.detach())}


def _views(images: Tensor) -> tuple[Tensor, Tensor]:
    """(training view, teacher view) of ``[B, V, 3, S, S]``; one view ``[B, 3, S, S]`` serves as
    both."""
    if images.dim() == 4:
        return images, images
    if images.dim() == 5:
        return images[:, 0], images[:, 1 if images.shape[1] > 1 else 0]
    raise ValueError(f"coprompt: expected images [B, 3, S, S] or [B, V, 3, S, S], got "
                     f"{tuple(images.shape)}")
