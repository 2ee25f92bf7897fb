"""COMMA: Co-Articulated Multi-Modal Learning (Hu et al., AAAI 2024), METHODS.md §5, §10.

MaPLe's structure (``CoupledPrompts``: 2 text context tokens from "a photo", text prompts in the
first ``depth`` = 9 blocks, shallow vision prompt ``V_1 = proj(ctx)``) with two changes:

* **Co-articulated vision prompts.** The vision prompt of block l+1 is generated from the vision
  prompt *and* the text prompt of block l by an attention transform (one per generated layer)::

      V_{l+1} = T_l(V_l, P_l),  P_1 = ctx,  P_l = text prompt of block l
      T(v, t) = MLP(LN(softmax(v t'^T / sqrt(Dv)) t')),  t' = Linear(Dt -> Dv)(t)
      MLP = Linear(Dv -> Dv/4) -> ReLU -> Linear(Dv/4 -> Dv)   (no residual to v)

* **Knowledge distillation on the text tower.** ``loss = CE + lambda * KD`` with
  ``KD = 1 - mean_{c, position} cos(H^learned[c, pos], H^template[c, pos])`` where ``H`` is the
  output of the last text block before ``ln_final``, over **all** ``context_length`` (77)
  positions (padding and EOT included; positions after the class name compare different words
  when the template has a suffix — this is what the released code computes), lambda = 1. The
  template side (the dataset's hand-crafted prompt, ``template_variant = "comma"``: DTD is
  "a photo of a {}, a type of texture.") is a frozen non-persistent buffer [K, C, L, Dt], computed
  once per class list on first use. ``kd_layers = K > 1`` averages the K last blocks' terms.

Released code vs. paper (METHODS.md §5.4) — the choice made here:
the released trainer writes the generated vision prompts through ``.data``, so autograd never
sees the generators: they stay at their random initialisation and the text prompts get no
gradient through the vision path. vlprompt's reference semantics mirror the released code
(METHODS.md §10 "mirror them unless a method's config says otherwise"), so the default
``train_generators = False`` computes the generated prompts without gradient from the current
prompts and keeps the generators as frozen random buffers (saved in the checkpoint through
``extra_state_tensors``, because they are part of the function the prompts were trained with).
Trained: ``ctx`` + ``proj`` + text deep prompts = 403,200 on ViT-B/16 (METHODS.md §5.2 "403,200
effective"). ``train_generators = True`` is the method as the paper describes it: the vision
prompts are an ordinary autograd expression and the generators are trained too (5,934,336 on
ViT-B/16); expect numbers that differ from the released ones.

The official ``compound_prompts_image`` parameter (overwritten every forward, so never a real
state) is not registered here; the released code's 5,946,624 registered tensors = the 403,200
trained + 12,288 of that parameter + 5,531,136 generator weights. The released code keeps CLIP
and the first generator in fp16; vlprompt's reference is fp32 (autocast is a runtime choice).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..clip.model import CLIP
from ..interop.layout import CUSTOM_CLIP_BACKBONE, OfficialLayout, Rule
from .base import VISUAL_PROMPTS, Method, MethodConfig
from .deep_prompts import CoupledPrompts
from .registry import register_method


@dataclasses.dataclass
class COMMAConfig(MethodConfig):
    """COMMA settings; defaults = ``COMMA/vit_b16_c2_ep5_batch4_2ctx.yaml`` (base-to-new).
    Cross-dataset / DG: depth 3 (``..._cross_datasets.yaml``)."""

    n_ctx: int = 2
    ctx_init: str = "a photo of a"
    #: prompted blocks in both towers (J, ``PROMPT_DEPTH``); capped at the shallower tower
    depth: int = 9
    #: lambda of the KD term (``COMMA.WEIGHT``)
    kd_weight: float = 1.0
    #: number of final text blocks whose outputs are distilled (``COMMA.LAST_LAYER``)
    kd_layers: int = 1
    #: False = released code (generators frozen at their random init, generated vision prompts
    #: carry no gradient); True = the paper's trainable cross-branch generators (METHODS.md §5.4)
    train_generators: bool = False
    #: hidden width of the generators' MLP = vision width // this (``r = 4`` in the code)
    generator_reduction: int = 4

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ValueError(f"comma: n_ctx must be >= 1, got {self.n_ctx}")
        if self.depth < 1:
            raise ValueError(f"comma: depth must be >= 1, got {self.depth}")
        if self.kd_weight < 0:
            raise ValueError(f"comma: kd_weight must be >= 0, got {self.kd_weight}")
        if self.kd_layers < 1:
            raise ValueError(f"comma: kd_layers must be >= 1, got {self.kd_layers}")
        if self.generator_reduction < 1:
            raise ValueError(f"comma: generator_reduction must be >= 1, "
                             f"got {self.generator_reduction}")
        if not isinstance(self.train_generators, bool):
            raise ValueError(f"comma: train_generators must be true or false, "
                             f"got {self.train_generators!r}")


class AttentionTransform(nn.Module):
    """COMMA's prompt generator ``T(v, t)``: vision prompts [n, Dv] attend over the text prompts
    [n, Dt] mapped to the vision width; the attended mix goes through LN and a bottleneck MLP."""

    def __init__(self, text_width: int, vision_width: int, reduction: int = 4,
                 device: Optional[torch.device] = None):
        super().__init__()
        hidden = max(1, vision_width // reduction)
        self.fc = nn.Linear(text_width, vision_width, device=device)
        self.ln = nn.LayerNorm(vision_width, device=device)
        self.mlp = nn.Sequential(nn.Linear(vision_width, hidden, device=device), nn.ReLU(),
                                 nn.Linear(hidden, vision_width, device=device))

    def forward(self, vision: Tensor, text: Tensor) -> Tensor:
        """vision [n, Dv], text [m, Dt] -> next vision prompts [n, Dv]."""
        t = self.fc(text.to(self.fc.weight.dtype))  # [m, Dv]
        v = vision.to(t.dtype)
        attn = torch.softmax(v @ t.t() / math.sqrt(t.shape[-1]), dim=-1)  # [n, m]
        return self.mlp(self.ln(attn @ t))  # [n, Dv]


def _parameters_to_buffers(module: nn.Module) -> None:
    """Turn every parameter of ``module`` into a buffer of the same name (same values), so the
    module still computes the same function but holds nothing trainable."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            del sub._parameters[name]
            sub.register_buffer(name, p.detach().clone())


class CoArticulatedPrompts(CoupledPrompts):
    """MaPLe's ``CoupledPrompts`` without the Linear couplings; deep vision prompts come from
    ``generators`` (J-1 ``AttentionTransform``): ``V_{l+1} = generators[l-1](V_l, P_l)``.

    With ``train_generators=False`` the generators' weights are buffers and the generated prompts
    are computed without gradient (the released code's ``.data`` behaviour, METHODS.md §5.4).
    """

    def __init__(self, clip: CLIP, classnames: Sequence[str], n_tokens: int,
                 ctx_init: Optional[str], depth: int, train_generators: bool = False,
                 reduction: int = 4):
        super().__init__(clip, classnames, n_tokens, ctx_init, depth, couplings=False)
        self.depth = self.text_deep.depth  # resolved (capped) depth
        self.train_generators = train_generators
        self.generators = nn.ModuleList(
            [AttentionTransform(clip.text_width, clip.vision_width, reduction,
                                device=clip.logit_scale.device)
             for _ in range(self.depth - 1)])
        if not train_generators:
            _parameters_to_buffers(self.generators)

    def text_prompts(self) -> list[Tensor]:
        """Text prompts of blocks 0..J-1: ``[ctx, text_deep.prompts[0], ...]`` (each [n, Dt])."""
        deep = self.text_deep.prompts
        return [self.ctx] + ([] if deep is None else list(deep.unbind(0)))

    def vision_prompts(self) -> tuple[Tensor, dict[int, Tensor]]:
        """(shallow [n, Dv], {block i: [n, Dv]} for i = 1..J-1), generated layer by layer."""
        shallow = self.proj(self.ctx)
        deep: dict[int, Tensor] = {}
        with torch.set_grad_enabled(self.train_generators and torch.is_grad_enabled()):
            v = shallow if self.train_generators else shallow.detach()
            for i, (gen, p) in enumerate(zip(self.generators, self.text_prompts())):
                v = gen(v, p if self.train_generators else p.detach())
                deep[i + 1] = v
        return shallow, deep


@register_method
class COMMA(Method):
    """Learnable (in ``prompts``): ``ctx`` [n, Dt], ``proj`` Dt->Dv, ``text_deep.prompts``
    [J-1, n, Dt]; plus the J-1 ``generators`` when ``train_generators`` (buffers exported by
    ``extra_state_tensors`` as ``generators.<name>`` otherwise). The KD target
    ``teacher_hidden`` [K, C, L, Dt] is a non-persistent buffer, one per class list."""

    name = "comma"
    requires = frozenset({VISUAL_PROMPTS})
    template_variant = "comma"  # KgCoOp's table: DTD "a photo of a {}, a type of texture."
    description = ("COMMA: co-articulated vision-language prompts with text-tower "
                   "distillation (AAAI 2024)")
    Config = COMMAConfig
    #: checkpoint layout of the official trainer (the whole ``CustomCLIP`` registered as
    #: "MultiModalPromptLearner"); ``compound_prompts_image`` is overwritten at every forward
    #: there, and its attention transforms are the generators (released-code mode)
    official_layout = OfficialLayout(
        repo="hulianyuyy/COMMA", source="trainers/comma.py", trainer="COMMA",
        models=("MultiModalPromptLearner",),
        rules=(Rule("prompt_learner.ctx", "prompts.ctx"),
               Rule("prompt_learner.proj.", "prompts.proj."),
               Rule("prompt_learner.compound_prompts_text", "prompts.text_deep.prompts"),
               Rule("prompt_learner.compound_prompt_projections_image_base.", "generators.0."),
               Rule("prompt_learner.compound_prompt_projections_image.{i}.", "generators.{i}.",
                    offset=1)),
        ignored=("prompt_learner.compound_prompts_image",),
        config={"TRAINER.COMMA.N_CTX": "n_ctx", "TRAINER.COMMA.CTX_INIT": "ctx_init",
                "TRAINER.COMMA.PROMPT_DEPTH": "depth", "TRAINER.COMMA.WEIGHT": "kd_weight",
                "TRAINER.COMMA.LAST_LAYER": "kd_layers"},
        shapes={"n_ctx": ("prompts.ctx", "dim0"),
                "depth": (("prompts.ctx", "prompts.text_deep.prompts"), "layers")},
        backbone=CUSTOM_CLIP_BACKBONE, tokens="prompt_learner.", text_prompts="prompts.text")

    def __init__(self, clip: CLIP, classnames: Sequence[str],
                 config: Optional[COMMAConfig] = None, template: Optional[str] = None):
        super().__init__(clip, classnames, config, template)
        cfg = self.config
        if cfg.kd_layers > clip.transformer.layers:
            raise ValueError(f"comma: kd_layers={cfg.kd_layers} exceeds the "
                             f"{clip.transformer.layers} text blocks; use at most that many")
        self.prompts = CoArticulatedPrompts(clip, self.classnames, cfg.n_ctx, cfg.ctx_init,
                                            cfg.depth, cfg.train_generators,
                                            cfg.generator_reduction)
        self.register_buffer("teacher_hidden", None, persistent=False)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = [c.replace("_", " ") for c in classnames]
        self.prompts.set_classnames(self.classnames)
        self.teacher_hidden = None

    # ------------------------------------------------------------------ KD target
    @torch.no_grad()
    def template_hidden_states(self, chunk: int = 128) -> Tensor:
        """Per-token normalised outputs of the last ``kd_layers`` text blocks (before
        ``ln_final``) for ``self.template``, all positions: [K, C, L, Dt] float32, cached."""
        if self.teacher_hidden is None:
            clip, k = self.clip, self.config.kd_layers
            texts = [self.template.format(n) for n in self.classnames]
            tokens = clip.tokenizer.tokenize(texts, clip.context_length).to(self.device)  # [C, L]
            parts = []
            for i in range(0, len(texts), chunk):
                t = tokens[i: i + chunk]
                hs: list[Tensor] = []
                clip.encode_text_embeddings(clip.embed_tokens(t), clip.text_pool_indices(t),
                                            hidden_states=hs, truncate=False)
                parts.append(F.normalize(torch.stack(hs[-k:]).float(), dim=-1))  # [K, c, L, Dt]
            self.teacher_hidden = torch.cat(parts, dim=1)
        return self.teacher_hidden

    def kd_loss(self, hidden_states: Sequence[Tensor]) -> Tensor:
        """``mean_k (1 - mean_{c,pos} cos(H_k, H_k^template))`` over the last ``kd_layers``
        block outputs of the learned prompts (each [C, L, Dt], all positions)."""
        target = self.template_hidden_states()
        learned = torch.stack(list(hidden_states[-self.config.kd_layers:]))  # [K, C, L, Dt]
        if learned.shape != target.shape:
            raise ValueError(f"comma: KD needs the untruncated block outputs "
                             f"{tuple(target.shape)}, got {tuple(learned.shape)}")
        cos = (F.normalize(learned.float(), dim=-1) * target).sum(-1)  # [K, C, L]
        return (1.0 - cos.mean(dim=(1, 2))).mean()

    # ------------------------------------------------------------------ forward / loss
    def text_features(self, hidden_states: Optional[list] = None) -> Tensor:
        """Learned class text features [C, E], unnormalised. With ``hidden_states`` the tower runs
        on all positions (the KD term needs them) and appends every block's output."""
        return self.prompts.encode_text(self.clip, hidden_states=hidden_states,
                                        truncate=hidden_states is None)

    def image_features(self, images: Tensor) -> Tensor:
        """Prompted image features [B, E], unnormalised."""
        return self.prompts.encode_image(self.clip, images)

    def forward(self, images: Tensor) -> Tensor:
        return self.logits(self.image_features(images),
                           self.cached_class_features(self.text_features))

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        use_kd = self.config.kd_weight > 0
        hidden: Optional[list] = [] if use_kd else None
        text = self.text_features(hidden)
        ce = F.cross_entropy(self.logits(self.image_features(images), text), labels)
        if not use_kd:
            return ce, {"ce": float(ce.detach())}
        kd = self.kd_loss(hidden)
        total = ce + self.config.kd_weight * kd
        return total, {"ce": float(ce.detach()), "kd": float(kd.detach())}

    # ------------------------------------------------------------------ frozen generators
    def extra_state_tensors(self) -> dict[str, Tensor]:
        """The frozen random generators (released-code mode): part of the trained function."""
        if self.config.train_generators:
            return {}
        return {f"generators.{n}": b.detach().clone()
                for n, b in self.prompts.generators.named_buffers()}

    def load_extra_state_tensors(self, state: dict[str, Tensor]) -> None:
        buffers = dict(self.prompts.generators.named_buffers())
        with torch.no_grad():
            for n, b in buffers.items():
                value = state[f"generators.{n}"]
                if value.shape != b.shape:
                    raise ValueError(f"comma: generator tensor {n} has shape "
                                     f"{tuple(value.shape)} in the checkpoint, {tuple(b.shape)} "
                                     f"in the method")
                b.copy_(value)
