"""`vlprompt run base2new` works for every registered method on synthetic EuroSAT-layout data:
each trains (paper config, schedule shortened), evaluates base and new, and reports."""

from __future__ import annotations

import json

import pytest

from vlprompt.cli import main
from vlprompt.engine.rundir import RunDir
from vlprompt.methods import get_method, list_methods


@pytest.fixture(scope="module")
def setup(eurosat_world):
    """The data, plus LLM class descriptions in the official format for the methods that read
    them (CoPrompt): written here, given through $VLPROMPT_DESCRIPTIONS."""
    from vlprompt.data.base import packaged_classnames
    from vlprompt.data.descriptions import ENV_VAR, write_descriptions

    tmp, _ = eurosat_world
    write_descriptions(tmp / "descriptions", "eurosat",
                       {n: [f"a satellite photo of {n}.", f"{n} seen from above."]
                        for n in packaged_classnames("eurosat")})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_VAR, str(tmp / "descriptions"))
        yield eurosat_world


@pytest.mark.parametrize("method", list_methods())
def test_base2new_runs_for_method(setup, method, capsys):
    tmp, backbone = setup
    out = tmp / "out"
    argv = ["run", "base2new", "--method", method, "--datasets", "eurosat", "--seeds", "1",
            "--shots", "4", "--root", str(tmp / "data"), "--backbone", str(backbone),
            "--output", str(out), "--device", "cpu", "train.max_epoch=2", "train.num_workers=0",
            "train.batch_size=4"]
    if get_method(method).teacher_recipe({}) is not None:  # its teacher run on the same CLIP
        argv += [f"method.teacher_backbone={backbone}",
                 "method.teacher_overrides=[train.max_epoch=1, train.batch_size=4, "
                 "train.num_workers=0]"]
    assert main(argv) == 0
    run_dir = out / "base2new" / method / "eurosat" / "shots_4" / "seed1"
    results = json.loads((run_dir / "results.json").read_text())
    assert sorted(results["evaluations"]) == ["eurosat/base", "eurosat/new"]
    for entry in results["evaluations"].values():
        assert entry["num_images"] == 15 and 0.0 <= entry["accuracy"] <= 100.0
    trains = get_method(method).trainable
    assert results["train"]["finished"]
    assert (results["num_trainable_params"] > 0) == trains
    if trains:
        assert RunDir(run_dir).latest_generation(verify=True).tensors.is_file()
        assert len(results["train"]["loss_history"]) == 2
    capsys.readouterr()
    assert main(["report", str(out / "base2new" / method)]) == 0
    assert "| eurosat |" in capsys.readouterr().out


def test_a_step_budget_runs_through_the_command_line(setup):
    """``train.max_steps`` (with the per-step cosine) on a packaged config: the run stops after
    exactly that many steps, mid-epoch, and is recorded as finished."""
    tmp, backbone = setup
    out = tmp / "out_steps"
    argv = ["run", "base2new", "--method", "tcp", "--datasets", "eurosat", "--seeds", "1",
            "--shots", "4", "--root", str(tmp / "data"), "--backbone", str(backbone),
            "--output", str(out), "--device", "cpu", "train.max_steps=7", "train.num_workers=0",
            "train.batch_size=4", "train.lr_scheduler=cosine_step"]
    assert main(argv) == 0
    run_dir = out / "base2new" / "tcp" / "eurosat" / "shots_4" / "seed1"
    results = json.loads((run_dir / "results.json").read_text())
    # 5 base classes x 4 shots = 20 images, batch 4: 5 steps an epoch, 7 steps = 2 epochs
    assert results["train"]["finished"] and len(results["train"]["loss_history"]) == 2
    assert results["config"]["train"]["max_steps"] == 7


def test_promptkd_chain_trains_the_teacher_then_distils_transductively(setup, capsys,
                                                                     monkeypatch):
    """One ``vlprompt run base2new``: the PromptSRC teacher is trained first in
    ``<run>/teacher/`` (base classes, the run's shots), then the student on the unlabeled train
    images of all classes; the report labels it transductive and keeps it out of the averages."""
    from vlprompt.data import load_split
    from vlprompt.engine import checkpoint as ckpt

    import vlprompt.engine.run as engine_run

    tested = []  # the classes the method classifies at each test (its logits' width)
    real_evaluate = engine_run.evaluate_method

    def evaluate(method, dataset, classnames, **kwargs):
        tested.append((method.name, list(method.classnames), list(classnames)))
        return real_evaluate(method, dataset, classnames, **kwargs)
    monkeypatch.setattr(engine_run, "evaluate_method", evaluate)
    tmp, backbone = setup
    out = tmp / "out_kd"
    common = ["--datasets", "eurosat", "--seeds", "1", "--shots", "4", "--root",
              str(tmp / "data"), "--backbone", str(backbone), "--output", str(out), "--device",
              "cpu", "train.max_epoch=1", "train.num_workers=0", "train.batch_size=4"]
    assert main(["run", "base2new", "--method", "promptkd", *common,
                 f"method.teacher_backbone={backbone}",
                 "method.teacher_overrides=[train.max_epoch=1, train.batch_size=4]"]) == 0
    run_dir = out / "base2new" / "promptkd" / "eurosat" / "shots_4" / "seed1"
    teacher = json.loads((run_dir / "teacher" / "results.json").read_text())
    assert teacher["method"] == "promptsrc" and teacher["subsample"] == "base"
    assert teacher["shots"] == 4 and teacher["train"]["finished"]
    assert teacher["config"]["train"]["lr"] == 0.005  # configs/promptkd/teacher.yaml
    results = json.loads((run_dir / "results.json").read_text())
    assert sorted(results["evaluations"]) == ["eurosat/base", "eurosat/new"]
    base = load_split("eurosat", tmp / "data", shots=-1, subsample="base")
    # trained on all classes, tested on the base classes only (not a 10-way test)
    assert tested and all(m == c for _, m, c in tested)  # trained on 10, tests 5-way
    assert [n for n, _, _ in tested] == ["promptsrc", "promptkd", "promptkd"]
    from vlprompt.engine import evaluate_run

    again = evaluate_run(run_dir, "eurosat", tmp / "data", subsample="base")
    assert again["classnames"] == list(base.classnames)
    for k in ("accuracy", "per_class_accuracy", "macro_f1"):
        assert again[k] == results["evaluations"]["eurosat/base"][k], k
    header = ckpt.newest_generation(run_dir).header()
    everything = load_split("eurosat", tmp / "data", shots=-1, subsample="all")
    assert header["classnames"] == list(everything.classnames)  # base and new
    assert header["method_config"]["teacher"] == str(run_dir / "teacher")
    log = (run_dir / "log.txt").read_text()
    assert f"({len(everything.classnames)} classes; {len(everything.train)} train" in log
    import yaml

    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["transductive"] is True
    # a second run reuses both runs
    assert main(["run", "base2new", "--method", "promptkd", *common,
                 f"method.teacher_backbone={backbone}",
                 "method.teacher_overrides=[train.max_epoch=1, train.batch_size=4]"]) == 0
    assert main(["run", "base2new", "--method", "coop", *common]) == 0
    capsys.readouterr()
    assert main(["report", str(out / "base2new")]) == 0
    report = capsys.readouterr().out
    assert "promptkd [transductive]" in report
    assert "Base-to-new: transductive methods" in report
