"""Where each run of a sweep stands, read from the run folders (no database): finished results,
the writer's lock, ``progress.json`` and ``failure.json``; plus submitit's job ids from the
sweep's manifest."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ..engine.rundir import RunDir
from .spec import Sweep, SweepJob

#: display order of the states
STATES = ("running", "failed", "partial", "to do", "done")


@dataclasses.dataclass
class RunStatus:
    job: SweepJob
    #: one of ``STATES``
    state: str
    #: "epoch 3/10, step 12/40" for partial and running runs
    progress: str = ""
    #: seconds left, from the training loop's own estimate (running runs)
    eta_s: Optional[float] = None
    #: "eurosat/base 81.2, eurosat/new 70.4" for done runs
    accuracy: str = ""
    failure: Optional[dict] = None
    holder: Optional[dict] = None
    #: training wall time of a done run (for the sweep's ETA)
    train_time_s: Optional[float] = None


def run_status(job: SweepJob) -> RunStatus:
    """The state of one job's folder. ``running`` wins (its lock is held), then ``done``
    (results with every evaluation), then ``failed`` (a failure record), then ``partial``."""
    from ..protocols import run_state

    folder = RunDir(job.run_dir)
    holder = folder.holder()
    try:
        results = folder.read_results()
        state, _ = run_state(job.run, results)
    except ValueError as err:  # results of another run in the folder
        return RunStatus(job, "failed", failure={"error": str(err)})
    status = RunStatus(job, "to do", holder=holder)
    failure = None if holder is not None or state == "done" else folder.read_failure()
    if holder is not None:
        status.state = "running"
    elif state == "done":
        status.state = "done"
    elif failure is not None:
        status.state, status.failure = "failed", failure
    elif state != "new" or folder.latest_generation() is not None:
        status.state = "partial"
    if results is not None:
        status.train_time_s = results.train.get("time_s")
        if status.state == "done":
            status.accuracy = ", ".join(
                f"{k} {results.accuracy(k):.1f}" for k in job.run.evaluation_keys
                if results.accuracy(k) is not None)
    _add_progress(status, folder)
    return status


def _add_progress(status: RunStatus, folder: RunDir) -> None:
    if status.state not in ("running", "partial", "failed"):
        return
    progress = folder.read_progress()
    if progress is None:
        gen = folder.latest_generation()
        if gen is not None:
            try:
                header = gen.header()
            except ValueError:
                return
            status.progress = f"epoch {header.get('epoch', 0)}/{header.get('max_epoch', '?')}"
        return
    status.progress = (f"epoch {progress.get('epoch', 0) + 1}/{progress.get('max_epoch', '?')}, "
                       f"step {progress.get('step', 0)}/{progress.get('steps_per_epoch', '?')}")
    if status.state == "running" and progress.get("eta_s") is not None:
        elapsed = time.time() - float(progress.get("updated", time.time()))
        status.eta_s = max(0.0, float(progress["eta_s"]) - elapsed)


def collect(jobs: Iterable[SweepJob]) -> list[RunStatus]:
    return [run_status(job) for job in jobs]


def counts(statuses: Sequence[RunStatus]) -> dict[str, int]:
    return {state: sum(s.state == state for s in statuses) for state in STATES}


def sweep_eta(statuses: Sequence[RunStatus], parallel: int) -> Optional[float]:
    """Seconds until the sweep ends: runs not done × the mean training time of the done runs of
    this sweep / the parallel jobs (None before any run finished)."""
    times = [s.train_time_s for s in statuses if s.state == "done" and s.train_time_s]
    left = [s for s in statuses if s.state != "done"]
    if not left:
        return 0.0
    if not times:
        return None
    mean = sum(times) / len(times)
    running = sum(s.eta_s or 0.0 for s in left if s.state == "running")
    waiting = sum(1 for s in left if s.state != "running")
    return (running + waiting * mean) / max(1, parallel)


def fmt_seconds(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def render_table(statuses: Sequence[RunStatus], title: str = "", job_ids: Optional[dict] = None,
                 folders: bool = False):
    """A ``rich`` table: one row per run, grouped by state (``folders``: with the run folder)."""
    from rich.table import Table

    table = Table(title=title or None, show_lines=False, header_style="bold")
    for name in ("state", "run", "progress", "eta", "result / error"):
        table.add_column(name, overflow="fold")
    if job_ids:
        table.add_column("job")
    if folders:
        table.add_column("folder", overflow="fold")
    order = {state: i for i, state in enumerate(STATES)}
    style = {"running": "cyan", "failed": "red", "partial": "yellow", "to do": "dim",
             "done": "green"}
    for s in sorted(statuses, key=lambda s: order[s.state]):
        detail = s.accuracy if s.state == "done" else (s.failure or {}).get("error", "")
        row = [f"[{style[s.state]}]{s.state}[/]", s.job.describe(), s.progress,
               fmt_seconds(s.eta_s) if s.eta_s is not None else "", detail]
        if job_ids:
            row.append(str(job_ids.get(str(s.job.run_dir), "")))
        if folders:
            row.append(str(s.job.run_dir))
        table.add_row(*row)
    return table


def summary_line(statuses: Sequence[RunStatus], parallel: int = 1) -> str:
    c = counts(statuses)
    parts = [f"{c[state]} {state}" for state in STATES if c[state]]
    eta = sweep_eta(statuses, parallel)
    tail = "" if c["done"] == len(statuses) else f"; ETA {fmt_seconds(eta)}"
    return f"{len(statuses)} run(s): {', '.join(parts)}{tail}"


def log_tail(job: SweepJob, failure: Optional[dict], lines: int = 8) -> list[str]:
    """The last lines of what the failed run wrote: its ``log.txt``, else the job's stderr."""
    candidates = [RunDir(job.run_dir).log_path]
    if failure and failure.get("stderr"):
        candidates.append(Path(failure["stderr"]))
    for path in candidates:
        try:
            text = path.read_text(errors="replace").rstrip().splitlines()
        except OSError:
            continue
        if text:
            return text[-lines:]
    return list((failure or {}).get("traceback", []))[-lines:]


def failure_report(sweep: Sweep, statuses: Sequence[RunStatus]) -> str:
    """Failed runs with their error, the last lines of their log and the command to rerun."""
    out = []
    for s in statuses:
        if s.state != "failed":
            continue
        out.append(f"FAILED {s.job.describe()}  ({s.job.run_dir})")
        out.append(f"  error: {(s.failure or {}).get('error', 'unknown')}")
        for line in log_tail(s.job, s.failure):
            out.append(f"  | {line}")
        out.append(f"  rerun: {sweep.rerun_command(s.job)}")
    return "\n".join(out)


def slurm_states(sweep: Sweep, job_ids: dict, statuses: Sequence[RunStatus]) -> dict:
    """``{run_dir: "4242_3 PENDING"}`` for the runs not done, from SLURM's accounting through
    submitit (one ``sacct`` call per array); the bare id where it cannot be asked."""
    out = dict(job_ids)
    pending = [s for s in statuses if s.state != "done" and str(s.job.run_dir) in job_ids]
    try:
        import submitit

        jobs = {str(s.job.run_dir): submitit.SlurmJob(
            str(sweep.state_dir / "submitit" / "%j"), job_ids[str(s.job.run_dir)])
            for s in pending}
        for key, job in jobs.items():
            out[key] = f"{job_ids[key]} {job.state}"
    except Exception:  # noqa: BLE001 - no submitit or no sacct here: ids only
        pass
    return out


def read_manifests(output: Path) -> list[tuple[Sweep, dict, str]]:
    """The sweeps launched into ``output`` (plan, job ids, launcher), oldest first."""
    folder = Path(output) / ".vlprompt-sweep"
    found = []
    for path in sorted(folder.glob("sweep-*.json"), key=lambda p: p.stat().st_mtime):
        try:
            data = json.loads(path.read_text())
            found.append((Sweep.from_dict(data["sweep"]), data.get("job_ids", {}),
                          data.get("launcher", "")))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a readable sweep manifest ({err}); delete it") from None
    return found
