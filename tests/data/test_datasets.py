"""Every benchmark layout: a synthetic copy in the real layout loads with the right classes."""

import math

import pytest

from vlprompt.data import list_datasets, load_split
from vlprompt.data.synthetic import write_dataset

ALL = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
       "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101", "imagenetv2", "imagenet_sketch",
       "imagenet_a", "imagenet_r"]
TEST_ONLY = {"imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for name in ALL:
        write_dataset(root, name, num_classes=5, images_per_class=6, image_size=16)
    return root


def test_registry_lists_the_15_benchmarks():
    assert set(ALL) <= set(list_datasets())


@pytest.mark.parametrize("name", ALL)
def test_layout_loads(root, name):
    split = load_split(name, root)
    assert split.dataset == name
    assert len(split.classnames) == 5
    assert "{}" in split.template
    assert {r.label for r in split.test} == set(range(5))
    if name in TEST_ONLY:
        assert split.train == [] and split.val == [] and len(split.test) == 30
    elif name == "imagenet":
        assert len(split.train) == 15 and split.val == split.test and len(split.test) == 15
    else:
        assert (len(split.train), len(split.val), len(split.test)) == (15, 5, 10)
    for r in split.train + split.test:
        assert r.path.startswith(str(root))
        assert split.classnames[r.label] == r.classname.replace("_", " ")


def test_real_names_and_folders(root):
    eurosat = load_split("eurosat", root)
    assert eurosat.classnames[0] == "Annual Crop Land"
    assert "/eurosat/2750/AnnualCrop/" in eurosat.train[0].path
    assert eurosat.template == "a centered satellite photo of {}."
    assert load_split("dtd", root).template == "{} texture."
    pets = load_split("oxford_pets", root)
    assert pets.classnames[:2] == ["abyssinian", "american bulldog"]
    assert load_split("imagenet", root).classnames[:2] == ["tench", "goldfish"]
    # ImageNet-A keeps its own (sorted wnid) folders as labels 0..k-1
    a = load_split("imagenet_a", root)
    assert a.classnames[0] == "stingray"  # n01498041, the first wnid of the 200 A classes
    cars = load_split("stanford_cars", root)
    assert all("/stanford_cars/cars_test/" in r.path for r in cars.test)


def test_dassl_names_work(root):
    assert load_split("EuroSAT", root).dataset == "eurosat"
    assert load_split("DescribableTextures", root).dataset == "dtd"


def test_base_new_counts_on_real_class_counts(tmp_path):
    for n, (b, nw) in {37: (19, 18), 47: (24, 23), 101: (51, 50), 10: (5, 5)}.items():
        names = [f"c{i}" for i in range(n)]
        write_dataset(tmp_path / str(n), "dtd", classnames=names, images_per_class=3,
                      image_size=8)
        base = load_split("dtd", tmp_path / str(n), subsample="base")
        new = load_split("dtd", tmp_path / str(n), subsample="new")
        assert (len(base.classnames), len(new.classnames)) == (b, nw)
        assert new.classnames[0] == f"c{math.ceil(n / 2)}"
        assert {r.label for r in new.test} == set(range(nw))
        assert {r.label for r in base.train} == set(range(b))


def test_base_new_uses_label_ids_not_names(tmp_path):
    root = tmp_path
    write_dataset(root, "eurosat", images_per_class=3, image_size=8)
    base = load_split("eurosat", root, subsample="base")
    assert base.classnames == ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land",
                               "Highway or Road", "Industrial Buildings"]
    # relabelled test items keep their paths/classnames
    new = load_split("eurosat", root, subsample="new")
    assert all(new.classnames[r.label] == r.classname for r in new.test)
    assert new.classnames[0] == "Pasture Land"


def test_new_json_dataset_is_a_few_lines(tmp_path, monkeypatch):
    from vlprompt.data import JsonSplitDataset, base, get_dataset, register_dataset

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # leave the registry as found

    @register_dataset
    class ToyTest(JsonSplitDataset):
        name = "toy_test_only"
        folder = "toy"
        image_dir = "images"
        split_file = "split_toy.json"
        template = "a toy {}."
        num_classes = 3

    assert get_dataset("toy_test_only") is ToyTest
    write_dataset(tmp_path, "toy_test_only", num_classes=3, images_per_class=4, image_size=8)
    assert (tmp_path / "toy" / "split_toy.json").is_file()
    split = load_split("toy_test_only", tmp_path, subsample="new")
    assert split.classnames == ["class 002"] and split.template == "a toy {}."
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(type("Clash", (JsonSplitDataset,), {"name": "eurosat", "folder": "x"}))


REAL_COUNTS = {"caltech101": 100, "oxford_pets": 37, "stanford_cars": 196, "oxford_flowers": 102,
               "food101": 101, "fgvc_aircraft": 100, "sun397": 397, "dtd": 47, "eurosat": 10,
               "ucf101": 101}


@pytest.mark.parametrize("name", sorted(REAL_COUNTS))
def test_all_real_names_make_valid_layouts(tmp_path, name):
    """Every shipped class name maps to a path of the real layout and reads back unchanged."""
    from vlprompt.data import get_dataset

    real = get_dataset(name).default_classnames()
    assert real is not None and len(real) == REAL_COUNTS[name]
    write_dataset(tmp_path, name, num_classes=len(real), images_per_class=3, image_size=4)
    split = load_split(name, tmp_path)
    assert split.classnames == [c.replace("_", " ") for c in real]
    assert {r.label for r in split.test} == set(range(len(real)))
    paths = {r.classname: r.path for r in split.test}
    if name == "sun397":
        assert "/sun397/SUN397/a/apartment_building/outdoor/" in paths["outdoor apartment_building"]
        assert "/t/theater/indoor_procenium/" in paths["indoor_procenium theater"]
    if name == "caltech101":
        assert "/101_ObjectCategories/Faces/" in paths["face"]
    if name == "ucf101":
        assert "/Apply_Eye_Makeup/v_ApplyEyeMakeup_" in paths["Apply_Eye_Makeup"]
