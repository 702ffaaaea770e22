"""A stage's prepared data as training, caching and evaluation read it.

A split is not turned into Python objects up front: ``Rows`` reads each row from the split's
memory-mapped Arrow table when it is asked for, so a split of millions of rows costs the pages
that are read, not a dict per row (about 1.4 KB each) for the whole run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.data.prepare import complete_manifest, load_prepared, prepare_recipe
from kdcli.errors import DataError
from kdcli.recipe import Recipe, Stage, fingerprint
from kdcli.rundir import RunDir, sha256_file

if TYPE_CHECKING:
    import pyarrow as pa

_READ_AHEAD = 1024  # rows decoded at once when a pass goes through a split in order


class Rows(Sequence):
    """The rows of one prepared split (or a share of them), each read when asked for as a dict: the
    prepared columns, ``idx`` (its index in the split, for cache lookups) and ``messages`` (in chat
    format, the turns before the answer; empty otherwise). ``rows[i:j]`` is a list of dicts."""

    def __init__(self, table: "pa.Table", stage: Stage, positions: Sequence[int] | None = None):
        import numpy as np

        self._table = table
        self._stage = stage
        self._positions = positions  # a share of the split (a tune trial's): split indices, in this order
        # The mapped file's record batches (views, no copy) and the split index each starts at.
        self._batches = table.to_batches()
        self._starts = np.cumsum([0] + [batch.num_rows for batch in self._batches])

    def __len__(self) -> int:
        return self._table.num_rows if self._positions is None else len(self._positions)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        return self.take([i])[0]

    def take(self, indices: Sequence[int]) -> list[dict]:
        """The rows at ``indices``, in that order, in one conversion: a slice of its record batch for each
        run of consecutive rows. (A take over the whole table costs time in proportion to the split: 30 ms
        for 64 rows of 1M, against 3.5 ms this way.)"""
        import numpy as np
        import pyarrow as pa

        n = len(self)
        if any(not -n <= i < n for i in indices):
            raise IndexError(f"rows {[i for i in indices if not -n <= i < n][:3]} of a split of {n} rows")
        idx = [i % n if self._positions is None else self._positions[i] for i in indices]
        batch_of = (np.searchsorted(self._starts, idx, side="right") - 1).tolist()
        pieces: list[list[int]] = []  # [batch, first row in it, rows]
        for i, b in zip(idx, batch_of):
            local = i - int(self._starts[b])
            if pieces and pieces[-1][0] == b and pieces[-1][1] + pieces[-1][2] == local:
                pieces[-1][2] += 1
            else:
                pieces.append([b, local, 1])
        table = pa.Table.from_batches([self._batches[b].slice(first, count) for b, first, count in pieces],
                                      schema=self._table.schema)
        return [_row(row, k, self._stage) for row, k in zip(table.to_pylist(), idx)]

    def __iter__(self) -> Iterator[dict]:
        for start in range(0, len(self), _READ_AHEAD):
            yield from self[start : start + _READ_AHEAD]

    def share(self, positions: Sequence[int]) -> "Rows":
        """The rows at ``positions`` (indices into these rows), in that order."""
        if self._positions is not None:
            positions = [self._positions[p] for p in positions]
        return Rows(self._table, self._stage, list(positions))


@dataclass
class StageData:
    rows: dict[str, Rows]  # split -> its rows
    manifest: dict[str, Any]
    num_classes: int  # classes or options the model scores; 0 for free-text answers
    label_prior: list[float] | None  # the train split's label shares (diversity penalty); None without labels

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]


def stage_data(recipe: Recipe, run: RunDir, stage: Stage, replace: bool = True) -> StageData:
    """The stage's prepared splits (running `prepare` first when they are missing, or stale and
    ``replace`` allows it: readers of a run never replace its data)."""
    import numpy as np

    from kdcli.runtime import process_state
    from kdcli.tasks import task_kind

    # Under several processes the main one prepares; the others then find it up to date.
    with process_state().main_process_first():
        prepare_recipe(recipe, quiet=True, replace=replace)
    splits, manifest = load_prepared(run, stage.name)
    rows = {name: Rows(split.data.table, stage) for name, split in splits.items()}
    num_classes = task_kind(recipe.task).num_classes(manifest)
    prior = None
    if "train" in splits and num_classes:
        labels = splits["train"].data.table.column("label").to_numpy()
        histogram = np.bincount(labels[(labels >= 0) & (labels < num_classes)], minlength=num_classes)
        total = int(histogram.sum())
        prior = [int(count) / total for count in histogram] if total else None
    return StageData(rows, manifest, num_classes, prior)


def file_data(recipe: Recipe, run: RunDir, stage: Stage, path: Path, data_format: str | None) -> StageData:
    """A file in any supported format (``data_format``, default the stage's) as the one split ``file``:
    every row as read, none dropped, deduplicated or split off (`kd eval --data`). The file is read
    into memory. Its class ids are the stage's (``data.label_names``, else the names its prepared data
    was given), so that an id means what it meant in training."""
    import tempfile

    import pyarrow as pa

    from kdcli.data.read import DEFAULT_LABEL_NAMES, read_source
    from kdcli.data.store import COLUMNS, ExampleStore
    from kdcli.tasks import task_kind

    prepared = complete_manifest(run.data(stage.name)) or {}  # none: the recipe's own class names, or the format's
    names = list(stage.data.label_names or prepared.get("label_names", []))
    fmt = data_format or stage.data.format
    if recipe.task == "classify" and not names and fmt not in DEFAULT_LABEL_NAMES:
        raise DataError(f"the class names of stage '{stage.name}' are not known: its data is not prepared and "
                        "data.label_names is not set, so the file's labels cannot be given the model's class ids",
                        "run `kd prepare RECIPE` first, or set data.label_names")
    data = stage.data.model_copy(update={"format": fmt, "path": str(path), "files": {}, "labels_path": None,
                                         "hub_name": None, "hub_config": None, "transfer": None,
                                         "label_names": names})
    with tempfile.TemporaryDirectory(prefix="kd-eval-") as folder:
        store = ExampleStore(lambda: Path(folder))
        try:
            names = read_source(data, recipe.task, store)
            table = pa.Table.from_batches([batch for _, batch in store.batches(COLUMNS)])
            options = store.max_options
        finally:
            store.close()
    manifest = {"label_names": names, "num_options": prepared.get("num_options", options),
                "fingerprint": fingerprint({"file": sha256_file(path), "format": fmt, "label_names": names}),
                "source": {"path": str(path.resolve()), "format": fmt}}
    return StageData({"file": Rows(table, stage)}, manifest, task_kind(recipe.task).num_classes(manifest), None)


def _row(row: dict, idx: int, stage: Stage) -> dict:
    """A prepared row as the models read it: its index in the split (`idx`, for cache lookups) and, in
    chat format, the turns before the answer (`messages`; empty otherwise)."""
    turns = json.loads(row["messages"]) if row.get("messages") else []
    if stage.data.chat and not turns:
        from kdcli.models import render_prompt

        system = [{"role": "system", "content": stage.data.system}] if stage.data.system is not None else []
        # The prompt template is optional in chat: an instruct model is asked the question itself.
        question = render_prompt(row, stage.data.template) if stage.data.template else row["text"]
        turns = [*system, {"role": "user", "content": question}]
    return dict(row, idx=idx, messages=turns)
