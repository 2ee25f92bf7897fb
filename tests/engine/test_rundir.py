"""The run folder's guarantees: atomic checkpoint generations under a kill at every file
operation, exact mid-epoch resume, one writer at a time, typed results, old folders still read."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vlprompt.config import TrainConfig
from vlprompt.engine import rundir as R
from vlprompt.engine import train_method
from vlprompt.engine.checkpoint import read_header, read_tensors
from vlprompt.engine.rundir import Evaluation, RunDir, RunLockedError, RunResults
from vlprompt.methods import build_method

from test_engine_train import NAMES, tensor_data  # noqa: E402 (same folder)


def cfg(**kw):
    base = dict(max_epoch=2, lr=0.01, batch_size=4, num_workers=0, print_freq=100,
                checkpoint_every_steps=1, checkpoint_every_minutes=0)
    base.update(kw)
    return TrainConfig(**base)


class Killed(BaseException):
    """Raised at an injected kill point (BaseException: nothing may catch it)."""


def train(world, run_dir, **kw):
    torch.manual_seed(0)
    coop = build_method("coop", world.clip, NAMES, n_ctx=4)
    result = train_method(coop, tensor_data(), cfg(**kw), run_dir=run_dir, show_progress=False)
    return coop, result


def count_ops(world, tmp_path, monkeypatch):
    ops = []
    monkeypatch.setattr(R, "after_file_op", ops.append)
    reference, result = train(world, tmp_path / "reference")
    monkeypatch.setattr(R, "after_file_op", lambda what: None)
    return ops, reference.ctx.detach().clone(), result


def test_a_kill_after_every_file_operation_resumes_bit_identically(world, tmp_path, monkeypatch):
    ops, expected, ref = count_ops(world, tmp_path, monkeypatch)
    # 3 steps an epoch x 2 epochs: 2 mid-epoch commits + 1 at the end of each, + the final one
    assert ops.count("rename") == 7 and len(ops) > 50
    # every kill point of the third commit (the first that deletes an old generation), of a
    # commit at an epoch boundary and of the final commit
    starts = [i for i, op in enumerate(ops) if op == "mkdir"]
    points = list(range(starts[2], starts[3])) + list(range(starts[3], starts[4])) \
        + list(range(starts[-1], len(ops)))
    for n, point in enumerate(points):
        calls = iter(range(len(ops) + 1))

        def kill(what, point=point):
            if next(calls) == point:
                raise Killed(what)

        folder = tmp_path / f"k{n}"
        monkeypatch.setattr(R, "after_file_op", kill)
        with pytest.raises(Killed):
            train(world, folder)
        monkeypatch.setattr(R, "after_file_op", lambda what: None)
        coop, result = train(world, folder)
        assert torch.equal(coop.ctx.detach(), expected), (point, ops[point])
        assert result["loss_history"] == ref["loss_history"], (point, ops[point])
        assert not [p for p in (folder / "checkpoints").iterdir() if p.name.startswith(".tmp")]
        with RunDir(folder) as run:  # the next writer tidies what the kill left
            assert len(run.generations()) == 2


def test_a_stale_temporary_is_removed_by_the_next_writer(world, tmp_path):
    train(world, tmp_path, max_epoch=1)
    stale = tmp_path / "checkpoints" / ".tmp-000099-123"
    stale.mkdir()
    (stale / "checkpoint.safetensors").write_bytes(b"half")
    (tmp_path / ".results.json.abcd1234.tmp").write_text("{")
    with RunDir(tmp_path) as run:
        assert not stale.exists() and not (tmp_path / ".results.json.abcd1234.tmp").exists()
        assert run.latest_generation(verify=True) is not None


def test_a_corrupt_newest_generation_falls_back_and_a_lost_state_is_explained(world, tmp_path):
    _, result = train(world, tmp_path / "a", max_epoch=2, checkpoint_every_steps=0)
    gens = RunDir(tmp_path / "a").generations()
    assert [g.index for g in gens] == [3, 2]  # epochs 1, 2, final: two kept
    # garbage in the newest tensors: readers fall back to the previous generation
    gens[0].tensors.write_bytes(b"garbage")
    assert read_header(tmp_path / "a")["generation"] == 2
    # a run killed mid-training whose only state file is lost: not --force, but a clear choice
    folder = tmp_path / "b"

    def stop_after_first(epoch):
        raise Killed

    torch.manual_seed(0)
    coop = build_method("coop", world.clip, NAMES, n_ctx=4)
    with pytest.raises(Killed):
        train_method(coop, tensor_data(), cfg(checkpoint_every_steps=0), run_dir=folder,
                     show_progress=False, epoch_callback=stop_after_first)
    (RunDir(folder).latest_generation().state_path).unlink()
    with pytest.raises(ValueError, match=r"training_state.pt is missing; the learned tensors of "
                                         r"epoch 1 are intact: rerun with --resume-from-tensors"):
        train(world, folder)
    coop = build_method("coop", world.clip, NAMES, n_ctx=4)
    out = train_method(coop, tensor_data(), cfg(checkpoint_every_steps=0), run_dir=folder,
                       show_progress=False, resume_from_tensors=True)
    assert out["finished"]


def test_mid_epoch_resume_with_augmentation_and_workers_is_exact(world, tmp_path):
    """Real images with random crops: the augmentation of an item depends on its position in
    the epoch only, so 0 or 2 workers and a mid-epoch kill give the same tensors."""
    from vlprompt.data import ImageDataset, build_transform, load_split

    split = load_split("eurosat", world.data, shots=4, seed=1, subsample="base")

    def run(folder, workers, callback=None):
        torch.manual_seed(0)
        coop = build_method("coop", world.clip, split.classnames, n_ctx=4)
        data = ImageDataset(split.train, build_transform(True, world.clip.image_size))
        train_method(coop, data, cfg(max_epoch=2, num_workers=workers, checkpoint_every_steps=2),
                     run_dir=folder, show_progress=False, epoch_callback=callback)
        return coop.ctx.detach().clone()

    plain = run(tmp_path / "plain", 0)
    assert torch.equal(run(tmp_path / "workers", 2), plain)
    folder = tmp_path / "killed"
    ops = []

    def kill_mid_epoch(what):
        ops.append(what)
        if what == "rename" and ops.count("rename") == 4:  # after step 2 of epoch 2
            raise Killed

    R.after_file_op = kill_mid_epoch
    try:
        with pytest.raises(Killed):
            run(folder, 0)
    finally:
        R.after_file_op = lambda what: None
    header = read_header(folder)
    assert (header["epoch"], header["step"]) == (1, 2)
    assert torch.equal(run(folder, 2), plain)


def test_a_sigkill_at_a_random_instant_resumes_bit_identically(world, tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_rundir import train
        import types
        world = types.SimpleNamespace(clip=__import__("vlprompt").load_clip({str(world.clip_path)!r}))
        torch.set_num_threads(1)
        coop, _ = train(world, sys.argv[1], max_epoch=4)
        torch.save(coop.ctx.detach(), sys.argv[2])
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref.pt"
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "ref"), str(ref)], env=env,
                   check=True)
    folder, out = tmp_path / "killed", tmp_path / "out.pt"
    proc = subprocess.Popen([sys.executable, "-c", script, str(folder), str(out)], env=env)
    # wait for the first commit, then kill at once: somewhere inside the remaining commits
    for _ in range(600):
        if (folder / "checkpoints").is_dir() or proc.poll() is not None:
            break
        import time
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    subprocess.run([sys.executable, "-c", script, str(folder), str(out)], env=env, check=True)
    assert torch.equal(torch.load(out), torch.load(ref))


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path):
    code = ("import sys, time; from vlprompt.engine.rundir import RunDir; "
            "RunDir(sys.argv[1]).lock(); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"is being written by another run \(pid "
                                                 rf"{holder.pid} on .*, started 20"):
            RunDir(tmp_path).lock()
    finally:
        holder.kill()
        holder.wait()
    with RunDir(tmp_path) as run:  # the OS released the dead holder's lock
        assert run.locked


def test_results_round_trip_and_merge(tmp_path):
    run = RunDir(tmp_path)
    entry = Evaluation.from_dict({"dataset": "eurosat", "subsample": "new", "accuracy": 50.0,
                                  "macro_f1": 40.0, "num_images": 4, "num_correct": 2,
                                  "per_class_accuracy": {"a": 50.0}})
    results = RunResults(method="coop", dataset="eurosat", shots=16, seed=1, subsample="base",
                         train={"finished": True}, evaluations={entry.key: entry})
    run.write_results(results)
    on_disk = json.loads(run.results_path.read_text())
    assert on_disk["evaluations"]["eurosat/new"]["per_class_accuracy"] == {"a": 50.0}
    assert RunResults.from_dict(on_disk).to_dict() == on_disk
    base = Evaluation.from_dict({"dataset": "eurosat", "subsample": "base", "accuracy": 90.0})
    merged = run.merge_results(RunResults(method="coop", dataset="eurosat", shots=16, seed=1,
                                          subsample="base", train={"finished": True},
                                          evaluations={base.key: base}))
    assert set(merged.evaluations) == {"eurosat/base", "eurosat/new"}
    assert run.state() == "finished"
    assert RunDir(tmp_path / "nothing").state() == "new"


def test_an_old_format_run_folder_is_still_read(world, tmp_path):
    """Top-level checkpoint files with the old thread-dependent checksum."""
    from safetensors.torch import save_file

    from vlprompt.clip.fingerprint import legacy_state_checksum

    torch.manual_seed(0)
    coop = build_method("coop", world.clip, NAMES, n_ctx=4)
    save_file({"ctx": coop.ctx.detach().contiguous()}, str(tmp_path / "checkpoint.safetensors"),
              metadata={"epoch": "2"})
    header = {"format": "vlprompt-checkpoint/1", "method": "coop", "epoch": 2, "finished": True,
              "method_config": {"n_ctx": 4}, "classnames": NAMES, "backbone": "elsewhere.pt",
              "backbone_checksum": legacy_state_checksum(world.clip)}
    (tmp_path / "checkpoint.json").write_text(json.dumps(header))
    tensors, _ = read_tensors(tmp_path)
    assert torch.equal(tensors["ctx"], coop.ctx.detach())
    from vlprompt.engine.checkpoint import check_backbone

    check_backbone(header, world.clip)  # the old checksum matches: accepted
    bad = {**header, "backbone_checksum": "0123456789abcdef"}
    with pytest.raises(ValueError, match="old-format checksum 0123456789abcdef.*differs in name"):
        check_backbone(bad, world.clip)
    name = world.clip.backbone_name
    world.clip.backbone_name = "elsewhere.pt"
    try:
        check_backbone(bad, world.clip)  # untrusted checksum, same name: a warning
    finally:
        world.clip.backbone_name = name
