"""User errors of ``vlprompt train`` / ``eval`` / ``run`` through the real entry point: each is
refused with ONE line on stderr (``vlprompt <command>: error: <message> (-v shows the
traceback)``) whose text says what is wrong; and the inputs that should work do work.

Trained runs are shared through module-scoped fixtures (tiny CLIP, synthetic EuroSAT, one or two
epochs of batch 4), so the whole file takes well under a minute on two cores.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from vlprompt.cli import main

TINY = dict(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=2,
            vision_heads=2, text_width=64, text_layers=2, text_heads=2)
TINY_TRAIN = ["train.max_epoch=1", "train.batch_size=4", "train.num_workers=0"]
SUMMARY = re.compile(r"^(\S+/\S+): accuracy ([\d.]+)%  macro-F1 ([\d.]+)%  \((\d+)/(\d+)\)$", re.M)


# --------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _quiet_root_logger():
    """``main`` calls ``logging.basicConfig``; if the root logger had no handler (pytest run with
    ``-p no:logging``) that would add a stderr handler and the engine's INFO lines would land in
    the stderr these tests count. Under pytest's logging plugin this changes nothing."""
    root = logging.getLogger()
    handler = None
    if not root.handlers:
        handler = logging.NullHandler()
        root.addHandler(handler)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    if handler is not None:
        root.removeHandler(handler)


def cli(*argv: str) -> int:
    """``vlprompt --threads 1 <argv>`` in-process (one thread, as the test suite pins)."""
    return main(["--threads", "1", *map(str, argv)])


def error_line(capsys, command: str) -> str:
    """The one stderr line of a refused command (asserted to be exactly one, traceback-free,
    in the CLI's format); returns the message part."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0]
    prefix, suffix = f"vlprompt {command}: error: ", " (-v shows the traceback)"
    assert line.startswith(prefix) and line.endswith(suffix), line
    return line[len(prefix):-len(suffix)]


def summaries(out: str) -> dict[str, tuple[float, float, int, int]]:
    """``{"eurosat/new": (accuracy, macro_f1, correct, total)}`` from train/eval stdout."""
    return {m[0]: (float(m[1]), float(m[2]), int(m[3]), int(m[4])) for m in SUMMARY.findall(out)}


def train_argv(world, *extra: str, **options) -> list[str]:
    """``train`` for coop on the synthetic EuroSAT with the tiny backbone; ``options`` replace or
    add ``--name value`` pairs (``run_dir`` -> ``--run-dir``)."""
    opts = {"method": "coop", "dataset": "eurosat", "root": world.data,
            "backbone": world.clip_path, "shots": 2, "output": world.root / "output",
            "device": "cpu"}
    opts.update(options)
    argv = ["train"]
    for key, value in opts.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv + list(extra or TINY_TRAIN)


def eval_argv(checkpoint, *extra: str, subsample: str = "new", device: str = "cpu",
              world=None) -> list[str]:
    return ["eval", "--checkpoint", str(checkpoint), "--dataset", "eurosat", "--root",
            str(world.data), "--subsample", subsample, "--device", device, *extra]


# --------------------------------------------------------------------------- shared fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny CLIP in a file and a synthetic EuroSAT (10 classes, 19 images each: 10 train,
    4 val, 5 test per class; base/new = 5/5 classes)."""
    from vlprompt.clip.load import save_clip
    from vlprompt.clip.model import CLIPConfig, build_clip
    from vlprompt.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("cli_errors")
    torch.manual_seed(0)
    clip_path = save_clip(build_clip(CLIPConfig(**TINY)), root / "tiny_clip.safetensors")
    write_dataset(root / "data", "eurosat", images_per_class=19, image_size=32, seed=0)
    return types.SimpleNamespace(root=root, clip_path=clip_path, data=root / "data")


@pytest.fixture(scope="module")
def trained(world):
    """A coop run on the base classes with two epochs (so two checkpoint generations), and its
    folder-based evaluation on the new classes as the reference."""
    run_dir = world.root / "trained" / "shots_2" / "seed1"
    capture = _Capture()
    with capture:
        assert cli(*train_argv(world, "train.max_epoch=2", "train.batch_size=4",
                               "train.num_workers=0", subsample="base", protocol="base2new",
                               run_dir=run_dir)) == 0
        assert cli(*eval_argv(run_dir, world=world)) == 0
    new = summaries(capture.out)["eurosat/new"]
    base = summaries(capture.out)["eurosat/base"]
    return types.SimpleNamespace(path=run_dir, new=new, base=base)


class _Capture:
    """stdout of CLI calls made from a module-scoped fixture (capsys is function-scoped)."""

    def __enter__(self):
        import io

        self._old, self._buf = sys.stdout, io.StringIO()
        sys.stdout = self._buf
        return self

    def __exit__(self, *exc):
        sys.stdout = self._old
        self.out = self._buf.getvalue()


def generations(run_dir: Path) -> list[Path]:
    """The committed generation folders, oldest first."""
    return sorted(p for p in (run_dir / "checkpoints").iterdir() if re.fullmatch(r"\d{6}", p.name))


# --------------------------------------------------------------------------- bad arguments
def test_train_refuses_unknown_protocol(world, tmp_path, capsys):
    assert cli(*train_argv(world, protocol="base2neww", output=tmp_path)) == 1
    message = error_line(capsys, "train")
    assert "unknown --protocol 'base2neww'" in message
    assert "valid: base2new, fewshot, xd" in message
    assert not any(tmp_path.iterdir()), "a refused command wrote a run folder"


def test_train_refuses_dg_protocol_pointing_to_run_dg(world, tmp_path, capsys):
    assert cli(*train_argv(world, protocol="dg", output=tmp_path)) == 1
    message = error_line(capsys, "train")
    assert "unknown --protocol 'dg'" in message
    assert "use 'vlprompt run dg'" in message
    assert "valid: base2new, fewshot, xd" in message


@pytest.mark.parametrize("shots", ["0", "-2"])
def test_train_refuses_bad_shots(world, tmp_path, capsys, shots):
    assert cli(*train_argv(world, shots=shots, run_dir=tmp_path / "run")) == 1
    message = error_line(capsys, "train")
    assert f"shots must be -1 (all images) or >= 1, got {shots}" in message
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine as one without a usable CUDA GPU, whatever it really has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_train_device_cuda_without_gpu(world, tmp_path, capsys, no_cuda):
    assert cli(*train_argv(world, device="cuda", run_dir=tmp_path / "run")) == 1
    message = error_line(capsys, "train")
    assert "--device cuda: this machine has no usable CUDA GPU" in message
    assert message.endswith("use --device cpu")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_eval_device_cuda_without_gpu(world, trained, capsys, no_cuda):
    assert cli(*eval_argv(trained.path, device="cuda", world=world)) == 1
    message = error_line(capsys, "eval")
    assert "--device cuda: this machine has no usable CUDA GPU" in message
    assert message.endswith("use --device cpu")


# --------------------------------------------------------------------------- --checkpoint forms
def test_eval_accepts_files_of_the_run_folder(world, trained, capsys):
    """``--checkpoint`` may name the run folder, a generation, its header, or results.json."""
    newest = generations(trained.path)[-1]
    for checkpoint in (newest / "checkpoint.json", trained.path / "results.json", newest,
                       newest / "checkpoint.safetensors"):
        assert cli(*eval_argv(checkpoint, world=world)) == 0, checkpoint
        captured = capsys.readouterr()
        assert "error" not in captured.err, captured.err
        assert summaries(captured.out)["eurosat/new"] == trained.new, checkpoint
    results = json.loads((trained.path / "results.json").read_text())
    assert "eurosat/new" in results["evaluations"]
    assert not (newest / "results.json").exists(), "evaluation wrote into the generation folder"


# --------------------------------------------------------------------------- corrupt checkpoints
@pytest.fixture
def corrupt_copy(trained, tmp_path):
    """A copy of the trained run (same shots_<K>/seed<S> layout) to damage."""
    copy = tmp_path / "shots_2" / "seed1"
    shutil.copytree(trained.path, copy)
    gens = generations(copy)
    assert len(gens) >= 2, "max_epoch=2 leaves two generations"
    return copy, gens


def test_eval_falls_back_when_the_newest_checkpoint_is_corrupt(world, trained, corrupt_copy,
                                                               capsys, caplog):
    copy, gens = corrupt_copy
    (gens[-1] / "checkpoint.safetensors").write_bytes(os.urandom(512))
    with caplog.at_level(logging.WARNING, logger="vlprompt"):
        assert cli(*eval_argv(copy, world=world)) == 0
    captured = capsys.readouterr()
    assert "error" not in captured.err, captured.err
    assert (f"{gens[-1] / 'checkpoint.safetensors'} does not match its header (corrupt); "
            f"falling back to the previous checkpoint") in caplog.text
    # the previous generation holds the same learned tensors (the last epoch's)
    assert summaries(captured.out)["eurosat/new"] == trained.new


def test_eval_fails_in_one_line_when_every_checkpoint_is_corrupt(world, corrupt_copy, capsys):
    copy, gens = corrupt_copy
    for gen in gens[-2:]:
        (gen / "checkpoint.safetensors").write_bytes(os.urandom(512))
    assert cli(*eval_argv(copy, world=world)) == 1
    message = error_line(capsys, "eval")
    assert str(copy) in message  # names the folder and the corrupt file
    assert "checkpoint.safetensors" in message and "corrupt" in message
    assert "not a vlprompt run folder" not in message


# --------------------------------------------------------------------------- bad backbone files
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_train_refuses_unreadable_backbone(world, tmp_path, capsys, suffix, damage):
    bad = tmp_path / f"backbone{suffix}"
    if damage == "random":
        bad.write_bytes(os.urandom(4096))
    else:
        from vlprompt.clip.load import load_clip, save_clip

        good = save_clip(load_clip(world.clip_path), tmp_path / f"good{suffix}")
        bad.write_bytes(good.read_bytes()[:3000])
    assert cli(*train_argv(world, backbone=bad, run_dir=tmp_path / "run")) == 1
    message = error_line(capsys, "train")
    assert message.startswith(f"{bad}: cannot read CLIP weights"), message
    assert not (tmp_path / "run" / "config.yaml").exists()


# --------------------------------------------------------------------------- class-specific context
@pytest.fixture(scope="module")
def csc_run(world):
    run_dir = world.root / "csc" / "shots_2" / "seed1"
    with _Capture():
        assert cli(*train_argv(world, *TINY_TRAIN, "method.csc=true", subsample="base",
                               run_dir=run_dir)) == 0
    return run_dir


def test_csc_refuses_other_classes_without_allow_class_mismatch(world, csc_run, capsys):
    header = json.loads((generations(csc_run)[-1] / "checkpoint.json").read_text())
    assert header["method_config"]["csc"] is True and len(header["classnames"]) == 5
    assert cli(*eval_argv(csc_run, world=world)) == 1
    message = error_line(capsys, "eval")
    assert "class-specific" in message and "--allow-class-mismatch" in message
    assert "5 training classes" in message

    assert cli(*eval_argv(csc_run, "--allow-class-mismatch", world=world)) == 0
    captured = capsys.readouterr()
    assert "error" not in captured.err
    assert summaries(captured.out)["eurosat/new"][3] == 25  # 5 new classes x 5 test images


# --------------------------------------------------------------------------- run folder states
def test_failed_start_leaves_the_folder_reusable(world, tmp_path, capsys):
    run_dir = tmp_path / "run"
    missing = tmp_path / "missing_backbone.safetensors"
    assert cli(*train_argv(world, backbone=missing, run_dir=run_dir)) == 1
    message = error_line(capsys, "train")
    assert str(missing) in message
    assert not (run_dir / "config.yaml").exists()

    # same folder, right backbone, another config: no "different config" refusal
    assert cli(*train_argv(world, *TINY_TRAIN, "train.lr=0.01", run_dir=run_dir)) == 0
    captured = capsys.readouterr()
    assert "different config" not in captured.err and "error" not in captured.err
    assert f"run folder: {run_dir}" in captured.out
    results = json.loads((run_dir / "results.json").read_text())
    assert results["config"]["train"]["lr"] == 0.01
    assert (run_dir / "config.yaml").exists()


def test_second_writer_is_refused_naming_the_holder(world, tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from vlprompt.engine.rundir import RunDir; RunDir(sys.argv[1]).lock(); "
         "print('locked', flush=True); time.sleep(60)", str(run_dir)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked", "the lock holder did not start"
        start = time.monotonic()
        assert cli(*train_argv(world, run_dir=run_dir)) == 1
        elapsed = time.monotonic() - start
        message = error_line(capsys, "train")
        assert f"{run_dir} is being written by another run (pid {holder.pid} on" in message
        assert elapsed < 10, f"the refusal took {elapsed:.1f}s: it must not wait for the lock"
        assert not (run_dir / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()


def test_overrides_anywhere_among_options(world, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", "train.max_epoch=1", "--method", "coop", "train.batch_size=4",
            "--dataset", "eurosat", "--root", world.data, "--backbone", world.clip_path,
            "method.n_ctx=4", "--shots", "2", "--device", "cpu", "--run-dir", run_dir,
            "train.num_workers=0", "--seed", "2", "train.lr=0.005"]
    assert cli(*argv) == 0
    assert "error" not in capsys.readouterr().err
    results = json.loads((run_dir / "results.json").read_text())
    assert results["seed"] == 2 and results["shots"] == 2
    assert results["config"]["method"]["n_ctx"] == 4
    train = results["config"]["train"]
    assert (train["max_epoch"], train["batch_size"], train["num_workers"], train["lr"]) == \
        (1, 4, 0, 0.005)


# --------------------------------------------------------------------------- threads
def test_eval_in_another_process_with_more_threads(world, trained, capsys):
    """Trained with one thread here, evaluated in a fresh process with four: the same result and
    no false "different backbone" refusal (the fingerprint hashes bytes, not float sums)."""
    assert cli(*eval_argv(trained.path, subsample="base", world=world)) == 0
    here = summaries(capsys.readouterr().out)["eurosat/base"]
    env = dict(os.environ, OMP_NUM_THREADS="4")
    proc = subprocess.run(
        [sys.executable, "-m", "vlprompt.cli", "--threads", "4",
         *eval_argv(trained.path, subsample="base", world=world)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "different backbone" not in proc.stderr and "Traceback" not in proc.stderr
    there = summaries(proc.stdout)["eurosat/base"]
    assert there == here == trained.base


# --------------------------------------------------------------------------- Dassl log parsing
def parse_test_res(directory: Path, end_signal: str = "=> result") -> float:
    """Dassl's ``parse_test_res.py`` rule: for every (non-hidden) entry of ``directory``,
    ``<entry>/log.txt`` must exist; its accuracy is the LAST ``* accuracy: X%`` line at or after
    the ``end_signal`` line; the result is the mean over the entries."""
    accuracies = []
    for entry in sorted(p for p in directory.iterdir() if not p.name.startswith(".")):
        log = entry / "log.txt"
        assert log.is_file(), f"{log} is missing (Dassl's script asserts every entry has one)"
        good_to_go, accuracy = False, None
        for line in log.read_text().splitlines():
            line = line.strip()
            if line == end_signal:
                good_to_go = True
            match = re.search(r"\* accuracy: ([.\deE+-]+)%", line)
            if match and good_to_go:
                accuracy = float(match.group(1))
        assert accuracy is not None, f"{log} has no result block"
        accuracies.append(accuracy)
    assert accuracies, f"nothing to parse under {directory}"
    return statistics.mean(accuracies)


def test_run_base2new_logs_parse_like_dassl(world, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli("run", "base2new", "--method", "coop", "--datasets", "eurosat", "--seeds", "1,2",
               "--root", world.data, "--backbone", world.clip_path, "--output", out,
               "--device", "cpu", *TINY_TRAIN, "--shots", "2") == 0
    assert "2 run(s) complete" in capsys.readouterr().out
    parent = out / "base2new" / "coop" / "eurosat"
    runs = [parent / "shots_2" / f"seed{s}" for s in (1, 2)]
    results = [json.loads((r / "results.json").read_text())["evaluations"] for r in runs]

    def logged(key: str) -> float:  # the log prints one decimal
        return statistics.mean(float(f"{r[key]['accuracy']:.1f}") for r in results)

    assert sorted(p.name for p in (parent / "shots_2").iterdir()) == ["seed1", "seed2"]
    assert parse_test_res(parent / "shots_2") == pytest.approx(logged("eurosat/base"), abs=1e-9)
    new_dir = parent / "shots_2_test_eurosat_new"
    assert sorted(p.name for p in new_dir.iterdir()) == ["seed1", "seed2"]
    assert parse_test_res(new_dir) == pytest.approx(logged("eurosat/new"), abs=1e-9)
