"""Text-tower throughput: full 77-token pass vs EOT-length truncation (exact, DESIGN.md).

A ViT-B/16-sized text tower (width 512, 12 layers, 8 heads; random weights) encodes 1000 typical
class prompts. Prints sequences/s for both and their ratio, plus the max relative difference.

    python benchmarks/text_tower.py [--device cuda] [--dtype bf16] [--batch 250] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from vlprompt import tokenize
from vlprompt.clip.model import CLIPConfig, build_clip

WORDS = ["tench", "goldfinch", "golden retriever", "Annual Crop Land", "Highway or Road",
         "747-400", "apple pie", "outdoor apartment building", "banded", "Apply Eye Makeup",
         "2012 Tesla Model S", "pink primrose", "american bulldog", "face", "bouncy castle"]
TEMPLATES = ["a photo of a {}.", "a photo of a {}, a type of pet.", "a centered satellite photo of {}.",
             "a photo of a person doing {}.", "{} texture.", "a photo of {}, a type of food."]


def typical_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(TEMPLATES).format(rng.choice(WORDS)) for _ in range(n)]


def run(clip, tokens, batch: int, truncate: bool, repeats: int, autocast) -> tuple[float, torch.Tensor]:
    emb_all = clip.embed_tokens(tokens)
    eot_all = tokens.argmax(-1)
    best, out = float("inf"), None
    for _ in range(repeats):
        if tokens.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        feats = []
        with torch.no_grad(), autocast():
            for i in range(0, tokens.shape[0], batch):
                feats.append(clip.encode_text_embeddings(emb_all[i:i + batch], eot_all[i:i + batch],
                                                         truncate=truncate).float())
        if tokens.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
        out = torch.cat(feats)
    return tokens.shape[0] / best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    clip = build_clip(CLIPConfig()).eval().to(args.device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    def autocast():
        return torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype is not None)

    tokens = tokenize(typical_prompts(args.prompts)).to(args.device)
    lengths = tokens.argmax(-1) + 1
    run(clip, tokens[: args.batch], args.batch, True, 1, autocast)  # warm-up
    full, f_full = run(clip, tokens, args.batch, False, args.repeats, autocast)
    short, f_short = run(clip, tokens, args.batch, True, args.repeats, autocast)
    rel = float(((f_full - f_short).norm(dim=-1) / f_full.norm(dim=-1)).max())
    print(f"device {args.device}, {args.dtype}, {args.prompts} prompts, batch {args.batch}, "
          f"EOT position mean {lengths.float().mean():.1f} / max per batch used for truncation")
    print(f"full 77 tokens : {full:9.1f} sequences/s")
    print(f"EOT-truncated  : {short:9.1f} sequences/s")
    print(f"speed-up       : {short / full:9.2f}x   (max relative feature difference {rel:.1e})")


if __name__ == "__main__":
    main()
