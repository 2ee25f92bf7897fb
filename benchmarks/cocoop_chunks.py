"""CoCoOp evaluation throughput: batch 1 (the official setting) vs batched, chunked text passes.

CoCoOp runs the text tower on B x C prompts per batch. The official code evaluates one image at a
time; vlprompt splits the B x C prompts into chunks of ``text_chunk_size``, so a batch of images
shares each text-tower call. This prints images/s for both and their ratio, per class count.

    python benchmarks/cocoop_chunks.py --classes 100 1000 --batch-size 16 --device cuda
    python benchmarks/cocoop_chunks.py --classes 10 --images 4 --iters 1 --small   # quick check

The model is a randomly initialised CLIP with ViT-B/16's shapes (``--small``: a tiny one), so the
figures measure compute only.
"""

from __future__ import annotations

import argparse
import time

import torch

from vlprompt.clip.model import CLIPConfig, build_clip
from vlprompt.methods import build_method

SMALL = CLIPConfig(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=2,
                   vision_heads=2, text_width=64, text_layers=2, text_heads=2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def images_per_second(method, images: torch.Tensor, batch_size: int, iters: int,
                      warmup: int, autocast_dtype) -> float:
    """Evaluate all ``images`` in batches of ``batch_size``; best of ``iters`` timed passes."""
    device = images.device
    best = float("inf")
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype,
                                         enabled=autocast_dtype is not None):
        for i in range(warmup + iters):
            _sync(device)
            start = time.perf_counter()
            for b in range(0, images.shape[0], batch_size):
                method(images[b: b + batch_size])
            _sync(device)
            if i >= warmup:
                best = min(best, time.perf_counter() - start)
    return images.shape[0] / best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--images", type=int, default=16, help="images per timed pass")
    parser.add_argument("--batch-size", type=int, default=16, help="batched evaluation size")
    parser.add_argument("--chunk-size", type=int, default=1024, help="prompts per text-tower call")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--small", action="store_true", help="tiny CLIP instead of ViT-B/16 shapes")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]

    torch.manual_seed(0)
    clip = build_clip(SMALL if args.small else CLIPConfig()).to(device).eval()
    images = torch.randn(args.images, 3, clip.image_size, clip.image_size, device=device)
    print(f"device={device} autocast={args.autocast} images={args.images} "
          f"batch={args.batch_size} chunk={args.chunk_size}")
    print(f"{'classes':>8} {'batch 1 img/s':>14} {'batched img/s':>14} {'ratio':>7}")
    for n_classes in args.classes:
        names = [f"class {i}" for i in range(n_classes)]
        method = build_method("cocoop", clip, names, text_chunk_size=args.chunk_size).eval()
        single = images_per_second(method, images, 1, args.iters, args.warmup, autocast_dtype)
        batched = images_per_second(method, images, args.batch_size, args.iters, args.warmup,
                                    autocast_dtype)
        print(f"{n_classes:>8} {single:>14.2f} {batched:>14.2f} {batched / single:>7.2f}")


if __name__ == "__main__":
    main()
