"""Reading a data config: the format's adapter, then whole-dataset checks."""

from __future__ import annotations

from typing import Callable

from kdcli.data.aqua import read_aqua
from kdcli.data.fields import Example
from kdcli.data.files import SourceFile, source_files
from kdcli.data.fpb import read_fpb
from kdcli.data.generic import read_generic
from kdcli.data.messages import read_messages
from kdcli.data.socialiqa import read_socialiqa
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


ADAPTERS: dict[str, Callable[[SourceFile, DataConfig, list[str]], list[Example]]] = {
    "fpb": read_fpb,
    "winogrande": read_winogrande,
    "socialiqa": read_socialiqa,
    "aqua": read_aqua,
    "triviaqa": read_triviaqa,
    "messages": read_messages,
}


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
        parts, names = read_generic(sources, data, task, say)
    if task == "generate":
        for ex in (ex for examples in parts.values() for ex in examples):
            if not ex.answers and 0 <= ex.label < len(names):
                # A labelled dataset asked as generation: the class name is the answer (the label stays, so
                # the split is still stratified).
                ex.answers = [names[ex.label]]
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
