"""Run a sweep's jobs: ``inline`` (this process, one after another), ``local`` (submitit's local
executor: one process per job, spread over the visible GPUs or the CPU cores) or ``slurm``
(submitit: one job array). The launcher only submits and watches; resuming, locking and
skipping finished work are the run folders' business, so a relaunch after any kill, preemption
or failure finishes exactly what is unfinished.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ..fileio import atomic_write_json, file_lock
from .job import RunJob
from .spec import Sweep, SweepJob
from .status import collect, failure_report, render_table, summary_line

logger = logging.getLogger(__name__)

LAUNCHERS = ("inline", "local", "slurm")
#: seconds between polls of running jobs
POLL_S = 0.5
#: a local job's time limit when none is given (submitit's default is 2 minutes)
LOCAL_TIMEOUT_MIN = 60 * 24 * 365


@dataclasses.dataclass
class LaunchOptions:
    launcher: str = "inline"
    max_parallel: Optional[int] = None
    gpus_per_job: int = 1
    jobs_per_gpu: int = 1
    cpus_per_job: Optional[int] = None
    mem: Optional[str] = None
    time: Optional[str] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    slurm: dict = dataclasses.field(default_factory=dict)
    nodes: int = 1
    gpus_per_node: Optional[int] = None
    tasks_per_node: Optional[int] = None
    #: slurm: wait for the jobs and show the table (local and inline always wait)
    wait: bool = False

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got "
                             f"{self.launcher!r}")
        for name in ("max_parallel", "cpus_per_job", "gpus_per_node", "tasks_per_node"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        for name in ("gpus_per_job", "jobs_per_gpu", "nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(self, name)}")
        if self.nodes > 1 and self.launcher != "slurm":
            raise ValueError("--nodes > 1 needs --launcher slurm (the local executor runs on "
                             "one machine)")


def parse_time(value: Optional[str]) -> Optional[int]:
    """``--time`` as minutes: ``90``, ``1:30:00`` (H:MM:SS) or ``2-00:00:00`` (D-HH:MM:SS)."""
    if value is None:
        return None
    text = str(value).strip()
    try:
        days, _, clock = text.rpartition("-")
        parts = [int(p) for p in clock.split(":")]
        if len(parts) == 1:
            minutes = parts[0]
        else:
            parts = ([0] * (3 - len(parts)) + parts) if len(parts) <= 3 else None
            hours, mins, secs = parts
            minutes = hours * 60 + mins + (1 if secs else 0)
        minutes += int(days) * 24 * 60 if days else 0
    except (TypeError, ValueError):
        raise ValueError(f"--time {value!r}: use minutes (90), H:MM:SS or D-HH:MM:SS") from None
    if minutes < 1:
        raise ValueError(f"--time {value!r} must be at least one minute")
    return minutes


def require_submitit():
    try:
        import submitit
    except ImportError:
        raise RuntimeError("the local and slurm launchers need submitit: "
                           "pip install 'vlprompt[cluster]' (or pip install submitit)") from None
    return submitit


# --------------------------------------------------------------------------- plan and manifest
def print_plan(sweep: Sweep, statuses, stream=None) -> None:
    """Every run, its folder and its state, before anything starts."""
    from rich.console import Console

    out = stream or sys.stdout
    console = Console(file=out, width=None if out.isatty() else 200, soft_wrap=False)
    console.print(render_table(statuses, title=f"{sweep.name}: {len(statuses)} run(s) in "
                                                f"{sweep.output}", folders=True))
    console.print(summary_line(statuses))


def write_manifest(sweep: Sweep, launcher: str, job_ids: dict) -> Path:
    """``<output>/.vlprompt-sweep/<name>.json``: the plan and submitit's job ids, so `vlprompt
    status OUTPUT` can show the sweep later (the run folders hold everything else)."""
    return atomic_write_json(sweep.manifest_path, {
        "sweep": sweep.to_dict(), "launcher": launcher, "job_ids": job_ids,
        "command": sys.argv, "updated": datetime.datetime.now().isoformat(timespec="seconds")})


def write_report_if_complete(sweep: Sweep, statuses: Optional[list] = None) -> Optional[Path]:
    """When every run of the sweep is done: ``report.md``, ``report.csv`` and ``plots/``
    beside the runs (under a lock: the last two jobs may finish together). ``statuses``: the
    runs' states when the caller has just read them."""
    statuses = collect(sweep.jobs) if statuses is None else statuses
    if not statuses or any(s.state != "done" for s in statuses):
        return None
    from ..report import report

    with file_lock(sweep.state_dir / "report.lock"):
        target = sweep.output / "report.md"
        report(sweep.output, fmt="md", output=target, plot_dir=sweep.output / "plots")
        report(sweep.output, fmt="csv", output=sweep.output / "report.csv")
    return target


# --------------------------------------------------------------------------- watching
class Monitor:
    """Shows the sweep while it runs: a live ``rich`` table on a terminal, else one line per
    finished or failed run plus a summary now and then."""

    def __init__(self, sweep: Sweep, parallel: int, job_ids: Optional[dict] = None):
        self.sweep = sweep
        self.parallel = parallel
        self.job_ids = job_ids or {}
        self.live = None
        self._last: dict = {}
        self._last_poll = 0.0
        self._last_summary = time.time()
        if sys.stdout.isatty():
            from rich.live import Live

            self.live = Live(self._renderable(collect(sweep.jobs)), refresh_per_second=1,
                             transient=False)

    def _renderable(self, statuses):
        from rich.console import Group

        return Group(render_table(statuses, job_ids=self.job_ids),
                     summary_line(statuses, self.parallel))

    def __enter__(self) -> "Monitor":
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.update(force=True)
        if self.live is not None:
            self.live.__exit__(*exc)

    def update(self, force: bool = False) -> list:
        now = time.time()
        if not force and now - self._last_poll < 2.0:
            return []
        self._last_poll = now
        statuses = collect(self.sweep.jobs)
        if self.live is not None:
            self.live.update(self._renderable(statuses))
        else:
            for s in statuses:
                key = str(s.job.run_dir)
                if self._last.get(key) not in (None, s.state) and s.state in ("done", "failed"):
                    print(f"{s.state}: {s.job.describe()}"
                          f"{' (' + s.accuracy + ')' if s.accuracy else ''}", flush=True)
                self._last[key] = s.state
            if force or now - self._last_summary > 60:
                print(summary_line(statuses, self.parallel), flush=True)
                self._last_summary = now
        return statuses


# --------------------------------------------------------------------------- launchers
def launch(sweep: Sweep, options: LaunchOptions, clip=None) -> int:
    """Run the sweep's unfinished jobs; returns the number of runs that are not done at the end
    (failed, or still queued on SLURM without ``wait``)."""
    statuses = collect(sweep.jobs)
    todo = [s.job for s in statuses if s.state not in ("done", "running")]
    busy = [s for s in statuses if s.state == "running"]
    for s in busy:
        holder = s.holder or {}
        logger.warning("%s is being run by pid %s on %s; left to it", s.job.describe(),
                       holder.get("pid"), holder.get("host"))
    if not todo:
        write_report_if_complete(sweep, statuses)
        return len(busy)
    if options.launcher == "inline":
        _launch_inline(sweep, todo, clip)
    elif options.launcher == "local":
        _launch_local(sweep, todo, options)
    else:
        if not _launch_slurm(sweep, todo, options):
            return len(todo)
    statuses = collect(sweep.jobs)
    report = failure_report(sweep, statuses)
    if report:
        print(report, file=sys.stderr)
    if write_report_if_complete(sweep, statuses) is not None:
        print(f"report: {sweep.output / 'report.md'} (and report.csv, plots/)")
    return sum(s.state != "done" for s in statuses)


def prepare_backbone(sweep: Sweep, device=None):
    """Shared work done once, before any job starts: resolve (download, under a lock) and load
    the backbone, which fingerprints it and records the fingerprint in the cache folder, so
    jobs never hash or download the same file concurrently. Also fails fast on a bad
    backbone instead of failing every job."""
    from ..clip.load import load_clip

    return load_clip(sweep.backbone, device=device or "cpu")


def _launch_inline(sweep: Sweep, todo: Sequence[SweepJob], clip) -> None:
    from ..engine import distributed as D

    with Monitor(sweep, 1) as monitor:
        for job in todo:
            try:
                RunJob(sweep, job)(clip=clip)
            except Exception as err:  # recorded in the run folder; the others go on
                if D.is_main():
                    logger.error("%s failed: %s", job.describe(), str(err).splitlines()[0]
                                 if str(err) else type(err).__name__)
            monitor.update(force=True)


def _local_slots(options: LaunchOptions, device: Optional[str]) -> list[tuple[int, ...]]:
    """One entry per parallel job: the GPU ids it may use (empty on CPU)."""
    import torch

    from ..runtime import usable_cpus

    gpus = torch.cuda.device_count() if torch.cuda.is_available() and \
        not str(device or "").startswith("cpu") else 0
    if gpus:
        per_job = min(options.gpus_per_job, gpus)
        groups = [tuple(range(i, i + per_job)) for i in range(0, gpus - per_job + 1, per_job)]
        slots = [g for g in groups for _ in range(options.jobs_per_gpu)]
    else:
        width = options.cpus_per_job or 1
        slots = [()] * max(1, usable_cpus() // width)
    if options.max_parallel:
        slots = (slots * options.max_parallel)[:options.max_parallel] if gpus else \
            [()] * options.max_parallel
    return slots


def _threads_per_job(options: LaunchOptions, parallel: int) -> int:
    from ..runtime import physical_cores

    return options.cpus_per_job or max(1, physical_cores() // parallel)


def _thread_env(threads: Optional[int]) -> list[str]:
    """Shell lines run before a job: its OpenMP/MKL pools sized at process start (torch's
    ``set_num_threads`` alone leaves the libraries' start-up choice, and their kernels, to the
    environment), so parallel jobs neither oversubscribe the cores nor differ from an inline
    run with the same threads."""
    if not threads:
        return []
    return [f"export OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}"]


def _launch_local(sweep: Sweep, todo: Sequence[SweepJob], options: LaunchOptions) -> None:
    submitit = require_submitit()
    slots = _local_slots(options, sweep.device)
    threads = _threads_per_job(options, len(slots))
    executor = submitit.LocalExecutor(folder=str(sweep.state_dir / "submitit"))
    queue = collections.deque(todo)
    running: dict[int, tuple[SweepJob, object]] = {}
    job_ids: dict[str, str] = {}
    write_manifest(sweep, "local", job_ids)
    with Monitor(sweep, len(slots), job_ids) as monitor:
        try:
            while queue or running:
                for slot, gpus in enumerate(slots):
                    if slot in running or not queue:
                        continue
                    job = queue.popleft()
                    executor.update_parameters(
                        timeout_min=parse_time(options.time) or LOCAL_TIMEOUT_MIN,
                        gpus_per_node=len(gpus), visible_gpus=gpus,
                        tasks_per_node=options.tasks_per_node or 1,
                        setup=_thread_env(threads))
                    running[slot] = (job, executor.submit(RunJob(sweep, job, threads)))
                    job_ids[str(job.run_dir)] = running[slot][1].job_id
                    write_manifest(sweep, "local", job_ids)
                for slot, (job, submitted) in list(running.items()):
                    if submitted.done():
                        _log_outcome(job, submitted)
                        del running[slot]
                monitor.update()
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            for job, submitted in running.values():
                submitted.cancel(check=False)  # they resume when the command is run again
            raise


def _log_outcome(job: SweepJob, submitted) -> None:
    try:
        error = submitted.exception()
    except Exception as err:  # noqa: BLE001 - the job died without a result (killed)
        error = err
    if error is not None:
        logger.debug("%s: %s", job.describe(), error)


def slurm_parameters(options: LaunchOptions, parallel: Optional[int]) -> dict:
    """submitit ``AutoExecutor`` parameters for the options (one task per GPU)."""
    gpus = options.gpus_per_node or options.gpus_per_job
    params = {"timeout_min": parse_time(options.time) or 24 * 60, "nodes": options.nodes,
              "gpus_per_node": gpus,
              "tasks_per_node": options.tasks_per_node or (gpus if options.nodes > 1 else 1),
              "cpus_per_task": options.cpus_per_job, "slurm_partition": options.partition,
              "slurm_account": options.account, "slurm_mem": options.mem,
              "slurm_array_parallelism": parallel,
              "slurm_additional_parameters": dict(options.slurm) or None}
    return {k: v for k, v in params.items() if v is not None}


def _launch_slurm(sweep: Sweep, todo: Sequence[SweepJob], options: LaunchOptions) -> bool:
    """Submit one job array; returns True when it waited for the jobs to end."""
    submitit = require_submitit()
    executor = submitit.AutoExecutor(folder=str(sweep.state_dir / "submitit" / "%j"),
                                     cluster="slurm")
    params = slurm_parameters(options, options.max_parallel)
    executor.update_parameters(name=f"vlprompt-{sweep.name}", **params)
    if options.cpus_per_job:
        executor.update_parameters(slurm_setup=_thread_env(options.cpus_per_job))
    threads = options.cpus_per_job
    with executor.batch():
        submitted = [executor.submit(RunJob(sweep, job, threads)) for job in todo]
    job_ids = {str(job.run_dir): s.job_id for job, s in zip(todo, submitted)}
    write_manifest(sweep, "slurm", job_ids)
    first = submitted[0].job_id.split("_")[0] if submitted else "?"
    print(f"submitted {len(submitted)} job(s) as SLURM array {first}; "
          f"watch: vlprompt status {sweep.output}")
    if not options.wait:
        return False
    with Monitor(sweep, options.max_parallel or len(todo), job_ids) as monitor:
        while not all(s.done() for s in submitted):
            monitor.update()
            time.sleep(max(POLL_S, 10.0))
    return True
