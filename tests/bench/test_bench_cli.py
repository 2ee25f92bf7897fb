"""``vlprompt bench`` quick mode: the JSON report's structure, with the optimised and the
reference-style mode both measured (no timing assertions: speed belongs in benchmarks/)."""

from __future__ import annotations

import json

import torch

from vlprompt.bench.measure import BF16_PEAK_TFLOPS, device_peak_tflops
from vlprompt.bench.table import format_table
from vlprompt.cli import main

torch.set_num_threads(1)


def test_bench_quick_json(tmp_path):
    out = tmp_path / "bench.json"
    code = main(["bench", "--quick", "--methods", "coop,cocoop,maple,zeroshot", "--json",
                 str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["setting"]["shape"] == "tiny" and report["setting"]["classes"] == 10
    assert report["device_name"] and report["peak_tflops"] is None  # CPU: no MFU
    rows = {r["method"]: r for r in report["results"]}
    assert list(rows) == ["coop", "cocoop", "maple", "zeroshot"]
    for name in ("coop", "cocoop", "maple"):
        row = rows[name]
        assert "error" not in row, row.get("error")
        for mode in ("vlprompt", "reference"):
            m = row[mode]
            assert m["mode"] == mode and m["batch"] == 2
            assert m["train_images_per_s"] > 0 and m["eval_images_per_s"] > 0
            assert m["step_s"] > 0 and m["train_peak_mb"] >= 0
        assert row["vlprompt"]["train_flops_per_image"] > 0
        assert row["vlprompt"]["eval_flops_per_image"] > 0
        assert row["train_speedup"] > 0 and row["eval_speedup"] > 0
        assert row["reference"]["precision"] == "fp32"
    # train.cached_views: the step on precomputed features, for the frozen-image-tower methods
    for name in ("coop", "cocoop"):
        assert rows[name]["vlprompt"]["cached_views_train_images_per_s"] > 0
        assert rows[name]["cached_views_speedup"] > 0
        assert "cached_views_train_images_per_s" not in rows[name]["reference"]
    assert "cached_views_train_images_per_s" not in rows["maple"]["vlprompt"]
    zs = rows["zeroshot"]
    assert "train_images_per_s" not in zs["vlprompt"] and zs["vlprompt"]["eval_images_per_s"] > 0
    table = format_table(report)
    assert table.count("\n") == 1 + len(rows) and "| coop |" in table


def test_bench_without_reference(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--methods", "coop", "--no-compare-reference",
                 "--no-flops", "--classes", "3,5", "--json", str(out)]) == 0
    reports = json.loads(out.read_text())["reports"]
    assert [r["setting"]["classes"] for r in reports] == [3, 5]
    row = reports[0]["results"][0]
    assert "reference" not in row and "train_speedup" not in row
    assert "train_flops_per_image" not in row["vlprompt"]


def test_unknown_method_is_a_one_line_error(capsys):
    assert main(["bench", "--quick", "--methods", "nosuch"]) == 1
    assert "nosuch" in capsys.readouterr().err


def test_device_peaks():
    assert device_peak_tflops("NVIDIA H200") == BF16_PEAK_TFLOPS["H200"]
    assert device_peak_tflops("NVIDIA H100 PCIe") == BF16_PEAK_TFLOPS["H100 PCIe"]
    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == BF16_PEAK_TFLOPS["H100"]
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert device_peak_tflops("Tesla T4") is None


def test_e2e_quick_breakdown(tmp_path):
    """``--e2e``: a tiny base-to-new job through ``run_protocol`` with every stage timed, and
    the timers removed afterwards."""
    from vlprompt.clip import model

    forward = model.VisionTransformer.forward
    out = tmp_path / "e2e.json"
    assert main(["bench", "--e2e", "coop", "--quick", "--e2e-classes", "4", "--e2e-shots", "2",
                 "--e2e-epochs", "1", "--e2e-batch", "2", "--e2e-root", str(tmp_path / "job"),
                 "--json", str(out), "train.num_workers=0"]) == 0
    report = json.loads(out.read_text())
    stages = report["stages_s"]
    assert set(stages) == {"data loading", "image tower", "text tower", "backward", "optimiser",
                           "evaluation", "other"}
    assert stages["evaluation"] > 0 and stages["image tower"] > 0 and stages["optimiser"] > 0
    assert report["wall_s"] >= sum(v for k, v in stages.items() if k != "other") - 1e-6
    assert model.VisionTransformer.forward is forward


def test_a_killed_bench_keeps_the_methods_it_measured(tmp_path, monkeypatch):
    """The JSON is rewritten after every method: an interrupt during the second keeps the first."""
    import vlprompt.bench.measure as measure

    real = measure.measure_method

    def interrupted(method, *args, **kwargs):
        if method == "cocoop":
            raise KeyboardInterrupt  # a kill mid-run (not caught as a method's failure)
        return real(method, *args, **kwargs)
    monkeypatch.setattr(measure, "measure_method", interrupted)
    out = tmp_path / "bench.json"
    # the CLI turns the interrupt into a non-zero exit
    assert main(["bench", "--quick", "--methods", "coop,cocoop", "--json", str(out)]) != 0
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["results"]] == ["coop"]
    assert report["results"][0]["vlprompt"]["train_images_per_s"] > 0


def test_promptkd_is_benched_with_a_random_weight_teacher(tmp_path):
    """A distilling method gets its recipe's teacher on random weights (the student's shape at
    the tests' tiny one), so it is measured like the others."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--methods", "promptkd", "--no-flops", "--rounds", "1",
                 "--json", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert "error" not in row, row.get("error")
    assert row["vlprompt"]["train_images_per_s"] > 0 and row["train_speedup"] > 0
