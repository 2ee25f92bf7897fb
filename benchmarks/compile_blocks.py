"""``train.compile=true`` vs eager: the engine's training step, side by side in one process.

Each method is built twice on one random-weight CLIP (``vlprompt bench``'s ``_Case``: the real
``make_train_step``), once with ``train.compile=true`` (``torch.compile`` of the towers'
transformer blocks, ``perf.SWITCHES.compile_blocks``), and the two are timed in interleaved
rounds (best round kept). The first compiled steps include compilation: reported apart.

    OMP_NUM_THREADS=2 python benchmarks/compile_blocks.py --methods coop,maple --shape ViT-B/16
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from vlprompt.bench.measure import BenchSetting, _Case, random_clip

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="coop,maple")
    parser.add_argument("--shape", default="ViT-B/16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    clip = random_clip(args.shape, device)
    print(f"{'method':10s} {'eager img/s':>12s} {'compiled img/s':>15s} {'×':>6s} "
          f"{'compile s':>10s}")
    for name in args.methods.split(","):
        base = dict(shape=args.shape, device=args.device, batch=args.batch, steps=args.steps,
                    rounds=args.rounds, flops=False)
        eager = _Case(name, BenchSetting(**base), clip, reference=False)
        compiled = _Case(name, BenchSetting(**base, overrides=("train.compile=true",)), clip,
                         reference=False)
        start = time.perf_counter()
        compiled.train_round(warmup=2)  # compilation happens in the warm-up steps
        first = time.perf_counter() - start
        eager.train_round(warmup=1)
        for _ in range(args.rounds - 1):
            compiled.train_round(warmup=0)
            eager.train_round(warmup=0)
        e = eager.out["train_images_per_s"]
        c = compiled.out["train_images_per_s"]
        compile_s = first - 2 * args.batch / c - args.steps * args.batch / c
        print(f"{name:10s} {e:12.2f} {c:15.2f} {c / e:6.2f} {max(compile_s, 0.0):10.1f}",
              flush=True)


if __name__ == "__main__":
    main()
