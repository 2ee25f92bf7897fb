"""Exporting a vlprompt run for others.

* ``classifier``: a fixed head — the normalised text features ``[C, E]`` of the learned
  prompts, CLIP's ``logit_scale`` (logits = ``exp(logit_scale) * norm(image) @ text.T``), the
  class names and the backbone fingerprint, plus the learned vision prompts (shallow ``[n, Dv]``,
  deep ``{block: [n, Dv]}``) for methods that prompt the image tower, in one safetensors file.
  Inference then runs the image tower only. Only for methods whose logits are such a head
  (text features independent of the image); every export checks that on random images.
* ``dassl``: the official trainer's files ``<out>/<registered model>/model.pth.tar-<epoch>``
  (``state_dict`` in the official key layout with ``token_prefix``/``token_suffix``, ``epoch``,
  ``optimizer``/``scheduler``/``val_result`` None) plus ``config.yaml`` with the official config
  keys. The frozen CLIP of whole-model checkpoints is not written: the official ``load_model``
  loads with ``strict=False`` and its CLIP comes from the backbone file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import __version__

PathLike = Union[str, os.PathLike]
CLASSIFIER_FORMAT = "vlprompt-classifier/1"


def _run_method(run_dir: PathLike, classes: Optional[Sequence[str]], device):
    """(method loaded from the run's newest checkpoint, header, run folder)."""
    from ..clip.load import load_clip
    from ..engine import checkpoint as ckpt
    from ..engine.run import _build_from_run

    folder = ckpt.resolve_run_folder(run_dir)
    gen = ckpt.newest_generation(folder)
    header = gen.header()
    clip = load_clip(header["backbone"], device=device)
    names = list(classes) if classes else list(header.get("classnames") or [])
    model = _build_from_run(folder, gen, clip, names, header.get("template"),
                            dataset=header.get("dataset"))
    return model.to(device).eval(), header, folder


# ------------------------------------------------------------------------------ classifier
@dataclasses.dataclass
class ClassifierHead:
    """A fixed classifier over (optionally prompted) CLIP image features."""

    text_features: Tensor  # [C, E], normalised
    logit_scale: Tensor  # [], CLIP's log-scale
    classnames: list[str]
    shallow: Optional[Tensor] = None  # [n, Dv] vision prompts appended before ln_pre
    deep: dict = dataclasses.field(default_factory=dict)  # {block: [n, Dv]}
    metadata: dict = dataclasses.field(default_factory=dict)

    def logits(self, clip, images: Tensor) -> Tensor:
        """[B, C] logits of ``images`` [B, 3, S, S]: the image tower only."""
        kwargs = {} if self.shallow is None else {"prompts": self.shallow,
                                                  "deep_prompts": self.deep}
        feats = clip.encode_image(images.to(clip.dtype), **kwargs).float()  # [B, E]
        return self.logit_scale.exp() * F.normalize(feats, dim=-1) @ self.text_features.t()

    def to(self, device) -> "ClassifierHead":
        def move(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.to(device)

        return dataclasses.replace(self, text_features=move(self.text_features),
                                   logit_scale=move(self.logit_scale), shallow=move(self.shallow),
                                   deep={i: move(p) for i, p in self.deep.items()})


def _text_features(model) -> Tensor:
    """The method's class text features [C, E], normalised, if they need no image."""
    fn = getattr(model, "text_features", None)
    try:
        if callable(fn):
            feats = fn()
        elif isinstance(fn, Tensor):
            feats = fn
        elif hasattr(getattr(model, "prompts", None), "encode_text"):
            feats = model.prompts.encode_text(model.clip)
        else:
            raise TypeError
    except TypeError:
        raise ValueError(_not_fixed(model)) from None
    return F.normalize(feats.float(), dim=-1)


def _vision_prompts(model) -> tuple[Optional[Tensor], dict]:
    """The learned vision prompts the method gives the CLIP core (none: plain image tower)."""
    prompts = getattr(model, "prompts", None)
    if hasattr(prompts, "vision_prompts"):
        shallow, deep = prompts.vision_prompts()
        return shallow, dict(deep)
    vision = getattr(model, "vision", None)
    if vision is not None and hasattr(vision, "shallow"):
        return vision.shallow, vision.deep.as_dict()
    return None, {}


def _not_fixed(model) -> str:
    return (f"{model.name}: its logits are not a fixed classifier over CLIP image features (the "
            f"text side depends on the image, or the image side on the text: CoCoOp, DPT, TOMML, "
            f"MuPL; or the image tower's weights are adapted: MMA, CLIP-LoRA); use "
            f"'vlprompt predict --checkpoint RUN_DIR' instead")


@torch.no_grad()
def classifier_head(model) -> ClassifierHead:
    """The fixed head of ``model``, checked to give the method's own logits."""
    text = _text_features(model)
    shallow, deep = _vision_prompts(model)
    head = ClassifierHead(text.detach().clone(), model.clip.logit_scale.detach().float().clone(),
                          list(model.classnames),
                          None if shallow is None else shallow.detach().float().clone(),
                          {int(i): p.detach().float().clone() for i, p in deep.items()})
    size = model.clip.image_size
    g = torch.Generator().manual_seed(0)
    probe = torch.randn(4, 3, size, size, generator=g).to(model.device)  # random images
    ref, got = model(probe).float(), head.logits(model.clip, probe)
    if ref.shape != got.shape or not torch.allclose(ref, got, rtol=1e-4, atol=1e-3):
        raise ValueError(_not_fixed(model))
    return head


def export_classifier(run_dir: PathLike, output: PathLike,
                      classes: Optional[Sequence[str]] = None, device="cpu") -> Path:
    """Write the run's fixed classifier head to ``output`` (safetensors)."""
    from safetensors.torch import save_file

    from ..clip.fingerprint import backbone_fingerprint
    from ..fileio import atomic_write

    model, header, folder = _run_method(run_dir, classes, device)
    head = classifier_head(model)
    tensors = {"text_features": head.text_features.cpu().contiguous(),
               "logit_scale": head.logit_scale.reshape(1).cpu()}
    if head.shallow is not None:
        tensors["vision.shallow"] = head.shallow.cpu().contiguous()
        tensors.update({f"vision.deep.{i}": p.cpu().contiguous() for i, p in head.deep.items()})
    meta = {"format": CLASSIFIER_FORMAT, "classnames": json.dumps(head.classnames),
            "backbone": str(header["backbone"]),
            "backbone_fingerprint": backbone_fingerprint(model.clip),
            "backbone_dtype": str(getattr(model.clip, "source_dtype", "") or ""),
            "method": model.name, "template": str(header.get("template") or ""),
            "source_run": str(folder.resolve()), "epoch": str(header.get("epoch")),
            "vlprompt_version": __version__,
            "logits": "exp(logit_scale) * normalize(image_features) @ text_features.T"}
    return atomic_write(output, lambda tmp: save_file(tensors, tmp, metadata=meta))


def is_classifier_file(path: PathLike) -> bool:
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == CLASSIFIER_FORMAT
    except Exception:  # not a safetensors file
        return False


def read_classifier(path: PathLike) -> ClassifierHead:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        classnames = json.loads(meta["classnames"])
        text = tensors["text_features"]
    except Exception as err:  # corrupt file, missing entries
        raise ValueError(f"{path}: not a readable vlprompt classifier ({err}); re-export it with "
                         f"'vlprompt export RUN_DIR --format classifier'") from None
    deep = {int(k.rsplit(".", 1)[1]): v for k, v in tensors.items()
            if k.startswith("vision.deep.")}
    return ClassifierHead(text, tensors["logit_scale"].reshape(()), classnames,
                          tensors.get("vision.shallow"), deep, meta)


@torch.no_grad()
def predict_with_classifier(path: PathLike, images: Sequence, classes: Optional[Sequence[str]],
                            topk: int = 5, device="cpu", backbone: Optional[str] = None,
                            clip=None) -> list[list[tuple[str, float]]]:
    """Top-``topk`` (class, probability) per image with an exported head: the image tower
    only. ``classes`` selects (and orders) a subset of the exported classes."""
    from ..clip.load import load_clip
    from ..data import build_transform
    from ..engine.checkpoint import check_backbone

    head = read_classifier(path)
    meta = head.metadata
    clip = clip if clip is not None else load_clip(backbone or meta["backbone"], device=device)
    check_backbone({"backbone": meta.get("backbone"), "backbone_dtype": meta.get("backbone_dtype"),
                    "backbone_fingerprint": meta.get("backbone_fingerprint")}, clip, str(path))
    if classes:
        wanted = [c.replace("_", " ") for c in classes]
        missing = [c for c in wanted if c not in head.classnames]
        if missing:
            raise ValueError(f"{path}: exported for {len(head.classnames)} classes, not for "
                             f"{', '.join(missing[:3])}; re-export with --classes")
        rows = [head.classnames.index(c) for c in wanted]
        head = dataclasses.replace(head, text_features=head.text_features[rows], classnames=wanted)
    head = head.to(device)
    transform = build_transform(False, clip.image_size)
    batch = torch.stack([transform(img) for img in images]).to(device)  # [N, 3, S, S]
    probs = head.logits(clip, batch).softmax(dim=-1)
    values, indices = probs.topk(min(topk, len(head.classnames)), dim=-1)
    return [[(head.classnames[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist())]
            for vs, ix in zip(values, indices)]


# ------------------------------------------------------------------------------ dassl
def official_states(model, layout) -> dict[str, "OrderedDict[str, Tensor]"]:
    """The method's tensors as the official trainer's state dicts, token buffers included."""
    from .mapping import ours_to_official
    from .official import attr_path

    states = ours_to_official(layout, {k: v.detach().cpu()
                                       for k, v in model.trainable_state_dict().items()})
    prompts = attr_path(model, layout.text_prompts)
    if prompts is not None:
        emb = prompts.embeddings.detach().cpu()  # [C, L, D]
        state = states[layout.tokens_model or layout.models[0]]
        state[layout.tokens + "token_prefix"] = emb[:, :1].clone()  # SOS
        state[layout.tokens + "token_suffix"] = emb[:, 1 + prompts.n_ctx:].clone()  # class, EOS
    return states


def _dassl_config(model, layout, header: dict) -> dict:
    from ..data import get_dataset
    from .mapping import dassl_config

    flat = dassl_config(layout, dataclasses.asdict(model.config))
    dataset = header.get("dataset") or ""
    try:
        aliases = get_dataset(dataset).aliases
        dataset = aliases[0] if aliases else dataset
    except KeyError:
        pass
    train = (header.get("config") or {}).get("train") or {}
    flat.update({"TRAINER.NAME": layout.trainer, "MODEL.BACKBONE.NAME": header.get("backbone"),
                 "DATASET.NAME": dataset, "DATASET.NUM_SHOTS": header.get("shots"),
                 "DATASET.SUBSAMPLE_CLASSES": header.get("subsample", "all"),
                 "SEED": header.get("seed"), "OPTIM.MAX_EPOCH": train.get("max_epoch"),
                 "OPTIM.LR": train.get("lr")})
    return flat


def export_dassl(run_dir: PathLike, output: PathLike) -> Path:
    """Write the run as the official trainer's output folder ``output`` (see the module doc)."""
    import yaml

    from ..fileio import atomic_write, atomic_write_text
    from .dassl_config import nest
    from .official import layout_of

    model, header, _ = _run_method(run_dir, None, "cpu")
    layout = layout_of(type(model))
    epoch = int(header.get("epoch") or 0)
    output = Path(output)
    for name, state in official_states(model, layout).items():
        checkpoint = {"state_dict": state, "epoch": epoch, "optimizer": None, "scheduler": None,
                      "val_result": None}
        path = output / name / f"model.pth.tar-{epoch}"
        atomic_write(path, lambda tmp, c=checkpoint: torch.save(c, tmp))
        atomic_write_text(output / name / "checkpoint", path.name + "\n")  # Dassl's marker
    text = yaml.safe_dump(nest(_dassl_config(model, layout, header)), sort_keys=True)
    atomic_write_text(output / "config.yaml", text)
    return output
