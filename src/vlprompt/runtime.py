"""CPU defaults chosen from the machine: torch threads and DataLoader workers.

torch's default thread count is every logical CPU the OS reports, which thrashes on shared or
SMT machines, and a fixed ``num_workers=4`` makes PyTorch warn on 2-core machines. These helpers
count what this process may actually use (affinity mask, cgroup CPU quota, physical cores) and
split it between the ranks torchrun starts on one node.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

_CPUINFO = Path("/proc/cpuinfo")
_SMT_ACTIVE = Path("/sys/devices/system/cpu/smt/active")
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
#: DataLoader workers beyond this rarely help decoding small images, and cost memory
MAX_WORKERS = 4


def _affinity() -> Optional[set[int]]:
    """CPUs this process may run on, or None where the OS does not say (macOS, Windows)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return None


def _cgroup_quota() -> Optional[int]:
    """CPUs a cgroup v2 quota allows (``cpu.max``: "quota period"), rounded up; None: no limit."""
    try:
        quota, period = _CGROUP_CPU_MAX.read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """Logical CPUs this process may use: the affinity mask, capped by a cgroup CPU quota."""
    cpus = _affinity()
    n = len(cpus) if cpus else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1, min(n, quota) if quota else n)


def _cpuinfo_cores(cpus: Optional[set[int]]) -> Optional[int]:
    """Distinct (physical id, core id) pairs among ``cpus`` (all if None); None without topology."""
    try:
        text = _CPUINFO.read_text()
    except OSError:
        return None
    cores = set()
    for block in text.split("\n\n"):
        fields = {k.strip(): v.strip() for k, _, v in
                  (line.partition(":") for line in block.splitlines()) if k.strip()}
        if "processor" not in fields or "core id" not in fields:
            continue
        try:
            if cpus is None or int(fields["processor"]) in cpus:
                cores.add((fields.get("physical id", "0"), fields["core id"]))
        except ValueError:
            continue
    return len(cores) or None


def _smt_active() -> bool:
    try:
        return _SMT_ACTIVE.read_text().strip() == "1"
    except OSError:
        return False


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use (hyper-threads share one core's
    arithmetic units, so more torch threads than cores only adds contention)."""
    cpus = _affinity()
    cores = _cpuinfo_cores(cpus)
    if cores is None:
        n = len(cpus) if cpus else (os.cpu_count() or 1)
        cores = n // 2 if _smt_active() else n
    return max(1, min(cores, usable_cpus()))


def local_world_size() -> int:
    """Processes torchrun started on this node (``LOCAL_WORLD_SIZE``), 1 outside torchrun."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _omp_threads() -> Optional[int]:
    """``OMP_NUM_THREADS`` when it is a positive integer (the first level of a nested list)."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        logger.warning("ignoring OMP_NUM_THREADS=%r (not a positive integer)", value)
        return None
    return n


def default_threads() -> int:
    """Threads for this process: ``OMP_NUM_THREADS`` if valid, else its share of the physical
    cores (divided between the ranks torchrun started on this node)."""
    omp = _omp_threads()
    if omp is not None:
        return omp
    return max(1, physical_cores() // local_world_size())


def configure_threads(threads: Optional[int] = None) -> int:
    """Set torch's intra-op threads: ``threads`` if given, else ``default_threads()``. Returns n."""
    import torch

    if threads is not None and threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads}")
    n = threads if threads is not None else default_threads()
    torch.set_num_threads(n)
    return n


def default_num_workers() -> int:
    """DataLoader workers: one CPU per process is left for the main loop, at most MAX_WORKERS
    (a 2-core machine gets 1, never PyTorch's "suggested max number of worker" warning)."""
    per_process = max(1, usable_cpus() // local_world_size())
    return max(0, min(MAX_WORKERS, per_process - 1))


def resolve_num_workers(value: Optional[int]) -> int:
    """``num_workers`` from a config: None or negative means "choose from the machine"."""
    return default_num_workers() if value is None or value < 0 else value


_MEMINFO = Path("/proc/meminfo")
#: free memory assumed where the OS does not say (macOS, Windows without psutil)
_UNKNOWN_FREE_BYTES = 4 * 2 ** 30


def free_memory_bytes(device) -> int:
    """Memory a computation on ``device`` can still allocate: the GPU's free memory
    (``torch.cuda.mem_get_info``) or the host's ``MemAvailable`` (/proc/meminfo); 4 GiB where
    neither can be read."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return _UNKNOWN_FREE_BYTES
