"""``train.cached_views``: features of K pre-drawn augmented views per image, drawn once and
deterministically, train frozen-image-tower methods without running the image tower; with a
deterministic augmentation the approximation is exact; other methods are refused in one line;
a resumed run ends as an uninterrupted one."""

import pytest
import torch
from torch.utils.data import Dataset

from vlprompt.config import TrainConfig
from vlprompt.engine import train_method
from vlprompt.engine.cached_views import draw_view_features, view_seed
from vlprompt.methods import build_method, get_method, list_methods
from vlprompt.methods.coop import CoOp

from test_engine_train import NAMES, tensor_data  # noqa: E402 (same folder)


class Jitter:
    """An augmentation that draws from ``generator`` as the real transforms do (``SeededItems``
    seeds it per item): additive noise of scale ``noise`` (0: deterministic)."""

    def __init__(self, noise: float):
        self.noise, self.generator = noise, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.noise * torch.randn(x.shape, generator=self.generator)


class JitteredImages(Dataset):
    def __init__(self, noise: float, n_per_class: int = 4):
        self.base = tensor_data(n_per_class)
        self.transform = Jitter(noise)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return self.transform(x), y


def cfg(**kw):
    base = dict(max_epoch=2, lr=0.01, batch_size=4, num_workers=0, print_freq=100,
                checkpoint_every_minutes=0, eval_batch_size=5)
    base.update(kw)
    return TrainConfig(**base)


def trained(world, name, data, run_dir=None, **kw):
    torch.manual_seed(0)
    method = build_method(name, world.clip, NAMES, n_ctx=4)
    result = train_method(method, data, cfg(**kw), run_dir=run_dir, show_progress=False)
    return method, result


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_the_frozen_image_tower_methods_are_exactly_those_that_read_pixels_only_through_it():
    frozen = {m for m in list_methods() if get_method(m).frozen_image_tower is True}
    assert frozen == {"zeroshot", "coop", "kgcoop", "prograd", "tcp", "cocoop"}


def test_views_are_the_seeded_draws_of_the_augmentation_and_the_same_every_time(world):
    method = build_method("coop", world.clip, NAMES, n_ctx=4)
    data = JitteredImages(noise=0.5)
    args = dict(views=3, seed=7, batch_size=5, precision="fp32", device=torch.device("cpu"))
    first = draw_view_features(method, data, **args)
    again = draw_view_features(method, data, **args)
    assert first.features.shape == (12, 3, world.clip.embed_dim)
    assert torch.equal(first.features, again.features)
    assert first.labels.tolist() == [int(data.base[i][1]) for i in range(12)]
    x, _ = data.base[5]
    data.transform.generator = torch.Generator().manual_seed(view_seed(7, 5, 2))
    expected = world.clip.encode_image(data.transform(x)[None])[0]
    assert rel(first.features[5, 2], expected) < 1e-5
    assert rel(first.features[5, 0], first.features[5, 2]) > 1e-3  # the views differ
    assert torch.equal(first[(5, 2)][0], first.features[5, 2])  # seed 2 of 3 views: view 2


@pytest.mark.parametrize("name", ["coop", "cocoop", "prograd"])
def test_with_a_deterministic_augmentation_cached_views_train_as_the_plain_path(world, name):
    plain, _ = trained(world, name, JitteredImages(noise=0.0))
    cached, result = trained(world, name, JitteredImages(noise=0.0), cached_views=2)
    for key, value in plain.trainable_state_dict().items():
        assert rel(cached.trainable_state_dict()[key], value) < 1e-5, key
    assert 0.0 <= result["data_stall_fraction"] <= 1.0


def test_training_on_cached_views_never_runs_the_image_tower(world, monkeypatch):
    visual = type(world.clip.visual)
    calls = []
    original = visual.forward

    def counting(self, *args, **kwargs):
        calls.append(args[0].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(visual, "forward", counting)
    trained(world, "coop", JitteredImages(noise=0.3), max_epoch=3)
    assert sum(calls) == 3 * 12  # plain: every image, every epoch
    calls.clear()
    method, _ = trained(world, "coop", JitteredImages(noise=0.3), max_epoch=3, cached_views=2)
    assert sum(calls) == 2 * 12  # the two views of each image, drawn once
    # and the approximation is one: fresh noise every epoch trains other tensors
    fresh, _ = trained(world, "coop", JitteredImages(noise=0.3), max_epoch=3)
    assert rel(method.ctx, fresh.ctx) > 1e-4


def test_a_resumed_cached_views_run_ends_as_an_uninterrupted_one(world, tmp_path):
    class Killed(BaseException):
        pass

    def kill(epoch):
        raise Killed

    whole, _ = trained(world, "coop", JitteredImages(0.3), tmp_path / "whole", max_epoch=3,
                       cached_views=2)
    torch.manual_seed(0)
    method = build_method("coop", world.clip, NAMES, n_ctx=4)
    with pytest.raises(Killed):
        train_method(method, JitteredImages(0.3), cfg(max_epoch=3, cached_views=2),
                     run_dir=tmp_path / "resumed", show_progress=False, epoch_callback=kill)
    resumed, _ = trained(world, "coop", JitteredImages(0.3), tmp_path / "resumed", max_epoch=3,
                         cached_views=2)
    assert torch.equal(resumed.ctx, whole.ctx)


def test_methods_that_prompt_or_read_their_image_tower_are_refused_in_one_line(world):
    class PromptedImages(CoOp):
        name = "_prompted"  # not registered
        frozen_image_tower = False

    method = PromptedImages(world.clip, NAMES, CoOp.Config(n_ctx=4))
    with pytest.raises(ValueError, match=r"train.cached_views=2: _prompted .* cannot be cached"):
        train_method(method, tensor_data(), cfg(cached_views=2), show_progress=False)


def test_dept_caches_views_as_its_base_method(world):
    assert get_method("dept").frozen_image_tower is not True  # a property of the instance
    dept_coop = build_method("dept", world.clip, NAMES, base="coop")
    dept_maple = build_method("dept", world.clip, NAMES, base="maple", base_config={"depth": 1})
    assert dept_coop.frozen_image_tower and not dept_maple.frozen_image_tower
@pytest.mark.parametrize("value", [-1, True, 1.5])
def test_cached_views_must_be_a_count(value):
    with pytest.raises(ValueError, match="train.cached_views must be an integer >= 0"):
        cfg(cached_views=value)
