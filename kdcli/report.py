"""Human output: rich tables for what each command did."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from kdcli.data import PrepareResult


def print_prepare_summary(results: list["PrepareResult"]) -> None:
    """Per stage: a heading, rows and label histogram per split, then duplicates dropped, time and where the data is."""
    console = Console(highlight=False)
    for result in results:
        state = "up to date (no changes)" if result.skipped else f"prepared ({result.reason})"
        console.print(f"[bold]stage {escape(result.stage)}[/]: {escape(state)}")
        labelled = any(result.label_histograms.get(split) for split in result.counts)
        table = Table()
        table.add_column("split")
        table.add_column("rows", justify="right")
        if labelled:  # generate data has no labels to count
            table.add_column("labels")
        for split, count in result.counts.items():
            histogram = result.label_histograms.get(split, {})
            cells = [split, str(count)]
            if labelled:
                cells.append("  ".join(f"{name}: {n}" for name, n in histogram.items()))
            table.add_row(*map(escape, cells))
        console.print(table)
        notes = [f"read {result.rows_read} rows", f"{result.duplicates} duplicates dropped"]
        if result.conflicts:
            notes.append(f"{result.conflicts} texts with conflicting labels resolved")
        notes.append(f"{result.seconds:.1f} s")
        console.print(", ".join(notes))
        console.print(f"data: {escape(str(result.path))}")


def print_cache_summary(reports: list[dict], console: Console | None = None) -> None:
    """One row per cached teacher: rows, bytes written, speed, teacher accuracy on validation."""
    console = console or Console()
    table = Table(title="teacher caches")
    for column in ("stage", "teacher", "rows", "size", "rows/s", "val accuracy", "status"):
        table.add_column(column, justify="right" if column in {"rows", "size", "rows/s", "val accuracy"} else "left")
    for r in reports:
        accuracy = r.get("validation_accuracy")
        table.add_row(
            r["stage"], r["teacher"], f"{sum(r['rows'].values()):,}", _human_bytes(r.get("bytes") or 0),
            f"{r['rows_per_second']:,.1f}" if r.get("rows_per_second") else "",
            f"{accuracy:.4f}" if accuracy is not None else "",
            "up to date" if r["skipped"] else "built",
        )
    console.print(table)


def print_distill_summary(results: list, console: Console | None = None) -> None:
    """One row per training job: steps, samples, best validation metric, speed, where the model is."""
    console = console or Console()
    if not results:
        console.print("every stage is up to date; nothing to train")
        return
    table = Table(title="distillation")
    for column in ("stage", "steps", "samples", "best", "at step", "samples/s", "early stop", "model"):
        table.add_column(column)
    for r in results:
        table.add_row(
            r.name, str(r.steps), f"{r.samples:,}", "" if r.best_metric is None else f"{r.best_metric:.4f}",
            "" if r.best_step is None else str(r.best_step), f"{r.samples_per_second:.1f}",
            "yes" if r.stopped_early else "no", str(r.output_dir),
        )
    console.print(table)


def _human_bytes(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GB"
