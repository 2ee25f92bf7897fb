"""Run configuration: the training settings (``TrainConfig``) and the merge of defaults, the
packaged per-protocol YAML, a user YAML and ``key=value`` overrides into one resolved config.

Merge order (as CoOp's ``setup_cfg``, without yacs): method ``Config`` / ``TrainConfig`` defaults
-> ``vlprompt/configs/<method>/<protocol>.yaml`` -> the user's YAML -> overrides. Every file has
the sections ``method:`` and ``train:``; a key that names no field is an error that lists the
valid fields.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
SECTIONS = ("method", "train")
#: ``train`` settings that do not change a run's outcome: changing them does not block a resume,
#: and reports do not tell runs apart by them
RUNTIME_ONLY = frozenset({"num_workers", "print_freq", "eval_batch_size", "checkpoint_every_steps",
                          "checkpoint_every_minutes", "activation_checkpointing", "compile"})


@dataclasses.dataclass
class TrainConfig:
    """Training and evaluation settings. Defaults follow Dassl/CoOp (METHODS.md §1.3)."""

    max_epoch: int = 10
    lr: float = 0.002
    #: images per optimiser step, over all processes (split across ranks and ``grad_accum``)
    batch_size: int = 32
    eval_batch_size: int = 100
    #: "sgd" (Dassl: momentum, no nesterov), "adam" or "adamw" (Dassl: L2 / decoupled decay)
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    #: Adam(W) epsilon (Dassl's 1e-8; TCP and HiCroPL patch it to 1e-3 for fp16)
    adam_eps: float = 1e-8
    #: Adam(W) betas (Dassl's ADAM_BETA1/ADAM_BETA2)
    adam_betas: list = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    #: "cosine" (stepped per epoch), "constant", or "cosine_step" (stepped per optimiser step
    #: over the run's total steps)
    lr_scheduler: str = "cosine"
    #: the cosine's floor (eta_min of torch's CosineAnnealingLR), for both cosine schedules
    min_lr: float = 0.0
    #: epochs at the constant ``warmup_lr`` before the schedule (Dassl's constant warmup)
    warmup_epoch: int = 1
    warmup_lr: float = 1e-5
    #: RandomResizedCrop's area range for the "standard" training augmentation (torchvision's
    #: and Dassl's default (0.08, 1); MMRL's configs use (0.5, 1))
    crop_scale: list = dataclasses.field(default_factory=lambda: [0.08, 1.0])
    #: "auto" (bf16 on GPUs that have it, else fp16; on CPU bf16 where it is native, AVX512-BF16
    #: or AMX, else fp32; ``$VLPROMPT_CPU_BF16`` = 0/1 decides), "fp32" (exact reproduction on
    #: any machine), "bf16" or "fp16"
    precision: str = "auto"
    #: split each batch into this many chunks (same gradient, less memory)
    grad_accum: int = 1
    #: DataLoader worker processes; None (default) chooses from the machine (``runtime``).
    #: Augmentation is seeded per item, so the value never changes the results.
    num_workers: Optional[int] = None
    #: log a line every this many batches
    print_freq: int = 10
    seed: int = 1
    #: also commit a checkpoint within an epoch every this many steps (0: off) ...
    checkpoint_every_steps: int = 0
    #: ... and whenever this many minutes passed since the last one (0: off), so a long epoch
    #: (ImageNet: thousands of steps) is not lost to a kill; resuming mid-epoch is exact
    checkpoint_every_minutes: float = 10.0
    #: epochs by number of shots (e.g. CoOp few-shot: {1: 50, 2: 100, ...}); overrides max_epoch
    #: unless max_epoch is set explicitly by a user file or an override
    shots_epochs: Optional[dict] = None
    #: epochs by dataset (e.g. {imagenet: 50}); takes precedence over ``shots_epochs``
    dataset_epochs: Optional[dict] = None
    #: an iteration budget: train exactly this many optimiser steps (epochs continue over the
    #: data as needed; the last one stops early); None: ``max_epoch`` epochs
    max_steps: Optional[int] = None
    #: ``max_steps`` by number of shots (e.g. CLIP-LoRA: 500 x shots); overrides max_steps
    #: unless max_steps is set explicitly by a user file or an override
    shots_steps: Optional[dict] = None
    #: model selection: "last" (test the last epoch's tensors) or "best_val" (evaluate on the val
    #: split after every epoch and test the best epoch's, later epoch on ties: Dassl's
    #: ``TEST.FINAL_MODEL best_val``, which HiCroPL's bundled Dassl makes its default)
    select: str = "last"
    #: recompute the activations of the transformer blocks that need gradients in backward
    #: (``torch.utils.checkpoint``): same numbers, less memory, about one more forward of time
    activation_checkpointing: bool = False
    #: ``torch.compile`` the towers' transformer blocks for training; falls back to eager
    #: (with a warning) where compilation fails
    compile: bool = False
    #: read images from an on-disk uint8 cache, decoded and downsized (shorter side = the image
    #: size) once (``data.image_cache``; ``$VLPROMPT_IMAGE_CACHE``). A named approximation for
    #: training (crops resampled from the smaller image); exact for the test transform
    image_cache: bool = False
    #: JPEG draft decoding (DCT scaled to >= the image size; ``data.transforms``). A named
    #: approximation for training and test: pixels differ slightly from a full decode
    fast_decode: bool = False
    #: a named approximation for methods whose image tower is frozen and unprompted
    #: (``Method.frozen_image_tower``: CoOp, KgCoOp, ProGrad, TCP, CoCoOp, DePT on them): > 0
    #: draws this many augmented views of every training image once (deterministic per seed),
    #: caches their image features, and trains on a view drawn per item and epoch, so training
    #: never runs the image tower; 0 (default): a fresh augmentation every time, as the papers
    cached_views: int = 0

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"train.optimizer must be sgd, adam or adamw, got {self.optimizer!r}")
        if self.lr_scheduler not in ("cosine", "constant", "cosine_step"):
            raise ValueError(f"train.lr_scheduler must be cosine, constant or cosine_step, got "
                             f"{self.lr_scheduler!r}")
        if self.select not in ("last", "best_val"):
            raise ValueError(f"train.select must be last or best_val, got {self.select!r}")
        if not self.adam_eps > 0:
            raise ValueError(f"train.adam_eps must be > 0, got {self.adam_eps}")
        betas = self.adam_betas
        if (not isinstance(betas, (list, tuple)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"train.adam_betas must be two numbers in [0, 1), got {betas!r}")
        self.adam_betas = [float(b) for b in betas]
        scale = self.crop_scale
        if (not isinstance(scale, (list, tuple)) or len(scale) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale)
                or not 0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"train.crop_scale must be two numbers 0 < low <= high <= 1, got "
                             f"{scale!r}")
        self.crop_scale = [float(v) for v in scale]
        if isinstance(self.cached_views, bool) or not isinstance(self.cached_views, int) \
                or self.cached_views < 0:
            raise ValueError(f"train.cached_views must be an integer >= 0 (0: off), got "
                             f"{self.cached_views!r}")
        if self.min_lr < 0:
            raise ValueError(f"train.min_lr must be >= 0, got {self.min_lr}")
        if isinstance(self.max_steps, float) and self.max_steps.is_integer():
            self.max_steps = int(self.max_steps)
        if self.max_steps is not None and (isinstance(self.max_steps, bool)
                                           or not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):
            raise ValueError(f"train.max_steps must be an integer >= 1 or null, got "
                             f"{self.max_steps!r}")
        for name in ("max_epoch", "batch_size", "eval_batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("image_cache", "fast_decode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"train.{name} must be true or false, got "
                                 f"{getattr(self, name)!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be divisible by "
                             f"train.grad_accum ({self.grad_accum})")


def _fields(cls: type) -> dict[str, Any]:
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(cls)}


def default_config(method: str) -> dict:
    """The defaults of a method's ``Config`` and of ``TrainConfig``: {"method": ..., "train": ...}."""
    from .methods import get_method

    return {"method": _fields(get_method(method).Config), "train": _fields(TrainConfig)}


def protocol_config_file(method: str, protocol: str) -> Optional[Path]:
    path = CONFIG_DIR / method / f"{protocol}.yaml"
    return path if path.exists() else None


def list_protocol_configs(method: str) -> list[str]:
    folder = CONFIG_DIR / method
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _read_yaml(path: Union[str, os.PathLike]) -> dict:
    """A config file: sections ``method`` and ``train``, plus an optional ``datasets`` mapping
    ``{dataset: {method: ..., train: ...}}`` for settings a paper gives per dataset (e.g.
    PromptSRC's few-shot GPA), and an optional ``backbones`` mapping ``{backbone: {method: ...,
    train: ...}}`` for settings a paper gives per backbone (CoOp's RN50 files), keyed by the
    canonical backbone name (``RN50``, ``ViT-B/16``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with sections {', '.join(SECTIONS)}")
    unknown = sorted(set(data) - set(SECTIONS) - {"datasets", "backbones"})
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {', '.join(unknown)}; a config file has the "
                         f"sections {', '.join(SECTIONS)} and optionally 'datasets' and "
                         f"'backbones'")
    out = _sections({k: v for k, v in data.items() if k in SECTIONS}, str(path))
    per_dataset = data.get("datasets") or {}
    if not isinstance(per_dataset, dict):
        raise ValueError(f"{path}: 'datasets' must map dataset names to {{method: ..., train: ...}}")
    out["datasets"] = {name: _sections(values or {}, f"{path}: datasets.{name}")
                       for name, values in per_dataset.items()}
    per_backbone = data.get("backbones") or {}
    if not isinstance(per_backbone, dict):
        raise ValueError(f"{path}: 'backbones' must map backbone names to "
                         f"{{method: ..., train: ...}}")
    out["backbones"] = {}
    for name, values in per_backbone.items():
        canonical = _canonical_backbone(str(name))
        if canonical is None:
            raise ValueError(f"{path}: backbones.{name}: not a known backbone name (e.g. RN50, "
                             f"ViT-B/16)")
        out["backbones"][canonical] = _sections(values or {}, f"{path}: backbones.{name}")
    return out


def _canonical_backbone(name: str) -> Optional[str]:
    from .clip.load import canonical_backbone_name

    return canonical_backbone_name(name)


def backbone_config_name(backbone: Any, clip: Any = None) -> Optional[str]:
    """The canonical name that selects a config file's ``backbones`` block: the backbone's name
    (``RN50``, ``rn50``, ``openai:RN50``), the name of the file a named backbone is cached as
    (``.../RN50.pt``), or the ``backbone_name`` of an already loaded CLIP; None otherwise (a
    renamed file, an open_clip spec: only the file's general sections apply)."""
    from .clip.load import OPENAI_MODELS

    for candidate in (getattr(clip, "backbone_name", None), backbone):
        if candidate is None or not isinstance(candidate, (str, os.PathLike)):
            continue
        name = _canonical_backbone(str(candidate))
        if name is not None:
            return name
        by_file = {file: model for model, (file, _) in OPENAI_MODELS.items()}
        if Path(candidate).name in by_file:
            return by_file[Path(candidate).name]
    return None


def _sections(data: dict, source: str) -> dict:
    if not isinstance(data, dict) or set(data) - set(SECTIONS):
        raise ValueError(f"{source}: expected only the sections {', '.join(SECTIONS)}")
    for section in SECTIONS:
        if not isinstance(data.get(section) or {}, dict):
            raise ValueError(f"{source}: section {section!r} must be a mapping")
    return {s: dict(data.get(s) or {}) for s in SECTIONS}


def _merge_file(config: dict, data: dict, source: str, dataset: Optional[str],
                explicit: Optional[set] = None, backbone: Optional[str] = None) -> None:
    """A file's sections, then its per-backbone block for ``backbone`` and its per-dataset
    block for ``dataset`` (if any; the dataset's is the more specific and comes last)."""
    _merge(config, {s: data[s] for s in SECTIONS}, source, explicit)
    if backbone is not None and backbone in data.get("backbones", {}):
        _merge(config, data["backbones"][backbone], f"{source} (backbones.{backbone})", explicit)
    if dataset is not None and dataset in data["datasets"]:
        _merge(config, data["datasets"][dataset], f"{source} (datasets.{dataset})", explicit)


def _merge(config: dict, update: dict, source: str, explicit: Optional[set] = None) -> None:
    for section, values in update.items():
        valid = config[section]
        for key, value in values.items():
            if key not in valid:
                raise ValueError(f"{source}: unknown {section} field {key!r}; valid {section} fields: "
                                 f"{', '.join(valid)}")
            valid[key] = value
            if explicit is not None:
                explicit.add((section, key))


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    """Give ``value`` the type of the field's default (YAML reads ``1e-3`` as a string, and
    ``ctx_init=1`` as a number)."""
    if value is None or default is None:
        return value
    name = f"{section}.{key}"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if isinstance(default, str):
        if isinstance(value, (dict, list)):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return str(value)
    return value


def parse_override(item: str, config: dict) -> tuple[str, str, Any]:
    """``"train.lr=0.01"`` / ``"n_ctx=4"`` -> (section, key, value parsed as YAML)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must have the form key=value (e.g. train.lr=0.01)")
    key, raw = item.split("=", 1)
    key = key.strip()
    value = yaml.safe_load(raw) if raw.strip() else ""
    if "." in key:
        section, field = key.split(".", 1)
        if section not in SECTIONS:
            raise ValueError(f"override {item!r}: section must be one of {', '.join(SECTIONS)}")
        if field not in config[section]:
            raise ValueError(f"override {item!r}: unknown {section} field {field!r}; valid {section} "
                             f"fields: {', '.join(config[section])}")
        return section, field, value
    owners = [s for s in SECTIONS if key in config[s]]
    if not owners:
        valid = "; ".join(f"{s}: {', '.join(config[s])}" for s in SECTIONS)
        raise ValueError(f"override {item!r}: unknown field {key!r}. Valid fields — {valid}")
    if len(owners) > 1:
        raise ValueError(f"override {item!r}: {key!r} is a field of both sections; write "
                         f"{' or '.join(f'{s}.{key}' for s in owners)}")
    return owners[0], key, value


def resolve_config(method: str, protocol: Optional[str] = None,
                   config_file: Optional[Union[str, os.PathLike]] = None,
                   overrides: Sequence[str] = (), *, shots: Optional[int] = None,
                   dataset: Optional[str] = None, backbone: Optional[str] = None) -> dict:
    """The resolved config {"method": {...}, "train": {...}} of a run.

    ``backbone`` (a canonical name, ``backbone_config_name``) selects the files' ``backbones``
    blocks (e.g. CoOp's published RN50 setting in ``configs/coop/fewshot.yaml``).

    ``shots``/``dataset`` select ``max_epoch`` from ``train.shots_epochs`` / ``train.dataset_epochs``
    when neither the user file nor an override sets ``max_epoch``, and ``max_steps`` from
    ``train.shots_steps`` likewise (see ``_resolve_max_steps``). Both sections are validated by
    building the dataclasses (a bad value raises ``ValueError``).
    """
    from .methods import get_method, make_config

    config = default_config(method)
    if protocol:
        packaged = protocol_config_file(method, protocol)
        if packaged is not None:
            _merge_file(config, _read_yaml(packaged), str(packaged), dataset, backbone=backbone)
    explicit: set = set()
    if config_file:
        _merge_file(config, _read_yaml(config_file), str(config_file), dataset, explicit,
                    backbone)
    for item in overrides:
        section, key, value = parse_override(item, config)
        config[section][key] = value
        explicit.add((section, key))
    defaults = default_config(method)
    for section in SECTIONS:
        for key, value in config[section].items():
            config[section][key] = _coerce(section, key, value, defaults[section][key])
    train = config["train"]
    if ("train", "max_epoch") not in explicit:
        by_dataset = train.get("dataset_epochs") or {}
        by_shots = {int(k): v for k, v in (train.get("shots_epochs") or {}).items()}
        if dataset is not None and dataset in by_dataset:
            train["max_epoch"] = int(by_dataset[dataset])
        elif shots is not None and shots in by_shots:
            train["max_epoch"] = int(by_shots[shots])
    _resolve_max_steps(train, explicit, shots)
    # validate types/values now, not in the middle of a run
    make_config(get_method(method), config["method"])
    TrainConfig(**train)
    return copy.deepcopy(config)


def _resolve_max_steps(train: dict, explicit: set, shots: Optional[int]) -> None:
    """``max_steps`` from ``shots_steps`` unless the user file or an override sets it. A user's
    explicit ``max_epoch`` (and no explicit ``max_steps``) means an epoch count: it drops the
    packaged step budget, as it beats every other packaged setting."""
    if ("train", "max_steps") in explicit:
        return
    if ("train", "max_epoch") in explicit:
        train["max_steps"] = None
        return
    by_shots = {int(k): v for k, v in (train.get("shots_steps") or {}).items()}
    if shots is not None and shots in by_shots:
        train["max_steps"] = int(by_shots[shots])


def train_config(config: dict) -> TrainConfig:
    return TrainConfig(**config["train"])
