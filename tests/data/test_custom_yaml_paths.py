"""Dataset YAMLs: paths relative to the YAML's folder whatever the cwd or --root, no root needed,
`name:` honoured, dataset_name / is_dataset_file, no folder named after the YAML."""

import os
from pathlib import Path

import pytest
from PIL import Image

from vlprompt.cli import main
from vlprompt.data import dataset_name, is_dataset_file, load_split
from vlprompt.data.splits import _fewshot_cache_path, resolve_dataset


def _tree(base: Path, classes, n):
    for c in classes:
        (base / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 20, 40, 0)).save(base / c / f"{i}.png")


@pytest.fixture
def project(tmp_path):
    """``project/data/{a,b}/*.png`` and ``project/cfg/birds.v2.yaml`` pointing at ``../data``."""
    _tree(tmp_path / "project" / "data", ["a", "b"], 10)
    cfg = tmp_path / "project" / "cfg"
    cfg.mkdir()
    path = cfg / "birds.v2.yaml"
    path.write_text("image_root: ../data\nsplit_ratios: [0.5, 0.2, 0.3]\n")
    return path


def _snapshot(root: Path):
    return sorted(p.relative_to(root) for p in root.rglob("*"))


def test_absolute_yaml_needs_no_root(project):
    split = load_split(str(project), root=None)
    assert split.dataset == "birds.v2"  # the file stem, not the path
    assert (len(split.train), len(split.val), len(split.test)) == (10, 4, 6)
    assert all(r.path.startswith(str(project.parent.parent / "data")) for r in split.train)


def test_relative_yaml_from_another_cwd(project, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ref = load_split(project)
    split = load_split(os.path.join("project", "cfg", "birds.v2.yaml"))
    assert [r.path for r in split.train] == [r.path for r in ref.train]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    split = load_split(os.path.join("..", "project", "cfg", "birds.v2.yaml"), shots=2)
    assert len(split.train) == 4 and os.path.isabs(split.train[0].path)
    assert split.info["dataset_dir"] == str(tmp_path / "project" / "data")


def test_root_is_ignored_for_a_yaml(project, tmp_path):
    split = load_split(project, root=tmp_path / "somewhere" / "else")
    assert split.info["dataset_dir"] == str(project.parent.parent / "data")


def test_name_is_honoured(project):
    project.write_text("name: my_birds\n" + project.read_text())
    assert load_split(project).dataset == "my_birds"
    assert dataset_name(str(project)) == "my_birds"
    assert resolve_dataset(str(project), None).name == "my_birds"


@pytest.mark.parametrize("name", ["../up", "a/b", ".hidden", "a\\\\b"])
def test_names_that_cannot_be_folders_are_refused(project, name):
    project.write_text(f'name: "{name}"\n' + project.read_text())
    with pytest.raises(ValueError) as err:
        dataset_name(project)
    text = str(err.value)
    assert text.startswith(f"{project}: name ") and "it names the run folders" in text
    assert "\n" not in text


def test_dataset_name_reads_no_image(project, tmp_path):
    missing = tmp_path / "other.yml"
    missing.write_text("image_root: /nowhere/at/all\nsplit_file: split.json\n")
    assert dataset_name(str(missing)) == "other"  # images and split file are never looked at
    assert dataset_name("EuroSAT") == "eurosat" and dataset_name("imagenet-r", root="/x") == \
        "imagenet_r"
    with pytest.raises(FileNotFoundError) as err:
        dataset_name(str(tmp_path / "nope.yaml"))
    assert str(err.value).startswith(f"dataset file {tmp_path / 'nope.yaml'} not found")
    with pytest.raises(KeyError, match="unknown dataset 'nope'"):
        dataset_name("nope")


def test_is_dataset_file():
    assert is_dataset_file("my.yaml") and is_dataset_file(Path("a/B.YML"))
    assert not is_dataset_file("eurosat") and not is_dataset_file("yaml")


def test_registered_dataset_still_needs_a_root():
    with pytest.raises(ValueError) as err:
        load_split("eurosat")
    assert str(err.value) == ("eurosat: a data root is needed (the folder that contains "
                              "'eurosat/'); pass --root")


def test_no_folder_named_after_the_yaml(project, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = Path(os.environ["VLPROMPT_CACHE"])
    before, before_cache = _snapshot(tmp_path), _snapshot(cache)
    load_split(project, shots=2, seed=3, subsample="base")
    assert _snapshot(tmp_path) == before and _snapshot(cache) == before_cache
    path = _fewshot_cache_path(resolve_dataset(project, None), 2, 3)
    assert path.parent.name.startswith("birds.v2-") and path.parent.parent.name == "fewshot"


def test_fewshot_dir_and_split_file_resolve_against_the_yaml(tmp_path, monkeypatch):
    from vlprompt.data.synthetic import write_dataset

    write_dataset(tmp_path / "d", "eurosat", images_per_class=5, image_size=8)
    cfg = tmp_path / "d" / "eurosat" / "sat.yaml"
    cfg.write_text("name: sat\nimage_root: 2750\nsplit_file: split_zhou_EuroSAT.json\n"
                   "fewshot_dir: split_fewshot\n")
    monkeypatch.chdir(tmp_path)
    ds = resolve_dataset("d/eurosat/sat.yaml", None)
    assert ds.fewshot_pickle(1, 2) == tmp_path / "d" / "eurosat" / "split_fewshot" / \
        "shot_1-seed_2.pkl"
    ref = load_split("eurosat", tmp_path / "d", shots=1, seed=2)
    split = load_split("d/eurosat/sat.yaml", shots=1, seed=2)
    assert [r.path for r in split.train] == [r.path for r in ref.train]


def test_datasets_check_yaml_without_root(project, capsys):
    assert main(["datasets", "check", str(project)]) == 0
    out = capsys.readouterr().out
    assert "dataset      birds.v2" in out and "undecodable  0 of 20 images decoded" in out
