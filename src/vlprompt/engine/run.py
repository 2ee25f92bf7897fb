"""One experiment = one run folder (``engine/rundir.py`` owns its files): build the split and
the method, train (unless the method has nothing to train), evaluate on the test split, and write
the config, the log, checkpoint generations and ``results.json``.

``run_experiment`` and ``evaluate_run`` are what ``vlprompt train``/``eval``, the protocol runners
and the demo call; both hold the folder's writer lock while they write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .. import __version__
from ..config import RUNTIME_ONLY, TrainConfig, backbone_config_name, resolve_config
from . import checkpoint as ckpt
from . import distributed as D
from .evaluate import evaluate_method, format_result
from .rundir import Evaluation, RunDir, RunLockedError, RunResults, evaluation_key
from .train import seed_everything, train_method

logger = logging.getLogger(__name__)


PathLike = Union[str, os.PathLike]
#: training sets up to this size are decoded in full before the first step (16-shot ImageNet:
#: 16,000 images, about a minute); larger ones (all images of ImageNet) are checked as they load
VERIFY_AT_MOST = 50_000


def versions() -> dict:
    import numpy

    return {"vlprompt": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


@contextlib.contextmanager
def _log_to(path: Path):
    """Tee the ``vlprompt`` loggers into ``path`` (rank 0 only)."""
    if not D.is_main():
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
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


@contextlib.contextmanager
def _writing(run: RunDir, device: torch.device):
    """Hold the run folder's writer lock (rank 0) for the block; every rank fails together when
    another process holds it."""
    error: Optional[RunLockedError] = None
    if D.is_main():
        try:
            run.lock()
        except RunLockedError as err:
            error = err
    failed = D.all_reduce_sum([1.0 if error else 0.0], device)[0] > 0
    if failed:
        raise error or RunLockedError(f"{run.path} is being written by another run (see rank 0)")
    try:
        yield run
    finally:
        if D.is_main():
            run.unlock()


def _backbone_record(backbone) -> str:
    """A path is recorded absolute, so ``evaluate_run`` finds it from any working directory."""
    from ..clip.load import map_open_clip_paths

    def absolute(value: str) -> str:
        file = Path(value).expanduser()
        return str(file.resolve()) if file.exists() else value

    spec = map_open_clip_paths(str(backbone), absolute)  # open_clip:<arch>:<file>
    if spec is not None:
        return spec
    path = Path(str(backbone)).expanduser()
    return str(path.resolve()) if path.exists() else str(backbone)


def _json_normal(data):
    return json.loads(json.dumps(data))


def _compare_config(stored: dict, current: dict) -> list[str]:
    diffs = []
    # a train field added since the run was made, at its default, is the setting the run had
    defaults = _json_normal(dataclasses.asdict(TrainConfig()))
    for section in ("run", "method", "train"):
        a, b = _json_normal(stored.get(section) or {}), _json_normal(current.get(section) or {})
        for key in sorted(set(a) | set(b)):
            if section == "train" and key in RUNTIME_ONLY:
                continue
            if section == "train" and key not in a and key in defaults and b[key] == defaults[key]:
                continue
            if section == "run" and key in ("backbone", "dataset_spec"):
                continue  # the backbone is compared by fingerprint when the checkpoint loads
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def _load_clip(backbone, device: torch.device, clip=None):
    if clip is not None:
        return clip.to(device)
    from ..clip.load import load_clip

    return load_clip(backbone, device=device)


def method_template(method_cls, split, method_config: Optional[dict] = None) -> str:
    """The dataset's template in the table the method's paper used (KgCoOp's DTD template
    differs from CoOp's; a wrapper such as DePT uses its configured base's); custom datasets
    keep their own."""
    from ..clip.templates import CUSTOM_TEMPLATES, dataset_template

    variant = method_cls.template_variant_for(method_config)
    if variant != "coop" and split.dataset in CUSTOM_TEMPLATES:
        return dataset_template(split.dataset, variant)
    return split.template


def _log_result(title: str, entry: dict) -> None:
    logger.info("Evaluate on the *test* set of %s", title)
    for line in format_result(entry):
        logger.info(line)


def _evaluate(model, records, classnames, image_size: int, train_cfg: TrainConfig,
              device: torch.device, dataset: str, subsample: str, skip_bad: bool) -> Evaluation:
    from ..data import ImageDataset
    from ..runtime import resolve_num_workers

    test_set = ImageDataset(records, _test_transform(image_size, train_cfg), dataset=dataset)
    wanted = [c.replace("_", " ") for c in classnames]
    if model.classnames != wanted:  # e.g. a transductive method trained on every class
        model.set_classnames(list(classnames))
    entry = evaluate_method(model, test_set, list(classnames), batch_size=train_cfg.eval_batch_size,
                            device=device, precision=train_cfg.precision,
                            num_workers=resolve_num_workers(train_cfg.num_workers),
                            skip_bad=skip_bad)
    if entry.get("num_skipped"):
        logger.warning("%s/%s: skipped %d unreadable image(s), e.g. %s", dataset, subsample,
                       entry["num_skipped"], entry["skipped_files"][0])
    return Evaluation.from_dict({"dataset": dataset, "subsample": subsample, **entry})


def _train_transform(model, image_size: int, train_cfg: Optional[TrainConfig] = None):
    """The training views a method asks for: ``train_augment`` (default "standard": RRC + flip,
    its area range ``train.crop_scale``) and ``train_views`` (default 1; V > 1 gives items
    ``[V, 3, S, S]``, batches ``[B, V, 3, S, S]``), e.g. CoPrompt's two RandAugment views;
    decoded as ``train.fast_decode`` / ``train.image_cache`` say."""
    from ..data import build_transform
    from ..data.image_cache import optional_image_cache

    cfg = train_cfg if train_cfg is not None else TrainConfig()
    cache = optional_image_cache(cfg.image_cache, image_size, cfg.fast_decode)
    return build_transform(True, image_size, cfg.fast_decode,
                           augment=getattr(model, "train_augment", "standard"),
                           views=getattr(model, "train_views", 1),
                           crop_scale=tuple(cfg.crop_scale), cache=cache)


def _test_transform(image_size: int, train_cfg: TrainConfig):
    """The test (and val) transform, decoded as ``train.fast_decode`` / ``train.image_cache``
    say (the cache is exact for it)."""
    from ..data import build_transform
    from ..data.image_cache import optional_image_cache

    cache = optional_image_cache(train_cfg.image_cache, image_size, train_cfg.fast_decode)
    return build_transform(False, image_size, train_cfg.fast_decode, cache=cache)


def _tell_dataset(model, dataset: Optional[str]) -> None:
    """Name the dataset the method's classes come from, for methods whose class inputs depend on
    more than the class names (LLM descriptions: ``set_dataset``, e.g. CoPrompt)."""
    hook = getattr(model, "set_dataset", None)
    if dataset and callable(hook):
        hook(dataset)


def _val_set(split, train_cfg: TrainConfig, image_size: int):
    """``select: best_val``: the val split of the training classes (few-shot: min(K, 4) per
    class), with the test transform; None with ``select: last``."""
    from ..data import ImageDataset

    if train_cfg.select != "best_val":
        return None
    if split.val and split.val == split.test and D.is_main():
        logger.warning("%s has no val split of its own (its val split is the test split, as in "
                       "Dassl): select=best_val selects on the test images", split.dataset)
    return ImageDataset(split.val, _test_transform(image_size, train_cfg), dataset=split.dataset)


def _check_existing(run: RunDir, stored_config: dict, key: str, resume: bool,
                    force: bool) -> Optional[RunResults]:
    """Refuse a folder holding another run; return the results of a finished one."""
    if force:
        return None
    previous = run.read_config()
    if previous is None or not run.started:
        return None  # an unstarted folder (e.g. a failed start) is reused as it is
    diffs = _compare_config(previous, stored_config)
    if diffs:
        raise ValueError(f"{run.path} holds a run with a different config ({'; '.join(diffs)}); "
                         f"use another output folder, or --force to overwrite it")
    results = run.read_results()
    if results is not None and results.finished and key in results.evaluations:
        logger.info("Results exist in %s (use --force to rerun)", run.path)
        return results
    if not resume and run.latest_generation() is not None:
        raise ValueError(f"{run.path} holds a checkpoint; rerun without --no-resume to continue "
                         f"it, or with --force to start over")
    return None


def _verify_train_images(records, dataset: str, skip_bad: bool) -> list:
    """Decode every training image before the first step (a bad file found after hours of
    training is worse than one found now)."""
    from ..data import verify_images

    if len(records) > VERIFY_AT_MOST:
        logger.info("%s: %d training images, too many to decode before training; a bad file will "
                    "be named when met ('vlprompt datasets check' finds them all beforehand)",
                    dataset, len(records))
        return list(records)
    bad = verify_images(records, progress=False)
    if not bad:
        return list(records)
    if skip_bad:
        logger.warning("%s: skipping %d unreadable training image(s), e.g. %s (%s)", dataset,
                       len(bad), bad[0][0], bad[0][1])
        paths = {p for p, _ in bad}
        return [r for r in records if r.path not in paths]
    raise ValueError(f"{len(bad)} training image(s) of {dataset} cannot be read, e.g. {bad[0][0]} "
                     f"({bad[0][1]}); fix or remove them (list them all with 'vlprompt datasets "
                     f"check {dataset}'), or pass --skip-missing to skip them")


def run_experiment(method: str, dataset: str, root: Optional[PathLike], backbone, run_dir: PathLike,
                   shots: int = 16, seed: int = 1, subsample: str = "all",
                   protocol: Optional[str] = None, config_file: Optional[PathLike] = None,
                   overrides: Sequence[str] = (), resume: bool = True, force: bool = False,
                   device=None, clip=None, *, skip_missing: bool = False, epoch_callback=None,
                   show_progress: Optional[bool] = None, resume_from_tensors: bool = False) -> dict:
    """Train ``method`` on ``dataset`` (``shots`` per class, ``seed``, classes ``subsample``) and
    evaluate it on the test split of the same classes. Returns the ``results.json`` content.

    An existing run folder is resumed (``resume``) when its config matches; a finished run is
    returned as it is; ``force`` deletes its outputs and starts over. ``clip`` may be an
    already-loaded CLIP (then ``backbone`` is only recorded). ``skip_missing`` also skips
    unreadable images (counted in the results).
    """
    from ..data import dataset_name
    from ..methods import get_method

    from ..data.splits import check_shots

    method_cls = get_method(method)
    check_shots(shots)
    D.init_distributed(None if device is None else str(device))
    name = dataset_name(dataset, root)
    config = resolve_config(method, protocol, config_file, list(overrides), shots=shots,
                            dataset=name, backbone=backbone_config_name(backbone, clip))
    config["train"]["seed"] = seed
    train_cfg = TrainConfig(**config["train"])
    run_info = {"method": method, "protocol": protocol, "dataset": name, "shots": shots,
                "seed": seed, "subsample": subsample, "backbone": _backbone_record(backbone)}
    if name != str(dataset):
        run_info["dataset_spec"] = str(Path(dataset).expanduser().resolve())
    if method_cls.transductive:  # trained on every class's unlabeled train images
        run_info["transductive"] = True
    stored_config = {"run": run_info, **config}
    run = RunDir(run_dir)
    key = evaluation_key(name, subsample)
    device = D.default_device(None if device is None else str(device))
    with _writing(run, device):
        if force and D.is_main():
            run.clear()
        D.barrier()
        done = _check_existing(run, stored_config, key, resume, force)
        if done is not None:
            return done.to_dict()
        with _log_to(run.log_path):
            return _train_and_test(method_cls, run, run_info, stored_config, train_cfg, dataset,
                                   root, backbone, clip, device, skip_missing, resume,
                                   epoch_callback, show_progress, resume_from_tensors).to_dict()


def _train_and_test(method_cls, run: RunDir, run_info: dict, stored_config: dict,
                    train_cfg: TrainConfig, dataset_spec, root, backbone, clip, device,
                    skip_missing: bool, resume: bool, epoch_callback, show_progress,
                    resume_from_tensors: bool) -> RunResults:
    from ..clip.fingerprint import backbone_fingerprint
    from ..data import ImageDataset, load_split
    from ..methods import make_config

    start = time.time()
    config = {k: v for k, v in stored_config.items() if k != "run"}
    name, seed, shots, subsample = (run_info[k] for k in ("dataset", "seed", "shots", "subsample"))
    # everything that can fail on bad input happens before the folder takes the run's identity
    clip = _load_clip(backbone, device, clip)
    split = load_split(dataset_spec, root, shots=shots if method_cls.trainable else -1, seed=seed,
                       subsample=subsample, skip_missing=skip_missing)
    # a transductive method trains on the unlabeled train images of every class
    train_split = (load_split(dataset_spec, root, shots=-1, seed=seed, subsample="all",
                              skip_missing=skip_missing)
                   if method_cls.transductive else split)
    train_records = (_verify_train_images(train_split.train, name, skip_missing)
                     if method_cls.trainable else [])
    method_fields = _with_teacher(method_cls, config["method"], run, dataset_spec, root, run_info,
                                  device, skip_missing)
    seed_everything(seed)
    model = method_cls(clip, list(train_split.classnames), make_config(method_cls, method_fields),
                       template=method_template(method_cls, split, config["method"]))
    model.to(device)
    _tell_dataset(model, name)
    if D.is_main():
        run.write_config(stored_config)
        logger.info("Setting fixed seed: %d", seed)
        logger.info("Run: %s", json.dumps(run_info))
        logger.info("Config: %s", json.dumps(config))
        logger.info("Loading dataset: %s (%s classes; %d train, %d test images)", name,
                    len(train_split.classnames), len(train_records), len(split.test))
        if method_cls.transductive:
            logger.info("Transductive: training on the unlabeled train images of all %d "
                        "classes; testing on the %d classes of %s", len(train_split.classnames),
                        len(split.classnames), subsample)
        logger.info("Loading trainer: %s (%d trainable parameters)", run_info["method"],
                    model.num_trainable_parameters())
    header_extra = {"config": config, "dataset": name, "shots": shots, "seed": seed,
                    "subsample": subsample, "protocol": run_info["protocol"]}
    if method_cls.trainable:
        transform = _train_transform(model, clip.image_size, train_cfg)
        train_set = ImageDataset(train_records, transform, dataset=name)
        train_result = train_method(model, train_set, train_cfg, run_dir=run, device=device,
                                    resume=resume, backbone=run_info["backbone"],
                                    header_extra=header_extra, epoch_callback=epoch_callback,
                                    show_progress=show_progress,
                                    resume_from_tensors=resume_from_tensors,
                                    val_set=_val_set(split, train_cfg, clip.image_size))
    else:
        train_result = {"epochs": 0, "loss_history": [], "time_s": 0.0, "finished": True}
        if D.is_main():
            header = ckpt.make_header(model, run_info["backbone"], 0,
                                      {**header_extra, "max_epoch": 0, "finished": True})
            ckpt.save_checkpoint(run.path, model, header)

    entry = _evaluate(model, split.test, split.classnames, clip.image_size, train_cfg, device,
                      name, subsample, skip_missing)
    results = RunResults(
        method=run_info["method"], dataset=name, shots=shots, seed=seed, subsample=subsample,
        protocol=run_info["protocol"], backbone=run_info["backbone"],
        backbone_fingerprint=backbone_fingerprint(clip), config=config,
        num_trainable_params=model.num_trainable_parameters(), train=train_result,
        evaluations={entry.key: entry}, vlprompt_version=__version__, versions=versions())
    if D.is_main():
        run.merge_results(results)  # keeps evaluations added by evaluate_run before a rerun
        _log_result(entry.key, entry.to_dict())
        logger.info("Elapsed: %s", time.strftime("%H:%M:%S", time.gmtime(time.time() - start)))
    D.barrier()
    return results


def _with_teacher(method_cls, fields: dict, run: RunDir, dataset_spec, root, run_info: dict,
                  device, skip_missing: bool) -> dict:
    """The method fields, with ``teacher`` set to the folder of the run the method's
    ``teacher_recipe`` asks for, trained first (or reused) in ``<run>/teacher/`` on the same
    dataset, shots, seed and classes; the fields unchanged when the method asks for none."""
    recipe = method_cls.teacher_recipe(fields)
    if recipe is None:
        return fields
    folder = run.path / "teacher"
    if D.is_main():
        logger.info("%s: teacher run %s on %s in %s", run_info["method"], recipe.method,
                    recipe.backbone, folder)
    run_experiment(recipe.method, dataset_spec, root, recipe.backbone, folder,
                   shots=run_info["shots"], seed=run_info["seed"],
                   subsample=run_info["subsample"], config_file=recipe.config_file,
                   overrides=recipe.overrides, device=device, skip_missing=skip_missing)
    return {**fields, "teacher": str(folder)}


def load_trained_method(run_dir: PathLike, classnames: Sequence[str], device="cpu"):
    """The method of a finished run folder on its own backbone (loaded from the header's
    record), classifying ``classnames``: e.g. the frozen teacher of a distillation method."""
    folder = ckpt.resolve_run_folder(Path(run_dir).expanduser())
    newest = ckpt.newest_generation(folder)
    header = newest.header()
    if not header.get("finished", True):
        raise ValueError(f"{folder}: training did not finish (epoch {header.get('epoch')} of "
                         f"{header.get('max_epoch')}); finish it before using it as a teacher")
    clip = _load_clip(header["backbone"], torch.device(device))
    model = _build_from_run(folder, ckpt.selected_generation(folder, newest), clip, classnames,
                            header.get("template"), allow_class_mismatch=True)
    return model.to(device)


def _build_from_run(run_dir: Path, gen, clip, classnames: Sequence[str],
                    template: Optional[str], allow_class_mismatch: bool = False,
                    dataset: Optional[str] = None):
    """The run's method on ``clip`` with the learned tensors of generation ``gen``, classifying
    ``classnames`` (of ``dataset``, when known)."""
    from ..methods import get_method, make_config

    header = gen.header()
    method_cls = get_method(header["method"])
    config = make_config(method_cls, header.get("method_config") or {})
    trained = [c.replace("_", " ") for c in header.get("classnames", [])]
    wanted = [c.replace("_", " ") for c in classnames]
    if not method_cls.trainable:
        ckpt.check_backbone(header, clip, str(run_dir))
        return method_cls(clip, list(classnames), config, template=template)
    model = method_cls(clip, header.get("classnames") or list(classnames), config,
                       template=template or header.get("template"))
    ckpt.load_generation(gen, model, source=str(run_dir))
    _tell_dataset(model, dataset)
    if trained != wanted:
        if model.class_specific:
            ckpt.check_classnames(header, classnames, str(run_dir), allow_class_mismatch)
        model.set_classnames(list(classnames))
    return model


def _results_from_header(header: dict) -> RunResults:
    """A results record for a run folder that has a checkpoint but no ``results.json``."""
    return RunResults(
        method=header["method"], dataset=header.get("dataset", ""), shots=header.get("shots", 0),
        seed=header.get("seed", 1), subsample=header.get("subsample", "all"),
        protocol=header.get("protocol"), backbone=header.get("backbone", ""),
        backbone_fingerprint=header.get("backbone_fingerprint"), config=header.get("config") or {},
        num_trainable_params=header.get("num_trainable_params", 0),
        train={"epochs": header.get("epoch"), "finished": header.get("finished", True)},
        vlprompt_version=__version__, versions=versions())


def evaluate_run(run_dir: PathLike, dataset: str, root: Optional[PathLike], subsample: str = "all",
                 device=None, clip=None, skip_missing: bool = False,
                 allow_class_mismatch: bool = False) -> dict:
    """Evaluate a run's checkpoint on ``dataset``'s test split (classes ``subsample``): the
    evaluation entry, also merged into ``results.json`` as ``"<dataset>/<subsample>"``. Its
    ``=> result`` block goes to its own log (``RunDir.evaluation_log_path``)."""
    from ..data import dataset_name, load_split
    from ..methods import get_method

    run = RunDir(ckpt.resolve_run_folder(run_dir))
    newest = ckpt.newest_generation(run.path)
    header = newest.header()
    gen = ckpt.selected_generation(run.path, newest)  # select best_val: the best epoch's
    if not header.get("finished", True) and header.get("epoch") != header.get("max_epoch"):
        logger.warning("%s: training did not finish (epoch %s of %s); evaluating that checkpoint",
                       run.path, header.get("epoch"), header.get("max_epoch"))
    D.init_distributed(None if device is None else str(device))
    device = D.default_device(None if device is None else str(device))
    train_cfg = TrainConfig(**(header.get("config") or {}).get("train", {}))
    name = dataset_name(dataset, root)
    with _writing(run, device), _log_to(run.evaluation_log_path(name, subsample)):
        clip = _load_clip(header["backbone"], device, clip)
        split = load_split(dataset, root, shots=-1, seed=int(header.get("seed", 1)),
                           subsample=subsample, skip_missing=skip_missing)
        model = _build_from_run(run.path, gen, clip, split.classnames,
                                method_template(get_method(header["method"]), split,
                                                header.get("method_config")),
                                allow_class_mismatch, dataset=name)
        model.to(device)
        entry = _evaluate(model, split.test, split.classnames, clip.image_size, train_cfg,
                          device, name, subsample, skip_missing)
        if D.is_main():
            run.add_evaluation(entry, lambda: _results_from_header(header))
            logger.info("Loading weights from %s (epoch = %s)", gen.folder,
                        gen.header().get("epoch"))
            _log_result(entry.key, entry.to_dict())
        D.barrier()
    return entry.to_dict()


@torch.no_grad()
def predict_with_checkpoint(run_dir: PathLike, images: Sequence, classes: Optional[Sequence[str]] = None,
                            topk: int = 5, device=None, clip=None,
                            allow_class_mismatch: bool = False) -> list[list[tuple[str, float]]]:
    """Classify ``images`` (paths or PIL images) with a run's learned prompts: per image, the
    ``topk`` (class name, probability) pairs. ``classes`` replaces the training class names."""
    from ..data import build_transform

    run_dir = ckpt.resolve_run_folder(run_dir)
    gen = ckpt.selected_generation(run_dir)  # select best_val: the best epoch's
    header = gen.header()
    device = D.default_device(None if device is None else str(device))
    clip = _load_clip(header["backbone"], device, clip)
    classnames = list(classes) if classes else list(header.get("classnames") or [])
    if not classnames:
        raise ValueError(f"{run_dir}: the checkpoint names no classes; pass --classes")
    model = _build_from_run(run_dir, gen, clip, classnames, header.get("template"),
                            allow_class_mismatch,
                            dataset=None if classes else header.get("dataset"))
    model.to(device).eval()
    transform = build_transform(False, clip.image_size)
    batch = torch.stack([transform(img) for img in images]).to(device)  # [N, 3, S, S]
    probs = model(batch).float().softmax(dim=-1)
    k = min(topk, len(classnames))
    values, indices = probs.topk(k, dim=-1)
    return [[(model.classnames[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist())]
            for vs, ix in zip(values, indices)]
