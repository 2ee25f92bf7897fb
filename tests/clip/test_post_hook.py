"""The post-block residual-branch hook ``post_hook(i, x_in, x_out, block)`` of the CLIP core:
where it is called, what it sees, that it composes, and that it is exact against a plain
reference tower with the same branch."""

import pytest
import torch

from vlprompt import tokenize
from vlprompt.clip.model import chain_post_hooks

from . import reference_towers as ref

TEXTS = ["a photo of a cat.", "a photo of a 747-400, a type of aircraft.", "itap of a dog."]


def _images(n=2, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _branch(width, seed=0):
    """A per-token branch reading the block input through the block's ln_1 (an adapter)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(width, width, generator=g) * 0.1

    def branch(i, x_in, block):
        return torch.tanh(block.ln_1(x_in) @ w) * (i + 1)
    return branch


def test_post_hook_sees_input_output_and_block(tiny_clip):
    seen = []

    def post(i, x_in, x_out, block):
        assert block is tiny_clip.visual.transformer.resblocks[i]
        assert torch.equal(x_out, block(x_in))
        seen.append((i, x_in.shape))
        return x_out
    tiny_clip.encode_image(_images(), post_hook=post)
    assert [i for i, _ in seen] == list(range(tiny_clip.visual.num_layers))


def test_identity_post_hook_is_bit_exact(tiny_clip):
    images, tokens = _images(), tokenize(TEXTS)
    emb, eot = tiny_clip.embed_tokens(tokens), tokens.argmax(-1)
    def ident(i, x_in, x_out, block):
        return x_out
    assert torch.equal(tiny_clip.encode_image(images, post_hook=ident),
                       tiny_clip.encode_image(images))
    assert torch.equal(tiny_clip.encode_text_embeddings(emb, eot, post_hook=ident),
                       tiny_clip.encode_text_embeddings(emb, eot))


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_post_hook_matches_reference_branch(tiny_clip, tower):
    width = tiny_clip.vision_width if tower == "vision" else tiny_clip.text_width
    branch = _branch(width)
    def post(i, x_in, x_out, block):
        return x_out + branch(i, x_in, block)
    if tower == "vision":
        images = _images()
        got = tiny_clip.encode_image(images, post_hook=post)
        want = ref.encode_image(tiny_clip, images, branch=branch)
        plain = tiny_clip.encode_image(images)
    else:
        tokens = tokenize(TEXTS)
        emb, eot = tiny_clip.embed_tokens(tokens), tokens.argmax(-1)
        got = tiny_clip.encode_text_embeddings(emb, eot, post_hook=post)  # truncated: exact
        want = ref.encode_text(tiny_clip, tokens, branch=branch)  # all 77 tokens
        plain = tiny_clip.encode_text_embeddings(emb, eot)
    assert ref.rel(got, want) <= 1e-5
    assert ref.rel(plain, want) > 1e-3  # the branch acted


def test_post_hook_after_last_block_and_in_hidden_states(tiny_clip):
    """The branch of the last block acts (a pre-block hook cannot do that), and hidden_states
    record each block's output after the post hook."""
    last = tiny_clip.visual.num_layers - 1
    bump = torch.linspace(-1, 1, tiny_clip.vision_width)  # not a constant: ln_post removes those
    def post(i, x_in, x_out, block):
        return x_out + bump if i == last else x_out
    states, plain_states = [], []
    out = tiny_clip.encode_image(_images(), post_hook=post, hidden_states=states)
    plain = tiny_clip.encode_image(_images(), hidden_states=plain_states)
    assert not torch.allclose(out, plain)
    torch.testing.assert_close(states[-1], plain_states[-1] + bump)
    assert torch.equal(states[0], plain_states[0])


def test_chain_post_hooks_composes_left_to_right(tiny_clip):
    calls = []

    def add(k):
        def post(i, x_in, x_out, block):
            calls.append((k, i))
            return x_out + k * x_in.mean()
        return post
    chained = chain_post_hooks(add(1.0), None, add(2.0))
    assert chain_post_hooks() is None and chain_post_hooks(None) is None
    one = add(1.0)
    assert chain_post_hooks(None, one) is one

    def manual(i, x_in, x_out, block):
        return (x_out + 1.0 * x_in.mean()) + 2.0 * x_in.mean()
    images = _images()
    got = tiny_clip.encode_image(images, post_hook=chained)
    assert torch.equal(got, tiny_clip.encode_image(images, post_hook=manual))
    assert calls[:2] == [(1.0, 0), (2.0, 0)]


def test_post_hook_composes_with_pre_hook_and_deep_prompts(tiny_clip):
    """Pre hook and deep prompts run before the block, the post hook after it: x_in is the
    block's real input (prompts already placed)."""
    prompt = torch.randn(2, tiny_clip.vision_width)
    seen = {}

    def post(i, x_in, x_out, block):
        seen[i] = x_in
        return x_out
    tiny_clip.encode_image(_images(), prompts=prompt, deep_prompts={1: prompt * 2},
                           hook=lambda i, x: x * 1.0, post_hook=post)
    torch.testing.assert_close(seen[1][:, -2:], (prompt * 2).expand(2, -1, -1))
