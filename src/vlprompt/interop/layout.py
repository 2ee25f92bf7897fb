"""How an official repository lays out a method's checkpoint: the declaration each method keeps
next to itself (``Method.official_layout``). Plain data, no torch: method modules import it.

An official trainer saves, per registered model name, ``<output>/<name>/model.pth.tar-<epoch>``
holding ``{"state_dict", "epoch", "optimizer", "scheduler", "val_result"}`` (Dassl
``TrainerBase.save_model``). ``OfficialLayout.rules`` map that state dict's keys onto the
method's ``trainable_state_dict`` keys; ``interop/mapping.py`` applies them in both directions.

Key templates (``Rule.official`` / ``Rule.ours``):

* ``"ctx"`` — one tensor;
* ``"...resblocks.{i}.VPT_shallow"`` — one tensor per layer ``i`` in the key;
* ``"...deep.prompts[{i}]"`` — row ``i`` of a stacked tensor ``[N, ...]``;
* ``"...proj."`` (trailing dot) — every key under that prefix, the rest of the key kept.

The index on the vlprompt side is the official index plus ``Rule.offset`` (e.g. IVLP's block-1
prompt ``resblocks.1.VPT_shallow`` is row 0 of vlprompt's deep stack: offset -1).
Two rules may give one vlprompt key when the official module registers one Parameter under two
names; the two official tensors must then be equal.

``OfficialLayout.config`` maps an official config key to a vlprompt field by name, or through a
``Setting`` where the two write the value differently (a 1-based block index, a prompt prefix
that vlprompt keeps as a template).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

#: the frozen CLIP inside whole-model checkpoints (MaPLe, IVLP, VPT, PromptSRC, COMMA register
#: their ``CustomCLIP``): official prefix -> vlprompt CLIP state-dict prefix
CUSTOM_CLIP_BACKBONE = {"image_encoder.": "visual.", "text_encoder.": "",
                        "logit_scale": "logit_scale"}


@dataclasses.dataclass(frozen=True)
class Rule:
    """One official tensor (or family of tensors) and where it lives in the vlprompt method."""

    official: str
    ours: str
    #: vlprompt index = official index + offset
    offset: int = 0
    #: registered model holding the official key ("" = the layout's first model)
    model: str = ""
    #: class-specific, training-only tensor (DPT's auxiliary classifiers, which the official
    #: loader drops): when its shape does not fit the class list, the method keeps its own
    optional: bool = False
    #: each official tensor has a leading dim of 1 that vlprompt's lacks (a ``[1, D]`` token
    #: per layer that is one row of vlprompt's ``[N, D]``)
    squeeze: bool = False


@dataclasses.dataclass(frozen=True)
class Setting:
    """An official config value written differently from the vlprompt field: ours = official +
    ``offset`` (numbers, or each number of a list: a 1-based block index is ``offset=-1``), or
    official + ``suffix``
    (text: a prompt prefix "a photo of a" that vlprompt holds as "a photo of a {}.")."""

    field: str
    offset: int = 0
    suffix: str = ""


@dataclasses.dataclass(frozen=True)
class OfficialLayout:
    """A method's checkpoint layout in its official repository (see the module docstring)."""

    #: repository and file the layout was read from
    repo: str
    source: str
    #: the trainer's registered Dassl name (``--trainer``, ``TRAINER.NAME``)
    trainer: str
    #: registered model names (``register_model``): one sub-folder of the output folder each
    models: tuple[str, ...]
    rules: tuple[Rule, ...]
    #: Dassl config key -> vlprompt method config field or ``Setting`` (read from
    #: ``config.yaml``/``log.txt``, written by ``export --format dassl``)
    config: dict = dataclasses.field(default_factory=dict)
    #: vlprompt config field -> (vlprompt tensor key(s), how): "dim<k>" (size of dim k),
    #: "layers" (1 per [n, D] tensor + N per stacked [N, n, D]), "count" (keys matching a
    #: ``*`` pattern), "ndim3" (a [C, n, D] tensor), "first"/"last" (the smallest/largest
    #: number at the ``*`` of the keys matching a pattern; unset when none does). A key with
    #: a ``*`` stands for the keys it matches, in sorted order. Shapes win over the config file.
    shapes: dict = dataclasses.field(default_factory=dict)
    #: official keys the official code recomputes or never uses (regex prefixes); dropped
    ignored: tuple[str, ...] = ()
    #: official prefix -> vlprompt CLIP prefix of the frozen backbone tensors in the file
    backbone: dict = dataclasses.field(default_factory=dict)
    #: where ``token_prefix``/``token_suffix`` sit: key prefix, model ("" = first), and the
    #: attribute path of the method's ``TextPrompts`` (to rebuild them on export)
    tokens: str = ""
    tokens_model: str = ""
    text_prompts: Optional[str] = None
    #: vlprompt tensors absent from official files, derived on import: "epoch" (a tensor
    #: holding the epoch), "gpa" (PromptSRC's aggregate = the saved, aggregated prompts)
    fill: tuple[str, ...] = ()
    #: vlprompt tensors absent from official files that the method keeps as built (state that
    #: does not change the logits, e.g. a training-time random-draw counter)
    keep: tuple[str, ...] = ()

    def model_of(self, rule_model: str) -> str:
        return rule_model or self.models[0]
