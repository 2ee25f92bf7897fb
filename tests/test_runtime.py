"""Thread and worker defaults follow the CPUs this process may use, not the machine's count."""

import os

import pytest
import torch

from vlprompt import runtime

# two sockets x two cores x two hyper-threads
CPUINFO = "\n\n".join(f"processor\t: {cpu}\nphysical id\t: {cpu // 4}\ncore id\t\t: {cpu % 4 // 2}"
                      for cpu in range(8)) + "\n"


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """Set the affinity mask, /proc/cpuinfo, SMT flag and cgroup quota the helpers see."""
    def set_machine(cpus, cpuinfo=CPUINFO, smt=None, quota=None):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(cpus), raising=False)
        monkeypatch.setattr(runtime, "_CPUINFO", tmp_path / "cpuinfo")
        monkeypatch.setattr(runtime, "_SMT_ACTIVE", tmp_path / "smt")
        monkeypatch.setattr(runtime, "_CGROUP_CPU_MAX", tmp_path / "cpu.max")
        if cpuinfo is not None:
            (tmp_path / "cpuinfo").write_text(cpuinfo)
        if smt is not None:
            (tmp_path / "smt").write_text(smt)
        if quota is not None:
            (tmp_path / "cpu.max").write_text(quota)
    for var in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    return set_machine


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_physical_cores_counts_core_pairs_within_affinity(machine):
    machine(range(8))
    assert runtime.physical_cores() == 4  # 2 sockets x 2 cores
    machine({0, 1, 2, 3})  # socket 0 only: two cores, each with two threads
    assert runtime.physical_cores() == 2
    machine({0, 1})  # both hyper-threads of one core
    assert runtime.physical_cores() == 1


def test_physical_cores_without_topology_halves_only_with_smt(machine):
    machine(range(8), cpuinfo="processor\t: 0\nBogoMIPS\t: 50\n", smt="1")
    assert runtime.physical_cores() == 4
    machine(range(8), cpuinfo=None, smt="0")
    assert runtime.physical_cores() == 8


def test_cgroup_quota_caps_usable_cpus(machine):
    machine(range(8), quota="150000 100000\n")
    assert runtime.usable_cpus() == 2
    assert runtime.physical_cores() == 2
    machine(range(8), quota="max 100000\n")
    assert runtime.usable_cpus() == 8


def test_configure_threads_precedence(machine, monkeypatch):
    machine(range(8))
    assert runtime.configure_threads() == 4 == torch.get_num_threads()  # physical cores
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.configure_threads() == 3 == torch.get_num_threads()
    assert runtime.configure_threads(2) == 2 == torch.get_num_threads()  # explicit wins
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    assert runtime.configure_threads() == 4  # invalid value is ignored
    with pytest.raises(ValueError, match="positive"):
        runtime.configure_threads(0)


def test_configure_threads_splits_cores_under_torchrun(machine, monkeypatch):
    machine(range(8))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.configure_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert runtime.configure_threads() == 1


def test_default_num_workers(machine, monkeypatch):
    machine({0, 1})
    assert runtime.default_num_workers() == 1  # 2 CPUs: never PyTorch's "max 2 workers" warning
    machine({0})
    assert runtime.default_num_workers() == 0
    machine(range(16))
    assert runtime.default_num_workers() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 CPUs per rank
    assert runtime.default_num_workers() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert runtime.default_num_workers() == 0


def test_resolve_num_workers(machine):
    machine({0, 1, 2})
    assert runtime.resolve_num_workers(None) == 2
    assert runtime.resolve_num_workers(-1) == 2
    assert runtime.resolve_num_workers(0) == 0
    assert runtime.resolve_num_workers(7) == 7
