"""End to end: `vlprompt run base2new` with the real engine on a tiny CLIP and synthetic EuroSAT,
then `vlprompt report`, then a second run that skips everything."""

from __future__ import annotations

import json

import pytest

from vlprompt.cli import main
from vlprompt.data.synthetic import write_dataset
from vlprompt.report import harmonic_mean


@pytest.fixture(scope="module")
def setup(eurosat_world):
    return eurosat_world


def test_base2new_run_report_and_skip(setup, capsys, caplog):
    tmp, backbone = setup
    out = tmp / "out"
    argv = ["run", "base2new", "--method", "coop", "--datasets", "eurosat", "--seeds", "1,2",
            "--root", str(tmp / "data"), "--backbone", str(backbone), "--output", str(out),
            "--device", "cpu", "train.max_epoch=1", "train.num_workers=0", "train.batch_size=8"]
    assert main(argv) == 0
    dirs = [out / "base2new" / "coop" / "eurosat" / "shots_16" / f"seed{s}" for s in (1, 2)]
    accs = {}
    for seed, run_dir in enumerate(dirs, 1):
        results = json.loads((run_dir / "results.json").read_text())
        assert (results["method"], results["protocol"], results["subsample"]) == (
            "coop", "base2new", "base")
        assert (results["seed"], results["shots"]) == (seed, 16)
        assert results["train"]["finished"] and results["train"]["epochs"] == 1
        assert results["config"]["train"]["max_epoch"] == 1
        evals = results["evaluations"]
        assert sorted(evals) == ["eurosat/base", "eurosat/new"]
        base, new = evals["eurosat/base"], evals["eurosat/new"]
        # 10 classes: base = first 5, new = last 5, 3 test images each (synthetic 50/20/30 split)
        assert len(base["classnames"]) == len(new["classnames"]) == 5
        assert not set(base["classnames"]) & set(new["classnames"])
        assert base["num_images"] == new["num_images"] == 15
        accs[seed] = (base["accuracy"], new["accuracy"])

    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    row = [line for line in table.splitlines() if line.startswith("| eurosat |")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")][1:]
    mean_base = (accs[1][0] + accs[2][0]) / 2
    mean_new = (accs[1][1] + accs[2][1]) / 2
    assert cells[0].startswith(f"{mean_base:.2f} ± ")
    assert cells[1].startswith(f"{mean_new:.2f} ± ")
    assert cells[2] == f"{harmonic_mean(mean_base, mean_new):.2f}"

    # a second run skips both (no training, no evaluation: results.json untouched)
    stamps = [(d / "results.json").stat().st_mtime_ns for d in dirs]
    caplog.clear()
    caplog.set_level("INFO", logger="vlprompt")
    assert main(argv) == 0
    assert [(d / "results.json").stat().st_mtime_ns for d in dirs] == stamps
    assert caplog.text.count("skipped (finished") == 2

    # a changed hyper-parameter is not silently skipped
    assert main(argv[:-3] + ["train.max_epoch=3", "train.num_workers=0", "train.batch_size=8"]) == 1
    assert "different config" in capsys.readouterr().err


def test_xd_then_dg_reuse_the_imagenet_model(setup, capsys):
    tmp, backbone = setup
    for name in ("imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"):
        write_dataset(tmp / "data", name, num_classes=4, images_per_class=4, image_size=32)
    out = tmp / "out_xd"
    common = ["--method", "coop", "--seeds", "1", "--root", str(tmp / "data"), "--backbone",
              str(backbone), "--output", str(out), "--device", "cpu", "train.max_epoch=1",
              "train.num_workers=0", "train.batch_size=8"]
    assert main(["run", "xd", "--datasets", "eurosat"] + common) == 0
    results_file = out / "xd" / "coop" / "imagenet" / "shots_16" / "seed1" / "results.json"
    trained = json.loads(results_file.read_text())
    assert sorted(trained["evaluations"]) == ["eurosat/all", "imagenet/all"]
    assert trained["evaluations"]["eurosat/all"]["num_images"] == 30  # 10 classes x 3

    assert main(["run", "dg"] + common) == 0
    results = json.loads(results_file.read_text())
    assert results["train"] == trained["train"]  # not retrained
    assert sorted(results["evaluations"]) == sorted(
        ["eurosat/all", "imagenet/all", "imagenetv2/all", "imagenet_sketch/all",
         "imagenet_a/all", "imagenet_r/all"])

    capsys.readouterr()
    assert main(["report", str(out), "--format", "json"]) == 0
    tables = {t["title"]: t for t in json.loads(capsys.readouterr().out)["tables"]}
    dg = tables["Domain generalisation"]
    assert dg["columns"] == ["imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a",
                             "imagenet_r", "Target avg"]
    cells = dg["rows"][0]["cells"]
    targets = [results["evaluations"][f"{d}/all"]["accuracy"] for d in dg["columns"][1:5]]
    assert cells["Target avg"]["mean"] == pytest.approx(sum(targets) / 4)
    assert tables["Cross-dataset transfer"]["columns"] == ["imagenet", "eurosat", "Target avg"]
