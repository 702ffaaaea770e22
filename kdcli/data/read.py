"""Reading a data config: the format's adapter, then whole-dataset checks."""

from __future__ import annotations

import gc
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from kdcli.data.aqua import read_aqua
from kdcli.data.fields import Example
from kdcli.data.files import SourceFile, source_files
from kdcli.data.fpb import read_fpb
from kdcli.data.generic import read_generic
from kdcli.data.messages import read_messages
from kdcli.data.socialiqa import read_socialiqa
from kdcli.data.store import ExampleStore
from kdcli.data.triviaqa import read_triviaqa
from kdcli.data.winogrande import read_winogrande
from kdcli.errors import DataError
from kdcli.recipe import DataConfig

DEFAULT_LABEL_NAMES: dict[str, list[str]] = {
    "fpb": ["negative", "neutral", "positive"],
    "winogrande": ["1", "2"],
    "socialiqa": ["1", "2", "3"],
    "aqua": list("ABCDE"),
}


FORMAT_TASKS: dict[str, tuple[str, ...]] = {
    "fpb": ("classify", "generate"),
    "winogrande": ("choice",),
    "socialiqa": ("choice",),
    "aqua": ("choice", "generate"),
    "triviaqa": ("generate",),
    "messages": ("generate",),
}


# (source, data, class names, labelled): a source's examples; unlabelled, without labels or answers.
ADAPTERS: dict[str, Callable[[SourceFile, DataConfig, list[str], bool], Iterator[Example]]] = {
    "fpb": read_fpb,
    "winogrande": read_winogrande,
    "socialiqa": read_socialiqa,
    "aqua": read_aqua,
    "triviaqa": read_triviaqa,
    "messages": read_messages,
}


def read_source(
    data: DataConfig, task: str, store: ExampleStore, say: Callable[[str], None] = lambda message: None,
    sources: list[SourceFile] | None = None, labelled: bool = True, rows: Callable[[int], None] = lambda done: None,
) -> list[str]:
    """Read and normalise a source into ``store``, a source split ('all' for a single `path`) after
    another, row by row, and check the whole dataset; returns the class names.

    Nothing is deduplicated or split here; every row of the source is one example. The store is
    finished when this returns. ``sources``: these files rather than the config's own. Not
    ``labelled`` (a transfer set): labels and answers are not read, every row's label is -1. ``rows`` hears
    the rows read so far, every thousand or so.
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
    sources = source_files(data) if sources is None else sources
    generic = None
    if data.format in ADAPTERS:
        names = list(data.label_names or DEFAULT_LABEL_NAMES.get(data.format, []))
        stream = _adapted(sources, data, names, say, labelled)
    else:
        generic = read_generic(sources, data, task, say, labelled)
        stream, names = generic.examples, generic.names  # names inferred (classify only) are known at the end
    with _cycles_uncollected() if data.format != "hub" else nullcontext():  # the Hub's rows are not kd's to vouch for
        first_problem = _stream(stream, task, names, store, labelled, rows)
    store.finish()
    if generic is not None:
        names = generic.names
        if generic.classes is not None:  # the labels were codes of the values, until the names were known
            store.relabel(np.array(generic.classes, dtype=np.int32))
    _check(store, data, first_problem, labelled)
    if task == "choice":
        most = store.max_options
        names = names or [str(i) for i in range(1, most + 1)]  # option numbers, as prompts show them
        if len(names) < most:
            raise DataError(
                f"data.label_names has {len(names)} names, but rows have up to {most} options",
                "name every option position",
            )
    return names if task != "generate" else []


@contextmanager
def _cycles_uncollected() -> Iterator[None]:
    """Python's cycle collector paused: reading a file makes no reference cycles (rows, examples,
    their lists and dicts), but makes objects fast enough that the collector, going through the young
    ones again and again, took a fifth of the time. The first error's traceback makes one cycle,
    collected once the collector runs again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _stream(stream: Iterator[tuple[str, Example | None]], task: str, names: list[str],
            store: ExampleStore, labelled: bool, rows: Callable[[int], None]) -> tuple[int, DataError] | None:
    """Every example of ``stream`` into the store; the first row the task cannot use, with its error."""
    first_problem = None
    checked = task == "choice" or (task == "generate" and labelled)  # unlabelled, a prompt needs no answer
    read: list[Example] = []  # handed to the store a few at a time
    for split, ex in stream:
        if ex is None:
            store.extend(read)
            read = []
            store.start(split)
            continue
        if checked:
            if task == "generate" and not ex.answers and 0 <= ex.label < len(names):
                # A labelled dataset asked as generation: the class name is the answer (the label stays, so
                # the split is still stratified).
                ex.answers = [names[ex.label]]
            if first_problem is None:
                problem = _problem(ex, task)
                if problem is not None:
                    first_problem = (store.rows + len(read), problem)
        read.append(ex)
        if len(read) == 1024:
            store.extend(read)
            read = []
            rows(store.rows)
    store.extend(read)
    return first_problem


def read_examples(
    data: DataConfig, task: str, say: Callable[[str], None] = lambda message: None
) -> tuple[dict[str, list[Example]], list[str]]:
    """``read_source`` into memory: the examples of each source split, and the class names.

    For callers that want the examples as objects (tests, benchmarks, small data); `kd prepare`
    keeps them out of core.
    """
    with tempfile.TemporaryDirectory(prefix="kd-read-") as folder:
        store = ExampleStore(lambda: Path(folder))
        try:
            names = read_source(data, task, store, say)
            return {split: store.examples(np.arange(*rows)) for split, rows in store.parts.items()}, names
        finally:
            store.close()


def _adapted(
    sources: list[SourceFile], data: DataConfig, names: list[str], say: Callable[[str], None], labelled: bool
) -> Iterator[tuple[str, Example | None]]:
    for source in sources:
        say(f"reading {source.path} ({source.path.stat().st_size / 1e6:.1f} MB)")
        yield source.split, None
        for ex in ADAPTERS[data.format](source, data, names, labelled):
            yield source.split, ex


def _problem(ex: Example, task: str) -> DataError | None:
    """What makes one example unusable for the task, if anything."""
    if task == "choice" and len(ex.options) < 2:
        return DataError(
            f"{ex.where}: a choice needs at least 2 options, got {len(ex.options)}", "check data.columns.options"
        )
    if task == "generate" and not ex.answers:
        return DataError(
            f"{ex.where}: no reference answer", "every generate example needs an answer; check data.columns.answers"
        )
    return None


def _check(store: ExampleStore, data: DataConfig, first_problem: tuple[int, DataError] | None,
           labelled: bool) -> None:
    """Whole-dataset checks that no single row can make: no source split is empty, and then, at the
    first row where one fails, the row is usable and its id was not used before."""
    for split, (start, end) in store.parts.items():
        if start == end and not labelled and data.format != "hub":  # a transfer file: its part is named by it
            raise DataError(f"{split}: no examples in this transfer file",
                            "check data.transfer.path / data.transfer.files")
        if start == end:
            where = data.hub_name if data.format == "hub" else (data.path or data.files[split])  # type: ignore[index]
            raise DataError(
                f"{where}: no examples in the {'source' if split == 'all' else split} file",
                "check data.path / data.files",
            )
    reused = _reused_id(store)
    store.drop_id_hashes()
    found = [problem for problem in (first_problem, reused) if problem is not None]
    if found:
        raise min(found, key=lambda problem: problem[0])[1]  # the row's own problem first when both are on one row


def _reused_id(store: ExampleStore) -> tuple[int, DataError] | None:
    """The first row whose id an earlier row has, with its error; None when every id is unique.

    Rows whose id hashes collide are candidates; their ids are then compared as text, in row order.
    """
    hashes = store.id_hashes
    ordered = np.sort(hashes)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    del ordered
    if not len(repeated):
        return None
    candidates = np.flatnonzero(np.isin(hashes, repeated))
    seen: dict[str, str] = {}
    for row, (id_, where) in zip(candidates, store.values(candidates, ("id", "where"))):
        if id_ in seen:
            return int(row), DataError(
                f"{where}: id {id_!r} is already used at {seen[id_]}", "ids must be unique; check data.columns.id"
            )
        seen[id_] = where
    return None
