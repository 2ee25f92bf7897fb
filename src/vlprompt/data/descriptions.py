"""LLM-generated class descriptions (CoPrompt, HiCroPL; METHODS-SOTA.md §3, §6) and the cache of
their frozen CLIP text features.

The official repositories ship GPT-3 descriptions as ``gpt_file/<stem>_prompt.json``: one JSON
object per dataset mapping each class name (``_`` written as a space) to a list of sentences
(50 per class; 10 for EuroSAT, Flowers and Pets). The text's licence is unclear, so vlprompt does
not bundle them: users point to a folder holding them (``descriptions: PATH`` in a method config,
or the environment variable ``VLPROMPT_DESCRIPTIONS``), e.g. a clone of ShuvenduRoy/CoPrompt or
its ``gpt_file/`` folder. ImageNet's file (≥ 4 MiB) is also used for ImageNet-V2/-Sketch/-A/-R.
vlprompt's own toy world needs no file (``toyworld_descriptions``: captions of its grammar).

    texts = load_descriptions(folder, "eurosat", classnames)           # [C][n_c] sentences
    feats = description_features(clip, texts, "per_description")      # [n, C, E]
    mean = description_features(clip, texts, "mean")                  # [C, E]

Features are computed once per (backbone fingerprint, weight dtype, device type, texts) and kept
in ``<cache>/descriptions/`` (``vlprompt.clip.load.cache_dir()``), written atomically under a
file lock, so parallel jobs wait for one computation instead of repeating it.

Departures from the released code: class names missing from a file are matched ignoring case and
repeated spaces, and Flowers' ``lotus lotus`` finds the file's ``lotus`` (the released lookup
would raise ``KeyError``); a sentence longer than the context is truncated with its EOT kept
(released: an error from ``clip.tokenize``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from ..clip.model import CLIP

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
ENV_VAR = "VLPROMPT_DESCRIPTIONS"
MODES = ("per_description", "mean")
#: where the official files are published (the same GPT-3 files as OpenGVLab/CaFo gpt_file/)
SOURCE = "https://github.com/ShuvenduRoy/CoPrompt/tree/main/gpt_file"
#: vlprompt dataset name -> file stem of the official ``gpt_file/<stem>_prompt.json``
FILE_STEMS = {
    "caltech101": "caltech", "dtd": "dtd", "eurosat": "eurosat", "fgvc_aircraft": "fgvc",
    "food101": "food101", "imagenet": "imagenet", "imagenet_a": "imagenet_a",
    "imagenet_r": "imagenet_r", "imagenet_sketch": "imagenet_sketch",
    "imagenetv2": "imagenetv2", "oxford_flowers": "oxford_flowers",
    "oxford_pets": "oxford_pets", "stanford_cars": "stanford_cars", "sun397": "sun397",
    "ucf101": "ucf101",
}
#: datasets whose descriptions are ImageNet's (the official repo holds identical copies)
IMAGENET_VARIANTS = ("imagenet_a", "imagenet_r", "imagenet_sketch", "imagenetv2")
#: our class name -> the key the official file uses for it
KEY_ALIASES = {"lotus lotus": "lotus"}
#: descriptions per text-tower call (fixed, so cached values never depend on it)
_BATCH = 256
_CACHE_VERSION = 1


def _dataset_key(dataset: str) -> str:
    """The registered name of ``dataset`` (Dassl names work: ``EuroSAT`` -> ``eurosat``); a
    name vlprompt does not know (a custom dataset) is used as it is."""
    from .base import get_dataset

    try:
        return get_dataset(dataset).name
    except KeyError:
        return dataset


def description_file_names(dataset: str) -> list[str]:
    """File names that may hold ``dataset``'s descriptions, in the order they are tried."""
    name = _dataset_key(dataset)
    names = [f"{FILE_STEMS.get(name, name)}_prompt.json"]
    if name in IMAGENET_VARIANTS:
        names.append("imagenet_prompt.json")
    return names


def descriptions_folder(folder: Optional[PathLike] = None) -> Path:
    """``folder``, else ``$VLPROMPT_DESCRIPTIONS``; a one-line error when neither is given."""
    value = os.fspath(folder) if folder else os.environ.get(ENV_VAR, "")
    if not value:
        raise FileNotFoundError(
            f"LLM class descriptions are needed: give their folder with the method config field "
            f"descriptions=PATH or the environment variable {ENV_VAR} (the gpt_file/ folder of "
            f"{SOURCE}; vlprompt does not bundle them)")
    return Path(value).expanduser()


def find_description_file(folder: Optional[PathLike], dataset: str) -> Path:
    """The JSON file of ``dataset`` in ``folder`` (or in its ``gpt_file/``); ``folder`` may
    also be the file itself."""
    root = descriptions_folder(folder)
    if root.is_file():
        return root
    names = description_file_names(dataset)
    for name in names:
        for candidate in (root / name, root / "gpt_file" / name):
            if candidate.is_file():
                return candidate
    also = f" (or {names[1]})" if len(names) > 1 else ""
    raise FileNotFoundError(
        f"no LLM descriptions for {dataset}: expected {root / names[0]}{also}; the official "
        f"files are published in {SOURCE} (not bundled with vlprompt)")


def _normal(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def load_descriptions(folder: Optional[PathLike], dataset: str,
                      classnames: Sequence[str]) -> list[list[str]]:
    """Per class of ``classnames`` (in order), its descriptions from the official-format file of
    ``dataset`` in ``folder`` (None: ``$VLPROMPT_DESCRIPTIONS``). Keys are class names with ``_``
    as spaces, matched exactly, then ignoring case and repeated spaces, then ``KEY_ALIASES``.
    Without a file, a dataset of ``BUILTIN`` (the toy world) gets its built-in descriptions."""
    try:
        path = find_description_file(folder, dataset)
    except FileNotFoundError:
        builtin = BUILTIN.get(_dataset_key(dataset))
        texts = builtin(classnames) if builtin is not None else None
        if texts is None:
            raise
        return texts
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON description file ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object mapping class names to lists of "
                         f"sentences, got {type(data).__name__}")
    loose = {_normal(k): k for k in data}
    out, missing = [], []
    for name in classnames:
        spaced = name.replace("_", " ")
        key = spaced if spaced in data else loose.get(_normal(spaced))
        if key is None and spaced in KEY_ALIASES:
            key = loose.get(_normal(KEY_ALIASES[spaced]))
        texts = data.get(key) if key is not None else None
        if not texts:
            missing.append(spaced)
            continue
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{path}: the descriptions of {key!r} must be a list of strings")
        out.append(list(texts))
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{path} has no descriptions for {len(missing)} class(es) of "
                         f"{dataset}: {shown}")
    return out


def toyworld_descriptions(classnames: Sequence[str], per_class: int = 10
                          ) -> Optional[list[list[str]]]:
    """vlprompt's toy world has no LLM file: ``per_class`` captions of each "<colour> <shape>"
    class from the toy world's own caption grammar (colour and shape named, the other attributes
    random), fixed per class name. None when a name is not a toy-world class."""
    import random

    from ..toyworld import world

    out = []
    for name in classnames:
        colour, _, shape = name.replace("_", " ").partition(" ")
        if colour not in world.COLOURS or shape not in world.SHAPES:
            return None
        rng = random.Random(f"toyworld-descriptions:{colour} {shape}")
        texts: list[str] = []
        while len(texts) < per_class:
            spec = world.ObjectSpec(world.SHAPES.index(shape), world.COLOUR_NAMES.index(colour),
                                    rng.randrange(len(world.PATTERNS)),
                                    rng.randrange(len(world.SIZES)),
                                    rng.randrange(len(world.BACKGROUND_NAMES)))
            text = world.caption(spec, rng)
            if colour in text.split() or f"{colour} {shape}," in text:
                texts.append(text)
        out.append(texts)
    return out


#: datasets of vlprompt's own with built-in descriptions, used when no file is found
BUILTIN = {"toyworld": toyworld_descriptions}


def write_descriptions(folder: PathLike, dataset: str,
                       descriptions: Mapping[str, Sequence[str]]) -> Path:
    """Write ``{class name: [sentences]}`` as ``dataset``'s file in the official format (for a
    custom dataset's own descriptions, and for tests)."""
    from ..fileio import atomic_write_json

    data = {name.replace("_", " "): list(texts) for name, texts in descriptions.items()}
    return atomic_write_json(Path(folder) / description_file_names(dataset)[0], data, indent=4)


# ----------------------------------------------------------------------------- features
def _content_key(clip: "CLIP", descriptions: Sequence[Sequence[str]]) -> str:
    from ..clip.fingerprint import backbone_fingerprint

    payload = json.dumps({"version": _CACHE_VERSION, "texts": [list(d) for d in descriptions],
                          "context_length": clip.context_length, "dtype": str(clip.dtype),
                          "device": clip.logit_scale.device.type}, ensure_ascii=False)
    fingerprint = backbone_fingerprint(clip).split(":")[-1]
    return f"{fingerprint[:24]}-{hashlib.sha256(payload.encode()).hexdigest()[:24]}"


@torch.no_grad()
def _encode(clip: "CLIP", texts: list[str]) -> Tensor:
    """Normalised frozen text features [N, E] (float32, CPU), autocast off."""
    device = clip.logit_scale.device
    feats = []
    with torch.autocast(device.type, enabled=False):
        for i in range(0, len(texts), _BATCH):
            tokens = clip.tokenizer.tokenize(texts[i: i + _BATCH], clip.context_length).to(device)
            feats.append(F.normalize(clip.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(feats)


def _read_cache(path: Path, rows: int) -> Optional[Tensor]:
    """A cached feature table, or None when absent or unreadable (then it is recomputed)."""
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        feats = load_file(str(path))["features"]
    except Exception as err:  # noqa: BLE001 (a damaged entry of any kind is just recomputed)
        logger.warning("ignoring an unreadable description-feature cache entry %s (%s)", path, err)
        return None
    return feats if feats.dim() == 2 and feats.shape[0] == rows else None


def _cached_features(clip: "CLIP", descriptions: Sequence[Sequence[str]]) -> Tensor:
    """Every description's normalised feature, flat [N, E], from the cache or computed once."""
    from safetensors.torch import save_file

    from ..clip.load import cache_dir
    from ..fileio import atomic_write, file_lock

    texts = [t for d in descriptions for t in d]
    path = cache_dir() / "descriptions" / f"{_content_key(clip, descriptions)}.safetensors"
    try:
        with file_lock(path.with_suffix(".lock")):
            feats = _read_cache(path, len(texts))
            if feats is None:
                feats = _encode(clip, texts)
                atomic_write(path, lambda tmp: save_file({"features": feats.contiguous()}, tmp))
            return feats
    except OSError as err:  # a read-only cache folder: compute without caching
        logger.warning("cannot cache description features in %s (%s)", path.parent, err)
        return _encode(clip, texts)


def description_features(clip: "CLIP", descriptions: Sequence[Sequence[str]],
                         mode: str = "per_description") -> Tensor:
    """Frozen CLIP text features of per-class descriptions (``load_descriptions``' output), on
    the CLIP's device, float32.

    ``per_description``: [n_desc, C, E], each normalised (CoPrompt draws one row per step); all
    classes must have the same number of descriptions. ``mean``: [C, E], the normalised mean of
    the normalised features of each class (HiCroPL's averaged target).
    """
    if mode not in MODES:
        raise ValueError(f"description_features: mode must be one of {', '.join(MODES)}, "
                         f"got {mode!r}")
    counts = [len(d) for d in descriptions]
    if not counts or min(counts) == 0:
        raise ValueError("description_features: every class needs at least one description")
    if mode == "per_description" and len(set(counts)) > 1:
        lo, hi = counts.index(min(counts)), counts.index(max(counts))
        raise ValueError(f"per_description features need the same number of descriptions for "
                         f"every class; class {lo} has {counts[lo]}, class {hi} has "
                         f"{counts[hi]} (use mode='mean', or equalise the file)")
    flat = _cached_features(clip, descriptions)
    device = clip.logit_scale.device
    if mode == "per_description":
        C, n = len(counts), counts[0]
        return flat.view(C, n, -1).transpose(0, 1).contiguous().to(device)  # [n, C, E]
    means = torch.stack([part.mean(0) for part in flat.split(counts)])  # [C, E]
    return F.normalize(means, dim=-1).to(device)
