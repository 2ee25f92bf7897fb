"""Run checkpoints: only what a method learned, plus a readable header.

A checkpoint generation (``RunDir.commit``, see ``engine/rundir.py``) holds
- ``checkpoint.safetensors``: ``method.trainable_state_dict()`` (kilobytes to megabytes);
- ``checkpoint.json``: method, config, backbone name and fingerprint, class names, epoch, version;
- ``training_state.pt``: optimiser, grad-scaler and RNG states, loss history (for ``--resume``).
The frozen CLIP is never saved. This module builds headers, checks that a checkpoint fits the
method and backbone it is loaded into, and carries the RNG state across a resume.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from .. import __version__
from .rundir import HEADER_FILE, TENSORS_FILE, Generation, RunDir

CHECKPOINT_FILE = TENSORS_FILE
FORMAT = "vlprompt-checkpoint/2"

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """Global RNG states (python, numpy, torch, CUDA) in a form ``torch.load(weights_only=True)``
    reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [kind, torch.from_numpy(np.asarray(keys).astype(np.int64)), int(pos),
                       int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# --------------------------------------------------------------------------- headers
def make_header(method, backbone: str, epoch: int, extra: Optional[dict] = None) -> dict:
    """The JSON header of a checkpoint of ``method`` after ``epoch`` epochs."""
    import dataclasses

    from ..clip.fingerprint import backbone_fingerprint

    header = {
        "format": FORMAT,
        "vlprompt_version": __version__,
        "method": method.name,
        "method_config": dataclasses.asdict(method.config),
        "template": method.template,
        "backbone": backbone,
        "backbone_fingerprint": backbone_fingerprint(method.clip),
        "backbone_dtype": getattr(method.clip, "source_dtype", None),
        "classnames": list(method.classnames),
        "epoch": epoch,
        "num_trainable_params": method.num_trainable_parameters(),
    }
    header.update(extra or {})
    return header


def trainable_tensors(method) -> dict[str, Tensor]:
    """The method's learned tensors as contiguous CPU tensors (what a checkpoint stores)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in method.trainable_state_dict().items()}


def save_checkpoint(run_dir: PathLike, method, header: dict,
                    training_state: Optional[dict] = None) -> Generation:
    """Commit the trainable tensors, the training state (if given) and the header as one
    generation of ``run_dir``."""
    return RunDir(run_dir).commit(trainable_tensors(method), header, training_state)


def resolve_run_folder(path: PathLike) -> Path:
    """A run folder from what users pass to ``--checkpoint``: the folder itself, a file in it
    (``checkpoint.json``, ``results.json``, ...), or a generation folder or file under
    ``checkpoints/``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist, so it is not a vlprompt run folder: pass "
                                f"a run folder of 'vlprompt train'")
    folder = path if path.is_dir() else path.parent
    if folder.parent.name == "checkpoints" and folder.name.isdigit():
        folder = folder.parent.parent
    return folder


def newest_generation(run_dir: PathLike) -> Generation:
    """The newest intact checkpoint of a run folder (or a file in it); a one-line error naming
    the problem when there is none."""
    folder = resolve_run_folder(run_dir)
    run = RunDir(folder)
    gen = run.latest_generation(verify=True)
    if gen is None and run.generations():
        problem = run.generations()[0].verify()
        raise ValueError(f"{folder}: every checkpoint is corrupt ({problem}); rerun training "
                         f"with --force")
    if gen is None:
        raise FileNotFoundError(
            f"{folder} holds no checkpoint: it is not a vlprompt run folder, or its training never "
            f"completed an epoch (expected checkpoints/<N>/{HEADER_FILE}, written by 'vlprompt "
            f"train')")
    return gen


def selected_generation(run_dir: PathLike, newest: Optional[Generation] = None) -> Generation:
    """The checkpoint a run is tested with: with ``train.select: best_val`` the best-epoch folder
    its newest intact generation names (``header["best"]``), else that generation itself."""
    newest = newest or newest_generation(run_dir)
    header = newest.header()
    run = RunDir(resolve_run_folder(run_dir))
    best = run.best_generation(header.get("best")) if header.get("select") == "best_val" else None
    if best is None:
        return newest
    problem = best.verify()
    if problem:
        raise ValueError(f"{run.path}: the best-epoch checkpoint (epoch {best.index}) is not "
                         f"usable ({problem}); rerun training with --force")
    return best


def read_header(run_dir: PathLike) -> dict:
    """The header of a run folder's newest intact checkpoint."""
    return newest_generation(run_dir).header()


def read_tensors(run_dir: PathLike) -> tuple[dict[str, Tensor], dict]:
    """(trainable tensors, safetensors metadata) of a run folder's newest intact checkpoint."""
    return read_generation_tensors(newest_generation(run_dir))


def read_generation_tensors(gen: Generation) -> tuple[dict[str, Tensor], dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(gen.tensors), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{gen.tensors}: corrupt checkpoint ({err}); delete that folder to fall "
                         f"back to the previous checkpoint, or rerun with --force") from None


def _same_backbone_name(recorded: Optional[str], clip) -> bool:
    names = {str(getattr(clip, "backbone_name", "") or ""), str(getattr(clip, "source", "") or "")}
    names.discard("")
    if not recorded or not names:
        return False
    resolved = {str(Path(n).expanduser().resolve()) if Path(n).expanduser().exists() else n
                for n in names}
    return recorded in names or recorded in resolved


def check_backbone(header: dict, clip, source: str = "") -> None:
    """A checkpoint only makes sense on the CLIP it was trained on: compare the content
    fingerprints (old checkpoints: the old checksum, else the backbone name/path)."""
    from ..clip.fingerprint import backbone_fingerprint, legacy_state_checksum

    source = source or "checkpoint"
    recorded = header.get("backbone")
    name = getattr(clip, "backbone_name", None) or "the given CLIP"
    expected = header.get("backbone_fingerprint")
    if expected:
        actual = backbone_fingerprint(clip)
        if expected == actual:
            return
        dtype, given = header.get("backbone_dtype"), getattr(clip, "source_dtype", None)
        note = (f" ({recorded!r} held {dtype} weights, {name} holds {given}: a copy in another "
                f"precision is a different backbone)" if dtype and given and dtype != given else "")
        raise ValueError(
            f"{source} was trained on backbone {recorded!r} (fingerprint {expected[:23]}), but "
            f"{name} has fingerprint {actual[:23]}{note}: the learned prompts do not apply to a "
            f"different backbone. Load {recorded!r} instead.")
    old = header.get("backbone_checksum")
    if not old or legacy_state_checksum(clip) == old:
        return
    if _same_backbone_name(recorded, clip):
        logger.warning("%s has an old-format backbone checksum, which depends on the thread count "
                       "and device, and it does not match; proceeding because the backbone "
                       "name/path matches (%s)", source, recorded)
        return
    raise ValueError(
        f"{source} was trained on backbone {recorded!r} (old-format checksum {old}), but {name} "
        f"differs in name and checksum: the learned prompts do not apply to a different "
        f"backbone. Load {recorded!r} instead.")


def check_classnames(header: dict, classnames, source: str, allow_mismatch: bool) -> None:
    """Class-specific learned tensors (e.g. CoOp ``csc``) belong to the classes they were
    trained on: refuse other classes unless ``allow_mismatch``."""
    trained = [c.replace("_", " ") for c in header.get("classnames") or []]
    wanted = [c.replace("_", " ") for c in classnames]
    if allow_mismatch or trained == wanted:
        return
    raise ValueError(
        f"{source} learned class-specific tensors for its {len(trained)} training classes "
        f"({', '.join(trained[:3])}{', ...' if len(trained) > 3 else ''}), not for "
        f"{', '.join(wanted[:3])}{', ...' if len(wanted) > 3 else ''}; evaluate on the training "
        f"classes, or pass --allow-class-mismatch to apply them anyway")


def load_checkpoint(run_dir: PathLike, method, check: bool = True) -> dict:
    """Load a run's newest intact checkpoint into ``method`` (after checking method and
    backbone); returns the header."""
    gen = newest_generation(run_dir)
    return load_generation(gen, method, check, str(resolve_run_folder(run_dir)))


def load_generation(gen: Generation, method, check: bool = True, source: str = "") -> dict:
    header = gen.header()
    source = source or str(gen.folder)
    if header.get("method") != method.name:
        raise ValueError(f"{source}: checkpoint is for method {header.get('method')!r}, "
                         f"not {method.name!r}")
    if check:
        check_backbone(header, method.clip, source)
    tensors, meta = read_generation_tensors(gen)
    if gen.index == 0 and "epoch" in meta and str(header.get("epoch")) != meta["epoch"]:
        raise ValueError(f"{source}: {CHECKPOINT_FILE} is from epoch {meta['epoch']} but "
                         f"{HEADER_FILE} says {header.get('epoch')} (an old-format run folder "
                         f"interrupted while saving); rerun with --force to start over")
    device = method.device
    method.load_trainable_state_dict({k: v.to(device) for k, v in tensors.items()})
    return header


def load_training_state(gen: Generation) -> dict:
    """The training state of a generation (raises ``ValueError`` when missing or corrupt)."""
    problem = gen.state_problem()
    if problem:
        raise ValueError(problem)
    try:
        return torch.load(str(gen.state_path), map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, ...
        raise ValueError(f"{gen.state_path}: unreadable ({err})") from None
