"""The one CLIP implementation of vlprompt (Radford et al., 2021, "Learning Transferable Visual
Models From Natural Language Supervision").

Parameter names follow the OpenAI / open_clip state-dict layout (``visual.conv1.weight``,
``transformer.resblocks.N.attn.in_proj_weight``, ``text_projection``, ...) so their checkpoints
load without renaming. Every prompt-learning method customises these towers through the
arguments of their forward functions — prompt embeddings, deep prompts per layer (replacing
or inserting tokens), per-sample prompts, per-layer hooks before and after each block,
attention-projection deltas (LoRA, ``clip/lora.py``) — never by copying an encoder (DESIGN.md,
"The CLIP core").

Tensors are batch-first inside the towers: ``[B, T, D]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Optional, Protocol, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI) or "gelu" (many open_clip models)

    def to_dict(self) -> dict:
        return asdict(self)


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


class MLP(nn.Module):
    def __init__(self, width: int, activation: str):
        super().__init__()
        self.c_fc = nn.Linear(width, width * 4)
        self.gelu = QuickGELU() if activation == "quick_gelu" else nn.GELU()
        self.c_proj = nn.Linear(width * 4, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, activation: str):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, activation)

    def forward(self, x: Tensor, causal: bool = False,
                attn_delta: Optional[AttentionDelta] = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal, delta=attn_delta)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A plain block loop. Before block ``i`` an optional hook may rewrite the tokens — this is the
    single seam through which deep prompts of every method enter (STYLE.md pattern 2); after it a
    post hook may add a residual branch, and per-block attention deltas change its projections."""

    def __init__(self, width: int, layers: int, heads: int, activation: str):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, activation) for _ in range(layers)])

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
            out = block(x, causal=causal, attn_delta=delta)
            x = out if post_hook is None else post_hook(i, x, out, block)
            if hidden_states is not None:
                hidden_states.append(x)
        return x


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


class VisionTransformer(nn.Module):
    """ViT image tower. Prompt tokens are appended after the patch tokens (after the positional
    embedding, before ``ln_pre``); deep prompts replace the last P tokens before chosen blocks."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.image_size = cfg.image_size
        self.patch_size = cfg.patch_size
        self.width = cfg.vision_width
        self.output_dim = cfg.embed_dim
        grid = cfg.image_size // cfg.patch_size
        scale = cfg.vision_width ** -0.5
        self.conv1 = nn.Conv2d(3, cfg.vision_width, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.vision_width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, cfg.vision_width))
        self.ln_pre = LayerNorm(cfg.vision_width)
        self.transformer = Transformer(cfg.vision_width, cfg.vision_layers, cfg.vision_heads, cfg.activation)
        self.ln_post = LayerNorm(cfg.vision_width)
        self.proj = nn.Parameter(scale * torch.randn(cfg.vision_width, cfg.embed_dim))

    @property
    def num_layers(self) -> int:
        return self.transformer.layers

    def embed(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] -> CLS + patch tokens with positions [B, 1 + N, D]."""
        x = self.conv1(images.to(self.conv1.weight.dtype))  # [B, D, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, N, D]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        return x + self.positional_embedding.to(x.dtype)

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
            return_tokens: also return the projected, ``ln_post``-normed output tokens [B, T, E].
            hidden_states: if a list is given, each block's output [B, T, D] is appended.
            post_hook: ``post_hook(i, x_in, x_out, block)`` after block i (residual branches).
            attn_deltas: {i: AttentionDelta} changing block i's attention projections (LoRA).
            inserted_prompts: {layer: [K, D] or [B, K, D]}, insert mode: K tokens inserted after
                CLS before the first listed block (the sequence grows by K: CLS, the K tokens,
                patches, appended prompts), replacing positions 1..K before later listed blocks.
                No positional embedding is added to them. Placed before ``deep_prompts``.
        Returns:
            image features [B, E] (unnormalised), and the tokens if ``return_tokens``.
        """
        x = self.embed(images)  # [B, 1+N, D]
        if prompts is not None:
            x = torch.cat([x, _expand(prompts.to(x.dtype), x.shape[0])], dim=1)  # [B, 1+N+P, D]
        x = self.ln_pre(x)
        hooks = chain_hooks(_inserted_prompt_hook(inserted_prompts, self.num_layers),
                            _deep_prompt_hook(deep_prompts), hook)
        x = self.transformer(x, hook=hooks, hidden_states=hidden_states, post_hook=post_hook,
                             attn_deltas=attn_deltas)
        cls = self.ln_post(x[:, 0]) @ self.proj.to(x.dtype)  # [B, E]
        if return_tokens:
            return cls, self.ln_post(x) @ self.proj.to(x.dtype)
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


class CLIP(nn.Module):
    """CLIP with the OpenAI parameter layout: ``visual`` is the image tower, the text tower's
    modules sit at the top level (``token_embedding``, ``transformer``, ``ln_final``, ...)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.context_length = cfg.context_length
        self.visual = VisionTransformer(cfg)
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.activation)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.ln_final = LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.text_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))  # ln(100)
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """OpenAI's initialisation, so randomly initialised test models have realistic scales."""
        cfg = self.config
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tower in (self.transformer, self.visual.transformer):
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
    def vision_width(self) -> int:
        return self.visual.width

    @property
    def embed_dim(self) -> int:
        return self.text_projection.shape[1]

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
        """Token ids [N, L] -> sentence features [N, E] taken at EOT (the largest id)."""
        feats = self.encode_text_embeddings(self.embed_tokens(tokens), tokens.argmax(dim=-1))
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text_embeddings(self, embeddings: Tensor, eot_indices: Tensor,
                               deep_prompts: Optional[DeepPrompts] = None, prompt_start: int = 1,
                               hook: Optional[LayerHook] = None,
                               hidden_states: Optional[list] = None,
                               truncate: bool = True, post_hook: Optional[PostHook] = None,
                               attn_deltas: Optional[AttentionDeltas] = None,
                               inserted_prompts: Optional[DeepPrompts] = None) -> Tensor:
        """The text tower from prompt embeddings — the entry point of every text-prompt method.

        Args:
            embeddings: token (and learned context) embeddings [N, L, D], without positions.
            eot_indices: [N] position of each sequence's EOT token.
            deep_prompts: {layer: [P, D] or [N, P, D]} replacing positions
                ``prompt_start .. prompt_start+P-1`` before block ``layer``.
            hook: ``hook(i, tokens)`` before block i (after deep prompts are placed).
            hidden_states: if a list is given, each block's output [N, T, D] is appended
                (``T`` is the truncated length when ``truncate``, plus K from the block where
                ``inserted_prompts`` insert theirs).
            truncate: run on the shortest length covering every EOT. The mask is causal, so tokens
                after the last EOT never influence it: exact, and 2-3x cheaper than 77 tokens.
                (A ``post_hook`` or ``attn_deltas`` must keep that property: act per token or
                causally, as adapters and LoRA do.)
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
        if truncate:
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
        x = self.transformer(x, causal=True, hook=hooks, hidden_states=hidden_states,
                             post_hook=post_hook, attn_deltas=attn_deltas)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_indices + k]  # [N, D]
        return x @ self.text_projection.to(x.dtype)

    # ----------------------------------------------------------------- both
    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """OpenAI semantics: (logits_per_image [B, N], logits_per_text [N, B])."""
        image = F.normalize(self.encode_image(images), dim=-1)
        text = F.normalize(self.encode_text(tokens), dim=-1)
        logits = self.logit_scale.exp() * image @ text.t()
        return logits, logits.t()


def build_clip(config: Union[CLIPConfig, dict]) -> CLIP:
    """A randomly initialised CLIP of the given architecture."""
    if isinstance(config, dict):
        config = CLIPConfig(**config)
    return CLIP(config)
