"""``vlprompt demo --quick`` end to end (the one slow test of the suite: a few minutes on 2 cores).

It pretrains the tiny CLIP in a fresh cache, writes the benchmark, and runs zero-shot plus every
registered trainable method. Checked on the result files: zero-shot is far above chance on base
AND new classes (new = colour-shape pairs never seen in pretraining), and every trained method
beats zero-shot on the base classes it was trained on.
"""

import json

from vlprompt.cli import main
from vlprompt.toyworld.demo import harmonic_mean, trainable_methods


def test_demo_quick(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| method | Base | New | HM |" in printed

    summary = json.loads((out / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["results"]}
    assert set(rows) == {"zeroshot", *trainable_methods()} and len(rows) >= 2
    chance = summary["chance"]
    zs = rows["zeroshot"]
    assert zs["base"] > 3 * chance["base"] and zs["new"] > 3 * chance["new"], (zs, chance)
    for name, row in rows.items():
        assert abs(row["hm"] - harmonic_mean(row["base"], row["new"])) < 1e-9
        results = json.loads((out / name / "results.json").read_text())
        assert set(results["evaluations"]) >= {"toyworld/base", "toyworld/new"}
        assert results["evaluations"]["toyworld/base"]["accuracy"] == row["base"]
        if name != "zeroshot":
            assert row["base"] > zs["base"], f"{name} does not beat zero-shot on base: {rows}"
    assert (out / "base2new.png").stat().st_size > 1000
    assert "| zeroshot |" in (out / "table.md").read_text()
