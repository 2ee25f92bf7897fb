"""A second, deliberately plain implementation of the CLIP towers, written from the formulas
(explicit q/k/v slices, softmax attention with an explicit causal mask, full 77-token text, no
truncation), with optional extras: a residual branch added after block i, additive deltas on
the q / k / v / out projections, and a token rewrite before block i (``before``, e.g.
``inserting``: tokens inserted after CLS / SOS, the text feature then read at EOT + K). Tests compare the core and the methods against it on
shared weights; it reuses the core's weights, never its code paths."""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

#: branch(i, block_input [B, T, D], block) -> [B, T, D], added to block i's output
Branch = Callable[[int, Tensor, object], Tensor]
#: {block: {"q"|"k"|"v"|"out": f(input [B, T, D]) -> delta [B, T, D]}}
Deltas = Mapping[int, Mapping[str, Callable[[Tensor], Tensor]]]
#: before(i, tokens [B, T, D]) -> tokens [B, T', D], applied before block i
Before = Callable[[int, Tensor], Tensor]


def layer_norm(ln, x: Tensor) -> Tensor:
    return F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(),
                        ln.eps).to(x.dtype)


def attention(attn, x: Tensor, causal: bool, deltas: Optional[Mapping] = None) -> Tensor:
    deltas = deltas or {}
    B, T, D = x.shape
    H = attn.heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    proj = {}
    for j, name in enumerate("qkv"):
        y = x @ w[j * D:(j + 1) * D].t() + b[j * D:(j + 1) * D]
        if name in deltas:
            y = y + deltas[name](x)
        proj[name] = y.view(B, T, H, D // H).transpose(1, 2)  # [B, H, T, d]
    scores = proj["q"] @ proj["k"].transpose(-1, -2) / math.sqrt(D // H)  # [B, H, T, T]
    if causal:
        mask = torch.full((T, T), float("-inf")).triu(1)
        scores = scores + mask
    o = (scores.softmax(-1) @ proj["v"]).transpose(1, 2).reshape(B, T, D)
    out = o @ attn.out_proj.weight.t() + attn.out_proj.bias
    if "out" in deltas:
        out = out + deltas["out"](o)
    return out


def mlp(m, x: Tensor) -> Tensor:
    h = x @ m.c_fc.weight.t() + m.c_fc.bias
    h = h * torch.sigmoid(1.702 * h)  # QuickGELU
    return h @ m.c_proj.weight.t() + m.c_proj.bias


def tower(transformer, x: Tensor, causal: bool, branch: Optional[Branch] = None,
          deltas: Optional[Deltas] = None, before: Optional[Before] = None) -> Tensor:
    for i, block in enumerate(transformer.resblocks):
        if before is not None:
            x = before(i, x)
        h = x + attention(block.attn, layer_norm(block.ln_1, x), causal, (deltas or {}).get(i))
        out = h + mlp(block.mlp, layer_norm(block.ln_2, h))
        if branch is not None:
            out = out + branch(i, x, block)
        x = out
    return x


def encode_image(clip, images: Tensor, branch: Optional[Branch] = None,
                 deltas: Optional[Deltas] = None, before: Optional[Before] = None,
                 tokens_out: Optional[list] = None) -> Tensor:
    """CLS feature [B, E]; ``tokens_out`` (a list) receives the last block's output tokens."""
    v = clip.visual
    x = F.conv2d(images, v.conv1.weight, stride=v.patch_size)  # [B, D, g, g]
    x = x.flatten(2).transpose(1, 2)  # [B, N, D]
    cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + v.positional_embedding
    x = tower(v.transformer, layer_norm(v.ln_pre, x), False, branch, deltas, before)
    if tokens_out is not None:
        tokens_out.append(x)
    return layer_norm(v.ln_post, x[:, 0]) @ v.proj


def encode_text(clip, tokens: Tensor, branch: Optional[Branch] = None,
                deltas: Optional[Deltas] = None, before: Optional[Before] = None,
                eot_offset: int = 0, embeddings: Optional[Tensor] = None) -> Tensor:
    """EOT feature [N, E] read at ``argmax + eot_offset``; ``embeddings`` [N, 77, D] replace the
    token embeddings (learned context)."""
    if embeddings is None:
        embeddings = clip.token_embedding.weight[tokens]
    x = embeddings + clip.positional_embedding  # [N, 77, D]
    x = layer_norm(clip.ln_final, tower(clip.transformer, x, True, branch, deltas, before))
    return x[torch.arange(x.shape[0]), tokens.argmax(-1) + eot_offset] @ clip.text_projection


def inserting(prompts: Mapping[int, Tensor]) -> Before:
    """Insert mode from its definition: at the first block that has prompts, put them between
    token 0 and the rest (the sequence grows by K); at later blocks with prompts, overwrite the
    K tokens after token 0. Prompts are [K, D] or [B, K, D]."""
    first = min(prompts)

    def before(i: int, x: Tensor) -> Tensor:
        if i not in prompts:
            return x
        p = prompts[i].to(x.dtype)
        p = p.expand(x.shape[0], -1, -1) if p.dim() == 2 else p
        rest = x[:, 1:] if i == first else x[:, 1 + p.shape[1]:]
        return torch.cat([x[:, :1], p, rest], dim=1)
    return before


def rel(a: Tensor, b: Tensor) -> float:
    """Relative difference ||a - b|| / ||b||."""
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())
