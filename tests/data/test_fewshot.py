"""Few-shot subsets equal Dassl's (global `random`), Dassl pickles are read and rebased."""

import pickle
import random
import sys
import types
from collections import defaultdict

import pytest

from vlprompt.data import load_split, read_dassl_pickle
from vlprompt.data.base import read_split_json
from vlprompt.data.synthetic import write_dataset


def dassl_fewshot(items, k):
    """Independent re-statement of Dassl generate_fewshot_dataset (global random, no repeat)."""
    tracker = defaultdict(list)
    for item in items:
        tracker[item[1]].append(item)
    out = []
    for label, group in tracker.items():
        out.extend(random.sample(group, k) if len(group) >= k else group)
    return out


@pytest.fixture(scope="module")
def eurosat(tmp_path_factory):
    root = tmp_path_factory.mktemp("fs")
    write_dataset(root, "eurosat", images_per_class=44, image_size=8)  # 22 train, 9 val
    return root


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sixteen_shots_match_dassl(eurosat, seed):
    parts = read_split_json(eurosat / "eurosat" / "split_zhou_EuroSAT.json",
                            eurosat / "eurosat" / "2750")
    # shuffle stored order within the JSON so order-dependence is exercised
    train = [(r.path, r.label) for r in parts["train"]]
    val = [(r.path, r.label) for r in parts["val"]]
    state = random.getstate()
    try:
        random.seed(seed)
        want_train = dassl_fewshot(train, 16)
        want_val = dassl_fewshot(val, min(16, 4))
    finally:
        random.setstate(state)
    split = load_split("eurosat", eurosat, shots=16, seed=seed)
    assert [(r.path, r.label) for r in split.train] == want_train
    assert [(r.path, r.label) for r in split.val] == want_val
    assert len(split.train) == 160 and len(split.val) == 40


def test_seeds_differ_and_global_random_untouched(eurosat):
    random.seed(123)
    before = random.random()
    random.seed(123)
    a = load_split("eurosat", eurosat, shots=4, seed=1)
    after = random.random()
    assert before == after
    b = load_split("eurosat", eurosat, shots=4, seed=2)
    assert [r.path for r in a.train] != [r.path for r in b.train]


def test_classes_with_too_few_items_keep_all(eurosat, caplog):
    split = load_split("eurosat", eurosat, shots=30, seed=1)
    assert len(split.train) == 10 * 22
    assert "fewer than 30" in caplog.text and "10 classes" in caplog.text


def test_fewshot_then_base_new(eurosat):
    full = load_split("eurosat", eurosat, shots=16, seed=1)
    base = load_split("eurosat", eurosat, shots=16, seed=1, subsample="base")
    assert [r.path for r in base.train] == [r.path for r in full.train if r.label < 5]
    assert len(base.train) == 80 and len(base.val) == 20


class Datum:
    """Stand-in for dassl.data.datasets.base_dataset.Datum (same attributes)."""

    def __init__(self, impath, label, domain=0, classname=""):
        self._impath, self._label, self._domain, self._classname = impath, label, domain, classname


@pytest.fixture
def fake_dassl(monkeypatch):
    names = ["dassl", "dassl.data", "dassl.data.datasets", "dassl.data.datasets.base_dataset"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    module = sys.modules["dassl.data.datasets.base_dataset"]
    Datum.__module__ = module.__name__
    module.Datum = Datum
    yield Datum


def test_dassl_pickle_read_and_rebased(tmp_path, fake_dassl, monkeypatch):
    root = tmp_path / "new_root"
    write_dataset(root, "eurosat", images_per_class=10, image_size=8)
    parts = read_split_json(root / "eurosat" / "split_zhou_EuroSAT.json", root / "eurosat" / "2750")
    old = "/old/machine/DATA/eurosat/2750/"
    chosen_train = parts["train"][::5]
    chosen_val = parts["val"][::3]
    data = {
        "train": [fake_dassl(old + r.path.split("/2750/")[1], r.label, 0, r.classname)
                  for r in chosen_train],
        "val": [fake_dassl(old + r.path.split("/2750/")[1], r.label, 0, r.classname)
                for r in chosen_val],
    }
    pkl = root / "eurosat" / "split_fewshot" / "shot_1-seed_7.pkl"
    pkl.parent.mkdir()
    with open(pkl, "wb") as f:
        pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
    # read without dassl installed
    for name in list(sys.modules):
        if name.startswith("dassl"):
            monkeypatch.delitem(sys.modules, name)
    got = read_dassl_pickle(pkl, root / "eurosat", "eurosat")
    assert [r.path for r in got["train"]] == [r.path for r in chosen_train]
    split = load_split("eurosat", root, shots=1, seed=7)
    assert split.info["fewshot_source"] == "pickle"
    assert [r.path for r in split.train] == [r.path for r in chosen_train]
    assert [r.path for r in split.val] == [r.path for r in chosen_val]
    assert split.train[0].classname == chosen_train[0].classname


def test_pickle_with_other_classes_is_refused(tmp_path):
    pkl = tmp_path / "evil.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"train": [types.SimpleNamespace(_impath="x", _label=0)]}, f)
    with pytest.raises(ValueError, match="evil.pkl"):
        read_dassl_pickle(pkl)


def test_imagenet_preprocessed_pkl(tmp_path, fake_dassl):
    root = tmp_path
    write_dataset(root, "imagenet", num_classes=3, images_per_class=4, image_size=8)
    first = load_split("imagenet", root)
    old = "/elsewhere/imagenet/"
    data = {s: [fake_dassl(old + r.path.split("/imagenet/")[1], r.label, 0, r.classname)
                for r in getattr(first, s)] for s in ("train", "test")}
    with open(root / "imagenet" / "preprocessed.pkl", "wb") as f:
        pickle.dump(data, f)
    # folders are no longer needed once the pkl exists; the classnames file is not read
    (root / "imagenet" / "classnames.txt").unlink()
    again = load_split("imagenet", root)
    assert [r.path for r in again.train] == [r.path for r in first.train]
    assert again.classnames == first.classnames


def test_imagenet_fewshot_cached_outside_data_root(tmp_path):
    write_dataset(tmp_path, "imagenet", num_classes=3, images_per_class=6, image_size=8)
    before = sorted(p for p in tmp_path.rglob("*"))
    a = load_split("imagenet", tmp_path, shots=2, seed=1)
    assert a.info["fewshot_source"] == "sampled"
    b = load_split("imagenet", tmp_path, shots=2, seed=1)
    assert b.info["fewshot_source"] == "cache"
    assert [r.path for r in a.train] == [r.path for r in b.train]
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written into the data root
