"""The uint8 image cache: exact for the test transform, a bounded approximation for training,
invalidated by edits, robust to corrupt entries, concurrent writers and pickling; its config."""

import multiprocessing
import os
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vlprompt.config import RUNTIME_ONLY, TrainConfig, resolve_config
from vlprompt.data import Record, build_loader, build_transform
from vlprompt.data.image_cache import (ImageCache, decode_entry, default_cache_root,
                                       encode_entry, optional_image_cache)
from vlprompt.data import transforms
from vlprompt.engine.run import _train_transform, _val_set


def photo_like(w, h, seed=0):
    """Gradient + texture + noise: resampling differences show as they do on photos."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)  # [H,W]
    img = np.stack([xx / w * 200, yy / h * 200, (xx + yy) / (w + h) * 255], -1)  # [H,W,3]
    img += 30 * np.sin(xx / 5.0 + seed)[..., None] * np.cos(yy / 7.0)[..., None]
    img += rng.normal(0, 6, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def save(path, img, **kwargs):
    img.save(path, **kwargs)
    return str(path)


@pytest.fixture
def cache_root(tmp_path):
    return tmp_path / "image-cache"


@pytest.mark.parametrize("w,h,fmt", [(96, 72, "JPEG"), (50, 90, "PNG"), (20, 24, "PNG"),
                                     (32, 40, "JPEG")])
def test_test_transform_is_bit_identical(tmp_path, cache_root, w, h, fmt):
    """Shrunk (96x72, 50x90), exactly the size (32x40) and smaller than it (20x24, upsampled
    by the transform itself): cold and warm reads equal the uncached tensors."""
    path = save(tmp_path / f"img.{fmt.lower()}", photo_like(w, h), format=fmt)
    plain = build_transform(False, 32)(path)
    cached = build_transform(False, 32, cache=ImageCache(32, root=cache_root))
    assert torch.equal(cached(path), plain)  # cold: decoded and written
    assert len(list(cache_root.glob("*/*.rgb"))) == 1
    assert torch.equal(cached(path), plain)  # warm: read back


def test_stored_image_is_the_shorter_side_resize(tmp_path, cache_root):
    path = save(tmp_path / "a.png", photo_like(90, 60))
    img, full_size = ImageCache(30, root=cache_root).load(path)
    assert img.size == (45, 30) and full_size == (90, 60)
    small, full_small = ImageCache(100, root=cache_root).load(path)
    assert small.size == full_small == (90, 60)  # never upsampled


def test_train_transform_is_exact_when_nothing_is_shrunk(tmp_path, cache_root):
    """The crop box comes from the same random draws in original coordinates."""
    path = save(tmp_path / "a.png", photo_like(80, 60))
    cached = build_transform(True, 32, cache=ImageCache(64, root=cache_root))  # 60 < 64
    plain = build_transform(True, 32)
    for seed in range(5):
        cached.generator = torch.Generator().manual_seed(seed)
        plain.generator = torch.Generator().manual_seed(seed)
        assert torch.equal(cached(path), plain(path))


def test_train_transform_approximation_is_bounded(tmp_path, cache_root):
    """Shrunk 3x (128x96 -> 32 short side; crops resampled from fewer pixels): mean
    |normalised difference| measured 0.014 here, bound 0.05 (values span about 4). Drawing the
    crop in the cached image's own pixel grid instead measured 0.42 (other positions)."""
    paths = [save(tmp_path / f"{i}.jpg", photo_like(128, 96, seed=i), quality=90)
             for i in range(4)]
    cached = build_transform(True, 32, cache=ImageCache(32, root=cache_root))
    plain = build_transform(True, 32)
    diffs = []
    for seed in range(16):
        path = paths[seed % 4]
        cached.generator = torch.Generator().manual_seed(seed)
        plain.generator = torch.Generator().manual_seed(seed)
        diffs.append((cached(path) - plain(path)).abs().mean().item())
    assert 0 < np.mean(diffs) < 0.05


def test_multiview_uses_the_cache(tmp_path, cache_root):
    path = save(tmp_path / "a.png", photo_like(80, 60))
    views = build_transform(True, 32, augment="resize_randaugment", views=2,
                            cache=ImageCache(40, root=cache_root),
                            generator=torch.Generator().manual_seed(0))(path)
    assert views.shape == (2, 3, 32, 32)
    assert len(list(cache_root.glob("*/*.rgb"))) == 1


def test_edited_image_is_decoded_again(tmp_path, cache_root):
    path = tmp_path / "a.bmp"  # BMP: same byte size for the edit, so the mtime must decide
    cache = ImageCache(16, root=cache_root)
    first = save(path, photo_like(40, 30, seed=1))
    old_entry = cache.entry_path(first)
    a = np.asarray(cache.load(first)[0])
    stat = os.stat(path)
    save(path, photo_like(40, 30, seed=2))
    assert os.stat(path).st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))
    edited_entry = cache.entry_path(first)
    assert edited_entry != old_entry
    b = np.asarray(cache.load(first)[0])
    assert not np.array_equal(a, b)
    assert np.array_equal(b, np.asarray(ImageCache(16, root=cache_root / "fresh").load(first)[0]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 20_000_000))  # touch alone
    assert cache.entry_path(first) not in (old_entry, edited_entry)


@pytest.mark.parametrize("damage", ["truncate", "empty", "flip_pixel", "foreign", "wrong_shape"])
def test_corrupt_entry_is_decoded_again(tmp_path, cache_root, damage):
    path = save(tmp_path / "a.png", photo_like(40, 30))
    cache = ImageCache(16, root=cache_root)
    want = np.asarray(cache.load(path)[0])
    entry = cache.entry_path(path)
    data = bytearray(entry.read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "empty":
        data = bytearray()
    elif damage == "flip_pixel":
        data[-1] ^= 0xFF  # caught by the CRC
    elif damage == "foreign":
        data = bytearray(b"\x93NUMPY" + bytes(100))
    else:  # a valid entry of another size under this key
        data = bytearray(encode_entry(photo_like(20, 20), (40, 30)))
    entry.write_bytes(bytes(data))
    assert decode_entry(bytes(data), 16) is None
    assert np.array_equal(np.asarray(cache.load(path)[0]), want)
    assert decode_entry(entry.read_bytes(), 16) is not None  # rewritten


def test_unwritable_cache_does_not_stop_decoding(tmp_path, caplog):
    path = save(tmp_path / "a.png", photo_like(40, 30))
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    cache = ImageCache(16, root=blocker)
    t = build_transform(False, 16, cache=cache)
    assert torch.equal(t(path), build_transform(False, 16)(path))
    assert torch.equal(t(path), build_transform(False, 16)(path))
    assert sum("cannot write" in r.message for r in caplog.records) == 1


def test_missing_file_raises_like_the_uncached_path(tmp_path, cache_root):
    with pytest.raises(FileNotFoundError):
        ImageCache(16, root=cache_root).load(tmp_path / "absent.jpg")


def _write_many(root, path, rounds):
    cache = ImageCache(16, root=root)
    entry = cache.entry_path(path)
    img, full_size = cache.load(path)
    data = encode_entry(img, full_size)
    for _ in range(rounds):
        cache._write(entry, data)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_concurrent_writers_leave_a_valid_entry(tmp_path, cache_root):
    path = save(tmp_path / "a.png", photo_like(40, 30))
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_write_many, args=(cache_root, path, 200)) for _ in range(2)]
    for w in writers:
        w.start()
    cache = ImageCache(16, root=cache_root)
    entry, seen = cache.entry_path(path), 0
    while any(w.is_alive() for w in writers):  # readers never see a partial entry
        if entry.exists():
            assert decode_entry(entry.read_bytes(), 16) is not None
            seen += 1
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert decode_entry(entry.read_bytes(), 16) is not None
    assert list(entry.parent.iterdir()) == [entry]  # no temporaries left
    assert seen > 0


def test_stale_temporaries_are_removed(cache_root):
    shard = cache_root / "ab"
    shard.mkdir(parents=True)
    stale = shard / ".abc.rgb.deadbeef.tmp"
    stale.write_bytes(b"x")
    os.utime(stale, (0, 0))
    keep = shard / "abc.rgb"
    keep.write_bytes(b"y")
    assert ImageCache(16, root=cache_root).remove_stale_temporaries() == [stale]
    assert keep.exists()


def test_cache_and_transforms_pickle(tmp_path, cache_root):
    path = save(tmp_path / "a.png", photo_like(40, 30))
    cache = ImageCache(16, root=cache_root, draft=True)
    copy = pickle.loads(pickle.dumps(cache))
    assert (copy.size, copy.root, copy.draft) == (16, cache.root, True)
    assert copy.entry_path(path) == cache.entry_path(path)
    t = pickle.loads(pickle.dumps(build_transform(False, 16, cache=cache)))
    assert isinstance(t.cache, ImageCache) and t(path).shape == (3, 16, 16)


def test_loader_workers_fill_the_cache(tmp_path, cache_root):
    records = [Record(save(tmp_path / f"{i}.png", photo_like(40, 30, seed=i)), i % 2, "x")
               for i in range(4)]
    t = build_transform(False, 16, cache=ImageCache(16, root=cache_root))
    x, _ = next(iter(build_loader(records, t, 4, False, num_workers=2)))
    assert x.shape == (4, 3, 16, 16)
    assert len(list(cache_root.glob("*/*.rgb"))) == 4
    plain = torch.stack([build_transform(False, 16)(r.path) for r in records])
    assert torch.equal(x, plain)


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.delenv("VLPROMPT_IMAGE_CACHE", raising=False)
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path / "vl"))
    assert default_cache_root() == tmp_path / "vl" / "image-cache"
    monkeypatch.setenv("VLPROMPT_IMAGE_CACHE", str(tmp_path / "images"))
    assert ImageCache(8).root == tmp_path / "images"


def test_config_fields():
    cfg = TrainConfig()
    assert cfg.image_cache is False and cfg.fast_decode is False
    assert not {"image_cache", "fast_decode"} & RUNTIME_ONLY  # they change results
    for name in ("image_cache", "fast_decode"):
        with pytest.raises(ValueError, match=name):
            TrainConfig(**{name: "yes"})
    train = resolve_config("coop", overrides=["train.image_cache=true"])["train"]
    assert train["image_cache"] is True


def test_run_wiring(monkeypatch, tmp_path):
    monkeypatch.setenv("VLPROMPT_IMAGE_CACHE", str(tmp_path / "ic"))
    model = SimpleNamespace()  # a method with the default augmentation
    plain = _train_transform(model, 32)
    assert isinstance(plain, transforms.TrainTransform) and plain.cache is None
    on = _train_transform(model, 32, train_cfg=TrainConfig(image_cache=True, fast_decode=True))
    assert on.cache.size == 32 and on.cache.draft and on.fast_decode
    assert on.cache.root == tmp_path / "ic"
    split = SimpleNamespace(val=["v"], test=["t"], dataset="x")
    val = _val_set(split, TrainConfig(select="best_val", image_cache=True), 32)
    assert isinstance(val.transform, transforms.TestTransform) and val.transform.cache.size == 32
    assert optional_image_cache(False, 32) is None
