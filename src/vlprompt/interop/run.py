"""Official runs in vlprompt's world: evaluate an official checkpoint directly
(``vlprompt eval --checkpoint <official> --method ...``) or import it as an ordinary vlprompt run
folder (``vlprompt import``), which ``predict``, ``report`` and ``eval`` then use like any other.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Union

from ..fileio import sha256_file
from .dassl_config import read_official_config
from .official import OfficialCheckpoint, find_official_run, layout_of, load_official

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

#: Dassl config keys -> ``TrainConfig`` fields recorded in an imported run (provenance only)
TRAIN_KEYS = {"OPTIM.MAX_EPOCH": "max_epoch", "OPTIM.LR": "lr",
              "DATALOADER.TRAIN_X.BATCH_SIZE": "batch_size", "OPTIM.WARMUP_EPOCH": "warmup_epoch",
              "OPTIM.WARMUP_CONS_LR": "warmup_lr", "OPTIM.WEIGHT_DECAY": "weight_decay",
              "OPTIM.MOMENTUM": "momentum"}


def is_vlprompt_run(path: Path) -> bool:
    folder = path if path.is_dir() else path.parent
    if folder.parent.name == "checkpoints":
        folder = folder.parent.parent
    return any((folder / n).exists() for n in ("checkpoints", "checkpoint.json", "results.json"))


def is_official(path: PathLike) -> bool:
    """True for an official checkpoint file or output folder (not a vlprompt run folder)."""
    path = Path(path).expanduser()
    if not path.exists() or is_vlprompt_run(path):
        return False
    if path.is_file():
        return path.name.startswith("model") or path.suffix in (".pth", ".tar", ".pt")
    return any(path.glob("model*.pth.tar*")) or any(path.glob("*/model*.pth.tar*"))


def _backbone(path, method: str, backbone: Optional[str], epoch) -> str:
    if backbone:
        return backbone
    found = _official_config(path, method, epoch).get("MODEL.BACKBONE.NAME")
    if not found:
        raise ValueError(f"{path}: the official run records no backbone (no log.txt/config.yaml "
                         f"with MODEL.BACKBONE.NAME); pass --backbone, e.g. ViT-B/16")
    logger.info("backbone %s (from the official run's config)", found)
    return str(found)


def _classes(dataset: Optional[str], root, classnames: Optional[Sequence[str]],
             template: Optional[str], subsample: str, method_cls):
    """(class names, template, dataset name, split or None)."""
    from ..data import dataset_name, load_split
    from ..engine.run import method_template

    if classnames:
        name = dataset_name(dataset, root) if dataset else "custom"
        return list(classnames), template or "a photo of a {}.", name, None
    if not dataset:
        raise ValueError("pass --dataset (with --root) or --classnames")
    split = load_split(dataset, root, shots=-1, subsample=subsample)
    return (list(split.classnames), template or method_template(method_cls, split),
            dataset_name(dataset, root), split)


def _log_notes(oc: OfficialCheckpoint) -> None:
    files = ", ".join(str(p) for p in oc.run.files.values())
    logger.info("official %s checkpoint (epoch %d): %s", oc.layout.trainer, oc.epoch, files)
    for note in oc.notes:
        logger.info("  %s", note)


def evaluate_official(path: PathLike, method: str, dataset: str, root, backbone: Optional[str],
                      subsample: str = "all", device=None, skip_missing: bool = False,
                      epoch: Union[str, int] = "last", overrides: Optional[dict] = None,
                      clip=None) -> dict:
    """Evaluate an official checkpoint on ``dataset``'s test split: the evaluation entry (as
    ``evaluate_run`` returns it). Nothing is written into the official folder."""
    from ..data import ImageDataset, build_transform
    from ..engine import distributed as D
    from ..engine.evaluate import evaluate_method
    from ..methods import get_method

    device = D.default_device(None if device is None else str(device))
    backbone = _backbone(path, method, backbone, epoch)
    clip = _load_clip(backbone, device, clip)
    names, template, name, split = _classes(dataset, root, None, None, subsample,
                                            get_method(method))
    oc = load_official(path, method, clip, names, template, overrides, epoch, backbone, name)
    _log_notes(oc)
    model = oc.method.to(device)
    test = ImageDataset(split.test, build_transform(False, clip.image_size), dataset=name)
    entry = evaluate_method(model, test, names, device=device, skip_bad=skip_missing)
    return {"dataset": name, "subsample": subsample, **entry}


def _load_clip(backbone: str, device, clip=None):
    if clip is not None:
        return clip.to(device)
    from ..clip.load import load_clip

    return load_clip(backbone, device=device)


def _backbone_record(backbone: str) -> str:
    path = Path(str(backbone)).expanduser()
    return str(path.resolve()) if path.exists() else str(backbone)


def _train_config(flat: dict) -> dict:
    from ..config import TrainConfig
    from .mapping import coerce

    train = dataclasses.asdict(TrainConfig())
    for key, field in TRAIN_KEYS.items():
        if key in flat:
            train[field] = coerce(flat[key], train[field])
    return train


def _provenance(oc: OfficialCheckpoint) -> dict:
    """What an imported run came from, and what the import inferred and dropped."""
    return {"repo": oc.layout.repo, "source": oc.layout.source, "trainer": oc.layout.trainer,
            "files": {m: {"path": str(p.resolve()), "sha256": sha256_file(p)}
                      for m, p in oc.run.files.items()},
            "epoch": oc.epoch, "config_files": [str(p) for p in oc.config_sources],
            "inferred": list(oc.notes), "dropped": list(oc.mapped.dropped),
            "unplaced": list(oc.mapped.unplaced)}


def _run_info(oc: OfficialCheckpoint, backbone: str, dataset: str, subsample: str) -> dict:
    flat = oc.official_config
    shots = flat.get("DATASET.NUM_SHOTS")
    if shots is None:
        logger.info("the official run records no DATASET.NUM_SHOTS; recording 16 (the protocol's)")
    seed = flat.get("SEED", flat.get("args.seed"))
    return {"method": oc.method.name, "protocol": None, "dataset": dataset,
            "shots": int(16 if shots is None else shots), "seed": int(1 if seed is None else seed),
            "subsample": subsample, "backbone": _backbone_record(backbone)}


def _write_run(run, oc: OfficialCheckpoint, backbone: str, dataset: str, subsample: str):
    """Commit the checkpoint and write ``config.yaml``, ``results.json`` and ``log.txt``."""
    from .. import __version__
    from ..clip.fingerprint import backbone_fingerprint
    from ..engine.checkpoint import make_header, trainable_tensors
    from ..engine.run import versions
    from ..engine.rundir import RunResults

    info = _run_info(oc, backbone, dataset, subsample)
    config = {"method": dataclasses.asdict(oc.method.config),
              "train": _train_config(oc.official_config)}
    provenance = _provenance(oc)
    header = make_header(oc.method, info["backbone"], oc.epoch, {
        "config": config, "dataset": dataset, "shots": info["shots"], "seed": info["seed"],
        "subsample": subsample, "protocol": None, "max_epoch": oc.epoch, "finished": True,
        "imported_from": provenance})
    run.commit(trainable_tensors(oc.method), header)
    run.write_config({"run": info, **config})
    results = RunResults(
        method=oc.method.name, dataset=dataset, shots=info["shots"], seed=info["seed"],
        subsample=subsample, backbone=info["backbone"],
        backbone_fingerprint=backbone_fingerprint(oc.method.clip), config=config,
        num_trainable_params=oc.method.num_trainable_parameters(),
        train={"epochs": oc.epoch, "finished": True, "imported": True},
        vlprompt_version=__version__, versions=versions(), extra={"imported_from": provenance})
    run.write_results(results)
    lines = [f"Imported {oc.layout.trainer} checkpoint (epoch {oc.epoch}) from "
             + ", ".join(str(p) for p in oc.run.files.values())] + [f"  {n}" for n in oc.notes]
    with open(run.log_path, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return results


def import_official(path: PathLike, method: str, output: PathLike, dataset: Optional[str] = None,
                    root=None, backbone: Optional[str] = None,
                    classnames: Optional[Sequence[str]] = None, template: Optional[str] = None,
                    subsample: Optional[str] = None, epoch: Union[str, int] = "last",
                    overrides: Optional[dict] = None, evaluate: bool = True, force: bool = False,
                    device=None, clip=None) -> dict:
    """Turn the official run at ``path`` into a vlprompt run folder ``output`` (checkpoint with
    header, ``config.yaml``, ``results.json``, ``log.txt``); evaluate it on the test split of
    ``dataset`` unless ``evaluate`` is False. Returns the ``results.json`` content."""
    from ..engine import distributed as D
    from ..engine.rundir import RunDir
    from ..methods import get_method

    device = D.default_device(None if device is None else str(device))
    backbone = _backbone(path, method, backbone, epoch)
    flat = _official_config(path, method, epoch)
    subsample = subsample or str(flat.get("DATASET.SUBSAMPLE_CLASSES") or "all")
    clip = _load_clip(backbone, device, clip)
    names, template, name, _ = _classes(dataset, root, classnames, template, subsample,
                                        get_method(method))
    oc = load_official(path, method, clip, names, template, overrides, epoch, backbone, name)
    run = RunDir(output)
    with run:
        if run.started and not force:
            raise ValueError(f"{run.path} already holds a run; pass --force to replace it, or "
                             f"choose another --output")
        if force:
            run.clear()
        results = _write_run(run, oc, backbone, name, subsample)
    _log_notes(oc)
    logger.info("imported into %s", run.path)
    if evaluate and dataset and not classnames:
        from ..engine.run import evaluate_run

        evaluate_run(run.path, dataset, root, subsample=subsample, device=device, clip=clip)
        results = run.read_results()
    return results.to_dict()


def _official_config(path, method: str, epoch) -> dict:
    from ..methods import get_method

    found = find_official_run(path, layout_of(get_method(method)), method, epoch)
    for folder in (found.folder, found.folder.parent):
        flat, sources = read_official_config(folder)
        if sources:
            return flat
    return {}
