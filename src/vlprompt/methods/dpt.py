"""DPT: Dual Modality Prompt Tuning with Class-Aware Visual Prompts (Xing et al., IEEE TMM 2023;
``fanrena/DPT trainers/DPT.py``), METHODS.md §2 and §10.

Three learnable parts:

* a CoOp text context (16 random vectors, class token at the end);
* VPT-deep tokens for the lower vision blocks (10 per block): appended after the block's input
  tokens and dropped after it, at every block (not carried to the next one). As in the official
  code they join *after* ``ln_pre`` also at block 0;
* a class-aware visual prompt generator (CAVPT) for the top ``cavpt_depth`` blocks (the script's
  ``BOTTOMLIMIT 12`` = the last block of ViT-B: ``cavpt_depth = layers - BOTTOMLIMIT + 1``). For each
  image, the frozen zero-shot CLIP picks its top-K classes with the dataset's hand-crafted
  template; the learned (unnormalised) text features of those classes, through a Linear, are the
  K queries of a single-head cross-attention over the block's detached input tokens plus 10
  learnable key/value tokens. ``LN2(attention output + query)`` are the block's K prompts; an
  auxiliary classifier on ``LN(attention output)`` is trained to recognise the slot's class.

Loss: in the first ``guidance_epochs`` epochs (0-based epoch < C) CE on ``logits1`` (frozen image x
learned text) + CE on ``logits2`` (prompted image x frozen template text) + 0.1 CE on the logits;
afterwards CE on the logits alone. Plus ``aux_weight`` x CE of the auxiliary classifiers over the
(image, slot) pairs whose selected class is the label (none: no term).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..clip.model import CLIP
from ..interop.layout import OfficialLayout, Rule
from .base import VISUAL_PROMPTS, Method, MethodConfig
from .deep_prompts import PROMPT_INIT_STD
from .prompts import FrozenFeatureCache, TextPrompts, hand_crafted_text_features
from .registry import register_method

logger = logging.getLogger(__name__)
#: the official CAVPT generator's registered model name (``fanrena/DPT trainers/DPT.py``)
_EXTRACTOR = "image_encoder.transformer.extractor"


@dataclasses.dataclass
class DPTConfig(MethodConfig):
    """DPT settings; defaults = ``fanrena/DPT train_single.sh`` (+ ``vit_b32_deep.yaml``)."""

    #: CoOp context length (``TRAINER.COOP.N_CTX``)
    n_ctx_text: int = 16
    #: words initialising the text context; empty = random N(0, 0.02^2) (the script's setting)
    ctx_init: str = ""
    #: VPT tokens per vision block (``TRAINER.VPT.N_CTX``)
    n_ctx_vision: int = 10
    #: number of top vision blocks with CAVPT prompts instead of VPT tokens
    #: (``layers - BOTTOMLIMIT + 1``; the script's BOTTOMLIMIT 12 gives 1); 0 = DPT without CAVPT
    #: (the official ``VLP`` trainer). Capped at the number of vision blocks.
    cavpt_depth: int = 1
    #: classes selected by zero-shot CLIP per image = CAVPT prompts per block
    #: (``SELECTED_COVPT.CPN``; clipped to the number of classes)
    top_k: int = 10
    #: learnable key/value tokens of each CAVPT attention (hard-coded 10 in the code)
    n_kv_tokens: int = 10
    #: width of the CAVPT query/key projections (hard-coded 32 in the code)
    attn_dim: int = 32
    #: "general knowledge guidance" epochs C (``PRETRAIN.C``)
    guidance_epochs: int = 30
    #: weight of the guidance-stage CE on the prompted logits (0.1 in the code)
    guidance_main_weight: float = 0.1
    #: weight alpha of the CAVPT auxiliary loss (``TRAINER.ALPHA``)
    aux_weight: float = 0.3
    #: learning rate of the text context (fixed to 0.002 in the code, whatever ``OPTIM.LR``)
    text_lr: float = 0.002
    #: warmup epochs of the text context's schedule (1 in the code); the visual prompts use
    #: ``train.warmup_epoch``
    text_warmup_epoch: int = 1

    def __post_init__(self) -> None:
        for name in ("n_ctx_text", "n_ctx_vision", "top_k", "n_kv_tokens", "attn_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"dpt: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("cavpt_depth", "guidance_epochs", "text_warmup_epoch"):
            if getattr(self, name) < 0:
                raise ValueError(f"dpt: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("guidance_main_weight", "aux_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"dpt: {name} must be >= 0, got {getattr(self, name)}")
        if not self.text_lr > 0:
            raise ValueError(f"dpt: text_lr must be > 0, got {self.text_lr}")


class CAVPTLayer(nn.Module):
    """The class-aware prompt generator of one vision block (its auxiliary classifier lives in
    ``DPT.aux_classifiers``, since it depends on the class list).

    ``meta_net`` Linear(E -> Dv) maps the selected classes' text features to queries;
    ``q_proj``/``k_proj`` Linear(Dv -> a, no bias); ``v_out`` Linear(Dv -> Dv, no bias) applied
    after the attention (values are the raw key tokens); ``kv_tokens`` [n_kv, Dv]; ``ln`` feeds the
    auxiliary classifier, ``ln2`` gives the prompts.
    """

    def __init__(self, embed_dim: int, width: int, n_kv_tokens: int, attn_dim: int,
                 device: Optional[torch.device] = None):
        super().__init__()
        self.meta_net = nn.Linear(embed_dim, width, device=device)
        self.q_proj = nn.Linear(width, attn_dim, bias=False, device=device)
        self.k_proj = nn.Linear(width, attn_dim, bias=False, device=device)
        self.v_out = nn.Linear(width, width, bias=False, device=device)
        self.kv_tokens = nn.Parameter(
            torch.randn(n_kv_tokens, width, device=device) * PROMPT_INIT_STD)
        self.ln = nn.LayerNorm(width, device=device)
        self.ln2 = nn.LayerNorm(width, device=device)

    def forward(self, tokens: Tensor, class_text: Tensor) -> tuple[Tensor, Tensor]:
        """tokens [B, T, Dv] (the block's input, detached here), class_text [B, K, E] ->
        (prompts [B, K, Dv], classifier input [B, K, Dv])."""
        dtype = self.v_out.weight.dtype
        kv = torch.cat([tokens.detach().to(dtype),
                        self.kv_tokens.unsqueeze(0).expand(tokens.shape[0], -1, -1)],
                       dim=1)  # [B, T + n_kv, Dv]
        queries = self.meta_net(class_text.to(dtype))  # [B, K, Dv]
        q, k = self.q_proj(queries), self.k_proj(kv)  # [B, K, a], [B, T + n_kv, a]
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        out = self.v_out(attn @ kv)  # [B, K, Dv]
        return self.ln2(out + queries), self.ln(out)


@register_method
class DPT(Method):
    """Learnable: ``ctx`` [M, Dt] (text), ``vpt`` [L - cavpt_depth, n, Dv] (VPT tokens of the
    lower blocks), ``cavpt`` (one ``CAVPTLayer`` per top block) and ``aux_classifiers``
    (Linear(Dv -> C, no bias) per CAVPT block). The frozen template features ``template_features``
    [C, E] (normalised; zero-shot selector and ``logits2``) are a non-persistent buffer computed
    once per class list.

    The epoch (for the guidance stage) is ``self.epoch``: set by ``on_epoch_end`` and
    checkpointed as ``epoch`` in ``extra_state_tensors`` so a resumed run continues in the same
    stage. A new class list (``set_classnames``) gets fresh auxiliary classifiers; they only
    matter for training (the official code drops them before evaluation).
    """

    name = "dpt"
    requires = frozenset({VISUAL_PROMPTS})
    description = ("DPT: CoOp text prompts + VPT-deep + class-aware visual prompts from the "
                   "zero-shot top-K classes (TMM 2023)")
    Config = DPTConfig
    #: checkpoint layout of the official trainer: three registered models (VPT tokens, CAVPT
    #: generator, CoOp prompt learner); the official loader drops the class-specific
    #: auxiliary classifiers ``classfiers``, so they are optional here
    official_layout = OfficialLayout(
        repo="fanrena/DPT", source="trainers/DPT.py", trainer="DPT",
        models=("image_encoder.transformer.ctx_learner", _EXTRACTOR, "prompt_learner"),
        rules=(Rule("ctx", "vpt", model="image_encoder.transformer.ctx_learner"),
               Rule("ctx[{i}]", "cavpt.{i}.kv_tokens", model=_EXTRACTOR),
               Rule("meta_nets.{i}.", "cavpt.{i}.meta_net.", model=_EXTRACTOR),
               Rule("attns.{i}.qmlp.", "cavpt.{i}.q_proj.", model=_EXTRACTOR),
               Rule("attns.{i}.kmlp.", "cavpt.{i}.k_proj.", model=_EXTRACTOR),
               Rule("attns.{i}.vmlp.", "cavpt.{i}.v_out.", model=_EXTRACTOR),
               Rule("lns.{i}.", "cavpt.{i}.ln.", model=_EXTRACTOR),
               Rule("lns2.{i}.", "cavpt.{i}.ln2.", model=_EXTRACTOR),
               Rule("classfiers.{i}.", "aux_classifiers.{i}.", model=_EXTRACTOR, optional=True),
               Rule("ctx", "ctx", model="prompt_learner")),
        config={"TRAINER.COOP.N_CTX": "n_ctx_text", "TRAINER.COOP.CTX_INIT": "ctx_init",
                "TRAINER.VPT.N_CTX": "n_ctx_vision", "TRAINER.SELECTED_COVPT.CPN": "top_k",
                "PRETRAIN.C": "guidance_epochs", "TRAINER.ALPHA": "aux_weight"},
        shapes={"n_ctx_text": ("ctx", "dim0"), "n_ctx_vision": ("vpt", "dim1"),
                "cavpt_depth": ("cavpt.*.kv_tokens", "count"),
                "n_kv_tokens": ("cavpt.0.kv_tokens", "dim0"),
                "attn_dim": ("cavpt.0.q_proj.weight", "dim0")},
        tokens_model="prompt_learner", text_prompts="prompts", fill=("epoch",))

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: Optional[DPTConfig] = None,
                 template: Optional[str] = None):
        super().__init__(clip, classnames, config, template)
        cfg = self.config
        device = self.device
        layers = clip.visual.num_layers
        cavpt_depth = cfg.cavpt_depth
        if cavpt_depth > layers:
            logger.warning("dpt: cavpt_depth %d exceeds the %d vision blocks; using %d",
                           cavpt_depth, layers, layers)
            cavpt_depth = layers
        self.cavpt_depth = cavpt_depth
        self.prompts = TextPrompts(clip, self.classnames, cfg.n_ctx_text, cfg.ctx_init or None)
        self.ctx = nn.Parameter(self.prompts.init_context().to(device))  # [M, Dt]
        n_vpt = layers - cavpt_depth
        if n_vpt > 0:
            self.vpt = nn.Parameter(
                torch.randn(n_vpt, cfg.n_ctx_vision, clip.vision_width, device=device)
                * PROMPT_INIT_STD)  # [L - cavpt_depth, n, Dv]
        else:
            self.register_parameter("vpt", None)
        self.cavpt = nn.ModuleList(
            [CAVPTLayer(clip.embed_dim, clip.vision_width, cfg.n_kv_tokens, cfg.attn_dim, device)
             for _ in range(cavpt_depth)])
        self.aux_classifiers = self._new_classifiers(len(self.classnames))
        self.register_buffer("template_features", None, persistent=False)
        self.epoch = 0
        self._cache = FrozenFeatureCache()

    def _new_classifiers(self, num_classes: int) -> nn.ModuleList:
        return nn.ModuleList(
            [nn.Linear(self.clip.vision_width, num_classes, bias=False, device=self.device)
             for _ in range(self.cavpt_depth)])

    def set_classnames(self, classnames: Sequence[str]) -> None:
        names = [c.replace("_", " ") for c in classnames]
        if names != self.classnames and self.cavpt_depth:
            logger.info("dpt: new class list; the CAVPT auxiliary classifiers are re-initialised")
            self.aux_classifiers = self._new_classifiers(len(names))
        self.classnames = names
        self.prompts.set_classnames(names)
        self.template_features = None
        self._cache.clear()

    # ------------------------------------------------------------------ features
    def hand_crafted_features(self) -> Tensor:
        """Frozen normalised features of ``self.template`` for the current classes [C, E]."""
        if self.template_features is None:
            self.template_features = hand_crafted_text_features(
                self.clip, self.classnames, [self.template])
        return self.template_features

    def text_features(self) -> Tensor:
        """Learned class text features [C, E], unnormalised."""
        return self.clip.encode_text_embeddings(self.prompts.assemble(self.ctx),
                                                self.prompts.eot_indices)

    def _text_features_cached(self) -> Tensor:
        """``text_features``, reused across batches when nothing can change them (no grad)."""
        return self._cache.get(self.ctx, self.prompts.tokens, self.text_features)

    def select_classes(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Zero-shot CLIP's choice: (normalised frozen image features [B, E], indices [B, K] of
        the top-K classes under the template features, best first)."""
        with torch.no_grad():
            z0 = F.normalize(self.clip.encode_image(images).float(), dim=-1)
            scores = z0 @ self.hand_crafted_features().t()  # [B, C]
            k = min(self.config.top_k, scores.shape[1])
            idx = scores.topk(k, dim=1).indices  # [B, K]
        return z0, idx

    def encode_image(self, images: Tensor, class_text: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Prompted image features [B, E] (unnormalised) and, per CAVPT block, the auxiliary
        classifier logits [B, K, C]. ``class_text`` [B, K, E]: learned text features of each
        image's selected classes (the CAVPT queries).

        Every block gets fresh prompts appended at the end of its input; the hook first drops the
        previous block's prompt outputs (the last block's are left after the final block, where
        only the CLS token is read)."""
        n_vpt = 0 if self.vpt is None else self.vpt.shape[0]
        aux: list[Tensor] = []
        appended = [0]

        def hook(i: int, x: Tensor) -> Tensor:
            x = x[:, : x.shape[1] - appended[0]]  # [B, T, Dv]: the block's image tokens
            if i < n_vpt:
                p = self.vpt[i].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            else:
                j = i - n_vpt
                p, feats = self.cavpt[j](x, class_text)
                aux.append(self.aux_classifiers[j](feats))  # [B, K, C]
                p = p.to(x.dtype)
            appended[0] = p.shape[1]
            return torch.cat([x, p], dim=1)

        feats = self.clip.encode_image(images, hook=hook)
        return feats, aux

    def _outputs(self, images: Tensor, train: bool
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor], Tensor]:
        """(logits, z0, learned text normalised, prompted image normalised, aux logits, idx)."""
        z0, idx = self.select_classes(images)
        text = (self.text_features() if train else self._text_features_cached()).float()  # [C, E]
        image, aux = self.encode_image(images, text[idx])  # text[idx]: [B, K, E]
        text_n = F.normalize(text, dim=-1)
        image_n = F.normalize(image.float(), dim=-1)
        logits = self.clip.add_logit_bias(self.clip.logit_scale.exp() * image_n @ text_n.t())
        return logits, z0, text_n, image_n, aux, idx

    def forward(self, images: Tensor) -> Tensor:
        return self._outputs(images, train=False)[0]

    # ------------------------------------------------------------------ loss
    def aux_loss(self, aux: list[Tensor], idx: Tensor, labels: Tensor) -> Optional[Tensor]:
        """CE of the auxiliary classifiers over the (image, slot) pairs whose selected class is
        the label, averaged over those pairs of every CAVPT block; None when there are none."""
        if not aux:
            return None
        keep = idx == labels.unsqueeze(1)  # [B, K]
        if not bool(keep.any()):
            return None
        selected = torch.cat([a[keep] for a in aux]).float()  # [blocks * n_keep, C]
        targets = labels.unsqueeze(1).expand_as(idx)[keep].repeat(len(aux))
        return F.cross_entropy(selected, targets)

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        cfg = self.config
        logits, z0, text_n, image_n, aux, idx = self._outputs(images, train=True)
        scale = self.clip.logit_scale.exp()
        ce = F.cross_entropy(logits, labels)
        parts: dict[str, float] = {"ce": float(ce.detach())}
        if self.epoch < cfg.guidance_epochs:
            ce1 = F.cross_entropy(scale * z0 @ text_n.t(), labels)
            ce2 = F.cross_entropy(scale * image_n @ self.hand_crafted_features().t(), labels)
            total = ce1 + ce2 + cfg.guidance_main_weight * ce
            parts.update(ce_text=float(ce1.detach()), ce_image=float(ce2.detach()))
        else:
            total = ce
        aux_ce = self.aux_loss(aux, idx, labels)
        if aux_ce is not None:
            total = total + cfg.aux_weight * aux_ce
            parts["aux"] = float(aux_ce.detach())
        parts["acc"] = 100.0 * float((logits.argmax(dim=-1) == labels).float().mean())
        return total, parts

    # ------------------------------------------------------------------ engine hooks
    def param_groups(self, lr: float) -> list[dict]:
        """Three groups as the three official optimisers: VPT tokens and the CAVPT generator at
        ``lr`` with the run's warmup, the text context at ``text_lr`` with
        ``text_warmup_epoch``."""
        vision = [] if self.vpt is None else [self.vpt]
        cavpt = list(self.cavpt.parameters()) + list(self.aux_classifiers.parameters())
        groups = [{"params": vision, "lr": lr}, {"params": cavpt, "lr": lr},
                  {"params": [self.ctx], "lr": self.config.text_lr,
                   "warmup_epoch": self.config.text_warmup_epoch}]
        return [g for g in groups if g["params"]]

    def on_epoch_end(self, epoch: int, max_epochs: int) -> None:
        """Advance to the next epoch (the guidance stage ends after ``guidance_epochs``)."""
        self.epoch = epoch + 1

    def extra_state_tensors(self) -> dict[str, Tensor]:
        return {"epoch": torch.tensor([self.epoch], dtype=torch.long)}

    def load_extra_state_tensors(self, state: dict[str, Tensor]) -> None:
        self.epoch = int(state["epoch"].reshape(-1)[0])
