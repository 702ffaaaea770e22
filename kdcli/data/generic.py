"""Generic csv, jsonl, parquet and Hub rows, mapped to the schema by ``data.columns``."""

from __future__ import annotations

from typing import Any, Callable, Iterator

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

RowParts = Callable[[], Iterator[tuple[str, Iterator[RawRow]]]]  # each source split and its rows, read anew per call


class _Inference:
    """The class names of a label column, from every row's value, judged as reading every row and
    then inferring them did: a row without a label first, then a value that is no class name or
    index, then an integer too large to be a class index, each at the first row it happens."""

    def __init__(self, column: str) -> None:
        self.column = column
        self.missing: DataError | None = None
        self.bad: DataError | None = None
        self.all_int, self.top, self.top_row = True, -1, None
        self.values: set[str] = set()
        self.seen: set[str | int] = set()  # the good values so far: one seen again changes nothing

    def see(self, row: RawRow) -> None:
        value = row.data.get(self.column)
        if type(value) in (str, int) and value in self.seen:  # type(): True is not 1 here
            return
        if self.missing is not None:
            return
        try:
            value = _column(row, self.column, "label")
        except DataError as exc:
            self.missing = exc  # reported before a bad label, wherever it is
            return
        if self.bad is not None:
            return
        # Names are inferred as text; only a class name or a 0-based index maps back to one class.
        if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, int) and value < 0):
            self.bad = DataError(
                f"{row.where}: label {excerpt(repr(value))} is neither a class name nor a 0-based class index",
                "fix that line, point data.columns.label at the right column, or list the classes in "
                "data.label_names",
            )
            return
        index = int_like(value)
        if index is None:
            self.all_int = False
        elif index > self.top:
            self.top, self.top_row = index, row
        self.values.add(str(value).strip())
        self.seen.add(value)

    def names(self) -> list[str]:
        if self.missing is not None:
            raise self.missing
        if self.bad is not None:
            raise self.bad
        if self.values and self.all_int:
            if self.top >= MAX_INFERRED_CLASSES:  # a column of ids or amounts, not of class indices
                assert self.top_row is not None
                raise DataError(
                    f"{self.top_row.where}: label {self.top} would make {self.top + 1:,} classes (integer labels "
                    f"are read as 0-based class indices; at most {MAX_INFERRED_CLASSES:,} are inferred)",
                    "point data.columns.label at the class column, or list the classes in data.label_names",
                )
            return [str(i) for i in range(self.top + 1)]
        return sorted(self.values)


class _Codes:
    """While the class names are not known yet: each distinct label value as a number (its code,
    in the order first seen), with the first row that has it."""

    def __init__(self) -> None:
        self.codes: dict[str | int, int] = {}
        self.first: list[tuple[int, str]] = []  # per code: (row, where) of its first row
        self.row = -1  # the row being read
        self.coded = False  # whether that row's label has been coded

    def __call__(self, value: Any, where: str) -> int:
        self.coded = True
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return -1  # a bad label, which inference reports first
        code = self.codes.get(value)
        if code is None:
            code = self.codes[value] = len(self.first)
            self.first.append((self.row, where))
        return code

    def classes(self, names: list[str]) -> tuple[list[int], tuple[int, DataError] | None]:
        """Each code's class index, and the first row whose value names no class (with its error)."""
        classes, failed = [], None
        for value, (row, where) in zip(self.codes, self.first):
            try:
                classes.append(class_index(value, names, where))
            except DataError as exc:
                classes.append(-1)
                if failed is None or row < failed[0]:
                    failed = (row, exc)
        return classes, failed


def _example_maker(columns: Columns, task: str, names: list[str], codes: _Codes | None = None,
                   labelled: bool = True) -> Callable[[RawRow], Example]:
    """The function that turns a row into an Example by ``columns`` (the label coded by ``codes``, when
    given, instead of looked up in ``names``; neither label nor answers read when not ``labelled``)."""
    text_column, option_columns, label_column = columns.text, list(columns.options), columns.label or ""
    answers_column, id_column = (columns.answers if labelled else None), columns.id
    one_column = len(option_columns) == 1
    classify, choice = task == "classify" and labelled, task == "choice" and labelled

    def example(row: RawRow) -> Example:
        data = row.data
        text = data.get(text_column)
        if text is None:
            _column(row, text_column, "text")  # raises
        if not isinstance(text, str) or not text.strip():
            raise DataError(
                f"{row.where}: column '{text_column}' should be non-empty text, got {excerpt(repr(text))}",
                "check data.columns.text",
            )
        if one_column and isinstance(data.get(option_columns[0]), list):
            options = [str(v) for v in data[option_columns[0]]]  # one column holding the list of options
        elif option_columns:
            options = [str(_column(row, column, "options")) for column in option_columns]
        else:
            options = []
        label = -1
        if classify:
            value = data.get(label_column)
            if value is None:
                _column(row, label_column, "label")  # raises
            label = codes(value, row.where) if codes is not None else class_index(value, names, row.where)
        elif choice:
            label = option_index(_column(row, label_column, "label"), len(options), row.where)
        answers = answer_list(_column(row, answers_column, "answers"), row.where) if answers_column else []
        row_id = data.get(id_column) if id_column else None
        return Example(str(row_id) if row_id is not None else row.default_id, text, options, label, answers, row.where)

    return example


class GenericSource:
    """A generic source being read: ``examples`` gives ``(split, None)`` when a source split begins and
    ``(split, example)`` for each of its rows. ``names`` are the class names; when the recipe does not
    list them they are inferred from every row, and are known once ``examples`` is through: the
    examples' labels are then codes, and ``classes`` maps each code to its class. Rows read unlabelled
    have neither label nor answers."""

    def __init__(self, parts: RowParts, columns: Columns, task: str, names: list[str], labelled: bool) -> None:
        self.names = names
        self.classes: list[int] | None = None
        self.examples = (self._inferring(parts, columns, task) if task == "classify" and not names and labelled
                         else self._examples(parts, columns, task, labelled))

    def _examples(self, parts: RowParts, columns: Columns, task: str,
                  labelled: bool) -> Iterator[tuple[str, Example | None]]:
        # Every row of every file is read before a row that makes no example is reported, so that
        # a row further on that does not parse is reported instead (as reading them all first did).
        error, make = None, _example_maker(columns, task, self.names, labelled=labelled)
        for split, rows in parts():
            yield split, None
            for row in rows:
                if error is not None:
                    continue
                try:
                    example = make(row)
                except DataError as exc:
                    error = exc
                    continue
                yield split, example
        if error is not None:
            raise error

    def _inferring(self, parts: RowParts, columns: Columns, task: str) -> Iterator[tuple[str, Example | None]]:
        """One pass that infers the names from every row and, until a row makes no example, codes
        its label. Then, as the names' pass and then the examples' pass found them: a row that does
        not parse; a label that makes inference fail; the first row that makes no example, its label
        naming no class (found from its code) or another of its fields."""
        inference, codes = _Inference(columns.label or ""), _Codes()
        error, error_row, after_label = None, -1, False
        see, make = inference.see, _example_maker(columns, task, [], codes)
        for split, rows in parts():
            yield split, None
            for row in rows:
                codes.row += 1
                see(row)
                if error is not None:
                    continue
                codes.coded = False
                try:
                    example = make(row)
                except DataError as exc:  # the label, if coded, came before the field at fault
                    error, error_row, after_label = exc, codes.row, codes.coded
                    continue
                yield split, example
        names = inference.names()
        classes, failed = codes.classes(names)
        if failed is not None and (error is None or failed[0] < error_row or (failed[0] == error_row and after_label)):
            raise failed[1]
        if error is not None:
            raise error
        self.names, self.classes = names, classes


def read_generic(sources: list[SourceFile], data: DataConfig, task: str, say: Callable[[str], None],
                 labelled: bool) -> GenericSource:
    """A generic csv, jsonl, parquet or Hub source, read as ``GenericSource`` describes."""
    columns = data.columns
    if task == "choice" and not columns.options:
        raise DataError(
            "data.columns.options is empty, but task 'choice' needs the option columns",
            "set e.g. columns.options = ['option1', 'option2']",
        )
    if labelled and task in ("classify", "choice") and not columns.label:
        raise DataError(
            f"data.columns.label is unset, but task '{task}' needs labels", "set data.columns.label to the label column"
        )
    if labelled and task == "generate" and not columns.answers:
        raise DataError(
            "data.columns.answers is unset, but task 'generate' needs reference answers",
            "set data.columns.answers to the answer column",
        )
    names = list(data.label_names)
    if data.format == "hub":
        say(f"loading {data.hub_name} from the Hub")
        hub, hub_names = read_hub(data)
        names = names or hub_names

        def parts() -> Iterator[tuple[str, Iterator[RawRow]]]:
            for split, rows in hub.items():
                yield split, rows()
    else:

        def parts() -> Iterator[tuple[str, Iterator[RawRow]]]:
            for source in sources:
                say(f"reading {source.path} ({source.path.stat().st_size / 1e6:.1f} MB)")
                if data.format == "parquet":
                    yield source.split, parquet_rows(source.path)
                elif data.format == "csv":
                    yield source.split, csv_rows(source.path, data.encoding or "utf-8")
                else:
                    yield source.split, json_rows(source.path, data.encoding or "utf-8")

    return GenericSource(parts, columns, task, names, labelled)
