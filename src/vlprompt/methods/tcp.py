"""TCP — Textual-based Class-aware Prompt tuning (Yao et al., CVPR 2024;
``htyao89/Textual-based_Class-aware_prompt_tuning`` ``trainers/tcp.py``,
``trainers/clip_text/model.py``, ``train.py``).

CoOp (4 context vectors) plus class-aware text tokens (METHODS-SOTA.md §2): a meta-net maps each
class's frozen hand-crafted text embedding t_hc (C, E) to n_ctx tokens,
``W = Linear(E -> E/4) -> QuickGELU -> Linear(E/4 -> n_ctx * Dt)`` reshaped to (C, n_ctx, Dt),
which replace the context positions 1..n_ctx of class c's prompt before text block ``layer``
(block 8 of 12: blocks 0..7 see the shared context, blocks 8..11 the class's tokens). New classes
get tokens from their own t_hc (inductive: class names only). Loss
``CE(100 cos(v, t), y) + 8 (1 - mean_c cos(t_c, t_hc_c))`` (KgCoOp's term). Trained with Adam,
eps 1e-3 (the README's Dassl patch).

Per-dataset prompts: the learned prompt is ``[SOT] ctx_1..ctx_n <prompt_suffix> [EOT]`` and the
teacher template ``teacher_template``. Left empty, the suffix is the dataset template from its
``{}`` on and the teacher is the dataset's KgCoOp-table template, which gives the released
``CUSTOM_TEMPLATES`` / ``CUSTOM_TEMPLATES_ori`` for every dataset except those the packaged configs
set in their ``datasets:`` blocks (DTD, StanfordCars, UCF101 suffixes; FGVCAircraft, Food101
teachers).

Departures from the released code (each with the switch that restores it):

* Precision: the meta-net, the context and the teacher features are fp32 (the released code runs
  CLIP, the context and the meta-net in fp16 and takes the teacher from a separate fp16 CLIP);
  vlprompt's reference precision is fp32, ``train.precision`` selects autocast on GPU.
* The number of class-aware tokens follows ``n_ctx`` (the released meta-net always makes 4, its
  n_ctx; another n_ctx replaces only positions 1..4). No switch (identical at n_ctx 4).
* ``layer`` is capped at the text tower's last block for test models with fewer than 9 blocks
  (logged); at ViT-B/16 block 8 as released.
* The released mixing weight is hard-coded to 1.0 (the ``TRAINER.COOP.W`` the script passes is
  overwritten), i.e. full replacement: ``mix_weight: 1.0`` is that behaviour; other values mix
  ``w W + (1 - w) x`` as the code's formula intends.
* ``ctx_init`` has CoOp's meaning (those words initialise the context); the released code uses
  "a photo of a" for any truthy ``CTX_INIT``. The default (random N(0, 0.02^2)) is as released.
* The released cosine uses ``CosineSimilarity(eps=1e-7)`` of unit vectors; here their dot product
  (equal to ~1e-7). The released code also detaches the frozen image feature and logit scale (no
  effect).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..clip.model import CLIP, LayerHook, QuickGELU
from ..interop.layout import OfficialLayout, Rule
from .coop import CoOp
from .prompts import TextPrompts, hand_crafted_text_features
from .registry import register_method

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TCPConfig(CoOp.Config):
    """TCP settings; defaults = ``TCP/vit_b16_ep100_ctxv1.yaml`` + ``base2new_train.sh``
    (4 random context vectors, block 8, weight 1.0, KgCoOp weight 8.0)."""

    n_ctx: int = 4
    #: fixed prompt text after the context ("{}" = class name, e.g. "{}, a type of pet.");
    #: empty: the dataset template from its "{}" on
    prompt_suffix: str = ""
    #: template of the frozen class embeddings t_hc (teacher and meta-net input); empty: the
    #: dataset's template (KgCoOp table)
    teacher_template: str = ""
    #: 0-based text block before which the class-aware tokens enter (``layers=[8]``)
    layer: int = 8
    #: w in ``w * W_c + (1 - w) * x`` at the context positions (released: 1.0, hard-coded)
    mix_weight: float = 1.0
    #: weight of ``1 - mean cos(t, t_hc)`` (hard-coded 8.0)
    kg_weight: float = 8.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.csc or self.class_token_position != "end":
            raise ValueError("tcp: the class-aware tokens need one shared context at the end "
                             "(csc=false, class_token_position=end)")
        for name in ("prompt_suffix", "teacher_template"):
            value = getattr(self, name)
            if value and "{}" not in value:
                raise ValueError(f"tcp: {name} must contain '{{}}', got {value!r}")
        if self.layer < 0:
            raise ValueError(f"tcp: layer must be >= 0, got {self.layer}")
        if not 0.0 <= self.mix_weight <= 1.0:
            raise ValueError(f"tcp: mix_weight must be in [0, 1], got {self.mix_weight}")
        if self.kg_weight < 0:
            raise ValueError(f"tcp: kg_weight must be >= 0, got {self.kg_weight}")


class SuffixPrompts(TextPrompts):
    """CoOp prompts ``"X" * n_ctx + " " + suffix.format(class)``: fixed text after the context
    that is not always ``"{class}."`` (TCP: ``"{}, a type of car"``, no period)."""

    def __init__(self, clip: CLIP, classnames: Sequence[str], n_ctx: int, suffix: str,
                 ctx_init: Optional[str] = None):
        self.suffix = suffix  # read by set_classnames, which the base __init__ calls
        super().__init__(clip, classnames, n_ctx, ctx_init=ctx_init)

    def prompt_text(self, name: str) -> str:
        return f"{' '.join(['X'] * self.n_ctx)} {self.suffix.format(name)}"


def default_suffix(template: str) -> str:
    """The dataset template from its ``{}`` on: ``"a photo of a {}, a type of pet."`` ->
    ``"{}, a type of pet."``."""
    return template[template.index("{}"):] if "{}" in template else "{}."


@register_method
class TCP(CoOp):
    """Learnable: CoOp's ``ctx`` [M, Dt] and ``meta_net`` (E -> E/4 -> M*Dt). The frozen class
    embeddings ``class_embeddings_`` [C, E] are a non-persistent buffer, one per class list."""

    name = "tcp"
    template_variant = "kgcoop"  # t_hc: KgCoOp's table (CUSTOM_TEMPLATES_ori)
    description = ("TCP: CoOp with class-aware text tokens generated from frozen class "
                   "embeddings (CVPR 2024)")
    Config = TCPConfig
    #: the official ``PromptLearner``: ``ctx`` [4, Dt], ``meta_net.linear1``/``linear2`` (its
    #: "relu" is QuickGELU, no tensors) and the token buffers; the frozen class features are a
    #: plain attribute, not saved. Block 8, weight 1.0 and 8.0 are hard-coded, not config.
    official_layout = OfficialLayout(
        repo="htyao89/Textual-based_Class-aware_prompt_tuning", source="trainers/tcp.py",
        trainer="TCP", models=("prompt_learner",),
        rules=(Rule("ctx", "ctx"), Rule("meta_net.linear1.", "meta_net.0."),
               Rule("meta_net.linear2.", "meta_net.2.")),
        config={"TRAINER.COOP.N_CTX": "n_ctx"},
        shapes={"n_ctx": ("ctx", "dim0")}, text_prompts="prompts")

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: Optional[TCPConfig] = None,
                 template: Optional[str] = None):
        super().__init__(clip, classnames, config, template)
        cfg = self.config
        self.suffix = cfg.prompt_suffix or default_suffix(self.template)
        self.teacher_template = cfg.teacher_template or self.template
        self.prompts = SuffixPrompts(clip, self.classnames, cfg.n_ctx, self.suffix,
                                     ctx_init=cfg.ctx_init or None)
        self.layer = min(cfg.layer, clip.transformer.layers - 1)
        if self.layer != cfg.layer:
            logger.warning("tcp: layer %d exceeds the %d text blocks; using block %d", cfg.layer,
                           clip.transformer.layers, self.layer)
        E, D = clip.embed_dim, clip.text_width
        self.meta_net = nn.Sequential(nn.Linear(E, E // 4), QuickGELU(),
                                      nn.Linear(E // 4, cfg.n_ctx * D)).to(self.device)
        self.register_buffer("class_embeddings_", None, persistent=False)
        self._meta_key: Optional[tuple] = None

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.class_embeddings_ = None

    def class_embeddings(self) -> Tensor:
        """Frozen normalised text features t_hc [C, E] of ``teacher_template`` (fp32)."""
        if self.class_embeddings_ is None:
            with torch.autocast(self.device.type, enabled=False):
                self.class_embeddings_ = hand_crafted_text_features(
                    self.clip, self.classnames, [self.teacher_template])
        return self.class_embeddings_

    def class_tokens(self) -> Tensor:
        """Class-aware tokens [C, M, Dt] = meta_net(t_hc)."""
        t = self.class_embeddings().to(self.meta_net[0].weight.dtype)
        return self.meta_net(t).view(t.shape[0], self.config.n_ctx, -1)  # [C, M*Dt] -> [C, M, Dt]

    def _token_hook(self, tokens: Tensor) -> LayerHook:
        """Before block ``layer``: positions 1..M <- w * tokens + (1 - w) * positions 1..M
        (0..M-1 for a tokenizer without a start token, SigLIP: ``clip.prompt_start``)."""
        w, layer, M = self.config.mix_weight, self.layer, self.config.n_ctx
        s = self.clip.prompt_start

        def hook(i: int, x: Tensor) -> Tensor:
            if i != layer:
                return x
            mixed = w * tokens.to(x.dtype) + (1 - w) * x[:, s: s + M]
            return torch.cat([x[:, :s], mixed, x[:, s + M:]], dim=1)
        return hook

    def text_features(self) -> Tensor:
        """Unnormalised class text features [C, E]."""
        tp, tokens = self.prompts, self.class_tokens()
        if self.config.mix_weight == 1.0:  # released: a plain replacement
            return self.clip.encode_text_embeddings(tp.assemble(self.ctx), tp.eot_indices,
                                                    deep_prompts={self.layer: tokens})
        return self.clip.encode_text_embeddings(tp.assemble(self.ctx), tp.eot_indices,
                                                hook=self._token_hook(tokens))

    def _text_features_cached(self) -> Tensor:
        if torch.is_grad_enabled():  # training: never cached
            return self.text_features()
        # CoOp's cache follows ctx; the meta-net's tensors can change on their own
        key = tuple((p._version, p.data_ptr(), float(p.sum())) for p in self.meta_net.parameters())
        if key != self._meta_key:
            self._cache.clear()
            self._meta_key = key
        return super()._text_features_cached()

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        text = self.text_features().float()  # [C, E]
        image = self.frozen_image_features(images).float()  # [B, E]
        logits = self.logits(image, text)
        ce = F.cross_entropy(logits, labels)
        cos = (F.normalize(text, dim=-1) * self.class_embeddings()).sum(-1)  # [C]
        kg = 1.0 - cos.mean()
        acc = (logits.argmax(dim=-1) == labels).float().mean()
        return ce + self.config.kg_weight * kg, {"ce": float(ce.detach()),
                                                 "kg": float(kg.detach()),
                                                 "acc": 100.0 * float(acc)}
