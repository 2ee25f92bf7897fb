"""Hand-crafted prompt templates used by the CLIP prompt-learning papers (PROTOCOL.md section 5).

Per-dataset single templates (``CUSTOM_TEMPLATES`` of CoOp's zero-shot trainer) are keyed by the
vlprompt dataset name. KgCoOp and COMMA build their frozen "teacher" text features from the same
table except for DTD, which they phrase as a photo of a texture; ``dataset_template(name,
variant="kgcoop")`` returns that variant. Ensembles: the 80 OpenAI ImageNet templates, CoOp's
7-template ``IMAGENET_TEMPLATES_SELECT`` and PromptSRC's 60-template list.
"""

from __future__ import annotations

from typing import Dict, List

DEFAULT_TEMPLATE = "a photo of a {}."

#: CoOp / CoCoOp / MaPLe / PromptSRC / DPT templates, keyed by vlprompt dataset name.
CUSTOM_TEMPLATES: Dict[str, str] = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}

#: KgCoOp (trainers/kgcoop.py) and COMMA prior-feature templates: CoOp's table with DTD rephrased.
KGCOOP_TEMPLATES: Dict[str, str] = {**CUSTOM_TEMPLATES, "dtd": "a photo of a {}, a type of texture."}

_VARIANTS = {"coop": CUSTOM_TEMPLATES, "kgcoop": KGCOOP_TEMPLATES, "comma": KGCOOP_TEMPLATES}


def dataset_template(name: str, variant: str = "coop") -> str:
    """The single hand-crafted template of a dataset (``{}`` marks the class name).

    ``variant`` is ``"coop"`` (CoOp family, DTD = ``{} texture.``) or ``"kgcoop"``/``"comma"``.
    Unknown datasets (custom ones) get ``a photo of a {}.``, the template CoOp uses for generic
    object datasets.
    """
    try:
        table = _VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown template variant {variant!r}; use one of {sorted(_VARIANTS)}") from None
    return table.get(name, DEFAULT_TEMPLATE)


#: The 80 templates of OpenAI's ``Prompt_Engineering_for_ImageNet.ipynb`` in notebook order
#: (CoOp ``trainers/imagenet_templates.py``).
IMAGENET_TEMPLATES: List[str] = [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.",
    "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.",
    "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.",
    "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.",
    "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
]

#: CoOp's ``ZeroshotCLIP2`` 7-template subset.
IMAGENET_TEMPLATES_SELECT: List[str] = [
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
]

#: PromptSRC's 60 templates (``muzairkhattak/PromptSRC trainers/imagenet_templates.py``): the first
#: 60 of the 80 with ``a photo of a {}.`` moved to the front.
PROMPTSRC_TEMPLATES: List[str] = [DEFAULT_TEMPLATE] + [
    t for t in IMAGENET_TEMPLATES[:60] if t != DEFAULT_TEMPLATE]


def format_template(template: str, classname: str) -> str:
    """``template`` with the class name filled in; underscores in the name become spaces."""
    return template.replace("{}", classname.replace("_", " "))
