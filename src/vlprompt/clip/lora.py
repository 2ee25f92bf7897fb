"""Low-rank deltas on the attention projections of the CLIP towers (LoRA: Hu et al., ICLR 2022).

A frozen projection ``y = W x + b`` becomes ``y = W x + b + s * B A drop(x)`` with A [r, d_in],
B [d_out, r], ``s = alpha / sqrt(r)`` or ``alpha / r``, A ~ kaiming_uniform(a=sqrt(5)) and B = 0,
so a fresh delta is exactly zero. The deltas are modules of the *method*: the core only receives
them as ``attn_deltas={block: AttentionLoRA}`` (``clip.model.AttentionDelta``) and never changes
its own weights, so the frozen CLIP and its fingerprint stay as loaded. In eval mode a delta can
be merged, ``(W + s B A) x + b``: one matmul, equal up to rounding (dropout is off in eval).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import Transformer

#: projections a delta can adapt: the three slices of the fused in-projection and out-proj
LORA_TARGETS = ("q", "k", "v", "out")
#: "alpha/sqrt(r)" (rank-stabilised) or "alpha/r" (the original LoRA)
LORA_SCALINGS = ("alpha/sqrt(r)", "alpha/r")
#: initialisations of B: "zeros" (LoRA; a fresh delta is zero) or "kaiming" (as A: the delta
#: is non-zero from the start, so A receives a gradient at step 0 — for tests and ablations)
LORA_B_INITS = ("zeros", "kaiming")


def lora_scaling(alpha: float, rank: int, scaling: str) -> float:
    """The factor s of ``s * B A x``."""
    if scaling not in LORA_SCALINGS:
        raise ValueError(f"LoRA scaling must be one of {', '.join(LORA_SCALINGS)}, got {scaling!r}")
    return alpha / math.sqrt(rank) if scaling == "alpha/sqrt(r)" else alpha / rank


class LoRA(nn.Module):
    """The delta ``s * B A drop(x)`` of one frozen Linear d_in -> d_out.

    ``A`` [r, d_in], ``B`` [d_out, r]; dropout acts on the delta's input only, so the frozen
    path sees the clean tokens.
    """

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float, dropout: float = 0.0,
                 init_b: str = "zeros", device: Optional[torch.device] = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if init_b not in LORA_B_INITS:
            raise ValueError(f"LoRA init_b must be one of {', '.join(LORA_B_INITS)}, "
                             f"got {init_b!r}")
        self.scale = float(scale)
        self.A = nn.Parameter(torch.empty(rank, d_in, device=device))
        self.B = nn.Parameter(torch.zeros(d_out, rank, device=device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if init_b == "kaiming":
            nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """x [..., d_in] -> delta [..., d_out]."""
        h = F.linear(self.dropout(x), self.A.to(x.dtype))  # [..., r]
        return F.linear(h, self.B.to(x.dtype)) * self.scale

    def delta_weight(self) -> Tensor:
        """``s * B A`` [d_out, d_in], the change of the frozen weight."""
        return (self.B @ self.A) * self.scale


class AttentionLoRA(nn.Module):
    """LoRA deltas on one attention block's q / k / v (slices of the fused in-projection) and
    optionally out projections; an ``AttentionDelta`` for the core.

    Every adapted projection has its own dropout (independent masks). With ``merge`` set, eval
    mode computes ``(W + dW) x + b`` instead of ``W x + b + dW x``.
    """

    def __init__(self, width: int, targets: Sequence[str], rank: int, scale: float,
                 dropout: float = 0.0, init_b: str = "zeros", merge: bool = False,
                 device: Optional[torch.device] = None):
        super().__init__()
        unknown = sorted(set(targets) - set(LORA_TARGETS))
        if unknown or not targets:
            raise ValueError(f"LoRA targets must be a non-empty subset of {LORA_TARGETS}, "
                             f"got {list(targets)}")
        self.width = width
        self.merge = merge
        for t in LORA_TARGETS:
            delta = (LoRA(width, width, rank, scale, dropout, init_b, device)
                     if t in targets else None)
            setattr(self, t, delta)

    def _merged(self) -> bool:
        return self.merge and not self.training

    def _in_deltas(self) -> list[Optional[LoRA]]:
        return [self.q, self.k, self.v]

    def in_proj(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        deltas = self._in_deltas()
        if self._merged():
            dw = torch.cat([torch.zeros_like(weight[: self.width]) if d is None
                            else d.delta_weight().to(weight.dtype) for d in deltas])  # [3D, D]
            return F.linear(x, weight + dw, bias)
        qkv = F.linear(x, weight, bias)  # [B, T, 3D]
        if all(d is None for d in deltas):
            return qkv
        parts = list(qkv.split(self.width, dim=-1))  # 3 x [B, T, D]
        for j, d in enumerate(deltas):
            if d is not None:
                parts[j] = parts[j] + d(x)
        return torch.cat(parts, dim=-1)

    def out_proj(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        if self.out is None:
            return F.linear(x, weight, bias)
        if self._merged():
            return F.linear(x, weight + self.out.delta_weight().to(weight.dtype), bias)
        return F.linear(x, weight, bias) + self.out(x)


class LoRAStack(nn.Module):
    """``AttentionLoRA`` for chosen blocks of one tower; ``as_dict()`` is the ``attn_deltas``
    argument of ``VisionTransformer.forward`` / ``CLIP.encode_text_embeddings``.

    ``layers``: 0-based block indices (None: every block). Parameters ``blocks.<i>.<q|k|v|out>.
    <A|B>``.
    """

    def __init__(self, transformer: Transformer, targets: Sequence[str], rank: int, alpha: float,
                 scaling: str = "alpha/sqrt(r)", dropout: float = 0.0,
                 layers: Optional[Sequence[int]] = None, init_b: str = "zeros",
                 merge: bool = False):
        super().__init__()
        n = transformer.layers
        layers = list(range(n)) if layers is None else sorted(set(int(i) for i in layers))
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"LoRA layers {bad} outside the tower's blocks 0..{n - 1}")
        device = transformer.resblocks[0].attn.in_proj_weight.device
        scale = lora_scaling(alpha, rank, scaling)
        self.blocks = nn.ModuleDict({
            str(i): AttentionLoRA(transformer.width, targets, rank, scale, dropout, init_b, merge,
                                  device) for i in layers})

    def as_dict(self) -> dict[int, AttentionLoRA]:
        return {int(i): m for i, m in self.blocks.items()}
