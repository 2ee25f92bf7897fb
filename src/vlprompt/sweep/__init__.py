"""Sweeps: many protocol runs planned together and executed inline, as local processes or as a
SLURM job array through submitit (``vlprompt sweep``, ``vlprompt run --launcher``,
``vlprompt status``)."""

from .launch import LaunchOptions, launch
from .spec import Sweep, SweepJob, load_sweep_file, plan_sweep

__all__ = ["LaunchOptions", "Sweep", "SweepJob", "launch", "load_sweep_file", "plan_sweep"]
