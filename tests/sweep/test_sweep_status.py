"""Run states read from the folders alone: to do, partial (a checkpoint), running (the lock is
held, with epoch and ETA from progress.json), failed (failure.json), done."""

import subprocess
import sys
import time

from vlprompt.engine.rundir import RunDir
from vlprompt.sweep.status import collect, fmt_seconds, summary_line, sweep_eta
from vlprompt.sweep.spec import plan_sweep

HOLD = """
import sys, time
from vlprompt.engine.rundir import RunDir
RunDir(sys.argv[1]).lock()
print("locked", flush=True)
time.sleep(60)
"""


def test_states_from_the_folders(tmp_path):
    jobs = plan_sweep(["coop"], ["fewshot"], tmp_path, ["eurosat"], [1, 2, 3, 4], [4])
    todo, partial, running, failed = (RunDir(j.run_dir) for j in jobs)
    partial.commit({}, {"epoch": 3, "max_epoch": 10})
    failed.path.mkdir(parents=True)
    failed.write_failure({"error": "FileNotFoundError: images missing"})
    running.write_progress({"epoch": 4, "max_epoch": 10, "step": 7, "steps_per_epoch": 20,
                            "eta_s": 120.0})
    assert running.holder() is None
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(running.path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        info = running.holder()
        assert info is not None and info["pid"] == holder.pid
        statuses = {s.job.run_dir: s for s in collect(jobs)}
    finally:
        holder.kill()
        holder.wait()
    assert statuses[todo.path].state == "to do"
    assert (statuses[partial.path].state, statuses[partial.path].progress) == (
        "partial", "epoch 3/10")
    row = statuses[running.path]
    assert (row.state, row.progress) == ("running", "epoch 5/10, step 7/20")
    assert 100 < row.eta_s <= 120
    assert statuses[failed.path].state == "failed"
    assert "images missing" in statuses[failed.path].failure["error"]
    time.sleep(0.1)
    assert running.holder() is None  # the OS released the dead holder's lock
    assert summary_line(list(statuses.values())).startswith(
        "4 run(s): 1 running, 1 failed, 1 partial, 1 to do")


def test_sweep_eta_from_finished_runs():
    class S:
        def __init__(self, state, t=None, eta=None):
            self.state, self.train_time_s, self.eta_s = state, t, eta

    done = [S("done", 100.0), S("done", 300.0)]
    assert sweep_eta(done + [S("to do"), S("to do")], parallel=2) == 200.0
    assert sweep_eta(done + [S("running", eta=50.0), S("to do")], parallel=1) == 250.0
    assert sweep_eta([S("to do")], parallel=1) is None
    assert fmt_seconds(3725) == "1:02:05" and fmt_seconds(65) == "1:05"
