"""``vlprompt sweep FILE.yaml``, ``vlprompt status OUTPUT`` and the launcher options shared with
``vlprompt run``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .launch import LAUNCHERS, LaunchOptions


def add_launcher_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("launching (local processes or SLURM, through submitit)")
    g.add_argument("--launcher", default="inline", choices=LAUNCHERS,
                   help="inline (default: this process, one run after another), local (one "
                        "process per run over the visible GPUs, or the CPU cores), slurm (a job "
                        "array); local and slurm need `pip install 'vlprompt[cluster]'`")
    g.add_argument("--dry-run", action="store_true",
                   help="print the plan (every run, its folder and state) and write nothing")
    g.add_argument("--max-parallel", type=int, default=None,
                   help="runs at once (local: default one per GPU, or cores/--cpus-per-job on "
                        "CPU; slurm: the array's %%N limit)")
    g.add_argument("--jobs-per-gpu", type=int, default=1, help="local: runs sharing one GPU")
    g.add_argument("--gpus-per-job", type=int, default=1, help="GPUs per run (default 1)")
    g.add_argument("--cpus-per-job", type=int, default=None,
                   help="CPU threads per run (default: the cores divided among parallel runs)")
    g.add_argument("--mem", default=None, help="slurm: memory per node, e.g. 32G")
    g.add_argument("--time", default=None,
                   help="slurm: time limit per job, minutes or H:MM:SS or D-HH:MM:SS "
                        "(preempted or timed-out jobs are requeued and resume)")
    g.add_argument("--partition", default=None, help="slurm partition")
    g.add_argument("--account", default=None, help="slurm account")
    g.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="extra #SBATCH option, repeatable (e.g. --slurm qos=high)")
    g.add_argument("--nodes", type=int, default=1,
                   help="slurm: nodes per run, for one very large run (with --gpus-per-node)")
    g.add_argument("--gpus-per-node", type=int, default=None,
                   help="slurm: GPUs (= processes) per node of a multi-node run")
    g.add_argument("--tasks-per-node", type=int, default=None,
                   help="processes per run (torch.distributed, env://); default one per GPU")
    g.add_argument("--wait", action="store_true",
                   help="slurm: stay and show the live table until the jobs end")


def launch_options(args: argparse.Namespace) -> LaunchOptions:
    extra = {}
    for item in args.slurm:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--slurm {item!r} is not KEY=VALUE (e.g. --slurm qos=high)")
        extra[key.lstrip("-")] = value
    return LaunchOptions(args.launcher, args.max_parallel, args.gpus_per_job, args.jobs_per_gpu,
                         args.cpus_per_job, args.mem, args.time, args.partition, args.account,
                         extra, args.nodes, args.gpus_per_node, args.tasks_per_node, args.wait)


def execute_sweep(sweep, args: argparse.Namespace) -> int:
    """Print the plan, then (unless ``--dry-run``) launch; exit 1 if a run is not done."""
    from .launch import launch, prepare_backbone, print_plan
    from .status import collect

    options = launch_options(args)  # bad options fail before the plan is printed
    print_plan(sweep, collect(sweep.jobs))
    if args.dry_run:
        return 0
    if options.launcher != "inline":
        from .launch import require_submitit

        require_submitit()
    clip = prepare_backbone(sweep, sweep.device if options.launcher == "inline" else "cpu")
    left = launch(sweep, options, clip=clip if options.launcher == "inline" else None)
    if left and not (options.launcher == "slurm" and not options.wait):
        print(f"{left} run(s) not done; rerun the same command to finish them", file=sys.stderr)
        return 1
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .spec import load_sweep_file

    sweep = load_sweep_file(args.file, output=args.output, overrides=tuple(args.overrides))
    sweep.force = args.force
    sweep.device = args.device
    return execute_sweep(sweep, args)


def _cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .status import (collect, failure_report, read_manifests, render_table, slurm_states,
                         summary_line)

    output = Path(args.output)
    if not output.exists():
        raise FileNotFoundError(f"{output} does not exist")
    sweeps = read_manifests(output)
    if not sweeps:
        raise ValueError(f"{output} holds no sweep (no .vlprompt-sweep/ manifest); "
                         f"`vlprompt report {output}` tabulates finished runs")
    console = Console(width=None if sys.stdout.isatty() else 200)
    while True:
        failures = []
        for sweep, job_ids, launcher in sweeps:
            statuses = collect(sweep.jobs)
            if launcher == "slurm":
                job_ids = slurm_states(sweep, job_ids, statuses)
            console.print(render_table(statuses, title=f"{sweep.name} ({sweep.output})",
                                       job_ids=job_ids))
            console.print(summary_line(statuses))
            failures.append(failure_report(sweep, statuses))
        text = "\n".join(f for f in failures if f)
        if text:
            print(text)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def register(sub) -> None:
    sw = sub.add_parser(
        "sweep", help="run many protocol runs (methods × protocols × datasets × seeds × shots "
                      "× config grid) inline, on local GPUs/CPUs or on SLURM",
        description="Plan and run a sweep file (see README, 'Running a full benchmark'). The "
                    "plan is printed first; finished runs are skipped and unfinished ones "
                    "resume, so the same command continues a sweep after a kill. A failed run "
                    "never stops the others. When every run is done, report.md/report.csv and "
                    "plots/ are written into the output folder.")
    sw.add_argument("file", metavar="FILE.yaml", help="the sweep file")
    sw.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="config overrides applied to every run, after the file's")
    sw.add_argument("--output", default=None, help="output folder (default: the file's output)")
    sw.add_argument("--device", default=None, help="cpu, cuda … (default: cuda if present)")
    sw.add_argument("--force", action="store_true", help="retrain runs that already finished")
    add_launcher_arguments(sw)
    sw.set_defaults(func=_cmd_sweep)

    st = sub.add_parser("status", help="the state of a sweep launched earlier",
                        description="Read the run folders of the sweeps launched into OUTPUT "
                                    "and print their table: done, running (epoch, ETA), "
                                    "partial, failed (with the last log lines and the command "
                                    "to rerun), to do.")
    st.add_argument("output", metavar="OUTPUT", help="the sweep's output folder")
    st.add_argument("--watch", type=float, nargs="?", const=10.0, default=None, metavar="S",
                    help="refresh every S seconds (default 10) until interrupted")
    st.set_defaults(func=_cmd_status)
