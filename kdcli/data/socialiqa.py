"""Social IQA: jsonl context, question and three answers (choice); labels in `NAME-labels.lst`."""

from __future__ import annotations

from kdcli.data.fields import Example, aligned_labels, numbered_option, string_field
from kdcli.data.files import SourceFile, json_rows
from kdcli.errors import DataError
from kdcli.recipe import DataConfig

SOCIALIQA_HINT = "Social IQA rows have context, question, answerA, answerB and answerC; check data.path and data.format"


def read_socialiqa(source: SourceFile, data: DataConfig, names: list[str]) -> list[Example]:
    if source.labels is None:
        raise DataError(
            f"no label file for {source.path} (expected {source.path.stem}-labels.lst beside it)",
            "Social IQA keeps its labels in a separate file; give data.labels_path",
        )
    rows = list(json_rows(source.path, data.encoding or "utf-8"))
    labels = aligned_labels(source, rows)
    assert labels is not None  # source.labels is set
    examples = []
    for row, (where, value) in zip(rows, labels, strict=True):
        text = string_field(row, "context", SOCIALIQA_HINT) + " " + string_field(row, "question", SOCIALIQA_HINT)
        options = [string_field(row, key, SOCIALIQA_HINT) for key in ("answerA", "answerB", "answerC")]
        examples.append(Example(row.default_id, text, options, numbered_option(value, 3, where), [], row.where))
    return examples
