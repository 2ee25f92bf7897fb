"""Zero-shot CLIP (Radford et al., 2021): the classifier is the normalised text features of
hand-crafted prompts, nothing is trained (METHODS.md §6.1; CoOp's ``ZeroshotCLIP`` /
``ZeroshotCLIP2``)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import Tensor

from .base import Method
from .prompts import hand_crafted_text_features
from .registry import register_method

TEMPLATE_CHOICES = ("single", "select7", "imagenet80")


def ensemble_templates(name: str, single: str) -> list[str]:
    """The prompt templates for ``name``: "single" (the dataset's template), "select7" (CoOp's
    7-template ``IMAGENET_TEMPLATES_SELECT``) or "imagenet80" (CLIP's 80 ImageNet templates)."""
    if name == "single":
        return [single]
    from ..clip import templates

    if name == "select7":
        return list(templates.IMAGENET_TEMPLATES_SELECT)
    if name == "imagenet80":
        return list(templates.IMAGENET_TEMPLATES)
    raise ValueError(f"templates must be one of {', '.join(TEMPLATE_CHOICES)}, got {name!r}")


@register_method
class ZeroShotCLIP(Method):
    """Frozen CLIP with hand-crafted prompts; ``text_features`` [C, E] are computed once per class
    list and kept as a (non-persistent) buffer, so they follow the model across devices."""

    name = "zeroshot"
    frozen_image_tower = True
    description = "Zero-shot CLIP: hand-crafted prompt(s) per class, nothing trained"
    trainable = False

    @dataclasses.dataclass
    class Config:
        #: "single" (the dataset's template), "select7" (CoOp's ZeroshotCLIP2) or "imagenet80"
        templates: str = "single"

        def __post_init__(self) -> None:
            if self.templates not in TEMPLATE_CHOICES:
                raise ValueError(f"zeroshot: templates must be one of {', '.join(TEMPLATE_CHOICES)}, "
                                 f"got {self.templates!r}")

    def __init__(self, clip, classnames, config=None, template=None):
        super().__init__(clip, classnames, config, template)
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = [c.replace("_", " ") for c in classnames]
        templates = ensemble_templates(self.config.templates, self.template)
        feats = hand_crafted_text_features(self.clip, self.classnames, templates)  # [C, E]
        self.register_buffer("text_features", feats, persistent=False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        image_features = self.frozen_image_features(images)
        return self.logits(image_features.float(), self.text_features)
