"""Text-prompt construction shared by the CoOp family (CoOp, CoCoOp, KgCoOp, MaPLe, IVLP,
PromptSRC, ...), and the frozen hand-crafted text features used as zero-shot classifiers and as
teachers. One implementation, so no method re-implements CoOp's ``PromptLearner``.

Prompt string = ``prefix + " " + classname + "."``, where ``prefix`` is ``ctx_init`` or ``M``
placeholder words. Positions ``1 .. M`` (after SOT) hold the learned context; everything else
(class tokens, ".", EOT) is fixed and kept as non-persistent buffers (METHODS.md §1.5).

Prompts are tokenized with the model's own tokenizer (``clip.tokenizer``). For a tokenizer
without a start token (SigLIP's SentencePiece) the context takes positions ``0 .. M-1``
(``clip.prompt_start`` = 0): ``[ctx][class words][EOS][pad...]``, the class words and EOS right
after the context as with OpenAI's ``[SOT][ctx][class].[EOT]``, and the feature read where the
model pools (SigLIP: the last of its 64 positions).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..clip.model import CLIP
from ..clip.zeroshot import hand_crafted_text_features  # noqa: F401  (re-exported for methods)
from ..perf import SWITCHES


class TextPrompts(nn.Module):
    """Fixed token embeddings around ``n_ctx`` learnable context positions, for a class list.

    ``class_position``: "end" (``[SOT][ctx][class].[EOT]``), "middle" (class between the two
    halves of the context) or "front" (``[SOT][class][ctx].[EOT]``); "middle"/"front" require a
    placeholder prefix (no ``ctx_init``), as in CoOp.
    """

    def __init__(self, clip: CLIP, classnames: Sequence[str], n_ctx: int,
                 ctx_init: Optional[str] = None, class_position: str = "end"):
        super().__init__()
        if class_position not in ("end", "middle", "front"):
            raise ValueError(f"class_position must be end, middle or front, got {class_position!r}")
        if ctx_init and class_position != "end":
            raise ValueError("ctx_init is only supported with class_position='end'")
        if getattr(clip.tokenizer, "padding_side", "right") != "right":
            raise ValueError("text prompts need a right-padded tokenizer (the learned context at "
                             "fixed positions); this model's pads on the left")
        if ctx_init and len(clip.tokenizer.encode(ctx_init)) < n_ctx:
            raise ValueError(f"ctx_init {ctx_init!r} has fewer than n_ctx={n_ctx} tokens")
        if not ctx_init and len(clip.tokenizer.encode(" ".join(["X"] * n_ctx))) != n_ctx:
            raise ValueError(f"the model's tokenizer does not encode the placeholder 'X' as one "
                             f"token, so {n_ctx} context positions cannot be placed")
        self.clip = [clip]  # a list, so the frozen CLIP is not registered as a submodule twice
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.class_position = class_position
        self.set_classnames(classnames)

    @property
    def num_classes(self) -> int:
        return self.tokens.shape[0]

    def prompt_text(self, name: str) -> str:
        """One class's prompt text; the context positions are replaced by the learned vectors
        (subclasses change the words around them)."""
        prefix = self.ctx_init or " ".join(["X"] * self.n_ctx)
        return f"{prefix} {name}."

    def set_classnames(self, classnames: Sequence[str]) -> None:
        clip = self.clip[0]
        names = [c.replace("_", " ") for c in classnames]
        tokens = clip.tokenizer.tokenize([self.prompt_text(name) for name in names],
                                         clip.context_length)
        device = clip.logit_scale.device
        with torch.no_grad():
            embeddings = clip.embed_tokens(tokens.to(device))  # [C, L, D]
        self.register_buffer("tokens", tokens.to(device), persistent=False)
        self.register_buffer("embeddings", embeddings, persistent=False)
        self.name_lens = [len(clip.tokenizer.encode(n)) for n in names]

    def init_context(self, generator: Optional[torch.Generator] = None) -> Tensor:
        """Initial context [n_ctx, D]: the word embeddings of ``ctx_init`` or N(0, 0.02^2)."""
        clip = self.clip[0]
        if self.ctx_init:
            tokens = clip.tokenizer.tokenize([self.ctx_init], clip.context_length)
            s = clip.prompt_start
            with torch.no_grad():
                return clip.embed_tokens(tokens.to(clip.logit_scale.device))[
                    0, s: s + self.n_ctx].clone().float()
        return torch.randn(self.n_ctx, clip.text_width, generator=generator) * 0.02

    @property
    def eot_indices(self) -> Tensor:
        """[C] where the model reads each prompt's feature (EOT; SigLIP: the last position)."""
        return self.clip[0].text_pool_indices(self.tokens)

    @property
    def prompt_start(self) -> int:
        """First context position: 1 after SOT, 0 without a start token (SigLIP)."""
        return self.clip[0].prompt_start

    def assemble(self, ctx: Tensor) -> Tensor:
        """Insert the context into every class prompt.

        ctx: [M, D] shared, or [C, M, D] class-specific. Returns embeddings [C, L, D].
        """
        emb = self.embeddings
        C, M = emb.shape[0], self.n_ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(C, -1, -1)
        ctx = ctx.to(emb.dtype)
        s = self.prompt_start
        prefix, rest = emb[:, :s], emb[:, s + M:]  # [C, 1, D] (SOT; [C, 0, D]), [C, L-1-M, D]
        if self.class_position == "end":
            return torch.cat([prefix, ctx, rest], dim=1)
        rows = []
        half = M // 2
        for c in range(C):
            n = self.name_lens[c]
            name, tail = rest[c: c + 1, :n], rest[c: c + 1, n:]
            if self.class_position == "middle":
                parts = [prefix[c: c + 1], ctx[c: c + 1, :half], name, ctx[c: c + 1, half:], tail]
            else:  # front
                parts = [prefix[c: c + 1], name, ctx[c: c + 1], tail]
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows, dim=0)

    def assemble_per_sample(self, ctx: Tensor) -> Tensor:
        """Per-image context [B, M, D] -> embeddings [B, C, L, D] (class position "end")."""
        B, M, D = ctx.shape
        emb = self.embeddings
        C = emb.shape[0]
        s = self.prompt_start
        prefix = emb[:, :s].unsqueeze(0).expand(B, -1, -1, -1)  # [B, C, 1, D]
        rest = emb[:, s + M:].unsqueeze(0).expand(B, -1, -1, -1)  # [B, C, L-1-M, D]
        ctx = ctx.to(emb.dtype).unsqueeze(1).expand(-1, C, -1, -1)  # [B, C, M, D]
        return torch.cat([prefix, ctx, rest], dim=2)


#: share of the free memory an automatically sized chunk of B x C prompts may use
CHUNK_MEMORY_SHARE = 0.25


def auto_chunk_size(clip: CLIP, length: int, total: int, device: torch.device,
                    keeps_activations: bool, itemsize: int = 4) -> int:
    """The prompts per text-tower call that fit ``CHUNK_MEMORY_SHARE`` of the free memory
    (``runtime.free_memory_bytes``), a power of two, at most ``total``.

    Per prompt of ``length`` tokens and width D with H heads: a chunk whose activations autograd
    keeps (checkpointed chunks recompute one chunk at a time) holds about (12 D + H L) L values
    per block; without gradients only one block's temporaries live at once, about
    (5 D + H L) L. Chunking never changes the result, only the memory and the speed."""
    from ..runtime import free_memory_bytes

    width, heads, layers = clip.text_width, clip.config.text_heads, clip.transformer.layers
    per_block = (12 * width + heads * length) if keeps_activations else (5 * width + heads * length)
    per_prompt = per_block * length * itemsize * (layers if keeps_activations else 1)
    fits = int(CHUNK_MEMORY_SHARE * free_memory_bytes(device)) // max(per_prompt, 1)
    size = 1 << max(0, fits.bit_length() - 1) if fits >= 1 else 1
    return max(1, min(size, total))


def encode_per_sample_prompts(clip: CLIP, prompts: TextPrompts, ctx: Tensor,
                              chunk_size: int | str = 0,
                              checkpoint_chunks: bool = False) -> Tensor:
    """Image-conditional prompts through the text tower, B x C prompts in chunks.

    The instance-conditional methods (CoCoOp, TOMML, MuPL) give every image its own context, so a
    batch needs B x C text passes. Only each chunk's prompts are built (gathered from the fixed
    class tokens and the context), so memory grows with ``chunk_size``, not with B x C; the result
    does not depend on the chunk size. With ``checkpoint_chunks`` the chunks' activations are
    recomputed in backward (exact, bounds training memory).

    Args:
        ctx: per-image context [B, M, D] (shared by the classes) or per-image-and-class context
            [B, C, M, D]; class position "end".
        chunk_size: prompts per text-tower call; 0 = one call; "auto" = what fits a share of
            the free memory (``auto_chunk_size``).
    Returns:
        text features [B, C, E], unnormalised.
    """
    C, M = prompts.num_classes, prompts.n_ctx
    if ctx.dim() not in (3, 4) or ctx.shape[-2] != M or (ctx.dim() == 4 and ctx.shape[1] != C):
        raise ValueError(f"context must be [B, {M}, D] or [B, {C}, {M}, D], "
                         f"got {tuple(ctx.shape)}")
    if prompts.class_position != "end":
        raise ValueError("per-sample prompts need class_position='end'")
    B = ctx.shape[0]
    per_class = ctx.dim() == 4
    eot = prompts.eot_indices
    # Cutting at the longest EOT first is exact (causal mask) and keeps the gathered chunks small.
    # off (reference mode): the official loop, one 77-token call of C prompts per image
    batched = SWITCHES.batched_conditional_text
    length = int(eot.max()) + 1 if batched else prompts.embeddings.shape[1]
    emb = prompts.embeddings[:, :length]  # (SigLIP pools the last position: length is L)
    s = prompts.prompt_start
    prefix, rest = emb[:, :s], emb[:, s + M:]  # [C, 1, D], [C, L'-1-M, D]
    ctx = ctx.to(emb.dtype)
    if per_class:
        ctx = ctx.flatten(0, 1)  # [B*C, M, D], row b*C + c

    def run(ctx: Tensor, flat: Tensor) -> Tensor:
        b, c = flat // C, flat % C  # image and class of each prompt in the chunk
        rows = ctx[flat] if per_class else ctx[b]  # [n, M, D]
        chunk_emb = torch.cat([prefix[c], rows, rest[c]], dim=1)  # [n, L', D]
        return clip.encode_text_embeddings(chunk_emb, eot[c])

    total = B * C
    use_ckpt = checkpoint_chunks and torch.is_grad_enabled() and ctx.requires_grad
    if chunk_size == "auto":
        # checkpointed chunks hold one chunk's activations at a time; otherwise (no gradients, or
        # every chunk's activations kept whatever its size) the size bounds one block's temporaries
        chunk_size = auto_chunk_size(clip, length, total, ctx.device, keeps_activations=use_ckpt,
                                     itemsize=ctx.element_size())
    step = total if chunk_size <= 0 else chunk_size
    step = step if batched else C
    feats = []
    for start in range(0, total, step):
        flat = torch.arange(start, min(start + step, total), device=ctx.device)
        feats.append(checkpoint(run, ctx, flat, use_reentrant=False) if use_ckpt
                     else run(ctx, flat))
    return torch.cat(feats).view(B, C, -1)


class FrozenFeatureCache:
    """Reuse text features computed from a learned context while nothing can change them.

    Evaluation of non-conditional methods calls the text tower once, not once per batch
    (DESIGN.md "Performance"). The cache is bypassed whenever gradients are enabled, and its key
    catches optimiser steps and loads (the tensor's version counter), edits through ``.data``
    (its sum), moves, a new class list (``tokens`` identity) and autocast changes.
    """

    def __init__(self) -> None:
        self._entry: Optional[tuple[tuple, Tensor]] = None

    def clear(self) -> None:
        self._entry = None

    def get(self, ctx: Tensor, tokens: Tensor, compute) -> Tensor:
        if torch.is_grad_enabled() or not SWITCHES.cache_text_features:
            self._entry = None
            return compute()
        key = (ctx._version, float(ctx.sum()), ctx.data_ptr(), ctx.device, id(tokens),
               torch.is_autocast_enabled(ctx.device.type))
        if self._entry is None or self._entry[0] != key:
            self._entry = (key, compute())
        return self._entry[1]
