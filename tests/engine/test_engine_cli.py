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
