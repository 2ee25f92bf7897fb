"""Exactness of the prompt entry points of the CLIP core."""

import torch
import torch.nn.functional as F

from vlprompt import tokenize


def _rel(a, b):
    return float((a - b).norm() / b.norm())


TEXTS = ["a photo of a cat.", "a photo of a 747-400, a type of aircraft.", "itap of a dog."]


def test_encode_text_equals_embedding_entry_point(tiny_clip):
    tokens = tokenize(TEXTS)
    direct = tiny_clip.encode_text(tokens)
    via_embeddings = tiny_clip.encode_text_embeddings(tiny_clip.embed_tokens(tokens), tokens.argmax(-1))
    assert torch.equal(direct, via_embeddings)


def test_eot_truncation_is_exact(tiny_clip):
    tokens = tokenize(TEXTS)
    emb, eot = tiny_clip.embed_tokens(tokens), tokens.argmax(-1)
    full = tiny_clip.encode_text_embeddings(emb, eot, truncate=False)
    short = tiny_clip.encode_text_embeddings(emb, eot, truncate=True)
    assert _rel(short, full) <= 1e-6


def test_eot_truncation_is_exact_with_deep_prompts(tiny_clip):
    tokens = tokenize(TEXTS)
    emb, eot = tiny_clip.embed_tokens(tokens), tokens.argmax(-1)
    torch.manual_seed(0)
    deep = {1: torch.randn(4, tiny_clip.text_width), 0: torch.randn(3, 4, tiny_clip.text_width)}
    full = tiny_clip.encode_text_embeddings(emb, eot, deep_prompts=deep, truncate=False)
    short = tiny_clip.encode_text_embeddings(emb, eot, deep_prompts=deep, truncate=True)
    assert _rel(short, full) <= 1e-6
    plain = tiny_clip.encode_text_embeddings(emb, eot)
    assert _rel(short, plain) > 1e-3  # the prompts did act


def test_text_deep_prompts_replace_positions(tiny_clip):
    tokens = tokenize(TEXTS)
    emb, eot = tiny_clip.embed_tokens(tokens), tokens.argmax(-1)
    # replacing positions 1..2 before block 0 with their own embeddings + positions is a no-op
    pos = tiny_clip.positional_embedding[1:3]
    same = {0: emb[:, 1:3] + pos}
    assert _rel(tiny_clip.encode_text_embeddings(emb, eot, deep_prompts=same),
                tiny_clip.encode_text_embeddings(emb, eot)) <= 1e-6


def test_text_hidden_states_and_hook(tiny_clip):
    tokens = tokenize(TEXTS)
    emb, eot = tiny_clip.embed_tokens(tokens), tokens.argmax(-1)
    states, seen = [], []
    tiny_clip.encode_text_embeddings(emb, eot, hidden_states=states,
                                     hook=lambda i, x: seen.append(i) or x)
    assert len(states) == tiny_clip.transformer.layers == len(seen)
    assert states[0].shape == (3, int(eot.max()) + 1, tiny_clip.text_width)


def test_vision_prompts_shapes_and_effect(tiny_clip):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    D = tiny_clip.vision_width
    base = tiny_clip.encode_image(images)
    shared = tiny_clip.encode_image(images, prompts=torch.randn(4, D))
    per_sample = tiny_clip.encode_image(images, prompts=torch.randn(2, 4, D),
                                        deep_prompts={1: torch.randn(4, D)})
    assert base.shape == shared.shape == per_sample.shape == (2, tiny_clip.embed_dim)
    assert _rel(shared, base) > 1e-3
    feats, tokens = tiny_clip.encode_image(images, prompts=torch.randn(4, D), return_tokens=True)
    assert tokens.shape == (2, 1 + 16 + 4, tiny_clip.embed_dim)
    assert torch.allclose(tokens[:, 0], feats, atol=1e-6)


def test_per_sample_prompts_are_independent(tiny_clip):
    """Sample b's features depend only on its own prompts."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    prompts = torch.randn(2, 3, tiny_clip.vision_width)
    joint = tiny_clip.encode_image(images, prompts=prompts)
    alone = tiny_clip.encode_image(images[1:], prompts=prompts[1:])
    assert _rel(joint[1:], alone) <= 1e-5


def test_vision_hook_sees_previous_layer_tokens(tiny_clip):
    images = torch.randn(2, 3, 32, 32)
    shapes = []

    def hook(i, x):
        shapes.append((i, tuple(x.shape)))
        return x

    tiny_clip.encode_image(images, prompts=torch.zeros(2, tiny_clip.vision_width), hook=hook)
    assert shapes == [(0, (2, 19, 128)), (1, (2, 19, 128))]


def test_forward_logits_openai_semantics(tiny_clip):
    images, tokens = torch.randn(2, 3, 32, 32), tokenize(TEXTS)
    per_image, per_text = tiny_clip(images, tokens)
    expected = tiny_clip.logit_scale.exp() * F.normalize(tiny_clip.encode_image(images), dim=-1) \
        @ F.normalize(tiny_clip.encode_text(tokens), dim=-1).t()
    assert torch.allclose(per_image, expected) and torch.equal(per_text, per_image.t())
