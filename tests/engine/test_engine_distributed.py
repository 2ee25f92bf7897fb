"""``torchrun --nproc_per_node 2`` on CPU (gloo): training runs, evaluation counts every test
image once and matches a single-process evaluation of the same checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import vlprompt
from vlprompt.engine import evaluate_run
from vlprompt.engine.rundir import RunDir

SCRIPT = """
import sys, json
import torch
torch.set_num_threads(1)
from vlprompt.engine import run_experiment, evaluate_run
from vlprompt.engine import distributed as D
clip_path, data, run_dir = sys.argv[1:4]
res = run_experiment("coop", "eurosat", data, clip_path, run_dir, shots=8, seed=1, subsample="base",
                     overrides=["max_epoch=2", "batch_size=8", "num_workers=0", "n_ctx=4",
                                "eval_batch_size=4"], show_progress=False)
new = evaluate_run(run_dir, "eurosat", data, subsample="new")
assert D.world_size() == 2, D.world_size()
# one file per rank: the ranks' stdout streams interleave
with open(f"{run_dir}.rank{D.rank()}.json", "w") as f:
    json.dump({"base": res["evaluations"]["eurosat/base"]["num_correct"], "new": new["num_correct"]}, f)
"""


def test_torchrun_two_processes_on_cpu(world, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    run_dir = tmp_path / "run"
    src = str(Path(vlprompt.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(world.clip_path), str(world.data), str(run_dir)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    per_rank = [json.loads(Path(f"{run_dir}.rank{r}.json").read_text()) for r in range(2)]
    assert per_rank[0] == per_rank[1]  # every rank holds the gathered metrics

    results = json.loads((run_dir / "results.json").read_text())
    assert results["train"]["finished"] and len(results["train"]["loss_history"]) == 2
    log = (run_dir / "log.txt").read_text()
    assert log.count("=> result") == 1 and log.count("Finish training") == 1  # rank 0 only
    new_log = RunDir(run_dir).evaluation_log_path("eurosat", "new")
    assert new_log.read_text().count("=> result") == 1
    for subsample in ("base", "new"):
        dist_entry = results["evaluations"][f"eurosat/{subsample}"]
        assert dist_entry["num_images"] == 25  # odd: no padding, no double counting
        single = evaluate_run(run_dir, "eurosat", world.data, subsample=subsample, clip=world.clip)
        for key in ("num_images", "num_correct", "accuracy", "macro_f1", "per_class_accuracy"):
            assert single[key] == dist_entry[key], key
