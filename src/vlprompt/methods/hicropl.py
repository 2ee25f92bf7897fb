"""HiCroPL: Hierarchical Cross-modal Prompt Learning (Zheng et al., ICCV 2025),
METHODS-SOTA.md §6; official code ``zzeoZheng/HiCroPL@2c2b2f2cd3 trainers/hicropl.py``.

IVLP-placed prompts in both towers (``TextDeepPrompts``/``VisionPrompts``): text T_l [n, Dt] at
positions 1..n, vision V_l [n, Dv] appended before ``ln_pre`` (l = 0) or replacing the last n
tokens (l = 1..L-1). Before every forward, two cross-prompt mappers rewrite half of them:

* layer-specific knowledge proxies (LKP): ``p_l = LN2(q_l + MHA(LN1 q_l, LN1 P_l, LN1 P_l))``
  with a learned query q_l [1, D] per layer, over T_l for l < k and over V_l for l >= k;
* text -> vision (early layers): ``V'_{0..k-1} = M_tv(V_{0..k-1} as [k·n, Dv], p_{0..k-1})``;
* vision -> text (late layers): ``T'_{k..L-1} = M_vt(T_{k..L-1} flattened, p_{k..L-1})``,
  where ``M(X, P): Q = W_q X, K = W_k P, V = W_v P; Q += MHA(LN1 Q, LN1 K, LN1 V);
  Q += FFN(LN2 Q)`` (FFN ×4, QuickGELU, 8 heads); k = ``cross_layer``.

Zero-shot fusion (train and test): ``v = norm(norm(E_img(x; V')) + z)``, z = norm(frozen
unprompted image feature of x); ``t = norm(norm(E_txt(T')) + g)``, g [C, E] = normalised mean of
the normalised frozen features of each class's LLM descriptions (``data.descriptions``, mode
"mean"; the folder comes from ``descriptions`` or ``$VLPROMPT_DESCRIPTIONS``, the dataset from
``description_dataset`` or the engine's ``set_dataset``). Logits ``100·v·tᵀ``;
``L = CE + λ[(1 − mean_c cos(t_c, g_c)) + (1 − mean_b cos(v_b, z_b))]``, λ = 12.

Initialisation as released: every V_l starts from one N(0, 0.02²) draw, the LKP networks of a
tower are copies of one network and the proxy queries of a tower copies of one N(0, 1) draw;
T_0 (``ctx``) comes from ``ctx_init``'s words only when n <= 4 (else N(0, 0.02²) and the prompt
"X X ... X {class}."), T_1.. are independent N(0, 0.02²) draws. Two consequences, as released:
the vision->text keys (and values) start equal, so that mapper's key projection gets no gradient
until the V_l differ (after the first step); and with a single proxy on a side (k = 1 or
L - k = 1, e.g. vision->text in the cross-dataset config) the softmax over one key is constant,
so that mapper's ``linear_k`` never gets a gradient (it is still counted and checkpointed).

``mapper`` switch — the one behaviour to decide (METHODS-SOTA.md §6):

* ``functional`` (default, vlprompt's choice): V' and T' are computed with autograd from the
  stored prompts at every forward and never written back; mappers, LKP networks and proxies are
  trained (33,431,040 trainable tensors' elements at ViT-B/16, all of them registered).
* ``released_inplace`` (the published numbers): as the released ``.data.copy_()``, the mapped
  prompts overwrite the stored ones at every forward (training *and* evaluation) before the
  towers use them, so (a) mappers, LKP nets and proxies get no gradient and stay at their seeded
  init (here ``requires_grad`` False, checkpointed as extra state: 245,760 trained of 33,431,040);
  (b) V_{0..k-1} and T_{k..L-1} are overwritten with M(current value), stepped once, overwritten
  again; (c) evaluation rewrites them per test batch, so accuracy depends on the number and
  order of batches (and ``select: best_val``'s val passes change the prompts training goes on
  with, as in the released Dassl).

Other departures from the released code, and the switch restoring each where one exists:

* reference semantics are fp32 (released: fp16 CLIP, mappers/LKP ``.half()``, prompts and g cast
  to fp16 at use): ``train.precision``;
* widths come from the backbone (released: 512/768 literals, equal at ViT-B/16); the frozen
  image teacher is the backbone itself (released: a second copy named by ``TEACHER_NAME``,
  ViT-B/16 in every shipped config);
* a depth above the backbone's block count is capped, and ``cross_layer`` then to depth - 1;
* the released ``gpt_clip_classifier`` writes ``cache/<dataset>_clip_weights_random.pt`` and
  never reads it; vlprompt caches per backbone fingerprint (``data.descriptions``);
* model selection: the bundled Dassl tests the best-val epoch; vlprompt's default is the last
  epoch, ``train.select: best_val`` restores it (``configs/hicropl/*.yaml``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..clip.model import CLIP, QuickGELU
from ..data.descriptions import description_features, load_descriptions
from ..interop.layout import CUSTOM_CLIP_BACKBONE, OfficialLayout, Rule
from .base import VISUAL_PROMPTS, Method, MethodConfig
from .deep_prompts import TextDeepPrompts, VisionPrompts, resolve_depth
from .registry import register_method

logger = logging.getLogger(__name__)

MAPPERS = ("functional", "released_inplace")
#: the released code initialises ``ctx`` from ``ctx_init`` only up to this many tokens
CTX_INIT_MAX_TOKENS = 4


@dataclasses.dataclass
class HiCroPLConfig(MethodConfig):
    """HiCroPL settings; defaults = ``HiCroPL/vit_b16_c2_ep50_batch32_16ctx.yaml`` (base-to-new
    and few-shot); cross-dataset: n_ctx 2, depth 6, cross_layer 5 (``configs/hicropl/xd.yaml``)."""

    #: prompt tokens per layer in both towers (``N_CTX``)
    n_ctx: int = 16
    #: initial words of ``ctx``, used only when n_ctx <= 4 (``CTX_INIT``)
    ctx_init: str = "a photo of a"
    #: prompted blocks in both towers (``PROMPT_DEPTH``; capped at the backbone's depth)
    depth: int = 12
    #: k: layers 0..k-1 map text -> vision, layers k..depth-1 vision -> text (``CROSS_LAYER``)
    cross_layer: int = 6
    #: attention heads of the mappers and LKP networks (released: 8)
    heads: int = 8
    #: λ, weight of the two consistency terms (``LAMBD``)
    consistency_weight: float = 12.0
    #: "functional" (mapped prompts with autograd, no write-back) or "released_inplace"
    mapper: str = "functional"
    #: folder (or file) of the LLM descriptions, official ``gpt_file`` format; empty:
    #: ``$VLPROMPT_DESCRIPTIONS``
    descriptions: str = ""
    #: whose descriptions; empty: the run's dataset
    description_dataset: str = ""

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ValueError(f"hicropl: n_ctx must be >= 1, got {self.n_ctx}")
        if self.depth < 2:
            raise ValueError(f"hicropl: depth must be >= 2 (one layer per mapping direction), "
                             f"got {self.depth}")
        if not 1 <= self.cross_layer < self.depth:
            raise ValueError(f"hicropl: cross_layer must be in 1..depth-1 = 1..{self.depth - 1}, "
                             f"got {self.cross_layer}")
        if self.heads < 1:
            raise ValueError(f"hicropl: heads must be >= 1, got {self.heads}")
        if self.consistency_weight < 0:
            raise ValueError(f"hicropl: consistency_weight must be >= 0, got "
                             f"{self.consistency_weight}")
        if self.mapper not in MAPPERS:
            raise ValueError(f"hicropl: mapper must be one of {', '.join(MAPPERS)}, got "
                             f"{self.mapper!r}")


class KnowledgeProxy(nn.Module):
    """LKP: ``LN2(q + MHA(LN1 q, LN1 P, LN1 P))`` — one proxy token [1, D] summarising a
    layer's prompts P [n, D] for query q [1, D] (released ``AttentionPooling``)."""

    def __init__(self, width: int, heads: int, device: Optional[torch.device] = None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, device=device)
        self.ln_1 = nn.LayerNorm(width, device=device)
        self.ln_2 = nn.LayerNorm(width, device=device)

    def forward(self, query: Tensor, prompts: Tensor) -> Tensor:
        kv = self.ln_1(prompts)
        return self.ln_2(query + self.attn(self.ln_1(query), kv, kv, need_weights=False)[0])


class CrossPromptMapper(nn.Module):
    """Multi-scale knowledge mapper (released ``CrossPromptAttention``): prompts X [m, Dq] of one
    tower attend to proxies P [k, Dp] of the other; returns the mapped prompts [m, Dq]."""

    def __init__(self, width: int, source_width: int, heads: int,
                 device: Optional[torch.device] = None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, device=device)
        self.linear_q = nn.Linear(width, width, device=device)
        self.linear_k = nn.Linear(source_width, width, device=device)
        self.linear_v = nn.Linear(source_width, width, device=device)
        self.ln_1 = nn.LayerNorm(width, device=device)
        self.ffn = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width, device=device)), ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(4 * width, width, device=device))]))
        self.ln_2 = nn.LayerNorm(width, device=device)

    def forward(self, prompts: Tensor, proxies: Tensor) -> Tensor:
        q, k, v = self.linear_q(prompts), self.linear_k(proxies), self.linear_v(proxies)
        q = q + self.attn(self.ln_1(q), self.ln_1(k), self.ln_1(v), need_weights=False)[0]
        return q + self.ffn(self.ln_2(q))


@register_method
class HiCroPL(Method):
    """Learnable (functional mode; released mode trains the prompts only):
    ``text.ctx`` [n, Dt] + ``text.deep.prompts`` [L-1, n, Dt] (T_0..T_{L-1});
    ``vision.shallow`` [n, Dv] + ``vision.deep.prompts`` [L-1, n, Dv] (V_0..V_{L-1});
    ``text_to_vision`` (CrossPromptMapper Dv <- Dt), ``vision_to_text`` (Dt <- Dv);
    ``text_proxy_nets`` k x KnowledgeProxy(Dt), ``vision_proxy_nets`` (L-k) x KnowledgeProxy(Dv);
    ``text_proxies`` [k, Dt], ``vision_proxies`` [L-k, Dv] (the LKP queries).
    Frozen, non-persistent: ``description_mean`` [C, E] (g)."""

    name = "hicropl"
    requires = frozenset({VISUAL_PROMPTS})
    description = ("HiCroPL: IVLP prompts + bidirectional cross-modal prompt mappers + zero-shot "
                   "feature fusion (ICCV 2025)")
    Config = HiCroPLConfig
    # the official trainer registers its whole CustomCLIP as "VLPromptLearner": the prompt
    # learner's ParameterLists (``cross_prompts_text.0`` is ``ctx`` under a second name; one
    # [1, D] proxy query per layer), mappers, LKP nets, the frozen ``ZS_image_encoder`` and the
    # frozen CLIP (zzeoZheng/HiCroPL@2c2b2f2cd3 trainers/hicropl.py)
    official_layout = OfficialLayout(
        repo="zzeoZheng/HiCroPL", source="trainers/hicropl.py", trainer="HiCroPL",
        models=("VLPromptLearner",),
        rules=(Rule("prompt_learner.ctx", "text.ctx"),
               Rule("prompt_learner.cross_prompts_text.0", "text.ctx"),
               Rule("prompt_learner.cross_prompts_text.{i}", "text.deep.prompts[{i}]", offset=-1),
               Rule("prompt_learner.cross_prompts_visual.0", "vision.shallow"),
               Rule("prompt_learner.cross_prompts_visual.{i}", "vision.deep.prompts[{i}]",
                    offset=-1),
               Rule("prompt_learner.text2visual_net.", "text_to_vision."),
               Rule("prompt_learner.visual2text_net.", "vision_to_text."),
               Rule("prompt_learner.attn_pooling_text_nets.", "text_proxy_nets."),
               Rule("prompt_learner.attn_pooling_visual_nets.", "vision_proxy_nets."),
               Rule("prompt_learner.text_proxy_token.{i}", "text_proxies[{i}]", squeeze=True),
               Rule("prompt_learner.visual_proxy_token.{i}", "vision_proxies[{i}]",
                    squeeze=True)),
        config={"TRAINER.HICROPL.N_CTX": "n_ctx", "TRAINER.HICROPL.CTX_INIT": "ctx_init",
                "TRAINER.HICROPL.PROMPT_DEPTH": "depth",
                "TRAINER.HICROPL.CROSS_LAYER": "cross_layer",
                "TRAINER.HICROPL.LAMBD": "consistency_weight"},
        shapes={"n_ctx": ("text.ctx", "dim0"),
                "depth": (("text.ctx", "text.deep.prompts"), "layers"),
                "cross_layer": ("text_proxies", "dim0")},
        backbone={"prompt_learner.ZS_image_encoder.": "visual.", **CUSTOM_CLIP_BACKBONE},
        tokens="prompt_learner.", text_prompts="text.text")

    def __init__(self, clip: CLIP, classnames: Sequence[str],
                 config: Optional[HiCroPLConfig] = None, template: Optional[str] = None):
        super().__init__(clip, classnames, config, template)
        cfg, device = self.config, clip.logit_scale.device
        L = resolve_depth(cfg.depth, min(clip.transformer.layers, clip.visual.num_layers),
                          "hicropl")
        k = min(cfg.cross_layer, L - 1)
        if k != cfg.cross_layer:
            logger.warning("hicropl: cross_layer %d needs more than the %d prompted layers; "
                           "using %d", cfg.cross_layer, L, k)
        self.depth, self.cross_layer = L, k
        ctx_init = cfg.ctx_init if cfg.n_ctx <= CTX_INIT_MAX_TOKENS else None
        self.text = TextDeepPrompts(clip, self.classnames, cfg.n_ctx, ctx_init, L)
        self.vision = VisionPrompts(clip, cfg.n_ctx, L)
        with torch.no_grad():  # released: every V_l is the same draw
            self.vision.deep.prompts.copy_(self.vision.shallow.expand_as(self.vision.deep.prompts))
        dt, dv = clip.text_width, clip.vision_width
        self.text_to_vision = CrossPromptMapper(dv, dt, cfg.heads, device)
        self.vision_to_text = CrossPromptMapper(dt, dv, cfg.heads, device)
        self.text_proxy_nets = _clones(KnowledgeProxy(dt, cfg.heads, device), k)
        self.vision_proxy_nets = _clones(KnowledgeProxy(dv, cfg.heads, device), L - k)
        self.text_proxies = nn.Parameter(torch.randn(1, dt, device=device).repeat(k, 1))
        self.vision_proxies = nn.Parameter(torch.randn(1, dv, device=device).repeat(L - k, 1))
        if self.released:
            for p in self._mapping_parameters().values():
                p.requires_grad_(False)
        self.register_buffer("description_mean", None, persistent=False)
        self.dataset: Optional[str] = None

    @property
    def released(self) -> bool:
        return self.config.mapper == "released_inplace"

    def _mapping_parameters(self) -> dict[str, nn.Parameter]:
        """Mappers, LKP networks and proxy queries by name (frozen in released mode)."""
        names = ("text_to_vision", "vision_to_text", "text_proxy_nets", "vision_proxy_nets",
                 "text_proxies", "vision_proxies")
        return {n: p for n, p in self.named_parameters() if n.split(".")[0] in names}

    # ------------------------------------------------------------------ classes and dataset
    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = [c.replace("_", " ") for c in classnames]
        self.text.set_classnames(self.classnames)
        self.description_mean = None

    def set_dataset(self, dataset: str) -> None:
        """The dataset the current classes come from (whose descriptions give g)."""
        if dataset != self.dataset:
            self.dataset = dataset
            self.description_mean = None

    def descriptions(self) -> Tensor:
        """g: normalised mean description feature of each current class [C, E] (frozen)."""
        if self.description_mean is None:
            dataset = self.config.description_dataset or self.dataset
            if not dataset:
                raise ValueError("hicropl: which dataset's LLM descriptions? The engine names "
                                 "it; otherwise set the config field description_dataset")
            texts = load_descriptions(self.config.descriptions or None, dataset, self.classnames)
            self.description_mean = description_features(self.clip, texts, "mean")
        return self.description_mean

    # ------------------------------------------------------------------ prompts
    def stored_prompts(self) -> tuple[Tensor, Tensor]:
        """The stored T [L, n, Dt] and V [L, n, Dv] (layer 0 first)."""
        text = torch.cat([self.text.ctx.unsqueeze(0), self.text.deep.prompts])
        vision = torch.cat([self.vision.shallow.unsqueeze(0), self.vision.deep.prompts])
        return text, vision

    def map_prompts(self, text: Tensor, vision: Tensor) -> tuple[Tensor, Tensor]:
        """(T', V'): V_{0..k-1} mapped from the proxies of T_{0..k-1}, T_{k..L-1} from those of
        V_{k..L-1}; the other layers pass through."""
        k, n = self.cross_layer, text.shape[1]
        text_proxies = torch.cat([net(q[None], text[l]) for l, (net, q)
                                  in enumerate(zip(self.text_proxy_nets, self.text_proxies))])
        early = self.text_to_vision(vision[:k].flatten(0, 1), text_proxies)  # [k*n, Dv]
        vision_proxies = torch.cat([net(q[None], vision[k + i]) for i, (net, q)
                                    in enumerate(zip(self.vision_proxy_nets, self.vision_proxies))])
        late = self.vision_to_text(text[k:].flatten(0, 1), vision_proxies)  # [(L-k)*n, Dt]
        return (torch.cat([text[:k], late.view(-1, n, text.shape[-1])]),
                torch.cat([early.view(k, n, vision.shape[-1]), vision[k:]]))

    def prompts(self) -> tuple[Tensor, Tensor]:
        """The prompts this forward uses: mapped with autograd (functional), or mapped, written
        into the stored prompts and read back (released_inplace)."""
        if not self.released:
            return self.map_prompts(*self.stored_prompts())
        k = self.cross_layer
        with torch.no_grad():
            text, vision = self.map_prompts(*self.stored_prompts())
            self.vision.shallow.copy_(vision[0])
            self.vision.deep.prompts[: k - 1].copy_(vision[1:k])
            self.text.deep.prompts[k - 1:].copy_(text[k:])
        return self.stored_prompts()

    # ------------------------------------------------------------------ features
    def features(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Fused normalised (image v [B, E], text t [C, E]) and the frozen (z [B, E], g [C, E])."""
        text_p, vision_p = self.prompts()
        words = self.text.text
        text = self.cached_class_features(lambda: self.clip.encode_text_embeddings(
            words.assemble(text_p[0]), words.eot_indices,
            deep_prompts=self.text.deep.as_dict(text_p[1:])))
        image = self.clip.encode_image(images, prompts=vision_p[0],
                                       deep_prompts=self.vision.deep.as_dict(vision_p[1:]))
        with torch.no_grad():
            z = F.normalize(self.clip.encode_image(images), dim=-1).to(image.dtype)
        g = self.descriptions().to(text.dtype)
        v = F.normalize(F.normalize(image, dim=-1) + z, dim=-1)
        t = F.normalize(F.normalize(text, dim=-1) + g, dim=-1)
        return v, t, z, g

    def forward(self, images: Tensor) -> Tensor:
        v, t, _, _ = self.features(images)
        return self.clip.add_logit_bias(self.clip.logit_scale.exp() * v @ t.t())  # [B, C]

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        v, t, z, g = self.features(images)
        logits = self.clip.add_logit_bias(self.clip.logit_scale.exp() * v @ t.t())
        ce = F.cross_entropy(logits, labels)
        text_term = 1.0 - F.cosine_similarity(t, g, dim=-1, eps=1e-7).mean()
        image_term = 1.0 - F.cosine_similarity(v, z, dim=-1, eps=1e-7).mean()
        total = ce + self.config.consistency_weight * (text_term + image_term)
        return total, {"ce": float(ce.detach()), "text": float(text_term.detach()),
                       "image": float(image_term.detach())}

    # ------------------------------------------------------------------ checkpoint
    def extra_state_tensors(self) -> dict[str, Tensor]:
        """Released mode: the frozen mappers/LKP/proxies (their seeded init), under their
        parameter names, so a checkpoint holds the same keys in both modes."""
        if not self.released:
            return {}
        return {n: p.detach().clone() for n, p in self._mapping_parameters().items()}

    def load_extra_state_tensors(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for n, p in self._mapping_parameters().items():
                if n in state:
                    p.copy_(state[n])

    def num_registered_parameters(self) -> int:
        """Every parameter outside the frozen CLIP, trained or not (released mode freezes the
        mapping networks but keeps them)."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("clip."))


def _clones(module: nn.Module, count: int) -> nn.ModuleList:
    """``count`` copies of one initialised module (released ``_get_clones``: equal inits)."""
    return nn.ModuleList([copy.deepcopy(module) for _ in range(count)])
