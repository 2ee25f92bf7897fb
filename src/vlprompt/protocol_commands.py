"""``vlprompt run`` (a whole protocol) and ``vlprompt report`` (tables and plots of its results)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .protocols import PROTOCOLS

_RUN_DESCRIPTION = (
    "Run an evaluation protocol for one method: base2new (train on base classes, test base and "
    "new), fewshot (1/2/4/8/16 shots), xd (train ImageNet, test 10 other datasets), dg (the same "
    "ImageNet model on ImageNet-V2/-Sketch/-A/-R). Finished runs are skipped, unfinished ones "
    "resume.")


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("protocol", metavar="PROTOCOL",
                   help=f"one of {', '.join(PROTOCOLS)}")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides applied to every run (e.g. train.max_epoch=2), anywhere "
                        "on the line")
    p.add_argument("--method", required=True, help="method name (see `vlprompt methods`)")
    p.add_argument("--datasets", default="all",
                   help="comma-separated dataset names or dataset .yaml files, or 'all' (default): "
                        "the 11 standard datasets (xd: the 10 targets; dg: the 4 ImageNet variants)")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    p.add_argument("--root", required=True, help="data root holding the dataset folders")
    p.add_argument("--backbone", default="ViT-B/16",
                   help="CLIP name or weights file (default ViT-B/16)")
    p.add_argument("--shots", default=None,
                   help="shots per class, comma-separated (default 16; fewshot: 1,2,4,8,16)")
    p.add_argument("--output", default="output", help="output folder (default ./output)")
    p.add_argument("--config", default=None, help="YAML config applied after the method's "
                                                   "protocol config")
    p.add_argument("--source", default="imagenet", help="xd/dg source dataset (default imagenet)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if present)")
    p.add_argument("--force", action="store_true", help="retrain runs that already finished")
    p.add_argument("--skip-missing", action="store_true",
                   help="skip image files listed in the split that are missing on disk or cannot "
                        "be decoded (with a warning)")


def _cmd_run(args: argparse.Namespace) -> int:
    from .protocols import run_protocol

    for item in args.overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
    if args.launcher != "inline" or args.dry_run:
        return _run_as_sweep(args)
    run_dirs = run_protocol(args.protocol, args.method, args.datasets, args.seeds, args.root,
                            args.backbone, output=args.output, shots=args.shots,
                            config_file=args.config, overrides=tuple(args.overrides),
                            force=args.force, device=args.device, source=args.source,
                            skip_missing=args.skip_missing)
    roots = sorted({str(Path(d).parents[3]) for d in run_dirs})
    print(f"{len(run_dirs)} run(s) complete under {', '.join(roots)}; "
          f"tables: vlprompt report {args.output}")
    return 0


def _run_as_sweep(args: argparse.Namespace) -> int:
    """``run`` with ``--launcher local|slurm`` or ``--dry-run``: the protocol's runs as a sweep."""
    from .sweep.commands import execute_sweep
    from .sweep.spec import Sweep, plan_sweep, sweep_name

    jobs = plan_sweep([args.method], [args.protocol], args.output, args.datasets, args.seeds,
                      args.shots, source=args.source, overrides=tuple(args.overrides))
    sweep = Sweep(sweep_name(jobs), Path(args.output), args.root, args.backbone, jobs,
                  config_file=args.config, source=args.source, skip_missing=args.skip_missing,
                  force=args.force, device=args.device)
    return execute_sweep(sweep, args)


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import report

    plot_dir = None
    if args.plot:
        plot_dir = args.plot_dir or (Path(args.output).parent if args.output
                                     else Path(args.runs_dir) / "plots")
    text = report(args.runs_dir, fmt=args.format, output=args.output, plot_dir=plot_dir)
    if args.output is None:
        sys.stdout.write(text)
    return 0


def register(sub) -> None:
    run = sub.add_parser("run", help="run a protocol (base2new, fewshot, xd, dg) for a method",
                         description=_RUN_DESCRIPTION)
    _add_run_arguments(run)
    from .sweep.commands import add_launcher_arguments

    add_launcher_arguments(run)
    run.set_defaults(func=_cmd_run)

    rep = sub.add_parser("report", help="tables (and plots) from the results of protocol runs",
                         description="Aggregate results.json files under RUNS_DIR: base2new "
                                     "Base/New/HM, few-shot accuracy per shots, cross-dataset and "
                                     "domain-generalisation transfer (mean ± std over seeds).")
    rep.add_argument("runs_dir", metavar="RUNS_DIR", help="folder searched for results.json")
    rep.add_argument("--format", default="md", choices=["md", "csv", "json"],
                     help="output format (default md)")
    rep.add_argument("--output", default=None, help="write the tables to FILE instead of stdout")
    rep.add_argument("--plot", action="store_true",
                     help="also write PNG plots (few-shot curves, base/new bars)")
    rep.add_argument("--plot-dir", default=None,
                     help="folder for the plots (default: next to --output, else RUNS_DIR/plots)")
    rep.set_defaults(func=_cmd_report)
