"""Cleaning and splitting: label conflicts, exact duplicates, seeded stratified splits, limits."""

from __future__ import annotations

import random
from collections import Counter

from kdcli.data.fields import Example
from kdcli.data.files import SPLITS, excerpt
from kdcli.errors import DataError
from kdcli.recipe import DataConfig


def resolve_conflicts(examples: list[Example], mode: str, names: list[str]) -> tuple[list[Example], int]:
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
            f"{excerpt(text)} has different labels: {shown} ({', '.join(places)}){more}",
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


def dedupe(examples: list[Example]) -> tuple[list[Example], int]:
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


def split_parts(parts: dict[str, list[Example]], data: DataConfig, rng: random.Random) -> dict[str, list[Example]]:
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


def limit_rows(splits: dict[str, list[Example]], limit: int | None, rng: random.Random) -> dict[str, list[Example]]:
    if limit is None:
        return splits
    return {
        name: examples
        if len(examples) <= limit
        else _stratified(examples, {"keep": limit, "rest": len(examples) - limit}, rng)["keep"]
        for name, examples in splits.items()
    }
