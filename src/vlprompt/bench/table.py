"""The printed table of ``vlprompt bench`` (rich) and its Markdown form (README)."""

from __future__ import annotations

COLUMNS = ("method", "batch", "train img/s", "ref train img/s", "train ×", "eval img/s",
           "ref eval img/s", "eval ×", "cached-views train img/s", "cached ×", "train GFLOP/img",
           "eval GFLOP/img", "peak MiB (train)")


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}"


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    gpu = report.get("peak_tflops") is not None
    for row in report["results"]:
        opt, ref = row.get("vlprompt") or {}, row.get("reference") or {}
        if "error" in row:
            rows.append([row["method"], "error: " + row["error"][:60]] + [""] * (len(COLUMNS) - 2))
            continue
        flops_t = opt.get("train_flops_per_image")
        flops_e = opt.get("eval_flops_per_image")
        cells = [row["method"], str(opt.get("batch", "")),
                 _fmt(opt.get("train_images_per_s")), _fmt(ref.get("train_images_per_s")),
                 _fmt(row.get("train_speedup")), _fmt(opt.get("eval_images_per_s")),
                 _fmt(ref.get("eval_images_per_s")), _fmt(row.get("eval_speedup")),
                 _fmt(opt.get("cached_views_train_images_per_s")),
                 _fmt(row.get("cached_views_speedup")),
                 _fmt(flops_t / 1e9 if flops_t else None, 1),
                 _fmt(flops_e / 1e9 if flops_e else None, 1),
                 _fmt(opt.get("train_peak_mb"), 0)]
        if gpu:
            cells += [_fmt(opt.get("train_tflops"), 1), _fmt(opt.get("train_mfu"), 3)]
        rows.append(cells)
    return rows


def _columns(report: dict) -> list[str]:
    cols = list(COLUMNS)
    if report.get("peak_tflops") is not None:
        cols += ["train TFLOP/s", "train MFU"]
    return cols


def format_table(report: dict) -> str:
    """A Markdown table of a bench report."""
    cols = _columns(report)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(report)]
    return "\n".join(lines)


def print_table(report: dict) -> None:
    """The report as a rich table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    s = report["setting"]
    title = (f"vlprompt bench: {s['shape']} (random weights), {s['classes']} classes, "
             f"{report['device_name']}, {report['threads']} threads, precision {s['precision']}")
    table = Table(title=title)
    for col in _columns(report):
        table.add_column(col, justify="left" if col == "method" else "right")
    for cells in table_rows(report):
        table.add_row(*cells)
    console = Console()
    if not console.is_terminal:  # logs and pipes: do not squeeze the columns
        console = Console(width=200)
    console.print(table)
