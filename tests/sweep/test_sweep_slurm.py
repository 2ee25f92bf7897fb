"""The ``slurm`` launcher without a cluster: fake ``sbatch``/``srun`` on PATH record what
submitit submits, so the job array, its resources and the pickled jobs can be checked."""

import json
import os
import re
from pathlib import Path

import pytest

from vlprompt.cli import main

from .conftest import write_sweep

FAKE_SBATCH = """#!/bin/sh
script="$(eval echo \\${$#})"
cp "$script" "{calls}/script.$$.sh"
echo "Submitted batch job 4242"
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.replace("{calls}", str(calls)))
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


def _sbatch_options(calls: Path) -> dict:
    scripts = sorted(calls.glob("script.*.sh"))
    assert len(scripts) == 1, "one submission (one array)"
    text = scripts[0].read_text()
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", text, re.M)), text


def test_sweep_is_one_job_array_with_the_resources(sweep_world, tmp_path, fake_slurm, capsys):
    import submitit

    out = tmp_path / "out"
    sweep = write_sweep(sweep_world, "slurm.yaml")
    assert main(["sweep", str(sweep), "--output", str(out), "--launcher", "slurm",
                 "--max-parallel", "3", "--gpus-per-job", "2", "--cpus-per-job", "8",
                 "--mem", "64G", "--time", "1:30:00", "--partition", "gpu", "--account",
                 "lab", "--slurm", "qos=high", "--slurm", "constraint=a100"]) == 0
    assert "submitted 8 job(s) as SLURM array 4242" in capsys.readouterr().out
    options, script = _sbatch_options(fake_slurm)
    assert options["array"] == "0-7%3"  # 8 runs, at most 3 at once
    assert (options["partition"], options["account"], options["mem"]) == ("gpu", "lab", "64G")
    assert (options["time"], options["cpus-per-task"], options["gpus-per-node"]) == (
        "90", "8", "2")
    assert (options["nodes"], options["ntasks-per-node"]) == ("1", "1")
    assert (options["qos"], options["constraint"]) == ("high", "a100")
    assert options["signal"].startswith("USR2@")  # preemption warning -> requeue
    assert "submitit.core._submit" in script
    assert "export OMP_NUM_THREADS=8 MKL_NUM_THREADS=8" in script  # the job's thread pools

    # each array task holds the RunJob of one planned run, in plan order
    pickles = sorted((out / ".vlprompt-sweep" / "submitit").glob("4242_*/*_submitted.pkl"),
                     key=lambda p: int(p.parent.name.split("_")[1]))
    jobs = [submitit.core.utils.DelayedSubmission.load(p).function for p in pickles]
    assert [j.job.run_dir for j in jobs] == [
        out / "base2new" / m / d / "shots_16" / f"seed{s}"
        for m in ("coop", "kgcoop") for d in ("eurosat", "dtd") for s in (1, 2)]
    assert all(hasattr(j, "checkpoint") for j in jobs)  # requeued on preemption
    manifest = json.loads(next((out / ".vlprompt-sweep").glob("sweep-*.json")).read_text())
    assert manifest["launcher"] == "slurm" and len(manifest["job_ids"]) == 8
    assert sorted(manifest["job_ids"].values()) == sorted(f"4242_{i}" for i in range(8))

    assert main(["status", str(out)]) == 0  # nothing ran yet: all to do, with the job ids
    status = capsys.readouterr().out
    assert "8 run(s): 8 to do" in status and "4242_7" in status

    # with SLURM's accounting on PATH, status shows each array task's state
    sacct = fake_slurm.parent / "bin" / "sacct"
    sacct.write_text("#!/bin/sh\necho 'JobID|State|NodeList'\n"
                     "echo '4242_0|RUNNING|node1'\necho '4242_[1-7]|PENDING|None assigned'\n")
    sacct.chmod(0o755)
    assert main(["status", str(out)]) == 0
    status = capsys.readouterr().out
    assert "4242_0 RUNNING" in status and "4242_7 PENDING" in status


def test_one_large_run_on_two_nodes(sweep_world, tmp_path, fake_slurm, capsys):
    out = tmp_path / "out"
    assert main(["run", "base2new", "--method", "coop", "--datasets", "eurosat", "--seeds", "1",
                 "--root", str(sweep_world / "data"), "--backbone",
                 str(sweep_world / "tiny.safetensors"), "--output", str(out),
                 "--launcher", "slurm", "--nodes", "2", "--gpus-per-node", "8",
                 "--time", "2-00:00:00"]) == 0
    options, _ = _sbatch_options(fake_slurm)
    assert "array" not in options  # one job
    assert (options["nodes"], options["ntasks-per-node"], options["gpus-per-node"]) == (
        "2", "8", "8")
    assert options["time"] == str(2 * 24 * 60)


def test_finished_runs_are_not_submitted(sweep_world, tmp_path, fake_slurm, capsys):
    out = tmp_path / "out"
    base = ["run", "base2new", "--method", "coop", "--datasets", "eurosat", "--seeds", "1,2",
            "--root", str(sweep_world / "data"), "--backbone",
            str(sweep_world / "tiny.safetensors"), "--output", str(out), "train.max_epoch=1",
            "train.num_workers=0", "train.batch_size=8"]
    assert main(base + ["--seeds", "1"]) == 0  # inline: seed 1 done
    assert main(base + ["--launcher", "slurm"]) == 0
    assert "submitted 1 job(s)" in capsys.readouterr().out
    options, _ = _sbatch_options(fake_slurm)
    assert "array" not in options
