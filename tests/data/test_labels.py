"""A label that names no class is refused where split files are read, in one line naming the
file, the split, the item and the valid range; shots must be -1 or >= 1."""

import json
import pickle
import sys
import types

import pytest

from vlprompt.data import check_labels, load_split, read_split_json
from vlprompt.data.records import Record
from vlprompt.data.synthetic import write_dataset

ITEMS = [["cat/1.jpg", 0, "cat"], ["dog/1.jpg", 1, "dog"], ["cow/1.jpg", 2, "cow"]]


def _split_file(tmp_path, **changes):
    obj = {"train": [list(x) for x in ITEMS], "val": [list(ITEMS[0])], "test": [list(ITEMS[1])]}
    for split, (i, item) in changes.items():
        obj[split][i] = item
    path = tmp_path / "split_mine.json"
    path.write_text(json.dumps(obj))
    return path


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_hand_written_split_with_a_label_past_the_classes(tmp_path):
    path = _split_file(tmp_path, val=(0, ["cat/2.jpg", 7, "cat"]))
    with pytest.raises(ValueError) as err:
        read_split_json(path, tmp_path / "images")
    assert _one_line(err) == (
        f"{path}: val[0] ({tmp_path / 'images' / 'cat/2.jpg'}, label 7) names no class: labels "
        f"must be 0..3 (4 classes); fix the label or remove the item")


def test_negative_label(tmp_path):
    path = _split_file(tmp_path, test=(0, ["dog/2.jpg", -1, "dog"]))
    with pytest.raises(ValueError) as err:
        read_split_json(path, tmp_path)
    text = _one_line(err)
    assert text.startswith(f"{path}: test[0] (") and "dog/2.jpg, label -1) names no class" in text
    assert "labels must be 0..3" in text


def test_label_gap_is_reported_at_the_item(tmp_path):
    path = _split_file(tmp_path, train=(2, ["cow/1.jpg", 5, "cow"]))  # labels 0, 1, 5
    with pytest.raises(ValueError) as err:
        read_split_json(path, tmp_path)
    assert "train[2] (" in _one_line(err) and "label 5) names no class: labels must be 0..2 " \
                                              "(3 classes)" in str(err.value)


def test_one_label_two_classnames(tmp_path):
    path = _split_file(tmp_path, test=(0, ["dog/2.jpg", 0, "dog"]))
    with pytest.raises(ValueError) as err:
        read_split_json(path, tmp_path)
    assert _one_line(err).endswith(
        "test[0] (" + str(tmp_path / "dog/2.jpg") + ", label 0) is 'dog' but train[0] has "
        "label 0 as 'cat'; one label, one class name")
    assert str(path) in str(err.value)


@pytest.mark.parametrize("label", [True, 1.5, "one"])
def test_non_integer_labels(tmp_path, label):
    path = _split_file(tmp_path, train=(1, ["dog/1.jpg", label, "dog"]))
    with pytest.raises(ValueError, match=r"train\[1\] = .* is not \[relative_path, label >= 0, "
                                         r"classname\]"):
        read_split_json(path, tmp_path)


def test_load_split_of_a_benchmark_with_a_bad_label(tmp_path):
    write_dataset(tmp_path, "eurosat", images_per_class=5, image_size=8)
    path = tmp_path / "eurosat" / "split_zhou_EuroSAT.json"
    obj = json.loads(path.read_text())
    obj["test"][4][1] = 10
    path.write_text(json.dumps(obj))
    name = obj["test"][4][2]
    first = next(i for i, item in enumerate(obj["train"]) if item[2] == name)
    with pytest.raises(ValueError) as err:
        load_split("eurosat", tmp_path)
    assert _one_line(err).startswith(f"{path}: test[4] (")
    assert str(err.value).endswith(f"label 10) is {name!r} but train[{first}] has {name!r} as "
                                   f"label {obj['train'][first][1]}; one class name, one label")
    obj["test"][4][1] = 11  # 0..9 and 11: a gap
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError) as err:
        load_split("eurosat", tmp_path)
    assert "label 11) names no class: labels must be 0..10 (11 classes)" in _one_line(err)


def test_check_labels_with_a_known_class_count():
    parts = {"train": [Record("/a.jpg", 0, "a"), Record("/b.jpg", 3, "b")]}
    check_labels(parts, "x.pkl", num_classes=4)
    with pytest.raises(ValueError) as err:
        check_labels(parts, "x.pkl", num_classes=3)
    assert _one_line(err) == ("x.pkl: train[1] (/b.jpg, label 3) names no class: labels must be "
                              "0..2 (3 classes); fix the label or remove the item")


class Datum:
    def __init__(self, impath, label, classname=""):
        self._impath, self._label, self._domain, self._classname = impath, label, 0, classname


@pytest.fixture
def fake_dassl(monkeypatch):
    for name in ["dassl", "dassl.data", "dassl.data.datasets", "dassl.data.datasets.base_dataset"]:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    module = sys.modules["dassl.data.datasets.base_dataset"]
    Datum.__module__ = module.__name__
    module.Datum = Datum
    return Datum


def test_fewshot_pickle_label_outside_the_dataset(tmp_path, fake_dassl):
    write_dataset(tmp_path, "eurosat", images_per_class=5, image_size=8)  # 10 classes
    full = load_split("eurosat", tmp_path)
    data = {"train": [fake_dassl(r.path, r.label, r.classname) for r in full.train[:3]],
            "val": [fake_dassl(full.val[0].path, 12, full.val[0].classname)]}
    pkl = tmp_path / "eurosat" / "split_fewshot" / "shot_1-seed_1.pkl"
    pkl.parent.mkdir()
    with open(pkl, "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(ValueError) as err:
        load_split("eurosat", tmp_path, shots=1, seed=1)
    assert _one_line(err) == (f"{pkl}: val[0] ({full.val[0].path}, label 12) names no class: "
                              f"labels must be 0..9 (10 classes); fix the label or remove the item")


def test_imagenet_preprocessed_pickle_with_a_gap(tmp_path, fake_dassl):
    write_dataset(tmp_path, "imagenet", num_classes=3, images_per_class=4, image_size=8)
    first = load_split("imagenet", tmp_path)
    data = {s: [fake_dassl(r.path, r.label, r.classname) for r in getattr(first, s)]
            for s in ("train", "test")}
    data["test"][0] = fake_dassl(first.test[0].path, 5, "tench")
    pkl = tmp_path / "imagenet" / "preprocessed.pkl"
    with open(pkl, "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(ValueError) as err:
        load_split("imagenet", tmp_path)
    assert _one_line(err).startswith(f"{pkl}: test[0] (")
    assert "label 5) names no class: labels must be 0..3 (4 classes)" in str(err.value)


@pytest.mark.parametrize("shots", [0, -2, -16])
def test_shots_zero_or_negative(tmp_path, shots):
    with pytest.raises(ValueError) as err:
        load_split("eurosat", tmp_path, shots=shots)
    assert _one_line(err) == f"shots must be -1 (all images) or >= 1, got {shots}"


def test_shots_minus_one_and_positive_are_fine(tmp_path):
    write_dataset(tmp_path, "eurosat", images_per_class=5, image_size=8)
    assert len(load_split("eurosat", tmp_path, shots=-1).train) == 20
    assert len(load_split("eurosat", tmp_path, shots=1).train) == 10
