"""The toy world: procedurally drawn objects with compositional attributes, and their captions.

Every image shows one object described by five attributes — shape, colour, pattern, size and
background. Captions name a random subset of them with varied phrasing, so a text encoder trained
on them has to compose words ("red" + "star") rather than memorise whole phrases; that is what lets
a CLIP pretrained here recognise colour × shape pairs it never saw together.

Drawing is vectorised over a batch with numpy (signed-distance shapes, anti-aliased edges), so a
batch of 256 images costs a few milliseconds. Two *styles* exist: ``"pretrain"`` (clean, plain
backgrounds) and ``"benchmark"`` (dimmer light, a colour cast, textured backgrounds, noise,
off-centre objects) — a deliberate distribution shift that keeps zero-shot transfer imperfect, so
prompt learning has something to adapt to.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring", "star",
                           "crescent")
#: colour name -> RGB in [0, 1]
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.15, 0.70, 0.15),
    "cyan": (0.10, 0.80, 0.85),
    "blue": (0.12, 0.22, 0.90),
    "purple": (0.55, 0.15, 0.75),
    "pink": (1.00, 0.50, 0.75),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
SIZES: tuple[str, ...] = ("small", "large")
#: background name -> RGB in [0, 1]
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.05, 0.05, 0.05),
    "gray": (0.45, 0.45, 0.45),
    "white": (0.95, 0.95, 0.95),
    "brown": (0.40, 0.26, 0.13),
}
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)
STYLES = ("pretrain", "benchmark")


@dataclass(frozen=True)
class ObjectSpec:
    """The attributes of the one object in an image (indices into the tuples above)."""

    shape: int
    colour: int
    pattern: int
    size: int
    background: int

    @property
    def words(self) -> dict[str, str]:
        return {"shape": SHAPES[self.shape], "colour": COLOUR_NAMES[self.colour],
                "pattern": PATTERNS[self.pattern], "size": SIZES[self.size],
                "background": BACKGROUND_NAMES[self.background]}


def class_name(colour: int, shape: int) -> str:
    """The benchmark's class name for a colour × shape pair, e.g. ``"red star"``."""
    return f"{COLOUR_NAMES[colour]} {SHAPES[shape]}"


def sample_specs(n: int, rng: np.random.Generator,
                 pairs: Optional[Sequence[tuple[int, int]]] = None) -> list[ObjectSpec]:
    """``n`` random objects; ``pairs`` restricts (colour, shape) to the given combinations."""
    if pairs is not None:
        chosen = rng.integers(0, len(pairs), n)
        colour = np.array([pairs[i][0] for i in chosen])
        shape = np.array([pairs[i][1] for i in chosen])
    else:
        colour = rng.integers(0, len(COLOURS), n)
        shape = rng.integers(0, len(SHAPES), n)
    pattern = rng.integers(0, len(PATTERNS), n)
    size = rng.integers(0, len(SIZES), n)
    background = rng.integers(0, len(BACKGROUNDS), n)
    return [ObjectSpec(int(s), int(c), int(p), int(z), int(b))
            for s, c, p, z, b in zip(shape, colour, pattern, size, background)]


# ----------------------------------------------------------------------------------- drawing
def _shape_sdf(kind: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (in object radii, negative inside) of each image's shape.

    kind: [N] shape index; u, v: [N, H, W] object-frame coordinates (radius 1 = object size).
    """
    r = np.sqrt(u * u + v * v)
    out = np.empty_like(u)
    for k, name in enumerate(SHAPES):
        sel = kind == k
        if not sel.any():
            continue
        a, b, rr = u[sel], v[sel], r[sel]
        if name == "circle":
            d = rr - 0.95
        elif name == "square":
            d = np.maximum(np.abs(a), np.abs(b)) - 0.78
        elif name == "triangle":  # apex up (v grows downwards in image coordinates)
            d = np.maximum(np.abs(a) * 0.866 - b * 0.5, b) - 0.45
            d = np.maximum(d, -b - 0.95)
        elif name == "diamond":
            d = (np.abs(a) + np.abs(b)) - 1.0
        elif name == "cross":
            arm_h = np.maximum(np.abs(a) - 0.95, np.abs(b) - 0.32)
            arm_v = np.maximum(np.abs(a) - 0.32, np.abs(b) - 0.95)
            d = np.minimum(arm_h, arm_v)
        elif name == "ring":
            d = np.abs(rr - 0.72) - 0.25
        elif name == "star":
            theta = np.arctan2(b, a) + np.pi / 2
            d = rr - (0.62 + 0.38 * np.cos(5 * theta))
        elif name == "crescent":
            d = np.maximum(rr - 0.95, 0.75 - np.sqrt((a - 0.45) ** 2 + (b + 0.1) ** 2))
        else:  # pragma: no cover - SHAPES and this switch are edited together
            raise AssertionError(name)
        out[sel] = d
    return out


def _pattern_mask(kind: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """1 where a pattern's second colour shows, for each image ([N, H, W], float)."""
    out = np.zeros_like(u)
    for k, name in enumerate(PATTERNS):
        sel = kind == k
        if not sel.any() or name == "plain":
            continue
        a, b = u[sel], v[sel]
        if name == "striped":
            m = (np.floor((a + b) * 2.2) % 2 == 0)
        elif name == "dotted":
            fa, fb = (a * 2.5) % 1 - 0.5, (b * 2.5) % 1 - 0.5
            m = fa * fa + fb * fb < 0.07
        else:  # checkered
            m = (np.floor(a * 2.2) + np.floor(b * 2.2)) % 2 == 0
        out[sel] = m.astype(u.dtype)
    return out


def draw(specs: Sequence[ObjectSpec], image_size: int = 32, style: str = "pretrain",
         rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Draw one object per spec: uint8 array [N, H, W, 3].

    ``style="pretrain"`` gives clean images; ``"benchmark"`` adds the distribution shift described
    in the module docstring. ``rng`` drives positions, rotations, jitter and noise.
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {STYLES}")
    rng = rng if rng is not None else np.random.default_rng(0)
    n, s = len(specs), image_size
    f32 = np.float32
    shape = np.array([o.shape for o in specs])
    colour = np.array([COLOURS[COLOUR_NAMES[o.colour]] for o in specs], dtype=f32)  # [N, 3]
    pattern = np.array([o.pattern for o in specs])
    size = np.array([o.size for o in specs])
    bg = np.array([BACKGROUNDS[BACKGROUND_NAMES[o.background]] for o in specs], dtype=f32)

    bench = style == "benchmark"
    # object radius in pixels: small ~ 0.17-0.22 of the image, large ~ 0.30-0.38
    radius = np.where(size == 0, rng.uniform(0.17, 0.22, n), rng.uniform(0.30, 0.38, n)) * s
    if bench:
        radius *= rng.uniform(0.8, 1.0, n)
    margin = radius + 1.0
    jitter = 0.30 if bench else 0.12
    cx = np.clip(s / 2 + rng.uniform(-jitter, jitter, n) * s, margin, s - margin)
    cy = np.clip(s / 2 + rng.uniform(-jitter, jitter, n) * s, margin, s - margin)
    angle = rng.uniform(-0.35, 0.35, n)

    yy, xx = np.meshgrid(np.arange(s, dtype=f32) + 0.5, np.arange(s, dtype=f32) + 0.5,
                         indexing="ij")  # [H, W]
    dx = (xx[None] - cx[:, None, None]) / radius[:, None, None]  # [N, H, W]
    dy = (yy[None] - cy[:, None, None]) / radius[:, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u = (cos * dx + sin * dy).astype(f32)
    v = (-sin * dx + cos * dy).astype(f32)

    sdf = _shape_sdf(shape, u, v) * radius[:, None, None]  # pixels
    alpha = np.clip(0.5 - sdf, 0.0, 1.0)[..., None]  # [N, H, W, 1], anti-aliased edge

    # object colour with a little per-image jitter; the pattern's second colour is a darker shade
    base = np.clip(colour * rng.uniform(0.85, 1.1, (n, 1)) + rng.normal(0, 0.03, (n, 3)), 0, 1)
    second = base * 0.35 + 0.05
    pat = _pattern_mask(pattern, u, v)[..., None]
    obj = base[:, None, None] * (1 - pat) + second[:, None, None] * pat  # [N, H, W, 3]

    back = np.clip(bg + rng.normal(0, 0.03, (n, 3)), 0, 1)[:, None, None].repeat(s, 1).repeat(s, 2)
    if bench:
        # textured background: a smooth gradient plus coarse blotches, in a shifted palette
        grad = (xx[None] / s - 0.5) * rng.uniform(-0.5, 0.5, (n, 1, 1)) \
            + (yy[None] / s - 0.5) * rng.uniform(-0.5, 0.5, (n, 1, 1))
        coarse = rng.uniform(-0.15, 0.15, (n, 4, 4))
        blot = np.kron(coarse, np.ones((s // 4 + 1, s // 4 + 1), dtype=f32))[:, :s, :s]
        back = np.clip(back + (grad + blot)[..., None], 0, 1)

    img = obj * alpha + back * (1 - alpha)
    if bench:
        # mostly systematic (learnable) lighting: dimmer, warm cast, sensor noise
        light = rng.uniform(0.6, 0.8, (n, 1, 1, 1))
        cast = rng.uniform(-0.04, 0.04, (n, 1, 1, 3)) + np.array([0.08, 0.03, -0.08], dtype=f32)
        img = img * light + cast + rng.normal(0, 0.05, img.shape)
    else:
        img = img + rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------------- captions
_PATTERN_ADJ = {"plain": "plain", "striped": "striped", "dotted": "dotted",
                "checkered": "checkered"}
_PATTERN_WITH = {"plain": "with no pattern", "striped": "with stripes", "dotted": "with dots",
                 "checkered": "with a checkered pattern"}
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
_OPENERS = ("a", "a photo of a", "a picture of a", "an image of a", "there is a", "this is a",
            "one", "a drawing of a", "a photo of the", "a photo of one")


def caption(spec: ObjectSpec, rng: random.Random) -> str:
    """One caption for an object: shape always, colour usually, the rest sometimes, in one of
    several phrasings."""
    w = spec.words
    size = rng.choice(_SIZE_WORDS[w["size"]]) if rng.random() < 0.4 else ""
    colour = w["colour"] if rng.random() < 0.9 else ""
    pattern_form = rng.random()
    pattern_adj = _PATTERN_ADJ[w["pattern"]] if pattern_form < 0.25 else ""
    pattern_with = _PATTERN_WITH[w["pattern"]] if 0.25 <= pattern_form < 0.5 else ""
    background = f"on a {w['background']} background" if rng.random() < 0.3 else ""
    form = rng.random()
    if form < 0.7 or not colour:
        words = [rng.choice(_OPENERS), size, colour, pattern_adj, w["shape"], pattern_with,
                 background]
    elif form < 0.85:
        words = [f"the {w['shape']}", pattern_with, background, "is", size, colour]
        if pattern_adj:
            words += ["and", pattern_adj]
    else:
        words = [f"{colour} {w['shape']},", size, pattern_adj, pattern_with, background]
    return " ".join(x for x in words if x).strip(" ,") + "."
