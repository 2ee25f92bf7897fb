"""``vlprompt demo``: prompt learning end to end on the toy world (offline, CPU, minutes)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="offline demo: pretrain a tiny CLIP on the toy world, then base-to-new with "
                     "zero-shot and every prompt-learning method",
        description="Pretrain (or reuse the cached) tiny CLIP on procedurally drawn toy-world "
                    "images and captions, write the toyworld benchmark, train every registered "
                    "method on its base classes and print the Base/New/HM table. Runs offline on "
                    "a CPU in under 10 minutes (--quick: about 3).")
    p.add_argument("--output", default="vlprompt-demo", type=Path,
                   help="folder for the run folders, summary.json, table.md and base2new.png "
                        "(default: %(default)s, kept apart from the protocol tree of ./output)")
    p.add_argument("--root", type=Path, default=None,
                   help="data root to write the toyworld benchmark into "
                        "(default: <cache>/toyworld/data)")
    p.add_argument("--quick", action="store_true",
                   help="smaller pretraining, fewer shots and epochs (about 3 minutes)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="methods to train (default: every registered trainable method)")
    p.add_argument("--seed", type=int, default=1, help="few-shot and training seed")
    p.add_argument("--force", action="store_true", help="re-run method runs that already finished")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    import dataclasses
    import logging

    from .demo import DemoConfig, run_demo

    config = DemoConfig.quick() if args.quick else DemoConfig.full()
    config = dataclasses.replace(config, seed=args.seed)
    # the demo prints its own progress lines; the engine's INFO lines still reach each run's
    # log.txt (its handler sits on the "vlprompt" logger), only the console drops them
    quiet = _QuietFilter()
    handlers = [] if args.verbose else list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        summary = run_demo(args.output, args.root, config, methods=args.methods, force=args.force,
                           say=lambda line: print(line, flush=True))
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)
    print()
    print(summary["table"])
    out = Path(args.output)
    print(f"\nTotal {summary['total_seconds']:.0f}s (pretraining "
          f"{summary['pretrain_seconds']:.0f}s). Results: {out / 'summary.json'}, "
          f"plot: {out / 'base2new.png'}")
    return 0


class _QuietFilter:
    """Console filter: warnings and errors only from the library's loggers."""

    def filter(self, record) -> bool:
        import logging

        return record.levelno >= logging.WARNING or not record.name.startswith("vlprompt.")
