"""The Method interface every prompt-learning method implements (DESIGN.md, "Methods").

A method owns its learnable tensors and computes logits and its loss. It knows nothing about data
loading, optimisers, devices, logging or distributed training: the engine does those.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..clip.model import CLIP
from ..perf import SWITCHES


#: the image tower takes prompt tokens, deep / inserted prompts, hooks, post hooks and attention
#: deltas, and returns its tokens and hidden states (a ViT tower; ``CLIP.capabilities``)
VISUAL_PROMPTS = "visual_prompts"
#: what a method lacking a capability is told: "<method> <this>; <backbone> is a ResNet"
CAPABILITY_NEEDS = {
    VISUAL_PROMPTS: "prompts or adapts the image tower's tokens and needs a ViT backbone "
                    "(ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px, open_clip ViTs)",
    # SigLIP lacks these (no CLS token, no start token, bidirectional text)
    "class_token": "reads or inserts after the image tower's CLS token and needs a CLIP ViT "
                   "with one (OpenAI and open_clip ViTs, not SigLIP)",
    "text_start_token": "inserts text tokens after the start token and needs a tokenizer with "
                        "one (OpenAI and open_clip CLIPs, not SigLIP)",
    "causal_text": "needs a causal text tower (OpenAI and open_clip CLIPs, not SigLIP)",
}


@dataclasses.dataclass
class MethodConfig:
    """Fields every method has. Subclasses add theirs; defaults are the paper's settings."""


class Features(NamedTuple):
    """One forward of a method (``Method.forward_features``): its raw (unnormalised) image and
    text features and the logits it computes from them, so a wrapper (DePT) can add heads on the
    features without running the towers twice."""

    image: Tensor  # [B, E]
    text: Tensor  # [C, E], or per-sample [B, C, E] (instance-conditional prompts, CoCoOp)
    logits: Tensor  # [B, C], what ``forward`` returns


class Method(nn.Module):
    """Base class. Subclasses set ``name``, ``description`` and ``Config``, and implement
    ``forward`` (and ``loss`` when there are terms beyond cross-entropy).

    The CLIP is frozen once, here, and shared; it is never modified in place and never saved.
    Trainability is structural: every parameter of the method outside ``self.clip`` is trained.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type] = MethodConfig
    #: whether the method has anything to train (zero-shot CLIP has not)
    trainable: ClassVar[bool] = True
    #: which table of per-dataset templates the paper used ("coop", or "kgcoop" whose DTD
    #: template differs); see ``vlprompt.clip.templates.dataset_template``
    template_variant: ClassVar[str] = "coop"
    #: True when the method combines the gradients of several loss terms itself (gradient
    #: surgery, e.g. ProGrad): the engine then calls ``loss_terms`` and ``combine_gradients``
    #: instead of back-propagating ``loss``. A subclass may make it a property (a config switch).
    combines_gradients: ClassVar[bool] = False
    #: True when the method trains on the unlabeled train images of every class of the dataset
    #: (base and new), whatever the run's shots and class subset (PromptKD): the engine gives it
    #: that training set, and reports list its results apart from inductive methods'
    transductive: ClassVar[bool] = False
    #: capabilities the method needs from the CLIP (``CLIP.capabilities``): ``"visual_prompts"``
    #: for every method that prompts, hooks, reads the tokens of or adapts the image tower (a ViT
    #: has them, a ResNet has not). Checked once, in ``__init__``, naming no backbone family.
    requires: ClassVar[frozenset] = frozenset()
    #: True when the method reads the pixels only through ``frozen_image_features`` (the frozen,
    #: unprompted image tower): its training may then run on cached features of pre-drawn
    #: augmented views (``train.cached_views``, a named approximation), never running the tower
    frozen_image_tower: ClassVar[bool] = False

    def __init__(self, clip: CLIP, classnames: Sequence[str], config: Any = None,
                 template: Optional[str] = None):
        super().__init__()
        self._check_capabilities(clip)
        clip.requires_grad_(False)
        clip.eval()
        self.clip = clip
        self.config = config if config is not None else self.Config()
        self.template = template or "a photo of a {}."
        self.classnames = [c.replace("_", " ") for c in classnames]
        #: the classes the learned tensors are trained for: the constructor's. The engine builds
        #: a method on the classes it trains (``run_experiment``) or was trained on (the
        #: checkpoint header's ``classnames``, ``_build_from_run``), and switches to other
        #: classes with ``set_classnames`` after loading; see ``training_class_index``
        self.training_classnames = list(self.classnames)

    def _check_capabilities(self, clip: CLIP) -> None:
        """Refuse, in one line, a CLIP that lacks what the method needs (``requires``)."""
        have = getattr(clip, "capabilities", frozenset({VISUAL_PROMPTS}))
        lacking = sorted(set(self.requires) - set(have))
        if not lacking:
            return
        from .registry import get_method, list_methods

        backbone = getattr(clip, "backbone_name", None) or "this backbone"
        family = getattr(getattr(clip, "config", None), "vision_kind", "")
        siglip = not getattr(getattr(clip, "config", None), "text_causal", True)
        what = (f"{backbone} is a ResNet" if family == "resnet" else
                f"{backbone} is a SigLIP" if siglip else f"{backbone} lacks it")
        usable = [n for n in list_methods() if set(get_method(n).requires) <= set(have)]
        needs = "; ".join(CAPABILITY_NEEDS.get(c, f"needs the capability {c!r}") for c in lacking)
        raise ValueError(f"{self.name} {needs}; {what} (methods that run on it: "
                         f"{', '.join(usable) or 'none'})")

    # ------------------------------------------------------------------ interface
    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Switch the classifier to other classes (base -> new, cross-dataset)."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        """Logits [B, C] over the current class names."""
        raise NotImplementedError

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Total training loss and its named parts (for logging). Default: cross-entropy."""
        ce = F.cross_entropy(self(images), labels)
        return ce, {"ce": float(ce.detach())}

    def forward_features(self, images: Tensor) -> Features:
        """One forward giving the raw image and text features and the logits
        (``forward(images)`` equals its ``logits``), for wrappers that add heads on a method's
        features (DePT). Methods that support wrapping implement it with
        ``extra_loss_terms``."""
        raise NotImplementedError(f"{self.name}: forward_features is not implemented")

    def extra_loss_terms(self, images: Tensor, labels: Tensor, features: Features
                         ) -> tuple[list[Tensor], dict[str, float]]:
        """The weighted loss terms beyond cross-entropy on ``features.logits`` (the output of
        ``forward_features(images)`` for this batch) and their named parts: the method's
        ``loss`` is ``CE + terms[0] + terms[1] + ...``, summed in that order."""
        raise NotImplementedError(f"{self.name}: extra_loss_terms is not implemented")

    def training_class_index(self) -> Optional[list[int]]:
        """Are the current classes the training classes, or some of them? For each current
        class its index in ``training_classnames`` (``0..C-1`` when the lists are equal, e.g.
        the ImageNet-A/R subsets of an ImageNet run); None when a current class is not a
        training class (new classes, another dataset). Names are compared after the
        ``_``-to-space rewrite; a name the training list repeats maps to its first row."""
        if self.classnames == self.training_classnames:
            return list(range(len(self.classnames)))
        rows: dict[str, int] = {}
        for i, name in enumerate(self.training_classnames):
            rows.setdefault(name, i)
        if not all(name in rows for name in self.classnames):
            return None
        return [rows[name] for name in self.classnames]

    def loss_terms(self, images: Tensor, labels: Tensor
                   ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """``combines_gradients`` methods: the loss terms whose gradients ``combine_gradients``
        combines, in order (the first is the objective, logged as the loss), and named parts."""
        raise NotImplementedError(f"{self.name}: loss_terms is only for combines_gradients")

    def combine_gradients(self, grads: dict[str, list[Tensor]]) -> list[Tensor]:
        """``combines_gradients`` methods: the gradient to step on, one tensor per trainable
        parameter (``named_trainable_parameters`` order), from each term's gradient.

        ``grads[term]`` is that term's gradient over the whole optimiser batch, as if it were one
        chunk on one process: summed over the ``grad_accum`` chunks, averaged over processes and
        divided by AMP's loss scale by the engine (so a nonlinear combination sees the same
        numbers whatever the chunking, process count or precision)."""
        raise NotImplementedError(f"{self.name}: combine_gradients is only for "
                                  "combines_gradients")

    # ------------------------------------------------------------------ engine hooks
    @classmethod
    def teacher_recipe(cls, config: dict) -> Optional[Any]:
        """A run the engine must finish before this method trains, and whose folder it then
        passes as the method field ``teacher`` (``config``: the method fields as resolved): a
        named tuple (method, backbone, config_file, overrides), or None (the default)."""
        return None

    @classmethod
    def template_variant_for(cls, config: Optional[dict] = None) -> str:
        """``template_variant`` of the method configured with ``config`` (its ``method`` fields,
        as the engine resolved them): a wrapper (DePT) takes its base method's."""
        return cls.template_variant

    def train(self, mode: bool = True) -> "Method":
        super().train(mode)
        self.clip.eval()  # the frozen backbone always stays in eval mode
        return self

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters()
                if p.requires_grad and not n.startswith("clip.")}

    def param_groups(self, lr: float) -> list[dict]:
        """Optimiser parameter groups; override for per-group learning rates."""
        return [{"params": list(self.named_trainable_parameters().values()), "lr": lr}]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint holds: the trainable tensors (plus ``extra_state_tensors``)."""
        state = {n: p.detach().clone() for n, p in self.named_trainable_parameters().items()}
        state.update(self.extra_state_tensors())
        return state

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        params = self.named_trainable_parameters()
        extra = self.extra_state_tensors()
        expected = set(params) | set(extra)
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise KeyError(f"{self.name}: checkpoint does not match the method "
                           f"(missing: {missing[:8]}, unexpected: {unexpected[:8]})")
        with torch.no_grad():
            for n, p in params.items():
                if p.shape != state[n].shape:
                    raise ValueError(f"{self.name}: tensor {n} has shape {tuple(state[n].shape)} "
                                     f"in the checkpoint, {tuple(p.shape)} in the method")
                p.copy_(state[n])
        self.load_extra_state_tensors({k: state[k] for k in extra})

    def extra_state_tensors(self) -> dict[str, Tensor]:
        """Extra tensors a method must checkpoint (e.g. PromptSRC's running aggregate)."""
        return {}

    def load_extra_state_tensors(self, state: dict[str, Tensor]) -> None:
        pass

    def on_epoch_end(self, epoch: int, max_epochs: int) -> None:
        """Called by the engine after each training epoch (0-based)."""

    def on_train_end(self) -> None:
        """Called once after the last epoch, before final evaluation."""

    @property
    def class_specific(self) -> bool:
        """True when learned tensors belong to particular classes (e.g. one context per class):
        applying them to other class names is refused unless the user allows it."""
        return False

    def cached_class_features(self, compute: Callable[[], Tensor], tag: str = "text") -> Tensor:
        """``compute()``, the class features of a method that do not depend on the images
        (its prompted text features [C, E]), reused across evaluation batches.

        One mechanism for every method (DESIGN.md "Performance"): a method wraps the call that
        computes them; the cache is bypassed while gradients are recorded or in train mode (so
        training is unchanged) and when ``perf.SWITCHES.cache_text_features`` is off. Its key
        catches what can change the result: optimiser steps and loads (the version counters of
        the method's own parameters and buffers), edits through ``.data`` (their sum), moves, a
        new class list, and autocast."""
        if torch.is_grad_enabled() or self.training or not SWITCHES.cache_text_features:
            self.__dict__.pop("_class_feature_cache", None)
            return compute()
        own = [t for n, t in list(self.named_parameters()) + list(self.named_buffers())
               if not n.startswith("clip.") and t is not None]
        total = float(sum(t.detach().double().sum() for t in own
                          if t.is_floating_point())) if own else 0.0
        device = self.device
        key = (tuple((t._version, t.data_ptr()) for t in own), total, device,
               tuple(self.classnames), torch.is_autocast_enabled(device.type),
               torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
               else None)
        cache = self.__dict__.setdefault("_class_feature_cache", {})
        entry = cache.get(tag)
        if entry is None or entry[0] != key:
            entry = cache[tag] = (key, compute())
        return entry[1]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.named_trainable_parameters().values())

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    def frozen_image_features(self, images: Tensor) -> Tensor:
        """Features [B, E] of the frozen, unprompted image tower for images [B, 3, S, S].

        Features computed beforehand ([B, E]: the engine's cached views, ``train.cached_views``)
        pass through as they are, so the methods that read pixels only through this call
        (``frozen_image_tower``) train on them without a change."""
        if images.dim() == 2:
            return images
        return self.clip.encode_image(images.to(self.clip.dtype))

    def logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """CLIP logits: logit_scale.exp() * cos(image, text) (+ SigLIP's ``logit_bias``:
        ``CLIP.logits``). [B, E] x [C, E] -> [B, C]; per-sample text features [B, C, E] give
        [B, C]. The bias is the same for every class of a row, so the methods' softmax
        cross-entropy over classes does not see it."""
        return self.clip.logits(image_features, text_features)
