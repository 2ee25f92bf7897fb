"""Image transforms of the CoOp-family configs (PROTOCOL.md 6), in Pillow, without torchvision.

Train: RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3), bicubic) with torchvision's
10-attempt algorithm and centre-crop fallback, horizontal flip (p=0.5), CLIP normalisation.
Test: resize the shorter side to ``size`` (bicubic), centre crop, CLIP normalisation.
Random numbers come from torch (the global generator, or one passed in), drawn in the same order
and with the same calls as torchvision, so seeding torch makes the crops reproducible and, for the
same seed, equal to torchvision's.

Also (CoPrompt, METHODS-SOTA.md §3): Dassl's ``["randaugment", "normalize"]`` train pipeline
(``RandAugmentTransform``) and several views of one image per item (``MultiViewTransform``,
``[V, 3, S, S]``, collated to ``[B, V, 3, S, S]``), chosen with ``build_transform(augment=...,
views=...)``.

Decoding is exchangeable (``load_image``): full decode, JPEG draft decode (``fast_decode``) or an
on-disk uint8 cache of downsized images (``image_cache.ImageCache``); the last two are named
approximations for training, and the cache is exact for the test transform.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

if TYPE_CHECKING:  # image_cache imports this module
    from .image_cache import ImageCache

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Union[str, "os.PathLike[str]", Image.Image]


def decode_image(source: ImageInput, draft_size: Optional[int] = None
                 ) -> Tuple[Image.Image, Tuple[int, int]]:
    """(RGB image, the (width, height) of the full-resolution image it stands for). The two
    differ after draft decoding: the random crop is drawn in full-resolution coordinates so that
    its geometry does not depend on how many pixels the decoder kept."""
    if isinstance(source, Image.Image):
        img = source.convert("RGB") if source.mode != "RGB" else source
        return img, img.size
    with Image.open(source) as img:
        full_size = img.size
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        return img.convert("RGB"), full_size


def open_image(source: ImageInput, draft_size: Optional[int] = None) -> Image.Image:
    """An RGB PIL image. ``draft_size`` lets JPEG decoding skip resolution it will not need
    (``Image.draft``: DCT scaling by 1/2, 1/4 or 1/8 while both sides stay >= ``draft_size``),
    which is faster but not bit-identical (``build_transform``)."""
    return decode_image(source, draft_size)[0]


def to_normalized_tensor(img: Image.Image, mean: Sequence[float] = CLIP_MEAN,
                         std: Sequence[float] = CLIP_STD) -> Tensor:
    """ToTensor + Normalize: uint8 HWC -> float CHW in [0,1], then (x - mean) / std."""
    arr = np.asarray(img, dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)  # [3,H,W]
    m = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return x.sub_(m).div_(s)


def random_resized_crop_params(width: int, height: int, scale: Tuple[float, float] = (0.08, 1.0),
                               ratio: Tuple[float, float] = (3 / 4, 4 / 3),
                               generator: Optional[torch.Generator] = None
                               ) -> Tuple[int, int, int, int]:
    """(top, left, h, w) of torchvision's ``RandomResizedCrop.get_params``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1],
                                                  generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    # fallback: central crop at the nearest allowed aspect ratio
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize(size)`` with an int: shorter side to ``size``, aspect kept (bicubic)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop(size)`` (pads with black when the image is smaller)."""
    w, h = img.size
    if w < size or h < size:
        canvas = Image.new("RGB", (max(w, size), max(h, size)))
        canvas.paste(img, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        img, (w, h) = canvas, canvas.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def crop_resized(img: Image.Image, full_size: Tuple[int, int], box: Tuple[int, int, int, int],
                 size: int) -> Image.Image:
    """The full-resolution ``box`` (left, top, right, bottom) of ``img`` resized to ``size`` x
    ``size``. A full-size ``img`` is cropped then resized (torchvision's pixels); a smaller one
    of the same scene (draft decode, image cache) resamples the box scaled to its pixels, as
    fractions, so the region is the same and only the sampling differs."""
    if img.size == tuple(full_size):
        return img.crop(box).resize((size, size), Image.BICUBIC)
    scale_x, scale_y = img.width / full_size[0], img.height / full_size[1]
    left, top, right, bottom = box
    return img.resize((size, size), Image.BICUBIC,
                      box=(left * scale_x, top * scale_y, right * scale_x, bottom * scale_y))


def load_image(source: ImageInput, fast_decode: bool, size: int, cache: Optional["ImageCache"]
               ) -> Tuple[Image.Image, Tuple[int, int]]:
    """(image, full-resolution size) as a transform reads it: from ``cache`` when given (which
    then decides the decoding), else decoded, in JPEG draft mode to >= ``size`` if
    ``fast_decode``."""
    if cache is not None:
        return cache.load(source)
    return decode_image(source, size if fast_decode else None)


class TrainTransform:
    """RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize (CLIP statistics)."""

    def __init__(self, image_size: int = 224, scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5,
                 fast_decode: bool = False, generator: Optional[torch.Generator] = None,
                 cache: Optional["ImageCache"] = None):
        self.image_size, self.scale, self.ratio, self.flip_p = image_size, scale, ratio, flip_p
        self.fast_decode, self.generator, self.cache = fast_decode, generator, cache

    def load(self, source: ImageInput) -> Tuple[Image.Image, Tuple[int, int]]:
        return load_image(source, self.fast_decode, self.image_size, self.cache)

    def augment(self, img: Image.Image, full_size: Tuple[int, int]) -> Tensor:
        """One random view; the crop box is drawn in full-resolution coordinates."""
        top, left, h, w = random_resized_crop_params(*full_size, self.scale, self.ratio,
                                                     self.generator)
        img = crop_resized(img, full_size, (left, top, left + w, top + h), self.image_size)
        if torch.rand(1, generator=self.generator).item() < self.flip_p:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(img)  # [3,S,S]

    def __call__(self, source: ImageInput) -> Tensor:
        return self.augment(*self.load(source))  # [3,S,S]

    def __repr__(self) -> str:
        return (f"TrainTransform(size={self.image_size}, scale={self.scale}, "
                f"flip_p={self.flip_p}, fast_decode={self.fast_decode}, cache={self.cache!r})")


class TestTransform:
    """Resize(shorter side, bicubic) + CenterCrop + ToTensor + Normalize (CLIP ``preprocess``)."""

    def __init__(self, image_size: int = 224, fast_decode: bool = False,
                 cache: Optional["ImageCache"] = None):
        self.image_size, self.fast_decode, self.cache = image_size, fast_decode, cache

    def __call__(self, source: ImageInput) -> Tensor:
        img, _ = load_image(source, self.fast_decode, self.image_size, self.cache)
        img = center_crop(resize_shorter(img, self.image_size), self.image_size)
        return to_normalized_tensor(img)  # [3,S,S]

    def __repr__(self) -> str:
        return (f"TestTransform(size={self.image_size}, fast_decode={self.fast_decode}, "
                f"cache={self.cache!r})")


class RandAugmentTransform:
    """Dassl's train pipeline for ``INPUT.TRANSFORMS: ["randaugment", "normalize"]`` (CoPrompt):
    Resize((S, S), bicubic) — Dassl adds it when no random crop is configured, so the aspect
    ratio is not kept — then Dassl's RandAugment(n, m) (``data/randaugment.py``), ToTensor,
    Normalize. No crop, no flip."""

    def __init__(self, image_size: int = 224, n: int = 2, m: float = 10,
                 fast_decode: bool = False, generator: Optional[torch.Generator] = None,
                 cache: Optional["ImageCache"] = None):
        from .randaugment import RandAugment

        self.image_size, self.fast_decode, self.generator = image_size, fast_decode, generator
        self.cache = cache
        self.randaugment = RandAugment(n, m)

    def load(self, source: ImageInput) -> Tuple[Image.Image, Tuple[int, int]]:
        return load_image(source, self.fast_decode, self.image_size, self.cache)

    def augment(self, img: Image.Image, full_size: Tuple[int, int]) -> Tensor:
        """One random view (``full_size`` is unused: the whole image is resized)."""
        img = img.resize((self.image_size, self.image_size), Image.BICUBIC)
        return to_normalized_tensor(self.randaugment(img, self.generator))  # [3,S,S]

    def __call__(self, source: ImageInput) -> Tensor:
        return self.augment(*self.load(source))  # [3,S,S]

    def __repr__(self) -> str:
        return (f"RandAugmentTransform(size={self.image_size}, {self.randaugment!r}, "
                f"fast_decode={self.fast_decode}, cache={self.cache!r})")


class MultiViewTransform:
    """``views`` independent draws of one train transform of the same image: ``[V, 3, S, S]``
    (Dassl's ``DATALOADER.K_TRANSFORMS``). The image is decoded once; the views draw from the one
    ``generator`` in turn, so an item's seed fixes all its views (``SeededItems`` sets it)."""

    def __init__(self, base, views: int):
        if views < 2:
            raise ValueError(f"MultiViewTransform needs views >= 2, got {views}")
        self.base, self.views = base, views

    @property
    def generator(self) -> Optional[torch.Generator]:
        return self.base.generator

    @generator.setter
    def generator(self, value: Optional[torch.Generator]) -> None:
        self.base.generator = value

    def __call__(self, source: ImageInput) -> Tensor:
        img, full_size = self.base.load(source)
        return torch.stack([self.base.augment(img, full_size)
                            for _ in range(self.views)])  # [V,3,S,S]

    def __repr__(self) -> str:
        return f"MultiViewTransform({self.base!r}, views={self.views})"


#: training augmentations ``build_transform(augment=...)`` knows
AUGMENTATIONS = ("standard", "resize_randaugment")


def build_transform(train: bool, image_size: int = 224, fast_decode: bool = False,
                    generator: Optional[torch.Generator] = None, *, augment: str = "standard",
                    views: int = 1, crop_scale: Tuple[float, float] = (0.08, 1.0),
                    cache: Optional["ImageCache"] = None):
    """The train or test pipeline: callable(path | PIL image) -> normalised ``[3, S, S]`` tensor
    (``[views, 3, S, S]`` for a training transform with ``views > 1``).

    ``augment`` (training only): "standard" = RandomResizedCrop + flip (``TrainTransform``, the
    CoOp-family default), "resize_randaugment" = Resize((S, S)) + Dassl's RandAugment(2, 10)
    (``RandAugmentTransform``); ``crop_scale`` is the standard crop's area range. Methods ask
    for theirs with the attributes ``train_augment`` and
    ``train_views`` (the engine reads them; absent = "standard", 1 view).

    ``fast_decode`` (``train.fast_decode``, a named approximation) opts into JPEG draft
    decoding: the DCT is scaled by 1/2, 1/4 or 1/8 while both sides stay >= ``image_size``.
    It is exact only where it does nothing: Pillow drafts only when the scaled image keeps both
    sides >= ``image_size``, i.e. for images at least twice that size (500x375 at 224: never
    drafted, identical, no gain). Where it drafts, the DCT-domain reduction replaces part of the
    bicubic downsampling and pixels differ: ``benchmarks/data_pipeline.py``, 1600x1200 q90 photos
    at 224 (drafted to 400x300), mean / max |normalised difference| 0.0071 / 0.20 for the test
    transform and 0.0105 / 0.73 for training, at 2.4-4x the images/s. Hence a named
    approximation (``train.fast_decode``), off by default.

    ``cache`` (``train.image_cache``, ``image_cache.ImageCache``) reads images decoded and
    resized once, and then decides the decoding (its ``draft``). Exact for the test transform
    when ``cache.size == image_size``; an approximation for training (see that module).

    Train randomness uses ``generator`` or, if None, torch's global generator (seeded per
    worker by the DataLoader).
    """
    if not train:
        return TestTransform(image_size, fast_decode=fast_decode, cache=cache)
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    if augment == "standard":
        base = TrainTransform(image_size, scale=crop_scale, fast_decode=fast_decode,
                              generator=generator, cache=cache)
    elif augment == "resize_randaugment":
        base = RandAugmentTransform(image_size, fast_decode=fast_decode, generator=generator,
                                    cache=cache)
    else:
        raise ValueError(f"unknown training augmentation {augment!r}; known: "
                         f"{', '.join(AUGMENTATIONS)}")
    return base if views == 1 else MultiViewTransform(base, views)
