"""Official checkpoints -> a vlprompt method: find the files of an official run, read them
safely, sort their tensors by the method's ``official_layout``, infer the method config from
the shapes and the run's config, check the backbone, and load.

``load_official`` is what ``vlprompt eval --checkpoint <official>`` and ``vlprompt import``
call; every failure is a one-line ``ValueError``/``FileNotFoundError`` naming the file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from .dassl_config import read_official_config
from .layout import OfficialLayout
from .mapping import (Mapped, config_fields, field_of, official_to_ours, optional_keys,
                      ours_to_official, shape_fields)
from .unpickle import read_official_file, state_dict_of

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
_EPOCH_FILE = re.compile(r"^model\.pth\.tar-(\d+)$")
BEST_FILE = "model-best.pth.tar"


# ------------------------------------------------------------------------------ layouts
def layout_of(method_cls: type) -> OfficialLayout:
    """The method's own ``official_layout`` (a subclass does not inherit its parent's)."""
    layout = method_cls.__dict__.get("official_layout")
    if layout is None:
        raise ValueError(no_official_format(method_cls.name))
    return layout


def no_official_format(method: str) -> str:
    """The one-line refusal for a method without an ``official_layout``."""
    return (f"method {method!r} has no supported official checkpoint format (no official "
            f"repository layout); supported: {', '.join(supported_methods())}")


def supported_methods() -> list[str]:
    from ..methods import get_method, list_methods

    return [m for m in list_methods() if get_method(m).__dict__.get("official_layout")]


def _layouts() -> dict[str, OfficialLayout]:
    from ..methods import get_method

    return {m: layout_of(get_method(m)) for m in supported_methods()}


def registered_by(model: str) -> list[str]:
    """The methods whose official trainer registers a model under ``model``."""
    return [m for m, lay in _layouts().items() if model in lay.models]


def detect_methods(states: dict[str, dict[str, Tensor]], like=None) -> list[str]:
    """The methods whose layout places every tensor of ``states`` (what the file is); with
    ``like`` (a built method), only those that, built on its CLIP and classes, expect the
    tensors' shapes (key names alone do not tell CoCoOp's meta-net from TCP's)."""
    found = []
    for name, layout in _layouts().items():
        if not set(states) <= set(layout.models) or not states:
            continue
        try:
            mapped = official_to_ours(layout, states)
        except ValueError:  # not this layout's file
            continue
        if mapped.tensors and not mapped.unplaced and (like is None or
                                                        _shapes_fit(name, layout, mapped, like)):
            found.append(name)
    return found


def _shapes_fit(name: str, layout: OfficialLayout, mapped: Mapped, like) -> bool:
    """Whether method ``name``, with the settings the shapes imply, on ``like``'s CLIP and
    classes, expects the shapes of ``mapped`` (an error path: builds the method)."""
    from ..methods import get_method, make_config

    method_cls = get_method(name)
    defaults = dataclasses.asdict(method_cls.Config())
    fields = {k: v for k, v in shape_fields(layout, mapped.tensors).items() if k in defaults}
    try:
        expected = method_cls(like.clip, list(like.classnames),
                              make_config(method_cls, fields)).trainable_state_dict()
    except (ValueError, TypeError, RuntimeError):  # settings this backbone cannot hold
        return False
    return all(k in mapped.optional or k not in expected or expected[k].shape == v.shape
               for k, v in mapped.tensors.items())


# ------------------------------------------------------------------------------ files
@dataclasses.dataclass
class OfficialRun:
    """The files of one official run: its output folder and one file per registered model."""

    folder: Path
    files: dict[str, Path]


def _epoch_files(folder: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in folder.glob("model.pth.tar-*")
            if (m := _EPOCH_FILE.match(p.name))}


def _pick_file(model_dir: Path, epoch: Union[str, int]) -> Path:
    """``model.pth.tar-<epoch>``, ``model-best.pth.tar`` ("best") or the latest epoch ("last",
    falling back to the best file when no epoch file exists)."""
    files = _epoch_files(model_dir)
    if epoch == "best" or (epoch == "last" and not files):
        path = model_dir / BEST_FILE
    elif epoch == "last":
        path = files[max(files)]
    else:
        path = model_dir / f"model.pth.tar-{int(epoch)}"
    if not path.is_file():
        have = sorted(p.name for p in model_dir.glob("model*.pth.tar*"))
        raise FileNotFoundError(f"{path} does not exist (found: {', '.join(have) or 'nothing'})"
                                f"; pass --epoch with one of those")
    return path


def _describe_folder(folder: Path) -> str:
    subs = sorted(p.name for p in folder.iterdir() if p.is_dir() and
                  (_epoch_files(p) or (p / BEST_FILE).is_file())) if folder.is_dir() else []
    if not subs:
        return "no official checkpoint folder"
    owners = {s: registered_by(s) for s in subs}
    return "found " + ", ".join(f"{s}/ ({' or '.join(owners[s]) or 'unknown trainer'})"
                                for s in subs)


def find_official_run(path: PathLike, layout: OfficialLayout, method: str,
                      epoch: Union[str, int] = "last") -> OfficialRun:
    """The files of the official run at ``path``: an output folder (holding one sub-folder per
    registered model), one registered model's folder, or one checkpoint file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass an official output folder or a "
                                f"<folder>/{layout.models[0]}/model.pth.tar-<epoch> file")
    if path.is_file():
        if path.parent.name in layout.models:
            folder = path.parent.parent
            files = {m: folder / m / path.name for m in layout.models}
        elif len(layout.models) == 1:
            folder, files = path.parent, {layout.models[0]: path}
        else:
            raise ValueError(f"{path}: an official {method} run has {len(layout.models)} files, "
                             f"<folder>/{{{','.join(layout.models)}}}/<file>; pass the folder")
    else:
        folder = path.parent if path.name in layout.models else path
        if not any((folder / m).is_dir() for m in layout.models):
            if len(layout.models) == 1 and (_epoch_files(path) or (path / BEST_FILE).is_file()):
                return OfficialRun(path, {layout.models[0]: _pick_file(path, epoch)})
            raise FileNotFoundError(
                f"{path}: no official {method} checkpoint: expected "
                f"{path}/{layout.models[0]}/model.pth.tar-<epoch> ({layout.trainer}'s registered "
                f"model {layout.models[0]!r}); {_describe_folder(path)}")
        absent = [m for m in layout.models if not (folder / m).is_dir()]
        if absent:
            raise FileNotFoundError(
                f"{folder}: no official {method} checkpoint: expected the folders "
                f"{', '.join(f'{m}/' for m in layout.models)} ({layout.trainer}'s registered "
                f"models), {', '.join(absent)}/ missing; {_describe_folder(folder)}")
        first = _pick_file(folder / layout.models[0], epoch)
        files = {m: folder / m / first.name for m in layout.models}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} is missing: an official {method} run saves "
                                f"{', '.join(f'{m}/' for m in layout.models)} side by side")
    return OfficialRun(folder, files)


def read_states(run: OfficialRun) -> tuple[dict[str, dict[str, Tensor]], int]:
    """({registered model: state dict}, epoch saved in the files)."""
    states, epoch = {}, 0
    for model, path in run.files.items():
        checkpoint = read_official_file(path)
        states[model] = state_dict_of(checkpoint, path)
        epoch = int(checkpoint.get("epoch") or 0) or epoch
    return states, epoch


# ------------------------------------------------------------------------------ loading
@dataclasses.dataclass
class OfficialCheckpoint:
    """An official run loaded into a vlprompt method, with what was inferred and dropped."""

    method: Any
    layout: OfficialLayout
    run: OfficialRun
    epoch: int
    #: the method config it was built with
    fields: dict
    official_config: dict
    config_sources: list[Path]
    mapped: Mapped
    notes: list[str]


def _expected_keys(layout: OfficialLayout) -> str:
    names = [r.official.replace("[{i}]", "") for r in layout.rules if not r.optional]
    return ", ".join(f"{n}*" if n.endswith(".") else n for n in names)


def _check_trainer(layout: OfficialLayout, flat: dict, sources: list[Path], method: str) -> None:
    trainer = flat.get("TRAINER.NAME") or flat.get("args.trainer")
    if trainer and str(trainer) != layout.trainer:
        users = [m for m, lay in _layouts().items() if lay.trainer == str(trainer)]
        hint = f"; use --method {users[0]}" if users else ""
        raise ValueError(f"{sources[0]}: the run was trained with trainer {trainer}, not "
                         f"{layout.trainer} (--method {method}){hint}")


def infer_config(method_cls: type, layout: OfficialLayout, mapped: Mapped, flat: dict,
                 sources: list[Path], overrides: dict) -> tuple[dict, list[str]]:
    """Method config fields: defaults < the official config < tensor shapes < ``overrides``,
    and one note per inferred setting."""
    defaults = dataclasses.asdict(method_cls.Config())
    notes = []
    from_config = config_fields(layout, flat, defaults)
    if from_config:
        where = ", ".join(p.name for p in sources)
        notes.append(f"from {where}: " + ", ".join(f"{k}={v!r}" for k, v in from_config.items()))
    fields = dict(from_config)
    shapes = {k: v for k, v in shape_fields(layout, mapped.tensors).items() if k in defaults}
    if shapes:
        notes.append("from the tensor shapes: " + ", ".join(
            f"{k}={v!r}" + (f" (config: {fields[k]!r})" if fields.get(k, v) != v else "")
            for k, v in shapes.items()))
    fields.update(shapes)
    if not from_config:
        kept = [k for k in map(field_of, layout.config.values())
                if k in defaults and k not in shapes]
        if kept:
            notes.append("no config.yaml/log.txt: kept the paper defaults " + ", ".join(
                f"{k}={defaults[k]!r}" for k in kept))
    if overrides:
        notes.append("given: " + ", ".join(f"{k}={v!r}" for k, v in overrides.items()))
        fields.update(overrides)
    return fields, notes


def _fill(layout: OfficialLayout, tensors: dict[str, Tensor], epoch: int) -> None:
    """vlprompt tensors that official files do not hold (``layout.fill``)."""
    if "gpa" in layout.fill:
        for key in list(tensors):
            tensors[f"gpa.{key}"] = tensors[key].clone()
        tensors["gpa.epochs"] = torch.tensor([epoch], dtype=torch.long)
    if "epoch" in layout.fill:
        tensors["epoch"] = torch.tensor([epoch], dtype=torch.long)


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal up to fp16 rounding (official runs keep CLIP and prompts in half precision)."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    if a.shape != b.shape or a.numel() == 0:
        return a.shape == b.shape
    return bool((a - b).abs().max() <= 2e-3 * b.abs().max() + 1e-6)


def _place(method, layout: OfficialLayout, mapped: Mapped, file: Path, name: str,
           states: dict) -> tuple[dict[str, Tensor], list[str]]:
    """The state to load into ``method`` (method dtypes), checked against what it expects."""
    expected = method.trainable_state_dict()
    tensors, notes = dict(mapped.tensors), []
    for key in sorted(mapped.optional):
        if key in expected and tensors[key].shape != expected[key].shape:
            notes.append(f"kept vlprompt's own {key} ({', '.join(mapped.sources[key])} has "
                         f"{tuple(tensors[key].shape)}: another class list; training-only)")
            tensors[key] = expected[key]
    for key in optional_keys(layout, expected) - set(tensors):  # not in the file
        tensors[key] = expected[key]
    for key in set(layout.keep) & set(expected) - set(tensors):  # never in official files
        tensors[key] = expected[key]
    missing = sorted(set(expected) - set(tensors))
    if missing:
        absent = ours_to_official(layout, {k: expected[k] for k in missing})
        names = [k for state in absent.values() for k in state] or missing
        others = [m for m in detect_methods(states, method) if m != name]
        hint = f"; it looks like a {' or '.join(others)} checkpoint" if others else ""
        raise ValueError(f"{file}: not an official {name} checkpoint: no {', '.join(names[:4])}"
                         f" (expected keys: {_expected_keys(layout)}){hint}")
    extra = sorted(set(tensors) - set(expected))
    mapped.unplaced += [n for k in extra for n in mapped.sources.get(k, [k])]
    for key in extra:
        del tensors[key]
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            others = [m for m in detect_methods(states, method) if m != name]
            why = (f"it looks like a {' or '.join(others)} checkpoint" if others else
                   "was it trained on another backbone?")
            raise ValueError(
                f"{file}: {', '.join(mapped.sources.get(key, [key]))} has shape "
                f"{tuple(value.shape)}, but {name} on this backbone expects "
                f"{tuple(expected[key].shape)} (expected keys: {_expected_keys(layout)}); {why}")
        tensors[key] = value.to(expected[key].dtype)
    return tensors, notes


def _check_unplaced(mapped: Mapped, layout: OfficialLayout, file: Path, name: str,
                    states: dict, method=None) -> None:
    if not mapped.unplaced:
        return
    others = [m for m in detect_methods(states, method) if m != name]
    listed = ", ".join(mapped.unplaced[:3]) + (", ..." if len(mapped.unplaced) > 3 else "")
    if others:
        raise ValueError(f"{file}: holds tensors {name} does not have ({listed}; {name} expects "
                         f"keys {_expected_keys(layout)}): it is a {' or '.join(others)} "
                         f"checkpoint; use --method {others[0]}")
    logger.warning("%s: could not place %d tensor(s) in %s: %s", file, len(mapped.unplaced),
                   name, listed)


def check_backbone_tensors(mapped: Mapped, clip, file: Path, backbone: str) -> Optional[str]:
    """Compare the frozen CLIP tensors an official file holds (whole-model checkpoints) and its
    ``token_prefix`` (the SOS embedding) with the given backbone; a note, or a one-line error."""
    ours = clip.state_dict()
    checked = 0
    for key, name, value in mapped.backbone:
        if key not in ours:
            mapped.unplaced.append(name)
            continue
        if not _close(value, ours[key]):
            raise ValueError(f"{file}: {name} differs from {backbone} ({tuple(value.shape)} vs "
                             f"{tuple(ours[key].shape)} or other values): the checkpoint was "
                             f"trained on another backbone; pass that one with --backbone")
        checked += 1
    prefix = mapped.tokens.get("token_prefix")
    if prefix is not None:
        from ..clip.tokenizer import SOT_TOKEN

        sos = clip.token_embedding.weight[SOT_TOKEN]  # [D]
        if prefix.shape[-1] != sos.shape[0] or not _close(prefix.reshape(-1, sos.shape[0])[0],
                                                          sos):
            raise ValueError(f"{file}: its token_prefix (the start-of-text embedding) differs from "
                             f"{backbone}'s: the checkpoint was trained on another backbone; pass "
                             f"that one with --backbone")
    return f"checked {checked} frozen backbone tensors against {backbone}" if checked else None


def attr_path(obj, path: Optional[str]):
    for part in (path or "").split(".") if path else []:
        obj = getattr(obj, part, None)
    return obj if path else None


def check_tokens(method, layout: OfficialLayout, mapped: Mapped, file: Path) -> Optional[str]:
    """Compare the file's ``token_suffix`` (the fixed words after the context, per class) with
    the method's prompts: a mismatch means other class names or another ``ctx_init``."""
    suffix, prompts = mapped.tokens.get("token_suffix"), attr_path(method, layout.text_prompts)
    if suffix is None or prompts is None:
        return None
    ours = prompts.embeddings[:, 1 + prompts.n_ctx:]  # [C, L-1-M, D]
    if suffix.shape[0] != ours.shape[0]:
        return (f"trained on {suffix.shape[0]} classes, set up for {ours.shape[0]} (the context "
                f"is shared, so this is fine unless it was class-specific)")
    if not _close(suffix, ours):
        logger.warning("%s: token_suffix (the fixed prompt words per class) differs from the "
                       "prompts built here (%d classes, ctx_init=%r): the class names or ctx_init "
                       "differ from the official run's; pass method.ctx_init=... if so", file,
                       ours.shape[0], getattr(method.config, "ctx_init", None))
        return "token_suffix differs from the prompts built here (see the warning)"
    return "token_suffix matches the prompts built here"


def load_official(path: PathLike, method_name: str, clip, classnames: Sequence[str],
                  template: Optional[str], overrides: Optional[dict] = None,
                  epoch: Union[str, int] = "last", backbone: str = "",
                  dataset: Optional[str] = None) -> OfficialCheckpoint:
    """Build ``method_name`` on ``clip`` for ``classnames`` (of ``dataset``, for methods whose
    class inputs need more than the names: LLM descriptions) from the official run at ``path``."""
    from ..methods import get_method, make_config

    method_cls = get_method(method_name)
    layout = layout_of(method_cls)
    run = find_official_run(path, layout, method_name, epoch)
    states, saved_epoch = read_states(run)
    file = next(iter(run.files.values()))
    try:
        mapped = official_to_ours(layout, states)
    except ValueError as err:  # layers missing, aliases that differ
        raise ValueError(f"{file}: {err} (expected keys: {_expected_keys(layout)})") from None
    flat, sources = read_official_config(run.folder)
    if not sources and run.folder.parent != run.folder:
        flat, sources = read_official_config(run.folder.parent)
    _check_trainer(layout, flat, sources, method_name)
    fields, notes = infer_config(method_cls, layout, mapped, flat, sources, overrides or {})
    method = method_cls(clip, list(classnames), make_config(method_cls, fields), template=template)
    if dataset and callable(getattr(method, "set_dataset", None)):
        method.set_dataset(dataset)
    note = check_backbone_tensors(mapped, clip, file, backbone or "the given backbone")
    _fill(layout, mapped.tensors, saved_epoch)
    tensors, place_notes = _place(method, layout, mapped, file, method_name, states)
    _check_unplaced(mapped, layout, file, method_name, states, method)
    method.load_trainable_state_dict({k: v.to(method.device) for k, v in tensors.items()})
    notes += place_notes + [n for n in (note, check_tokens(method, layout, mapped, file)) if n]
    if mapped.tokens:
        notes.append("dropped " + " and ".join(sorted(mapped.tokens)) + " (rebuilt from the "
                     "class names, as the official loader does)")
    if mapped.dropped:
        notes.append(f"dropped {len(mapped.dropped)} tensor(s) the official code recomputes or "
                     f"never uses: {', '.join(mapped.dropped[:4])}")
    return OfficialCheckpoint(method, layout, run, saved_epoch, dataclasses.asdict(method.config),
                              flat, sources, mapped, notes)
