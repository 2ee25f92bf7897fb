"""Is a setting's accuracy effect within seed-to-seed noise? (issue 14: bf16, cached views)

Runs the toy-world demo (``vlprompt demo``'s full setting: base-to-new, 16 shots) for each seed
twice, with the baseline's ``train.*`` overrides and with the variant's, added to the demo's own
for every trained method, and prints per method the HM of each run, the baseline's seed-to-seed
standard deviation and the variant − baseline difference paired by seed. The verdict line
compares the mean paired difference with the noise: the standard error of a paired difference
when the setting has no effect (baseline seed std × sqrt(2 / seeds)). Run folders are reused
(``--output``): a baseline measured once serves every variant.

    OMP_NUM_THREADS=2 python benchmarks/toyworld_effect.py --seeds 1 2 3 \\
        --baseline fp32 train.precision=fp32 --variant bf16 train.precision=bf16
    OMP_NUM_THREADS=2 python benchmarks/toyworld_effect.py --seeds 1 2 3 \\
        --methods coop kgcoop prograd tcp cocoop \\
        --baseline fp32 train.precision=fp32 --variant views8 train.precision=fp32 \\
        train.cached_views=8

bf16 on a CPU without native bf16 (no avx512_bf16/AMX) is emulated: the same rounding, only
slower, so the accuracy effect can be measured on any CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path


def run(seed: int, label: str, overrides: list[str], output: Path,
        methods: list[str] | None) -> tuple[dict[str, float], dict[str, float]]:
    """(HM by method, training seconds by method) of one demo run (reused when finished)."""
    from vlprompt.toyworld.demo import DemoConfig, run_demo

    base = DemoConfig.full()
    config = dataclasses.replace(base, seed=seed,
                                 train_overrides=tuple(base.train_overrides) + tuple(overrides))
    summary = run_demo(output / f"{label}-seed{seed}", config=config, methods=methods,
                       say=lambda line: None)
    rows = summary["results"]
    # training time as the run recorded it (a reused finished run's call only evaluates)
    train_s = {r["method"]: json.loads((Path(r["run_dir"]) / "results.json").read_text())
               ["train"].get("time_s", 0.0) for r in rows}
    return {r["method"]: r["hm"] for r in rows}, train_s


def compare(hm: dict, seconds: dict, labels: tuple[str, str], seeds: list[int]) -> dict:
    """Print the per-method table and the verdict; the figures as a dict."""
    base, var = labels
    methods = [m for m in hm[base][seeds[0]] if m != "zeroshot"]
    scale = (2 / len(seeds)) ** 0.5
    rows = []
    print(f"{'method':10s} {base + ' HM by seed':>22s} {var + ' HM by seed':>22s} "
          f"{'std':>6s} {'diff':>6s} {'time ×':>7s}")
    for m in methods:
        b = [hm[base][s][m] for s in seeds]
        v = [hm[var][s][m] for s in seeds]
        diff = statistics.mean(x - y for x, y in zip(v, b))
        std = statistics.stdev(b) if len(b) > 1 else float("nan")
        speed = sum(seconds[base][s][m] for s in seeds) / max(
            sum(seconds[var][s][m] for s in seeds), 1e-9)
        rows.append({"method": m, base: b, var: v, "std": std, "paired_diff": diff,
                     "time_ratio": speed})
        print(f"{m:10s} {' '.join(f'{x:5.1f}' for x in b):>22s} "
              f"{' '.join(f'{x:5.1f}' for x in v):>22s} {std:6.2f} {diff:+6.2f} {speed:7.2f}")
    diffs = [r["paired_diff"] for r in rows]
    stds = [r["std"] for r in rows]
    within = sum(abs(d) <= 2 * s * scale for d, s in zip(diffs, stds))
    print(f"{var} - {base}: mean paired HM difference {statistics.mean(diffs):+.2f} points over "
          f"{len(methods)} methods x {len(seeds)} seeds (range {min(diffs):+.2f} .. "
          f"{max(diffs):+.2f}); mean seed std {statistics.mean(stds):.2f}; standard error of a "
          f"paired difference under no effect {statistics.mean(stds) * scale:.2f}; within 2 SE: "
          f"{within}/{len(methods)}")
    return {"rows": rows, "mean_paired_diff": statistics.mean(diffs),
            "mean_std": statistics.mean(stds), "within_2se": within}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--baseline", nargs="+", required=True, metavar="LABEL [OVERRIDE ...]")
    parser.add_argument("--variant", nargs="+", required=True, metavar="LABEL [OVERRIDE ...]")
    parser.add_argument("--output", default="vlprompt-toyworld-effect",
                        help="run folders, reused across invocations")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    output = Path(args.output)
    settings = {args.baseline[0]: args.baseline[1:], args.variant[0]: args.variant[1:]}
    hm: dict = {label: {} for label in settings}
    seconds: dict = {label: {} for label in settings}
    for seed in args.seeds:
        for label, overrides in settings.items():
            start = time.perf_counter()
            hm[label][seed], seconds[label][seed] = run(seed, label, overrides, output,
                                                        args.methods)
            print(f"seed {seed} {label}: {time.perf_counter() - start:.0f} s", flush=True)
    report = compare(hm, seconds, (args.baseline[0], args.variant[0]), args.seeds)
    if args.json:
        Path(args.json).write_text(json.dumps({"seeds": args.seeds, "settings": settings,
                                               **report}, indent=1))


if __name__ == "__main__":
    main()
