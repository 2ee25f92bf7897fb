"""Clear errors, custom YAML datasets, synthetic learnability and the `vlprompt datasets` command."""

import json
import os

import numpy as np
import pytest
import yaml

from vlprompt.cli import main
from vlprompt.clip.templates import (IMAGENET_TEMPLATES, IMAGENET_TEMPLATES_SELECT,
                                     PROMPTSRC_TEMPLATES, dataset_template)
from vlprompt.data import load_split
from vlprompt.data.synthetic import Painter, write_dataset


@pytest.fixture
def eurosat(tmp_path):
    write_dataset(tmp_path, "eurosat", images_per_class=5, image_size=8)
    return tmp_path


def test_unknown_dataset_lists_known():
    with pytest.raises(KeyError, match="eurosat.*imagenet"):
        load_split("not_a_dataset", "/tmp")


def test_missing_files_error_and_skip(eurosat, caplog):
    victims = sorted((eurosat / "eurosat" / "2750" / "Forest").iterdir())[:2]
    for v in victims:
        v.unlink()
    with pytest.raises(FileNotFoundError, match=r"eurosat: 1 of .*Forest") as err:
        load_split("eurosat", eurosat)
    assert "missing" in str(err.value)
    split = load_split("eurosat", eurosat, skip_missing=True)
    assert all(os.path.isfile(r.path) for r in split.train + split.val + split.test)
    assert "dropping" in caplog.text


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="eurosat.*--root"):
        load_split("eurosat", tmp_path)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"train": [], "val": []}), "keys 'train', 'val', 'test'"),
    (json.dumps({"train": [["a.jpg", "x", "c"]], "val": [], "test": []}), r"train\[0\]"),
    (json.dumps({"train": [["a.jpg", 0]], "val": [], "test": []}), r"train\[0\]"),
])
def test_malformed_split_file(eurosat, content, message):
    path = eurosat / "eurosat" / "split_zhou_EuroSAT.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        load_split("eurosat", eurosat)
    assert "split_zhou_EuroSAT.json" in str(err.value)


def test_custom_yaml_with_split_file(tmp_path, eurosat):
    spec = {"name": "sat", "image_root": str(eurosat / "eurosat" / "2750"),
            "split_file": str(eurosat / "eurosat" / "split_zhou_EuroSAT.json"),
            "template": "satellite view of {}.", "classnames": {"Forest": "woodland"}}
    path = tmp_path / "sat.yaml"
    path.write_text(yaml.safe_dump(spec))
    split = load_split(str(path), shots=1, seed=1, subsample="base")
    ref = load_split("eurosat", eurosat, shots=1, seed=1, subsample="base")
    assert split.dataset == "sat" and split.template == "satellite view of {}."
    assert [r.path for r in split.train] == [r.path for r in ref.train]
    assert split.classnames[1] == "woodland"


def _tree(base, classes, n):
    from PIL import Image
    for c in classes:
        (base / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(base / c / f"{i}.png")


def test_custom_yaml_folders_and_ratios(tmp_path):
    for split in ("train", "val", "test"):
        _tree(tmp_path / "tree" / split, ["cat", "dog_breed"], 2)
    (tmp_path / "folders.yaml").write_text("image_root: tree\nfolders: {train: train, val: val, test: test}\n")
    s = load_split(tmp_path / "folders.yaml")
    assert s.classnames == ["cat", "dog breed"] and len(s.train) == len(s.val) == len(s.test) == 4
    assert s.template == "a photo of a {}."

    _tree(tmp_path / "flat", ["a", "b", "c"], 10)
    (tmp_path / "ratios.yaml").write_text("image_root: flat\nsplit_ratios: [0.5, 0.2, 0.3]\nsplit_seed: 3\n")
    r1 = load_split(tmp_path / "ratios.yaml")
    r2 = load_split(tmp_path / "ratios.yaml")
    assert (len(r1.train), len(r1.val), len(r1.test)) == (15, 6, 9)
    assert [x.path for x in r1.train] == [x.path for x in r2.train]
    assert not {x.path for x in r1.train} & {x.path for x in r1.test}

    (tmp_path / "bad.yaml").write_text("image_root: flat\nsplit_ratios: [0.5, 0.6]\n")
    with pytest.raises(ValueError, match="split_ratios"):
        load_split(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("image_rot: flat\n")
    with pytest.raises(ValueError, match="image_rot"):
        load_split(tmp_path / "typo.yaml")


def test_synthetic_classes_are_separable():
    """Nearest-class-mean on raw pixels separates the synthetic classes (they are learnable)."""
    painter = Painter(10, image_size=16, seed=0)
    means = np.stack([np.mean([np.asarray(painter(c, i), np.float32) for i in range(5)], 0)
                      for c in range(10)])
    hits = 0
    for c in range(10):
        for i in range(100, 105):
            x = np.asarray(painter(c, i), np.float32)
            hits += int(np.argmin(((means - x) ** 2).reshape(10, -1).sum(1)) == c)
    assert hits >= 48


def test_templates():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}." and IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert len(PROMPTSRC_TEMPLATES) == 60 and PROMPTSRC_TEMPLATES[0] == "a photo of a {}."
    assert PROMPTSRC_TEMPLATES[-1] == "itap of the {}."
    assert set(IMAGENET_TEMPLATES_SELECT) <= set(IMAGENET_TEMPLATES)
    assert dataset_template("dtd") == "{} texture."
    assert dataset_template("dtd", "kgcoop") == "a photo of a {}, a type of texture."
    assert dataset_template("food101") == "a photo of {}, a type of food."
    assert dataset_template("my_custom") == "a photo of a {}."


def test_cli_datasets_list_and_check(eurosat, capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "oxford_pets" in out and "19/18" in out and "imagenet-adversarial" in out
    assert main(["datasets", "check", "eurosat", "--root", str(eurosat)]) == 0
    out = capsys.readouterr().out
    assert "classes      10" in out and "base/new     5/5" in out and "not found" in out
    (sorted((eurosat / "eurosat" / "2750" / "River").iterdir())[0]).unlink()
    assert main(["datasets", "check", "eurosat", "--root", str(eurosat)]) == 1
    assert "missing      1" in capsys.readouterr().out
    assert main(["datasets", "check", "nope", "--root", str(eurosat)]) == 1
    assert "known datasets" in capsys.readouterr().err
