"""LoRA deltas on the attention projections (``clip/lora.py`` + the core's ``attn_deltas``):
initialisation, exactness against the plain formula on both towers, scaling, dropout on the
delta input only, merging, and that the frozen CLIP is never written."""

import math

import pytest
import torch

from vlprompt import tokenize
from vlprompt.clip.fingerprint import backbone_fingerprint
from vlprompt.clip.lora import LoRA, LoRAStack, lora_scaling

from . import reference_towers as ref

TEXTS = ["a photo of a cat.", "a photo of a 747-400, a type of aircraft.", "itap of a dog."]


def _images(n=2, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _randomise_b(stack: LoRAStack, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in stack.named_parameters():
            if name.endswith(".B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _ref_deltas(stack: LoRAStack) -> dict:
    """The plain formula s * (x A^T) B^T for every adapted projection (eval: no dropout)."""
    def delta(m):
        return lambda x: (x @ m.A.t()) @ m.B.t() * m.scale
    return {i: {t: delta(getattr(block, t)) for t in ("q", "k", "v", "out")
                if getattr(block, t) is not None} for i, block in stack.as_dict().items()}


def test_reference_towers_match_the_core(tiny_clip):
    tokens = tokenize(TEXTS)
    assert ref.rel(ref.encode_image(tiny_clip, _images()), tiny_clip.encode_image(_images())) < 1e-5
    assert ref.rel(ref.encode_text(tiny_clip, tokens), tiny_clip.encode_text(tokens)) < 1e-5


def test_initialisation_and_scaling():
    torch.manual_seed(0)
    m = LoRA(64, 48, rank=4, scale=0.5)
    assert m.A.shape == (4, 64) and m.B.shape == (48, 4)
    assert torch.equal(m.B, torch.zeros(48, 4))
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert m.A.abs().max() <= bound and m.A.abs().max() > 0.8 * bound
    assert lora_scaling(1.0, 2, "alpha/sqrt(r)") == pytest.approx(1 / math.sqrt(2))
    assert lora_scaling(1.0, 2, "alpha/r") == 0.5
    with pytest.raises(ValueError):
        lora_scaling(1.0, 2, "alpha")
    with pytest.raises(ValueError):
        LoRA(8, 8, rank=0, scale=1.0)


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_zero_b_is_bit_exact_frozen_clip(tiny_clip, tower):
    transformer = tiny_clip.visual.transformer if tower == "vision" else tiny_clip.transformer
    stack = LoRAStack(transformer, ["q", "k", "v", "out"], rank=2, alpha=1.0, dropout=0.25)
    for mode in (True, False):  # dropout active or not: the delta is exactly zero
        stack.train(mode)
        if tower == "vision":
            got = tiny_clip.encode_image(_images(), attn_deltas=stack.as_dict())
            assert torch.equal(got, tiny_clip.encode_image(_images()))
        else:
            tokens = tokenize(TEXTS)
            emb, eot = tiny_clip.embed_tokens(tokens), tokens.argmax(-1)
            got = tiny_clip.encode_text_embeddings(emb, eot, attn_deltas=stack.as_dict())
            assert torch.equal(got, tiny_clip.encode_text_embeddings(emb, eot))


@pytest.mark.parametrize("targets", [["q", "k", "v"], ["q", "v"], ["k", "out"]])
@pytest.mark.parametrize("tower", ["vision", "text"])
def test_deltas_match_the_formula(tiny_clip, tower, targets):
    transformer = tiny_clip.visual.transformer if tower == "vision" else tiny_clip.transformer
    torch.manual_seed(0)
    stack = LoRAStack(transformer, targets, rank=2, alpha=1.0, dropout=0.25, layers=[1])
    _randomise_b(stack)
    stack.eval()
    if tower == "vision":
        got = tiny_clip.encode_image(_images(), attn_deltas=stack.as_dict())
        want = ref.encode_image(tiny_clip, _images(), deltas=_ref_deltas(stack))
        plain = tiny_clip.encode_image(_images())
    else:
        tokens = tokenize(TEXTS)
        emb, eot = tiny_clip.embed_tokens(tokens), tokens.argmax(-1)
        got = tiny_clip.encode_text_embeddings(emb, eot, attn_deltas=stack.as_dict())
        want = ref.encode_text(tiny_clip, tokens, deltas=_ref_deltas(stack))  # 77 tokens
        plain = tiny_clip.encode_text_embeddings(emb, eot)
    assert ref.rel(got, want) <= 1e-5
    assert ref.rel(plain, want) > 1e-3


def test_gradients_match_the_formula_and_reach_only_the_deltas(tiny_clip):
    torch.manual_seed(0)
    stack = LoRAStack(tiny_clip.visual.transformer, ["q", "k", "v"], rank=2, alpha=1.0)
    _randomise_b(stack)
    stack.eval()
    target = torch.randn(2, tiny_clip.embed_dim)
    got = tiny_clip.encode_image(_images(), attn_deltas=stack.as_dict())
    grads = torch.autograd.grad((got * target).sum(), list(stack.parameters()))
    want = ref.encode_image(tiny_clip, _images(), deltas=_ref_deltas(stack))
    ref_grads = torch.autograd.grad((want * target).sum(), list(stack.parameters()))
    for g, r in zip(grads, ref_grads, strict=True):
        assert ref.rel(g, r) <= 1e-5
    assert all(p.grad is None for p in tiny_clip.parameters())


def test_dropout_acts_on_the_delta_input_only():
    torch.manual_seed(0)
    m = LoRA(16, 16, rank=2, scale=1.0, dropout=0.5)
    with torch.no_grad():
        m.B.normal_()
    x = torch.randn(4, 16)
    m.eval()
    clean = m(x)
    torch.testing.assert_close(clean, (x @ m.A.t()) @ m.B.t())
    m.train()
    torch.manual_seed(1)
    noisy = m(x)
    torch.manual_seed(1)
    mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5, True)  # the same draw
    torch.testing.assert_close(noisy, ((x * mask) @ m.A.t()) @ m.B.t())


def test_merged_equals_unmerged_in_eval_and_is_off_in_training(tiny_clip):
    torch.manual_seed(0)
    stack = LoRAStack(tiny_clip.transformer, ["q", "k", "v", "out"], rank=2, alpha=2.0,
                      scaling="alpha/r", dropout=0.25)
    _randomise_b(stack)
    tokens = tokenize(TEXTS)
    emb, eot = tiny_clip.embed_tokens(tokens), tokens.argmax(-1)
    stack.eval()
    unmerged = tiny_clip.encode_text_embeddings(emb, eot, attn_deltas=stack.as_dict())
    for block in stack.as_dict().values():
        block.merge = True
    merged = tiny_clip.encode_text_embeddings(emb, eot, attn_deltas=stack.as_dict())
    assert ref.rel(merged, unmerged) <= 1e-5
    stack.train()  # dropout on: merging would be wrong, so the unmerged path runs
    torch.manual_seed(3)
    a = tiny_clip.encode_text_embeddings(emb, eot, attn_deltas=stack.as_dict())
    for block in stack.as_dict().values():
        block.merge = False
    torch.manual_seed(3)
    b = tiny_clip.encode_text_embeddings(emb, eot, attn_deltas=stack.as_dict())
    assert torch.equal(a, b)


def test_training_the_deltas_leaves_the_frozen_clip_and_its_fingerprint(tiny_clip):
    before = backbone_fingerprint(tiny_clip, recompute=True)
    state = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    torch.manual_seed(0)
    stack = LoRAStack(tiny_clip.visual.transformer, ["q", "k", "v"], rank=2, alpha=1.0,
                      init_b="kaiming")
    opt = torch.optim.AdamW(stack.parameters(), lr=1e-2)
    for _ in range(3):
        loss = tiny_clip.encode_image(_images(), attn_deltas=stack.as_dict()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for block in stack.as_dict().values():
        block.merge = True
    stack.eval()
    tiny_clip.encode_image(_images(), attn_deltas=stack.as_dict())
    assert backbone_fingerprint(tiny_clip, recompute=True) == before
    for k, v in tiny_clip.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_stack_layers_and_validation(tiny_clip):
    stack = LoRAStack(tiny_clip.transformer, ["q"], rank=3, alpha=1.0, layers=[1])
    assert sorted(n for n, _ in stack.named_parameters()) == ["blocks.1.q.A", "blocks.1.q.B"]
    with pytest.raises(ValueError, match="outside"):
        LoRAStack(tiny_clip.transformer, ["q"], rank=2, alpha=1.0, layers=[5])
    with pytest.raises(ValueError, match="targets"):
        LoRAStack(tiny_clip.transformer, ["w"], rank=2, alpha=1.0)
