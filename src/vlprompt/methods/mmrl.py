"""MMRL: Multi-Modal Representation Learning for vision-language models (Guo & Gu, CVPR 2025;
``yunncheng/MMRL``), METHODS-SOTA.md §5.

A shared set of K representation tokens R [K, d_r] (N(0, 0.02^2)) is projected into both towers
at the representation blocks (0-based 5..11 at ViT-B/16; released REP_LAYERS 6..12) by
per-block Linear(d_r -> d_v) and Linear(d_r -> d_t). Before the first of them the projected
tokens are *inserted* after CLS / SOS (the core's insert mode: 197 -> 202 image tokens, the text
feature read at EOT + K); before the later ones they replace those K positions. The text prompt
is the dataset's frozen hand-crafted template. Features (all normalised):

    f_c = ln_post(x_0) proj            (CLIP's frozen head on the CLS token)
    f_r = mean_k ln_post(x_k) P_r      (k = 1..K, P_r [d_v, E] a new learnable projection)
    l_c = s f_c t^T,  l_r = s f_r t^T,  l_f = alpha l_c + (1 - alpha) l_r     (s = 100, alpha 0.7)

Loss: ``alpha CE(l_c) + (1 - alpha) CE(l_r) + lambda (1 - mean cos(f_c, f_c^zs))
+ lambda (1 - mean cos(t, t^zs))`` with f_c^zs the frozen unprompted CLIP on the same batch and
t^zs the frozen template features; lambda is per dataset (the configs' ``datasets:`` blocks).

Test head (released ``MMRL.test``): l_f when the classes are the training classes of the dataset
trained on (B2N base, few-shot, the cross-dataset source), l_c otherwise (B2N new, other
datasets, and the ImageNet variants of domain generalisation, whose class lists equal or are
subsets of ImageNet's). ``fusion_on_dg: true`` also uses l_f on those variants (any dataset
whose classes are training classes). Without representation tokens (``n_rep_tokens: 0``) nothing
is inserted, f_r does not exist and every head is l_c: zero-shot CLIP with the template.

Departures from the released code (``trainers/mmrl.py``, ``clip/model_mmrl.py``), with the
setting that restores each where one exists:
- The test head is chosen from the class list (``training_class_index``) and the dataset the
  engine names (``set_dataset``), the training dataset's name checkpointed with the tensors;
  the released trainer reads its config (TASK, SUBSAMPLE_CLASSES, DATASET.NAME). The two agree
  on every released protocol; ``fusion_on_dg`` is the switch for the DG variants.
- Reference semantics are fp32; the released configs use amp (fp16 autocast + GradScaler):
  ``train.precision=fp16``; ``auto`` picks bf16 where the GPU has it. The zero-shot text teacher
  is computed outside autocast, in fp32, as released.
- The text tower runs on the shortest length covering every EOT (+ K); released: all 77 + K
  tokens. Exact (causal mask), not a switch.
- The evaluation text cache is invalidated when the tensors or the class list change (released:
  filled on the first evaluation call, never refreshed). No switch.
- Layer indices are 0-based (``rep_layers: [5, ..., 11]`` = REP_LAYERS [6, ..., 12]); blocks
  beyond the shallower tower (tiny test models) are dropped (logged), the last block kept if
  none remains. ViT-B/16 and L/14 are unaffected.
- ``n_rep_tokens: 0`` is accepted (the reduction above); released code fails on it.
- ``logit_scale: 100.0`` is the released literal; ``null`` uses CLIP's exp(logit_scale).
- Training augmentation: the released configs crop with RandomResizedCrop scale (0.5, 1); the
  packaged configs set ``train.crop_scale: [0.5, 1.0]`` (the engine's default is (0.08, 1)).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..clip.model import CLIP
from ..interop.layout import CUSTOM_CLIP_BACKBONE, OfficialLayout, Rule, Setting
from ._fixed_text import FixedTextPrompts
from .base import VISUAL_PROMPTS, Method, MethodConfig
from .deep_prompts import PROMPT_INIT_STD
from .registry import register_method

logger = logging.getLogger(__name__)

REP_PROJ_INITS = ("random", "copy_proj")


@dataclasses.dataclass
class MMRLConfig(MethodConfig):
    """MMRL settings; defaults = ``configs/trainers/MMRL/vit_b16.yaml`` (lambda per dataset in
    the protocol configs, as ``trainers/config.py`` sets it)."""

    #: K, representation tokens (N_REP_TOKENS); 0 = none (zero-shot CLIP)
    n_rep_tokens: int = 5
    #: d_r, their width (REP_DIM; EuroSAT 2048)
    rep_dim: int = 512
    #: representation blocks, 0-based (REP_LAYERS 6..12): insert before the first, replace after
    rep_layers: list = dataclasses.field(default_factory=lambda: list(range(5, 12)))
    #: alpha, weight of the class head in the fused logits and the loss (ALPHA)
    alpha: float = 0.7
    #: lambda, weight of each consistency term (REG_WEIGHT)
    reg_weight: float = 1.0
    #: P_r's initialisation: "random" (released: d_v^-0.5 N(0, 1)) or "copy_proj" (CLIP's proj)
    rep_proj_init: str = "random"
    #: also use the fused head on other datasets whose classes are training classes (DG)
    fusion_on_dg: bool = False
    #: the logits' scale: 100 as released; null = CLIP's exp(logit_scale)
    logit_scale: Optional[float] = 100.0

    def __post_init__(self) -> None:
        if self.n_rep_tokens < 0 or self.rep_dim < 1:
            raise ValueError(f"mmrl: need n_rep_tokens >= 0 and rep_dim >= 1, got "
                             f"{self.n_rep_tokens} and {self.rep_dim}")
        layers = self.rep_layers
        if (not isinstance(layers, (list, tuple)) or not layers
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                           for i in layers) or len(set(layers)) != len(layers)):
            raise ValueError(f"mmrl: rep_layers must be distinct block indices >= 0, got "
                             f"{layers!r}")
        self.rep_layers = sorted(layers)
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"mmrl: alpha must be in [0, 1], got {self.alpha}")
        if self.reg_weight < 0:
            raise ValueError(f"mmrl: reg_weight must be >= 0, got {self.reg_weight}")
        if self.rep_proj_init not in REP_PROJ_INITS:
            raise ValueError(f"mmrl: rep_proj_init must be one of {', '.join(REP_PROJ_INITS)}, "
                             f"got {self.rep_proj_init!r}")
        if self.logit_scale is not None and not self.logit_scale > 0:
            raise ValueError(f"mmrl: logit_scale must be > 0 or null, got {self.logit_scale}")


class MMRLOutputs(NamedTuple):
    """One forward: the three logits [B, C] and the normalised features they come from."""

    class_logits: Tensor  # l_c
    rep_logits: Tensor  # l_r (= l_c without representation tokens)
    fused_logits: Tensor  # l_f
    image: Tensor  # f_c [B, E]
    text: Tensor  # t [C, E]


def representation_layers(layers: Sequence[int], clip: CLIP) -> list[int]:
    """``layers`` within the shallower tower; when none is, its last block (logged)."""
    count = min(clip.transformer.layers, clip.visual.num_layers)
    kept = [i for i in layers if i < count]
    if len(kept) < len(layers):
        kept = kept or [count - 1]
        logger.warning("mmrl: representation blocks %s exceed the towers (%d shared blocks); "
                       "using %s", list(layers), count, kept)
    return kept


def _cloned_linears(width_in: int, width_out: int, count: int,
                    device: torch.device) -> nn.ModuleList:
    """``count`` Linears (one per representation block, in block order), all starting from the
    same default-initialised weights (released: ``copy.deepcopy`` of a single Linear)."""
    first = nn.Linear(width_in, width_out, device=device)
    layers = nn.ModuleList()
    for _ in range(count):
        layer = nn.Linear(width_in, width_out, device=device)
        layer.load_state_dict(first.state_dict())
        layers.append(layer)
    return layers


@register_method
class MMRL(Method):
    """Learnable: ``rep_tokens`` R [K, d_r]; for the j-th representation block
    (``rep_layers[j]``) ``to_vision.<j>`` Linear(d_r, d_v) and ``to_text.<j>`` Linear(d_r, d_t),
    numbered as released (``compound_rep_tokens_r2vproj.<j>``); ``rep_proj`` P_r [d_v, E]."""

    name = "mmrl"
    #: representation tokens are inserted after CLS / SOT and read next to CLS
    requires = frozenset({VISUAL_PROMPTS, "class_token", "text_start_token"})
    description = "MMRL: shared representation tokens inserted into both towers (CVPR 2025)"
    Config = MMRLConfig
    #: the released trainer registers its whole CustomCLIP (cast to CLIP's dtype: fp32 under amp)
    official_layout = OfficialLayout(
        repo="yunncheng/MMRL", source="trainers/mmrl.py", trainer="MMRL",
        models=("MultiModalRepresentationLearner",),
        rules=(Rule("representation_learner.compound_rep_tokens", "rep_tokens"),
               Rule("representation_learner.compound_rep_tokens_r2vproj.{i}.", "to_vision.{i}."),
               Rule("representation_learner.compound_rep_tokens_r2tproj.{i}.", "to_text.{i}."),
               Rule("image_encoder.proj_rep", "rep_proj")),
        config={"TRAINER.MMRL.N_REP_TOKENS": "n_rep_tokens", "TRAINER.MMRL.REP_DIM": "rep_dim",
                "TRAINER.MMRL.REP_LAYERS": Setting("rep_layers", offset=-1),
                "TRAINER.MMRL.ALPHA": "alpha", "TRAINER.MMRL.REG_WEIGHT": "reg_weight"},
        shapes={"n_rep_tokens": ("rep_tokens", "dim0"), "rep_dim": ("rep_tokens", "dim1")},
        backbone=CUSTOM_CLIP_BACKBONE, ignored=("prompt_embeddings",),
        keep=("source_dataset",))

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: Optional[MMRLConfig] = None,
                 template: Optional[str] = None):
        super().__init__(clip, classnames, config, template)
        cfg, device = self.config, self.device
        self.layers = representation_layers(cfg.rep_layers, clip)
        dv, e = clip.vision_width, clip.embed_dim
        if cfg.rep_proj_init == "copy_proj":
            rep_proj = clip.visual.proj.detach().clone().float()
        else:
            rep_proj = dv ** -0.5 * torch.randn(dv, e, device=device)
        self.rep_proj = nn.Parameter(rep_proj)  # [d_v, E]
        self.rep_tokens = nn.Parameter(
            torch.randn(cfg.n_rep_tokens, cfg.rep_dim, device=device) * PROMPT_INIT_STD)
        self.to_vision = _cloned_linears(cfg.rep_dim, dv, len(self.layers), device)
        self.to_text = _cloned_linears(cfg.rep_dim, clip.text_width, len(self.layers), device)
        self.prompts = FixedTextPrompts(clip, self.classnames, self.template)
        self.register_buffer("zero_shot_text", None, persistent=False)
        self.source_dataset: Optional[str] = None  # the dataset trained on (checkpointed)
        self.dataset: Optional[str] = None  # the dataset the current classes come from

    # ------------------------------------------------------------------ engine seams
    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = [c.replace("_", " ") for c in classnames]
        self.prompts.set_classnames(self.clip, self.classnames)
        self.zero_shot_text = None

    def set_dataset(self, dataset: str) -> None:
        """The dataset the current classes come from; the first one named to a method not loaded
        from a checkpoint is the one it trains on."""
        self.dataset = dataset
        if self.source_dataset is None:
            self.source_dataset = dataset

    def extra_state_tensors(self) -> dict[str, Tensor]:
        name = (self.source_dataset or "").encode("utf-8")
        return {"source_dataset": torch.tensor(list(name), dtype=torch.uint8)}

    def load_extra_state_tensors(self, state: dict[str, Tensor]) -> None:
        name = bytes(state["source_dataset"].to("cpu", torch.uint8).tolist()).decode("utf-8")
        self.source_dataset = name or None

    # ------------------------------------------------------------------ features
    def representation_prompts(self, tower: nn.ModuleList) -> Optional[dict[int, Tensor]]:
        """{block: projected R [K, d]} for the core's ``inserted_prompts``; None when K = 0."""
        if self.config.n_rep_tokens == 0:
            return None
        return {block: tower[j](self.rep_tokens) for j, block in enumerate(self.layers)}

    def text_features(self) -> Tensor:
        """Class text features [C, E] with the inserted tokens, unnormalised (cached in eval)."""
        learned = [self.rep_tokens, *self.to_text.parameters()]
        return self.prompts.encode(self.clip, learned, cache=not self.training,
                                   inserted_prompts=self.representation_prompts(self.to_text))

    def image_features(self, images: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """(f_c [B, E], f_r [B, E] or None without tokens), unnormalised."""
        inserted = self.representation_prompts(self.to_vision)
        if inserted is None:
            return self.clip.encode_image(images), None
        states: list[Tensor] = []
        f_c = self.clip.encode_image(images, inserted_prompts=inserted, hidden_states=states)
        k = self.config.n_rep_tokens
        reps = self.clip.visual.ln_post(states[-1][:, 1:1 + k])  # [B, K, d_v]
        return f_c, reps.mean(dim=1) @ self.rep_proj.to(reps.dtype)

    def _scale(self) -> Union[float, Tensor]:
        s = self.config.logit_scale
        return self.clip.logit_scale.exp() if s is None else s

    def outputs(self, images: Tensor) -> MMRLOutputs:
        """The three heads and the normalised features of one forward."""
        f_c, f_r = self.image_features(images)
        f_c = F.normalize(f_c, dim=-1)
        t = F.normalize(self.text_features(), dim=-1)
        scale = self._scale()
        class_logits = scale * f_c @ t.t()
        if f_r is None:
            return MMRLOutputs(class_logits, class_logits, class_logits, f_c, t)
        rep_logits = scale * F.normalize(f_r, dim=-1) @ t.t()
        alpha = self.config.alpha
        fused = alpha * class_logits + (1 - alpha) * rep_logits
        return MMRLOutputs(class_logits, rep_logits, fused, f_c, t)

    def uses_fused_head(self) -> bool:
        """The released test-head rule: l_f on the training classes of the training dataset
        (with ``fusion_on_dg``: on training classes of any dataset), else l_c."""
        if self.config.fusion_on_dg:
            return self.training_class_index() is not None
        same_dataset = None in (self.source_dataset, self.dataset) or \
            self.dataset == self.source_dataset
        return same_dataset and self.classnames == self.training_classnames

    def forward(self, images: Tensor) -> Tensor:
        out = self.outputs(images)
        return out.fused_logits if self.uses_fused_head() else out.class_logits

    # ------------------------------------------------------------------ loss
    def zero_shot_text_features(self) -> Tensor:
        """t^zs [C, E]: normalised frozen template features of the current classes, in fp32."""
        if self.zero_shot_text is None:
            tp = self.prompts
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                t = self.clip.encode_text_embeddings(tp.embeddings,
                                                     self.clip.text_pool_indices(tp.tokens))
            self.zero_shot_text = F.normalize(t.to(torch.promote_types(t.dtype, torch.float32)),
                                              dim=-1)
        return self.zero_shot_text

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        out = self.outputs(images)
        with torch.no_grad():
            image_zs = F.normalize(self.clip.encode_image(images), dim=-1)  # [B, E]
        alpha, lam = self.config.alpha, self.config.reg_weight
        ce_c = F.cross_entropy(out.class_logits, labels)
        ce_r = F.cross_entropy(out.rep_logits, labels)
        reg_image = 1 - F.cosine_similarity(out.image, image_zs.to(out.image.dtype)).mean()
        text_zs = self.zero_shot_text_features().to(out.text.dtype)
        reg_text = 1 - F.cosine_similarity(out.text, text_zs).mean()
        loss = alpha * ce_c + (1 - alpha) * ce_r + lam * reg_image + lam * reg_text
        parts = {"ce_class": ce_c, "ce_rep": ce_r, "reg_image": reg_image, "reg_text": reg_text}
        return loss, {k: float(v.detach()) for k, v in parts.items()}
