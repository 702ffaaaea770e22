"""AQuA-RAT: jsonl math questions with lettered options `A)...` (choice, or generate the correct option;
unlabelled, `correct` is not read)."""

from __future__ import annotations

import re
from typing import Iterator

from kdcli.data.fields import LETTERS, Example, string_field, string_list_field
from kdcli.data.files import SourceFile, excerpt, json_rows
from kdcli.errors import DataError
from kdcli.recipe import DataConfig

AQUA_HINT = "AQuA-RAT rows have question, options ['A)...', ...] and correct; check data.path and data.format"


AQUA_OPTION = re.compile(r"\s*([A-Z])\s*\)\s*(.*)", re.DOTALL)


def read_aqua(source: SourceFile, data: DataConfig, names: list[str], labelled: bool) -> Iterator[Example]:
    for row in json_rows(source.path, data.encoding or "utf-8"):
        question = string_field(row, "question", AQUA_HINT)
        options = []
        for i, option in enumerate(string_list_field(row, "options", AQUA_HINT)):
            match = AQUA_OPTION.fullmatch(option)
            if not match or match.group(1) != LETTERS[i]:
                raise DataError(
                    f"{row.where}: option {i + 1} should start with '{LETTERS[i]})', got {excerpt(option)}", AQUA_HINT
                )
            options.append(match.group(2).strip())
        if not labelled:
            yield Example(row.default_id, question, options, -1, [], row.where)
            continue
        correct = string_field(row, "correct", AQUA_HINT).strip()
        if correct not in LETTERS[: len(options)]:
            raise DataError(
                f"{row.where}: unknown label {correct!r} (expected one of {', '.join(LETTERS[: len(options)])})",
                "fix that line of the file",
            )
        label = LETTERS.index(correct)
        yield Example(row.default_id, question, options, label, [options[label]], row.where)
