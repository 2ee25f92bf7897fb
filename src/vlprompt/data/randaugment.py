"""Dassl's RandAugment (``dassl/data/transforms/randaugment.py``, class ``RandAugment``), in
Pillow, drawing its random numbers from a ``torch.Generator``.

CoPrompt's training views use it (``INPUT.TRANSFORMS ["randaugment", "normalize"]``, Dassl's
defaults ``RANDAUGMENT_N = 2``, ``RANDAUGMENT_M = 10``). It is *not* torchvision's RandAugment:
the op list (16 ops, from the EfficientNet AutoAugment code, with ``SolarizeAdd``, ``CutoutAbs``
and absolute-pixel translations), the magnitude rule ``v = m/30 * (max - min) + min`` and the
random sign flips are Dassl's:

* ``n`` ops are drawn with replacement, uniformly (``random.choices``: ``floor(u * 16)``), all
  before any op runs; every op gets the same magnitude ``m``;
* Rotate, ShearX/Y and TranslateX/Yabs negate their value when a draw ``u > 0.5``;
* CutoutAbs draws its corner as Dassl's ``np.random.uniform(w)`` does, i.e. numpy's
  ``uniform(low=w, high=1.0)`` = ``w + (1 - w) * u`` (a corner in (1, w], the quirk kept), then
  paints a ``v x v`` square of colour (125, 123, 114);
* geometric ops sample with nearest neighbour and fill with black (Pillow's defaults).

Randomness: Dassl draws from Python's ``random`` and numpy's global state; here every draw is a
float64 ``torch.rand`` from the generator given (the item's augmentation seed in the engine), in
the same order (the op choices, then each op's own draws), so an item's augmentation does not
depend on workers or processes. The distribution is Dassl's; the streams are not (their seeding
differs anyway).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np
import PIL.ImageDraw
import PIL.ImageEnhance
import PIL.ImageOps
import torch
from PIL import Image

#: a uniform draw in [0, 1)
Uniform = Callable[[], float]
#: Dassl's cutout colour
CUTOUT_FILL = (125, 123, 114)


def _signed(v: float, rand: Uniform) -> float:
    return -v if rand() > 0.5 else v


def _affine(img: Image.Image, matrix: tuple) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, matrix)


def auto_contrast(img: Image.Image, v: float, rand: Uniform) -> Image.Image:
    return PIL.ImageOps.autocontrast(img)


def equalize(img: Image.Image, v: float, rand: Uniform) -> Image.Image:
    return PIL.ImageOps.equalize(img)


def invert(img: Image.Image, v: float, rand: Uniform) -> Image.Image:
    return PIL.ImageOps.invert(img)


def rotate(img: Image.Image, v: float, rand: Uniform) -> Image.Image:
    """Rotate by +-v degrees about the centre (counter-clockwise for v > 0)."""
    return img.rotate(_signed(v, rand))


def posterize(img: Image.Image, v: float, rand: Uniform) -> Image.Image:
    return PIL.ImageOps.posterize(img, int(v))


def solarize(img: Image.Image, v: float, rand: Uniform) -> Image.Image:
    """Invert the pixel values >= v."""
    return PIL.ImageOps.solarize(img, v)


def solarize_add(img: Image.Image, v: float, rand: Uniform) -> Image.Image:
    """Add v (then clip to [0, 255] and truncate to uint8), then solarize at 128."""
    arr = np.clip(np.asarray(img).astype(np.int64) + v, 0, 255).astype(np.uint8)
    return PIL.ImageOps.solarize(Image.fromarray(arr), 128)


def color(img: Image.Image, v: float, rand: Uniform) -> Image.Image:
    return PIL.ImageEnhance.Color(img).enhance(v)


def contrast(img: Image.Image, v: float, rand: Uniform) -> Image.Image:
    return PIL.ImageEnhance.Contrast(img).enhance(v)


def brightness(img: Image.Image, v: float, rand: Uniform) -> Image.Image:
    return PIL.ImageEnhance.Brightness(img).enhance(v)


def sharpness(img: Image.Image, v: float, rand: Uniform) -> Image.Image:
    return PIL.ImageEnhance.Sharpness(img).enhance(v)


def shear_x(img: Image.Image, v: float, rand: Uniform) -> Image.Image:
    return _affine(img, (1, _signed(v, rand), 0, 0, 1, 0))


def shear_y(img: Image.Image, v: float, rand: Uniform) -> Image.Image:
    return _affine(img, (1, 0, 0, _signed(v, rand), 1, 0))


def cutout_abs(img: Image.Image, v: float, rand: Uniform) -> Image.Image:
    """A v x v square of ``CUTOUT_FILL`` at a random corner (Dassl's ``CutoutAbs``)."""
    if v < 0:
        return img
    w, h = img.size
    x0 = w + (1.0 - w) * rand()  # np.random.uniform(w): low = w, high = 1
    y0 = h + (1.0 - h) * rand()
    x0 = int(max(0, x0 - v / 2.0))
    y0 = int(max(0, y0 - v / 2.0))
    x1, y1 = min(w, x0 + v), min(h, y0 + v)
    img = img.copy()
    PIL.ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), CUTOUT_FILL)
    return img


def translate_x_abs(img: Image.Image, v: float, rand: Uniform) -> Image.Image:
    """Shift by +-v pixels (output pixel x shows input pixel x + v)."""
    return _affine(img, (1, 0, _signed(v, rand), 0, 1, 0))


def translate_y_abs(img: Image.Image, v: float, rand: Uniform) -> Image.Image:
    return _affine(img, (1, 0, 0, 0, 1, _signed(v, rand)))


@dataclasses.dataclass(frozen=True)
class Op:
    """One augmentation and its value range: ``fn(img, value, rand)``."""

    name: str
    fn: Callable[[Image.Image, float, Uniform], Image.Image]
    low: float
    high: float

    def magnitude(self, m: float) -> float:
        """Dassl's rule: ``m / 30 * (high - low) + low``."""
        return (m / 30) * (self.high - self.low) + self.low


#: Dassl's ``randaugment_list()``, in its order (the order the op choice indexes)
OPS: tuple[Op, ...] = (
    Op("AutoContrast", auto_contrast, 0, 1),
    Op("Equalize", equalize, 0, 1),
    Op("Invert", invert, 0, 1),
    Op("Rotate", rotate, 0, 30),
    Op("Posterize", posterize, 4, 8),
    Op("Solarize", solarize, 0, 256),
    Op("SolarizeAdd", solarize_add, 0, 110),
    Op("Color", color, 0.1, 1.9),
    Op("Contrast", contrast, 0.1, 1.9),
    Op("Brightness", brightness, 0.1, 1.9),
    Op("Sharpness", sharpness, 0.1, 1.9),
    Op("ShearX", shear_x, 0.0, 0.3),
    Op("ShearY", shear_y, 0.0, 0.3),
    Op("CutoutAbs", cutout_abs, 0, 40),
    Op("TranslateXabs", translate_x_abs, 0.0, 100),
    Op("TranslateYabs", translate_y_abs, 0.0, 100),
)


def uniform_source(generator: Optional[torch.Generator] = None) -> Uniform:
    """float64 draws in [0, 1) from ``generator`` (torch's global generator when None)."""
    return lambda: float(torch.rand((), dtype=torch.float64, generator=generator))


class RandAugment:
    """``n`` ops drawn per image, all at magnitude ``m`` (0..30); Dassl's ``RandAugment(n, m)``.

    ``__call__(img, generator)`` applies them to an RGB PIL image; ``choose(rand)`` is the op
    draw alone (tests replay it)."""

    def __init__(self, n: int = 2, m: float = 10):
        if not 0 <= m <= 30:
            raise ValueError(f"RandAugment magnitude m must be in [0, 30], got {m}")
        if n < 0:
            raise ValueError(f"RandAugment n must be >= 0, got {n}")
        self.n, self.m = n, m

    def choose(self, rand: Uniform) -> list[Op]:
        return [OPS[int(rand() * len(OPS))] for _ in range(self.n)]

    def __call__(self, img: Image.Image, generator: Optional[torch.Generator] = None
                 ) -> Image.Image:
        rand = uniform_source(generator)
        for op in self.choose(rand):
            img = op.fn(img, op.magnitude(self.m), rand)
        return img

    def __repr__(self) -> str:
        return f"RandAugment(n={self.n}, m={self.m})"
