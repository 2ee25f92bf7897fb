"""Data-pipeline throughput: plain decode vs JPEG draft decode vs the uint8 image cache.

Writes photo-like JPEGs (gradients, smooth texture, shapes, noise; quality 90) at each
resolution to a temporary folder, then measures images/s of the train transform
(RandomResizedCrop + flip) and of the test transform (resize + centre crop) for: plain decode,
``fast_decode`` (Pillow draft mode), and the image cache (cold: the pass that fills it; warm:
the next pass), each through ``torch.utils.data.DataLoader`` with 0 and 2 workers
(``persistent_workers``, ``prefetch_factor=2``, pinned memory only with CUDA). Every loader runs
three passes; plain, fast and warm report the faster of the last two (steady state), cold the first,
compared with plain's first (both include starting the workers). Then prints the mean and max
|difference| of the normalised tensors vs plain, same images and seeds, and the share of the
images draft mode actually reduces.

    python benchmarks/data_pipeline.py [--images 64] [--resolutions 500x375,1600x1200]
                                       [--size 224] [--workers 0,2] [--batch 16]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vlprompt.data.image_cache import ImageCache
from vlprompt.data.transforms import build_transform, decode_image

VARIANTS = ("plain", "fast", "cache")


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A JPEG-realistic test picture: a colour gradient, smooth texture, a few hard-edged shapes
    and sensor-like noise (flat or pure-noise images decode and resize unrealistically)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)  # [H,W] each
    u, v = xx / width, yy / height
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(angle) * u + np.sin(angle) * v)[..., None]  # [H,W,1]
    low, high = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    img = low + (high - low) * (ramp - ramp.min()) / (np.ptp(ramp) + 1e-6)  # [H,W,3]
    for _ in range(4):  # smooth texture of random frequency (periods 1/3 .. 1/40 of the frame)
        fx, fy = rng.uniform(3, 40, size=2)
        phase = rng.uniform(0, 2 * math.pi)
        img += rng.uniform(5, 20) * np.sin(2 * math.pi * (fx * u + fy * v) + phase)[..., None]
    for _ in range(6):  # ellipses: hard edges
        cx, cy, rx, ry = rng.uniform(0, 1, size=4) * [1, 1, 0.25, 0.25] + [0, 0, 0.03, 0.03]
        inside = ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 < 1  # [H,W]
        img[inside] = 0.3 * img[inside] + 0.7 * rng.uniform(0, 255, size=3)
    img += rng.normal(0, 5, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def write_images(folder: Path, resolution: Tuple[int, int], count: int) -> List[str]:
    paths = []
    for i in range(count):
        path = folder / f"{resolution[0]}x{resolution[1]}_{i:04d}.jpg"
        photo_like(*resolution, seed=i).save(path, "JPEG", quality=90)
        paths.append(str(path))
    return paths


class PathDataset(Dataset):
    """``paths[i] -> transform(path)``: the engine's ``ImageDataset`` without labels."""

    def __init__(self, paths: Sequence[str], transform: Callable):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.paths[index])  # [3,S,S]


def make_transform(train: bool, variant: str, size: int, cache_root: Optional[Path]):
    cache = ImageCache(size, root=cache_root) if variant == "cache" else None
    return build_transform(train, size, fast_decode=variant == "fast", cache=cache)


def loader_rates(paths: Sequence[str], transform: Callable, workers: int, batch: int
                 ) -> Tuple[float, float]:
    """Images/s of one DataLoader's first pass and of its steady state (the faster of passes 2
    and 3: shared cores are noisy); the workers persist between passes."""
    loader = DataLoader(PathDataset(paths, transform), batch_size=batch, shuffle=False,
                        num_workers=workers, persistent_workers=workers > 0,
                        prefetch_factor=2 if workers > 0 else None,
                        pin_memory=torch.cuda.is_available())
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in loader:
            pass
        rates.append(len(paths) / (time.perf_counter() - start))
    del loader  # stops the persistent workers
    return rates[0], max(rates[1:])


def throughput_row(paths: Sequence[str], train: bool, size: int, workers: int, batch: int,
                   scratch: Path) -> Dict[str, float]:
    row = {}
    for variant in VARIANTS:
        cache_root = Path(tempfile.mkdtemp(dir=scratch, prefix="cache-"))
        first, second = loader_rates(paths, make_transform(train, variant, size, cache_root),
                                   workers, batch)
        if variant == "cache":
            row["cold"], row["warm"] = first, second
        else:
            row[variant], row[f"{variant}_first"] = second, first
    return row


def pixel_differences(paths: Sequence[str], train: bool, size: int, scratch: Path
                      ) -> Dict[str, Tuple[float, float]]:
    """(mean, max) |normalised difference| of fast and cache vs plain, same per-image seeds."""
    outputs: Dict[str, torch.Tensor] = {}
    for variant in VARIANTS:
        cache_root = Path(tempfile.mkdtemp(dir=scratch, prefix="diff-"))
        transform = make_transform(train, variant, size, cache_root)
        views = []
        for i, path in enumerate(paths):
            if train:
                transform.generator = torch.Generator().manual_seed(i)
            views.append(transform(path))
        outputs[variant] = torch.stack(views)  # [N,3,S,S]
    return {v: ((outputs[v] - outputs["plain"]).abs().mean().item(),
                (outputs[v] - outputs["plain"]).abs().max().item()) for v in ("fast", "cache")}


def drafted_fraction(paths: Sequence[str], size: int) -> float:
    """Share of the images that draft mode actually decodes at reduced size."""
    return float(np.mean([decode_image(p, size)[0].size != decode_image(p, size)[1]
                          for p in paths]))


def print_differences(diffs: dict, resolutions: Sequence[Tuple[int, int]], size: int) -> None:
    print("\n|difference| of normalised values vs plain (mean / max), same seeds:")
    for resolution in resolutions:
        label = f"{resolution[0]}x{resolution[1]}"
        for name in ("train", "test"):
            d = diffs[(name, resolution)]
            print(f"  {name:5} {label:>9}: fast {d['fast'][0]:.4f} / {d['fast'][1]:.3f}   "
                  f"cache {d['cache'][0]:.4f} / {d['cache'][1]:.3f}")
        print(f"  draft mode reduces {diffs[('drafted', resolution)]:.0%} of the {label} "
              f"images at size {size}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images per resolution")
    parser.add_argument("--resolutions", default="500x375,1600x1200")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    resolutions = [tuple(int(x) for x in r.split("x")) for r in args.resolutions.split(",")]
    worker_counts = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="vlprompt-data-bench-") as tmp:
        scratch = Path(tmp)
        print(f"{args.images} JPEGs (q90) per resolution, size {args.size}, batch {args.batch};"
              f" images/s (x ratio vs plain)")
        print(f"{'transform':9} {'photo':>9} {'wk':>2} | {'plain':>6} | {'fast':>13} | "
              f"{'cache cold':>13} | {'cache warm':>13}")
        diffs = {}
        for resolution in resolutions:
            paths = write_images(scratch, resolution, args.images)
            for train in (True, False):
                name = "train" if train else "test"
                for workers in worker_counts:
                    r = throughput_row(paths, train, args.size, workers, args.batch, scratch)
                    print(f"{name:9} {resolution[0]:>4}x{resolution[1]:<4} {workers:>2} | "
                          f"{r['plain']:6.1f} | {r['fast']:6.1f} ({r['fast'] / r['plain']:4.2f}x)"
                          f" | {r['cold']:6.1f} ({r['cold'] / r['plain_first']:4.2f}x) | "
                          f"{r['warm']:6.1f} ({r['warm'] / r['plain']:4.2f}x)")
                diffs[(name, resolution)] = pixel_differences(paths, train, args.size, scratch)
            diffs[("drafted", resolution)] = drafted_fraction(paths, args.size)
        print_differences(diffs, resolutions, args.size)


if __name__ == "__main__":
    main()
