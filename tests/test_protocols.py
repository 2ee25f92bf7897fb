"""Protocol planning, skip/resume logic and the `vlprompt run` command, with a fake engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlprompt import protocols
from vlprompt.cli import main
from vlprompt.protocols import (DG_TARGETS, STANDARD_DATASETS, plan_protocol, run_protocol,
                                run_state)

KNOWN = list(STANDARD_DATASETS) + list(DG_TARGETS) + ["toyworld"]


@pytest.fixture(autouse=True)
def names(monkeypatch):
    monkeypatch.setattr(protocols, "known_datasets", lambda: KNOWN)
    monkeypatch.setattr(protocols, "known_methods", lambda: ["coop", "maple"])


class FakeEngine:
    """Records calls; writes results.json the way the engine does (primary evaluation by
    run_experiment, extra ones by evaluate_run)."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.fail_training = False

    @staticmethod
    def _write(run_dir: Path, results: dict) -> None:
        (Path(run_dir) / "results.json").write_text(json.dumps(results))

    def run_experiment(self, method, dataset, root, backbone, run_dir, shots=16, seed=1,
                       subsample="all", protocol=None, config_file=None, overrides=(),
                       resume=True, force=False, device=None, clip=None, skip_missing=False):
        assert clip is not None, "the runner must pass its loaded CLIP"
        path = Path(run_dir) / "results.json"
        if path.exists() and not force:  # the engine returns a finished run as it is
            results = json.loads(path.read_text())
            if results["train"]["finished"] and f"{dataset}/{subsample}" in results["evaluations"]:
                self.calls.append(("skip", str(run_dir)))
                return results
        self.calls.append(("train", str(run_dir), dataset, shots, seed, subsample, protocol,
                           tuple(overrides), force))
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        results = {"method": method, "protocol": protocol, "dataset": dataset, "shots": shots,
                   "seed": seed, "subsample": subsample, "backbone": str(backbone),
                   "train": {"finished": not self.fail_training}, "evaluations": {}}
        if not self.fail_training:
            results["evaluations"][f"{dataset}/{subsample}"] = {"accuracy": 50.0 + seed}
        self._write(run_dir, results)
        if self.fail_training:
            raise RuntimeError("interrupted")
        return results

    def evaluate_run(self, run_dir, dataset, root, subsample="all", device=None, clip=None,
                     skip_missing=False):
        assert clip is not None
        self.calls.append(("eval", str(run_dir), dataset, subsample))
        path = Path(run_dir) / "results.json"
        results = json.loads(path.read_text())
        results["evaluations"][f"{dataset}/{subsample}"] = {"accuracy": 40.0}
        self._write(run_dir, results)
        return results["evaluations"][f"{dataset}/{subsample}"]


@pytest.fixture
def engine(monkeypatch):
    import vlprompt.engine

    fake = FakeEngine()
    monkeypatch.setattr(vlprompt.engine, "run_experiment", fake.run_experiment)
    monkeypatch.setattr(vlprompt.engine, "evaluate_run", fake.evaluate_run)
    return fake


def run(tmp_path, protocol, **kw):
    kw.setdefault("clip", object())
    return run_protocol(protocol, kw.pop("method", "coop"), kw.pop("datasets", "eurosat"),
                        kw.pop("seeds", "1,2"), tmp_path / "data", "tiny.safetensors",
                        output=tmp_path / "out", **kw)


def test_plan_base2new_all_datasets(tmp_path):
    runs = plan_protocol("base2new", "coop", "all", "1,2,3", tmp_path)
    assert len(runs) == 33
    assert [r.dataset for r in runs[::3]] == list(STANDARD_DATASETS)
    first = runs[0]
    assert first.run_dir == tmp_path / "base2new" / "coop" / "imagenet" / "shots_16" / "seed1"
    assert (first.shots, first.subsample, first.protocol) == (16, "base", "base2new")
    assert first.evaluation_keys == ["imagenet/base", "imagenet/new"]
    assert [r.seed for r in runs[:3]] == [1, 2, 3]


def test_plan_fewshot_shots(tmp_path):
    runs = plan_protocol("fewshot", "coop", "dtd,eurosat", [1], tmp_path)
    assert [(r.dataset, r.shots) for r in runs] == [(d, k) for d in ("dtd", "eurosat")
                                                    for k in (1, 2, 4, 8, 16)]
    assert all(r.subsample == "all" and r.evaluation_keys == [f"{r.dataset}/all"] for r in runs)
    assert runs[1].run_dir.parts[-2:] == ("shots_2", "seed1")
    runs = plan_protocol("fewshot", "coop", "dtd", "1", tmp_path, shots="4,2")
    assert [r.shots for r in runs] == [4, 2]


def test_plan_xd_and_dg_share_the_source_model(tmp_path):
    xd = plan_protocol("xd", "coop", "all", "1,2", tmp_path)
    dg = plan_protocol("dg", "coop", "all", "1,2", tmp_path)
    assert len(xd) == len(dg) == 2
    assert [r.run_dir for r in xd] == [r.run_dir for r in dg]
    assert xd[0].run_dir == tmp_path / "xd" / "coop" / "imagenet" / "shots_16" / "seed1"
    assert xd[0].protocol == dg[0].protocol == "xd"
    assert (xd[0].dataset, xd[0].subsample, xd[0].shots) == ("imagenet", "all", 16)
    assert xd[0].evaluation_keys == ["imagenet/all"] + [f"{d}/all" for d in STANDARD_DATASETS[1:]]
    assert dg[0].evaluation_keys == ["imagenet/all"] + [f"{d}/all" for d in DG_TARGETS]


@pytest.mark.parametrize("args, match", [
    (("fivefold", "coop", "all"),
     "unknown protocol 'fivefold'; valid protocols: base2new, fewshot, xd, dg"),
    (("base2new", "nope", "all"), "unknown method 'nope'; valid methods: coop, maple"),
    (("base2new", "coop", "dtd,imgnet"), "unknown dataset 'imgnet'; valid datasets: imagenet, "),
    (("xd", "coop", "imagenet,dtd"), "'imagenet' is the source dataset"),
])
def test_plan_errors_name_valid_values(tmp_path, args, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        plan_protocol(*args, seeds="1", output=tmp_path)
    with pytest.raises(ValueError, match="invalid seed 'x'"):
        plan_protocol("base2new", "coop", "dtd", "1,x", tmp_path)


def test_base2new_runs_then_skips(tmp_path, engine, caplog):
    caplog.set_level("INFO", logger="vlprompt.protocols")
    dirs = run(tmp_path, "base2new", overrides=("train.max_epoch=2",))
    assert [d.name for d in dirs] == ["seed1", "seed2"]
    assert [c[0] for c in engine.calls] == ["train", "eval", "train", "eval"]
    train = engine.calls[0]
    assert train[2:] == ("eurosat", 16, 1, "base", "base2new", ("train.max_epoch=2",), False)
    assert engine.calls[1][2:] == ("eurosat", "new")
    for d in dirs:
        evals = json.loads((d / "results.json").read_text())["evaluations"]
        assert sorted(evals) == ["eurosat/base", "eurosat/new"]
    assert "[2/2] base2new coop eurosat shots=16 seed=2 (base): training" in caplog.text

    engine.calls.clear()
    caplog.clear()
    run(tmp_path, "base2new")
    assert engine.calls == [("skip", str(d)) for d in dirs]  # no training, no evaluation
    assert caplog.text.count("skipped (finished") == 2


def test_missing_evaluation_only_evaluates_and_unfinished_resumes(tmp_path, engine, caplog):
    caplog.set_level("INFO", logger="vlprompt.protocols")
    dirs = run(tmp_path, "base2new")
    path = dirs[0] / "results.json"
    results = json.loads(path.read_text())
    del results["evaluations"]["eurosat/new"]
    path.write_text(json.dumps(results))
    results = json.loads((dirs[1] / "results.json").read_text())
    results["train"]["finished"] = False
    (dirs[1] / "results.json").write_text(json.dumps(results))

    engine.calls.clear()
    run(tmp_path, "base2new")
    assert [c[:2] for c in engine.calls] == [("skip", str(dirs[0])), ("eval", str(dirs[0])),
                                             ("train", str(dirs[1])), ("eval", str(dirs[1]))]
    assert "seed=1 (base): evaluating" in caplog.text
    assert "seed=2 (base): resuming" in caplog.text


def test_interrupted_run_is_resumed(tmp_path, engine):
    engine.fail_training = True
    with pytest.raises(RuntimeError, match="interrupted"):
        run(tmp_path, "fewshot", shots="1", seeds="1")
    planned = plan_protocol("fewshot", "coop", "eurosat", "1", tmp_path / "out", shots=1)[0]
    results_file = planned.run_dir / "results.json"
    assert run_state(planned, json.loads(results_file.read_text()))[0] == "resume"
    engine.fail_training = False
    run(tmp_path, "fewshot", shots="1", seeds="1")
    assert run_state(planned, json.loads(results_file.read_text())) == ("done", [])


def test_force_retrains(tmp_path, engine):
    run(tmp_path, "fewshot", shots="1,2", seeds="1")
    engine.calls.clear()
    run(tmp_path, "fewshot", shots="1,2", seeds="1", force=True)
    assert [(c[0], c[3], c[-1]) for c in engine.calls] == [("train", 1, True), ("train", 2, True)]


def test_dg_after_xd_only_evaluates(tmp_path, engine):
    run(tmp_path, "xd", datasets="dtd,eurosat", seeds="1")
    assert [c[0] for c in engine.calls] == ["train", "eval", "eval"]
    assert engine.calls[0][2:7] == ("imagenet", 16, 1, "all", "xd")
    engine.calls.clear()
    run(tmp_path, "dg", datasets="all", seeds="1")
    assert [c[0] for c in engine.calls] == ["skip"] + ["eval"] * 4
    assert [c[2] for c in engine.calls[1:]] == list(DG_TARGETS)
    results_file = tmp_path / "out/xd/coop/imagenet/shots_16/seed1/results.json"
    results = json.loads(results_file.read_text())
    assert len(results["evaluations"]) == 1 + 2 + 4


def test_stale_results_of_another_backbone_are_refused(tmp_path, engine):
    from vlprompt.clip.model import CLIPConfig, build_clip

    clip = build_clip(CLIPConfig(embed_dim=16, image_size=16, patch_size=8, vision_width=32,
                                 vision_layers=1, vision_heads=2, text_width=32, text_layers=1,
                                 text_heads=2))
    dirs = run(tmp_path, "fewshot", shots="1", seeds="1", clip=clip)
    path = dirs[0] / "results.json"
    results = json.loads(path.read_text())
    results["backbone_fingerprint"] = "sha256:0123456789abcdef"
    path.write_text(json.dumps(results))
    with pytest.raises(ValueError, match="another backbone"):
        run(tmp_path, "fewshot", shots="1", seeds="1", clip=clip)
    from vlprompt.clip.fingerprint import backbone_fingerprint

    results["backbone_fingerprint"] = backbone_fingerprint(clip)
    path.write_text(json.dumps(results))
    engine.calls.clear()
    run(tmp_path, "fewshot", shots="1", seeds="1", clip=clip)
    assert [c[0] for c in engine.calls] == ["skip"]


def test_run_command_passes_trailing_overrides(tmp_path, engine, monkeypatch, capsys):
    import vlprompt.clip.load as load

    loaded = []
    monkeypatch.setattr(load, "load_clip", lambda name, device="cpu", dtype=None:
                        loaded.append((name, str(device))) or object())
    argv = ["run", "base2new", "--method", "coop", "--datasets", "dtd", "--seeds", "3",
            "--root", str(tmp_path / "data"), "--backbone", "my.pt", "--output",
            str(tmp_path / "o"), "--device", "cpu", "train.max_epoch=2", "method.n_ctx=4"]
    assert main(argv) == 0
    assert loaded == [("my.pt", "cpu")]
    assert engine.calls[0][2:] == ("dtd", 16, 3, "base", "base2new",
                                   ("train.max_epoch=2", "method.n_ctx=4"), False)
    assert "1 run(s) complete" in capsys.readouterr().out
    assert main(["run", "nope", "--method", "coop", "--root", "x"]) == 1
    assert "valid protocols: base2new, fewshot, xd, dg" in capsys.readouterr().err
    assert main(["run", "fewshot", "--method", "coop", "--root", "x", "--datasets", "mnist"]) == 1
    assert "unknown dataset 'mnist'; valid datasets: imagenet" in capsys.readouterr().err
