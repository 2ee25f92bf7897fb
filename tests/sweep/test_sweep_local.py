"""The ``local`` launcher (submitit's local executor, real processes): a sweep of 2 methods × 2
datasets × 2 seeds killed midway and relaunched finishes only what was unfinished and equals an
``inline`` sweep bit for bit; a failing run is reported and the others finish; one run as two
processes; a preempted job is requeued and resumes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from vlprompt.cli import main
from vlprompt.engine.rundir import RunDir

from .conftest import subprocess_env, write_sweep

LOCAL = ["--launcher", "local", "--max-parallel", "2", "--cpus-per-job", "1"]


def _cli(*args: str) -> list:
    return [sys.executable, "-m", "vlprompt.cli", *args]


def _finished(out: Path) -> list:
    """The finished runs under ``out``, polled while the sweep writes: a checkpoint generation
    removed during the walk is a retry, not an error."""
    for _ in range(20):
        try:
            return sorted(p.parent for p in out.rglob("results.json")
                          if RunDir(p.parent).read_results().finished
                          and len(RunDir(p.parent).read_results().evaluations) == 2)
        except FileNotFoundError:
            time.sleep(0.05)
    raise AssertionError(f"{out} kept changing during 20 walks")


def _same_run(a: Path, b: Path) -> None:
    ra, rb = RunDir(a).read_results(), RunDir(b).read_results()
    assert ra.train["loss_history"] == rb.train["loss_history"], a
    for key, ea in ra.evaluations.items():
        eb = rb.evaluations[key]
        assert (ea.accuracy, ea.num_correct, ea.macro_f1) == (eb.accuracy, eb.num_correct,
                                                             eb.macro_f1), (a, key)
        assert ea.extra.get("per_class_accuracy") == eb.extra.get("per_class_accuracy")
    ta = load_file(RunDir(a).latest_generation().tensors)
    tb = load_file(RunDir(b).latest_generation().tensors)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), a


def test_killed_local_sweep_resumes_and_equals_inline(sweep_world, tmp_path):
    sweep = write_sweep(sweep_world, "kill.yaml")
    reference = tmp_path / "inline"
    # in its own process with the jobs' thread environment (one OpenMP/MKL thread): float
    # reductions depend on the threads and on the libraries' start-up configuration
    inline = subprocess.run(_cli("--threads", "1", "sweep", str(sweep), "--output",
                                 str(reference)), env=subprocess_env(), capture_output=True,
                            text=True, timeout=600)
    assert inline.returncode == 0, inline.stderr[-3000:]
    assert len(_finished(reference)) == 8 and (reference / "report.md").is_file()

    out = tmp_path / "local"
    command = _cli("sweep", str(sweep), "--output", str(out), *LOCAL)
    proc = subprocess.Popen(command, env=subprocess_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(_finished(out)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep, its job controllers and the runs
    proc.wait()
    done_before = {d: (d / "results.json").stat().st_mtime_ns for d in _finished(out)}
    assert 2 <= len(done_before) < 8, "the kill must land midway"
    time.sleep(0.5)  # let the killed processes' locks go

    rerun = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert len(_finished(out)) == 8 and (out / "report.md").is_file()
    assert (out / "report.csv").is_file() and list((out / "plots").glob("*.png"))
    for folder, stamp in done_before.items():  # finished runs were not touched again
        assert (folder / "results.json").stat().st_mtime_ns == stamp
        assert "resuming" not in (folder / "log.txt").read_text()
    for folder in _finished(out):
        _same_run(folder, reference / folder.relative_to(out))
    assert "8 run(s): 8 done" in rerun.stdout

    # a third launch has nothing to do and says so
    again = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and "8 run(s): 8 done" in again.stdout
    assert json.loads(next((out / ".vlprompt-sweep").glob("sweep-*.json")).read_text())[
        "launcher"] == "local"


def test_a_failing_run_is_reported_and_the_others_finish(sweep_world, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(sweep_world / "data", data)
    for image in sorted((data / "dtd" / "images").rglob("*.jpg"))[:3]:
        image.unlink()  # DTD lost training images: its runs fail at the start
    sweep = write_sweep(tmp_path, "fail.yaml", root=str(data),
                        backbone=str(sweep_world / "tiny.safetensors"), methods=["coop"],
                        seeds=[1])
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "--output", str(out), *LOCAL]) == 1
    captured = capsys.readouterr()
    eurosat = out / "base2new" / "coop" / "eurosat" / "shots_16" / "seed1"
    dtd = out / "base2new" / "coop" / "dtd" / "shots_16" / "seed1"
    assert RunDir(eurosat).read_results().finished
    assert RunDir(dtd).read_results() is None and not (out / "report.md").exists()
    assert "FAILED base2new coop dtd shots=16 seed=1" in captured.err
    assert "train images are missing" in captured.err
    rerun = next(line for line in captured.err.splitlines() if "rerun:" in line)
    assert "vlprompt run base2new --method coop --datasets dtd --seeds 1" in rerun
    assert "1 run(s) not done" in captured.err

    assert main(["status", str(out)]) == 0
    status = capsys.readouterr().out
    assert "1 failed, 1 done" in status and "train images are missing" in status
    assert "| " in status and "rerun: vlprompt run" in status  # log lines and the command

    # after the data is fixed, the printed command finishes the run and clears the failure
    shutil.rmtree(data / "dtd")
    shutil.copytree(sweep_world / "data" / "dtd", data / "dtd")
    import shlex

    assert main(shlex.split(rerun.split("rerun: ", 1)[1])[1:]) == 0
    assert RunDir(dtd).read_failure() is None
    assert main(["status", str(out)]) == 0
    assert "2 run(s): 2 done" in capsys.readouterr().out


def test_one_run_as_two_processes(sweep_world, tmp_path, capsys):
    """``--tasks-per-node 2``: each task exports submitit's env:// rendezvous and the engine
    joins a gloo process group, as under torchrun (multi-node SLURM runs use the same path)."""
    out = tmp_path / "out"
    assert main(["run", "base2new", "--method", "coop", "--datasets", "eurosat", "--seeds", "1",
                 "--root", str(sweep_world / "data"), "--backbone",
                 str(sweep_world / "tiny.safetensors"), "--output", str(out), "--launcher",
                 "local", "--tasks-per-node", "2", "--cpus-per-job", "1", "train.max_epoch=1",
                 "train.num_workers=0", "train.batch_size=8"]) == 0
    logs = "".join(p.read_text() for p in (out / ".vlprompt-sweep" / "submitit").glob(
        "*_0_log.err"))
    assert "2 processes (torch.distributed gloo, env:// rendezvous" in logs
    results = RunDir(out / "base2new" / "coop" / "eurosat" / "shots_16" / "seed1").read_results()
    assert results.finished
    assert results.evaluations["eurosat/base"].num_images == 15  # every image once
    assert results.evaluations["eurosat/new"].num_images == 15


def test_preempted_job_is_requeued_and_resumes(sweep_world, tmp_path):
    """SLURM sends USR2 before preemption; submitit calls ``RunJob.checkpoint`` and requeues
    the job, which resumes from the newest checkpoint generation."""
    import submitit

    from vlprompt.sweep.job import RunJob
    from vlprompt.sweep.spec import Sweep, plan_sweep, sweep_name

    def plan(out):
        jobs = plan_sweep(["coop"], ["base2new"], out, ["eurosat"], [1], None,
                          overrides=["train.max_epoch=40", "train.num_workers=0",
                                     "train.batch_size=8"])
        return Sweep(sweep_name(jobs), out, str(sweep_world / "data"),
                     str(sweep_world / "tiny.safetensors"), jobs)

    reference = plan(tmp_path / "reference")
    RunJob(reference, reference.jobs[0], threads=1)()

    sweep = plan(tmp_path / "preempted")
    executor = submitit.LocalExecutor(folder=str(tmp_path / "submitit"))
    executor.update_parameters(timeout_min=30)
    job = executor.submit(RunJob(sweep, sweep.jobs[0], threads=1))
    run = RunDir(sweep.jobs[0].run_dir)
    deadline = time.time() + 120
    while run.latest_generation() is None and time.time() < deadline:
        time.sleep(0.01)
    holder = run.holder()
    os.kill(holder["pid"], signal.SIGUSR2)  # what SLURM sends ahead of a preemption
    job.result()
    log = run.log_path.read_text()
    assert "Resuming from" in log and log.count("Finish training") == 1
    stderr = "".join(p.read_text() for p in (tmp_path / "submitit").glob("*_log.err"))
    assert "Requeued job" in stderr
    _same_run(run.path, reference.jobs[0].run_dir)
