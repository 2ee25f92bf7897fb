"""Tables and plots from the ``results.json`` files of protocol runs.

Averaging follows the papers (PROTOCOL.md §7, METHODS.md §1.2): per dataset, each accuracy is the
mean over seeds with the population standard deviation (ddof = 0, as ``parse_test_res.py``); the
harmonic mean is computed from the mean Base and mean New accuracy, and the "Average" row takes the
mean of the per-dataset Base means and of the per-dataset New means, then the HM of those two.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from .fileio import atomic_write_bytes, atomic_write_text
from .protocols import DG_TARGETS, STANDARD_DATASETS

logger = logging.getLogger(__name__)

FORMATS = ("md", "csv", "json")
PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------- statistics

@dataclasses.dataclass(frozen=True)
class Stat:
    """A mean with its population std over ``n`` seeds; ``std`` is None for derived values (HM,
    averages over datasets), which are not means over seeds."""

    mean: float
    std: Optional[float] = None
    n: int = 1

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat":
        values = list(values)
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        return cls(mean, std, len(values))

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "n": self.n}


def harmonic_mean(base: float, new: float) -> float:
    """HM = 2·B·N / (B + N) (0 when both are 0)."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def _mean_of(stats: Iterable[Optional[Stat]]) -> Optional[Stat]:
    """Mean of the means of the present cells (the papers' "Average" row)."""
    present = [s for s in stats if s is not None]
    if not present:
        return None
    return Stat(sum(s.mean for s in present) / len(present), None, min(s.n for s in present))


# ----------------------------------------------------------------------------- tables

@dataclasses.dataclass
class Table:
    """One printed table: ``rows`` are ``(label, cells)`` with one cell per column."""

    protocol: str
    title: str
    columns: list[str]
    rows: list[tuple[str, list[Optional[Stat]]]] = dataclasses.field(default_factory=list)
    row_header: str = "dataset"

    def to_markdown(self, decimals: int = 2) -> str:
        max_n = max((c.n for _, cells in self.rows for c in cells if c is not None), default=0)

        def fmt(cell: Optional[Stat]) -> str:
            if cell is None:
                return "–"
            text = f"{cell.mean:.{decimals}f}"
            if cell.std is not None and cell.n > 1:
                text += f" ± {cell.std:.{decimals}f}"
            if cell.n != max_n:
                text += f" (n={cell.n})"
            return text

        lines = [f"### {self.title}", "",
                 "| " + " | ".join([self.row_header] + self.columns) + " |",
                 "|---" + "|---:" * len(self.columns) + "|"]
        for label, cells in self.rows:
            bold = label == "Average"
            texts = [fmt(c) for c in cells]
            if bold:
                label, texts = f"**{label}**", [f"**{t}**" if t != "–" else t for t in texts]
            lines.append("| " + " | ".join([label] + texts) + " |")
        return "\n".join(lines)

    def records(self) -> list[dict]:
        """Long format: one record per present cell."""
        out = []
        for label, cells in self.rows:
            for column, cell in zip(self.columns, cells):
                if cell is not None:
                    out.append({"protocol": self.protocol, "table": self.title,
                                self.row_header: label, "column": column, **cell.to_dict()})
        return out

    def to_dict(self) -> dict:
        return {"protocol": self.protocol, "title": self.title, "row_header": self.row_header,
                "columns": self.columns,
                "rows": [{"label": label,
                          "cells": {col: (c.to_dict() if c is not None else None)
                                    for col, c in zip(self.columns, cells)}}
                         for label, cells in self.rows]}


# ----------------------------------------------------------------------------- collection

@dataclasses.dataclass
class RunRecord:
    """The fields of one ``results.json`` the tables need."""

    path: Path
    protocol: Optional[str]
    method: str
    backbone: str
    dataset: str
    shots: int
    seed: int
    subsample: str
    accuracy: dict[str, float]      # evaluation key "dataset/subsample" -> accuracy (%)
    experiment: str = ""            # the folder holding the protocol tree (``demo``, ...)
    settings: dict = dataclasses.field(default_factory=dict)   # config fields that can differ
    #: the row/table label: the method, plus the experiment and settings that tell apart
    #: otherwise identical runs (other output roots, config grid points)
    group: str = ""


def _experiment(path: Path, runs_dir: Path, protocol: Optional[str]) -> str:
    """The part of a run folder's path (relative to ``runs_dir``) above the standard layout
    ``<protocol>/<method>/<dataset>/shots_<K>/seed<S>``; for other layouts, its parent."""
    try:
        parts = path.parent.relative_to(runs_dir).parts
    except ValueError:
        parts = path.parent.parts
    standard = (len(parts) >= 5 and parts[-2].startswith("shots_") and parts[-1].startswith("seed")
                and parts[-5] in (protocol, "train", "xd"))
    return "/".join(parts[:-5] if standard else parts[:-1])


def _settings(config: dict) -> dict:
    """Flattened method and train settings, without the runtime-only ones and the seed."""
    from .config import RUNTIME_ONLY

    out = {}
    for section in ("method", "train"):
        for key, value in (config.get(section) or {}).items():
            if section == "train" and (key in RUNTIME_ONLY or key == "seed"):
                continue
            out[f"{section}.{key}"] = json.dumps(value, sort_keys=True)
    return out


def _assign_groups(records: list[RunRecord]) -> None:
    """Label each record so that runs of one method that differ in output root or config are
    reported apart: ``maple``, ``maple [demo]``, ``coop (train.lr=0.002)``."""
    by_method: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        by_method[r.method].append(r)
    for method, recs in by_method.items():
        experiments = {r.experiment for r in recs}
        cells: dict[tuple, list[RunRecord]] = defaultdict(list)
        for r in recs:  # settings may differ by dataset or shots (per-dataset epochs) ...
            cells[(r.protocol, r.dataset, r.shots, r.subsample, r.experiment)].append(r)
        varying = sorted({k for cell in cells.values() for r in cell for k in r.settings
                          if len({x.settings.get(k) for x in cell}) > 1})  # ... not within one
        for r in recs:
            label = method
            if len(experiments) > 1 and r.experiment:
                label += f" [{r.experiment}]"
            if varying:
                label += " (" + ", ".join(f"{k}={json.loads(r.settings[k])}" for k in varying
                                          if k in r.settings) + ")"
            r.group = label


def collect_results(runs_dir: PathLike) -> list[RunRecord]:
    """Every ``results.json`` under ``runs_dir`` whose training finished (others are logged and left
    out), in path order."""
    from .engine.rundir import iter_run_dirs

    runs_dir = Path(runs_dir)
    if not runs_dir.exists():
        raise FileNotFoundError(f"runs folder {runs_dir} does not exist")
    records = []
    for run in iter_run_dirs(runs_dir):
        try:
            results = run.read_results()
        except (OSError, ValueError) as err:
            logger.warning("skipping %s: unreadable (%s)", run.results_path, err)
            continue
        if results is None or not results.finished:
            logger.warning("skipping %s: training not finished", run.results_path)
            continue
        try:
            records.append(RunRecord(
                path=run.results_path, protocol=results.protocol, method=results.method,
                backbone=str(results.backbone), dataset=results.dataset,
                shots=int(results.shots), seed=int(results.seed), subsample=results.subsample,
                accuracy={k: float(v.accuracy) for k, v in results.evaluations.items()
                          if v.accuracy is not None},
                experiment=_experiment(run.results_path, runs_dir if runs_dir.is_dir()
                                       else runs_dir.parent, results.protocol),
                settings=_settings(results.config)))
        except (KeyError, TypeError, ValueError) as err:
            logger.warning("skipping %s: missing or bad field %s", run.results_path, err)
    if not records:
        raise FileNotFoundError(f"no finished results.json under {runs_dir}")
    _assign_groups(records)
    return records


def _dataset_order(names: Iterable[str]) -> list[str]:
    """Standard datasets in the papers' order, then the others alphabetically."""
    names = set(names)
    order = [d for d in STANDARD_DATASETS + DG_TARGETS if d in names]
    return order + sorted(names - set(order))


def _seed_values(records: Sequence[RunRecord], key: str) -> dict[int, float]:
    """seed -> accuracy of evaluation ``key``; two runs of one seed are an error (they would be
    averaged as if they were different seeds)."""
    out: dict[int, float] = {}
    where: dict[int, Path] = {}
    for r in records:
        if key in r.accuracy:
            if r.seed in out:
                raise ValueError(f"two results for seed {r.seed} of {r.group or r.method} "
                                 f"{key}: {where[r.seed]} and {r.path} (same method, settings "
                                 f"and output root); remove one of them")
            out[r.seed], where[r.seed] = r.accuracy[key], r.path
    return out


def _stat(records: Sequence[RunRecord], key: str) -> Optional[Stat]:
    values = _seed_values(records, key)
    return Stat.of([values[s] for s in sorted(values)]) if values else None


def _groups(records: Sequence[RunRecord], protocols: Sequence[Optional[str]]):
    """(method, backbone) -> records of the given protocols, methods in first-seen order."""
    groups: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.protocol in protocols:
            groups[(r.group or r.method, r.backbone)].append(r)
    return groups


def _transductive(records: Sequence[RunRecord]) -> bool:
    """Whether the records' method trains transductively (on the unlabeled images of every
    class): its rows are labelled and its averages kept out of the inductive methods' summary."""
    from .methods import get_method

    try:
        return any(get_method(r.method).transductive for r in records)
    except KeyError:  # a method this vlprompt does not know (results from another version)
        return False


def _label(method: str, backbone: str, backbones: set[str],
           records: Sequence[RunRecord]) -> str:
    label = f"{method} ({backbone})" if len(backbones) > 1 else method
    return f"{label} [transductive]" if _transductive(records) else label


def base2new_tables(records: Sequence[RunRecord]) -> list[Table]:
    """Per method: Base / New (mean ± std over seeds) and HM of the means, per dataset, plus the
    Average row; with several methods, a summary of their Average rows."""
    groups = _groups(records, ["base2new"])
    backbones = {b for _, b in groups}
    tables, summary, transductive = [], [], []
    for (method, backbone), recs in groups.items():
        label = _label(method, backbone, backbones, recs)
        table = Table("base2new", f"Base-to-new: {label}", ["Base", "New", "HM"])
        by_dataset = defaultdict(list)
        for r in recs:
            by_dataset[(r.dataset, r.shots)].append(r)
        shots_seen = {k for _, k in by_dataset}
        bases, news = [], []
        for dataset in _dataset_order(d for d, _ in by_dataset):
            for k in sorted(k for d, k in by_dataset if d == dataset):
                base = _stat(by_dataset[(dataset, k)], f"{dataset}/base")
                new = _stat(by_dataset[(dataset, k)], f"{dataset}/new")
                hm = (Stat(harmonic_mean(base.mean, new.mean), None, min(base.n, new.n))
                      if base and new else None)
                name = dataset if len(shots_seen) == 1 else f"{dataset} ({k}-shot)"
                table.rows.append((name, [base, new, hm]))
                if base and new:  # the average is over datasets with both halves
                    bases.append(base)
                    news.append(new)
        if len(table.rows) > 1 and bases:
            b, n = _mean_of(bases), _mean_of(news)
            table.rows.append(("Average", [b, n, Stat(harmonic_mean(b.mean, n.mean), None,
                                                      min(b.n, n.n))]))
        if bases:
            b, n = _mean_of(bases), _mean_of(news)
            plural = "s" if len(bases) > 1 else ""
            row = (f"{label} ({len(bases)} dataset{plural})",
                   [b, n, Stat(harmonic_mean(b.mean, n.mean), None, min(b.n, n.n))])
            (transductive if _transductive(recs) else summary).append(row)
        tables.append(table)
    if len(summary) > 1:
        tables.append(Table("base2new", "Base-to-new: averages", ["Base", "New", "HM"], summary,
                            row_header="method"))
    if transductive and summary:  # trained on the new classes' unlabeled images: apart
        tables.append(Table("base2new", "Base-to-new: transductive methods (trained on the "
                            "unlabeled images of the new classes too; not comparable with the "
                            "averages above)", ["Base", "New", "HM"], transductive,
                            row_header="method"))
    return tables


def fewshot_tables(records: Sequence[RunRecord]) -> list[Table]:
    """Per method: accuracy per dataset and number of shots (mean ± std over seeds), and the
    Average row (mean over the datasets present for each number of shots)."""
    groups = _groups(records, ["fewshot"])
    backbones = {b for _, b in groups}
    tables = []
    for (method, backbone), recs in groups.items():
        shots = sorted({r.shots for r in recs})
        table = Table("fewshot", f"Few-shot: {_label(method, backbone, backbones, recs)}",
                      [f"{k}-shot" for k in shots])
        for dataset in _dataset_order(r.dataset for r in recs):
            cells = [_stat([r for r in recs if r.dataset == dataset and r.shots == k],
                           f"{dataset}/all") for k in shots]
            table.rows.append((dataset, cells))
        if len(table.rows) > 1:
            table.rows.append(("Average", [_mean_of(cells[i] for _, cells in table.rows)
                                           for i in range(len(shots))]))
        tables.append(table)
    return tables


def _transfer_table(records: Sequence[RunRecord], protocol: str, title: str,
                    target_filter) -> Optional[Table]:
    """Rows = methods (and source/shots), columns = source, each target, target average."""
    groups = _groups(records, ["xd", "dg"])
    backbones = {b for _, b in groups}
    sources: list[str] = []
    targets: set[str] = set()
    for recs in groups.values():
        for r in recs:
            if r.dataset not in sources:
                sources.append(r.dataset)
            targets.update(k.split("/")[0] for k in r.accuracy
                           if k.split("/")[0] != r.dataset and target_filter(k.split("/")[0]))
    if not targets:
        return None
    target_list = _dataset_order(targets)
    source_col = sources[0] if len(sources) == 1 else "source"
    table = Table(protocol, title, [source_col] + target_list + ["Target avg"], row_header="method")
    for (method, backbone), recs in groups.items():
        for source in sources:
            for k in sorted({r.shots for r in recs if r.dataset == source}):
                sel = [r for r in recs if r.dataset == source and r.shots == k]
                cells = [_stat(sel, f"{t}/all") for t in target_list]
                if not any(cells):
                    continue
                label = _label(method, backbone, backbones, recs)
                if len(sources) > 1:
                    label += f" [{source}]"
                if k != 16:
                    label += f" ({k}-shot)"
                table.rows.append((label, [_stat(sel, f"{source}/all")] + cells
                                   + [_mean_of(cells)]))
    return table


def xd_tables(records: Sequence[RunRecord]) -> list[Table]:
    """Cross-dataset: source accuracy, each target dataset, and the mean over targets."""
    table = _transfer_table(records, "xd", "Cross-dataset transfer",
                            lambda d: d not in DG_TARGETS)
    return [table] if table else []


def dg_tables(records: Sequence[RunRecord]) -> list[Table]:
    """Domain generalisation: source accuracy, the ImageNet variants, and their mean."""
    table = _transfer_table(records, "dg", "Domain generalisation", lambda d: d in DG_TARGETS)
    return [table] if table else []


def other_tables(records: Sequence[RunRecord]) -> list[Table]:
    """Runs made outside a protocol (``vlprompt train``): each evaluation, mean ± std over seeds."""
    recs = [r for r in records if r.protocol not in ("base2new", "fewshot", "xd", "dg")]
    if not recs:
        return []
    keys = sorted({k for r in recs for k in r.accuracy})
    table = Table("other", "Other runs", keys, row_header="run")
    groups = defaultdict(list)
    for r in recs:
        groups[(r.group or r.method, r.backbone, r.dataset, r.shots, r.subsample,
                r.protocol)].append(r)
    for (method, backbone, dataset, shots, subsample, protocol), sel in groups.items():
        label = f"{method} {dataset}/{subsample} {shots}-shot"
        if protocol:
            label += f" [{protocol}]"
        table.rows.append((label, [_stat(sel, k) for k in keys]))
    return [table]


def build_tables(records: Sequence[RunRecord]) -> list[Table]:
    """All tables the records support, in protocol order."""
    return (base2new_tables(records) + fewshot_tables(records) + xd_tables(records)
            + dg_tables(records) + other_tables(records))


# ----------------------------------------------------------------------------- output

def format_tables(tables: Sequence[Table], fmt: str = "md") -> str:
    """Render tables as Markdown, long-format CSV, or JSON."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if fmt == "md":
        return "\n\n".join(t.to_markdown() for t in tables) + "\n"
    if fmt == "json":
        return json.dumps({"tables": [t.to_dict() for t in tables]}, indent=2) + "\n"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, ["protocol", "table", "row", "column", "mean", "std", "n"],
                            lineterminator="\n")
    writer.writeheader()
    for table in tables:
        for rec in table.records():
            rec["row"] = rec.pop(table.row_header)
            writer.writerow(rec)
    return buf.getvalue()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_plots(records: Sequence[RunRecord], folder: PathLike) -> list[Path]:
    """PNG figures: few-shot curves (accuracy vs shots, one line per method, per dataset and for
    the average) and base/new/HM bars per method; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    written: list[Path] = []

    def save(fig, name: str) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        path = folder / f"{_safe(name)}.png"
        atomic_write_bytes(path, buf.getvalue())
        written.append(path)

    fewshot = _groups(records, ["fewshot"])
    if fewshot:
        backbones = {b for _, b in fewshot}
        curves: dict[str, dict[str, list[tuple[int, Stat]]]] = defaultdict(dict)
        for (method, backbone), recs in fewshot.items():
            label = _label(method, backbone, backbones, recs)
            shots = sorted({r.shots for r in recs})
            per_shot_means: dict[int, list[Stat]] = defaultdict(list)
            for dataset in _dataset_order(r.dataset for r in recs):
                points = []
                for k in shots:
                    s = _stat([r for r in recs if r.dataset == dataset and r.shots == k],
                              f"{dataset}/all")
                    if s is not None:
                        points.append((k, s))
                        per_shot_means[k].append(s)
                curves[dataset][label] = points
            curves["Average"][label] = [(k, _mean_of(v)) for k, v in sorted(per_shot_means.items())]
        for dataset, by_method in curves.items():
            fig, ax = plt.subplots(figsize=(4.5, 3.5))
            for label, points in by_method.items():
                xs = [k for k, _ in points]
                ys = [s.mean for _, s in points]
                errs = [s.std or 0.0 for _, s in points]
                ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)
            ax.set_xscale("log", base=2)
            all_shots = sorted({k for points in by_method.values() for k, _ in points})
            ax.set_xticks(all_shots, [str(k) for k in all_shots])
            ax.set_xlabel("shots per class")
            ax.set_ylabel("accuracy (%)")
            ax.set_title(f"few-shot: {dataset}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            save(fig, f"fewshot_{dataset}")

    for table in base2new_tables(records):
        if table.title == "Base-to-new: averages":
            name = "base2new_averages"
        else:
            name = "base2new_" + table.title.split(": ", 1)[1]
        rows = [(label, cells) for label, cells in table.rows]
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 1.5), 3.8))
        width = 0.27
        for i, (column, color) in enumerate(zip(table.columns, ("C0", "C1", "C2"))):
            xs = [j + (i - 1) * width for j in range(len(rows))]
            ys = [cells[i].mean if cells[i] else 0.0 for _, cells in rows]
            errs = [(cells[i].std or 0.0) if cells[i] else 0.0 for _, cells in rows]
            ax.bar(xs, ys, width, yerr=errs, capsize=2, label=column, color=color)
        ax.set_xticks(range(len(rows)), [label for label, _ in rows], rotation=45, ha="right")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(table.title)
        ax.legend(fontsize=8)
        save(fig, name)
    return written


def report(runs_dir: PathLike, fmt: str = "md", output: Optional[PathLike] = None,
           plot_dir: Optional[PathLike] = None) -> str:
    """Collect, tabulate and render; writes ``output`` (atomically) and PNGs into ``plot_dir``
    when given. Returns the rendered text."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    records = collect_results(runs_dir)
    text = format_tables(build_tables(records), fmt)
    if output is not None:
        atomic_write_text(output, text)
        logger.info("wrote %s", output)
    if plot_dir is not None:
        for path in write_plots(records, plot_dir):
            logger.info("wrote %s", path)
    return text
