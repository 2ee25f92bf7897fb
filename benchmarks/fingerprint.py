"""Backbone fingerprint cost on ViT-B/16 shapes: cold (hash every byte), cached (the model's
snapshot matches), recompute (what training's final check pays), and the legacy float-sum
checksum it replaces. Random weights; fp32 (~150M parameters, ~600 MB).

    python benchmarks/fingerprint.py [--threads 1] [--dtype fp32|bf16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from vlprompt.clip.fingerprint import backbone_fingerprint, legacy_state_checksum
from vlprompt.clip.model import CLIPConfig, build_clip


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Fastest wall time of ``repeats`` calls, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clip = build_clip(CLIPConfig()).requires_grad_(False)  # CLIPConfig() is ViT-B/16
    if args.dtype == "bf16":
        clip = clip.to(torch.bfloat16)
    params = sum(t.numel() for t in clip.state_dict().values())
    nbytes = sum(t.numel() * t.element_size() for t in clip.state_dict().values())
    print(f"ViT-B/16 shapes: {params / 1e6:.1f}M parameters, {nbytes / 2**20:.0f} MiB "
          f"({args.dtype}), {torch.get_num_threads()} thread(s)")
    cold = best_of(lambda: backbone_fingerprint(clip, recompute=True), args.repeats)
    cached = best_of(lambda: backbone_fingerprint(clip), max(args.repeats, 100))
    legacy = best_of(lambda: legacy_state_checksum(clip), args.repeats)
    print(f"backbone_fingerprint cold/recompute: {cold * 1e3:8.1f} ms "
          f"({nbytes / 2**30 / cold:.2f} GiB/s)")
    print(f"backbone_fingerprint cached:         {cached * 1e3:8.3f} ms")
    print(f"legacy_state_checksum:               {legacy * 1e3:8.1f} ms")
    print(f"fingerprint: {backbone_fingerprint(clip)}")


if __name__ == "__main__":
    main()
