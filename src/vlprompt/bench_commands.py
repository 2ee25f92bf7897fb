"""``vlprompt bench``: per-method training and evaluation throughput, peak memory and FLOPs at a
backbone's shapes with random weights, optimised and reference-style side by side; ``--e2e``
runs a base-to-new job on synthetic images with a time breakdown. Lives above the engine."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="measure every method's training/evaluation throughput (vs reference-style)",
        description="Training-step and evaluation images/s, peak memory and FLOPs per image of "
                    "each method's real engine step on synthetic tensors, at a backbone's shapes "
                    "with random weights; with --compare-reference (default) the same step with "
                    "the exact optimisations off (77-token text passes, no caching, batch-1 "
                    "conditional loops, fp16 weights on GPU) and the ratio. --e2e METHOD runs an "
                    "ImageNet-sized base-to-new job on synthetic JPEGs instead.")
    p.add_argument("--methods", help="comma-separated methods (default: every trainable method "
                   "and zeroshot)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--backbone-shape", default="ViT-B/16",
                   help="ViT-B/16, ViT-B/32 or ViT-L/14 (random weights; default %(default)s)")
    p.add_argument("--classes", default="10",
                   help="class counts, comma-separated (e.g. 10,100,1000)")
    p.add_argument("--batch", type=int, default=None,
                   help="training batch (default: each method's paper batch, base2new config)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps (default 1)")
    p.add_argument("--rounds", type=int, default=2,
                   help="measurement rounds, optimised and reference steps interleaved; the "
                        "best of each is kept (default 2)")
    p.add_argument("--eval-batch", type=int, default=100, help="evaluation batch (default 100)")
    p.add_argument("--eval-batches", type=int, default=2,
                   help="timed evaluation batches (default 2)")
    p.add_argument("--precision", default="auto",
                   help="train.precision of the optimised path: auto (bf16 on GPU, fp32 on CPU), "
                        "fp32, bf16 (default auto)")
    p.add_argument("--compare-reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure reference-style mode (default on)")
    p.add_argument("--no-flops", action="store_true", help="skip counting FLOPs")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, 1 step, small batches (tests, smoke checks)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--e2e", metavar="METHOD", help="run a base-to-new job end to end instead")
    p.add_argument("--e2e-classes", type=int, default=1000,
                   help="dataset classes (half are base, trained on; default 1000: 500 base)")
    p.add_argument("--e2e-shots", type=int, default=16, help="shots per class (default 16)")
    p.add_argument("--e2e-epochs", type=int, default=5, help="epochs (default 5)")
    p.add_argument("--e2e-batch", type=int, default=4, help="training batch (default 4)")
    p.add_argument("--e2e-root", help="folder for the synthetic dataset and run (default: a "
                   "temporary folder)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides for every method (train.precision=bf16, ...)")
    p.set_defaults(func=_bench)


def _methods(text: str | None) -> list[str]:
    from .methods import get_method, list_methods

    if text:
        names = [m.strip() for m in text.split(",") if m.strip()]
        for name in names:
            get_method(name)  # a clear error for an unknown name
        return names
    return [m for m in list_methods() if get_method(m).trainable] + ["zeroshot"]


def _bench(args: argparse.Namespace) -> int:
    if args.e2e:
        from .bench.e2e import E2ESetting, print_e2e, run_e2e

        setting = E2ESetting(method=args.e2e, classes=args.e2e_classes, shots=args.e2e_shots,
                             epochs=args.e2e_epochs, batch=args.e2e_batch, device=args.device,
                             shape="tiny" if args.quick else args.backbone_shape,
                             overrides=tuple(args.overrides or ()))
        report = run_e2e(setting, root=args.e2e_root)
        print_e2e(report)
        _write_json(args.json, report)
        return 0
    from .bench.measure import BenchSetting, run_bench
    from .bench.table import print_table

    classes = [int(c) for c in str(args.classes).split(",") if c.strip()]
    if not classes or min(classes) < 1:
        raise ValueError("--classes needs positive class counts, e.g. 10,100,1000")
    setting = dict(shape=args.backbone_shape, device=args.device, batch=args.batch,
                   steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                   eval_batch=args.eval_batch,
                   eval_batches=args.eval_batches, precision=args.precision,
                   flops=not args.no_flops, overrides=tuple(args.overrides or ()))
    if args.quick:
        setting.update(shape="tiny", steps=1, warmup=0, rounds=1, eval_batch=4, eval_batches=1,
                       batch=args.batch or 2)
    methods = _methods(args.methods)
    reports: list[dict] = []

    def combined(extra=()):
        done = reports + list(extra)
        return done[0] if len(done) == 1 else {"reports": done}

    for c in classes:
        # the JSON is rewritten (atomically) after every method: a killed run keeps its rows
        report = run_bench(methods, BenchSetting(classes=c, **setting),
                           compare_reference=args.compare_reference,
                           on_row=lambda partial: _write_json(args.json, combined([partial]),
                                                              quiet=True))
        print_table(report)
        reports.append(report)
    _write_json(args.json, combined())
    return 0


def _write_json(path: str | None, report: dict, quiet: bool = False) -> None:
    from .fileio import atomic_write_text

    if path:
        atomic_write_text(Path(path), json.dumps(report, indent=2, default=str) + "\n")
        if not quiet:
            logger.info("wrote %s", path)
