"""Social IQA: jsonl context, question and three answers (choice); labels in `NAME-labels.lst`
(unlabelled: not read)."""

from __future__ import annotations

from typing import Iterator

from kdcli.data.fields import Example, aligned_labels, numbered_option, string_field
from kdcli.data.files import RawRow, SourceFile, json_rows
from kdcli.errors import DataError
from kdcli.recipe import DataConfig

SOCIALIQA_HINT = "Social IQA rows have context, question, answerA, answerB and answerC; check data.path and data.format"


def read_socialiqa(source: SourceFile, data: DataConfig, names: list[str], labelled: bool) -> Iterator[Example]:
    encoding = data.encoding or "utf-8"
    if not labelled:
        for row in json_rows(source.path, encoding):
            yield Example(row.default_id, _text(row), _options(row), -1, [], row.where)
        return
    if source.labels is None:
        raise DataError(
            f"no label file for {source.path} (expected {source.path.stem}-labels.lst beside it)",
            "Social IQA keeps its labels in a separate file; give data.labels_path",
        )
    # Every row is read before the first is checked (a broken line anywhere is reported first), then again.
    labels = aligned_labels(source, sum(1 for _ in json_rows(source.path, encoding)))
    assert labels is not None  # source.labels is set
    for row, (where, value) in zip(json_rows(source.path, encoding), labels, strict=True):
        text, options = _text(row), _options(row)
        yield Example(row.default_id, text, options, numbered_option(value, 3, where), [], row.where)


def _text(row: RawRow) -> str:
    return string_field(row, "context", SOCIALIQA_HINT) + " " + string_field(row, "question", SOCIALIQA_HINT)


def _options(row: RawRow) -> list[str]:
    return [string_field(row, key, SOCIALIQA_HINT) for key in ("answerA", "answerB", "answerC")]
