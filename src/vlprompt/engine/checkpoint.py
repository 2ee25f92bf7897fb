"""Run checkpoints: only what a method learned, plus a readable header.

A run folder holds
- ``checkpoint.safetensors``: ``method.trainable_state_dict()`` (kilobytes to megabytes);
- ``checkpoint.json``: method, config, backbone name and checksum, class names, epoch, version;
- ``training_state.pt``: optimiser, grad-scaler and RNG states, loss history (for ``--resume``).
Each file is written atomically (temporary file + ``os.replace``), the header last, so the header
names an epoch whose tensors are complete. The frozen CLIP is never saved.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from .. import __version__
from ..fileio import atomic_write, atomic_write_json, atomic_write_text  # noqa: F401 (used by run.py)

CHECKPOINT_FILE = "checkpoint.safetensors"
HEADER_FILE = "checkpoint.json"
STATE_FILE = "training_state.pt"

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


# --------------------------------------------------------------------------- save / load
def make_header(method, backbone: str, backbone_checksum: str, epoch: int,
                extra: Optional[dict] = None) -> dict:
    import dataclasses

    header = {
        "format": "vlprompt-checkpoint/1",
        "vlprompt_version": __version__,
        "method": method.name,
        "method_config": dataclasses.asdict(method.config),
        "template": method.template,
        "backbone": backbone,
        "backbone_checksum": backbone_checksum,
        "classnames": list(method.classnames),
        "epoch": epoch,
        "num_trainable_params": method.num_trainable_parameters(),
    }
    header.update(extra or {})
    return header


def save_checkpoint(run_dir: PathLike, method, header: dict,
                    training_state: Optional[dict] = None) -> None:
    """Write the trainable tensors, the training state (if given) and then the header."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    state = {k: v.detach().to("cpu").contiguous() for k, v in method.trainable_state_dict().items()}
    epoch = str(header.get("epoch", 0))
    atomic_write(run_dir / CHECKPOINT_FILE,
            lambda tmp: save_file(state, tmp, metadata={"epoch": epoch, "method": method.name}))
    if training_state is not None:
        atomic_write(run_dir / STATE_FILE, lambda tmp: torch.save(training_state, tmp))
    atomic_write_json(run_dir / HEADER_FILE, header)


def read_header(run_dir: PathLike) -> dict:
    path = Path(run_dir) / HEADER_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a vlprompt run folder "
                                f"(expected {HEADER_FILE} and {CHECKPOINT_FILE}, written by "
                                f"'vlprompt train')")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def read_tensors(run_dir: PathLike) -> tuple[dict[str, Tensor], dict]:
    """(trainable tensors, safetensors metadata) of a run folder."""
    from safetensors import safe_open

    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (the run folder has no checkpoint)")
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def check_backbone(header: dict, clip, source: str = "") -> None:
    """A checkpoint only makes sense on the CLIP it was trained on: compare the checksums."""
    from ..clip.load import state_checksum

    expected = header.get("backbone_checksum")
    actual = state_checksum(clip)
    if expected and expected != actual:
        name = getattr(clip, "backbone_name", None) or "the given CLIP"
        raise ValueError(
            f"{source or 'checkpoint'} was trained on backbone {header.get('backbone')!r} "
            f"(checksum {expected}), but {name} has checksum {actual}: the learned prompts do not "
            f"apply to a different backbone. Load {header.get('backbone')!r} instead.")


def load_checkpoint(run_dir: PathLike, method, check: bool = True) -> dict:
    """Load a run's trainable tensors into ``method`` (after checking method and backbone);
    returns the header."""
    header = read_header(run_dir)
    if header.get("method") != method.name:
        raise ValueError(f"{run_dir}: checkpoint is for method {header.get('method')!r}, "
                         f"not {method.name!r}")
    if check:
        check_backbone(header, method.clip, str(run_dir))
    tensors, meta = read_tensors(run_dir)
    if "epoch" in meta and str(header.get("epoch")) != meta["epoch"]:
        raise ValueError(f"{run_dir}: {CHECKPOINT_FILE} is from epoch {meta['epoch']} but "
                         f"{HEADER_FILE} says {header.get('epoch')} (interrupted while saving); "
                         f"rerun with --force to start over")
    device = method.device
    method.load_trainable_state_dict({k: v.to(device) for k, v in tensors.items()})
    return header


def load_training_state(run_dir: PathLike) -> Optional[dict]:
    path = Path(run_dir) / STATE_FILE
    if not path.exists():
        return None
    return torch.load(str(path), map_location="cpu", weights_only=True)
