"""One experiment = one run folder: build the split and the method, train (unless the method
has nothing to train), evaluate on the test split, and write

- ``config.yaml``: the resolved config (plus the run's identity);
- ``log.txt``: the training log and Dassl's ``=> result`` block (PROTOCOL.md §8.4);
- ``checkpoint.safetensors`` + ``checkpoint.json`` (+ ``training_state.pt`` while training);
- ``results.json``: metrics and provenance, one entry per evaluated ``<dataset>/<subsample>``.

``run_experiment`` and ``evaluate_run`` are what ``vlprompt train``/``eval`` and the protocol
runners call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import yaml

from .. import __version__
from ..config import TrainConfig, resolve_config
from . import checkpoint as ckpt
from . import distributed as D
from .evaluate import evaluate_method, format_result
from .train import seed_everything, train_method

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
LOG_FILE = "log.txt"
#: settings that do not change a run's outcome: changing them does not block a resume
RUNTIME_ONLY = {"num_workers", "print_freq", "eval_batch_size"}

PathLike = Union[str, os.PathLike]


def versions() -> dict:
    import numpy

    return {"vlprompt": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


@contextlib.contextmanager
def _run_log(run_dir: Path):
    """Tee the ``vlprompt`` loggers into ``run_dir/log.txt`` (rank 0 only)."""
    if not D.is_main():
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / LOG_FILE, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("vlprompt")
    old_level = root.level
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def _backbone_record(backbone) -> str:
    """A path is recorded absolute, so ``evaluate_run`` finds it from any working directory."""
    path = Path(str(backbone)).expanduser()
    return str(path.resolve()) if path.exists() else str(backbone)


def _json_normal(data):
    return json.loads(json.dumps(data))


def _compare_config(stored: dict, current: dict) -> list[str]:
    diffs = []
    for section in ("run", "method", "train"):
        a, b = _json_normal(stored.get(section) or {}), _json_normal(current.get(section) or {})
        for key in sorted(set(a) | set(b)):
            if section == "train" and key in RUNTIME_ONLY:
                continue
            if section == "run" and key == "backbone":
                continue  # compared by checksum when the checkpoint loads
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def _read_results(run_dir: Path) -> Optional[dict]:
    path = run_dir / RESULTS_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); remove it or use --force") from err


def _load_clip(backbone, device: torch.device, clip=None):
    if clip is not None:
        return clip.to(device)
    from ..clip.load import load_clip

    return load_clip(backbone, device=device)


def method_template(method_cls, split) -> str:
    """The dataset's template in the table the method's paper used (KgCoOp's DTD template
    differs from CoOp's); custom datasets keep their own."""
    from ..clip.templates import CUSTOM_TEMPLATES, dataset_template

    if method_cls.template_variant != "coop" and split.dataset in CUSTOM_TEMPLATES:
        return dataset_template(split.dataset, method_cls.template_variant)
    return split.template


def _eval_key(dataset: str, subsample: str) -> str:
    return f"{dataset}/{subsample}"


def _log_result(title: str, entry: dict) -> None:
    logger.info("Evaluate on the *test* set of %s", title)
    for line in format_result(entry):
        logger.info(line)


def run_experiment(method: str, dataset: str, root: PathLike, backbone, run_dir: PathLike,
                   shots: int = 16, seed: int = 1, subsample: str = "all",
                   protocol: Optional[str] = None, config_file: Optional[PathLike] = None,
                   overrides: Sequence[str] = (), resume: bool = True, force: bool = False,
                   device=None, clip=None, *, skip_missing: bool = False, epoch_callback=None,
                   show_progress: Optional[bool] = None) -> dict:
    """Train ``method`` on ``dataset`` (``shots`` per class, ``seed``, classes ``subsample``) and
    evaluate it on the test split of the same classes. Returns the ``results.json`` content.

    An existing run folder is resumed (``resume``) when its config matches; a finished run is
    returned as it is; ``force`` deletes its outputs and starts over. ``clip`` may be an
    already-loaded CLIP (then ``backbone`` is only recorded).
    """
    from ..methods import get_method, make_config

    method_cls = get_method(method)
    D.init_distributed(None if device is None else str(device))
    config = resolve_config(method, protocol, config_file, list(overrides), shots=shots,
                            dataset=dataset)
    config["train"]["seed"] = seed
    train_cfg = TrainConfig(**config["train"])
    run_info = {"method": method, "protocol": protocol, "dataset": dataset, "shots": shots,
                "seed": seed, "subsample": subsample, "backbone": _backbone_record(backbone)}
    stored_config = {"run": run_info, **config}
    run_dir = Path(run_dir)
    key = _eval_key(dataset, subsample)

    config_path = run_dir / CONFIG_FILE
    if force:
        if D.is_main():
            for name in (CONFIG_FILE, RESULTS_FILE, ckpt.CHECKPOINT_FILE, ckpt.HEADER_FILE,
                         ckpt.STATE_FILE):
                (run_dir / name).unlink(missing_ok=True)
        D.barrier()
    elif config_path.exists():
        previous = yaml.safe_load(config_path.read_text()) or {}
        diffs = _compare_config(previous, stored_config)
        if diffs:
            raise ValueError(f"{run_dir} holds a run with a different config ({'; '.join(diffs)}); "
                             f"use another output folder, or --force to overwrite it")
        results = _read_results(run_dir)
        if results and results.get("train", {}).get("finished") and key in results.get("evaluations", {}):
            logger.info("Results exist in %s (use --force to rerun)", run_dir)
            return results
        if not resume and (run_dir / ckpt.HEADER_FILE).exists():
            raise ValueError(f"{run_dir} holds a checkpoint; resume it (--resume), or --force to "
                             f"start over")

    device = D.default_device(None if device is None else str(device))
    with _run_log(run_dir):
        start = time.time()
        if D.is_main():
            logger.info("Setting fixed seed: %d", seed)
            logger.info("Run: %s", json.dumps(run_info))
            logger.info("Config: %s", json.dumps(config))
            run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_text(config_path, yaml.safe_dump(stored_config, sort_keys=False))
        clip = _load_clip(backbone, device, clip)
        from ..clip.load import state_checksum
        from ..data import ImageDataset, build_transform, load_split

        checksum = state_checksum(clip)
        split = load_split(dataset, root, shots=shots if method_cls.trainable else -1, seed=seed,
                           subsample=subsample, skip_missing=skip_missing)
        if D.is_main():
            logger.info("Loading dataset: %s (%s classes; %d train, %d test images)", dataset,
                        len(split.classnames), len(split.train), len(split.test))
        seed_everything(seed)
        model = method_cls(clip, list(split.classnames), make_config(method_cls, config["method"]),
                           template=method_template(method_cls, split))
        model.to(device)
        logger.info("Loading trainer: %s (%d trainable parameters)", method,
                    model.num_trainable_parameters())
        header_extra = {"config": config, "dataset": dataset, "shots": shots, "seed": seed,
                        "subsample": subsample, "protocol": protocol}
        if method_cls.trainable:
            train_set = ImageDataset(split.train, build_transform(True, clip.image_size))
            train_result = train_method(model, train_set, train_cfg, run_dir=run_dir, device=device,
                                        resume=resume, backbone=run_info["backbone"],
                                        header_extra=header_extra, epoch_callback=epoch_callback,
                                        show_progress=show_progress)
        else:
            train_result = {"epochs": 0, "loss_history": [], "time_s": 0.0, "finished": True}
            if D.is_main():
                header = ckpt.make_header(model, run_info["backbone"], checksum, 0,
                                          {**header_extra, "max_epoch": 0, "finished": True})
                ckpt.save_checkpoint(run_dir, model, header)

        test_set = ImageDataset(split.test, build_transform(False, clip.image_size))
        entry = evaluate_method(model, test_set, list(split.classnames),
                                batch_size=train_cfg.eval_batch_size, device=device,
                                precision=train_cfg.precision, num_workers=train_cfg.num_workers)
        entry = {"dataset": dataset, "subsample": subsample, **entry}
        results = {
            "vlprompt_version": __version__, "method": method, "protocol": protocol,
            "dataset": dataset, "backbone": run_info["backbone"], "backbone_checksum": checksum,
            "shots": shots, "seed": seed, "subsample": subsample, "config": config,
            "num_trainable_params": model.num_trainable_parameters(),
            "train": train_result, "evaluations": {key: entry}, "versions": versions(),
        }
        if D.is_main():
            previous = _read_results(run_dir)
            if previous:  # keep evaluations added by evaluate_run before a rerun
                for k, v in previous.get("evaluations", {}).items():
                    results["evaluations"].setdefault(k, v)
            ckpt.atomic_write_json(run_dir / RESULTS_FILE, results)
            _log_result(key, entry)
            logger.info("Elapsed: %s", time.strftime("%H:%M:%S", time.gmtime(time.time() - start)))
        D.barrier()
    return results


def _build_from_run(run_dir: Path, header: dict, clip, classnames: Sequence[str],
                    template: Optional[str]):
    """The run's method on ``clip`` with its learned tensors, classifying ``classnames``."""
    from ..methods import get_method, make_config

    method_cls = get_method(header["method"])
    config = make_config(method_cls, header.get("method_config") or {})
    trained = [c.replace("_", " ") for c in header.get("classnames", [])]
    wanted = [c.replace("_", " ") for c in classnames]
    if not method_cls.trainable:
        ckpt.check_backbone(header, clip, str(run_dir))
        return method_cls(clip, list(classnames), config, template=template)
    model = method_cls(clip, header.get("classnames") or list(classnames), config,
                       template=template or header.get("template"))
    ckpt.load_checkpoint(run_dir, model)
    if trained != wanted:
        model.set_classnames(list(classnames))
    return model


def evaluate_run(run_dir: PathLike, dataset: str, root: PathLike, subsample: str = "all",
                 device=None, clip=None, skip_missing: bool = False) -> dict:
    """Evaluate a run's checkpoint on ``dataset``'s test split (classes ``subsample``): the
    evaluation entry, also merged into ``results.json`` as ``"<dataset>/<subsample>"``."""
    from ..data import ImageDataset, build_transform, load_split
    from ..methods import get_method

    run_dir = Path(run_dir)
    header = ckpt.read_header(run_dir)
    if not header.get("finished", True):
        logger.warning("%s: training did not finish (epoch %s of %s); evaluating that checkpoint",
                       run_dir, header.get("epoch"), header.get("max_epoch"))
    D.init_distributed(None if device is None else str(device))
    device = D.default_device(None if device is None else str(device))
    train_cfg = TrainConfig(**(header.get("config") or {}).get("train", {}))
    key = _eval_key(dataset, subsample)
    with _run_log(run_dir):
        clip = _load_clip(header["backbone"], device, clip)
        split = load_split(dataset, root, shots=-1, seed=int(header.get("seed", 1)),
                           subsample=subsample, skip_missing=skip_missing)
        model = _build_from_run(run_dir, header, clip, split.classnames,
                                method_template(get_method(header["method"]), split))
        model.to(device)
        test_set = ImageDataset(split.test, build_transform(False, clip.image_size))
        entry = evaluate_method(model, test_set, list(split.classnames),
                                batch_size=train_cfg.eval_batch_size, device=device,
                                precision=train_cfg.precision, num_workers=train_cfg.num_workers)
        entry = {"dataset": dataset, "subsample": subsample, **entry}
        if D.is_main():
            results = _read_results(run_dir) or {
                "vlprompt_version": __version__, "method": header["method"],
                "protocol": header.get("protocol"), "dataset": header.get("dataset"),
                "backbone": header.get("backbone"), "backbone_checksum": header.get("backbone_checksum"),
                "shots": header.get("shots"), "seed": header.get("seed"),
                "subsample": header.get("subsample"), "config": header.get("config"),
                "num_trainable_params": header.get("num_trainable_params"),
                "train": {"epochs": header.get("epoch"), "finished": header.get("finished", True)},
                "evaluations": {}, "versions": versions()}
            results.setdefault("evaluations", {})[key] = entry
            ckpt.atomic_write_json(run_dir / RESULTS_FILE, results)
            logger.info("Loading weights from %s (epoch = %s)", run_dir, header.get("epoch"))
            _log_result(key, entry)
        D.barrier()
    return entry


@torch.no_grad()
def predict_with_checkpoint(run_dir: PathLike, images: Sequence, classes: Optional[Sequence[str]] = None,
                            topk: int = 5, device=None, clip=None) -> list[list[tuple[str, float]]]:
    """Classify ``images`` (paths or PIL images) with a run's learned prompts: per image, the
    ``topk`` (class name, probability) pairs. ``classes`` replaces the training class names."""
    from ..data import build_transform

    run_dir = Path(run_dir)
    header = ckpt.read_header(run_dir)
    device = D.default_device(None if device is None else str(device))
    clip = _load_clip(header["backbone"], device, clip)
    classnames = list(classes) if classes else list(header.get("classnames") or [])
    if not classnames:
        raise ValueError(f"{run_dir}: the checkpoint names no classes; pass --classes")
    model = _build_from_run(run_dir, header, clip, classnames, header.get("template"))
    model.to(device).eval()
    transform = build_transform(False, clip.image_size)
    batch = torch.stack([transform(img) for img in images]).to(device)  # [N, 3, S, S]
    probs = model(batch).float().softmax(dim=-1)
    k = min(topk, len(classnames))
    values, indices = probs.topk(k, dim=-1)
    return [[(model.classnames[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist())]
            for vs, ix in zip(values, indices)]
