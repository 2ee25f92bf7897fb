"""The one CLIP implementation of vlprompt (Radford et al., 2021, "Learning Transferable Visual
Models From Natural Language Supervision").

Parameter names follow the OpenAI / open_clip state-dict layout (``visual.conv1.weight``,
``transformer.resblocks.N.attn.in_proj_weight``, ``text_projection``, ...) so their checkpoints
load without renaming. Every prompt-learning method customises these towers through the
arguments of their forward functions — prompt embeddings, deep prompts per layer (replacing
or inserting tokens), per-sample prompts, per-layer hooks before and after each block,
attention-projection deltas (LoRA, ``clip/lora.py``) — never by copying an encoder (DESIGN.md,
"The CLIP core").

SigLIP (Zhai et al., 2023, "Sigmoid Loss for Language Image Pre-Training"; the fixed-resolution
SigLIP 2 checkpoints) is the same implementation with ``CLIPConfig`` options: no CLS token and no
``ln_pre``, a conv patch embedding with bias, an attention-pooling head (``visual.map_head``)
over every output token — appended / deep prompt tokens included —, bidirectional text attention
read at the last of the padded positions (so no EOT truncation: ``capabilities`` lacks
"causal_text"), a text head with a bias, GELU-tanh, layer-norm eps 1e-6, and a sigmoid head:
``CLIP.logits`` = ``exp(logit_scale) * cos + logit_bias``. Methods keep training with softmax
cross-entropy over the classes on those logits; the bias adds the same number to every class of
a row, so that loss (and any class-softmax distillation, and the argmax) is unchanged by it.
No SigLIP pairwise sigmoid loss is offered to the methods.

Tensors are batch-first inside the towers: ``[B, T, D]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Optional, Protocol, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..perf import SWITCHES
from .resnet import ModifiedResNet
from .tokenizer import default_tokenizer

#: hook(layer_index, tokens [B, T, D]) -> tokens, called before block ``layer_index``.
LayerHook = Callable[[int, Tensor], Tensor]
#: deep prompts: {layer_index: [P, D] shared or [B, P, D] per sample}. Replace mode (the
#: towers' ``deep_prompts``) overwrites P existing tokens; insert mode (``inserted_prompts``)
#: inserts K tokens after position 0 before the first listed block and overwrites them later.
DeepPrompts = Mapping[int, Tensor]
#: post(layer_index, block input, block output, block) -> output, called after block
#: ``layer_index``: the seam for residual branches that run parallel to a block (adapters
#: reading the block input through its own ``ln_1``, added to its output).
PostHook = Callable[[int, Tensor, Tensor, nn.Module], Tensor]


class AttentionDelta(Protocol):
    """Changes how one block's attention projects its tokens (LoRA: ``clip/lora.py``).

    Each method receives the frozen weight and bias and returns the projection's output; it must
    not modify them (the frozen CLIP is shared and fingerprinted).
    """

    def in_proj(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """The fused q/k/v projection: x [B, T, D] -> [B, T, 3D] (q, k, v in that order)."""
        ...

    def out_proj(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """The output projection of the attended values: [B, T, D] -> [B, T, D]."""
        ...


#: {layer_index: AttentionDelta} for the blocks whose attention projections change
AttentionDeltas = Mapping[int, AttentionDelta]


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """Identity in the forward pass, gradient multiplied by ``scale`` in the backward pass.

    Lets a method decouple a branch's output scale from its parameters' gradient scale (e.g.
    ``grad_scale(f(grad_scale(x, s)) * s, 1 / s)``: x gets the exact gradient of ``s * f``, f's
    parameters the gradient of ``f`` unscaled)."""
    return _GradScale.apply(x, scale)


@dataclass
class CLIPConfig:
    """Architecture of a CLIP ViT model. Inferred from a checkpoint's tensors (see ``load.py``)."""

    embed_dim: int = 512
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI), "gelu" (many open_clip models) or
    #                                   "gelu_tanh" (SigLIP: GELU, tanh approximation)
    # SigLIP-family options (Zhai et al., 2023, "Sigmoid Loss for Language Image Pre-Training";
    # SigLIP 2, Tschannen et al., 2025); the defaults are OpenAI's CLIP, bit for bit
    layer_norm_eps: float = 1e-5  # SigLIP: 1e-6
    text_causal: bool = True  # False: bidirectional text attention (SigLIP)
    text_pool: str = "eot"  # "eot": the EOT token (largest id); "last": position L-1 (SigLIP)
    text_proj_bias: bool = False  # the text head adds ``text_projection_bias`` (SigLIP's head)
    vision_class_token: bool = True  # False: no CLS token, patches only (SigLIP)
    vision_ln_pre: bool = True  # False: no ``ln_pre`` (SigLIP)
    vision_pool: str = "cls"  # "cls": ln_post(CLS) @ proj; "map": attention-pooling head (SigLIP)
    vision_proj: bool = True  # False: no ``visual.proj`` (SigLIP: embed_dim == vision_width)
    patch_bias: bool = False  # the patch embedding ``visual.conv1`` has a bias (SigLIP)
    logit_bias: bool = False  # a learned ``logit_bias`` added to the logits (SigLIP's sigmoid head)
    # the pixel normalisation the image tower was trained with; () = OpenAI's, which vlprompt's
    # data pipeline applies (``PIPELINE_MEAN``/``PIPELINE_STD``). Others (SigLIP: mean = std =
    # 0.5) are converted from it inside the tower, an exact per-channel affine map
    image_mean: tuple = ()
    image_std: tuple = ()
    # MLP hidden widths (open_clip's mlp_ratio: ViT-g-14 6144 at width 1408, bigG 8192 at 1664);
    # 0 means 4 x the tower's width (OpenAI)
    vision_mlp_width: int = 0
    text_mlp_width: int = 0
    # The image tower's family: "vit" (VisionTransformer) or "resnet" (ModifiedResNet, the
    # OpenAI RN50/RN101/RN50x4/x16/x64). A ResNet uses embed_dim, image_size, vision_width (the
    # stem width: 64 for RN50), vision_heads (its attention pool's) and the four stage depths
    # ``vision_stage_layers`` (RN50: (3, 4, 6, 3)); patch_size and vision_layers are unused.
    vision_kind: str = "vit"
    vision_stage_layers: tuple = ()

    def __post_init__(self) -> None:
        if self.vision_kind not in ("vit", "resnet"):
            raise ValueError(f"vision_kind must be 'vit' or 'resnet', got {self.vision_kind!r}")
        # JSON headers hold the stage depths as a list
        self.vision_stage_layers = tuple(int(n) for n in self.vision_stage_layers)
        if self.vision_kind == "resnet" and len(self.vision_stage_layers) != 4:
            raise ValueError(f"a ResNet image tower needs four vision_stage_layers, got "
                             f"{list(self.vision_stage_layers)}")
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        if len(self.image_mean) not in (0, 3) or len(self.image_std) != len(self.image_mean):
            raise ValueError(f"image_mean and image_std must both be empty or hold 3 values, got "
                             f"{list(self.image_mean)} and {list(self.image_std)}")

    def to_dict(self) -> dict:
        return asdict(self)


#: the normalisation vlprompt's data pipeline applies (OpenAI's; ``data.transforms.CLIP_MEAN``)
PIPELINE_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIPELINE_STD = (0.26862954, 0.26130258, 0.27577711)


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32, as OpenAI's CLIP does, so fp16/bf16 weights stay stable."""

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        out = F.layer_norm(x.float(), self.normalized_shape,
                           None if self.weight is None else self.weight.float(),
                           None if self.bias is None else self.bias.float(), self.eps)
        return out.to(dtype)


class Attention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names
    (``in_proj_weight``, ``out_proj``) but computed with ``scaled_dot_product_attention`` so GPU
    runs get the flash / memory-efficient kernels."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: Tensor, causal: bool = False,
                delta: Optional[AttentionDelta] = None) -> Tensor:
        B, T, D = x.shape
        if delta is None:
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, T, 3D]
        else:
            qkv = delta.in_proj(x, self.in_proj_weight, self.in_proj_bias)  # [B, T, 3D]
        qkv = qkv.view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, T, d]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out = out.transpose(1, 2).reshape(B, T, D)  # [B, T, D]
        if delta is None:
            return self.out_proj(out)
        return delta.out_proj(out, self.out_proj.weight, self.out_proj.bias)


def _activation(name: str) -> nn.Module:
    """The MLP non-linearity a config names."""
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu_tanh":  # SigLIP (Hugging Face's gelu_pytorch_tanh)
        return nn.GELU(approximate="tanh")
    return nn.GELU()


class MLP(nn.Module):
    """c_fc -> activation -> c_proj; hidden width ``mlp_width`` (0: 4 x width, OpenAI)."""

    def __init__(self, width: int, activation: str, mlp_width: int = 0):
        super().__init__()
        hidden = mlp_width or width * 4
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = _activation(activation)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, activation: str, eps: float = 1e-5,
                 mlp_width: int = 0):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width, eps=eps)
        self.mlp = MLP(width, activation, mlp_width)

    def forward(self, x: Tensor, causal: bool = False,
                attn_delta: Optional[AttentionDelta] = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal, delta=attn_delta)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A plain block loop. Before block ``i`` an optional hook may rewrite the tokens — this is the
    single seam through which deep prompts of every method enter (STYLE.md pattern 2); after it a
    post hook may add a residual branch, and per-block attention deltas change its projections."""

    def __init__(self, width: int, layers: int, heads: int, activation: str, eps: float = 1e-5,
                 mlp_width: int = 0):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, activation, eps=eps, mlp_width=mlp_width)
             for _ in range(layers)])

    def forward(self, x: Tensor, causal: bool = False, hook: Optional[LayerHook] = None,
                hidden_states: Optional[list] = None, post_hook: Optional[PostHook] = None,
                attn_deltas: Optional[AttentionDeltas] = None) -> Tensor:
        """Run the blocks. ``hook(i, x)`` before block i; ``post_hook(i, x_in, x_out, block)``
        after it (its result is the block's output, also in ``hidden_states``);
        ``attn_deltas[i]`` changes block i's attention projections."""
        for i, block in enumerate(self.resblocks):
            if hook is not None:
                x = hook(i, x)
            delta = attn_deltas.get(i) if attn_deltas else None
            run = _compiled_block() if SWITCHES.compile_blocks else _call_block
            if SWITCHES.activation_checkpointing and torch.is_grad_enabled() and x.requires_grad:
                # recompute this block's activations in backward (exact, less memory)
                out = checkpoint(run, block, x, causal, delta, use_reentrant=False)
            else:
                out = run(block, x, causal, delta)
            x = out if post_hook is None else post_hook(i, x, out, block)
            if hidden_states is not None:
                hidden_states.append(x)
        return x


def _call_block(block: nn.Module, x: Tensor, causal: bool,
                delta: Optional[AttentionDelta]) -> Tensor:
    return block(x, causal=causal, attn_delta=delta)


_COMPILED: dict = {}


def _compiled_block() -> Callable:
    """``_call_block`` through ``torch.compile`` (``perf.SWITCHES.compile_blocks``); where
    compilation fails, a warning and eager blocks from then on."""
    if "fn" not in _COMPILED:
        compiled = torch.compile(_call_block)

        def run(block, x, causal, delta):
            if _COMPILED.get("failed"):
                return _call_block(block, x, causal, delta)
            try:
                return compiled(block, x, causal, delta)
            except Exception as err:  # noqa: BLE001 - any compiler failure falls back
                import logging

                logging.getLogger(__name__).warning(
                    "torch.compile failed (%s: %s); running the blocks eagerly",
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                _COMPILED["failed"] = True
                return _call_block(block, x, causal, delta)
        _COMPILED["fn"] = run
    return _COMPILED["fn"]


def _expand(prompt: Tensor, batch: int) -> Tensor:
    """[P, D] -> [B, P, D]; [B, P, D] is checked and passed through."""
    if prompt.dim() == 2:
        return prompt.unsqueeze(0).expand(batch, -1, -1)
    if prompt.dim() != 3 or prompt.shape[0] != batch:
        raise ValueError(f"prompt must be [P, D] or [B={batch}, P, D], got {tuple(prompt.shape)}")
    return prompt


def chain_hooks(*hooks: Optional[LayerHook]) -> Optional[LayerHook]:
    """Compose layer hooks left to right (None entries are skipped)."""
    active = [h for h in hooks if h is not None]
    if not active:
        return None
    if len(active) == 1:
        return active[0]

    def hook(i: int, x: Tensor) -> Tensor:
        for h in active:
            x = h(i, x)
        return x
    return hook


def chain_post_hooks(*hooks: Optional[PostHook]) -> Optional[PostHook]:
    """Compose post hooks left to right (None entries are skipped): each sees the block input and
    the output as rewritten by the hooks before it."""
    active = [h for h in hooks if h is not None]
    if not active:
        return None
    if len(active) == 1:
        return active[0]

    def post_hook(i: int, x_in: Tensor, x_out: Tensor, block: nn.Module) -> Tensor:
        for h in active:
            x_out = h(i, x_in, x_out, block)
        return x_out
    return post_hook


class AttentionPoolingHead(nn.Module):
    """SigLIP's multihead attention pooling ("MAP", Zhai et al., 2022/2023): a learned probe
    attends over the tokens, then a residual MLP on its LayerNorm'd result. [B, T, D] -> [B, D].

    Parameters (``visual.map_head.*``): ``probe`` [1, 1, D]; ``attn`` in the
    ``nn.MultiheadAttention`` layout (fused ``in_proj_weight`` [3D, D] for q, k, v and
    ``out_proj``), the probe giving the query, the tokens the keys and values; ``ln``; ``mlp``.
    """

    def __init__(self, width: int, heads: int, activation: str, eps: float = 1e-5,
                 mlp_width: int = 0):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, width))
        self.attn = Attention(width, heads)
        self.ln = LayerNorm(width, eps=eps)
        self.mlp = MLP(width, activation, mlp_width)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        H = self.attn.heads
        w, b = self.attn.in_proj_weight.to(x.dtype), self.attn.in_proj_bias.to(x.dtype)
        q = F.linear(self.probe.to(x.dtype).expand(B, -1, -1), w[:D], b[:D])  # [B, 1, D]
        kv = F.linear(x, w[D:], b[D:])  # [B, T, 2D]
        q = q.view(B, 1, H, D // H).transpose(1, 2)  # [B, H, 1, d]
        k, v = kv.view(B, T, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, d]
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, D)
        out = self.attn.out_proj(out)  # [B, 1, D]
        out = out + self.mlp(self.ln(out))
        return out[:, 0]  # [B, D]


class VisionTransformer(nn.Module):
    """ViT image tower. Prompt tokens are appended after the patch tokens (after the positional
    embedding, before ``ln_pre``); deep prompts replace the last P tokens before chosen blocks.

    SigLIP's tower (``vision_class_token=False``, ``vision_pool="map"``): patch tokens only, no
    ``ln_pre``, ``ln_post`` (its ``post_layernorm``) over every output token, then the attention
    pooling head ``map_head`` over all of them — appended and deep prompt tokens included, as
    SigLIP pools every token the encoder outputs — and no projection when ``vision_proj`` is off
    (its joint space is the tower width). ``num_prefix_tokens`` is 1 with a CLS token, else 0.
    """

    #: what the tower's forward supports beyond plain images (see ``CLIP.capabilities``)
    capabilities: frozenset = frozenset({"visual_prompts"})

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        if cfg.vision_class_token:
            self.capabilities = frozenset({"visual_prompts", "class_token"})
        if cfg.vision_pool not in ("cls", "map"):
            raise ValueError(f"vision_pool must be 'cls' or 'map', got {cfg.vision_pool!r}")
        if cfg.vision_pool == "cls" and not cfg.vision_class_token:
            raise ValueError("vision_pool 'cls' needs a class token (vision_class_token)")
        if not cfg.vision_proj and cfg.embed_dim != cfg.vision_width:
            raise ValueError(f"without a vision projection embed_dim ({cfg.embed_dim}) must equal "
                             f"vision_width ({cfg.vision_width})")
        self.image_size = cfg.image_size
        self.patch_size = cfg.patch_size
        self.width = cfg.vision_width
        self.output_dim = cfg.embed_dim
        self.num_prefix_tokens = 1 if cfg.vision_class_token else 0
        grid = cfg.image_size // cfg.patch_size
        scale = cfg.vision_width ** -0.5
        eps = cfg.layer_norm_eps
        self.conv1 = nn.Conv2d(3, cfg.vision_width, cfg.patch_size, cfg.patch_size,
                               bias=cfg.patch_bias)
        if cfg.vision_class_token:
            self.class_embedding = nn.Parameter(scale * torch.randn(cfg.vision_width))
        else:
            self.register_parameter("class_embedding", None)
        self.positional_embedding = nn.Parameter(
            scale * torch.randn(grid * grid + self.num_prefix_tokens, cfg.vision_width))
        self.ln_pre = LayerNorm(cfg.vision_width, eps=eps) if cfg.vision_ln_pre else nn.Identity()
        self.transformer = Transformer(cfg.vision_width, cfg.vision_layers, cfg.vision_heads,
                                       cfg.activation, eps=eps, mlp_width=cfg.vision_mlp_width)
        self.ln_post = LayerNorm(cfg.vision_width, eps=eps)
        if cfg.vision_proj:
            self.proj = nn.Parameter(scale * torch.randn(cfg.vision_width, cfg.embed_dim))
        else:
            self.register_parameter("proj", None)
        self.map_head = (AttentionPoolingHead(cfg.vision_width, cfg.vision_heads, cfg.activation,
                                              eps=eps, mlp_width=cfg.vision_mlp_width)
                         if cfg.vision_pool == "map" else None)
        # images arrive normalised as the pipeline does (OpenAI's mean/std); a tower trained
        # with another normalisation maps them: x * (std_p / std) + (mean_p - mean) / std
        self.input_affine = bool(cfg.image_mean) and (
            cfg.image_mean != PIPELINE_MEAN or cfg.image_std != PIPELINE_STD)
        if self.input_affine:
            mean, std = torch.tensor(cfg.image_mean), torch.tensor(cfg.image_std)
            p_mean, p_std = torch.tensor(PIPELINE_MEAN), torch.tensor(PIPELINE_STD)
            self.register_buffer("input_scale", (p_std / std).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("input_shift", ((p_mean - mean) / std).view(1, 3, 1, 1),
                                 persistent=False)

    @property
    def num_layers(self) -> int:
        return self.transformer.layers

    def embed(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] -> CLS + patch tokens with positions [B, 1 + N, D] (patch tokens
        only, [B, N, D], without a class token). ``images`` are normalised as vlprompt's data
        pipeline does (OpenAI's mean/std) whatever the model (see ``CLIPConfig.image_mean``)."""
        if self.input_affine:  # e.g. SigLIP's (x - 0.5) / 0.5 from the pipeline's normalisation
            images = images * self.input_scale.to(images.dtype) + self.input_shift.to(images.dtype)
        x = self.conv1(images.to(self.conv1.weight.dtype))  # [B, D, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, N, D]
        if self.class_embedding is not None:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
        return x + self.positional_embedding.to(x.dtype)

    def _project(self, x: Tensor) -> Tensor:
        """[..., D] -> [..., E] through ``proj`` (identity without one)."""
        return x if self.proj is None else x @ self.proj.to(x.dtype)

    def forward(self, images: Tensor, prompts: Optional[Tensor] = None,
                deep_prompts: Optional[DeepPrompts] = None, hook: Optional[LayerHook] = None,
                return_tokens: bool = False, hidden_states: Optional[list] = None,
                post_hook: Optional[PostHook] = None,
                attn_deltas: Optional[AttentionDeltas] = None,
                inserted_prompts: Optional[DeepPrompts] = None
                ) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """Encode images.

        Args:
            images: [B, 3, H, W].
            prompts: shallow prompts appended after the patch tokens, [P, D] or [B, P, D].
            deep_prompts: {layer: [P, D] or [B, P, D]} replacing the last P tokens before block
                ``layer`` (layer >= 1; the count P must equal the shallow prompts').
            hook: called as ``hook(i, tokens)`` before block i, after deep prompts are placed;
                used by methods that generate prompts from the previous layer's tokens.
            return_tokens: also return the projected, ``ln_post``-normed output tokens [B, T, E]
                (without a class token they start with the patches: ``num_prefix_tokens`` 0).
            hidden_states: if a list is given, each block's output [B, T, D] is appended.
            post_hook: ``post_hook(i, x_in, x_out, block)`` after block i (residual branches).
            attn_deltas: {i: AttentionDelta} changing block i's attention projections (LoRA).
            inserted_prompts: {layer: [K, D] or [B, K, D]}, insert mode: K tokens inserted after
                CLS before the first listed block (the sequence grows by K: CLS, the K tokens,
                patches, appended prompts), replacing positions 1..K before later listed blocks.
                No positional embedding is added to them. Placed before ``deep_prompts``.
                Needs a class token.
        Returns:
            image features [B, E] (unnormalised), and the tokens if ``return_tokens``.
        """
        if inserted_prompts and self.class_embedding is None:
            raise ValueError("inserted prompts go after the class token, and this vision tower "
                             "has none (SigLIP)")
        x = self.embed(images)  # [B, 1+N, D]
        if prompts is not None:
            x = torch.cat([x, _expand(prompts.to(x.dtype), x.shape[0])], dim=1)  # [B, 1+N+P, D]
        x = self.ln_pre(x)
        hooks = chain_hooks(_inserted_prompt_hook(inserted_prompts, self.num_layers),
                            _deep_prompt_hook(deep_prompts), hook)
        x = self.transformer(x, hook=hooks, hidden_states=hidden_states, post_hook=post_hook,
                             attn_deltas=attn_deltas)
        if self.map_head is not None:  # SigLIP: attention pooling over every output token
            tokens = self.ln_post(x)  # [B, T, D]
            pooled = self._project(self.map_head(tokens))  # [B, E]
            return (pooled, self._project(tokens)) if return_tokens else pooled
        cls = self._project(self.ln_post(x[:, 0]))  # [B, E]
        if return_tokens:
            return cls, self._project(self.ln_post(x))
        return cls


def inserted_count(inserted_prompts: Optional[DeepPrompts]) -> int:
    """K, the number of tokens ``inserted_prompts`` insert (0 for None or {}); every entry must
    hold the same K."""
    if not inserted_prompts:
        return 0
    counts = {int(p.shape[-2]) for p in inserted_prompts.values()}
    if len(counts) != 1:
        raise ValueError(f"inserted prompts must all hold the same number of tokens, got "
                         f"{sorted(counts)}")
    return counts.pop()


def _inserted_prompt_hook(inserted_prompts: Optional[DeepPrompts], layers: int
                          ) -> Optional[LayerHook]:
    """Insert mode: before the first listed block, ``inserted_prompts[i]`` (K tokens) is inserted
    after position 0 (CLS / SOS), so the sequence grows by K; before each later listed block it
    replaces positions 1..K. Blocks in between keep the tokens as the previous block left them."""
    k = inserted_count(inserted_prompts)
    if not k:
        return None
    first = min(inserted_prompts)
    if not 0 <= first < layers:
        raise ValueError(f"inserted prompts start before block {first}, but the tower has blocks "
                         f"0..{layers - 1}")

    def hook(i: int, x: Tensor) -> Tensor:
        p = inserted_prompts.get(i)
        if p is None:
            return x
        p = _expand(p.to(x.dtype), x.shape[0])  # [B, K, D]
        keep = 1 if i == first else 1 + k  # insert, or replace positions 1..K
        return torch.cat([x[:, :1], p, x[:, keep:]], dim=1)
    return hook


def _switch_hooks(block: int, before: LayerHook, after: LayerHook) -> LayerHook:
    """``before`` for blocks < ``block``, ``after`` from ``block`` on."""
    def hook(i: int, x: Tensor) -> Tensor:
        return (after if i >= block else before)(i, x)
    return hook


def _deep_prompt_hook(deep_prompts: Optional[DeepPrompts], start: Optional[int] = None
                      ) -> Optional[LayerHook]:
    """A hook that places ``deep_prompts[i]`` before block i: at positions ``start .. start+P-1``
    (text), or over the last P tokens when ``start`` is None (vision)."""
    if not deep_prompts:
        return None

    def hook(i: int, x: Tensor) -> Tensor:
        p = deep_prompts.get(i)
        if p is None:
            return x
        p = _expand(p.to(x.dtype), x.shape[0])  # [B, P, D]
        first = x.shape[1] - p.shape[1] if start is None else start
        return torch.cat([x[:, :first], p, x[:, first + p.shape[1]:]], dim=1)
    return hook


def _image_tower(cfg: CLIPConfig) -> nn.Module:
    """The image tower the config describes: ``ModifiedResNet`` or ``VisionTransformer``."""
    if cfg.vision_kind == "resnet":
        return ModifiedResNet(cfg.vision_stage_layers, cfg.embed_dim, cfg.vision_heads,
                              cfg.image_size, cfg.vision_width)
    return VisionTransformer(cfg)


class CLIP(nn.Module):
    """CLIP with the OpenAI parameter layout: ``visual`` is the image tower, the text tower's
    modules sit at the top level (``token_embedding``, ``transformer``, ``ln_final``, ...).

    SigLIP (the config's SigLIP options) shares that layout; its own tensors are
    ``text_projection_bias`` (the bias of its text head; ``text_projection`` holds the head's
    weight transposed), ``logit_bias`` and ``visual.map_head.*``. Its text attention is
    bidirectional and pools position L-1 of the padded sequence, so text truncation is off.

    ``tokenizer`` is the model's own (``vlprompt.clip.tokenizer``): OpenAI's BPE unless the
    loader set another (SigLIP's SentencePiece model from its folder). Prompt code tokenizes
    with it and places learned context from ``prompt_start`` (after SOT: 1; no start token: 0).
    """

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        if cfg.text_pool not in ("eot", "last"):
            raise ValueError(f"text_pool must be 'eot' or 'last', got {cfg.text_pool!r}")
        self.config = cfg
        self.context_length = cfg.context_length
        self.tokenizer = default_tokenizer()
        eps = cfg.layer_norm_eps
        self.visual = _image_tower(cfg)
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads,
                                       cfg.activation, eps=eps, mlp_width=cfg.text_mlp_width)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.ln_final = LayerNorm(cfg.text_width, eps=eps)
        self.text_projection = nn.Parameter(torch.empty(cfg.text_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))  # ln(100)
        if cfg.text_proj_bias:
            self.text_projection_bias = nn.Parameter(torch.zeros(cfg.embed_dim))
        else:
            self.register_parameter("text_projection_bias", None)
        if cfg.logit_bias:  # SigLIP's initial values: scale ln(10), bias -10
            self.logit_bias = nn.Parameter(torch.tensor(-10.0))
            with torch.no_grad():
                self.logit_scale.fill_(2.302585)
        else:
            self.register_parameter("logit_bias", None)
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """OpenAI's initialisation, so randomly initialised test models have realistic scales."""
        cfg = self.config
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            self.visual.initialize_parameters()
        towers = [self.transformer] + ([self.visual.transformer]
                                       if isinstance(self.visual, VisionTransformer) else [])
        for tower in towers:
            proj_std = (tower.width ** -0.5) * ((2 * tower.layers) ** -0.5)
            attn_std = tower.width ** -0.5
            fc_std = (2 * tower.width) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=cfg.text_width ** -0.5)

    # ----------------------------------------------------------------- properties
    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def text_width(self) -> int:
        return self.transformer.width

    @property
    def capabilities(self) -> frozenset:
        """What the image tower supports beyond plain images: ``"visual_prompts"`` (prompt tokens,
        deep / inserted prompts, layer hooks, hidden states, post hooks, attention deltas and
        returned tokens: a ViT tower) or nothing (a ResNet). Methods ask for capabilities
        (``Method.requires``) instead of testing the backbone family.

        Also: ``"class_token"`` (the image tokens start with a CLS token, which inserted prompts
        follow and CLS readouts read: not SigLIP), ``"text_start_token"`` (the tokenizer puts a
        start token before the learned context: not SigLIP) and ``"causal_text"`` (causal text
        attention, so the text tower may be truncated after EOT: not SigLIP)."""
        caps = set(getattr(self.visual, "capabilities", frozenset()))
        if self.prompt_start >= 1:
            caps.add("text_start_token")
        if self.config.text_causal:
            caps.add("causal_text")
        return frozenset(caps)

    @property
    def vision_width(self) -> int:
        return self.visual.width

    @property
    def embed_dim(self) -> int:
        return self.text_projection.shape[1]

    @property
    def prompt_start(self) -> int:
        """First position of learned text context: 1 after a start token (OpenAI's SOT), 0 for a
        tokenizer without one (SigLIP)."""
        return self.tokenizer.prompt_start

    def text_pool_indices(self, tokens: Tensor) -> Tensor:
        """[N, L] token ids -> [N] position the text feature is read at: EOT (the largest id) or,
        for last-token pooling (SigLIP), L - 1."""
        if self.config.text_pool == "last":
            return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long,
                              device=tokens.device)
        return tokens.argmax(dim=-1)

    def logits(self, image_features: Tensor, text_features: Tensor,
               normalize: bool = True) -> Tensor:
        """The model's logits: ``logit_scale.exp() * cos(image, text)`` (+ ``logit_bias``:
        SigLIP's sigmoid head, whose pairwise probabilities are ``sigmoid(logits)``).
        [B, E] x [C, E] -> [B, C]; per-sample text features [B, C, E] give [B, C].

        The bias shifts every class of a row alike, so softmax cross-entropy over classes,
        distillation on class softmaxes and the argmax are the same with or without it."""
        if normalize:
            image_features = F.normalize(image_features, dim=-1)
            text_features = F.normalize(text_features, dim=-1)
        scale = self.logit_scale.exp()
        if text_features.dim() == 3:
            out = scale * torch.einsum("be,bce->bc", image_features, text_features)
        else:
            out = scale * image_features @ text_features.t()
        return self.add_logit_bias(out)

    def add_logit_bias(self, logits: Tensor) -> Tensor:
        """``logits + logit_bias`` for a sigmoid head (SigLIP); unchanged otherwise."""
        return logits if self.logit_bias is None else logits + self.logit_bias.to(logits.dtype)

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    # ----------------------------------------------------------------- image tower
    def encode_image(self, images: Tensor, normalize: bool = False, **prompt_kwargs) -> Tensor:
        """Image features [B, E]. ``prompt_kwargs`` go to ``VisionTransformer.forward``."""
        out = self.visual(images, **prompt_kwargs)
        if normalize:
            feats = out[0] if isinstance(out, tuple) else out
            feats = F.normalize(feats, dim=-1)
            return (feats, out[1]) if isinstance(out, tuple) else feats
        return out

    # ----------------------------------------------------------------- text tower
    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """Token ids [N, L] -> token embeddings [N, L, D] (no positions)."""
        return self.token_embedding(tokens)

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        """Token ids [N, L] -> sentence features [N, E] taken at EOT (the largest id), or at
        position L-1 for last-token pooling (SigLIP)."""
        feats = self.encode_text_embeddings(self.embed_tokens(tokens),
                                            self.text_pool_indices(tokens))
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text_embeddings(self, embeddings: Tensor, eot_indices: Tensor,
                               deep_prompts: Optional[DeepPrompts] = None,
                               prompt_start: Optional[int] = None,
                               hook: Optional[LayerHook] = None,
                               hidden_states: Optional[list] = None,
                               truncate: bool = True, post_hook: Optional[PostHook] = None,
                               attn_deltas: Optional[AttentionDeltas] = None,
                               inserted_prompts: Optional[DeepPrompts] = None) -> Tensor:
        """The text tower from prompt embeddings — the entry point of every text-prompt method.

        Args:
            embeddings: token (and learned context) embeddings [N, L, D], without positions.
            eot_indices: [N] position of each sequence's EOT token (``text_pool_indices``);
                last-token pooling (SigLIP) reads the last position of the sequence whatever
                they say.
            deep_prompts: {layer: [P, D] or [N, P, D]} replacing positions
                ``prompt_start .. prompt_start+P-1`` before block ``layer``.
            prompt_start: default ``self.prompt_start`` (1 after SOT; 0 without a start token).
            hook: ``hook(i, tokens)`` before block i (after deep prompts are placed).
            hidden_states: if a list is given, each block's output [N, T, D] is appended
                (``T`` is the truncated length when ``truncate``, plus K from the block where
                ``inserted_prompts`` insert theirs).
            truncate: run on the shortest length covering every EOT. The mask is causal, so tokens
                after the last EOT never influence it: exact, and 2-3x cheaper than 77 tokens.
                (A ``post_hook`` or ``attn_deltas`` must keep that property: act per token or
                causally, as adapters and LoRA do.) Off for bidirectional text attention
                (SigLIP), where every position reaches the pooled one.
            post_hook: ``post_hook(i, x_in, x_out, block)`` after block i (residual branches).
            attn_deltas: {i: AttentionDelta} changing block i's attention projections (LoRA).
            inserted_prompts: {layer: [K, D] or [N, K, D]}, insert mode: K tokens inserted after
                SOS before the first listed block (the sequence grows by K, the causal mask with
                it), replacing positions 1..K before later listed blocks; no positional
                embedding. The feature is read at EOT + K; truncation still uses the original
                EOTs (exact: the inserted tokens precede them). From that block on, the
                ``deep_prompts`` positions shift by K too (they follow the inserted tokens).
        Returns:
            sentence features [N, E], unnormalised.
        """
        eot_indices = eot_indices.to(embeddings.device)
        if prompt_start is None:
            prompt_start = self.prompt_start
        causal = self.config.text_causal
        if truncate and SWITCHES.truncate_text and causal:
            length = int(eot_indices.max()) + 1
            if deep_prompts:
                length = max(length, prompt_start + max(p.shape[-2] for p in deep_prompts.values()))
            embeddings = embeddings[:, :length]
        x = embeddings.to(self.dtype) + self.positional_embedding[: embeddings.shape[1]].to(self.dtype)
        k = inserted_count(inserted_prompts)
        replace = _deep_prompt_hook(deep_prompts, prompt_start)
        if k and replace is not None:  # positions follow the inserted tokens once they are in
            replace = _switch_hooks(min(inserted_prompts), replace,
                                    _deep_prompt_hook(deep_prompts, prompt_start + k))
        hooks = chain_hooks(_inserted_prompt_hook(inserted_prompts, self.transformer.layers),
                            replace, hook)
        x = self.transformer(x, causal=causal, hook=hooks, hidden_states=hidden_states,
                             post_hook=post_hook, attn_deltas=attn_deltas)
        x = self.ln_final(x)
        if self.config.text_pool == "last":
            x = x[:, -1]  # [N, D]
        else:
            x = x[torch.arange(x.shape[0], device=x.device), eot_indices + k]  # [N, D]
        x = x @ self.text_projection.to(x.dtype)
        if self.text_projection_bias is not None:
            x = x + self.text_projection_bias.to(x.dtype)
        return x

    # ----------------------------------------------------------------- both
    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """OpenAI semantics: (logits_per_image [B, N], logits_per_text [N, B])."""
        image = F.normalize(self.encode_image(images), dim=-1)
        text = F.normalize(self.encode_text(tokens), dim=-1)
        logits = self.add_logit_bias(self.logit_scale.exp() * image @ text.t())
        return logits, logits.t()


def build_clip(config: Union[CLIPConfig, dict]) -> CLIP:
    """A randomly initialised CLIP of the given architecture."""
    if isinstance(config, dict):
        config = CLIPConfig(**config)
    return CLIP(config)
