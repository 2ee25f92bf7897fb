"""``vlprompt import`` makes an ordinary run folder of every supported official run:
``eval``, ``predict`` and ``report`` use it, and its logits are the official tensors' logits."""

import json

import pytest
import torch

from vlprompt.cli import main
from vlprompt.engine.checkpoint import read_header
from vlprompt.interop.export import _run_method

from .official_files import METHODS, official_states, random_method, write_log, write_official


@pytest.mark.parametrize("name", METHODS)
def test_import_then_eval_predict_report(name, world, batch, tmp_path, capsys):
    ref = random_method(name, world.clip, world.classnames, template=world.template)
    official = tmp_path / "official"
    write_official(official, official_states(name, ref, world.clip), method=name)
    run = tmp_path / "runs" / name
    assert main(["import", str(official), "--method", name, "--dataset", "eurosat",
                 "--root", world.data, "--backbone", world.clip_path, "--output", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"run folder: {run}" in out and "eurosat/all: accuracy" in out
    header = read_header(run)
    assert header["method"] == name and header["imported_from"]["epoch"] == 5
    assert header["imported_from"]["unplaced"] == []
    model, _, _ = _run_method(run, None, "cpu")
    with torch.no_grad():
        assert torch.equal(model(batch), ref(batch))  # the same tensors, the same logits

    assert main(["eval", "--checkpoint", str(run), "--dataset", "eurosat", "--root", world.data,
                 "--subsample", "new"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert {"eurosat/all", "eurosat/new"} <= set(results["evaluations"])
    assert main(["predict", "--checkpoint", str(run), "--topk", "2", *world.images]) == 0
    assert main(["report", str(tmp_path / "runs")]) == 0
    assert name in capsys.readouterr().out


def test_eval_official_folder_on_the_command_line(world, tmp_path, capsys):
    ref = random_method("maple", world.clip, world.classnames)
    official = tmp_path / "official"
    write_official(official, official_states("maple", ref, world.clip))
    write_log(official, "MaPLe", {"TRAINER": {"NAME": "MaPLe", "MAPLE": {
        "N_CTX": 2, "CTX_INIT": "a photo of a", "PROMPT_DEPTH": 9}},
        "MODEL": {"BACKBONE": {"NAME": world.clip_path}}})
    argv = ["eval", "--checkpoint", str(official), "--dataset", "eurosat", "--root", world.data]
    assert main(argv) == 1
    assert "pass --method" in capsys.readouterr().err
    assert main(argv + ["--method", "maple"]) == 0  # the backbone comes from log.txt
    assert "eurosat/all: accuracy" in capsys.readouterr().out
    assert not list(official.rglob("results.json"))  # nothing written into the official folder
    assert main(argv + ["--method", "coop"]) == 1
    err = capsys.readouterr().err
    assert "no official coop checkpoint" in err and len(err.strip().splitlines()) == 1


def test_import_infers_subsample_shots_and_seed(world, tmp_path, capsys):
    ref = random_method("coop", world.clip, world.classnames[:5], n_ctx=4, ctx_init="a photo of a")
    official = tmp_path / "base2new" / "train_base" / "eurosat" / "shots_16" / "CoOp" / "seed2"
    write_official(official, official_states("coop", ref, world.clip))
    write_log(official, "CoOp", {"TRAINER": {"NAME": "CoOp", "COOP": {
        "N_CTX": 4, "CTX_INIT": "a photo of a", "CSC": False, "CLASS_TOKEN_POSITION": "end"}},
        "DATASET": {"NAME": "EuroSAT", "NUM_SHOTS": 16, "SUBSAMPLE_CLASSES": "base"},
        "SEED": 2, "OPTIM": {"MAX_EPOCH": 5, "LR": 0.002}}, seed=2)
    run = tmp_path / "run"
    assert main(["import", str(official / "prompt_learner" / "model.pth.tar-5"), "--method",
                 "coop", "--dataset", "eurosat", "--root", world.data, "--backbone",
                 world.clip_path, "--output", str(run)]) == 0
    results = json.loads((run / "results.json").read_text())
    assert (results["subsample"], results["shots"], results["seed"]) == ("base", 16, 2)
    assert "eurosat/base" in results["evaluations"]
    assert results["config"]["method"]["ctx_init"] == "a photo of a"
    assert any("from log.txt" in n for n in results["imported_from"]["inferred"])
    assert main(["import", str(official), "--method", "coop", "--dataset", "eurosat", "--root",
                 world.data, "--backbone", world.clip_path, "--output", str(run)]) == 1
    assert "--force" in capsys.readouterr().err


def test_official_options_are_refused_for_a_vlprompt_run(world, tmp_path, capsys):
    ref = random_method("coop", world.clip, world.classnames)
    write_official(tmp_path / "official", official_states("coop", ref, world.clip))
    run = tmp_path / "run"
    assert main(["import", str(tmp_path / "official"), "--method", "coop", "--dataset",
                 "eurosat", "--root", world.data, "--backbone", world.clip_path, "--output",
                 str(run), "--no-eval"]) == 0
    assert not (run / "results.json").read_text().count('"accuracy"')
    assert main(["eval", "--checkpoint", str(run), "--dataset", "eurosat", "--root", world.data,
                 "--method", "coop"]) == 1
    assert "only for official checkpoints" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "official"), "--method", "zeroshot", "--dataset",
                 "eurosat", "--root", world.data, "--output", str(tmp_path / "z")]) == 1
    assert "no official repository layout" in capsys.readouterr().err
