"""``vlprompt train`` / ``eval`` / ``methods`` through the real entry point (in-process)."""

import json

from vlprompt.cli import main
from vlprompt.engine.commands import default_run_dir


def test_train_then_eval(world, tmp_path, capsys):
    args = ["train", "--method", "coop", "--dataset", "eurosat", "--root", str(world.data),
            "--backbone", str(world.clip_path), "--shots", "2", "--seed", "3", "--subsample", "base",
            "--protocol", "base2new", "--output", str(tmp_path), "--device", "cpu",
            "max_epoch=1", "train.batch_size=4", "num_workers=0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    run_dir = default_run_dir(str(tmp_path), "base2new", "coop", "eurosat", 2, 3)
    assert run_dir == tmp_path / "base2new" / "coop" / "eurosat" / "shots_2" / "seed3"
    assert "eurosat/base: accuracy" in out and str(run_dir) in out
    results = json.loads((run_dir / "results.json").read_text())
    assert results["shots"] == 2 and results["config"]["train"]["max_epoch"] == 1
    assert main(["eval", "--checkpoint", str(run_dir), "--dataset", "eurosat", "--root",
                 str(world.data), "--subsample", "new", "--device", "cpu"]) == 0
    assert "eurosat/new: accuracy" in capsys.readouterr().out
    assert "eurosat/new" in json.loads((run_dir / "results.json").read_text())["evaluations"]
    # a different config in the same folder is refused with one clear line
    assert main(args[:-3] + ["max_epoch=2", "train.batch_size=4", "num_workers=0"]) == 1
    assert "different config (train.max_epoch: 1 -> 2)" in capsys.readouterr().err


def test_methods_and_user_errors(world, tmp_path, capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "coop" in out and "n_ctx=16" in out and "zeroshot" in out and "templates='single'" in out
    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["coop"]["config"]["n_ctx"] == 16 and "fewshot" in rows["coop"]["protocols"]
    base = ["train", "--dataset", "eurosat", "--root", str(world.data), "--backbone",
            str(world.clip_path), "--output", str(tmp_path)]
    assert main(base + ["--method", "nope"]) == 1
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(base + ["--method", "coop", "n_context=3"]) == 1
    assert "unknown field 'n_context'" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "none"), "--dataset", "eurosat",
                 "--root", str(world.data)]) == 1
    assert "not a vlprompt run folder" in capsys.readouterr().err


def test_skip_missing_drops_missing_images(tmp_path):
    """A missing image stops `train` with the file named; --skip-missing drops it and trains."""
    import shutil

    from vlprompt.cli import main as cli_main
    from vlprompt.clip.load import save_clip
    from vlprompt.clip.model import CLIPConfig, build_clip
    from vlprompt.data.synthetic import write_dataset

    folder = write_dataset(tmp_path / "data", "eurosat", num_classes=4, images_per_class=6)
    missing = sorted((folder / "2750").rglob("*.jpg"))[0]
    missing.unlink()
    backbone = save_clip(build_clip(CLIPConfig(embed_dim=32, image_size=32, patch_size=8,
                                               vision_width=64, vision_layers=2, vision_heads=2,
                                               text_width=64, text_layers=2, text_heads=2)),
                         tmp_path / "tiny.safetensors")
    argv = ["train", "--method", "coop", "--dataset", "eurosat", "--root", str(tmp_path / "data"),
            "--backbone", str(backbone), "--shots", "2", "--output", str(tmp_path / "out"),
            "--device", "cpu", "train.max_epoch=1", "train.num_workers=0", "train.batch_size=2",
            "method.n_ctx=2"]
    assert cli_main(argv) == 1
    assert cli_main(argv[:1] + ["--skip-missing"] + argv[1:]) == 0
    results = next((tmp_path / "out").rglob("results.json"))
    assert results.exists()
    shutil.rmtree(tmp_path / "out")
