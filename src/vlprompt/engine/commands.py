"""``vlprompt train``, ``vlprompt eval`` and ``vlprompt methods``: thin wrappers over
``run_experiment`` / ``evaluate_run`` and the method registry."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


def default_run_dir(output: str, protocol, method: str, dataset: str, shots: int, seed: int) -> Path:
    """``<output>/<protocol or 'train'>/<method>/<dataset>/shots_<K>/seed<S>``."""
    return Path(output) / (protocol or "train") / method / dataset / f"shots_{shots}" / f"seed{seed}"


def _summary(entry: dict) -> str:
    return (f"{entry['dataset']}/{entry['subsample']}: accuracy {entry['accuracy']:.2f}%  "
            f"macro-F1 {entry['macro_f1']:.2f}%  ({entry['num_correct']}/{entry['num_images']})")


def cmd_train(args) -> int:
    from .run import run_experiment

    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(
        args.output, args.protocol, args.method, args.dataset, args.shots, args.seed)
    results = run_experiment(args.method, args.dataset, args.root, args.backbone, run_dir,
                             shots=args.shots, seed=args.seed, subsample=args.subsample,
                             protocol=args.protocol, config_file=args.config,
                             overrides=args.overrides, resume=args.resume, force=args.force,
                             skip_missing=args.skip_missing,
                             device=args.device)
    from .distributed import is_main

    if is_main():
        entry = results["evaluations"][f"{args.dataset}/{args.subsample}"]
        print(_summary(entry))
        print(f"run folder: {run_dir}")
    return 0


def cmd_eval(args) -> int:
    from .distributed import is_main
    from .run import evaluate_run

    entry = evaluate_run(args.checkpoint, args.dataset, args.root, subsample=args.subsample,
                         device=args.device, skip_missing=args.skip_missing)
    if is_main():
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
                     "config": fields, "protocols": list_protocol_configs(name)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']:<12} {row['description']}")
        fields = ", ".join(f"{k}={v!r}" for k, v in row["config"].items())
        print(f"{'':<12} fields: {fields or '(none)'}")
        if row["protocols"]:
            print(f"{'':<12} configs: {', '.join(row['protocols'])}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a method on a dataset and evaluate it",
                       description="Train a prompt-learning method and evaluate it on the test split "
                                   "of the same classes. Trailing key=value pairs override the config "
                                   "(train.lr=0.01, method.n_ctx=4, or a unique bare field name).")
    p.add_argument("--method", required=True)
    p.add_argument("--dataset", required=True, help="dataset name (e.g. eurosat) or a dataset .yaml")
    p.add_argument("--root", required=True, help="data root holding the dataset folders")
    p.add_argument("--backbone", default="ViT-B/16", help="CLIP name or weights file (default ViT-B/16)")
    p.add_argument("--shots", type=int, default=16, help="images per class (-1: all; default 16)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--subsample", default="all", choices=["all", "base", "new"])
    p.add_argument("--protocol", default=None,
                   help="packaged config to start from (base2new, fewshot, xd)")
    p.add_argument("--config", default=None, help="YAML with 'method:' and 'train:' sections")
    p.add_argument("--output", default="output", help="output root (default ./output)")
    p.add_argument("--run-dir", default=None,
                   help="run folder (default <output>/<protocol|train>/<method>/<dataset>/shots_<K>/seed<S>)")
    p.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="continue an interrupted run in the folder (default)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="refuse to continue an existing checkpoint")
    p.add_argument("--force", action="store_true", help="delete the run folder's outputs and start over")
    p.add_argument("--skip-missing", action="store_true",
                   help="drop image files listed in the split but missing on disk (with a warning)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: GPU if available)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained run on a dataset",
                       description="Evaluate a run folder's checkpoint on a dataset's test split; the "
                                   "result is added to the folder's results.json.")
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="run folder of 'vlprompt train'")
    p.add_argument("--dataset", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--subsample", default="all", choices=["all", "base", "new"])
    p.add_argument("--device", default=None)
    p.add_argument("--skip-missing", action="store_true",
                   help="drop image files listed in the split but missing on disk (with a warning)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("methods", help="list the methods, their config fields and defaults")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_methods)
