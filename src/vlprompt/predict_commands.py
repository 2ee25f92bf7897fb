"""``vlprompt predict``: the top classes of images, zero-shot with a backbone or with a trained
run's learned prompts (``--checkpoint``). Lives above the engine: it uses engine, data and clip."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence


def register(sub) -> None:
    p = sub.add_parser("predict", help="classify images zero-shot or with learned prompts",
                       description="Print the top classes (--topk, default 5) with their probabilities "
                                   "for each image, zero-shot with --backbone and --classes, "
                                   "with a trained run's learned prompts (--checkpoint RUN_DIR), "
                                   "or with a classifier head of 'vlprompt export' (the "
                                   "classifier format; --checkpoint FILE: the image tower only).")
    p.add_argument("--backbone", help="CLIP name (ViT-B/16, ...) or weights file/folder (with a "
                   "classifier file: where its backbone is, if not where it was exported)")
    p.add_argument("--checkpoint", metavar="RUN_DIR",
                   help="a trained run folder, or a file in it (learned prompts), or an exported "
                        "classifier .safetensors file")
    p.add_argument("--classes", help='comma-separated class names, e.g. "cat,dog,car" '
                   "(optional with --checkpoint: defaults to the run's classes)")
    p.add_argument("--template", default="a photo of a {}.",
                   help="hand-crafted prompt for zero-shot (default: %(default)r)")
    p.add_argument("--topk", type=int, default=5, help="classes printed per image (default 5)")
    p.add_argument("--allow-class-mismatch", action="store_true",
                   help="apply class-specific learned tensors to other --classes")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files to classify (JPEG, PNG, ...)")
    p.set_defaults(func=_predict)


def _parse_classes(text: str | None) -> list[str] | None:
    if text is None:
        return None
    classes = [c.strip() for c in text.split(",") if c.strip()]
    if len(classes) < 2:
        raise ValueError("--classes needs at least two comma-separated class names")
    return classes


def _check_images(images: Sequence[str]) -> list[Path]:
    paths = [Path(i) for i in images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"image file(s) not found: {', '.join(missing[:5])}")
    from .data import verify_images

    bad = verify_images([str(p) for p in paths], progress=False)
    if bad:
        path, reason = bad[0]
        raise ValueError(f"{path}: cannot decode image ({reason}); pass image files "
                         f"(JPEG, PNG, ...)")
    return paths


def _print_predictions(paths, predictions: list[list[tuple[str, float]]]) -> None:
    for path, top in zip(paths, predictions):
        print(path)
        for name, prob in top:
            print(f"  {100 * prob:6.2f}%  {name}")


def _predict(args: argparse.Namespace) -> int:
    from .interop.export import is_classifier_file

    classifier = bool(args.checkpoint) and is_classifier_file(args.checkpoint)
    if not (args.backbone or args.checkpoint):
        raise ValueError("pass --backbone (zero-shot) or --checkpoint (a run folder or an "
                         "exported classifier)")
    if args.backbone and args.checkpoint and not classifier:
        raise ValueError("--backbone is not allowed with a run folder --checkpoint (the run "
                         "records its backbone); it is only for an exported classifier file")
    paths = _check_images(args.images)
    classes = _parse_classes(args.classes)
    if classifier:
        from .interop.export import predict_with_classifier

        _print_predictions(paths, predict_with_classifier(
            args.checkpoint, [str(p) for p in paths], classes, topk=args.topk,
            device=args.device, backbone=args.backbone))
        return 0
    if args.checkpoint:
        from .engine import predict_with_checkpoint

        _print_predictions(paths, predict_with_checkpoint(
            args.checkpoint, [str(p) for p in paths], classes, topk=args.topk, device=args.device,
            allow_class_mismatch=args.allow_class_mismatch))
        return 0
    if classes is None:
        raise ValueError("--classes is required with --backbone")
    if "{}" not in args.template:
        raise ValueError(f"--template must contain '{{}}' for the class name, got {args.template!r}")
    import torch

    from .clip.load import load_clip
    from .clip.zeroshot import ZeroShotClassifier
    from .data import build_transform

    clip = load_clip(args.backbone, device=args.device)
    classifier = ZeroShotClassifier(clip, classes, args.template)
    transform = build_transform(train=False, image_size=clip.image_size)
    images = torch.stack([transform(str(p)) for p in paths]).to(args.device)
    probs, indices = classifier.predict(images, topk=args.topk)
    _print_predictions(paths, [[(classifier.classnames[i], p) for p, i in zip(pr, ir)]
                               for pr, ir in zip(probs.tolist(), indices.tolist())])
    return 0
