"""Reading official Dassl checkpoints without running arbitrary pickles.

A Dassl checkpoint (``TrainerBase.save_model``) is a ``torch.save``d dict: ``state_dict``,
``epoch``, ``optimizer`` (a state dict), ``scheduler`` and ``val_result``. The scheduler state
of Dassl's warmup schedulers holds its ``successor`` — a pickled ``torch.optim.lr_scheduler``
object that references the pickled optimiser object — so ``torch.load(weights_only=True)``
refuses most of these files. They are then read with an unpickler that allows only tensors,
containers and the optimiser/scheduler classes such files hold; those classes are rebuilt as
inert ``OfficialObject`` records (no torch.optim code runs), and anything else is refused by
name before it is created (the same rule as the Dassl split pickles, ``data/records.py``).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Union

import torch

PathLike = Union[str, os.PathLike]

#: containers and scalars a checkpoint may hold
_SAFE = {("collections", "OrderedDict"), ("collections", "defaultdict"), ("builtins", "dict"),
         ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
         ("builtins", "frozenset"), ("builtins", "int"), ("builtins", "float"),
         ("builtins", "bool"), ("builtins", "str"), ("builtins", "complex"),
         ("_codecs", "encode"), ("torch", "Size"), ("torch", "device")}
#: tensor rebuilders (``torch._utils``)
_TENSOR = {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter",
           "_rebuild_parameter_with_state"}
#: optimiser and scheduler classes Dassl's ``build_optimizer``/``build_lr_scheduler`` create
#: (``dassl/optim/optimizer.py``, ``lr_scheduler.py``): the only objects found in such files
OPTIM_CLASSES = {
    ("torch.optim.sgd", "SGD"), ("torch.optim.adam", "Adam"), ("torch.optim.adamw", "AdamW"),
    ("torch.optim.rmsprop", "RMSprop"), ("dassl.optim.radam", "RAdam"),
    ("dassl.optim.radam", "PlainRAdam"), ("dassl.optim.radam", "AdamW"),
    ("torch.optim.lr_scheduler", "CosineAnnealingLR"), ("torch.optim.lr_scheduler", "StepLR"),
    ("torch.optim.lr_scheduler", "MultiStepLR"),
    ("dassl.optim.lr_scheduler", "ConstantWarmupScheduler"),
    ("dassl.optim.lr_scheduler", "LinearWarmupScheduler")}


class OfficialObject:
    """Stands in for a pickled optimiser/scheduler object: its class name and pickled state."""

    qualname = "object"

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.qualname} (not rebuilt)>"


def _shim(module: str, name: str) -> type:
    return type(name, (OfficialObject,), {"qualname": f"{module}.{name}"})


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle references something other than tensors, containers or optimiser state."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if module == "__builtin__":  # protocol 2 files from Python 2 era code
            module = "builtins"
        if (module, name) in _SAFE:
            return super().find_class(module, name)
        if module == "torch._utils" and name in _TENSOR:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in OPTIM_CLASSES:
            return _shim(module, name)
        raise RefusedGlobal(module, name)


class _RestrictedPickle:
    """A ``pickle_module`` for ``torch.load`` whose unpickler is the restricted one."""

    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file, **kwargs):
        return _RestrictedUnpickler(file, **kwargs).load()


def read_official_file(path: PathLike) -> dict:
    """The checkpoint dict of an official file, read safely (see the module docstring).

    Raises ``ValueError`` naming the file for a refused global, a non-checkpoint or a corrupt
    file; nothing in the file is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected an official checkpoint such as "
                                f"<output>/prompt_learner/model.pth.tar-<epoch>)")
    mmap = zipfile.is_zipfile(path)
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception:  # optimiser/scheduler objects, or not a torch file: try the restricted one
        data = _restricted_load(path, mmap)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a {type(data).__name__}, not a checkpoint dict with a "
                         f"'state_dict' (was it written by an official Dassl trainer?)")
    return data


def _restricted_load(path: Path, mmap: bool) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False,
                          pickle_module=_RestrictedPickle, mmap=mmap)
    except RefusedGlobal as err:
        raise ValueError(
            f"{path}: refusing to unpickle {err.module}.{err.name}: official checkpoints hold "
            f"only tensors, containers and optimiser/scheduler state, so this file is not one "
            f"(nothing in it was run)") from None
    except Exception as err:  # truncated zip, not a pickle, ...
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({text})") from None


def state_dict_of(checkpoint: dict, path: PathLike) -> dict:
    """The tensors of ``checkpoint["state_dict"]`` (a ``module.`` prefix of DataParallel
    removed, as Dassl's ``load_pretrained_weights`` does)."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        keys = ", ".join(sorted(map(str, checkpoint))[:6])
        raise ValueError(f"{path}: no 'state_dict' in the checkpoint (keys: {keys}); expected a "
                         f"Dassl checkpoint of an official trainer")
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[key[7:] if key.startswith("module.") else key] = value
    return out

