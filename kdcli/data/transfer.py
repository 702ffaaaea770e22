"""The transfer set (``[data.transfer]``): unlabelled in-domain inputs that only the teachers label.

It is read with its format's own reader, unlabelled (no label or answer is read; every row's label
is -1), into a store of its own. A row is then dropped, for the first of these reasons that holds:

- ``test``, ``validation``: its text equals that of a test or validation row of any stage of the
  recipe. The teachers' outputs on a held-out sentence would otherwise teach it to the student:
  leakage. Texts are compared casefolded, with whitespace collapsed, so that a variant in case or
  spacing does not slip through.
- ``train``: its text (the same way) equals a train row of its own stage, before ``data.limit``; it
  adds nothing and would count that sentence twice in a step (and a labelled sentence that a limit on
  train holds back, to simulate few labels, is not unlabelled text).
- ``duplicates``: it repeats an earlier transfer row exactly (text, options and turns; the first is
  kept).
- ``limit``: it is not among the ``limit`` rows kept by a seeded draw.

The rows kept stay in source order. Like ``prepare``, nothing here holds a Python object per row:
texts are read a batch at a time and each becomes a 16-byte key (two 64-bit string hashes of its
normal form; Python keys them anew per process, so keys compare within one ``kd prepare``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from kdcli.data.files import SourceFile
from kdcli.data.read import read_source
from kdcli.data.split import clean, limit_rows
from kdcli.data.store import BATCH_ROWS, ExampleStore
from kdcli.errors import DataError
from kdcli.recipe import DataConfig

if TYPE_CHECKING:
    import pyarrow as pa

HELD_OUT = ("test", "validation")
REASONS = ("test", "validation", "train", "duplicates", "limit")  # why a row is dropped: the first that holds
KEY = np.dtype("V16")


def text_keys(texts: list[str]) -> np.ndarray:
    """Each text's key: casefolded, whitespace collapsed, hashed to 128 bits."""
    forms = [" ".join(text.casefold().split()) for text in texts]
    keys = np.empty((len(forms), 2), dtype=np.int64)
    keys[:, 0] = np.fromiter(map(hash, forms), dtype=np.int64, count=len(forms))
    keys[:, 1] = np.fromiter((hash("\x00" + form) for form in forms), dtype=np.int64, count=len(forms))
    return keys.view(KEY).ravel()


def store_keys(store: ExampleStore, splits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The text keys of each split's rows (ascending rows of ``store``), in one pass over the store."""
    import pyarrow as pa

    keys = {name: np.empty(len(rows), dtype=KEY) for name, rows in splits.items()}
    for start, batch in store.batches(("text",)):
        texts = batch.column("text")
        for name, rows in splits.items():
            first, end = np.searchsorted(rows, [start, start + batch.num_rows])
            if first < end:
                keys[name][first:end] = text_keys(texts.take(pa.array(rows[first:end] - start)).to_pylist())
    return keys


def table_keys(table: "pa.Table") -> np.ndarray:
    """The text keys of a saved split's rows, read a batch at a time."""
    return np.concatenate([np.empty(0, dtype=KEY)] + [
        text_keys(table.slice(start, BATCH_ROWS).column("text").to_pylist())
        for start in range(0, table.num_rows, BATCH_ROWS)
    ])


@dataclass
class Transfer:
    """A stage's transfer set, read and cleaned: the store's rows kept (ascending) and what happened to the rest."""

    store: ExampleStore
    rows: np.ndarray
    parts: list[dict]  # per source (a file, or a Hub split): its name, rows read and rows kept
    read: int
    dropped: dict[str, int]  # reason -> rows
    leaked_from: dict[str, int]  # "STAGE/SPLIT" -> transfer rows whose text is one of that split's


def reading_config(data: DataConfig) -> DataConfig:
    """[data] as the transfer set's reader sees it: its source, format, columns and encoding (each unset
    one [data]'s); class names, template and chat settings stay [data]'s."""
    transfer = data.transfer
    assert transfer is not None
    return data.model_copy(update={
        "format": transfer.format or data.format, "path": None, "files": {}, "labels_path": None,
        "hub_name": transfer.hub_name, "hub_config": transfer.hub_config,
        "encoding": transfer.encoding or data.encoding, "columns": transfer.columns or data.columns,
        "transfer": None,
    })


def build_transfer(data: DataConfig, sources: list[SourceFile], task: str, seed: int, held_out: dict[str, np.ndarray],
                   train: np.ndarray, num_options: int, say: Callable[[str], None], rows: Callable[[int], None],
                   scratch: Callable[[], Path]) -> Transfer:
    """Read ``data.transfer`` (from ``sources``, its files) and drop what the module docstring lists.

    ``held_out``: the text keys of every stage's validation and test split, by "STAGE/SPLIT";
    ``train``: those of this stage's train split; ``num_options``: the most options a train row has.
    """
    transfer = data.transfer
    assert transfer is not None
    store = ExampleStore(scratch)
    try:
        say("reading the transfer set")
        read_source(reading_config(data), task, store, say, sources=sources, labelled=False, rows=rows)
        if store.max_options > num_options:
            raise DataError(
                f"transfer rows have up to {store.max_options} options, the labelled train rows at most {num_options}",
                "the student scores as many options as the train rows have: use transfer rows with no more",
            )
        (keys,) = store_keys(store, {"all": np.arange(store.rows)}).values()
        unique, _, _ = clean(store, 0, store.rows, "error", [], drop_duplicates=True)  # the labels are all -1
        store.drop_keys()
        why = np.zeros(store.rows, dtype=np.int8)  # 0: kept, else 1 + the index of the reason in REASONS
        leaked_from = {}
        for split in HELD_OUT:
            for name, held in held_out.items():
                if name.endswith("/" + split):
                    hit = np.isin(keys, held)
                    if hit.any():
                        leaked_from[name] = int(hit.sum())
                        why[(why == 0) & hit] = REASONS.index(split) + 1
        why[(why == 0) & np.isin(keys, train)] = REASONS.index("train") + 1
        del keys
        repeated = np.ones(store.rows, dtype=bool)
        repeated[unique] = False
        why[(why == 0) & repeated] = REASONS.index("duplicates") + 1
        clear = np.flatnonzero(why == 0)
        rows = limit_rows({"transfer": clear}, store.labels, transfer.limit, random.Random(seed))["transfer"]
        dropped = {reason: int((why == code).sum()) for code, reason in enumerate(REASONS[:-1], start=1)}
        dropped["limit"] = len(clear) - len(rows)
        parts = []
        for name, (first, end) in store.parts.items():
            kept = int(np.count_nonzero((rows >= first) & (rows < end)))
            parts.append({"source": f"{transfer.hub_name}[{name}]" if transfer.hub_name else name,
                          "rows_read": end - first, "kept": kept})
        if not len(rows):
            shown = ", ".join(f"{count} {reason}" for reason, count in dropped.items() if count)
            raise DataError(
                f"no transfer rows are left: {store.rows} read, every one dropped ({shown})",
                "use other transfer files, or remove [data.transfer]",
            )
        return Transfer(store, rows, parts, store.rows, dropped, leaked_from)
    except BaseException:
        store.close()
        raise

