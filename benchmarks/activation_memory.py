"""Activation memory and step time per method, with and without activation checkpointing
(``train.activation_checkpointing``; issue 13 "Scale"), at ViT-L/14 shapes with random weights.

For each method, one engine training step (``engine.train.make_train_step``) at a small batch,
plain and with checkpointing, reports:

* saved activations: the bytes autograd keeps for backward (unique storages other than the
  model's weights, packed through
  ``torch.autograd.graph.saved_tensors_hooks``; under checkpointing only the block inputs are
  kept) — the figure that scales with batch and decides whether a ViT-L/14 run fits a GPU;
* peak RSS above the start of the step (CPU; sampled, allocator-dependent) or, on CUDA,
  ``max_memory_allocated`` above the start;
* seconds per step (best of ``--steps``);

and the ratios checkpointed / plain. Per-image activation memory times the paper's batch gives
the figure on paper for an 80 GB GPU (``--gpu-gb``).

    OMP_NUM_THREADS=2 python benchmarks/activation_memory.py [--methods coop,maple] \\
        [--shape ViT-L/14] [--batch 1] [--steps 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from vlprompt.bench.measure import (
    _PeakMemory,
    _sync,
    bench_classnames,
    build_bench_method,
    paper_config,
    random_clip,
)
from vlprompt.config import TrainConfig
from vlprompt.engine.train import make_train_step, training_switches
from vlprompt.methods import get_method, list_methods


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward while active."""

    def __init__(self, exclude=()):
        # the frozen weights autograd keeps for the input gradients are not activations
        self.seen: set = {(t.untyped_storage().data_ptr(), t.device) for t in exclude}
        self.bytes = 0

    def pack(self, t: torch.Tensor):
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in self.seen:
                self.seen.add(key)
                self.bytes += t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    @staticmethod
    def unpack(t):
        return t


def measure(name: str, clip, batch: int, steps: int, checkpointing: bool,
            device: torch.device) -> dict:
    config = paper_config(name, [f"train.activation_checkpointing={str(checkpointing).lower()}"])
    train = TrainConfig(**dict(config["train"], batch_size=batch, grad_accum=1, precision="fp32"))
    torch.manual_seed(0)
    method = build_bench_method(name, clip, bench_classnames(10), config).to(device)
    images = torch.randn(batch, 3, clip.image_size, clip.image_size, device=device)
    labels = torch.arange(batch, device=device) % 10
    step = make_train_step(method, train, device)
    with training_switches(train):
        step(images, labels)  # warm-up
        saved = SavedBytes(list(method.parameters()) + list(method.buffers()))
        method.train()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            loss, _ = method.loss(images, labels)
        del loss
        best = float("inf")
        with _PeakMemory(device) as mem:
            for _ in range(steps):
                _sync(device)
                start = time.perf_counter()
                step(images, labels)
                _sync(device)
                best = min(best, time.perf_counter() - start)
    return {"saved_mb": saved.bytes / 2 ** 20, "peak_mb": mem.mb, "step_s": best}


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", help="comma-separated (default: every trainable method)")
    parser.add_argument("--shape", default="ViT-L/14")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gpu-gb", type=float, default=80.0)
    args = parser.parse_args()
    device = torch.device(args.device)
    methods = (args.methods.split(",") if args.methods else
               [m for m in list_methods() if get_method(m).trainable])
    clip = random_clip(args.shape, device)
    print(f"{args.shape} (random weights), batch {args.batch}, fp32, {device}, "
          f"{torch.get_num_threads()} threads")
    header = (f"{'method':10s} {'saved MiB':>10s} {'ckpt':>8s} {'ratio':>6s} {'peak MiB':>9s} "
              f"{'ckpt':>8s} {'ratio':>6s} {'step s':>7s} {'ckpt':>7s} {'ratio':>6s} "
              f"{'paper batch':>11s} {'GB/batch':>9s} {'ckpt GB':>8s}")
    print(header)
    for name in methods:
        try:
            plain = measure(name, clip, args.batch, args.steps, False, device)
            ckpt = measure(name, clip, args.batch, args.steps, True, device)
        except Exception as err:  # noqa: BLE001 - report and go on
            print(f"{name:10s} error: {type(err).__name__}: {str(err)[:80]}")
            continue
        paper_batch = int(paper_config(name)["train"]["batch_size"])
        per_image = plain["saved_mb"] / args.batch / 1024
        per_image_ckpt = ckpt["saved_mb"] / args.batch / 1024
        print(f"{name:10s} {plain['saved_mb']:10.0f} {ckpt['saved_mb']:8.0f} "
              f"{_ratio(ckpt['saved_mb'], plain['saved_mb']):6.2f} {plain['peak_mb']:9.0f} "
              f"{ckpt['peak_mb']:8.0f} {_ratio(ckpt['peak_mb'], plain['peak_mb']):6.2f} "
              f"{plain['step_s']:7.2f} {ckpt['step_s']:7.2f} "
              f"{_ratio(ckpt['step_s'], plain['step_s']):6.2f} {paper_batch:11d} "
              f"{per_image * paper_batch:9.1f} {per_image_ckpt * paper_batch:8.1f}", flush=True)
    print(f"GB/batch: saved activations per image x the paper's batch (weights and the "
          f"optimiser add little: prompts only); compare with {args.gpu_gb:.0f} GB.")


if __name__ == "__main__":
    main()
