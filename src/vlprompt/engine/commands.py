"""``vlprompt train``, ``vlprompt eval`` and ``vlprompt methods``: thin wrappers over
``run_experiment`` / ``evaluate_run`` and the method registry."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


def default_run_dir(output: str, protocol, method: str, dataset: str, shots: int, seed: int) -> Path:
    """``<output>/<protocol or 'train'>/<method>/<dataset>/shots_<K>/seed<S>``."""
    from ..protocols import run_dir_for

    return run_dir_for(output, protocol or "train", method, dataset, shots, seed)


def _summary(entry: dict) -> str:
    return (f"{entry['dataset']}/{entry['subsample']}: accuracy {entry['accuracy']:.2f}%  "
            f"macro-F1 {entry['macro_f1']:.2f}%  ({entry['num_correct']}/{entry['num_images']})")


def _dataset_folder_name(dataset: str, root) -> str:
    """The run folder's dataset part: the registered name, or a YAML dataset's own name."""
    from ..data import dataset_name

    return dataset_name(dataset, root)


def cmd_train(args) -> int:
    from ..protocols import PROTOCOLS
    from .run import run_experiment

    if args.protocol is not None and args.protocol not in TRAIN_PROTOCOLS:
        hint = (" (dg evaluates the xd model: use 'vlprompt run dg')" if args.protocol == "dg"
                else "")
        raise ValueError(f"unknown --protocol {args.protocol!r}{hint}; valid: "
                         f"{', '.join(p for p in PROTOCOLS if p in TRAIN_PROTOCOLS)}")
    _require_root(args.dataset, args.root)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(
        args.output, args.protocol, args.method, _dataset_folder_name(args.dataset, args.root),
        args.shots, args.seed)
    results = run_experiment(args.method, args.dataset, args.root, args.backbone, run_dir,
                             shots=args.shots, seed=args.seed, subsample=args.subsample,
                             protocol=args.protocol, config_file=args.config,
                             overrides=args.overrides, resume=args.resume, force=args.force,
                             skip_missing=args.skip_missing, device=args.device,
                             resume_from_tensors=args.resume_from_tensors)
    from .distributed import is_main

    if is_main():
        entry = results["evaluations"][f"{results['dataset']}/{args.subsample}"]
        print(_summary(entry))
        print(f"run folder: {run_dir}")
    return 0


def _require_root(dataset: str, root) -> None:
    from ..data import is_dataset_file

    if root is None and not is_dataset_file(dataset):
        raise ValueError(f"--root is required for dataset {dataset!r} (the folder that contains "
                         f"the dataset folders); only a dataset .yaml file needs none")


def cmd_eval(args) -> int:
    from ..interop.run import is_official
    from .distributed import is_main
    from .run import evaluate_run

    _require_root(args.dataset, args.root)
    if is_official(args.checkpoint):
        return _eval_official(args)
    given = [f for f, v in (("--method", args.method), ("--backbone", args.backbone),
                            ("--epoch", args.epoch), ("key=value", args.overrides)) if v]
    if given:
        raise ValueError(f"{', '.join(given)}: only for official checkpoints; {args.checkpoint} is "
                         f"a vlprompt run folder, which records its method and backbone")
    entry = evaluate_run(args.checkpoint, args.dataset, args.root, subsample=args.subsample,
                         device=args.device, skip_missing=args.skip_missing,
                         allow_class_mismatch=args.allow_class_mismatch)
    if is_main():
        print(_summary(entry))
    return 0


def _eval_official(args) -> int:
    """``eval`` of an official repository's checkpoint file or output folder."""
    from ..interop.commands import method_overrides, parse_epoch
    from ..interop.official import supported_methods
    from ..interop.run import evaluate_official

    if not args.method:
        raise ValueError(f"{args.checkpoint} is an official repository's checkpoint: pass "
                         f"--method (one of {', '.join(supported_methods())})")
    entry = evaluate_official(args.checkpoint, args.method, args.dataset, args.root,
                              args.backbone, subsample=args.subsample, device=args.device,
                              skip_missing=args.skip_missing, epoch=parse_epoch(args.epoch),
                              overrides=method_overrides(args.method, args.overrides))
    print(_summary(entry))
    return 0


def cmd_methods(args) -> int:
    from ..config import list_protocol_configs
    from ..methods import get_method, list_methods

    rows = []
    for name in list_methods():
        cls = get_method(name)
        fields = {f.name: (f.default if f.default is not dataclasses.MISSING else None)
                  for f in dataclasses.fields(cls.Config)}
        rows.append({"name": name, "description": cls.description, "trainable": cls.trainable,
                     "transductive": cls.transductive, "config": fields,
                     "protocols": list_protocol_configs(name)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']:<12} {row['description']}")
        if row["transductive"]:
            print(f"{'':<12} transductive: trains on the unlabeled train images of all classes "
                  f"(base and new); reported apart from inductive methods")
        fields = ", ".join(f"{k}={v!r}" for k, v in row["config"].items())
        print(f"{'':<12} fields: {fields or '(none)'}")
        if row["protocols"]:
            print(f"{'':<12} configs: {', '.join(row['protocols'])}")
    return 0


#: protocols whose packaged configs ``train --protocol`` can start from
TRAIN_PROTOCOLS = ("base2new", "fewshot", "xd")

_SKIP_HELP = ("skip image files listed in the split that are missing on disk or cannot be "
              "decoded (with a warning; evaluations count them in num_skipped)")


def _method_names() -> str:
    from ..methods import list_methods

    return ", ".join(list_methods())


def register(sub) -> None:
    # allow_abbrev=False: argparse would otherwise take a mistyped "--resume" (resuming is the
    # default; there is no such flag) as an abbreviation of --resume-from-tensors
    p = sub.add_parser("train", help="train a method on a dataset and evaluate it",
                       allow_abbrev=False,
                       description="Train a prompt-learning method and evaluate it on the test split "
                                   "of the same classes. key=value words anywhere on the line "
                                   "override the config (train.lr=0.01, method.n_ctx=4, or a unique "
                                   "bare field name). An interrupted run resumes from its last "
                                   "checkpoint when the same command is run again.")
    p.add_argument("--method", required=True, help=f"method name: {_method_names()}")
    p.add_argument("--dataset", required=True, help="dataset name (e.g. eurosat) or a dataset .yaml")
    p.add_argument("--root", default=None,
                   help="data root holding the dataset folders (not needed for a .yaml dataset)")
    p.add_argument("--backbone", default="ViT-B/16",
                   help="CLIP name (ViT-B/16, RN50, ...), weights file, or "
                        "open_clip:<architecture>:<file> (default ViT-B/16)")
    p.add_argument("--shots", type=int, default=16,
                   help="training images per class (-1: all images; default 16)")
    p.add_argument("--seed", type=int, default=1,
                   help="few-shot sampling and training seed (default 1)")
    p.add_argument("--subsample", default="all", choices=["all", "base", "new"],
                   help="classes to train and test on (default all)")
    p.add_argument("--protocol", default=None,
                   help=f"packaged config to start from: {', '.join(TRAIN_PROTOCOLS)}")
    p.add_argument("--config", default=None, help="YAML with 'method:' and 'train:' sections")
    p.add_argument("--output", default="output", help="output root (default ./output)")
    p.add_argument("--run-dir", default=None,
                   help="run folder (default <output>/<protocol|train>/<method>/<dataset>/shots_<K>/seed<S>)")
    p.add_argument("--no-resume", dest="resume", action="store_false", default=True,
                   help="refuse to continue a checkpoint in the run folder (default: continue it)")
    p.add_argument("--resume-from-tensors", action="store_true",
                   help="when the training state of the last checkpoint is lost, continue from its "
                        "learned tensors with a fresh optimiser (momentum is lost)")
    p.add_argument("--force", action="store_true", help="delete the run folder's outputs and start over")
    p.add_argument("--skip-missing", action="store_true", help=_SKIP_HELP)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: GPU if available)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained run on a dataset",
                       description="Evaluate a run folder's checkpoint on a dataset's test split; the "
                                   "result is added to the folder's results.json and its own log "
                                   "(<run parent>_test_<dataset>_<subsample>/<run>/log.txt). An "
                                   "official repository's checkpoint file or output folder "
                                   "(<dir>/<registered model>/model.pth.tar-<epoch>) is evaluated "
                                   "with --method and --backbone, and nothing is written.")
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR",
                   help="run folder of 'vlprompt train' (or a file in it), or an official "
                        "checkpoint file/output folder")
    p.add_argument("--method", default=None,
                   help="official checkpoints: the method (coop, maple, ...)")
    p.add_argument("--backbone", default=None,
                   help="official checkpoints: the CLIP it was trained on (default: the run's "
                        "MODEL.BACKBONE.NAME)")
    p.add_argument("--epoch", default=None,
                   help="official folders: last (default), best or an epoch number")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="official checkpoints: method config fields (method.ctx_init=...)")
    p.add_argument("--dataset", required=True, help="dataset name or a dataset .yaml")
    p.add_argument("--root", default=None,
                   help="data root holding the dataset folders (not needed for a .yaml dataset)")
    p.add_argument("--subsample", default="all", choices=["all", "base", "new"],
                   help="classes to evaluate on (default all)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: GPU if available)")
    p.add_argument("--skip-missing", action="store_true", help=_SKIP_HELP)
    p.add_argument("--allow-class-mismatch", action="store_true",
                   help="apply class-specific learned tensors (e.g. CoOp csc) to other classes")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("methods", help="list the methods, their config fields and defaults",
                       description="List every registered method with its description, config "
                                   "fields and defaults, and the packaged protocol configs.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_methods)
