"""Sweep launchers side by side on one synthetic sweep: wall time of ``inline`` (one process, runs
one after another), ``local`` with one process at a time (the per-run cost of a process: Python
and torch import, backbone load, submitit's pickles) and ``local`` with N processes (the
speed-up). Every sweep starts from empty folders and its results are checked identical.

    python benchmarks/sweep_overhead.py                  # 2 methods x 2 datasets x 2 seeds
    python benchmarks/sweep_overhead.py --parallel 4 --epochs 10

Prints the figures and the ratios; ``--json FILE`` also writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def make_world(folder: Path, width: int, images_per_class: int) -> None:
    import torch

    from vlprompt.clip.load import save_clip
    from vlprompt.clip.model import CLIPConfig, build_clip
    from vlprompt.data.synthetic import write_dataset

    torch.manual_seed(0)
    clip = build_clip(CLIPConfig(embed_dim=64, image_size=64, patch_size=16, vision_width=width,
                                 vision_layers=4, vision_heads=width // 64, text_width=width,
                                 text_layers=4, text_heads=width // 64))
    save_clip(clip, folder / "clip.safetensors")
    for name in ("eurosat", "dtd"):
        write_dataset(folder / "data", name, images_per_class=images_per_class, image_size=64)


def run_sweep(folder: Path, output: str, launcher: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "VLPROMPT_CACHE": str(folder / "cache")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vlprompt.cli", "--threads", str(threads),
                           "sweep", str(folder / "sweep.yaml"), "--output", str(folder / output),
                           *launcher], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{output} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return wall


def results(folder: Path) -> dict:
    out = {}
    for path in sorted(folder.rglob("results.json")):
        data = json.loads(path.read_text())
        out[str(path.parent.relative_to(folder))] = (
            data["train"]["loss_history"],
            {k: v["num_correct"] for k, v in data["evaluations"].items()})
    return out


def main() -> None:
    from vlprompt.runtime import physical_cores

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parallel", type=int, default=max(2, physical_cores()))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--images-per-class", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vlprompt-sweep-bench-") as tmp:
        folder = Path(tmp)
        make_world(folder, args.width, args.images_per_class)
        spec = {"root": "data", "backbone": "clip.safetensors", "methods": ["coop", "kgcoop"],
                "protocols": ["base2new"], "datasets": ["eurosat", "dtd"], "seeds": [1, 2],
                "overrides": [f"train.max_epoch={args.epochs}", "train.num_workers=0",
                              "train.batch_size=8"]}
        (folder / "sweep.yaml").write_text(yaml.safe_dump(spec))
        runs = 8
        # every mode gets the same threads per run, so results are bit-identical across modes
        inline = run_sweep(folder, "inline", [], 1)
        local1 = run_sweep(folder, "local1", ["--launcher", "local", "--max-parallel", "1",
                                              "--cpus-per-job", "1"], 1)
        localn = run_sweep(folder, "localn", ["--launcher", "local", "--max-parallel",
                                              str(args.parallel), "--cpus-per-job", "1"], 1)
        again = run_sweep(folder, "localn", ["--launcher", "local", "--max-parallel",
                                             str(args.parallel), "--cpus-per-job", "1"], 1)
        same = results(folder / "inline") == results(folder / "local1") == \
            results(folder / "localn")
    figures = {
        "runs": runs, "parallel": args.parallel, "cores": physical_cores(),
        "inline_s": round(inline, 2), "local_1_process_s": round(local1, 2),
        f"local_{args.parallel}_processes_s": round(localn, 2),
        "overhead_per_run_s": round((local1 - inline) / runs, 2),
        "relaunch_of_a_finished_sweep_s": round(again, 2),
        "speedup_local_n_over_inline": round(inline / localn, 2),
        "speedup_local_n_over_local_1": round(local1 / localn, 2),
        "results_identical": same}
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
