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
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Union[str, "os.PathLike[str]", Image.Image]


def open_image(source: ImageInput, draft_size: Optional[int] = None) -> Image.Image:
    """An RGB PIL image. ``draft_size`` lets JPEG decoding skip resolution it will not need
    (``Image.draft``: DCT scaling to >= that size), which is faster but not bit-identical."""
    if isinstance(source, Image.Image):
        return source.convert("RGB") if source.mode != "RGB" else source
    with Image.open(source) as img:
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        return img.convert("RGB")


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


class TrainTransform:
    """RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize (CLIP statistics)."""

    def __init__(self, image_size: int = 224, scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5,
                 fast_decode: bool = False, generator: Optional[torch.Generator] = None):
        self.image_size, self.scale, self.ratio, self.flip_p = image_size, scale, ratio, flip_p
        self.fast_decode, self.generator = fast_decode, generator

    def __call__(self, source: ImageInput) -> Tensor:
        img = open_image(source, self.image_size if self.fast_decode else None)
        top, left, h, w = random_resized_crop_params(*img.size, self.scale, self.ratio,
                                                     self.generator)
        img = img.crop((left, top, left + w, top + h)).resize(
            (self.image_size, self.image_size), Image.BICUBIC)
        if torch.rand(1, generator=self.generator).item() < self.flip_p:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(img)  # [3,S,S]

    def __repr__(self) -> str:
        return (f"TrainTransform(size={self.image_size}, scale={self.scale}, "
                f"flip_p={self.flip_p}, fast_decode={self.fast_decode})")


class TestTransform:
    """Resize(shorter side, bicubic) + CenterCrop + ToTensor + Normalize (CLIP ``preprocess``)."""

    def __init__(self, image_size: int = 224, fast_decode: bool = False):
        self.image_size, self.fast_decode = image_size, fast_decode

    def __call__(self, source: ImageInput) -> Tensor:
        img = open_image(source, self.image_size if self.fast_decode else None)
        img = center_crop(resize_shorter(img, self.image_size), self.image_size)
        return to_normalized_tensor(img)  # [3,S,S]

    def __repr__(self) -> str:
        return f"TestTransform(size={self.image_size}, fast_decode={self.fast_decode})"


class RandAugmentTransform:
    """Dassl's train pipeline for ``INPUT.TRANSFORMS: ["randaugment", "normalize"]`` (CoPrompt):
    Resize((S, S), bicubic) — Dassl adds it when no random crop is configured, so the aspect
    ratio is not kept — then Dassl's RandAugment(n, m) (``data/randaugment.py``), ToTensor,
    Normalize. No crop, no flip."""

    def __init__(self, image_size: int = 224, n: int = 2, m: float = 10,
                 fast_decode: bool = False, generator: Optional[torch.Generator] = None):
        from .randaugment import RandAugment

        self.image_size, self.fast_decode, self.generator = image_size, fast_decode, generator
        self.randaugment = RandAugment(n, m)

    def __call__(self, source: ImageInput) -> Tensor:
        img = open_image(source, self.image_size if self.fast_decode else None)
        img = img.resize((self.image_size, self.image_size), Image.BICUBIC)
        return to_normalized_tensor(self.randaugment(img, self.generator))  # [3,S,S]

    def __repr__(self) -> str:
        return (f"RandAugmentTransform(size={self.image_size}, {self.randaugment!r}, "
                f"fast_decode={self.fast_decode})")


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
        img = open_image(source, self.base.image_size if self.base.fast_decode else None)
        return torch.stack([self.base(img) for _ in range(self.views)])  # [V,3,S,S]

    def __repr__(self) -> str:
        return f"MultiViewTransform({self.base!r}, views={self.views})"


#: training augmentations ``build_transform(augment=...)`` knows
AUGMENTATIONS = ("standard", "resize_randaugment")


def build_transform(train: bool, image_size: int = 224, fast_decode: bool = False,
                    generator: Optional[torch.Generator] = None, *, augment: str = "standard",
                    views: int = 1, crop_scale: Tuple[float, float] = (0.08, 1.0)):
    """The train or test pipeline: callable(path | PIL image) -> normalised ``[3, S, S]`` tensor
    (``[views, 3, S, S]`` for a training transform with ``views > 1``).

    ``augment`` (training only): "standard" = RandomResizedCrop + flip (``TrainTransform``, the
    CoOp-family default), "resize_randaugment" = Resize((S, S)) + Dassl's RandAugment(2, 10)
    (``RandAugmentTransform``); ``crop_scale`` is the standard crop's area range. Methods ask
    for theirs with the attributes ``train_augment`` and
    ``train_views`` (the engine reads them; absent = "standard", 1 view).

    ``fast_decode`` opts into JPEG draft decoding (reduced-size DCT decode). It is much faster on
    large photos but its pixels differ slightly from a full decode, so results are not
    bit-identical to the reference pipeline. Train randomness uses ``generator`` or, if None,
    torch's global generator (seeded per worker by the DataLoader).
    """
    if not train:
        return TestTransform(image_size, fast_decode=fast_decode)
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    if augment == "standard":
        base = TrainTransform(image_size, scale=crop_scale, fast_decode=fast_decode,
                              generator=generator)
    elif augment == "resize_randaugment":
        base = RandAugmentTransform(image_size, fast_decode=fast_decode, generator=generator)
    else:
        raise ValueError(f"unknown training augmentation {augment!r}; known: "
                         f"{', '.join(AUGMENTATIONS)}")
    return base if views == 1 else MultiViewTransform(base, views)
