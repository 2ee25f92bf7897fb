"""The toy world's drawing and captions."""

import random

import numpy as np
import pytest

from vlprompt import tokenize
from vlprompt.toyworld import world


def test_draw_shapes_dtype_and_determinism():
    specs = world.sample_specs(40, np.random.default_rng(3))
    a = world.draw(specs, 32, "pretrain", np.random.default_rng(5))
    b = world.draw(specs, 32, "pretrain", np.random.default_rng(5))
    assert a.shape == (40, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    c = world.draw(specs, 32, "benchmark", np.random.default_rng(5))
    assert c.shape == a.shape and not np.array_equal(a, c)


def test_object_has_its_named_colour():
    """The centre pixels of a plain, large object are closest to its named colour."""
    names = world.COLOUR_NAMES
    palette = np.array([world.COLOURS[n] for n in names])
    for colour in range(len(names)):
        specs = [world.ObjectSpec(shape=world.SHAPES.index("square"), colour=colour, pattern=0,
                                  size=1, background=1)] * 4
        img = world.draw(specs, 32, "pretrain", np.random.default_rng(colour)) / 255.0
        centre = img[:, 14:18, 14:18].reshape(-1, 3).mean(0)
        assert int(np.argmin(((palette - centre) ** 2).sum(1))) == colour, names[colour]


def test_shapes_differ():
    """Every shape covers a different set of pixels (same colour, position noise aside)."""
    masks = []
    for shape in range(len(world.SHAPES)):
        spec = world.ObjectSpec(shape=shape, colour=0, pattern=0, size=1, background=0)
        img = world.draw([spec], 32, "pretrain", np.random.default_rng(0))[0]
        masks.append(img[..., 0] > 128)  # red object on black
    for i in range(len(masks)):
        assert 20 < masks[i].sum() < 32 * 32 * 0.8, world.SHAPES[i]
        for j in range(i):
            assert (masks[i] ^ masks[j]).sum() > 15, (world.SHAPES[i], world.SHAPES[j])


def test_captions_name_the_shape_and_vary():
    rng = random.Random(0)
    specs = world.sample_specs(200, np.random.default_rng(0))
    caps = [world.caption(s, rng) for s in specs]
    for s, c in zip(specs, caps):
        assert world.SHAPES[s.shape] in c and c.endswith(".")
    assert len(set(caps)) > 150
    with_colour = sum(world.COLOUR_NAMES[s.colour] in c for s, c in zip(specs, caps))
    assert 0.75 * len(caps) < with_colour < len(caps)
    tokens = tokenize(caps)
    assert int(tokens.argmax(-1).max()) < 30  # short: cheap text tower


def test_unknown_style():
    with pytest.raises(ValueError, match="style"):
        world.draw(world.sample_specs(1, np.random.default_rng(0)), 32, "sketch")
