"""Unreadable images: found by verify_images and `datasets check`, named by ImageDataset and by
evaluation (one line, also from DataLoader workers), skipped and counted with skip_bad."""

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from vlprompt.cli import main
from vlprompt.data import (BadImage, BadImageError, ImageDataset, Record, build_loader,
                           build_transform, collate_skip_bad, load_split, verify_images)
from vlprompt.data.synthetic import write_dataset
from vlprompt.engine.evaluate import _gather, evaluate_method, predict


def _truncate(path):
    """A valid JPEG (noisy, so it has many bytes) cut in half."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def broken(tmp_path):
    """(root, truncated train image, text-file 'test image') of a synthetic EuroSAT."""
    write_dataset(tmp_path, "eurosat", images_per_class=5, image_size=8)
    split = load_split("eurosat", tmp_path)
    truncated, text = split.train[3].path, split.test[2].path
    _truncate(Path(truncated))
    with open(text, "w") as f:
        f.write("<html>404 not found</html>\n")
    return tmp_path, truncated, text


def test_verify_images_reports_each_bad_file_once_in_order(broken, tmp_path):
    root, truncated, text = broken
    split = load_split("eurosat", root)
    records = split.train + split.test + split.train  # duplicates are checked once
    missing = str(tmp_path / "gone.jpg")
    bad = verify_images(records + [Record(missing, 0, "x")], workers=2, progress=False)
    assert [p for p, _ in bad] == [truncated, text, missing]
    reasons = dict(bad)
    assert "truncated" in reasons[truncated]
    assert reasons[text] == "not an image file Pillow can read"
    assert reasons[missing] == "file not found"
    assert all("\n" not in r for r in reasons.values())
    assert verify_images([], progress=False) == []


def test_truncated_images_are_found_even_if_pillow_is_told_to_accept_them(broken, caplog):
    root, truncated, _ = broken
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        assert [p for p, _ in verify_images([truncated], progress=False)] == [truncated]
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    assert "LOAD_TRUNCATED_IMAGES" in caplog.text


def test_nothing_in_vlprompt_sets_load_truncated_images():
    import vlprompt.data  # noqa: F401
    import vlprompt.engine  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_datasets_check_decodes_and_lists_bad_files(broken, capsys):
    root, truncated, text = broken
    assert main(["datasets", "check", "eurosat", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "classes      10" in out and "missing      0" in out  # the old lines stay
    assert "undecodable  2 of 50 images decoded (train,val,test)" in out
    assert f"  {truncated}: " in out and "truncated" in out
    assert f"  {text}: not an image file Pillow can read" in out
    # the old existence-only check passes: both files exist
    assert main(["datasets", "check", "eurosat", "--root", str(root), "--no-decode"]) == 0
    assert "undecodable" not in capsys.readouterr().out
    # only the val split: clean
    assert main(["datasets", "check", "eurosat", "--root", str(root), "--splits", "val"]) == 0
    assert "undecodable  0 of 10 images decoded (val)" in capsys.readouterr().out


def test_datasets_check_lists_the_first_20(tmp_path, capsys):
    write_dataset(tmp_path, "eurosat", images_per_class=10, image_size=8)  # 30 test images
    split = load_split("eurosat", tmp_path)
    for r in split.test[:23]:
        with open(r.path, "w") as f:
            f.write("no image")
    assert main(["datasets", "check", "eurosat", "--root", str(tmp_path), "--splits",
                 "test"]) == 1
    out = capsys.readouterr().out
    assert "undecodable  23 of 30 images decoded (test)" in out
    assert sum(line.startswith("  /") for line in out.splitlines()) == 20
    assert "  ... and 3 more" in out


def test_datasets_check_fewshot_subset(broken, capsys):
    root, truncated, _ = broken
    fewshot = load_split("eurosat", root, shots=1, seed=1)
    assert main(["datasets", "check", "eurosat", "--root", str(root), "--shots", "1",
                 "--splits", "train"]) == (1 if truncated in {r.path for r in fewshot.train}
                                           else 0)
    out = capsys.readouterr().out
    assert "checking     the 1-shot seed 1 train/val subset (10 train, 10 val)" in out
    assert "undecodable" in out and "of 10 images decoded (train)" in out


@pytest.mark.parametrize("argv, message", [
    (["--splits", "train,tset"], "--splits 'train,tset': use a comma-separated subset of "
                                 "train,val,test (unknown: tset)"),
    (["--shots", "0"], "shots must be -1 (all images) or >= 1, got 0"),
])
def test_datasets_check_user_errors(broken, capsys, argv, message):
    root, _, _ = broken
    assert main(["datasets", "check", "eurosat", "--root", str(root)] + argv) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_every_datasets_option_has_help():
    from vlprompt.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    datasets = sub.choices["datasets"]
    assert "decode" in datasets.description
    for action in datasets._actions:
        assert action.help, action.dest


# -- ImageDataset and evaluation ----------------------------------------------------------------
class Mean(torch.nn.Module):
    """A 'model' whose logits are the per-channel means (3 classes), deterministic."""

    device = torch.device("cpu")

    def forward(self, x):
        return x.mean(dim=(2, 3))


def _dataset(records, **kw):
    return ImageDataset(records, build_transform(False, 8), **kw)


def test_image_dataset_names_the_file_in_one_line(broken):
    root, _, text = broken
    split = load_split("eurosat", root)
    ds = _dataset(split.test, dataset="eurosat")
    with pytest.raises(BadImageError) as err:
        ds[2]
    assert str(err.value) == (
        f"{text}: cannot decode image (not an image file Pillow can read); run 'vlprompt "
        f"datasets check eurosat ...' to list every bad file, or pass --skip-missing to skip "
        f"unreadable images")
    assert isinstance(err.value, ValueError) and err.value.path == text
    marker, label = _dataset(split.test, skip_bad=True)[2]
    assert marker == BadImage(text, "not an image file Pillow can read")
    assert label == split.test[2].label


def test_bad_image_error_survives_a_worker_reraise_and_pickle():
    original = BadImageError("/d/a (1).jpg", "image file is truncated (3 bytes not processed)",
                             "my_birds")
    # what torch's ExceptionWrapper.reraise builds in the main process
    worker = BadImageError("Caught BadImageError in DataLoader worker process 0.\nOriginal "
                           "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                           f"vlprompt.data.verify.BadImageError: {original}\n")
    assert str(worker) == str(original) and "worker process 0" in worker.details
    assert worker.path == "/d/a (1).jpg" and worker.dataset == "my_birds"
    assert worker.reason == "image file is truncated (3 bytes not processed)"
    assert worker.one_line() == str(original)
    again = pickle.loads(pickle.dumps(original))
    assert str(again) == str(original) and again.path == original.path
    odd = BadImageError("something else\nentirely")
    assert odd.path == "" and odd.one_line() == "something else entirely"


@pytest.mark.parametrize("workers", [0, 1])
def test_evaluation_raises_one_line_naming_the_file(broken, workers):
    root, _, text = broken
    split = load_split("eurosat", root)
    with pytest.raises(BadImageError) as err:
        evaluate_method(Mean(), _dataset(split.test, dataset="eurosat"), split.classnames,
                        batch_size=4, num_workers=workers)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{text}: cannot decode image (")
    assert "vlprompt datasets check eurosat" in message


@pytest.mark.parametrize("workers", [0, 1])
def test_evaluation_skips_and_counts_bad_images(broken, workers):
    root, truncated, text = broken
    split = load_split("eurosat", root)
    records = split.train + split.test
    result = evaluate_method(Mean(), _dataset(records), split.classnames, batch_size=4,
                             num_workers=workers, skip_bad=True)
    assert result["num_skipped"] == 2 and result["skipped_files"] == [truncated, text]
    assert result["num_images"] == len(records) - 2
    # the same numbers as evaluating the good images alone
    good = [r for r in records if r.path not in (truncated, text)]
    clean = evaluate_method(Mean(), _dataset(good), split.classnames, batch_size=4)
    for key in ("accuracy", "macro_f1", "per_class_accuracy", "num_images", "num_correct"):
        assert result[key] == clean[key]
    assert clean["num_skipped"] == 0 and clean["skipped_files"] == []
    # an ImageDataset built with skip_bad skips too
    marked = evaluate_method(Mean(), _dataset(records, skip_bad=True), split.classnames)
    assert marked["num_skipped"] == 2 and marked["accuracy"] == clean["accuracy"]


def test_metrics_unchanged_when_nothing_is_skipped(tmp_path):
    write_dataset(tmp_path, "eurosat", images_per_class=5, image_size=8)
    split = load_split("eurosat", tmp_path)
    ds = _dataset(split.test)
    labels, preds = predict(Mean(), ds, batch_size=3)
    assert labels.tolist() == [r.label for r in split.test]
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    assert preds.tolist() == Mean()(x).argmax(-1).tolist()
    a = evaluate_method(Mean(), ds, split.classnames, batch_size=3)
    b = evaluate_method(Mean(), ds, split.classnames, batch_size=7, skip_bad=True)
    a.pop("time_s"), b.pop("time_s")
    assert a == b


def test_gather_drops_skipped_indices_of_every_rank(monkeypatch):
    from vlprompt.engine import distributed as D

    # rank 0 predicted 0, 2, 4 and skipped 6; rank 1 predicted 1, 3, 5 (7 items)
    ranks = [([0, 2, 4], [9, 8, 7], [0, 1, 2], [(6, "/r0/bad.jpg")]),
             ([1, 5], [6, 4], [1, 0], [(3, "/r1/bad.jpg")])]
    monkeypatch.setattr(D, "all_gather_objects", lambda local: ranks)
    out = _gather(ranks[0], 7)
    assert out.labels.tolist() == [0, 1, 1, 2, 0] and out.preds.tolist() == [9, 6, 8, 7, 4]
    assert out.skipped == ["/r1/bad.jpg", "/r0/bad.jpg"]
    ranks[1] = ([1, 5], [6, 4], [1, 0], [])  # index 3 neither predicted nor skipped
    with pytest.raises(RuntimeError, match="lost images"):
        _gather(ranks[0], 7)


def test_build_loader_skip_bad_drops_items(broken):
    root, truncated, text = broken
    split = load_split("eurosat", root)
    loader = build_loader(split.test, build_transform(False, 8), batch_size=100, train=False,
                          skip_bad=True)
    images, labels = next(iter(loader))
    assert images.shape[0] == len(split.test) - 1 == labels.shape[0]
    assert collate_skip_bad([(BadImage("a", "b"), 0)]) is None
