"""Planning a sweep: the runs, their folders, grid points, shared xd/dg folders, bad files, and
``--dry-run`` writing nothing."""

import shlex
from pathlib import Path

import pytest

from vlprompt.cli import main
from vlprompt.sweep.launch import LaunchOptions, parse_time
from vlprompt.sweep.spec import load_sweep_file, plan_sweep

from .conftest import OVERRIDES, write_sweep


def test_plan_is_methods_by_datasets_by_seeds(sweep_world):
    sweep = load_sweep_file(write_sweep(sweep_world, "plan.yaml"))
    assert sweep.output == sweep_world / "out"  # relative to the file
    assert Path(sweep.root) == sweep_world / "data"
    folders = [job.run_dir.relative_to(sweep.output) for job in sweep.jobs]
    assert folders == [Path("base2new") / m / d / "shots_16" / f"seed{s}"
                       for m in ("coop", "kgcoop") for d in ("eurosat", "dtd") for s in (1, 2)]
    assert all(job.overrides == tuple(OVERRIDES) for job in sweep.jobs)
    assert sweep.jobs[0].run.evaluations == (("eurosat", "base"), ("eurosat", "new"))
    # the same runs give the same manifest name (a relaunch updates it)
    assert load_sweep_file(write_sweep(sweep_world, "plan2.yaml")).name == sweep.name


def test_grid_points_are_separate_folders_with_their_overrides(tmp_path):
    jobs = plan_sweep(["coop"], ["base2new"], tmp_path, ["eurosat"], [1], None,
                      overrides=["train.max_epoch=1"],
                      grid={"train.lr": [0.002, 0.0035], "method.n_ctx": [4]})
    assert len(jobs) == 2
    assert [j.grid_point for j in jobs] == [("train.lr=0.002", "method.n_ctx=4"),
                                            ("train.lr=0.0035", "method.n_ctx=4")]
    assert jobs[1].overrides == ("train.max_epoch=1", "train.lr=0.0035", "method.n_ctx=4")
    assert jobs[1].run_dir == (tmp_path / "train.lr=0.0035,method.n_ctx=4" / "base2new" / "coop"
                               / "eurosat" / "shots_16" / "seed1")
    with pytest.raises(ValueError, match="must name a section"):
        plan_sweep(["coop"], ["base2new"], tmp_path, ["eurosat"], [1], grid={"lr": [1]})


def test_xd_and_dg_share_one_job_per_source_folder(tmp_path):
    jobs = plan_sweep(["coop"], ["xd", "dg"], tmp_path, "all", [1, 2])
    assert len(jobs) == 2  # one per seed: dg evaluates the xd source model
    job = jobs[0]
    assert job.protocols == ("xd", "dg")
    targets = [d for d, _ in job.run.evaluations]
    assert targets[0] == "imagenet" and "eurosat" in targets and "imagenet_sketch" in targets
    assert len(targets) == len(set(targets)) == 1 + 10 + 4
    per_protocol = plan_sweep(["coop"], ["xd", "dg"], tmp_path,
                              {"xd": ["eurosat"], "dg": ["imagenetv2"]}, [1])
    assert [d for d, _ in per_protocol[0].run.evaluations] == ["imagenet", "eurosat",
                                                              "imagenetv2"]


def test_rerun_command_is_a_valid_run_line(sweep_world):
    from vlprompt.cli import build_parser, parse_args

    sweep = load_sweep_file(write_sweep(sweep_world, "rerun.yaml", grid={"train.lr": [0.01]}))
    words = shlex.split(sweep.rerun_command(sweep.jobs[3]))
    assert words[:5] == ["vlprompt", "run", "base2new", "--method", "coop"]
    args = parse_args(build_parser(), words[1:])
    assert (args.datasets, args.seeds, args.shots) == ("dtd", "2", "16")
    assert Path(args.output) == sweep_world / "out" / "train.lr=0.01"
    assert args.overrides == OVERRIDES + ["train.lr=0.01"]


@pytest.mark.parametrize("fields, message", [
    ({"methods": ["coop"], "epochs": 3}, "unknown key(s) epochs"),
    ({"protocols": ["base2old"]}, "unknown protocol(s) 'base2old'"),
    ({"methods": ["nope"]}, "unknown method 'nope'"),
    ({"datasets": ["eurosat", "mnist"]}, "unknown dataset 'mnist'"),
    ({"datasets": {"b2n": ["eurosat"]}}, "b2n is not a protocol"),
    ({"root": None}, "'root' is required"),
])
def test_bad_sweep_files_fail_in_one_line(sweep_world, capsys, fields, message):
    path = write_sweep(sweep_world, "bad.yaml", **fields)
    assert main(["sweep", str(path), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert message in err and str(path) in err and len(err.strip().splitlines()) == 1


def test_dry_run_prints_the_plan_and_writes_nothing(sweep_world, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sweep", str(write_sweep(sweep_world, "dry.yaml")), "--output", str(out),
                 "--dry-run", "--launcher", "local"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    assert text.count("│ to do") == 8 and "8 run(s): 8 to do" in text
    assert str(out / "base2new" / "kgcoop" / "dtd" / "shots_16" / "seed2") in text
    # `run --dry-run` plans the same way
    assert main(["run", "base2new", "--method", "coop", "--datasets", "eurosat", "--seeds", "1,2",
                 "--root", str(sweep_world / "data"), "--output", str(out), "--dry-run"]) == 0
    assert "2 run(s): 2 to do" in capsys.readouterr().out and not out.exists()


def test_launch_options_and_time_limits():
    assert parse_time("90") == 90
    assert parse_time("1:30:00") == 90 and parse_time("0:00:30") == 1
    assert parse_time("2-00:00:00") == 2 * 24 * 60
    for bad in ("soon", "0", "1:2:3:4"):
        with pytest.raises(ValueError, match="--time"):
            parse_time(bad)
    with pytest.raises(ValueError, match="--launcher must be one of"):
        LaunchOptions(launcher="pbs")
    with pytest.raises(ValueError, match="--nodes > 1 needs --launcher slurm"):
        LaunchOptions(launcher="local", nodes=2)
    with pytest.raises(ValueError, match="--max-parallel must be >= 1"):
        LaunchOptions(launcher="local", max_parallel=0)


def test_missing_submitit_is_one_clear_line(sweep_world, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    assert main(["sweep", str(write_sweep(sweep_world, "nosubmitit.yaml")), "--output",
                 str(tmp_path / "o"), "--launcher", "local"]) == 1
    assert "pip install 'vlprompt[cluster]'" in capsys.readouterr().err


def test_grid_points_are_separate_report_rows(sweep_world, tmp_path, capsys):
    out = tmp_path / "out"
    path = write_sweep(sweep_world, "grid.yaml", methods=["coop"], datasets=["eurosat"],
                       seeds=[1], overrides=["train.max_epoch=1", "train.num_workers=0",
                                             "train.batch_size=8"],
                       grid={"train.lr": [0.002, 0.02]})
    assert main(["sweep", str(path), "--output", str(out)]) == 0
    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| coop [train.lr=")]
    assert [r.split("]")[0] for r in rows] == ["| coop [train.lr=0.002", "| coop [train.lr=0.02"]
    assert (out / "report.csv").is_file()
