"""run_experiment / evaluate_run end to end on a synthetic EuroSAT with a tiny CLIP file."""

import json
import re

import pytest
import torch
import yaml

from vlprompt.clip.model import build_clip
from vlprompt.engine import evaluate_run, predict_with_checkpoint, run_experiment
from vlprompt.engine.checkpoint import read_header, read_tensors
from vlprompt.engine.rundir import RunDir

FAST = ["num_workers=0", "print_freq=100"]
COOP = ["max_epoch=10", "batch_size=8", *FAST]


def run(world, run_dir, method="coop", seed=1, overrides=COOP, **kw):
    kw.setdefault("protocol", "fewshot")
    return run_experiment(method, "eurosat", world.data, world.clip_path, run_dir, shots=8,
                          seed=seed, subsample="base", overrides=overrides, show_progress=False,
                          **kw)


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """CoOp (few-shot config: 16 random context vectors) on the 5 base classes, seeds 1 and 2."""
    root = tmp_path_factory.mktemp("runs")
    runs = {seed: root / "shots_8" / f"seed{seed}" for seed in (1, 2)}  # the protocol layout
    return {seed: (folder, run(world, folder, seed=seed)) for seed, folder in runs.items()}


def test_coop_learns_the_base_classes(trained):
    for seed, (_, results) in trained.items():
        losses = results["train"]["loss_history"]
        entry = results["evaluations"]["eurosat/base"]
        assert len(losses) == 10 and losses[-1] < 0.5 * losses[0], (seed, losses)
        assert entry["num_images"] == 25
        assert entry["accuracy"] > 35.0, (seed, entry["accuracy"])  # chance: 20%


def test_results_file_log_and_checkpoint(world, trained):
    run_dir, results = trained[1]
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    for key in ("vlprompt_version", "method", "protocol", "dataset", "backbone", "backbone_fingerprint",
                "shots", "seed", "subsample", "config", "num_trainable_params", "train",
                "evaluations", "versions"):
        assert key in results, key
    assert results["num_trainable_params"] == 16 * world.clip.text_width
    assert results["config"]["method"]["n_ctx"] == 16 and results["config"]["train"]["max_epoch"] == 10
    entry = results["evaluations"]["eurosat/base"]
    assert set(entry["per_class_accuracy"]) == set(entry["classnames"]) and len(entry["classnames"]) == 5
    assert 0 <= entry["macro_f1"] <= 100 and entry["num_correct"] == round(entry["accuracy"] * 25 / 100)
    # users' parse scripts: the accuracy after '=> result'
    log = (run_dir / "log.txt").read_text()
    tail = log.split("=> result", 1)[1]
    assert float(re.search(r"\* accuracy: ([\.\deE+-]+)%", tail).group(1)) == round(entry["accuracy"], 1)
    assert "Finish training" in log and "* macro_f1:" in tail
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert stored["method"] == results["config"]["method"] and stored["run"]["seed"] == 1
    tensors, _ = read_tensors(run_dir)
    assert set(tensors) == {"ctx"}


def test_evaluate_run_on_new_classes_and_predict(world, trained):
    run_dir, _ = trained[1]
    entry = evaluate_run(run_dir, "eurosat", world.data, subsample="new", clip=world.clip)
    assert entry["num_images"] == 25 and entry["subsample"] == "new"
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["evaluations"]) == {"eurosat/base", "eurosat/new"}
    assert results["evaluations"]["eurosat/new"]["accuracy"] == entry["accuracy"]
    # Dassl's parse_test_res.py reads the last block of <folder>/seed*/log.txt: the run's own
    # log keeps only the base block, the new one has its own seed folder
    assert (run_dir / "log.txt").read_text().count("=> result") == 1
    new_log = run_dir.parent.parent / "shots_8_test_eurosat_new" / "seed1" / "log.txt"
    assert new_log.read_text().count("=> result") == 1
    # the base evaluation is reproduced from the checkpoint alone
    again = evaluate_run(run_dir, "eurosat", world.data, subsample="base", clip=world.clip)
    assert again["accuracy"] == results["evaluations"]["eurosat/base"]["accuracy"]
    images = sorted((world.data / "eurosat").rglob("*.jpg"))[:2]
    preds = predict_with_checkpoint(run_dir, images, topk=3, clip=world.clip)
    assert len(preds) == 2 and len(preds[0]) == 3
    assert preds[0][0][1] >= preds[0][1][1] and preds[0][0][0] in results["evaluations"]["eurosat/base"]["classnames"]
    preds = predict_with_checkpoint(run_dir, images[:1], classes=["dog", "cat"], clip=world.clip)
    assert {c for c, _ in preds[0]} == {"dog", "cat"}
    assert sum(p for _, p in preds[0]) == pytest.approx(1.0, abs=1e-5)


def test_finished_run_is_not_retrained_and_other_configs_refused(world, trained):
    run_dir, results = trained[1]
    tensors = RunDir(run_dir).latest_generation().tensors
    mtime = tensors.stat().st_mtime_ns
    again = run(world, run_dir, seed=1)
    assert again["train"] == results["train"]
    assert tensors.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match=r"different config \(train.lr"):
        run(world, run_dir, seed=1, overrides=[*COOP, "lr=0.5"])
    # runtime-only settings do not block
    run(world, run_dir, seed=1, overrides=[*COOP, "eval_batch_size=7"])


def test_kill_and_resume_matches_an_uninterrupted_run(world, tmp_path):
    overrides = ["max_epoch=3", "batch_size=8", *FAST]
    full = run(world, tmp_path / "full", overrides=overrides)

    class Killed(Exception):
        pass

    def kill_after_first_epoch(epoch):
        if epoch == 0:
            raise Killed

    with pytest.raises(Killed):
        run(world, tmp_path / "resumed", overrides=overrides, epoch_callback=kill_after_first_epoch)
    assert read_header(tmp_path / "resumed")["epoch"] == 1
    with pytest.raises(ValueError, match="holds a checkpoint"):
        run(world, tmp_path / "resumed", overrides=overrides, resume=False)
    resumed = run(world, tmp_path / "resumed", overrides=overrides)
    a, _ = read_tensors(tmp_path / "full")
    b, _ = read_tensors(tmp_path / "resumed")
    assert torch.equal(a["ctx"], b["ctx"])
    assert resumed["train"]["loss_history"] == full["train"]["loss_history"]
    assert resumed["evaluations"] == {k: {**v, "time_s": resumed["evaluations"][k]["time_s"]}
                                      for k, v in full["evaluations"].items()}
    # force starts over
    forced = run(world, tmp_path / "resumed", overrides=overrides, force=True)
    assert forced["train"]["loss_history"] == full["train"]["loss_history"]


def test_zeroshot_run_and_other_backbone_refused(world, tmp_path, trained):
    results = run(world, tmp_path / "zs", method="zeroshot", overrides=FAST, protocol="base2new")
    assert results["num_trainable_params"] == 0 and results["train"]["epochs"] == 0
    assert results["evaluations"]["eurosat/base"]["num_images"] == 25
    entry = evaluate_run(tmp_path / "zs", "eurosat", world.data, subsample="new", clip=world.clip)
    assert entry["num_images"] == 25
    torch.manual_seed(123)
    other = build_clip(world.clip.config)
    with pytest.raises(ValueError, match="trained on backbone .* different backbone"):
        evaluate_run(trained[1][0], "eurosat", world.data, subsample="new", clip=other)


def test_unknown_method_dataset_and_config_key(world, tmp_path):
    with pytest.raises(KeyError, match="unknown method 'nope'.*coop"):
        run(world, tmp_path / "a", method="nope")
    with pytest.raises(ValueError, match="unknown field 'n_context'.*n_ctx"):
        run(world, tmp_path / "b", overrides=["n_context=4"])
    with pytest.raises((KeyError, ValueError), match="nodataset"):
        run_experiment("coop", "nodataset", world.data, world.clip_path, tmp_path / "c",
                       overrides=FAST)


def test_kgcoop_uses_its_papers_dtd_template():
    from types import SimpleNamespace

    from vlprompt.engine.run import method_template
    from vlprompt.methods import get_method

    dtd = SimpleNamespace(dataset="dtd", template="{} texture.")
    custom = SimpleNamespace(dataset="my_set", template="a drawing of a {}.")
    assert method_template(get_method("kgcoop"), dtd) == "a photo of a {}, a type of texture."
    assert method_template(get_method("coop"), dtd) == "{} texture."
    assert method_template(get_method("kgcoop"), custom) == "a drawing of a {}."
