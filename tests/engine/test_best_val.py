"""``train.select: best_val``: per-epoch val evaluation, the best epoch kept as an atomic part of
the run folder, exact resume (kills at epoch ends and inside every commit), eval/predict on the
selected checkpoint; ``select: last`` unchanged."""

import pytest
import torch

from vlprompt.config import TrainConfig
from vlprompt.engine import evaluate_run, predict_with_checkpoint, run_experiment, train_method
from vlprompt.engine import rundir as R
from vlprompt.engine import train as T
from vlprompt.engine.checkpoint import read_generation_tensors, read_header, selected_generation
from vlprompt.engine.rundir import RunDir
from vlprompt.methods.coop import CoOp

from test_engine_train import NAMES, tensor_data  # noqa: E402 (same folder)

#: scripted val accuracies per epoch: epochs 2 and 4 tie, the later one wins
ACCURACIES = [50.0, 75.0, 60.0, 75.0, 40.0]


class Killed(BaseException):
    """Raised at an injected kill point (BaseException: nothing may catch it)."""


class _Epochs(CoOp):
    """CoOp that remembers its last finished epoch (for scripted val accuracies)."""

    name = "_epochs"  # not registered: used directly
    last_epoch = -1

    def on_epoch_end(self, epoch, max_epochs):
        self.last_epoch = epoch


def cfg(**kw):
    base = dict(max_epoch=5, lr=0.01, batch_size=4, num_workers=0, print_freq=100,
                checkpoint_every_minutes=0, select="best_val")
    base.update(kw)
    return TrainConfig(**base)


def scripted(method, dataset, classnames, **kw):
    return {"accuracy": ACCURACIES[method.last_epoch]}


def train(world, run_dir, cls=_Epochs, val=True, **kw):
    torch.manual_seed(0)
    method = cls(world.clip, NAMES, cls.Config(n_ctx=4))
    snapshots = {}

    def remember(epoch):
        snapshots[epoch + 1] = method.ctx.detach().clone()

    callback = kw.pop("epoch_callback", None)

    def both(epoch):
        remember(epoch)
        if callback is not None:
            callback(epoch)

    result = train_method(method, tensor_data(), cfg(**kw), run_dir=run_dir, show_progress=False,
                          val_set=tensor_data(2, seed=1) if val else None, epoch_callback=both)
    return method, result, snapshots


def best_tensors(folder):
    gen = selected_generation(folder)
    return gen, read_generation_tensors(gen)[0]["ctx"]


def test_select_last_is_unchanged_and_best_val_trains_the_same_tensors(world, tmp_path):
    _, last, _ = train(world, tmp_path / "last", cls=CoOp, select="last")
    header = read_header(tmp_path / "last")
    assert set(last) == {"epochs", "loss_history", "time_s", "finished", "data_stall_fraction",
                         "precision"}
    assert not {"select", "best", "val_history"} & set(header)
    assert not [p for p in (tmp_path / "last" / "checkpoints").iterdir()
                if p.name.startswith("best-")]
    assert selected_generation(tmp_path / "last").index == header["generation"]
    # evaluating on val after each epoch changes neither the training nor its RNG stream
    method, best, _ = train(world, tmp_path / "best", cls=CoOp)
    assert best["loss_history"] == last["loss_history"]
    a = read_generation_tensors(RunDir(tmp_path / "last").latest_generation())[0]["ctx"]
    b = read_generation_tensors(RunDir(tmp_path / "best").latest_generation())[0]["ctx"]
    assert torch.equal(a, b)
    assert best["select"] == "best_val" and len(best["val_history"]) == 5
    gen, ctx = best_tensors(tmp_path / "best")
    assert gen.folder.name == f"best-{best['best']['epoch']:06d}"
    assert torch.equal(method.ctx.detach(), ctx)  # the method holds the selected tensors


def test_the_best_epoch_is_kept_and_ties_go_to_the_later_epoch(world, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "evaluate_method", scripted)
    method, result, snaps = train(world, tmp_path)
    assert result["val_history"] == ACCURACIES
    assert result["best"] == {"epoch": 4, "val_accuracy": 75.0, "folder": "best-000004"}
    header = read_header(tmp_path)
    assert header["select"] == "best_val" and header["best"] == result["best"]
    assert header["finished"]
    gen, ctx = best_tensors(tmp_path)
    assert gen.header()["epoch"] == 4 and gen.header()["val_accuracy"] == 75.0
    assert torch.equal(ctx, snaps[4]) and not torch.equal(ctx, snaps[5])
    assert torch.equal(method.ctx.detach(), snaps[4])
    # the last generation still holds the last epoch; best folders no kept generation names
    # (epochs 1 and 2) are gone
    last = read_generation_tensors(RunDir(tmp_path).latest_generation())[0]["ctx"]
    assert torch.equal(last, snaps[5])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()
                  if p.name.startswith("best-")) == ["best-000004"]


def test_a_kill_after_an_epoch_resumes_to_the_same_best(world, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "evaluate_method", scripted)
    _, full, snaps = train(world, tmp_path / "full")

    for kill_at in (1, 3):  # before and after the best epoch
        folder = tmp_path / f"killed{kill_at}"

        def kill(epoch, kill_at=kill_at):
            if epoch == kill_at:
                raise Killed

        with pytest.raises(Killed):
            train(world, folder, epoch_callback=kill)
        method, resumed, _ = train(world, folder)
        assert resumed["best"] == full["best"] and resumed["val_history"] == ACCURACIES
        assert resumed["loss_history"] == full["loss_history"]
        assert torch.equal(best_tensors(folder)[1], snaps[4])
        assert torch.equal(method.ctx.detach(), snaps[4])
        # a finished run resumed again deploys the same best
        method, again, _ = train(world, folder)
        assert again["best"] == full["best"] and torch.equal(method.ctx.detach(), snaps[4])


def test_a_kill_inside_every_best_commit_resumes_to_the_same_best(world, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "evaluate_method", scripted)
    ops = []
    monkeypatch.setattr(R, "after_file_op", ops.append)
    _, full, snaps = train(world, tmp_path / "full")
    monkeypatch.setattr(R, "after_file_op", lambda what: None)
    assert ops.count("best rename") == 3  # epochs 1, 2 and 4 were each the best so far
    # every op from the second best commit to the end: best commits, the generation commits
    # that name them, and the removal of best folders no kept generation names
    points = range(ops.index("best mkdir", 1), len(ops))
    assert any(ops[i].startswith("remove best-") for i in points)
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
        method, resumed, _ = train(world, folder)
        assert resumed["best"] == full["best"], (point, ops[point])
        assert torch.equal(method.ctx.detach(), snaps[4]), (point, ops[point])
        assert torch.equal(best_tensors(folder)[1], snaps[4]), (point, ops[point])
        with RunDir(folder):  # the next writer tidies what the kill left
            assert [p.name for p in (folder / "checkpoints").iterdir()
                    if p.name.startswith(("best-", ".tmp"))] == ["best-000004"]


def test_a_lost_best_folder_is_explained_and_a_missing_val_split_refused(world, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(T, "evaluate_method", scripted)

    def kill(epoch):
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        train(world, tmp_path, epoch_callback=kill)
    (tmp_path / "checkpoints" / "best-000002" / "checkpoint.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="best-epoch checkpoint of epoch 2 is not usable"):
        train(world, tmp_path)
    with pytest.raises(ValueError, match="train.select=best_val needs a val split"):
        train(world, tmp_path / "noval", val=False)
    with pytest.raises(ValueError, match="train.select must be last or best_val"):
        TrainConfig(select="best")


def test_run_eval_and_predict_use_the_selected_checkpoint(world, tmp_path):
    overrides = ["max_epoch=4", "batch_size=8", "lr=0.02", "num_workers=0", "print_freq=100",
                 "train.select=best_val"]
    folder = tmp_path / "shots_8" / "seed1"
    out = run_experiment("coop", "eurosat", world.data, world.clip_path, folder, shots=8,
                         seed=1, subsample="base", protocol="fewshot", overrides=overrides,
                         show_progress=False)
    best = out["train"]["best"]
    assert len(out["train"]["val_history"]) == 4
    assert best["val_accuracy"] == max(out["train"]["val_history"])
    assert best["epoch"] == max(i + 1 for i, a in enumerate(out["train"]["val_history"])
                                if a == best["val_accuracy"])
    gen = selected_generation(folder)
    assert gen.folder.name == best["folder"] and gen.header()["epoch"] == best["epoch"]
    # vlprompt eval on the same split reproduces the run's own test entry (the best tensors)
    again = evaluate_run(folder, "eurosat", world.data, subsample="base", clip=world.clip)
    own = out["evaluations"]["eurosat/base"]
    assert again["accuracy"] == own["accuracy"] and again["num_correct"] == own["num_correct"]
    assert f"Loading weights from {gen.folder}" in (
        RunDir(folder).evaluation_log_path("eurosat", "base").read_text())
    # predict builds the method from the best folder
    images = sorted((world.data / "eurosat").rglob("*.jpg"))[:3]
    pred = predict_with_checkpoint(folder, images, topk=2, clip=world.clip)
    torch.manual_seed(0)
    model = CoOp(world.clip, gen.header()["classnames"],
                 CoOp.Config(**gen.header()["method_config"]), template=gen.header()["template"])
    model.load_trainable_state_dict(read_generation_tensors(gen)[0])
    model.eval()
    from vlprompt.data import build_transform

    batch = torch.stack([build_transform(False, world.clip.image_size)(p) for p in images])
    with torch.no_grad():
        probs = model(batch).softmax(-1)
    top = probs.topk(2, dim=-1)
    assert [[c for c, _ in row] for row in pred] == [[model.classnames[i] for i in ix]
                                                     for ix in top.indices.tolist()]
    for row, vs in zip(pred, top.values.tolist()):
        assert [p for _, p in row] == pytest.approx(vs, abs=1e-6)


def test_released_hicropl_with_best_val_resumes_exactly(world, tmp_path):
    """HiCroPL's released mode rewrites prompts at every forward, val passes included (as the
    released Dassl's per-epoch val test): the committed generation holds the post-val prompts,
    so a run killed after an epoch resumes to the same best and the same tensors."""
    from vlprompt.data.base import packaged_classnames
    from vlprompt.data.descriptions import write_descriptions

    write_descriptions(tmp_path / "gpt", "eurosat",
                       {n: [f"a satellite photo of {n}.", f"{n} from above."]
                        for n in packaged_classnames("eurosat")})
    common = ["n_ctx=2", "depth=2", "cross_layer=1", "mapper=released_inplace",
              f"descriptions={tmp_path / 'gpt'}", "max_epoch=3", "batch_size=8",
              "eval_batch_size=7", "num_workers=0", "print_freq=100"]
    best_val = [*common, "train.select=best_val"]

    def run(folder, overrides, **kw):
        return run_experiment("hicropl", "eurosat", world.data, world.clip_path, folder, shots=8,
                              seed=1, subsample="base", protocol="fewshot", overrides=overrides,
                              show_progress=False, clip=world.clip, **kw)

    full = run(tmp_path / "full", best_val)
    last = run(tmp_path / "last", common)
    assert full["train"]["loss_history"][0] == last["train"]["loss_history"][0]
    assert full["train"]["loss_history"][1:] != last["train"]["loss_history"][1:]

    def kill(epoch):
        if epoch == 0:
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path / "resumed", best_val, epoch_callback=kill)
    resumed = run(tmp_path / "resumed", best_val)
    for key in ("loss_history", "val_history", "best"):
        assert resumed["train"][key] == full["train"][key], key
    a, b = (read_generation_tensors(selected_generation(tmp_path / f))[0]
            for f in ("full", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    own = "eurosat/base"
    assert resumed["evaluations"][own]["accuracy"] == full["evaluations"][own]["accuracy"]
