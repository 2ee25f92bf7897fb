"""Pretraining a tiny CLIP on the toy world with vlprompt's own code.

A small ViT and text transformer (the core ``CLIP`` class, the real 49408-token BPE vocabulary)
are trained contrastively — symmetric InfoNCE over a batch of image/caption pairs, learnable
temperature — as in Radford et al. (2021), on CPU in a few minutes. The result is saved in the
OpenAI key layout with ``save_clip`` and loads with ``load_clip`` like any other checkpoint.

Speed: only the embedding rows of tokens that occur in captions are trained (a compact table,
written back at the end), so the optimiser never touches the other ~49k rows; images come from a
pre-drawn pool with random crops/flips applied on the fly as one batched affine resampling.

Determinism: for a given seed, config, torch version, machine and thread count the weights are
bit-identical (seeded torch / numpy / ``random``; no data-loader workers). Different thread counts
or CPU instruction sets may reorder floating-point reductions and change the last bits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..clip.load import cache_dir, load_clip, save_clip
from ..clip.model import CLIP, CLIPConfig, build_clip
from ..fileio import atomic_write_json
from ..clip.tokenizer import tokenize
from . import benchmark, world
from .version import TOYWORLD_VERSION

logger = logging.getLogger(__name__)

#: CLIP's image normalisation, the same the data layer applies to benchmark images
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class PretrainConfig:
    """Everything that determines the pretrained weights (hashed into the cache key)."""

    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 64
    vision_layers: int = 3
    vision_heads: int = 2
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    embed_dim: int = 64
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 60
    pool_size: int = 12000
    #: (colour, shape) pairs never drawn during pretraining — the benchmark's new classes — so
    #: new-class zero-shot really is recognition of unseen attribute combinations
    holdout: tuple = field(default_factory=lambda: tuple(benchmark.class_pairs()[1]))
    seed: int = 0

    def clip_config(self) -> CLIPConfig:
        return CLIPConfig(embed_dim=self.embed_dim, image_size=self.image_size,
                          patch_size=self.patch_size, vision_width=self.vision_width,
                          vision_layers=self.vision_layers, vision_heads=self.vision_heads,
                          text_width=self.text_width, text_layers=self.text_layers,
                          text_heads=self.text_heads)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["holdout"] = [list(p) for p in self.holdout]
        return d

    def key(self) -> str:
        """Cache key: hash of the config (seed included) and the toy-world version."""
        blob = json.dumps({"config": self.to_dict(), "toyworld": TOYWORLD_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cached_path(config: PretrainConfig) -> Path:
    """Where the pretrained weights for ``config`` live in the cache."""
    return cache_dir() / "toyworld" / f"toyclip-{config.key()}.safetensors"


def to_tensor(images: np.ndarray) -> Tensor:
    """uint8 [N, H, W, 3] -> normalised float [N, 3, H, W] (CLIP mean/std)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(images: Tensor, gen: torch.Generator) -> Tensor:
    """Random resized crop (side 70-100 %) and horizontal flip, batched with one affine grid."""
    n = images.shape[0]
    scale = 0.7 + 0.3 * torch.rand(n, generator=gen)
    shift = (1 - scale)[:, None] * (2 * torch.rand(n, 2, generator=gen) - 1)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale * flip
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class _CompactVocab:
    """Trainable embedding rows for the tokens that occur; the rest of the table is untouched."""

    def __init__(self, model: CLIP, token_ids: Tensor):
        self.used = torch.unique(token_ids)  # sorted ids that occur
        self.remap = torch.zeros(model.token_embedding.num_embeddings, dtype=torch.long)
        self.remap[self.used] = torch.arange(len(self.used))
        self.table = torch.nn.Parameter(model.token_embedding.weight.detach()[self.used].clone())

    def embed(self, tokens: Tensor) -> Tensor:
        return F.embedding(self.remap[tokens], self.table)  # [N, L, D]

    def write_back(self, model: CLIP) -> None:
        with torch.no_grad():
            model.token_embedding.weight[self.used] = self.table.detach()


def _caption_pool(specs: Sequence[world.ObjectSpec], per_image: int, rng: random.Random
                  ) -> tuple[Tensor, int]:
    """``per_image`` captions per image, tokenised: ([N * per_image, L], L) truncated to the
    longest caption."""
    texts = [world.caption(s, rng) for s in specs for _ in range(per_image)]
    tokens = tokenize(texts)
    length = int(tokens.argmax(dim=-1).max()) + 1
    return tokens[:, :length].contiguous(), length


def pretrain(config: PretrainConfig, progress: Optional[Callable[[int, int, float], None]] = None
             ) -> tuple[CLIP, dict]:
    """Pretrain a tiny CLIP on the toy world. Returns (model in eval mode, training log).

    ``progress(step, steps, loss)`` is called after every step (for progress bars).
    """
    start = time.time()
    torch.manual_seed(config.seed)
    np_rng = np.random.default_rng(config.seed)
    py_rng = random.Random(config.seed)
    gen = torch.Generator().manual_seed(config.seed)

    pairs = [(c, s) for c in range(len(world.COLOURS)) for s in range(len(world.SHAPES))
             if (c, s) not in {tuple(p) for p in config.holdout}]
    specs = world.sample_specs(config.pool_size, np_rng, pairs=pairs)
    images = np.concatenate([world.draw(specs[i:i + 1024], config.image_size, "pretrain", np_rng)
                             for i in range(0, len(specs), 1024)])
    pool = to_tensor(images)  # [P, 3, H, W]
    per_image = 4
    captions, _ = _caption_pool(specs, per_image, py_rng)  # [P * per_image, L]
    logger.info("toy world: drew %d images and %d captions in %.1fs", len(specs), len(captions),
                time.time() - start)

    model = build_clip(config.clip_config())
    model.train()
    vocab = _CompactVocab(model, captions)
    model.token_embedding.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad] + [vocab.table]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=config.lr,
                              betas=(0.9, 0.98), eps=1e-6)
    losses: list[float] = []
    for step in range(config.steps):
        lr = config.lr * (step + 1) / config.warmup_steps if step < config.warmup_steps else \
            0.5 * config.lr * (1 + math.cos(math.pi * (step - config.warmup_steps)
                                            / max(1, config.steps - config.warmup_steps)))
        for group in optim.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(pool), (config.batch_size,), generator=gen)
        which = torch.randint(0, per_image, (config.batch_size,), generator=gen)
        batch = augment(pool[idx], gen)
        tokens = captions[idx * per_image + which]  # [B, L]
        img = F.normalize(model.encode_image(batch), dim=-1)
        txt = F.normalize(model.encode_text_embeddings(vocab.embed(tokens), tokens.argmax(-1)),
                          dim=-1)
        logits = model.logit_scale.exp() * img @ txt.t()  # [B, B]
        target = torch.arange(len(idx))
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, config.steps, losses[-1])
    vocab.write_back(model)
    model.requires_grad_(False).eval()
    log = {"config": config.to_dict(), "toyworld_version": TOYWORLD_VERSION,
           "seconds": round(time.time() - start, 1), "threads": torch.get_num_threads(),
           "final_loss": float(np.mean(losses[-20:])) if losses else None,
           "loss_every_50": losses[::50], "trained_vocab_rows": len(vocab.used)}
    return model, log


def load_or_pretrain(config: Optional[PretrainConfig] = None, force: bool = False,
                     progress: Optional[Callable[[int, int, float], None]] = None
                     ) -> tuple[CLIP, Path]:
    """The cached tiny CLIP for ``config``, pretraining (and caching) it first if needed.

    Returns (frozen model from ``load_clip``, checkpoint path). A JSON file next to the weights
    records the config and the training log.
    """
    config = config or PretrainConfig()
    path = cached_path(config)
    if force or not path.exists():
        logger.info("pretraining the toy-world CLIP (%d steps) -> %s", config.steps, path)
        model, log = pretrain(config, progress=progress)
        save_clip(model, path)
        atomic_write_json(path.with_suffix(".json"), log)
        logger.info("pretrained in %.1fs (final loss %.3f)", log["seconds"], log["final_loss"])
    else:
        logger.info("reusing the cached toy-world CLIP %s", path)
    return load_clip(path), path
