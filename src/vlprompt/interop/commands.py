"""``vlprompt import`` and ``vlprompt export``: official runs in, vlprompt runs out."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence, Union


def parse_epoch(text: Optional[str]) -> Union[str, int]:
    """``--epoch``: "last" (default), "best" or an epoch number."""
    if text in (None, "", "last", "best"):
        return text or "last"
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--epoch must be last, best or an epoch number, got {text!r}") from None


def method_overrides(method: str, words: Sequence[str]) -> dict:
    """``key=value`` words (``n_ctx=4`` or ``method.n_ctx=4``) as method config fields, values
    parsed as YAML scalars."""
    import dataclasses

    import yaml

    from ..methods import get_method

    fields = {f.name for f in dataclasses.fields(get_method(method).Config)}
    out = {}
    for word in words or ():
        key, sep, value = word.partition("=")
        key = key.removeprefix("method.")
        if not sep or key not in fields:
            raise ValueError(f"{word!r}: expected method.<field>=<value> with a {method} field "
                             f"({', '.join(sorted(fields))})")
        out[key] = yaml.safe_load(value) if value else ""
    return out


def _classes(text: Optional[str]) -> Optional[list[str]]:
    if text is None:
        return None
    names = [c.strip() for c in text.split(",") if c.strip()]
    if len(names) < 2:
        raise ValueError("--classnames needs at least two comma-separated class names")
    return names


def cmd_import(args: argparse.Namespace) -> int:
    from .official import no_official_format, supported_methods
    from .run import import_official

    if args.method not in supported_methods():
        raise ValueError("--" + no_official_format(args.method))
    if args.classnames is None and args.root is None:
        from ..data import is_dataset_file

        if not is_dataset_file(args.dataset):
            raise ValueError("--root is required with --dataset (or pass --classnames)")
    results = import_official(
        args.official_dir, args.method, args.output, dataset=args.dataset, root=args.root,
        backbone=args.backbone, classnames=_classes(args.classnames), template=args.template,
        subsample=args.subsample, epoch=parse_epoch(args.epoch),
        overrides=method_overrides(args.method, args.overrides), evaluate=args.evaluate,
        force=args.force, device=args.device)
    print(f"run folder: {args.output}")
    for key, entry in (results.get("evaluations") or {}).items():
        print(f"{key}: accuracy {entry['accuracy']:.2f}%  macro-F1 {entry['macro_f1']:.2f}%")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_classifier, export_dassl

    if args.format == "classifier":
        path = export_classifier(args.run_dir, args.output, classes=_classes(args.classes),
                                 device=args.device)
    else:
        path = export_dassl(args.run_dir, args.output)
    print(f"wrote {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "import", help="turn an official repository's run into a vlprompt run folder",
        description="Read an official run (CoOp, CoCoOp, KgCoOp, MaPLe, IVLP, VPT, PromptSRC, "
                    "COMMA, DPT, MMA, TCP or ProGrad trainer output: "
                    "<dir>/<registered model>/model.pth.tar-<epoch>) "
                    "safely, map its tensors onto the method, and write an ordinary run "
                    "folder that predict, report and eval use. Settings come from the tensor "
                    "shapes and the run's config.yaml/log.txt; method.<field>=<value> words "
                    "override them. The run is evaluated on the dataset's test split unless "
                    "--no-eval.")
    p.add_argument("official_dir", metavar="OFFICIAL_DIR",
                   help="official output folder, registered-model folder or checkpoint file")
    p.add_argument("--method", required=True, help="method name (coop, maple, ...)")
    p.add_argument("--dataset", required=True, help="dataset name (class names and template)")
    p.add_argument("--root", default=None, help="data root holding the dataset folders")
    p.add_argument("--backbone", default=None,
                   help="CLIP the run was trained on (default: the run's MODEL.BACKBONE.NAME)")
    p.add_argument("--output", required=True, metavar="RUN_DIR", help="run folder to write")
    p.add_argument("--classnames", default=None,
                   help="comma-separated class names instead of the dataset's (no --root needed)")
    p.add_argument("--template", default=None, help="hand-crafted template with --classnames")
    p.add_argument("--subsample", default=None, choices=["all", "base", "new"],
                   help="classes the run was trained on (default: the run's "
                        "DATASET.SUBSAMPLE_CLASSES, else all)")
    p.add_argument("--epoch", default=None,
                   help="last (default: the highest model.pth.tar-<N>), best, or a number")
    p.add_argument("--no-eval", dest="evaluate", action="store_false", default=True,
                   help="do not evaluate the imported run on the test split")
    p.add_argument("--force", action="store_true", help="replace a run already in RUN_DIR")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: GPU if available)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="method config fields, e.g. method.ctx_init='a photo of a'")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "export", help="export a run as a fixed classifier head or an official checkpoint",
        description="--format classifier writes the learned text side as a fixed head "
                    "(normalised [C, E] text features, logit scale, class names, backbone "
                    "fingerprint, and the learned vision prompts if any; safetensors) that "
                    "'vlprompt predict' takes as its checkpoint and runs with the image tower "
                    "only. "
                    "--format dassl writes <OUTPUT>/<registered model>/model.pth.tar-<epoch> as "
                    "the official trainer saves it, plus a config.yaml.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a vlprompt run folder")
    p.add_argument("--format", required=True, choices=["classifier", "dassl"],
                   help="classifier (a fixed head for predict) or dassl (official checkpoint)")
    p.add_argument("--output", required=True,
                   help="classifier: a .safetensors file; dassl: an output folder")
    p.add_argument("--classes", default=None,
                   help="classifier: comma-separated class names (default: the run's)")
    p.add_argument("--device", default="cpu", help="device for computing the head (default cpu)")
    p.set_defaults(func=cmd_export)
