"""Atomic writes: a failing writer leaves the old file untouched and no temporary file behind."""

import json

import pytest

from vlprompt.fileio import atomic_write, atomic_write_json, atomic_write_text


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
