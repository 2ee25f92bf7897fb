"""SIGKILL a training run at random instants and check that every resume ends bit-identical.

    python benchmarks/kill_resume.py --trials 20

A tiny random CLIP trains CoOp for a few epochs with a checkpoint commit after every step (so
kills land inside commits often). Each trial starts the run, kills it (SIGKILL, no clean-up) at a
uniformly random time within the reference run's duration, reruns the same command until it
finishes (resuming), and compares the final learned tensors with an uninterrupted run's.
Prints the number of trials, how many were killed mid-run, and how many matched bit for bit.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = r"""
import sys, torch
from torch.utils.data import TensorDataset
from vlprompt import load_clip
from vlprompt.config import TrainConfig
from vlprompt.engine import train_method
from vlprompt.methods import build_method
torch.set_num_threads(1)
clip = load_clip(sys.argv[1])
g = torch.Generator().manual_seed(0)
y = torch.arange(3).repeat_interleave(8)
x = torch.randn(3, 3, 32, 32, generator=g)[y] + 0.3 * torch.randn(24, 3, 32, 32, generator=g)
data = TensorDataset(x, y)
torch.manual_seed(0)
coop = build_method("coop", clip, ["forest", "river", "highway"], n_ctx=4)
config = TrainConfig(max_epoch=6, lr=0.01, batch_size=4, num_workers=0, print_freq=1000,
                     checkpoint_every_steps=1, checkpoint_every_minutes=0)
print("start", flush=True)
train_method(coop, data, config, run_dir=sys.argv[2], show_progress=False)
torch.save(coop.ctx.detach(), sys.argv[3])
"""


def _run_to_end(cmd: list, env: dict) -> float:
    """Run ``cmd`` to completion; seconds from its "start" line to its exit."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    start = time.time()
    if proc.wait() != 0:
        raise SystemExit(f"worker failed: {cmd}")
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch

    from vlprompt.clip.load import save_clip
    from vlprompt.clip.model import CLIPConfig, build_clip

    rng = random.Random(args.seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        clip = build_clip(CLIPConfig(embed_dim=32, image_size=32, patch_size=8, vision_width=64,
                                     vision_layers=2, vision_heads=2, text_width=64, text_layers=2,
                                     text_heads=2))
        weights = save_clip(clip, tmp / "tiny.safetensors")
        duration = _run_to_end([sys.executable, "-c", WORKER, str(weights), str(tmp / "ref"),
                                str(tmp / "ref.pt")], env)
        reference = torch.load(tmp / "ref.pt")
        killed = identical = 0
        for trial in range(args.trials):
            folder, out = tmp / f"run{trial}", tmp / f"out{trial}.pt"
            cmd = [sys.executable, "-c", WORKER, str(weights), str(folder), str(out)]
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
            proc.stdout.readline()  # training starts: kill somewhere within it
            time.sleep(rng.uniform(0.0, duration))
            if proc.poll() is None:
                proc.kill()
                killed += 1
            proc.wait()
            _run_to_end(cmd, env)
            identical += bool(torch.equal(torch.load(out), reference))
        print(f"reference run: {duration:.1f}s; trials {args.trials}, killed mid-run {killed}, "
              f"bit-identical after resume {identical}/{args.trials}")


if __name__ == "__main__":
    main()
