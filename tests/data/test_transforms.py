"""Transforms: shapes, normalisation, torchvision's crop algorithm, determinism; the loader."""

import math

import numpy as np
import torch
from PIL import Image

from vlprompt.data import CLIP_MEAN, CLIP_STD, Record, build_loader, build_transform
from vlprompt.data.transforms import (center_crop, crop_resized, random_resized_crop_params,
                                      resize_shorter, to_normalized_tensor)


def photo(w=64, h=48, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


def test_test_transform_shape_and_values():
    img = photo(64, 48)
    x = build_transform(False, image_size=32)(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    lo = (0 - max(CLIP_MEAN)) / min(CLIP_STD)
    hi = (1 - min(CLIP_MEAN)) / min(CLIP_STD)
    assert lo - 1e-4 <= x.min().item() and x.max().item() <= hi + 1e-4
    # same as doing the steps by hand: shorter side 48 -> 32, width 64 -> 42, centre crop
    ref = img.resize((42, 32), Image.BICUBIC).crop((5, 0, 37, 32))
    arr = torch.from_numpy(np.asarray(ref, dtype=np.float32) / 255.0).permute(2, 0, 1)
    want = (arr - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    assert torch.allclose(x, want, atol=1e-6)


def test_resize_and_crop_geometry():
    assert resize_shorter(photo(30, 90), 20).size == (20, 60)
    assert resize_shorter(photo(90, 30), 20).size == (60, 20)
    assert center_crop(photo(10, 10), 16).size == (16, 16)  # padded like torchvision


def test_random_resized_crop_params_reference():
    """Same draws as torchvision's get_params: replay them from the same generator state."""
    g = torch.Generator().manual_seed(5)
    top, left, h, w = random_resized_crop_params(200, 100, generator=g)
    g = torch.Generator().manual_seed(5)
    for _ in range(10):
        area = 200 * 100 * torch.empty(1).uniform_(0.08, 1.0, generator=g).item()
        ratio = math.exp(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g).item())
        ww, hh = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < ww <= 200 and 0 < hh <= 100:
            tt = torch.randint(0, 100 - hh + 1, (1,), generator=g).item()
            ll = torch.randint(0, 200 - ww + 1, (1,), generator=g).item()
            break
    assert (top, left, h, w) == (tt, ll, hh, ww)


def test_random_resized_crop_fallback():
    # impossible aspect range -> centre crop at the nearest allowed ratio
    top, left, h, w = random_resized_crop_params(400, 10, scale=(0.99, 1.0),
                                                 generator=torch.Generator().manual_seed(0))
    assert (h, w) == (10, 13) and top == 0 and left == (400 - 13) // 2


def test_train_transform_deterministic_for_seed():
    img = photo(80, 60)
    t = build_transform(True, image_size=24)
    torch.manual_seed(3)
    a = t(img)
    torch.manual_seed(3)
    b = t(img)
    torch.manual_seed(4)
    c = t(img)
    assert a.shape == (3, 24, 24)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1 = build_transform(True, 24, generator=torch.Generator().manual_seed(9))
    g2 = build_transform(True, 24, generator=torch.Generator().manual_seed(9))
    assert torch.equal(g1(img), g2(img))


def test_train_transform_default_path_is_crop_then_resize():
    """Without a cache or draft decoding: torchvision's crop + resize + flip, draw for draw."""
    img = photo(80, 60, seed=3)
    for seed in range(4):
        got = build_transform(True, 24, generator=torch.Generator().manual_seed(seed))(img)
        g = torch.Generator().manual_seed(seed)
        top, left, h, w = random_resized_crop_params(80, 60, generator=g)
        ref = img.crop((left, top, left + w, top + h)).resize((24, 24), Image.BICUBIC)
        if torch.rand(1, generator=g).item() < 0.5:
            ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
        assert torch.equal(got, to_normalized_tensor(ref))


def test_crop_resized_maps_the_full_resolution_box():
    """A box in full-resolution coordinates samples the same region of a smaller image."""
    full = np.zeros((60, 80, 3), np.uint8)
    full[:, 40:] = 255  # right half white
    small = Image.fromarray(full).resize((40, 30), Image.NEAREST)
    right = np.asarray(crop_resized(small, (80, 60), (44, 0, 80, 60), 16))
    left = np.asarray(crop_resized(small, (80, 60), (0, 0, 36, 60), 16))
    assert right.min() == 255 and left.max() == 0


def test_fast_decode_reads_jpeg(tmp_path):
    path = tmp_path / "big.jpg"
    photo(512, 384).save(path, quality=90)
    exact = build_transform(False, 32)(str(path))
    fast = build_transform(False, 32, fast_decode=True)(str(path))
    assert fast.shape == exact.shape == (3, 32, 32)
    assert (fast - exact).abs().mean() < 0.5  # close, not bit-identical by design


def test_loader_drop_last_rule_and_order(tmp_path):
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        photo(20, 20, seed=i).save(p)
        paths.append(Record(str(p), i % 2, "x"))
    t = build_transform(False, 16)
    train = build_loader(paths, t, batch_size=2, train=True, seed=1)
    assert len(train) == 2  # 5 items, drop_last because 5 >= 2
    assert len(build_loader(paths[:1], t, batch_size=2, train=True)) == 1  # kept: 1 < 2
    assert len(build_loader(paths, t, batch_size=2, train=False)) == 3
    order1 = [y.tolist() for _, y in build_loader(paths, t, 1, True, seed=7)]
    order2 = [y.tolist() for _, y in build_loader(paths, t, 1, True, seed=7)]
    assert order1 == order2
    x, y = next(iter(build_loader(paths, t, 4, False)))
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 1, 0, 1]
