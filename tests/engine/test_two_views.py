"""Several training views per image (a method's ``train_views`` / ``train_augment``, e.g.
CoPrompt): items ``[V, 3, S, S]``, batches ``[B, V, 3, S, S]``, seeded per item, so workers,
processes and a mid-epoch resume do not change the result; the default path is unchanged."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from vlprompt.config import TrainConfig
from vlprompt.data import ImageDataset, build_transform, load_split
from vlprompt.data.base import packaged_classnames
from vlprompt.data.descriptions import write_descriptions
from vlprompt.data.transforms import (MultiViewTransform, RandAugmentTransform,
                                      TrainTransform)
from vlprompt.engine import distributed as Dist
from vlprompt.engine import rundir as R
from vlprompt.engine import train_method
from vlprompt.engine.checkpoint import read_header, read_tensors
from vlprompt.engine.run import _train_transform
from vlprompt.engine.train import SeededItems
from vlprompt.methods import build_method


class Killed(BaseException):
    """Raised at an injected kill point."""


@pytest.fixture(scope="module")
def split(world):
    return load_split("eurosat", world.data, shots=4, seed=1, subsample="base")


@pytest.fixture(scope="module")
def descriptions(world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("descriptions")
    names = packaged_classnames("eurosat")
    write_descriptions(folder, "eurosat", {n: [f"a satellite photo of {n}.", f"{n} from above."]
                                           for n in names})
    return folder


def test_multi_view_transform_shapes_seeds_and_default(split):
    path = split.train[0].path
    t = build_transform(True, 32, views=2, augment="resize_randaugment")
    assert isinstance(t, MultiViewTransform) and isinstance(t.base, RandAugmentTransform)
    t.generator = torch.Generator().manual_seed(3)  # what SeededItems does per item
    assert t.base.generator is t.generator
    x = t(path)
    assert x.shape == (2, 3, 32, 32) and not torch.equal(x[0], x[1])
    # the views are two draws from the item's generator, in turn
    g = torch.Generator().manual_seed(3)
    one = build_transform(True, 32, generator=g, augment="resize_randaugment")
    assert torch.equal(x, torch.stack([one(path), one(path)]))
    t.generator = torch.Generator().manual_seed(3)
    assert torch.equal(t(path), x)
    std = build_transform(True, 32, views=3)
    std.generator = torch.Generator().manual_seed(0)
    assert std(path).shape == (3, 3, 32, 32) and isinstance(std.base, TrainTransform)
    # the default is the single standard view, as before
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    plain = build_transform(True, 32, generator=g1)
    assert isinstance(plain, TrainTransform)
    assert torch.equal(plain(path), TrainTransform(32, generator=g2)(path))
    with pytest.raises(ValueError, match="views"):
        build_transform(True, 32, views=0)


def test_the_engine_builds_the_views_a_method_declares(world, descriptions):
    coop = build_method("coop", world.clip, ["a", "b"], n_ctx=4)
    assert isinstance(_train_transform(coop, 32), TrainTransform)
    co = build_method("coprompt", world.clip, ["a", "b"], descriptions=str(descriptions))
    t = _train_transform(co, 32)
    assert isinstance(t, MultiViewTransform) and t.views == 2
    assert isinstance(t.base, RandAugmentTransform)
    co1 = build_method("coprompt", world.clip, ["a", "b"], views=1, augment="standard")
    assert isinstance(_train_transform(co1, 32), TrainTransform)


def _batches(split, workers):
    data = SeededItems(ImageDataset(split.train, build_transform(True, 32, views=2,
                                                                 augment="resize_randaugment")))
    sampler = Dist.EpochSampler(len(split.train), seed=1, with_seeds=True)
    sampler.set_epoch(0)
    loader = DataLoader(data, batch_size=4, sampler=sampler, num_workers=workers)
    return [(x, y) for x, y in loader]


def test_loader_batches_are_b_v_3_h_w_and_worker_independent(split):
    plain = _batches(split, 0)
    assert plain[0][0].shape == (4, 2, 3, 32, 32) and plain[0][1].shape == (4,)
    for (a, la), (b, lb) in zip(plain, _batches(split, 2)):
        assert torch.equal(a, b) and torch.equal(la, lb)


def _train(world, split, descriptions, folder, workers=0, **kw):
    torch.manual_seed(0)
    model = build_method("coprompt", world.clip, split.classnames,
                         descriptions=str(descriptions))
    model.set_dataset("eurosat")
    data = ImageDataset(split.train, _train_transform(model, world.clip.image_size))
    config = TrainConfig(max_epoch=2, lr=0.01, batch_size=4, num_workers=workers,
                         print_freq=100, checkpoint_every_steps=2, checkpoint_every_minutes=0)
    train_method(model, data, config, run_dir=folder, show_progress=False, **kw)
    return {k: v.clone() for k, v in model.trainable_state_dict().items()}


def test_two_view_training_is_exact_across_workers_and_a_mid_epoch_resume(
        world, split, descriptions, tmp_path):
    plain = _train(world, split, descriptions, tmp_path / "plain")
    assert int(plain["description_draws"][1]) == 10  # 5 steps x 2 epochs, one draw each
    workers = _train(world, split, descriptions, tmp_path / "workers", workers=2)
    assert plain.keys() == workers.keys()
    assert all(torch.equal(plain[k], workers[k]) for k in plain)

    ops = []

    def kill_mid_epoch(what):
        ops.append(what)
        if what == "rename" and ops.count("rename") == 4:  # after step 2 of epoch 2
            raise Killed

    R.after_file_op = kill_mid_epoch
    try:
        with pytest.raises(Killed):
            _train(world, split, descriptions, tmp_path / "killed")
    finally:
        R.after_file_op = lambda what: None
    header = read_header(tmp_path / "killed")
    assert (header["epoch"], header["step"]) == (1, 2)
    saved, _ = read_tensors(tmp_path / "killed")
    assert int(saved["description_draws"][1]) == 7  # the draw count travels with the tensors
    resumed = _train(world, split, descriptions, tmp_path / "killed")
    assert all(torch.equal(plain[k], resumed[k]) for k in plain)
