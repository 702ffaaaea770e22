"""Source files: where a recipe's data lives, and reading it as text, lines, JSON, CSV or parquet rows."""

from __future__ import annotations

import codecs
import csv
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from itertools import chain
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


def transfer_files(data: DataConfig) -> list[SourceFile]:
    """The files a stage's transfer set reads (none without one, or from the Hub), checked to exist; each
    is a part of its own, named by the recipe's text for it (label files are not read)."""
    transfer = data.transfer
    if transfer is None or transfer.hub_name:
        return []
    return [SourceFile(text, _existing_file(text, "transfer file")) for text in transfer.files or [transfer.path]]


def excerpt(text: str, width: int = 80) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


BLOCK_BYTES = 1 << 20  # files are read this much at a time: a source is never held whole


def blocks(path: Path) -> Iterator[bytes]:
    try:
        with open(path, "rb") as handle:
            while block := handle.read(BLOCK_BYTES):
                yield block
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}", "check the file's permissions") from None


def _decoder(encoding: str) -> codecs.IncrementalDecoder:
    try:
        return codecs.getincrementaldecoder(encoding)()
    except LookupError:
        raise DataError(
            f"unknown text encoding '{encoding}'", "set data.encoding to e.g. 'utf-8' or 'latin-1'"
        ) from None


def _not_decodable(path: Path, encoding: str, byte: int, line: int) -> DataError:
    return DataError(
        f"{path}:{line}: not valid {encoding} text (byte {byte:#04x})",
        "set data.encoding to the file's encoding, e.g. encoding = 'latin-1'",
    )


def _first_undecodable(path: Path, encoding: str) -> DataError:
    """The error for the first byte the whole file does not decode at (for decoders that do not say
    where in the file they stopped): the file read whole, once, on this error path only."""
    raw = path.read_bytes()
    try:
        raw.decode(encoding)
    except UnicodeDecodeError as exc:
        return _not_decodable(path, encoding, raw[exc.start], raw.count(b"\n", 0, exc.start) + 1)
    raise AssertionError(f"{path} decodes whole but not in blocks")  # pragma: no cover


def _decoded(path: Path, encoding: str) -> Iterator[str]:
    """The file's text in pieces, as ``raw.decode(encoding)`` without a leading BOM would give it whole.

    A byte that does not decode is a DataError naming its line. The caller checks for NUL bytes first.
    """
    decoder = _decoder(encoding)
    newlines = 0  # in the bytes given to the decoder so far
    first = True
    for block in chain(blocks(path), [b""]):
        pending = getattr(decoder, "buffer", b"")  # the undecoded end of the last block, if the codec keeps one
        try:
            text = decoder.decode(block, final=not block)
        except UnicodeDecodeError as exc:
            data = pending + block
            if not isinstance(exc.object, bytes) or exc.object != data:
                raise _first_undecodable(path, encoding) from None
            line = newlines - pending.count(b"\n") + data.count(b"\n", 0, exc.start) + 1
            raise _not_decodable(path, encoding, data[exc.start], line) from None
        newlines += block.count(b"\n")
        if first and text:
            text, first = text.removeprefix("\ufeff"), False
        if text:
            yield text


def _split_lines(pieces: Iterator[str]) -> Iterator[tuple[int, str | None, int]]:
    """Lines split on "\\n" only, numbered from 1, with their lengths: (number, line, length).

    A line longer than MAX_LINE_CHARS comes as None with its length: it is never held whole.
    """
    number, carry, carried = 1, [], 0
    for piece in pieces:
        parts = piece.split("\n")
        for i, part in enumerate(parts):
            if carried + len(part) <= MAX_LINE_CHARS:
                carry.append(part)
            else:
                carry = []
            carried += len(part)
            if i < len(parts) - 1:  # the line ends here
                yield number, ("".join(carry) if carried <= MAX_LINE_CHARS else None), carried
                number, carry, carried = number + 1, [], 0
    yield number, ("".join(carry) if carried <= MAX_LINE_CHARS else None), carried


def check_text(path: Path, encoding: str, line_limit: bool = False) -> None:
    """What reading a text source checks before its first line, without holding it: no NUL byte
    anywhere, then every byte valid ``encoding`` text (else the line of the first that is not);
    with ``line_limit`` (CSV), then no line over MAX_LINE_CHARS (the first one that is)."""
    for block in blocks(path):
        if b"\0" in block:
            raise DataError(f"{path} is not a text file (it contains NUL bytes)", "check data.path and data.format")
    if not line_limit:
        for _ in _decoded(path, encoding):
            pass
        return
    too_long = _first_long_line(_decoded(path, encoding))  # reported once the whole file is known to decode
    if too_long:
        _check_length(path, *too_long)


def _first_long_line(pieces: Iterator[str]) -> tuple[int, int] | None:
    """The number and length of the first line over MAX_LINE_CHARS (split on "\\n"), else None;
    the text is read to its end either way."""
    found, number, carried = None, 1, 0  # the line being read: its number, its length so far
    for piece in pieces:
        if found is not None:
            continue
        parts = piece.split("\n")
        lengths = [carried + len(parts[0]), *map(len, parts[1:])]
        if max(lengths[:-1], default=0) > MAX_LINE_CHARS:  # a line that ends in this piece is too long
            at = next(i for i, length in enumerate(lengths[:-1]) if length > MAX_LINE_CHARS)
            found = (number + at, lengths[at])
        number += len(parts) - 1
        carried = lengths[-1]
    if found is None and carried > MAX_LINE_CHARS:
        found = (number, carried)
    return found


def _check_length(path: Path, number: int, length: int) -> None:
    if length > MAX_LINE_CHARS:
        raise DataError(
            f"{path}:{number}: line is {length:,} characters long (limit {MAX_LINE_CHARS:,})",
            "this does not look like a line-based dataset file; check data.path and data.format",
        )


def lines(path: Path, encoding: str, checked: bool = False) -> Iterator[tuple[int, str]]:
    """Non-blank lines of a text file with their 1-based line numbers, read a block at a time.

    The whole file is checked first (``check_text``; ``checked``: the caller did). Split on "\\n" only:
    str.splitlines() also breaks on U+0085 and other separators, and TriviaQA has a raw U+0085
    inside a JSON string. A trailing "\\r" (CRLF files) is dropped.
    """
    if not checked:
        check_text(path, encoding)
    for number, line, length in _split_lines(_decoded(path, encoding)):
        _check_length(path, number, length)
        assert line is not None
        line = line.removesuffix("\r")
        if line.strip():
            yield number, line


def json_rows(path: Path, encoding: str) -> Iterator[RawRow]:
    name, stem = str(path), path.stem
    for number, line in lines(path, encoding):
        where = f"{name}:{number}"
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
        yield RawRow(where, f"{stem}-{number}", row)


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
    check_text(path, encoding, line_limit=True)
    # The csv module caps a field at 131,072 characters by default: a field may be as long as a
    # line may be (the cap is process-wide; kd reads CSV only here).
    csv.field_size_limit(MAX_LINE_CHARS)
    name, stem = str(path), path.stem
    # newline="": lines split as io.StringIO(text, newline="") splits them (on \n, \r and \r\n, the
    # ends kept), which is what the csv module expects and what its line numbers count.
    with open(path, encoding=encoding, newline="") as handle:
        first = handle.readline()
        reader = csv.reader(chain([first.removeprefix("\ufeff")], handle) if first else iter(()))
        # csv.DictReader, inlined for speed: `at` is what its line_num would be, also when the csv
        # module raises; `last` is the last line of the last complete row.
        at = last = 0
        try:
            try:
                fieldnames = next(reader)
            except StopIteration:
                return
            at = reader.line_num
            width = len(fieldnames)
            for row in reader:
                at = reader.line_num
                while row == []:  # DictReader skips blank rows
                    row = next(reader, None)
                    if row is None:
                        return
                at = last = reader.line_num
                record = dict(zip(fieldnames, row))
                if width < len(row):
                    record[None] = row[width:]  # type: ignore[index]  # DictReader's restkey
                elif width > len(row):
                    for key in fieldnames[len(row):]:
                        record[key] = None  # its restval
                yield RawRow(f"{name}:{last}", f"{stem}-{last}", record)
        except csv.Error as exc:
            if "field limit" in str(exc):  # no line is too long, so the field runs over several
                raise DataError(
                    f"{path}:{last + 1}: a quoted field runs on for more than {MAX_LINE_CHARS:,} characters "
                    f"(to line {at})",
                    "a quote on that line is probably never closed; a field may hold at most "
                    f"{MAX_LINE_CHARS:,} characters",
                ) from None
            raise DataError(f"{path}:{at}: malformed CSV ({exc})", "check the quoting on that line") from None


PARQUET_BATCH_ROWS = 10_000


def parquet_rows(path: Path) -> Iterator[RawRow]:
    """A parquet file's rows, a batch of rows at a time."""
    import pyarrow.parquet as pq

    def unreadable(exc: Exception) -> DataError:
        return DataError(f"{path}: not a readable parquet file ({exc})", "check data.path and data.format")

    try:  # opened as pq.read_table opens a file (so with its errors), then read a batch at a time
        dataset = pq.ParquetDataset(path)
        batches = (batch for fragment in dataset.fragments  # one thread: the rows come in the file's order
                   for batch in fragment.to_batches(schema=dataset.schema, batch_size=PARQUET_BATCH_ROWS,
                                                    use_threads=False))
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise unreadable(exc) from None
    number, name, stem = 0, str(path), path.stem
    while True:
        try:
            batch = next(batches, None)
        except (OSError, ValueError) as exc:
            raise unreadable(exc) from None
        if batch is None:
            return
        for row in batch.to_pylist():
            number += 1
            yield RawRow(f"{name} row {number}", f"{stem}-{number}", row)


def label_lines(path: Path) -> Iterator[tuple[str, str]]:
    """A `*-labels.lst` file: (file:line, value) for each non-blank line."""
    return ((f"{path}:{number}", line.strip()) for number, line in lines(path, "utf-8"))
