"""``vlprompt datasets``: list the benchmarks, or check a data folder before a long run."""

from __future__ import annotations

import argparse
import math
import os
from typing import Dict, List, Optional, Tuple

from .base import SPLITS, get_dataset, list_datasets
from .fewshot import base_new_labels
from .records import Record
from .splits import check_shots, fewshot_source, resolve_dataset, take_fewshot
from .verify import verify_images


DEFAULT_CHECK_SHOTS = 16
MAX_LISTED = 20


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "datasets", help="list datasets or check a dataset folder",
        description="Without arguments: list the known datasets. 'check NAME --root DIR': read "
                    "the split files, report missing files and decode every image of --splits "
                    "(exit status 1 when a file is missing or cannot be decoded), so a bad "
                    "image is found before a long run. A dataset .yaml needs no --root.")
    p.add_argument("action", nargs="?", choices=["list", "check"], default="list",
                   help="list (default): the known datasets; check: validate one dataset")
    p.add_argument("name", nargs="?", help="dataset name or dataset .yaml (for check)")
    p.add_argument("--root", help="data root (the folder that contains the dataset folders; "
                                  "not needed for a .yaml)")
    p.add_argument("--shots", type=int, default=None,
                   help=f"few-shot K to look for (default {DEFAULT_CHECK_SHOTS}); given "
                        "explicitly, train/val are checked as that few-shot subset for --seed")
    p.add_argument("--seed", type=int, default=1, help="few-shot seed (default 1)")
    p.add_argument("--splits", default=",".join(SPLITS),
                   help="comma-separated splits whose images are checked (default train,val,test)")
    p.add_argument("--no-decode", dest="decode", action="store_false", default=True,
                   help="only check that the image files exist (fast; truncated or non-image "
                        "files are not found)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding threads (default: up to 8)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        return list_command()
    if not args.name:
        raise ValueError("datasets check needs a dataset name, e.g. 'vlprompt datasets check "
                         "eurosat --root $DATA'")
    return check_command(args.name, args.root, args.shots, args.seed, splits=args.splits,
                         decode=args.decode, workers=args.workers)


def parse_splits(text: str) -> List[str]:
    """``"train,test"`` -> ``["train", "test"]``; an unknown or empty split is a user error."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SPLITS]
    if unknown or not names:
        raise ValueError(f"--splits {text!r}: use a comma-separated subset of "
                         f"{','.join(SPLITS)}" + (f" (unknown: {', '.join(unknown)})"
                                                  if unknown else ""))
    return names


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


def check_command(name: str, root, shots: Optional[int] = None, seed: int = 1,
                  splits: str = ",".join(SPLITS), decode: bool = True,
                  workers: Optional[int] = None) -> int:
    """Print what a run would load from ``name`` and list missing or undecodable images; 1 if
    any. ``shots`` given: train/val are the few-shot subset for ``seed``."""
    wanted = parse_splits(splits)
    if shots is not None:
        check_shots(shots)
    ds = resolve_dataset(name, root)
    print(f"dataset      {ds.name}")
    print(f"folder       {ds.dataset_dir}")
    full = ds.read()
    total = {s: len(full[s]) for s in SPLITS}
    n = len(ds.classnames(full))
    print(f"classes      {n}" + (f" (expected {ds.num_classes} for the full benchmark)"
                                  if ds.num_classes and ds.num_classes != n else ""))
    print(f"train        {total['train']}")
    print(f"val          {'= test' if ds.val_is_test else total['val']}")
    print(f"test         {total['test']}")
    parts = full
    if not ds.test_only:
        base = base_new_labels(range(n), "base")
        print(f"base/new     {len(base)}/{n - len(base)}")
        parts = _print_fewshot(ds, full, shots, seed, n)
    records = [r for s in wanted for r in parts[s]]
    missing = list(dict.fromkeys(r.path for r in records if not os.path.isfile(r.path)))
    print(f"missing      {len(missing)}" + (f" (first: {', '.join(missing[:3])})" if missing else ""))
    if not decode:
        return 1 if missing else 0
    gone = set(missing)
    bad = verify_images([r for r in records if r.path not in gone], workers=workers)
    _print_bad(bad, len({r.path for r in records} - gone), wanted)
    return 1 if missing or bad else 0


def _print_fewshot(ds, full: Dict[str, List[Record]], shots: Optional[int], seed: int,
                   num_classes: int) -> Dict[str, List[Record]]:
    """Print where the few-shot subset comes from; the parts to check (few-shot when asked)."""
    k = DEFAULT_CHECK_SHOTS if shots is None or shots < 1 else shots
    source = fewshot_source(ds, k, seed)
    where = {"pickle": f"found: {ds.fewshot_pickle(k, seed)}",
             "cache": "found in the vlprompt cache",
             "sampled": f"not found ({ds.fewshot_pickle(k, seed)}); "
                        "will be sampled as Dassl does"}[source]
    print(f"few-shot     {k}-shot seed {seed}: {where}")
    if shots is None or shots < 1:
        return full
    train, val, _ = take_fewshot(ds, full, shots, seed, num_classes)
    print(f"checking     the {shots}-shot seed {seed} train/val subset ({len(train)} train, "
          f"{len(val)} val)")
    return {"train": train, "val": full["test"] if ds.val_is_test else val, "test": full["test"]}


def _print_bad(bad: List[Tuple[str, str]], decoded: int, splits: List[str]) -> None:
    print(f"undecodable  {len(bad)} of {decoded} images decoded ({','.join(splits)})")
    for path, reason in bad[:MAX_LISTED]:
        print(f"  {path}: {reason}")
    if len(bad) > MAX_LISTED:
        print(f"  ... and {len(bad) - MAX_LISTED} more")
