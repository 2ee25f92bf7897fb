"""Atomic writes: a failing writer leaves the old file untouched and no temporary file behind;
files honour the umask, are fsynced, and stale temporaries can be removed."""

import json
import os
import stat

import pytest

from vlprompt.fileio import (atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text,
                             fsync_dir, fsync_file, make_temp_dir, remove_stale_temporaries)


def test_failed_write_keeps_old_file_and_cleans_up(tmp_path):
    target = atomic_write_text(tmp_path / "sub" / "results.json", "old\n")

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]


def test_json_and_text(tmp_path):
    path = atomic_write_json(tmp_path / "a.json", {"accuracy": 83.1, "name": "café"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"accuracy": 83.1, "name": "café"}
    assert path.read_text(encoding="utf-8").endswith("}\n")


# -- permissions, durability, stale temporaries ----------------------------------------------
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
def test_files_honour_the_umask(tmp_path, umask_022):
    path = atomic_write_text(tmp_path / "results.json", "{}\n")
    assert _mode(path) == 0o644  # mkstemp would give 0600
    atomic_write_text(path, "again\n")  # replacing keeps the umask mode too
    assert _mode(path) == 0o644
    os.umask(0o077)
    assert _mode(atomic_write_bytes(tmp_path / "private.bin", b"x")) == 0o600


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
def test_temp_dir_honours_the_umask(tmp_path, umask_022):
    folder = make_temp_dir(tmp_path, ".build-")
    assert folder.name.startswith(".build-") and folder.is_dir() and _mode(folder) == 0o755


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
def test_toyworld_folder_honours_the_umask(tmp_path, umask_022):
    from vlprompt.toyworld.benchmark import BenchmarkConfig, write_benchmark

    target = write_benchmark(tmp_path, BenchmarkConfig(image_size=8, train_per_class=1,
                                                       val_per_class=1, test_per_class=1))
    assert _mode(target) == 0o755
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".toyworld-")]


def test_fsync_helpers(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "x")
    fsync_file(path)
    fsync_dir(tmp_path)
    fsync_dir(tmp_path / "not-there")  # cannot be opened: a no-op, like on Windows
    with pytest.raises(FileNotFoundError):
        fsync_file(tmp_path / "missing.txt")


def test_fsync_before_replace(tmp_path, monkeypatch):
    """The data is synced before the rename publishes it, and the folder after."""
    import vlprompt.fileio as fileio

    calls = []
    monkeypatch.setattr(fileio, "fsync_file", lambda p: calls.append(("file", os.path.basename(p))))
    monkeypatch.setattr(fileio, "fsync_dir", lambda p: calls.append(("dir", str(p))))
    real_replace = os.replace
    monkeypatch.setattr(fileio.os, "replace",
                        lambda a, b: (calls.append(("replace", os.path.basename(b))),
                                      real_replace(a, b)))
    fileio.atomic_write_text(tmp_path / "r.json", "{}")
    assert [c[0] for c in calls] == ["file", "replace", "dir"]
    assert calls[0][1].startswith(".r.json.") and calls[0][1].endswith(".tmp")
    assert calls[2][1] == str(tmp_path)


def test_remove_stale_temporaries(tmp_path):
    keep = [atomic_write_text(tmp_path / "results.json", "{}"), tmp_path / ".hidden",
            tmp_path / "notes.tmp", tmp_path / ".x.tmp"]
    for p in keep[1:]:
        p.write_text("mine")
    stale = [tmp_path / ".results.json.abcd1234.tmp", tmp_path / ".model.pt.k_9xq2zz.tmp"]
    for p in stale:
        p.write_text("half")
    (tmp_path / ".dir.abcd1234.tmp").mkdir()  # folders are not atomic_write temporaries
    assert remove_stale_temporaries(tmp_path) == sorted(stale)
    assert all(p.exists() for p in keep) and (tmp_path / ".dir.abcd1234.tmp").is_dir()
    assert remove_stale_temporaries(tmp_path / "absent") == []


def test_remove_stale_temporaries_spares_recent_files(tmp_path):
    fresh = tmp_path / ".a.json.abcd1234.tmp"
    fresh.write_text("being written")
    assert remove_stale_temporaries(tmp_path, min_age_s=3600) == []
    os.utime(fresh, (0, 0))
    assert remove_stale_temporaries(tmp_path, min_age_s=3600) == [fresh]
