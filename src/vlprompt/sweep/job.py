"""One sweep job: bring one run folder to "done" in this process (inline) or in a submitit job
(local processes, SLURM). On preemption or timeout submitit calls ``checkpoint``, which requeues
the same job; the run then resumes from its newest checkpoint generation, so nothing is redone."""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from typing import Optional

from ..engine.rundir import RunDir
from .spec import Sweep, SweepJob

logger = logging.getLogger(__name__)


def _submitit_env() -> Optional[object]:
    """submitit's JobEnvironment when running inside a submitit job, else None."""
    if not any(k.startswith(("SUBMITIT_", "SLURM_JOB_ID")) for k in os.environ):
        return None
    try:
        import submitit

        return submitit.JobEnvironment()
    except (ImportError, RuntimeError):
        return None


class RunJob:
    """Picklable callable: ``RunJob(sweep, job)()`` trains and evaluates one planned run.

    ``threads`` pins torch's CPU threads (parallel CPU jobs share the cores). A job of several
    tasks (``tasks_per_node``/``nodes`` > 1) is one multi-process run: each task exports the
    ``env://`` rendezvous variables (``MASTER_ADDR``, ``RANK``, ``WORLD_SIZE``, ...) from
    submitit's job environment and the engine joins the process group as under ``torchrun``.
    """

    def __init__(self, sweep: Sweep, job: SweepJob, threads: Optional[int] = None):
        self.sweep = sweep
        self.job = job
        self.threads = threads

    def __call__(self, clip=None) -> dict:
        env = _submitit_env()
        if env is not None:
            logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
            if getattr(env, "num_tasks", 1) > 1:
                import submitit

                submitit.helpers.TorchDistributedEnvironment().export(
                    set_cuda_visible_devices=False)
        from ..runtime import configure_threads

        configure_threads(self.threads)
        from ..engine import distributed as D

        started = time.time()
        try:
            results = self._execute(clip)
        except Exception as err:  # recorded for `vlprompt status`, then reported by submitit
            if D.is_main():
                self._record_failure(err, env)
            raise
        if D.is_main():
            from .launch import write_report_if_complete

            write_report_if_complete(self.sweep)
        return {"run_dir": str(self.job.run_dir), "time_s": round(time.time() - started, 2),
                "accuracy": {k: results.accuracy(k) for k in self.job.run.evaluation_keys}}

    def _execute(self, clip):
        import torch.distributed

        from ..clip.load import load_clip
        from ..engine import distributed as D
        from ..protocols import execute_run

        sweep = self.sweep
        if D.init_distributed(sweep.device) and D.is_main():
            logger.info("%s: %d processes (torch.distributed %s, env:// rendezvous at %s:%s)",
                        self.job.describe(), D.world_size(), torch.distributed.get_backend(),
                        os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))
        device = D.default_device(sweep.device)
        if clip is None:
            clip = load_clip(sweep.backbone, device=device)
        return execute_run(self.job.run, sweep.root, sweep.backbone, clip,
                           config_file=sweep.config_file, overrides=self.job.overrides,
                           force=sweep.force, device=device, skip_missing=sweep.skip_missing,
                           tag=self.job.describe())

    def _record_failure(self, err: BaseException, env) -> None:
        text = str(err).strip().splitlines()
        failure = {"error": f"{type(err).__name__}: {text[0] if text else ''}",
                   "traceback": traceback.format_exc().rstrip().splitlines()[-12:],
                   "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        if env is not None:
            try:
                import submitit

                paths = submitit.JobEnvironment().paths
                failure["job_id"] = env.job_id
                failure["stderr"] = str(paths.stderr).replace("%t", str(env.global_rank))
            except (ImportError, RuntimeError, AttributeError):
                pass
        try:
            RunDir(self.job.run_dir).write_failure(failure)
        except OSError as write_err:  # the folder itself is the problem: say so, keep going
            logger.warning("could not record the failure in %s: %s", self.job.run_dir, write_err)

    def checkpoint(self, *args, **kwargs):
        """submitit's preemption/timeout hook: requeue this same job (it resumes from its
        checkpoint generations, so only the steps since the last commit are redone)."""
        import submitit

        return submitit.helpers.DelayedSubmission(RunJob(self.sweep, self.job, self.threads),
                                                  *args, **kwargs)

    def __repr__(self) -> str:
        return f"RunJob({self.job.describe()})"
