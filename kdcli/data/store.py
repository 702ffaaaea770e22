"""A source's examples as they are read, out of core.

The rows themselves go into Arrow record batches of kd's schema (but the label, plus each row's
``where``, for messages), held in memory up to ``SPILL_BYTES`` and then in a scratch file; what
cleaning, checking and splitting need of every row is kept beside them in compact arrays: the
label, a 128-bit hash of (text, options), the conflict key, a 64-bit hash of the answers and
turns (the rest of the duplicate key with the label; only once a row has answers or turns) and a
hash of the id. A row costs 28 bytes of memory (36 with answers), whatever its text.
"""

from __future__ import annotations

import json
import os
import tempfile
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from kdcli.data.fields import Example

if TYPE_CHECKING:
    import pyarrow as pa

BATCH_ROWS = 8192
BATCH_CHARS = 1 << 25  # long rows make a batch sooner: a batch's strings stay far below Arrow's 2 GB an array
SPILL_BYTES = 64 << 20  # batches held in memory before they go to a scratch file

COLUMNS = ("id", "text", "options", "label", "answers", "messages")  # as saved; `where` is the store's own


def schema(stored: bool = False) -> "pa.Schema":
    """kd's prepared schema (what datasets' Features of ``prepare`` make in Arrow) and ``where``;
    ``stored``: as the batches hold it, without the label (kept in ``labels``)."""
    import pyarrow as pa

    strings = pa.list_(pa.string())  # field "item": what datasets stores a Sequence(Value("string")) as
    fields = [("id", pa.string()), ("text", pa.string()), ("options", strings), ("label", pa.int64()),
              ("answers", strings), ("messages", pa.string()), ("where", pa.string())]
    return pa.schema([field for field in fields if not (stored and field[0] == "label")])


def _rest_key(answers: list[str], turns: tuple) -> int:
    """A 64-bit hash of the rest of a row's duplicate key: it tells apart rows of one conflict key."""
    return hash(repr((answers, turns)))


_NO_REST = _rest_key([], ())


class ExampleStore:
    """Examples in the order they were read, by source split (``parts``: split -> (first row, end)).

    ``add`` each example after ``start``-ing its split, then ``finish``; then the arrays ``labels``,
    ``key_hi``/``key_lo`` (the conflict key), ``rest`` (None while no row had answers or
    turns: the label is the rest of the key then) and ``id_hashes`` describe every row, and
    ``batches``, ``values`` and ``examples`` read the rows back. ``scratch`` gives a folder for the
    file, called only when the batches outgrow memory; ``close`` removes the file.
    """

    def __init__(self, scratch: Callable[[], Path]):
        self._scratch = scratch
        self.parts: dict[str, tuple[int, int]] = {}
        self._split = ""
        self.rows = 0
        self.max_options = 0
        self._pending: list[Example] = []
        self._pending_chars = 0
        self._batches: list[pa.RecordBatch] = []
        self._held = 0
        self._path: Path | None = None
        self._sink = self._writer = None
        self._labels = array("i")
        self._ids = array("q")
        self._keys = array("q")  # two a row: the conflict key
        self._rest: array | None = None
        self.labels = self.key_hi = self.key_lo = self.id_hashes = self.rest = None

    # ------------------------------------------------------------------ writing

    def start(self, split: str) -> None:
        self._end_part()
        self.parts[split], self._split = (self.rows, self.rows), split

    def _end_part(self) -> None:
        if self._split:
            self.parts[self._split] = (self.parts[self._split][0], self.rows)

    def add(self, ex: Example) -> None:
        self.extend([ex])

    def extend(self, examples: list[Example]) -> None:
        """Add ``examples`` (to the split last started), in order."""
        labels, ids, keys, rest = self._labels, self._ids, self._keys, self._rest
        chars = 0
        for i, ex in enumerate(examples):
            labels.append(ex.label)
            ids.append(hash(ex.id))
            # The conflict key, (text, options), as two 64-bit hashes of a form that tells them apart (a
            # text with options never reads like one without). Python's string hash is keyed anew in
            # each process: keys compare within a run only, and rows with equal keys are equal but
            # with a chance of 2**-128 a pair.
            form = "\x01" + repr((ex.text, ex.options)) if ex.options else "\x00" + ex.text
            keys.append(hash(form))
            keys.append(hash("\x00" + form))
            chars += len(ex.text)
            if ex.answers or ex.messages:
                if rest is None:  # the rows so far had neither
                    rest = self._rest = array("q", [_NO_REST]) * (self.rows + i)
                rest.append(_rest_key(ex.answers, tuple((m["role"], m["content"]) for m in ex.messages)))
                chars += sum(map(len, ex.answers))
            elif rest is not None:
                rest.append(_NO_REST)
            if ex.options:
                self.max_options = max(self.max_options, len(ex.options))
                chars += sum(map(len, ex.options))
        self.rows += len(examples)
        self._pending.extend(examples)
        self._pending_chars += chars
        if len(self._pending) >= BATCH_ROWS or self._pending_chars >= BATCH_CHARS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if not self._pending:
            return
        rows, self._pending, self._pending_chars = self._pending, [], 0
        types = schema(stored=True)
        batch = pa.record_batch(
            [
                pa.array([ex.id for ex in rows], types.field("id").type),
                pa.array([ex.text for ex in rows], types.field("text").type),
                pa.array([ex.options for ex in rows], types.field("options").type),
                pa.array([ex.answers for ex in rows], types.field("answers").type),
                # JSON: a list of turns has no stable Arrow type across datasets versions
                pa.array([json.dumps(ex.messages, ensure_ascii=False) if ex.messages else "" for ex in rows],
                         types.field("messages").type),
                pa.array([ex.where for ex in rows], types.field("where").type),
            ],
            schema=types,
        )
        if self._writer is not None:
            self._writer.write_batch(batch)
            return
        self._batches.append(batch)
        self._held += batch.nbytes
        if self._held > SPILL_BYTES:
            self._spill()

    def _spill(self) -> None:
        import pyarrow as pa

        handle, name = tempfile.mkstemp(prefix="examples-", suffix=".arrow", dir=self._scratch())
        os.close(handle)
        self._path = Path(name)
        self._sink = pa.OSFile(name, "wb")
        self._writer = pa.ipc.new_file(self._sink, schema(stored=True))
        for batch in self._batches:
            self._writer.write_batch(batch)
        self._batches, self._held = [], 0

    def finish(self) -> None:
        """No more rows: flush the last batch and make the per-row arrays."""
        self._end_part()
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None
        self.labels = np.frombuffer(self._labels, dtype=np.int32)
        keys = np.frombuffer(self._keys, dtype=np.int64).reshape(-1, 2)
        self.key_hi, self.key_lo = keys[:, 0], keys[:, 1]
        self.id_hashes = np.frombuffer(self._ids, dtype=np.int64)
        self.rest = None if self._rest is None else np.frombuffer(self._rest, dtype=np.int64)

    def relabel(self, classes: np.ndarray) -> None:
        """The labels were codes: ``classes[code]`` is each one's label."""
        self._labels = array("i", classes[self.labels].tobytes())
        self.labels = np.frombuffer(self._labels, dtype=np.int32)

    def drop_id_hashes(self) -> None:
        """The ids are checked: their hashes are not needed again."""
        self.id_hashes, self._ids = None, array("q")

    def drop_keys(self) -> None:
        """The rows are cleaned: the keys are not needed again."""
        self.key_hi = self.key_lo = self.rest = None
        self._keys, self._rest = array("q"), None

    # ------------------------------------------------------------------ reading

    def batches(self, columns: tuple[str, ...] = COLUMNS) -> Iterator[tuple[int, "pa.RecordBatch"]]:
        """(first row, batch) through every row, with ``columns`` (any of kd's schema and ``where``);
        read from the file a batch at a time (plain reads: a memory-mapped file would count in the
        resident set)."""
        import pyarrow as pa

        stored = [name for name in columns if name != "label"]
        start = 0
        for batch in self._stored(stored):
            count = batch.num_rows
            if "label" in columns:
                labels = pa.array(self.labels[start:start + count].astype(np.int64))
                batch = pa.RecordBatch.from_arrays([labels if name == "label" else batch.column(name)
                                                    for name in columns], names=list(columns))
            else:
                batch = batch.select(list(columns))
            yield start, batch
            start += count

    def _stored(self, names: list[str]) -> Iterator["pa.RecordBatch"]:
        import pyarrow as pa

        if self._path is None:
            yield from self._batches
            return
        fields = sorted(schema(stored=True).get_field_index(name) for name in names)
        with pa.OSFile(str(self._path)) as source:
            reader = pa.ipc.open_file(source, options=pa.ipc.IpcReadOptions(included_fields=fields))
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)

    def values(self, rows: np.ndarray, columns: tuple[str, ...]) -> Iterator[tuple]:
        """The ``columns`` of ``rows`` (ascending), one tuple a row, a batch at a time."""
        import pyarrow as pa

        if not len(rows):
            return
        for start, batch in self.batches(columns):
            first, end = np.searchsorted(rows, [start, start + batch.num_rows])
            if first == end:
                continue
            taken = batch.take(pa.array(rows[first:end] - start))
            yield from zip(*(taken.column(name).to_pylist() for name in columns))
            if end == len(rows):
                return

    def examples(self, rows: np.ndarray) -> list[Example]:
        """``rows`` as Examples (for callers that want them in memory: small data and tests)."""
        return [
            Example(id, text, options, label, answers, where, json.loads(messages) if messages else [])
            for id, text, options, label, answers, messages, where in self.values(rows, (*COLUMNS, "where"))
        ]

    def close(self) -> None:
        self._batches = []
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None
