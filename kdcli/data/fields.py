"""One normalised example (``Example``), and turning a source row's fields into its parts,
with errors that name the line."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, Iterator

from kdcli.data.files import RawRow, SourceFile, excerpt, label_lines
from kdcli.errors import DataError

LETTERS = string.ascii_uppercase


@dataclass
class Example:
    id: str
    text: str
    options: list[str]
    label: int
    answers: list[str]
    where: str  # "file:line" of the source row, for error messages; not saved
    # generate in chat format: the turns before the answer ({"role", "content"}); empty otherwise
    messages: list[dict[str, str]] = field(default_factory=list)

    def key(self) -> tuple:
        """Identity of an exact duplicate: everything but the id."""
        turns = tuple((m["role"], m["content"]) for m in self.messages)
        return (self.text, tuple(self.options), self.label, tuple(self.answers), turns)


def string_field(row: RawRow, key: str, hint: str) -> str:
    if key not in row.data or row.data[key] is None:
        raise DataError(f"{row.where}: missing field '{key}'", hint)
    value = row.data[key]
    if not isinstance(value, str):
        raise DataError(f"{row.where}: field '{key}' should be a string, got {excerpt(repr(value))}", hint)
    if not value.strip():
        raise DataError(f"{row.where}: field '{key}' is empty", "fix or remove that line")
    return value


def string_list_field(row: RawRow, key: str, hint: str) -> list[str]:
    value = row.data.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{row.where}: field '{key}' should be a list of strings, got {excerpt(repr(value))}", hint)
    return value


def unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


# More digits than any label or id index has; also far below the 4,300 that int() accepts.
MAX_INDEX_DIGITS = 18


def int_like(value: Any) -> int | None:
    """An int, or a string of digits, as an int; anything else None (bool is not a number here).

    A string of more than MAX_INDEX_DIGITS digits is text, not an index: no class list is that
    long, and int() refuses a string of over 4,300 digits.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdecimal() and len(value.strip()) <= MAX_INDEX_DIGITS:
        return int(value)
    return None


def shown(value: Any, width: int = 80) -> str:
    """A value's repr for an error message, cut to ``width`` characters."""
    text = repr(value)
    return text if len(text) <= width else text[:width] + "..."


def numbered_option(value: Any, count: int, where: str) -> int:
    """A release's 1-based option number ("1".."count") -> 0-based index."""
    number = int_like(value)
    if number is None or not 1 <= number <= count:
        expected = ", ".join(str(i) for i in range(1, count + 1))
        raise DataError(
            f"{where}: unknown label {shown(value)} (expected one of {expected})", "fix that line of the file"
        )
    return number - 1


def class_index(value: Any, names: list[str], where: str) -> int:
    """classify: a class name from `names`, or a 0-based class index."""
    if isinstance(value, str) and value.strip() in names:
        return names.index(value.strip())
    index = int_like(value)
    if index is not None and 0 <= index < len(names):
        return index
    raise DataError(
        f"{where}: unknown label {shown(value)} (expected one of {', '.join(names)})",
        "fix that line, or list every class in data.label_names (in id order)",
    )


def option_index(value: Any, count: int, where: str) -> int:
    """choice (generic formats): a 0-based option index, or an option letter A, B, ..."""
    index = int_like(value)
    if index is None and isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        index = LETTERS.index(value.strip().upper())
    if index is None or not 0 <= index < count:
        raise DataError(
            f"{where}: unknown label {shown(value)} for {count} options (expected a 0-based index or an option letter)",
            "fix that line, or point data.columns.label at the right column",
        )
    return index


def answer_list(value: Any, where: str) -> list[str]:
    """A reference answer: a string, a list of strings, or a Hub trivia_qa `answer` dict (value + aliases)."""
    if isinstance(value, dict) and isinstance(value.get("value"), str):
        aliases = value.get("aliases") or []
        return unique([value["value"], *(a for a in aliases if isinstance(a, str))])
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return unique([v for v in value if v.strip()])
    raise DataError(
        f"{where}: answers should be a string or a list of strings, got {excerpt(repr(value))}",
        "check data.columns.answers",
    )


def aligned_labels(source: SourceFile, rows: int) -> Iterator[tuple[str, str]] | None:
    """The data file's labels from its label file, one per row (``rows`` of them), in order; None without one."""
    if source.labels is None:
        return None
    labels = sum(1 for _ in label_lines(source.labels))
    if labels != rows:
        raise DataError(
            f"{source.labels} has {labels} labels for {rows} rows in {source.path}",
            "the label file must have one line per row of its data file, in the same order",
        )
    return label_lines(source.labels)
