"""Insert-mode deep prompts of the CLIP core (``inserted_prompts``): K tokens inserted after
CLS / SOS before the first listed block (the sequence grows by K), replaced at positions 1..K
before later listed blocks, the text feature read at EOT + K while truncation uses the original
EOTs. Checked against the plain reference towers, for shapes, per-sample prompts, composition
with replace-mode prompts, and bit-exactness when unused."""

import pytest
import torch

from vlprompt import tokenize
from vlprompt.clip.model import CLIPConfig, build_clip, inserted_count

from . import reference_towers as ref

TEXTS = ["a photo of a cat.", "a photo of a 747-400, a type of aircraft.", "itap of a dog."]
K = 3


@pytest.fixture
def deep_clip():
    """Four blocks per tower, float64: room for an insertion, a gap and a replacement, and a
    tolerance that shows the two implementations agree to rounding."""
    torch.manual_seed(0)
    cfg = CLIPConfig(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=4,
                     vision_heads=2, text_width=64, text_layers=4, text_heads=2)
    return build_clip(cfg).double().eval().requires_grad_(False)


def _images(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)


def _prompts(width, blocks=(1, 3), k=K, seed=1, batch=None):
    """{block: [k, width]} (or [batch, k, width]) random prompts that require grad."""
    g = torch.Generator().manual_seed(seed)
    shape = (k, width) if batch is None else (batch, k, width)
    return {i: torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
            for i in blocks}


def _text(clip):
    tokens = tokenize(TEXTS)
    return tokens, clip.embed_tokens(tokens), tokens.argmax(-1)


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_insert_mode_matches_the_reference_in_values_and_gradients(deep_clip, tower):
    """Inserted before block 1, kept through block 2 (no entry), replaced before block 3."""
    clip = deep_clip
    if tower == "vision":
        images = _images()
        prompts = _prompts(clip.vision_width)
        got = clip.encode_image(images, inserted_prompts=prompts)
        want = ref.encode_image(clip, images, before=ref.inserting(prompts))
        plain = clip.encode_image(images)
    else:
        tokens, emb, eot = _text(clip)
        prompts = _prompts(clip.text_width)
        got = clip.encode_text_embeddings(emb, eot, inserted_prompts=prompts)  # truncated
        want = ref.encode_text(clip, tokens, before=ref.inserting(prompts), eot_offset=K)  # 80
        plain = clip.encode_text_embeddings(emb, eot)
    assert ref.rel(got, want) <= 1e-10
    assert ref.rel(plain, want) > 1e-3  # the prompts acted
    weights = torch.linspace(-1, 1, got.numel(), dtype=got.dtype).view_as(got)
    g_got = torch.autograd.grad((got * weights).sum(), list(prompts.values()))
    g_want = torch.autograd.grad((want * weights).sum(), list(prompts.values()))
    for a, b in zip(g_got, g_want, strict=True):
        assert b.abs().sum() > 0 and ref.rel(a, b) <= 1e-10


def test_text_feature_is_read_at_eot_plus_k_and_truncation_is_exact(deep_clip):
    clip = deep_clip
    _, emb, eot = _text(clip)
    prompts = _prompts(clip.text_width, blocks=(0, 2))
    states = []
    got = clip.encode_text_embeddings(emb, eot, inserted_prompts=prompts, hidden_states=states)
    full = clip.encode_text_embeddings(emb, eot, inserted_prompts=prompts, truncate=False)
    assert ref.rel(got, full) <= 1e-12
    length = int(eot.max()) + 1  # the truncation the original EOTs give, grown by K
    assert [s.shape[1] for s in states] == [length + K] * 4
    last = clip.ln_final(states[-1])[torch.arange(len(TEXTS)), eot + K]
    torch.testing.assert_close(got, last @ clip.text_projection, rtol=0, atol=0)


def test_the_sequence_grows_by_k_from_the_insertion_block(deep_clip):
    clip = deep_clip
    prompts = _prompts(clip.vision_width, blocks=(2,))
    seen, states = {}, []

    def hook(i, x):
        seen[i] = x.shape[1]
        return x
    feats, tokens = clip.encode_image(_images(), inserted_prompts=prompts, hook=hook,
                                      hidden_states=states, return_tokens=True)
    n = 1 + (32 // 8) ** 2
    assert seen == {0: n, 1: n, 2: n + K, 3: n + K}  # the hook sees the tokens placed
    assert [s.shape[1] for s in states] == [n, n, n + K, n + K]
    assert tokens.shape == (2, n + K, clip.embed_dim)
    torch.testing.assert_close(feats, tokens[:, 0], rtol=0, atol=0)  # CLS stays at 0
    assert inserted_count(prompts) == K and inserted_count(None) == inserted_count({}) == 0


def test_per_sample_prompts_equal_one_sample_at_a_time(deep_clip):
    clip = deep_clip
    images = _images(3)
    prompts = _prompts(clip.vision_width, batch=3)
    batched = clip.encode_image(images, inserted_prompts=prompts)
    for b in range(3):
        single = clip.encode_image(images[b:b + 1], inserted_prompts={i: p[b] for i, p in
                                                                      prompts.items()})
        assert ref.rel(batched[b:b + 1], single) <= 1e-12
    _, emb, eot = _text(clip)
    text_prompts = _prompts(clip.text_width, batch=len(TEXTS))
    got = clip.encode_text_embeddings(emb, eot, inserted_prompts=text_prompts)
    for b in range(len(TEXTS)):
        one = clip.encode_text_embeddings(emb[b:b + 1], eot[b:b + 1],
                                          inserted_prompts={i: p[b] for i, p in
                                                            text_prompts.items()})
        assert ref.rel(got[b:b + 1], one) <= 1e-12


def test_vision_insertion_composes_with_shallow_and_replace_prompts(deep_clip):
    """Order [CLS, inserted K, patches, appended P]; replace mode keeps overwriting the last P."""
    clip = deep_clip
    images = _images()
    g = torch.Generator().manual_seed(3)
    shallow = torch.randn(2, clip.vision_width, generator=g, dtype=torch.float64)
    deep = {2: torch.randn(2, clip.vision_width, generator=g, dtype=torch.float64)}
    inserted = _prompts(clip.vision_width, blocks=(1, 2))
    got = clip.encode_image(images, prompts=shallow, deep_prompts=deep, inserted_prompts=inserted)
    insert = ref.inserting(inserted)

    def before(i, x):
        x = insert(i, x)
        if i in deep:
            x = torch.cat([x[:, :-2], deep[i].expand(x.shape[0], -1, -1)], dim=1)
        return x
    v = clip.visual
    x = torch.nn.functional.conv2d(images, v.conv1.weight, stride=v.patch_size)
    x = x.flatten(2).transpose(1, 2)
    cls = v.class_embedding.view(1, 1, -1).expand(2, 1, -1)
    x = torch.cat([cls, x], 1) + v.positional_embedding
    x = torch.cat([x, shallow.expand(2, -1, -1)], dim=1)
    x = ref.tower(v.transformer, ref.layer_norm(v.ln_pre, x), False, before=before)
    want = ref.layer_norm(v.ln_post, x[:, 0]) @ v.proj
    assert ref.rel(got, want) <= 1e-10


def test_text_replace_prompts_follow_the_inserted_tokens(deep_clip):
    """Replace-mode positions ``prompt_start..`` shift by K from the insertion block on: before
    block 0 they overwrite tokens 1..2; before block 2 (after insertion at 1) tokens K+1..K+2."""
    clip = deep_clip
    tokens, emb, eot = _text(clip)
    g = torch.Generator().manual_seed(4)
    deep = {i: torch.randn(2, clip.text_width, generator=g, dtype=torch.float64) for i in (0, 2)}
    inserted = _prompts(clip.text_width, blocks=(1, 2))
    got = clip.encode_text_embeddings(emb, eot, deep_prompts=deep, inserted_prompts=inserted)
    insert = ref.inserting(inserted)

    def before(i, x):
        x = insert(i, x)
        if i in deep:
            start = 1 + (K if i >= 1 else 0)
            x = torch.cat([x[:, :start], deep[i].expand(x.shape[0], -1, -1), x[:, start + 2:]], 1)
        return x
    want = ref.encode_text(clip, tokens, before=before, eot_offset=K)
    assert ref.rel(got, want) <= 1e-10


def test_no_inserted_prompts_is_bit_exact(tiny_clip):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = tokenize(TEXTS)
    emb, eot = tiny_clip.embed_tokens(tokens), tokens.argmax(-1)
    for empty in (None, {}):
        assert torch.equal(tiny_clip.encode_image(images, inserted_prompts=empty),
                           tiny_clip.encode_image(images))
        assert torch.equal(tiny_clip.encode_text_embeddings(emb, eot, inserted_prompts=empty),
                           tiny_clip.encode_text_embeddings(emb, eot))


def test_bad_inserted_prompts_raise(deep_clip):
    clip = deep_clip
    mixed = {1: torch.zeros(2, clip.vision_width), 2: torch.zeros(3, clip.vision_width)}
    with pytest.raises(ValueError, match="same number of tokens"):
        clip.encode_image(_images(), inserted_prompts=mixed)
    _, emb, eot = _text(clip)
    with pytest.raises(ValueError, match="blocks 0..3"):
        clip.encode_text_embeddings(emb, eot, inserted_prompts={4: torch.zeros(2, 64)})
