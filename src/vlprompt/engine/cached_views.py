"""Training on cached features of pre-drawn augmented views (``train.cached_views``, issue 14).

A named approximation for methods whose image tower is frozen and unprompted
(``Method.frozen_image_tower``: CoOp, KgCoOp, ProGrad, TCP, CoCoOp and DePT on them). Their image
features are a fixed function of the augmented pixels, so instead of a fresh augmentation of
every item every epoch (the papers), each training image gets ``K`` augmented views drawn once
— view ``k`` of image ``i`` with the generator seed ``view_seed(seed, i, k)``, so the views are
the same in every process, on every resume and for every number of workers — their features
are computed once (``K x N`` image-tower passes, under the run's precision), and each epoch's
item reads the view its augmentation seed selects. Training then never runs the image tower:
what is lost is augmentation diversity beyond ``K`` views per image (the difference on the toy
world is measured in the README). The features live in memory as fp32, ``N x K x E`` (ImageNet
16 shots, K = 8, ViT-B/16: 16,000 x 8 x 512 x 4 B = 262 MB); they are recomputed, identically,
when a run resumes, rather than stored in the run folder.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset

from .evaluate import autocast

logger = logging.getLogger(__name__)


def view_seed(seed: int, index: int, view: int) -> int:
    """The augmentation seed of view ``view`` of training image ``index`` in a run seeded ``seed``
    (distinct from the per-epoch item seeds of ``distributed.sample_seed``)."""
    return (seed * 2_862_933_555_777_941_757 + index * 3_037_000_493 + view * 97_531 + 7) \
        % (2 ** 63 - 1)


class ViewFeatures(Dataset):
    """Items ``(index, sample_seed)`` (``EpochSampler`` with seeds) -> ``(features [E], label)``
    of the view ``sample_seed % K`` of image ``index``; ``features`` is [N, K, E]."""

    #: the training loader hands it the sampler's keys as they are (no ``SeededItems``)
    takes_seeds = True

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, key):
        index, seed = key
        return self.features[index, seed % self.features.shape[1]], int(self.labels[index])


def check_cached_views(method, views: int) -> None:
    """Refuse, in one line, ``train.cached_views`` for a method that reads its pixels otherwise."""
    if not views:
        return
    if not getattr(method, "frozen_image_tower", False):
        raise ValueError(f"train.cached_views={views}: {method.name} prompts, adapts or reads more "
                         f"of its image tower than its frozen features, so they cannot be cached; "
                         f"use it with coop, kgcoop, prograd, tcp, cocoop or dept on them, or set "
                         f"train.cached_views=0")
    if getattr(method, "train_views", 1) > 1:
        raise ValueError(f"train.cached_views={views}: {method.name} trains on "
                         f"{method.train_views} views per item; set train.cached_views=0")


@torch.no_grad()
def draw_view_features(method, dataset: Dataset, views: int, seed: int, batch_size: int,
                       precision: str, device: torch.device, num_workers: int = 0,
                       progress: Optional[callable] = None) -> ViewFeatures:
    """Features of ``views`` augmented views of every item of ``dataset`` (whose transform
    draws from a ``generator`` attribute, as ``SeededItems`` expects), through the method's
    ``frozen_image_features``; ``progress(done, total)`` after each batch."""
    from .train import SeededItems

    n = len(dataset)
    keys = [(i, view_seed(seed, i, k)) for k in range(views) for i in range(n)]
    loader = DataLoader(SeededItems(dataset), batch_size=batch_size, sampler=keys,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    chunks, labels, done, start = [], [], 0, time.time()
    was_training = method.training
    method.eval()
    for images, batch_labels in loader:
        with autocast(precision, device):
            feats = method.frozen_image_features(images.to(device, non_blocking=True))
        chunks.append(feats.float().cpu())
        labels.append(torch.as_tensor(batch_labels))
        done += images.shape[0]
        if progress is not None:
            progress(done, len(keys))
    method.train(was_training)
    features = torch.cat(chunks).view(views, n, -1).transpose(0, 1).contiguous()  # [N, K, E]
    logger.info("cached views: %d views of %d training images in %.1fs (%.0f MB)", views, n,
                time.time() - start, features.numel() * 4 / 2 ** 20)
    return ViewFeatures(features, torch.cat(labels)[:n])
