"""``vlprompt datasets``: list the benchmarks, or check a data folder before a long run."""

from __future__ import annotations

import argparse
import math
import os

from .base import get_dataset, list_datasets
from .fewshot import base_new_labels
from .splits import fewshot_source, resolve_dataset


def register(subparsers) -> None:
    p = subparsers.add_parser("datasets", help="list datasets or check a dataset folder",
                              description="Without arguments: list the known datasets. "
                                          "'check NAME --root DIR': validate a dataset folder.")
    p.add_argument("action", nargs="?", choices=["list", "check"], default="list")
    p.add_argument("name", nargs="?", help="dataset name or dataset .yaml (for check)")
    p.add_argument("--root", help="data root (the folder that contains the dataset folders)")
    p.add_argument("--shots", type=int, default=16, help="few-shot K to look for (default 16)")
    p.add_argument("--seed", type=int, default=1, help="few-shot seed (default 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        return list_command()
    if not args.name:
        raise ValueError("datasets check needs a dataset name, e.g. 'vlprompt datasets check "
                         "eurosat --root $DATA'")
    return check_command(args.name, args.root, args.shots, args.seed)


def list_command() -> int:
    rows = []
    for name in list_datasets():
        cls = get_dataset(name)
        n = cls.num_classes
        base_new = "-" if cls.test_only or not n else f"{math.ceil(n / 2)}/{n - math.ceil(n / 2)}"
        rows.append((name, str(n or "?"), base_new, "test" if cls.test_only else "train/val/test",
                     cls.layout or cls.folder + "/"))
    header = ("dataset", "classes", "base/new", "splits", "expected under --root")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    for row in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
    print("\nCustom datasets: pass a .yaml file instead of a name "
          "(see vlprompt.data.custom).")
    return 0


def check_command(name: str, root, shots: int, seed: int) -> int:
    ds = resolve_dataset(name, root)
    print(f"dataset      {ds.name}")
    print(f"folder       {ds.dataset_dir}")
    full = ds.read()
    total = {s: len(full[s]) for s in ("train", "val", "test")}
    missing = [r.path for s in ("train", "val", "test") for r in full[s]
               if not os.path.isfile(r.path)]
    n = len(ds.classnames(full))
    print(f"classes      {n}" + (f" (expected {ds.num_classes} for the full benchmark)"
                                  if ds.num_classes and ds.num_classes != n else ""))
    print(f"train        {total['train']}")
    print(f"val          {'= test' if ds.val_is_test else total['val']}")
    print(f"test         {total['test']}")
    if not ds.test_only:
        base = base_new_labels(range(n), "base")
        print(f"base/new     {len(base)}/{n - len(base)}")
        source = fewshot_source(ds, shots, seed)
        where = {"pickle": f"found: {ds.fewshot_pickle(shots, seed)}",
                 "cache": "found in the vlprompt cache",
                 "sampled": f"not found ({ds.fewshot_pickle(shots, seed)}); "
                            "will be sampled as Dassl does"}[source]
        print(f"few-shot     {shots}-shot seed {seed}: {where}")
    print(f"missing      {len(missing)}" + (f" (first: {', '.join(missing[:3])})" if missing else ""))
    return 1 if missing else 0
