"""Report tables and plots on fabricated results.json trees (numbers from METHODS.md §7)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest

from vlprompt.cli import main
from vlprompt.protocols import DG_TARGETS, STANDARD_DATASETS
from vlprompt.report import (Stat, build_tables, collect_results, format_tables, harmonic_mean,
                             report, write_plots)

# METHODS.md §7.1, CoOp column: dataset -> (base, new, hm) and the printed Average row.
COOP_B2N = {
    "imagenet": (76.47, 67.88, 71.92), "caltech101": (98.00, 89.81, 93.73),
    "oxford_pets": (93.67, 95.29, 94.47), "stanford_cars": (78.12, 60.40, 68.13),
    "oxford_flowers": (97.60, 59.67, 74.06), "food101": (88.33, 82.26, 85.19),
    "fgvc_aircraft": (40.44, 22.30, 28.75), "sun397": (80.60, 65.89, 72.51),
    "dtd": (79.44, 41.18, 54.24), "eurosat": (92.19, 54.74, 68.69),
    "ucf101": (84.69, 56.05, 67.46),
}
COOP_AVERAGE = ("82.69", "63.22", "71.66")
# METHODS.md §7.2 / §7.3, CoOp rows.
COOP_XD = {"caltech101": 93.70, "oxford_pets": 89.14, "stanford_cars": 64.51,
           "oxford_flowers": 68.71, "food101": 85.30, "fgvc_aircraft": 18.47, "sun397": 64.15,
           "dtd": 41.92, "eurosat": 46.39, "ucf101": 66.55}
COOP_DG = {"imagenetv2": 64.20, "imagenet_sketch": 47.99, "imagenet_a": 49.71,
           "imagenet_r": 75.21}


def write_result(root: Path, protocol, method, dataset, shots, seed, subsample, accuracies,
                 finished=True, backbone="tiny") -> Path:
    """A results.json in the engine's schema, in the protocol runner's folder layout."""
    folder = root / str(protocol) / method / dataset / f"shots_{shots}" / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    evaluations = {}
    for key, acc in accuracies.items():
        ds, sub = key.split("/")
        evaluations[key] = {"dataset": ds, "subsample": sub, "accuracy": acc, "macro_f1": acc,
                            "num_images": 100, "num_correct": round(acc)}
    data = {"vlprompt_version": "0.1.0", "method": method, "protocol": protocol,
            "dataset": dataset, "backbone": backbone, "backbone_fingerprint": "sha256:abc", "shots": shots,
            "seed": seed, "subsample": subsample, "config": {}, "num_trainable_params": 10,
            "train": {"epochs": 1, "loss_history": [1.0], "time_s": 0.1, "finished": finished},
            "evaluations": evaluations}
    (folder / "results.json").write_text(json.dumps(data))
    return folder


def coop_base2new_tree(root: Path, offsets=(0.0,)) -> None:
    """CoOp's per-dataset rows; each seed adds an offset, symmetric offsets keep the means."""
    for dataset, (base, new, _) in COOP_B2N.items():
        for seed, off in enumerate(offsets, 1):
            write_result(root, "base2new", "coop", dataset, 16, seed, "base",
                         {f"{dataset}/base": base + off, f"{dataset}/new": new - off})


def table_row(md: str, title: str, label: str) -> list[str]:
    """Cells of the row ``label`` in the markdown table ``title``."""
    block = md.split(f"### {title}")[1].split("###")[0]
    for line in block.splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in {title!r}:\n{block}")


def test_stat_uses_population_std():
    s = Stat.of([70.0, 72.0, 74.0])
    assert s.mean == pytest.approx(72.0)
    assert s.std == pytest.approx(math.sqrt(8 / 3))  # ddof = 0, as parse_test_res.py
    assert s.n == 3
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)


def test_base2new_average_matches_coop_paper_row(tmp_path):
    coop_base2new_tree(tmp_path, offsets=(-0.3, 0.0, 0.3))
    md = format_tables(build_tables(collect_results(tmp_path)), "md")
    assert table_row(md, "Base-to-new: coop", "Average") == list(COOP_AVERAGE)
    for dataset, (base, new, hm) in COOP_B2N.items():
        cells = table_row(md, "Base-to-new: coop", dataset)
        std = f"{math.sqrt(2 * 0.09 / 3):.2f}"
        assert cells == [f"{base:.2f} ± {std}", f"{new:.2f} ± {std}", f"{hm:.2f}"]


def test_hm_is_computed_from_seed_means(tmp_path):
    # per-seed HMs are 64.29 each; the HM of the means (70, 70) is 70
    for seed, (base, new) in ((1, (90.0, 50.0)), (2, (50.0, 90.0))):
        write_result(tmp_path, "base2new", "m", "dtd", 16, seed, "base",
                     {"dtd/base": base, "dtd/new": new})
    write_result(tmp_path, "base2new", "m", "eurosat", 16, 1, "base",
                 {"eurosat/base": 80.0, "eurosat/new": 40.0})
    write_result(tmp_path, "base2new", "m", "eurosat", 16, 2, "base",
                 {"eurosat/base": 80.0, "eurosat/new": 40.0})
    md = report(tmp_path)
    assert table_row(md, "Base-to-new: m", "dtd") == ["70.00 ± 20.00", "70.00 ± 20.00", "70.00"]
    assert table_row(md, "Base-to-new: m", "eurosat") == ["80.00 ± 0.00", "40.00 ± 0.00", "53.33"]
    # average: B = 75, N = 55, HM(75, 55) = 63.46 (not the mean of the HMs, 61.67)
    assert table_row(md, "Base-to-new: m", "Average") == ["75.00", "55.00", "63.46"]


def test_csv_and_json_outputs(tmp_path):
    runs = tmp_path / "runs"
    coop_base2new_tree(runs, offsets=(-1.0, 1.0))
    out_csv = tmp_path / "t.csv"
    assert main(["report", str(runs), "--format", "csv", "--output", str(out_csv)]) == 0
    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    eurosat_base = [r for r in rows if r["row"] == "eurosat" and r["column"] == "Base"]
    assert len(eurosat_base) == 1
    assert float(eurosat_base[0]["mean"]) == pytest.approx(92.19)
    assert float(eurosat_base[0]["std"]) == pytest.approx(1.0)
    assert eurosat_base[0]["n"] == "2"
    avg_hm = [r for r in rows if r["row"] == "Average" and r["column"] == "HM"][0]
    assert f"{float(avg_hm['mean']):.2f}" == COOP_AVERAGE[2]
    assert avg_hm["std"] == ""  # derived values carry no seed std

    data = json.loads(report(runs, fmt="json"))
    table = data["tables"][0]
    assert table["protocol"] == "base2new" and table["columns"] == ["Base", "New", "HM"]
    labels = [row["label"] for row in table["rows"]]
    assert labels == list(STANDARD_DATASETS) + ["Average"]
    assert table["rows"][-1]["cells"]["New"]["mean"] == pytest.approx(63.22, abs=0.005)


def test_fewshot_xd_dg_tables(tmp_path):
    for seed, off in ((1, -2.0), (2, 2.0)):
        for k, acc in ((1, 50.0), (4, 60.0), (16, 70.0)):
            write_result(tmp_path, "fewshot", "coop", "dtd", k, seed, "all", {"dtd/all": acc + off})
            write_result(tmp_path, "fewshot", "coop", "eurosat", k, seed, "all",
                         {"eurosat/all": acc + 10})
        accs = {"imagenet/all": 71.51}
        accs.update({f"{d}/all": v for d, v in {**COOP_XD, **COOP_DG}.items()})
        write_result(tmp_path, "xd", "coop", "imagenet", 16, seed, "all", accs)
    md = report(tmp_path)
    assert table_row(md, "Few-shot: coop", "dtd") == ["50.00 ± 2.00", "60.00 ± 2.00",
                                                      "70.00 ± 2.00"]
    assert table_row(md, "Few-shot: coop", "Average") == ["55.00", "65.00", "75.00"]
    xd = table_row(md, "Cross-dataset transfer", "coop")
    assert xd[0] == "71.51 ± 0.00" and xd[-1] == "63.88"  # METHODS §7.2 target average
    assert len(xd) == 1 + len(COOP_XD) + 1
    header = md.split("### Cross-dataset transfer")[1].splitlines()[2]
    assert [c.strip() for c in header.strip("|").split("|")][1:] == (
        ["imagenet"] + [d for d in STANDARD_DATASETS if d != "imagenet"] + ["Target avg"])
    dg = table_row(md, "Domain generalisation", "coop")
    assert dg[-1] == "59.28" and len(dg) == 1 + len(DG_TARGETS) + 1  # METHODS §7.3


def test_unfinished_and_duplicate_runs(tmp_path):
    write_result(tmp_path / "a", "fewshot", "coop", "dtd", 1, 1, "all", {"dtd/all": 40.0})
    write_result(tmp_path / "a", "fewshot", "coop", "dtd", 1, 2, "all", {"dtd/all": 99.0},
                 finished=False)
    md = report(tmp_path / "a")
    assert table_row(md, "Few-shot: coop", "dtd") == ["40.00"]  # the unfinished seed is left out
    # the same run under another output root (e.g. the demo's) is reported apart, not averaged
    write_result(tmp_path / "b", "fewshot", "coop", "dtd", 1, 1, "all", {"dtd/all": 45.0})
    md = report(tmp_path)
    assert table_row(md, "Few-shot: coop [a]", "dtd") == ["40.00"]
    assert table_row(md, "Few-shot: coop [b]", "dtd") == ["45.00"]
    # two runs of one seed with the same settings in one experiment are an error naming both
    for name, lr in (("x", 0.002), ("y", 0.002), ("z", 0.01)):
        folder = write_result(tmp_path / "c", "fewshot", "coop", "dtd", 1, 1, "all",
                              {"dtd/all": 50.0 + 10 * lr})
        data = json.loads((folder / "results.json").read_text())
        data["config"] = {"train": {"lr": lr, "num_workers": 0}}
        target = tmp_path / "d" / name
        target.mkdir(parents=True)
        (target / "results.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"two results for seed 1 of coop \(train.lr=0.002\)"):
        report(tmp_path / "d")
    (tmp_path / "d" / "y" / "results.json").unlink()
    md = report(tmp_path / "d")  # config grid points are separate rows
    assert table_row(md, "Few-shot: coop (train.lr=0.002)", "dtd") == ["50.02"]
    assert table_row(md, "Few-shot: coop (train.lr=0.01)", "dtd") == ["50.10"]
    with pytest.raises(FileNotFoundError, match="no finished results.json"):
        report(tmp_path / "a" / "fewshot" / "coop" / "dtd" / "shots_1" / "seed2")


def test_plots_written(tmp_path):
    runs = tmp_path / "runs"
    coop_base2new_tree(runs)
    for seed in (1, 2):
        for k in (1, 2, 4):
            write_result(runs, "fewshot", "coop", "dtd", k, seed, "all",
                         {"dtd/all": 40.0 + k + seed})
    out = tmp_path / "report" / "tables.md"
    assert main(["report", str(runs), "--plot", "--output", str(out)]) == 0
    pngs = sorted(p.name for p in out.parent.glob("*.png"))
    assert pngs == ["base2new_coop.png", "fewshot_Average.png", "fewshot_dtd.png"]
    for name in pngs:
        data = (out.parent / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert "### Few-shot: coop" in out.read_text()
    # two methods: an extra comparison table and chart
    write_result(runs, "base2new", "cocoop", "dtd", 16, 1, "base",
                 {"dtd/base": 77.0, "dtd/new": 56.0})
    written = write_plots(collect_results(runs), tmp_path / "p2")
    assert {p.name for p in written} >= {"base2new_cocoop.png", "base2new_averages.png"}


def test_report_cli_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    write_result(tmp_path, "fewshot", "coop", "dtd", 1, 1, "all", {"dtd/all": 40.0})
    assert main(["report", str(tmp_path)]) == 0
    assert "| dtd | 40.00 |" in capsys.readouterr().out


def test_method_summary_uneven_seeds_and_other_runs(tmp_path):
    coop_base2new_tree(tmp_path)
    write_result(tmp_path, "base2new", "cocoop", "dtd", 16, 1, "base",
                 {"dtd/base": 77.0, "dtd/new": 56.0})
    write_result(tmp_path, "base2new", "cocoop", "dtd", 16, 2, "base",
                 {"dtd/base": 79.0, "dtd/new": 58.0})
    write_result(tmp_path, "base2new", "cocoop", "dtd", 16, 3, "base", {"dtd/base": 78.0})
    write_result(tmp_path, None, "zeroshot", "eurosat", 16, 1, "all", {"eurosat/all": 48.5})
    md = report(tmp_path)
    # New has 2 seeds where Base has 3: the cell says so
    assert table_row(md, "Base-to-new: cocoop", "dtd") == [
        "78.00 ± 0.82", "57.00 ± 1.00 (n=2)", f"{harmonic_mean(78.0, 57.0):.2f} (n=2)"]
    # derived cells carry the smallest seed count behind them
    assert table_row(md, "Base-to-new: averages", "coop (11 datasets)") == [
        "82.69 (n=1)", "63.22 (n=1)", "71.66 (n=1)"]
    assert table_row(md, "Base-to-new: averages", "cocoop (1 dataset)")[:2] == [
        "78.00", "57.00 (n=2)"]
    assert table_row(md, "Other runs", "zeroshot eurosat/all 16-shot") == ["48.50"]
