"""Generic csv, jsonl, parquet and Hub rows, mapped to the schema by ``data.columns``."""

from __future__ import annotations

from typing import Any, Callable

from kdcli.data.fields import Example, answer_list, class_index, int_like, option_index
from kdcli.data.files import (
    RawRow,
    SourceFile,
    csv_rows,
    excerpt,
    json_rows,
    parquet_rows,
)
from kdcli.data.hub import read_hub
from kdcli.errors import DataError
from kdcli.recipe import Columns, DataConfig


def _column(row: RawRow, column: str, key: str) -> Any:
    if row.data.get(column) is None:
        raise DataError(
            f"{row.where}: no value in column '{column}' (columns: {', '.join(map(str, row.data))})",
            f"set data.columns.{key} to the right column name",
        )
    return row.data[column]


MAX_INFERRED_CLASSES = 10_000


def _infer_class_names(rows: list[RawRow], column: str) -> list[str]:
    values = [_column(row, column, "label") for row in rows]
    for row, value in zip(rows, values):
        # Names are inferred as text; only a class name or a 0-based index maps back to one class.
        if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, int) and value < 0):
            raise DataError(
                f"{row.where}: label {excerpt(repr(value))} is neither a class name nor a 0-based class index",
                "fix that line, point data.columns.label at the right column, or list the classes in data.label_names",
            )
    indices = [int_like(v) for v in values]
    if values and all(i is not None for i in indices):
        top = max(indices)  # type: ignore[type-var]
        if top >= MAX_INFERRED_CLASSES:  # a column of ids or amounts, not of class indices
            row = rows[indices.index(top)]
            raise DataError(
                f"{row.where}: label {top} would make {top + 1:,} classes (integer labels are read as 0-based "
                f"class indices; at most {MAX_INFERRED_CLASSES:,} are inferred)",
                "point data.columns.label at the class column, or list the classes in data.label_names",
            )
        return [str(i) for i in range(top + 1)]
    return sorted({str(v).strip() for v in values})


def _generic_example(row: RawRow, columns: Columns, task: str, names: list[str]) -> Example:
    text = _column(row, columns.text, "text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(
            f"{row.where}: column '{columns.text}' should be non-empty text, got {excerpt(repr(text))}",
            "check data.columns.text",
        )
    options: list[str] = []
    if len(columns.options) == 1 and isinstance(row.data.get(columns.options[0]), list):
        options = [str(v) for v in row.data[columns.options[0]]]  # one column holding the list of options
    else:
        options = [str(_column(row, column, "options")) for column in columns.options]
    label = -1
    if task == "classify":
        label = class_index(_column(row, columns.label, "label"), names, row.where)
    elif task == "choice":
        label = option_index(_column(row, columns.label, "label"), len(options), row.where)
    answers = answer_list(_column(row, columns.answers, "answers"), row.where) if columns.answers else []
    row_id = row.data.get(columns.id) if columns.id else None
    return Example(str(row_id) if row_id is not None else row.default_id, text, options, label, answers, row.where)


def read_generic(
    sources: list[SourceFile], data: DataConfig, task: str, say: Callable[[str], None]
) -> tuple[dict[str, list[Example]], list[str]]:
    columns = data.columns
    if task == "choice" and not columns.options:
        raise DataError(
            "data.columns.options is empty, but task 'choice' needs the option columns",
            "set e.g. columns.options = ['option1', 'option2']",
        )
    if task in ("classify", "choice") and not columns.label:
        raise DataError(
            f"data.columns.label is unset, but task '{task}' needs labels", "set data.columns.label to the label column"
        )
    if task == "generate" and not columns.answers:
        raise DataError(
            "data.columns.answers is unset, but task 'generate' needs reference answers",
            "set data.columns.answers to the answer column",
        )
    names = list(data.label_names)
    if data.format == "hub":
        say(f"loading {data.hub_name} from the Hub")
        raw, hub_names = read_hub(data)
        names = names or hub_names
    else:
        raw = {}
        for source in sources:
            say(f"reading {source.path} ({source.path.stat().st_size / 1e6:.1f} MB)")
            if data.format == "parquet":
                raw[source.split] = list(parquet_rows(source.path))
            elif data.format == "csv":
                raw[source.split] = list(csv_rows(source.path, data.encoding or "utf-8"))
            else:
                raw[source.split] = list(json_rows(source.path, data.encoding or "utf-8"))
    if task == "classify" and not names:  # inferred over every split, so all splits share one class order
        names = _infer_class_names([row for rows in raw.values() for row in rows], columns.label or "")
    return {split: [_generic_example(row, columns, task, names) for row in rows] for split, rows in raw.items()}, names
