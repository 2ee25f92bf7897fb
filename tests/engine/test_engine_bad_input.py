"""Bad input found before training, and YAML datasets through `train` and `run` (no --root,
folders named after the dataset's name, `run --datasets my.yaml`)."""

import json
import shutil

import pytest
from PIL import Image

from vlprompt.cli import main
from vlprompt.engine import run_experiment

FAST = ["train.max_epoch=1", "train.batch_size=4", "train.num_workers=0"]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_training_image_stops_the_run_before_the_first_step(world, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(world.data, data)
    from vlprompt.data import load_split

    split = load_split("eurosat", data, shots=2, seed=1, subsample="base")
    bad = split.train[0].path
    _truncate(__import__("pathlib").Path(bad))
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"1 training image\(s\) of eurosat cannot be read, "
                                         rf"e.g. {bad} .*--skip-missing"):
        run_experiment("coop", "eurosat", data, world.clip_path, run_dir, shots=2,
                       subsample="base", overrides=FAST, show_progress=False)
    assert not (run_dir / "config.yaml").exists()  # nothing started: the folder stays reusable
    results = run_experiment("coop", "eurosat", data, world.clip_path, run_dir, shots=2,
                             subsample="base", overrides=FAST, show_progress=False,
                             skip_missing=True)
    assert results["train"]["finished"]


@pytest.fixture
def yaml_dataset(tmp_path):
    """``project/images/<class>/*.png`` and ``project/my.yaml`` named ``birds``."""
    for c, colour in (("jay", (200, 30, 30)), ("owl", (30, 200, 30)), ("wren", (30, 30, 200))):
        (tmp_path / "project" / "images" / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (32, 32), tuple(v + 5 * i for v in colour)).save(
                tmp_path / "project" / "images" / c / f"{i}.png")
    path = tmp_path / "project" / "my.yaml"
    path.write_text("name: birds\nimage_root: images\nsplit_ratios: [0.5, 0.2, 0.3]\n")
    return path


def test_a_yaml_dataset_trains_without_root_and_names_its_folders(world, tmp_path, yaml_dataset,
                                                                  monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main(["train", "--method", "coop", "--dataset", "project/my.yaml", "--backbone",
                 str(world.clip_path), "--shots", "2", "--output", str(out), "--device", "cpu",
                 *FAST]) == 0
    run_dir = out / "train" / "coop" / "birds" / "shots_2" / "seed1"
    assert "birds/all: accuracy" in capsys.readouterr().out
    assert json.loads((run_dir / "results.json").read_text())["dataset"] == "birds"
    assert not list(out.rglob("my.yaml*"))
    assert main(["run", "fewshot", "--method", "coop", "--datasets", str(yaml_dataset),
                 "--seeds", "1", "--shots", "2", "--root", str(tmp_path), "--backbone",
                 str(world.clip_path), "--output", str(out), "--device", "cpu", *FAST]) == 0
    results = json.loads((out / "fewshot" / "coop" / "birds" / "shots_2" / "seed1"
                          / "results.json").read_text())
    assert set(results["evaluations"]) == {"birds/all"}
    assert main(["report", str(out / "fewshot")]) == 0
    assert "| birds |" in capsys.readouterr().out
