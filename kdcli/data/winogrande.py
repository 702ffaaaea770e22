"""WinoGrande: jsonl rows with a `_` blank, two options and an answer (choice); labels may sit in `NAME-labels.lst`
(unlabelled: neither is read)."""

from __future__ import annotations

from typing import Iterator

from kdcli.data.fields import Example, aligned_labels, numbered_option, string_field
from kdcli.data.files import RawRow, SourceFile, json_rows
from kdcli.errors import DataError
from kdcli.recipe import DataConfig

WINOGRANDE_HINT = "WinoGrande rows have qID, sentence, option1, option2 and answer; check data.path and data.format"


def read_winogrande(source: SourceFile, data: DataConfig, names: list[str], labelled: bool) -> Iterator[Example]:
    encoding = data.encoding or "utf-8"
    # Every row is read before the first is checked (a broken line anywhere is reported first), then
    # again: the file is never held.
    labels = aligned_labels(source, sum(1 for _ in json_rows(source.path, encoding))) if labelled else None
    for row in json_rows(source.path, encoding):
        options = [string_field(row, "option1", WINOGRANDE_HINT), string_field(row, "option2", WINOGRANDE_HINT)]
        found = _answer(row, labels, source) if labelled else None
        qid = row.data.get("qID")
        text = string_field(row, "sentence", WINOGRANDE_HINT)
        label = numbered_option(found[1], 2, found[0]) if found else -1
        yield Example(qid if isinstance(qid, str) else row.default_id, text, options, label, [], row.where)


def _answer(row: RawRow, labels: Iterator[tuple[str, str]] | None, source: SourceFile) -> tuple[str, object]:
    """Where a row's answer is given, and its value: the label file's line, else the row's own answer."""
    answer = row.data.get("answer")
    if labels is not None:
        where, value = next(labels)
        if answer is not None and str(answer).strip() != value:
            raise DataError(
                f"{row.where}: answer {answer!r} disagrees with {where}: {value!r}",
                "the data file and its label file do not belong together",
            )
        return where, value
    if answer is not None:
        return row.where, answer
    raise DataError(
        f"{row.where}: no answer and no label file {source.path.stem}-labels.lst",
        "WinoGrande test labels are hidden; use a train file, or give data.labels_path",
    )
