"""Source files: where a recipe's data lives, and reading it as text, lines, JSON, CSV or parquet rows."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from kdcli.errors import DataError
from kdcli.recipe import DataConfig

SPLITS = ("train", "validation", "test")


MAX_LINE_CHARS = 1_000_000


FORMATS_WITH_LABEL_FILES = ("winogrande", "socialiqa")


class RawRow(NamedTuple):
    """One source record before normalisation."""

    where: str  # "file:line" (or "file row N", "hub[split] row N")
    default_id: str  # used when the source has no id of its own
    data: dict[str, Any]


@dataclass
class SourceFile:
    split: str  # "all" for a single `path` split by fractions, else a named split
    path: Path
    labels: Path | None = None  # WinoGrande / Social IQA `*-labels.lst`


def resolve_path(text: str) -> Path:
    """A recipe path: relative to the current directory, or ``package:MODULE/sub/path`` inside an installed package.

    The package is located with ``find_spec``, without importing it (some packages import heavy
    dependencies at import time).
    """
    if not text.startswith("package:"):
        return Path(text).expanduser()
    module, _, rest = text.removeprefix("package:").partition("/")
    try:
        spec = importlib.util.find_spec(module) if module else None
    except (ImportError, ValueError):  # a dotted name whose parent package is missing
        spec = None
    if spec is None:
        raise DataError(
            f"{text}: no installed package '{module}'", f"install it (pip install {module.replace('_', '-')})"
        )
    if not spec.submodule_search_locations:
        raise DataError(f"{text}: '{module}' is a module, not a package folder", "use package:PACKAGE/path/inside/it")
    return Path(next(iter(spec.submodule_search_locations))) / rest


def _existing_file(text: str, what: str) -> Path:
    path = resolve_path(text)
    if not path.is_file():
        raise DataError(
            f"{what} not found: {text}" + (f" ({path})" if str(path) != text else ""),
            f"check the path; relative paths are relative to the directory kd runs from ({Path.cwd()})",
        )
    return path


def _labels_beside(path: Path) -> Path | None:
    """`train_m.jsonl` -> `train_m-labels.lst` when it exists (the WinoGrande and Social IQA layout)."""
    candidate = path.with_name(f"{path.stem}-labels.lst")
    return candidate if candidate.is_file() else None


def source_files(data: DataConfig) -> list[SourceFile]:
    """The files a data config reads (none for the Hub), checked to exist."""
    if data.format == "hub":
        return []
    if data.labels_path and data.format not in FORMATS_WITH_LABEL_FILES:
        raise DataError(
            f"data.labels_path is not read for format '{data.format}'",
            f"only {' and '.join(FORMATS_WITH_LABEL_FILES)} have separate label files; remove labels_path",
        )
    if data.labels_path and data.files:
        raise DataError(
            "data.labels_path goes with data.path, not data.files",
            "with named splits kd reads NAME-labels.lst beside each NAME.jsonl",
        )
    named = {"all": data.path} if data.path else {s: data.files[s] for s in SPLITS if s in data.files}
    sources = []
    for split, text in named.items():
        path = _existing_file(text, "data file")
        labels = None
        if data.format in FORMATS_WITH_LABEL_FILES:
            labels = _existing_file(data.labels_path, "label file") if data.labels_path else _labels_beside(path)
        sources.append(SourceFile(split, path, labels))
    return sources


def excerpt(text: str, width: int = 80) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


def read_text(path: Path, encoding: str) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}", "check the file's permissions") from None
    if b"\0" in raw:
        raise DataError(f"{path} is not a text file (it contains NUL bytes)", "check data.path and data.format")
    try:
        text = raw.decode(encoding)
    except LookupError:
        raise DataError(
            f"unknown text encoding '{encoding}'", "set data.encoding to e.g. 'utf-8' or 'latin-1'"
        ) from None
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}:{line}: not valid {encoding} text (byte {raw[exc.start]:#04x})",
            "set data.encoding to the file's encoding, e.g. encoding = 'latin-1'",
        ) from None
    return text.removeprefix("\ufeff")


def _check_length(path: Path, number: int, line: str) -> None:
    if len(line) > MAX_LINE_CHARS:
        raise DataError(
            f"{path}:{number}: line is {len(line):,} characters long (limit {MAX_LINE_CHARS:,})",
            "this does not look like a line-based dataset file; check data.path and data.format",
        )


def lines(path: Path, text: str) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their 1-based line numbers.

    Split on "\\n" only: str.splitlines() also breaks on U+0085 and other separators, and
    TriviaQA has a raw U+0085 inside a JSON string. A trailing "\\r" (CRLF files) is dropped.
    """
    for number, line in enumerate(text.split("\n"), start=1):
        _check_length(path, number, line)
        line = line.removesuffix("\r")
        if line.strip():
            yield number, line


def json_rows(path: Path, encoding: str) -> Iterator[RawRow]:
    for number, line in lines(path, read_text(path, encoding)):
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{where}: not valid JSON ({exc.msg}): {excerpt(line)}", "each line must be one JSON object"
            ) from None
        except RecursionError:  # json recurses once per level of nesting
            raise DataError(
                f"{where}: JSON nested too deeply to read: {excerpt(line)}",
                "each line must be one JSON object of plain fields (text, labels, lists of options)",
            ) from None
        except ValueError as exc:  # int() refuses numbers past sys.get_int_max_str_digits()
            if "digits" not in str(exc):
                raise
            raise DataError(
                f"{where}: a number with more than {sys.get_int_max_str_digits():,} digits: {excerpt(line)}",
                "no label or id needs that many digits; check that line",
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{where}: expected a JSON object, got {type(row).__name__}: {excerpt(line)}",
                "each line must be one JSON object",
            )
        surrogate = _lone_surrogate(row) if "\\ud" in line or "\\uD" in line else None
        if surrogate:
            raise DataError(
                f"{where}: text contains a lone surrogate (\\u{ord(surrogate):04x}), which is not valid Unicode",
                "fix that line: a \\ud800-\\udfff escape is only valid as half of a surrogate pair",
            )
        yield RawRow(where, f"{path.stem}-{number}", row)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate in a decoded JSON value's strings (keys too), or None.

    The file decoded as UTF-8, so only a "\\udXXX" escape can put one there, and json joins an
    escaped pair into one character: any surrogate left is a lone half, which no UTF-8 writer
    (parquet, the cache) can encode. Walked with a stack, not recursion: the value may be deep.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                return found.group()
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def csv_rows(path: Path, encoding: str) -> Iterator[RawRow]:
    text = read_text(path, encoding)
    for number, line in enumerate(text.split("\n"), start=1):
        _check_length(path, number, line)
    # The csv module caps a field at 131,072 characters by default: a field may be as long as a
    # line may be (the cap is process-wide; kd reads CSV only here).
    csv.field_size_limit(MAX_LINE_CHARS)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    last = 0  # the last line of the last complete row
    try:
        for row in reader:
            last = reader.line_num
            yield RawRow(f"{path}:{reader.line_num}", f"{path.stem}-{reader.line_num}", row)
    except csv.Error as exc:
        if "field limit" in str(exc):  # no line is too long, so the field runs over several
            raise DataError(
                f"{path}:{last + 1}: a quoted field runs on for more than {MAX_LINE_CHARS:,} characters "
                f"(to line {reader.line_num})",
                "a quote on that line is probably never closed; a field may hold at most "
                f"{MAX_LINE_CHARS:,} characters",
            ) from None
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})", "check the quoting on that line") from None


def parquet_rows(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: not a readable parquet file ({exc})", "check data.path and data.format") from None
    for number, row in enumerate(rows, start=1):
        yield RawRow(f"{path} row {number}", f"{path.stem}-{number}", row)


def label_lines(path: Path) -> list[tuple[str, str]]:
    """A `*-labels.lst` file: (file:line, value) for each non-blank line."""
    return [(f"{path}:{number}", line.strip()) for number, line in lines(path, read_text(path, "utf-8"))]
