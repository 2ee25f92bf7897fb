"""The toyworld benchmark: layout, base/new design and the registered dataset reader."""

import json

import pytest

from vlprompt.data import load_split
from vlprompt.toyworld import benchmark as bench
from vlprompt.toyworld import world

SMALL = bench.BenchmarkConfig(train_per_class=2, val_per_class=1, test_per_class=2, seed=3)


def test_base_and_new_are_disjoint_combinations_of_shared_attributes():
    base, new = bench.class_pairs()
    assert len(base) == len(new) == 16
    assert not set(base) & set(new)
    for half in (base, new):
        assert {c for c, _ in half} == set(range(len(world.COLOURS)))
        assert {s for _, s in half} == set(range(len(world.SHAPES)))
    names = bench.classnames()
    assert len(set(names)) == 32 and names[0] == world.class_name(*base[0])


def test_write_layout_and_reader(tmp_path):
    folder = bench.write_benchmark(tmp_path, SMALL)
    assert folder == tmp_path / "toyworld"
    split = json.loads((folder / "split_toyworld.json").read_text())
    assert set(split) == {"train", "val", "test"}
    assert len(split["train"]) == 64 and len(split["val"]) == 32 and len(split["test"]) == 64
    for rel, label, name in split["test"]:
        assert (folder / "images" / rel).is_file()
        assert bench.classnames()[label] == name
    base = load_split("toyworld", tmp_path, subsample="base")
    new = load_split("toyworld", tmp_path, subsample="new")
    n_base = len(bench.class_pairs()[0])
    assert [c.replace("_", " ") for c in base.classnames] == bench.classnames()[:n_base]
    assert [c.replace("_", " ") for c in new.classnames] == bench.classnames()[n_base:]
    assert base.template == bench.TEMPLATE


def test_rewrite_is_reused_replaced_or_refused(tmp_path):
    folder = bench.write_benchmark(tmp_path, SMALL)
    stamp = (folder / "toyworld.json").stat().st_mtime_ns
    assert bench.write_benchmark(tmp_path, SMALL) == folder
    assert (folder / "toyworld.json").stat().st_mtime_ns == stamp
    other = bench.BenchmarkConfig(train_per_class=1, val_per_class=1, test_per_class=1, seed=3)
    bench.write_benchmark(tmp_path, other)  # another toy-world config: replaced
    assert len(json.loads((folder / "split_toyworld.json").read_text())["train"]) == 32
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".toyworld-")]
    (folder / "toyworld.json").unlink()  # now it looks like someone else's folder
    with pytest.raises(ValueError, match="not written by the toy world"):
        bench.write_benchmark(tmp_path, SMALL)
    bench.write_benchmark(tmp_path, SMALL, overwrite=True)
    assert len(json.loads((folder / "split_toyworld.json").read_text())["train"]) == 64


def test_same_seed_same_images(tmp_path):
    a = bench.write_benchmark(tmp_path / "a", SMALL)
    b = bench.write_benchmark(tmp_path / "b", SMALL)
    assert (a / "split_toyworld.json").read_bytes() == (b / "split_toyworld.json").read_bytes()
    files = sorted(p.relative_to(a) for p in (a / "images").rglob("*.png"))
    assert len(files) == 32 * 5
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
