"""Cleaning and splitting: label conflicts, exact duplicates, seeded stratified splits, limits.

Rows are numbers into an ExampleStore, and every step works on arrays of them, reading only the
store's per-row arrays (labels and key hashes); a split is an ascending array of rows. The
results are those of the in-memory steps kd had before, row for row: the same rows kept and
dropped, the same counts, and the same seeded random draws in the same order, so the same splits.
"""

from __future__ import annotations

import random
from array import array

import numpy as np

from kdcli.data.files import SPLITS, excerpt
from kdcli.data.store import ExampleStore
from kdcli.errors import DataError
from kdcli.recipe import DataConfig


def _groups(hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows with equal keys (``hi``, ``lo``) grouped: each row's group, and each group's first row.

    Positions are into the given arrays; groups are numbered in key order.
    """
    count = len(hi)
    order = np.lexsort((lo, hi))  # stable: a group's rows in row order, its first row first
    new = np.ones(count, dtype=bool)
    for key in (hi, lo):
        ordered = key[order]
        new[1:] &= ordered[1:] == ordered[:-1]
        del ordered
    np.logical_not(new, out=new)
    new[:1] = True
    index = np.int32 if count < 2**31 else np.int64
    group = np.empty(count, dtype=index)
    group[order] = np.cumsum(new, dtype=index) - 1
    return group, order[new]


def clean(
    store: ExampleStore, first: int, end: int, mode: str, names: list[str], drop_duplicates: bool
) -> tuple[np.ndarray, int, int]:
    """Rows ``first``..``end`` of the store (one source split) with label conflicts resolved, then
    exact duplicates dropped: the rows kept (ascending), the number of texts in conflict, and the
    number of duplicates dropped.

    Texts (with their options) seen with different labels are refused (``mode`` 'error'), or keep
    one label (the first seen, or the majority, a tie going to the label seen first) or none
    ('drop'). A duplicate is a row equal to an earlier one in all but its id; the first is kept.
    """
    labels = store.labels[first:end]
    group, firsts = _groups(store.key_hi[first:end], store.key_lo[first:end])
    first_label = labels[firsts]
    conflicted = np.zeros(len(firsts), dtype=bool)
    conflicted[group[labels != first_label[group]]] = True
    conflicts = int(conflicted.sum())
    kept = None  # positions kept; None: all of them
    if conflicts:
        if mode == "error":
            raise _conflict_error(store, first, end, group, firsts, conflicted, names, conflicts)
        in_conflict = conflicted[group]
        if mode == "drop":
            kept = np.flatnonzero(~in_conflict)
        else:
            keep = first_label if mode == "first" else _majority(group, labels, in_conflict, first_label)
            kept = np.flatnonzero(~in_conflict | (labels == keep[group]))
        del in_conflict
    duplicates = 0
    if drop_duplicates:
        count = end - first if kept is None else len(kept)
        if store.rest is None:
            # The key is (text, options, label), and a group's kept rows now share one label.
            if kept is None:
                kept = np.sort(firsts)
            else:
                _, at = np.unique(group[kept], return_index=True)
                kept = kept[np.sort(at)]
        else:  # the key has answers or turns too: rows of one group differ by their hash of them
            rows = np.arange(end - first) if kept is None else kept
            rest, their_group = store.rest[first:end][rows], group[rows]
            order = np.lexsort((rest, their_group))
            new = np.ones(len(rows), dtype=bool)
            for key in (their_group, rest):
                ordered = key[order]
                new[1:] &= ordered[1:] == ordered[:-1]
            np.logical_not(new, out=new)
            new[:1] = True
            kept = np.sort(rows[order[new]])
        duplicates = count - len(kept)
    rows = np.arange(first, end, dtype=np.int64) if kept is None else kept.astype(np.int64) + first
    return rows, conflicts, duplicates


def _majority(group: np.ndarray, labels: np.ndarray, in_conflict: np.ndarray, first_label: np.ndarray) -> np.ndarray:
    """Each group's most frequent label (a tie: the label seen first); groups without a conflict keep theirs."""
    rows = np.flatnonzero(in_conflict)
    their_group, their_label = group[rows], labels[rows]
    order = np.lexsort((rows, their_label, their_group))
    their_group, their_label, rows = their_group[order], their_label[order], rows[order]
    starts = np.flatnonzero(np.r_[True, (their_group[1:] != their_group[:-1]) | (their_label[1:] != their_label[:-1])])
    counts = np.diff(np.r_[starts, len(rows)])
    run_group, run_label, run_first = their_group[starts], their_label[starts], rows[starts]
    best = np.lexsort((run_first, -counts, run_group))  # per group: most rows, then seen first
    winners = best[np.r_[True, run_group[best][1:] != run_group[best][:-1]]]
    keep = first_label.copy()
    keep[run_group[winners]] = run_label[winners]
    return keep


def _conflict_error(store: ExampleStore, first: int, end: int, group: np.ndarray, firsts: np.ndarray,
                    conflicted: np.ndarray, names: list[str], conflicts: int) -> DataError:
    """The error for the conflicting text seen first: its labels, and the first three rows with that text."""
    candidates = np.flatnonzero(conflicted)
    chosen = candidates[np.argmin(firsts[candidates])]
    seen = store.labels[first:end][group == chosen].tolist()
    ((text,),) = store.values(np.array([first + firsts[chosen]]), ("text",))
    places = []
    for other, where in store.values(np.arange(first, end), ("text", "where")):
        if other == text:
            places.append(where)
            if len(places) == 3:
                break
    shown = ", ".join(names[i] if 0 <= i < len(names) else str(i) for i in dict.fromkeys(seen))
    more = f" (and {conflicts - 1} more texts)" if conflicts > 1 else ""
    return DataError(
        f"{excerpt(text)} has different labels: {shown} ({', '.join(places)}){more}",
        "fix the source, or set data.on_conflict = 'first', 'majority' or 'drop'",
    )


def _apportion(total: int, fractions: dict[str, float]) -> dict[str, int]:
    """Integer sizes proportional to `fractions` that sum to `total` (largest remainder)."""
    scale = sum(fractions.values())
    exact = {name: total * f / scale for name, f in fractions.items()}
    sizes = {name: int(value) for name, value in exact.items()}
    for name in sorted(exact, key=lambda n: exact[n] - sizes[n], reverse=True)[: total - sum(sizes.values())]:
        sizes[name] += 1
    return sizes


def _shuffle(values: array, start: int, end: int, rng: random.Random) -> None:
    """``random.shuffle`` of ``values[start:end]`` in place, with exactly the draws it makes (its loop,
    on an array of ints rather than a list of them: 8 bytes an item instead of 36)."""
    randbelow = rng._randbelow
    for i in reversed(range(1, end - start)):
        j = randbelow(i + 1)
        values[start + i], values[start + j] = values[start + j], values[start + i]


def _deal(sizes: list[int]) -> np.ndarray:
    """The part each of ``sum(sizes)`` positions goes to: at every position, the part furthest behind
    its share of the positions dealt so far (the first such part on a tie)."""
    total = sum(sizes)
    if len(sizes) == 1 or not total:
        return np.zeros(total, dtype=np.uint8)
    if len(sizes) == 2 and 2 * total * total < 2**62:
        # Two parts: after d positions the first has had round-half-up(sizes[0] * d / total) of them.
        dealt = np.arange(total + 1, dtype=np.int64)
        had = (2 * sizes[0] * dealt + total) // (2 * total)
        return (np.diff(had) == 0).astype(np.uint8)
    # Each part's lead over its share, times total: sizes[n] * dealt - chosen[n] * total.
    chosen = bytearray(total)
    if len(sizes) == 3:
        first, second, third = sizes
        a = b = c = 0
        for dealt in range(total):
            a += first
            b += second
            c += third
            if a >= b and a >= c:
                a -= total
            elif b >= c:
                b -= total
                chosen[dealt] = 1
            else:
                c -= total
                chosen[dealt] = 2
        return np.frombuffer(chosen, dtype=np.uint8)
    lead = [0] * len(sizes)
    for dealt in range(total):
        for n, size in enumerate(sizes):
            lead[n] += size
        best = max(range(len(sizes)), key=lead.__getitem__)  # the first of the largest
        lead[best] -= total
        chosen[dealt] = best
    return np.frombuffer(chosen, dtype=np.uint8)


def _stratified(
    rows: np.ndarray, labels: np.ndarray, fractions: dict[str, float], rng: random.Random
) -> dict[str, np.ndarray]:
    """Seeded split of ``rows`` into parts of the given fractions, each label shared out in the same proportions.

    Each label's rows (labels in ascending order) are shuffled and laid end to end; then every row
    goes to the part furthest behind its share of the rows dealt so far. Every stretch of the
    sequence, so every label, is thereby divided in the fractions (to within one row), and the part
    sizes are exactly the apportioned ones. Parts keep the source order.
    """
    theirs = labels[rows]
    order = np.argsort(theirs, kind="stable")  # positions, label by label, each label's in row order
    bounds = np.r_[0, np.flatnonzero(np.diff(theirs[order])) + 1, len(order)]
    del theirs
    dealt = array("q")
    dealt.frombytes(order.astype(np.int64).tobytes())
    del order
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        _shuffle(dealt, start, end, rng)
    sequence = np.frombuffer(dealt, dtype=np.int64)
    sizes = _apportion(len(sequence), fractions)
    part = _deal(list(sizes.values()))
    return {name: rows[np.sort(sequence[part == k])] for k, name in enumerate(sizes)}


def split_parts(
    parts: dict[str, np.ndarray], labels: np.ndarray, data: DataConfig, rng: random.Random
) -> dict[str, np.ndarray]:
    """train/validation/test: one source split by `data.split`, or named splits (missing ones carved out of train)."""
    wanted = {s: data.split.get(s, 0.0) for s in SPLITS if data.split.get(s, 0.0) > 0}
    if "all" in parts:
        return _stratified(parts["all"], labels, wanted, rng)
    splits = dict(parts)
    missing = {s: f for s, f in wanted.items() if s not in parts}
    if missing:
        carved = _stratified(parts["train"], labels, {"train": data.split.get("train", 0.0), **missing}, rng)
        splits.update(carved)
    return {s: splits[s] for s in SPLITS if s in splits}


def limit_rows(
    splits: dict[str, np.ndarray], labels: np.ndarray, limit: int | dict[str, int] | None, rng: random.Random
) -> dict[str, np.ndarray]:
    """At most ``limit`` rows of each split (or of the splits ``limit`` names), stratified by label."""
    if limit is None:
        return splits
    caps = limit if isinstance(limit, dict) else dict.fromkeys(splits, limit)
    return {
        name: rows
        if len(rows) <= caps.get(name, len(rows))
        else _stratified(rows, labels, {"keep": caps[name], "rest": len(rows) - caps[name]}, rng)["keep"]
        for name, rows in splits.items()
    }
