"""Length-sorted batches for inference passes, and their answers put back in data order.

A batch is padded to its longest row, so a batch of rows in data order does the work of its longest
row for every row (on Financial PhraseBank with MiniLM, batch 32 cost per sentence what batch 1
did). Every pass that runs a model over many rows without training it sorts them first: the
teacher cache (``cache.build_cache``), `kd eval`'s predictions and the agreement with each teacher
(``TaskKind.predict``, ``TaskModel.generate``), the gold-answer loss and validation during training
and teacher fine-tuning (``TaskKind.validate``). The caller measures each row's length as the model
will see it (``TaskKind.lengths``: tokens, the longest option of a multiple-choice row, a prompt
and its answer) a chunk of rows at a time (``measured_lengths``), runs the batches
``length_sorted_batches`` cuts, and ``in_data_order`` puts the answers back where the rows were:
what a pass returns or stores is in data order, whatever order it ran in.

- Longest first: a batch too large for memory fails at the start of a pass, not at its end.
- Ties keep data order (a stable sort), so the batches are the same on every run.
- Training batches are never sorted: which rows share a step is part of the optimisation.
- A row gives the same answer in any batch up to floating-point rounding: padding is masked, but a
  matrix product of another shape may add in another order (about 1e-8 on MiniLM's fp32 logits).

``KD_BATCH_ORDER=data`` runs the same batches in data order instead: not a setting for users, but
what benchmarks/sorted_batches.py measures sorting against, and the tests hold the answers equal to.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Sequence, TypeVar

Answer = TypeVar("Answer")
_MEASURED_AT_ONCE = 1024  # rows whose texts and tokens one call of ``measure`` holds


def gather(rows: Sequence[dict], indices: Sequence[int]) -> list[dict]:
    """``[rows[i] for i in indices]``, in one read where the rows are on disk (``data.stage.Rows.take``)."""
    take = getattr(rows, "take", None)
    return take(indices) if take is not None else [rows[i] for i in indices]


def measured_lengths(rows: Sequence[dict], measure: Callable[[list[dict]], list[int]]) -> list[int]:
    """``measure``'s length of every row, measured ``_MEASURED_AT_ONCE`` rows at a time: a pass over a
    split of millions of rows holds one chunk's prompts and token ids, never the split's."""
    lengths: list[int] = []
    for start in range(0, len(rows), _MEASURED_AT_ONCE):
        lengths += measure(rows[start : start + _MEASURED_AT_ONCE])
    return lengths


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """The row indices ``0 .. len(lengths) - 1`` cut into batches of ``batch_size`` (the last may be
    smaller), longest rows first, rows of one length in data order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    order = list(range(len(lengths)))
    if os.environ.get("KD_BATCH_ORDER") != "data":
        order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep their order
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def in_data_order(batches: Sequence[Sequence[int]], answers: Iterable[Sequence[Answer]]) -> list[Answer]:
    """Per-row answers, given batch by batch (each in its batch's row order), as one list in data order."""
    answers = list(answers)
    if len(answers) != len(batches):
        raise ValueError(f"{len(batches)} batches gave {len(answers)} lists of answers")
    placed: dict[int, Answer] = {}
    for index, answered in zip(batches, answers):
        if len(index) != len(answered):
            raise ValueError(f"a batch of {len(index)} rows gave {len(answered)} answers")
        placed.update(zip(index, answered))
    rows = sum(len(index) for index in batches)
    if len(placed) != rows or set(placed) != set(range(rows)):
        raise ValueError("the batches do not hold rows 0 .. n - 1 once each")
    return [placed[i] for i in range(rows)]
