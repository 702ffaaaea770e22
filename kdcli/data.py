"""Datasets: read a source, normalise it to kd's schema, split it and save it (`kd prepare`).

Sources are the study's five datasets in their exact release formats (see
shared/data/README.md), generic csv/jsonl/parquet files mapped by ``data.columns``,
or a Hugging Face Hub dataset (``datasets.load_dataset``, needs network).

Every example becomes one row of the common schema:

- ``id``       str, stable (the release's own id, else ``FILESTEM-LINE``)
- ``text``     str, the prompt or sentence
- ``options``  list[str], the answer options of a choice (empty otherwise)
- ``label``    int, 0-based class or option index; -1 when there is none (generate)
- ``answers``  list[str], reference answers (TriviaQA: answer first, then aliases; AQuA: the correct option)

Label conventions for the generic formats, where a value's meaning is not fixed by a release:
classify labels are a class name from ``data.label_names`` or a 0-based class index (without
``label_names`` the class names are inferred: ``0..N`` for integer labels, else the sorted
names); choice labels are a 0-based option index or an option letter ``A``, ``B``, ...
The built-in adapters read their release's own convention (WinoGrande ``"1"``/``"2"``,
Social IQA 1-3, AQuA ``A``-``E``).

Prepared data lives in ``runs/NAME/data/STAGE/`` (``DatasetDict.save_to_disk`` plus
``manifest.json``). The manifest carries a fingerprint of everything that shapes the data
(data config, task, seed, source file hashes, kd version), so an unchanged second run is a
no-op. Every problem with the input is a DataError raised before anything is written.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import random
import re
import string
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple

from kdcli import __version__
from kdcli.errors import DataError
from kdcli.recipe import Columns, DataConfig, Recipe, Stage, fingerprint
from kdcli.rundir import RunDir, atomic_dir, leftovers, read_json, write_json

if TYPE_CHECKING:
    import datasets

SPLITS = ("train", "validation", "test")
MANIFEST = "manifest.json"
# Longer than any real example by orders of magnitude, yet short enough to stop early on a
# binary or minified file that was given the wrong format.
MAX_LINE_CHARS = 1_000_000
LETTERS = string.ascii_uppercase

DEFAULT_LABEL_NAMES: dict[str, list[str]] = {
    "fpb": ["negative", "neutral", "positive"],
    "winogrande": ["1", "2"],
    "socialiqa": ["1", "2", "3"],
    "aqua": list("ABCDE"),
}
# The tasks each built-in release can serve (AQuA's correct option text is also a generation target).
FORMAT_TASKS: dict[str, tuple[str, ...]] = {
    "fpb": ("classify",),
    "winogrande": ("choice",),
    "socialiqa": ("choice",),
    "aqua": ("choice", "generate"),
    "triviaqa": ("generate",),
}
FORMATS_WITH_LABEL_FILES = ("winogrande", "socialiqa")


@dataclass
class Example:
    id: str
    text: str
    options: list[str]
    label: int
    answers: list[str]
    where: str  # "file:line" of the source row, for error messages; not saved

    def key(self) -> tuple:
        """Identity of an exact duplicate: everything but the id."""
        return (self.text, tuple(self.options), self.label, tuple(self.answers))


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


@dataclass
class PrepareResult:
    stage: str
    path: Path
    skipped: bool
    reason: str
    counts: dict[str, int]
    label_histograms: dict[str, dict[str, int]]
    label_names: list[str]
    rows_read: int
    duplicates: int
    conflicts: int
    seconds: float
    fingerprint: str

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["path"] = str(self.path)
        return payload


# --------------------------------------------------------------------------- paths and files


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _excerpt(text: str, width: int = 80) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


def _read_text(path: Path, encoding: str) -> str:
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


def _lines(path: Path, text: str) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their 1-based line numbers.

    Split on "\\n" only: str.splitlines() also breaks on U+0085 and other separators, and
    TriviaQA has a raw U+0085 inside a JSON string. A trailing "\\r" (CRLF files) is dropped.
    """
    for number, line in enumerate(text.split("\n"), start=1):
        if len(line) > MAX_LINE_CHARS:
            raise DataError(
                f"{path}:{number}: line is {len(line):,} characters long (limit {MAX_LINE_CHARS:,})",
                "this does not look like a line-based dataset file; check data.path and data.format",
            )
        line = line.removesuffix("\r")
        if line.strip():
            yield number, line


def _json_rows(path: Path, encoding: str) -> Iterator[RawRow]:
    for number, line in _lines(path, _read_text(path, encoding)):
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{where}: not valid JSON ({exc.msg}): {_excerpt(line)}", "each line must be one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{where}: expected a JSON object, got {type(row).__name__}: {_excerpt(line)}",
                "each line must be one JSON object",
            )
        yield RawRow(where, f"{path.stem}-{number}", row)


def _csv_rows(path: Path, encoding: str) -> Iterator[RawRow]:
    reader = csv.DictReader(io.StringIO(_read_text(path, encoding), newline=""))
    try:
        for row in reader:
            yield RawRow(f"{path}:{reader.line_num}", f"{path.stem}-{reader.line_num}", row)
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})", "check the quoting on that line") from None


def _parquet_rows(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: not a readable parquet file ({exc})", "check data.path and data.format") from None
    for number, row in enumerate(rows, start=1):
        yield RawRow(f"{path} row {number}", f"{path.stem}-{number}", row)


def _label_lines(path: Path) -> list[tuple[str, str]]:
    """A `*-labels.lst` file: (file:line, value) for each non-blank line."""
    return [(f"{path}:{number}", line.strip()) for number, line in _lines(path, _read_text(path, "utf-8"))]


# --------------------------------------------------------------------------- field helpers


def _string(row: RawRow, key: str, hint: str) -> str:
    if key not in row.data or row.data[key] is None:
        raise DataError(f"{row.where}: missing field '{key}'", hint)
    value = row.data[key]
    if not isinstance(value, str):
        raise DataError(f"{row.where}: field '{key}' should be a string, got {_excerpt(repr(value))}", hint)
    if not value.strip():
        raise DataError(f"{row.where}: field '{key}' is empty", "fix or remove that line")
    return value


def _string_list(row: RawRow, key: str, hint: str) -> list[str]:
    value = row.data.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{row.where}: field '{key}' should be a list of strings, got {_excerpt(repr(value))}", hint)
    return value


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _int_like(value: Any) -> int | None:
    """An int, or a string of digits, as an int; anything else None (bool is not a number here)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdecimal():
        return int(value)
    return None


def _numbered_option(value: Any, count: int, where: str) -> int:
    """A release's 1-based option number ("1".."count") -> 0-based index."""
    number = _int_like(value)
    if number is None or not 1 <= number <= count:
        expected = ", ".join(str(i) for i in range(1, count + 1))
        raise DataError(f"{where}: unknown label {value!r} (expected one of {expected})", "fix that line of the file")
    return number - 1


def _class_index(value: Any, names: list[str], where: str) -> int:
    """classify: a class name from `names`, or a 0-based class index."""
    if isinstance(value, str) and value.strip() in names:
        return names.index(value.strip())
    index = _int_like(value)
    if index is not None and 0 <= index < len(names):
        return index
    raise DataError(
        f"{where}: unknown label {value!r} (expected one of {', '.join(names)})",
        "fix that line, or list every class in data.label_names (in id order)",
    )


def _option_index(value: Any, count: int, where: str) -> int:
    """choice (generic formats): a 0-based option index, or an option letter A, B, ..."""
    index = _int_like(value)
    if index is None and isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        index = LETTERS.index(value.strip().upper())
    if index is None or not 0 <= index < count:
        raise DataError(
            f"{where}: unknown label {value!r} for {count} options (expected a 0-based index or an option letter)",
            "fix that line, or point data.columns.label at the right column",
        )
    return index


def _answer_list(value: Any, where: str) -> list[str]:
    """A reference answer: a string, a list of strings, or a Hub trivia_qa `answer` dict (value + aliases)."""
    if isinstance(value, dict) and isinstance(value.get("value"), str):
        aliases = value.get("aliases") or []
        return _unique([value["value"], *(a for a in aliases if isinstance(a, str))])
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return _unique([v for v in value if v.strip()])
    raise DataError(
        f"{where}: answers should be a string or a list of strings, got {_excerpt(repr(value))}",
        "check data.columns.answers",
    )


# --------------------------------------------------------------------------- built-in adapters

FPB_HINT = "Financial PhraseBank lines are `sentence@label`; check data.path and data.format"
WINOGRANDE_HINT = "WinoGrande rows have qID, sentence, option1, option2 and answer; check data.path and data.format"
SOCIALIQA_HINT = "Social IQA rows have context, question, answerA, answerB and answerC; check data.path and data.format"
AQUA_HINT = "AQuA-RAT rows have question, options ['A)...', ...] and correct; check data.path and data.format"
TRIVIAQA_HINT = (
    "TriviaQA rows have context 'Question: ...\\nAnswer:', answer and aliases (or the Hub trivia_qa "
    "question and answer {value, aliases}); check data.path and data.format"
)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _read_fpb(source: SourceFile, data: DataConfig, names: list[str]) -> list[Example]:
    text = _read_text(source.path, data.encoding or "latin-1")
    # latin-1 decodes any bytes, so a UTF-8 copy of the release (one circulates) would be read as
    # mojibake without an error. Valid UTF-8 with non-ASCII bytes is almost never real latin-1.
    if data.encoding is None and not text.isascii() and _is_utf8(text.encode("latin-1")):
        raise DataError(
            f"{source.path} looks like UTF-8, but the Financial PhraseBank release is latin-1",
            "set data.encoding = 'utf-8' to read a re-encoded copy",
        )
    examples = []
    for number, line in _lines(source.path, text):
        where = f"{source.path}:{number}"
        sentence, at, label = line.rpartition("@")  # split on the last @: a sentence may contain one
        if not at:
            raise DataError(f"{where}: expected `sentence@label`, got {_excerpt(line)}", FPB_HINT)
        if not sentence.strip():
            raise DataError(f"{where}: empty sentence: {_excerpt(line)}", "fix or remove that line")
        label_id = _class_index(label.strip(), names, where)
        examples.append(Example(f"{source.path.stem}-{number}", sentence.strip(), [], label_id, [], where))
    return examples


def _aligned_labels(source: SourceFile, rows: list[RawRow]) -> list[tuple[str, str]] | None:
    if source.labels is None:
        return None
    labels = _label_lines(source.labels)
    if len(labels) != len(rows):
        raise DataError(
            f"{source.labels} has {len(labels)} labels for {len(rows)} rows in {source.path}",
            "the label file must have one line per row of its data file, in the same order",
        )
    return labels


def _read_winogrande(source: SourceFile, data: DataConfig, names: list[str]) -> list[Example]:
    rows = list(_json_rows(source.path, data.encoding or "utf-8"))
    labels = _aligned_labels(source, rows)
    examples = []
    for i, row in enumerate(rows):
        options = [_string(row, "option1", WINOGRANDE_HINT), _string(row, "option2", WINOGRANDE_HINT)]
        answer = row.data.get("answer")
        if labels is not None:
            where, value = labels[i]
            if answer is not None and str(answer).strip() != value:
                raise DataError(
                    f"{row.where}: answer {answer!r} disagrees with {where}: {value!r}",
                    "the data file and its label file do not belong together",
                )
        elif answer is not None:
            where, value = row.where, answer
        else:
            raise DataError(
                f"{row.where}: no answer and no label file {source.path.stem}-labels.lst",
                "WinoGrande test labels are hidden; use a train file, or give data.labels_path",
            )
        qid = row.data.get("qID")
        text = _string(row, "sentence", WINOGRANDE_HINT)
        label = _numbered_option(value, 2, where)
        examples.append(Example(qid if isinstance(qid, str) else row.default_id, text, options, label, [], row.where))
    return examples


def _read_socialiqa(source: SourceFile, data: DataConfig, names: list[str]) -> list[Example]:
    if source.labels is None:
        raise DataError(
            f"no label file for {source.path} (expected {source.path.stem}-labels.lst beside it)",
            "Social IQA keeps its labels in a separate file; give data.labels_path",
        )
    rows = list(_json_rows(source.path, data.encoding or "utf-8"))
    labels = _aligned_labels(source, rows)
    assert labels is not None  # source.labels is set
    examples = []
    for row, (where, value) in zip(rows, labels, strict=True):
        text = _string(row, "context", SOCIALIQA_HINT) + " " + _string(row, "question", SOCIALIQA_HINT)
        options = [_string(row, key, SOCIALIQA_HINT) for key in ("answerA", "answerB", "answerC")]
        examples.append(Example(row.default_id, text, options, _numbered_option(value, 3, where), [], row.where))
    return examples


AQUA_OPTION = re.compile(r"\s*([A-Z])\s*\)\s*(.*)", re.DOTALL)


def _read_aqua(source: SourceFile, data: DataConfig, names: list[str]) -> list[Example]:
    examples = []
    for row in _json_rows(source.path, data.encoding or "utf-8"):
        question = _string(row, "question", AQUA_HINT)
        options = []
        for i, option in enumerate(_string_list(row, "options", AQUA_HINT)):
            match = AQUA_OPTION.fullmatch(option)
            if not match or match.group(1) != LETTERS[i]:
                raise DataError(
                    f"{row.where}: option {i + 1} should start with '{LETTERS[i]})', got {_excerpt(option)}", AQUA_HINT
                )
            options.append(match.group(2).strip())
        correct = _string(row, "correct", AQUA_HINT).strip()
        if correct not in LETTERS[: len(options)]:
            raise DataError(
                f"{row.where}: unknown label {correct!r} (expected one of {', '.join(LETTERS[: len(options)])})",
                "fix that line of the file",
            )
        label = LETTERS.index(correct)
        examples.append(Example(row.default_id, question, options, label, [options[label]], row.where))
    return examples


TRIVIA_PREFIX, TRIVIA_SUFFIX = "Question: ", "\nAnswer:"


def _read_triviaqa(source: SourceFile, data: DataConfig, names: list[str]) -> list[Example]:
    examples = []
    for row in _json_rows(source.path, data.encoding or "utf-8"):
        if "context" in row.data:  # the llm-foundry subset
            context = _string(row, "context", TRIVIAQA_HINT)
            if not (context.startswith(TRIVIA_PREFIX) and context.endswith(TRIVIA_SUFFIX)):
                raise DataError(
                    f"{row.where}: context should be 'Question: ...\\nAnswer:', got {_excerpt(context)}", TRIVIAQA_HINT
                )
            question = context[len(TRIVIA_PREFIX) : -len(TRIVIA_SUFFIX)].strip()
            answers = _unique([_string(row, "answer", TRIVIAQA_HINT), *_string_list(row, "aliases", TRIVIAQA_HINT)])
            qid = row.default_id
        elif isinstance(row.data.get("answer"), dict):  # the Hub trivia_qa schema
            question = _string(row, "question", TRIVIAQA_HINT).strip()
            answers = _answer_list(row.data["answer"], row.where)
            qid = row.data.get("question_id") or row.default_id
        else:
            raise DataError(f"{row.where}: not a TriviaQA row (fields: {', '.join(row.data)})", TRIVIAQA_HINT)
        if not question:
            raise DataError(f"{row.where}: empty question", "fix or remove that line")
        examples.append(Example(str(qid), question, [], -1, answers, row.where))
    return examples


ADAPTERS: dict[str, Callable[[SourceFile, DataConfig, list[str]], list[Example]]] = {
    "fpb": _read_fpb,
    "winogrande": _read_winogrande,
    "socialiqa": _read_socialiqa,
    "aqua": _read_aqua,
    "triviaqa": _read_triviaqa,
}


# --------------------------------------------------------------------------- generic files and the Hub


def _hub_parts(data: DataConfig) -> tuple[dict[str, list[RawRow]], list[str]]:
    """Rows of a Hub dataset's train/validation/test splits, and its class names when the label is a ClassLabel."""
    import datasets

    try:
        loaded = datasets.load_dataset(data.hub_name, data.hub_config)
    except Exception as exc:  # offline, unknown name, gated, bad config: all the user's to fix
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"could not load Hub dataset '{data.hub_name}'"
            + (f" ({data.hub_config})" if data.hub_config else "")
            + f": {reason}",
            "without network, download the data once and set data.path (or data.files) to the local file "
            "with format = 'jsonl', 'csv' or 'parquet'",
        ) from None
    if "train" not in loaded:
        raise DataError(
            f"Hub dataset '{data.hub_name}' has no train split (it has {', '.join(loaded)})",
            "choose another hub_config",
        )
    parts = {
        split: [
            RawRow(f"{data.hub_name}[{split}] row {i}", f"{split}-{i}", row)
            for i, row in enumerate(loaded[split], start=1)
        ]
        for split in SPLITS
        if split in loaded
    }
    label_feature = loaded["train"].features.get(data.columns.label or "")
    names = list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else []
    return parts, names


def _column(row: RawRow, column: str, key: str) -> Any:
    if row.data.get(column) is None:
        raise DataError(
            f"{row.where}: no value in column '{column}' (columns: {', '.join(map(str, row.data))})",
            f"set data.columns.{key} to the right column name",
        )
    return row.data[column]


def _infer_class_names(rows: list[RawRow], column: str) -> list[str]:
    values = [_column(row, column, "label") for row in rows]
    for row, value in zip(rows, values):
        # Names are inferred as text; only a class name or a 0-based index maps back to one class.
        if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, int) and value < 0):
            raise DataError(
                f"{row.where}: label {_excerpt(repr(value))} is neither a class name nor a 0-based class index",
                "fix that line, point data.columns.label at the right column, or list the classes in data.label_names",
            )
    indices = [_int_like(v) for v in values]
    if values and all(i is not None for i in indices):
        return [str(i) for i in range(max(indices) + 1)]  # type: ignore[type-var]
    return sorted({str(v).strip() for v in values})


def _generic_example(row: RawRow, columns: Columns, task: str, names: list[str]) -> Example:
    text = _column(row, columns.text, "text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(
            f"{row.where}: column '{columns.text}' should be non-empty text, got {_excerpt(repr(text))}",
            "check data.columns.text",
        )
    options: list[str] = []
    if len(columns.options) == 1 and isinstance(row.data.get(columns.options[0]), list):
        options = [str(v) for v in row.data[columns.options[0]]]  # one column holding the list of options
    else:
        options = [str(_column(row, column, "options")) for column in columns.options]
    label = -1
    if task == "classify":
        label = _class_index(_column(row, columns.label, "label"), names, row.where)
    elif task == "choice":
        label = _option_index(_column(row, columns.label, "label"), len(options), row.where)
    answers = _answer_list(_column(row, columns.answers, "answers"), row.where) if columns.answers else []
    row_id = row.data.get(columns.id) if columns.id else None
    return Example(str(row_id) if row_id is not None else row.default_id, text, options, label, answers, row.where)


def _read_generic(
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
        raw, hub_names = _hub_parts(data)
        names = names or hub_names
    else:
        raw = {}
        for source in sources:
            say(f"reading {source.path} ({source.path.stat().st_size / 1e6:.1f} MB)")
            if data.format == "parquet":
                raw[source.split] = list(_parquet_rows(source.path))
            elif data.format == "csv":
                raw[source.split] = list(_csv_rows(source.path, data.encoding or "utf-8"))
            else:
                raw[source.split] = list(_json_rows(source.path, data.encoding or "utf-8"))
    if task == "classify" and not names:  # inferred over every split, so all splits share one class order
        names = _infer_class_names([row for rows in raw.values() for row in rows], columns.label or "")
    return {split: [_generic_example(row, columns, task, names) for row in rows] for split, rows in raw.items()}, names


# --------------------------------------------------------------------------- reading and checking


def read_examples(
    data: DataConfig, task: str, say: Callable[[str], None] = lambda message: None
) -> tuple[dict[str, list[Example]], list[str]]:
    """Read and normalise a source: examples per source split ('all' for a single `path`) and the class names.

    Nothing is deduplicated or split here; every row of the source is one Example.
    """
    if data.format in FORMAT_TASKS and task not in FORMAT_TASKS[data.format]:
        raise DataError(
            f"data.format '{data.format}' is a {' or '.join(FORMAT_TASKS[data.format])} dataset, "
            f"but the recipe's task is '{task}'",
            "set `task` to match the dataset, or choose another data.format",
        )
    if len(set(data.label_names)) != len(data.label_names):
        raise DataError(
            f"data.label_names lists a class twice: {data.label_names}", "give each class name once, in id order"
        )
    sources = source_files(data)
    if data.format in ADAPTERS:
        names = list(data.label_names or DEFAULT_LABEL_NAMES.get(data.format, []))
        parts = {}
        for source in sources:
            say(f"reading {source.path} ({source.path.stat().st_size / 1e6:.1f} MB)")
            parts[source.split] = ADAPTERS[data.format](source, data, names)
    else:
        parts, names = _read_generic(sources, data, task, say)
    _check(parts, task, data)
    if task == "choice":
        most = max(len(ex.options) for examples in parts.values() for ex in examples)
        names = names or [str(i) for i in range(1, most + 1)]  # option numbers, as prompts show them
        if len(names) < most:
            raise DataError(
                f"data.label_names has {len(names)} names, but rows have up to {most} options",
                "name every option position",
            )
    return parts, (names if task != "generate" else [])


def _check(parts: dict[str, list[Example]], task: str, data: DataConfig) -> None:
    """Whole-dataset checks that no single row can make."""
    for split, examples in parts.items():
        if not examples:
            where = data.hub_name if data.format == "hub" else (data.path or data.files[split])  # type: ignore[index]
            raise DataError(
                f"{where}: no examples in the {'source' if split == 'all' else split} file",
                "check data.path / data.files",
            )
    seen: dict[str, str] = {}
    for ex in (ex for examples in parts.values() for ex in examples):
        if task == "choice" and len(ex.options) < 2:
            raise DataError(
                f"{ex.where}: a choice needs at least 2 options, got {len(ex.options)}", "check data.columns.options"
            )
        if task == "generate" and not ex.answers:
            raise DataError(
                f"{ex.where}: no reference answer", "every generate example needs an answer; check data.columns.answers"
            )
        if ex.id in seen:
            raise DataError(
                f"{ex.where}: id {ex.id!r} is already used at {seen[ex.id]}",
                "ids must be unique; check data.columns.id",
            )
        seen[ex.id] = ex.where


# --------------------------------------------------------------------------- cleaning and splitting


def _resolve_conflicts(examples: list[Example], mode: str, names: list[str]) -> tuple[list[Example], int]:
    """Texts seen with different labels: refuse, or keep one label (first / majority) or none (drop).

    Returns the kept examples and how many texts were in conflict.
    """
    labels: dict[tuple, list[int]] = {}
    for ex in examples:
        labels.setdefault((ex.text, tuple(ex.options)), []).append(ex.label)
    conflicts = {key: seen for key, seen in labels.items() if len(set(seen)) > 1}
    if not conflicts:
        return examples, 0
    if mode == "error":
        (text, _), seen = next(iter(conflicts.items()))
        places = [ex.where for ex in examples if ex.text == text][:3]
        shown = ", ".join(names[i] if 0 <= i < len(names) else str(i) for i in dict.fromkeys(seen))
        more = f" (and {len(conflicts) - 1} more texts)" if len(conflicts) > 1 else ""
        raise DataError(
            f"{_excerpt(text)} has different labels: {shown} ({', '.join(places)}){more}",
            "fix the source, or set data.on_conflict = 'first', 'majority' or 'drop'",
        )
    keep: dict[tuple, int | None] = {}
    for key, seen in conflicts.items():
        if mode == "first":
            keep[key] = seen[0]
        elif mode == "majority":
            counts = Counter(seen)
            keep[key] = max(dict.fromkeys(seen), key=lambda label: counts[label])  # a tie goes to the label seen first
        else:  # drop
            keep[key] = None
    kept = [ex for ex in examples if keep.get((ex.text, tuple(ex.options)), ex.label) == ex.label]
    return kept, len(conflicts)


def _dedupe(examples: list[Example]) -> tuple[list[Example], int]:
    seen: set[tuple] = set()
    kept = []
    for ex in examples:
        if ex.key() not in seen:
            seen.add(ex.key())
            kept.append(ex)
    return kept, len(examples) - len(kept)


def _apportion(total: int, fractions: dict[str, float]) -> dict[str, int]:
    """Integer sizes proportional to `fractions` that sum to `total` (largest remainder)."""
    scale = sum(fractions.values())
    exact = {name: total * f / scale for name, f in fractions.items()}
    sizes = {name: int(value) for name, value in exact.items()}
    for name in sorted(exact, key=lambda n: exact[n] - sizes[n], reverse=True)[: total - sum(sizes.values())]:
        sizes[name] += 1
    return sizes


def _stratified(examples: list[Example], fractions: dict[str, float], rng: random.Random) -> dict[str, list[Example]]:
    """Seeded split into parts of the given fractions, each label shared out in the same proportions.

    Each label's examples are shuffled and laid end to end; then every example goes to the part
    furthest behind its share of the examples dealt so far. Every stretch of the sequence, so
    every label, is thereby divided in the fractions (to within one example), and the part sizes
    are exactly the apportioned ones. Parts keep the source order.
    """
    groups: dict[int, list[int]] = {}
    for index, ex in enumerate(examples):
        groups.setdefault(ex.label, []).append(index)
    order: list[int] = []
    for label in sorted(groups):
        rng.shuffle(groups[label])
        order.extend(groups[label])
    sizes = _apportion(len(order), fractions)
    chosen: dict[str, list[int]] = {name: [] for name in sizes}
    for dealt, index in enumerate(order, start=1):
        # Integer form of: sizes[name] / total * dealt - len(chosen[name]).
        name = max(sizes, key=lambda n: sizes[n] * dealt - len(chosen[n]) * len(order))
        chosen[name].append(index)
    return {name: [examples[i] for i in sorted(indices)] for name, indices in chosen.items()}


def _split(parts: dict[str, list[Example]], data: DataConfig, rng: random.Random) -> dict[str, list[Example]]:
    """train/validation/test: one source split by `data.split`, or named splits (missing ones carved out of train)."""
    wanted = {s: data.split.get(s, 0.0) for s in SPLITS if data.split.get(s, 0.0) > 0}
    if "all" in parts:
        return _stratified(parts["all"], wanted, rng)
    splits = dict(parts)
    missing = {s: f for s, f in wanted.items() if s not in parts}
    if missing:
        carved = _stratified(parts["train"], {"train": data.split.get("train", 0.0), **missing}, rng)
        splits.update(carved)
    return {s: splits[s] for s in SPLITS if s in splits}


def _limit(splits: dict[str, list[Example]], limit: int | None, rng: random.Random) -> dict[str, list[Example]]:
    if limit is None:
        return splits
    return {
        name: examples
        if len(examples) <= limit
        else _stratified(examples, {"keep": limit, "rest": len(examples) - limit}, rng)["keep"]
        for name, examples in splits.items()
    }


# --------------------------------------------------------------------------- prepare


@dataclass
class _Prepared:
    """A stage's data, read, cleaned and split in memory, ready to save."""

    splits: dict[str, list[Example]]
    label_names: list[str]
    rows_read: dict[str, int]
    duplicates: int
    conflicts: int
    conflict_rows_dropped: int


def _build(data: DataConfig, task: str, seed: int, say: Callable[[str], None]) -> _Prepared:
    parts, names = read_examples(data, task, say)
    rows_read = {split: len(examples) for split, examples in parts.items()}
    duplicates = conflicts = conflict_rows = 0
    for split, examples in parts.items():
        # Per source split: a named test file is the user's choice and is not mixed with train.
        kept, found = _resolve_conflicts(examples, data.on_conflict, names)
        conflicts += found
        conflict_rows += len(examples) - len(kept)
        if data.dedupe:
            kept, dropped = _dedupe(kept)
            duplicates += dropped
        parts[split] = kept
    rng = random.Random(seed)
    splits = _limit(_split(parts, data, rng), data.limit, rng)
    for name, examples in splits.items():
        if not examples:
            raise DataError(
                f"the {name} split is empty "
                f"({sum(len(e) for e in parts.values())} examples after cleaning, split {data.split})",
                f"use more data, or set data.split.{name} = 0 to leave the split out",
            )
    return _Prepared(splits, names, rows_read, duplicates, conflicts, conflict_rows)


def _histogram(examples: list[Example], names: list[str]) -> dict[str, int]:
    counts = Counter(ex.label for ex in examples if ex.label >= 0)
    return {name: counts.get(i, 0) for i, name in enumerate(names)}


def _to_datasets(splits: dict[str, list[Example]]) -> "datasets.DatasetDict":
    import datasets

    # Sequence rather than datasets.List: the pyproject allows datasets 3.x, which has no List.
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "text": datasets.Value("string"),
            "options": datasets.Sequence(datasets.Value("string")),
            "label": datasets.Value("int64"),
            "answers": datasets.Sequence(datasets.Value("string")),
        }
    )
    return datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict(
                {column: [getattr(ex, column) for ex in examples] for column in features}, features=features
            )
            for name, examples in splits.items()
        }
    )


def _identity(recipe: Recipe, data: DataConfig, sources: list[SourceFile]) -> dict[str, Any]:
    """Everything that shapes the prepared data; its hash is the fingerprint."""
    files = []
    for source in sources:
        for path in (source.path, source.labels):
            if path is not None:
                files.append(
                    {
                        "split": source.split,
                        "path": str(path.resolve()),
                        "bytes": path.stat().st_size,
                        "sha256": _sha256(path),
                    }
                )
    return {
        "task": recipe.task,
        "seed": recipe.seed,
        "kd_version": __version__,
        "data": data.model_dump(mode="json"),
        "sources": files,
    }


def _fingerprint(identity: dict[str, Any]) -> str:
    # Paths and sizes are left out: moving the data or the checkout does not change it.
    return fingerprint({**identity, "sources": [f["sha256"] for f in identity["sources"]]})


def _complete_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of a complete prepared directory, else None.

    The manifest is written last, inside the temporary directory that is renamed into place,
    so its presence (with the saved splits beside it) means the directory is whole.
    """
    try:
        manifest = read_json(path / MANIFEST)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or "fingerprint" not in manifest or not (path / "dataset_dict.json").is_file():
        return None
    return manifest


def _why_prepare(old: dict[str, Any] | None, identity: dict[str, Any], force: bool, exists: bool) -> str:
    if force:
        return "--force"
    if old is None:
        return "previous output incomplete" if exists else "first prepare"
    changed = [
        what
        for what, key in (
            ("the recipe's data section", "data"),
            ("task", "task"),
            ("seed", "seed"),
            ("kd version", "kd_version"),
        )
        if old.get(key) != identity[key]
    ]
    if [f["sha256"] for f in old.get("sources", [])] != [f["sha256"] for f in identity["sources"]]:
        changed.append("the source files")
    return "changed: " + ", ".join(changed or ["fingerprint"])


def _result(
    stage: str, path: Path, manifest: dict[str, Any], skipped: bool, reason: str, seconds: float
) -> PrepareResult:
    return PrepareResult(
        stage=stage,
        path=path,
        skipped=skipped,
        reason=reason,
        counts=manifest["counts"],
        label_histograms=manifest["label_histogram"],
        label_names=manifest["label_names"],
        rows_read=sum(manifest["rows_read"].values()),
        duplicates=manifest["duplicates_dropped"],
        conflicts=manifest["conflicts_resolved"],
        seconds=round(seconds, 3),
        fingerprint=manifest["fingerprint"],
    )


@contextmanager
def _status(quiet: bool) -> Iterator[Callable[[str], None]]:
    """A transient spinner on stderr with the current step; silent when quiet (--json)."""
    if quiet:
        yield lambda message: None
        return
    from rich.console import Console

    with Console(stderr=True).status("preparing data") as status:
        yield status.update


@contextmanager
def _no_datasets_bars() -> Iterator[None]:
    """save_to_disk draws its own tqdm bars; kd shows one status of its own instead."""
    import datasets

    was_enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


@dataclass
class _Pending:
    """A stage to write: its output directory, manifest and data."""

    out: Path
    manifest: dict[str, Any]
    prepared: _Prepared
    started: float


def _plan_stage(
    recipe: Recipe, stage: Stage, run: RunDir, force: bool, built: dict[str, _Prepared], say: Callable[[str], None]
) -> PrepareResult | _Pending:
    """Skip an up-to-date stage, or read, check and split its data in memory."""
    started = time.perf_counter()
    out = run.data(stage.name)
    say(f"stage {stage.name}: checking sources")
    identity = _identity(recipe, stage.data, source_files(stage.data))
    print_id = _fingerprint(identity)
    old = _complete_manifest(out)
    if not force and old is not None and old["fingerprint"] == print_id:
        return _result(stage.name, out, old, True, "up to date (no changes)", time.perf_counter() - started)
    reason = _why_prepare(old, identity, force, out.exists())
    if leftovers(out.parent, out.name):  # a prepare killed while writing: its partial copy is removed below
        reason = f"{reason}; an earlier prepare was interrupted, its partial output is discarded"
    if print_id not in built:  # stages with the same data are read once
        built[print_id] = _build(
            stage.data, recipe.task, recipe.seed, lambda message: say(f"stage {stage.name}: {message}")
        )
    prepared = built[print_id]
    manifest = {
        "kd_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "stage": stage.name,
        "format": stage.data.format,
        "reason": reason,
        **identity,
        "fingerprint": print_id,
        "label_names": prepared.label_names,
        "num_options": max((len(ex.options) for ex in prepared.splits["train"]), default=0),
        "rows_read": prepared.rows_read,
        "duplicates_dropped": prepared.duplicates,
        "conflicts_resolved": prepared.conflicts,
        "conflict_rows_dropped": prepared.conflict_rows_dropped,
        "counts": {name: len(examples) for name, examples in prepared.splits.items()},
        "label_histogram": {
            name: _histogram(examples, prepared.label_names) for name, examples in prepared.splits.items()
        },
    }
    return _Pending(out, manifest, prepared, started)


def _write_stage(pending: _Pending) -> PrepareResult:
    manifest = pending.manifest
    with atomic_dir(pending.out) as tmp, _no_datasets_bars():
        _to_datasets(pending.prepared.splits).save_to_disk(str(tmp))
        manifest["seconds"] = round(time.perf_counter() - pending.started, 3)
        write_json(tmp / MANIFEST, manifest)  # last: its presence marks the directory complete
    return _result(manifest["stage"], pending.out, manifest, False, manifest["reason"], manifest["seconds"])


@contextmanager
def _writing(out: Path) -> Iterator[None]:
    """One writer per prepared folder: under torchrun/accelerate every process of a job prepares
    the data; the first writes it, the others wait here and then find it done."""
    from filelock import FileLock

    run_root = out.parent.parent  # runs/NAME/data/STAGE
    run_root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(run_root / ".prepare.lock")):
        yield


def _written_meanwhile(plan: _Pending, planned_at: float, force: bool) -> PrepareResult | None:
    """The result of another process that wrote this very data while we waited for the lock, else None."""
    manifest = _complete_manifest(plan.out)
    if manifest is None or manifest["fingerprint"] != plan.manifest["fingerprint"]:
        return None
    if force and (plan.out / MANIFEST).stat().st_mtime < planned_at:
        return None  # --force: the copy from before this command does not count
    return _result(plan.manifest["stage"], plan.out, manifest, True, "up to date (prepared by another process)",
                   time.perf_counter() - plan.started)


def prepare_recipe(recipe: Recipe, force: bool = False, quiet: bool = False) -> list[PrepareResult]:
    """Prepare every stage's data under the run directory; a stage whose data is up to date is skipped.

    Every stage is read and checked before anything is written, so bad input writes nothing.
    """
    run = RunDir.for_recipe(recipe)
    built: dict[str, _Prepared] = {}
    planned_at = time.time()
    with _status(quiet) as say:
        plans = [_plan_stage(recipe, stage, run, force, built, say) for stage in recipe.resolved_stages()]
        results = []
        for plan in plans:
            if isinstance(plan, _Pending):
                with _writing(plan.out):
                    done = _written_meanwhile(plan, planned_at, force)
                    if done is None:
                        say(f"stage {plan.manifest['stage']}: saving {plan.out}")
                        plan = _write_stage(plan)
                    else:
                        plan = done
            results.append(plan)
    return results


def load_prepared(run: RunDir, stage: str) -> tuple["datasets.DatasetDict", dict[str, Any]]:
    """A stage's prepared splits and manifest; DataError when they are missing or incomplete."""
    path = run.data(stage)
    manifest = _complete_manifest(path)
    if manifest is None:
        state = "incomplete" if path.exists() else "missing"
        raise DataError(f"prepared data for stage '{stage}' is {state} ({path})", "run kd prepare RECIPE")
    import datasets

    try:
        splits = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:
        raise DataError(f"prepared data in {path} cannot be read ({exc})", "run kd prepare RECIPE --force") from None
    return splits, manifest


__all__ = [
    "Example",
    "PrepareResult",
    "prepare_recipe",
    "load_prepared",
    "read_examples",
    "resolve_path",
    "source_files",
]
