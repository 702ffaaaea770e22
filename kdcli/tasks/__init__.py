"""Task kinds, one module each: ``classify``, ``choice`` and ``generate``.

``task_kind(name)`` turns the recipe's ``task`` string into its kind, once, where a command
starts; everything below works with the kind's methods (see ``kdcli.tasks.base``).
"""

from __future__ import annotations

from kdcli.tasks.base import TaskKind, TeacherBatch, cut_warning, part_weights, pooled_layers
from kdcli.tasks.choice import Choice
from kdcli.tasks.classify import Classify
from kdcli.tasks.generate import Generate

KINDS: dict[str, TaskKind] = {kind.name: kind for kind in (Classify(), Choice(), Generate())}


def task_kind(name: str) -> TaskKind:
    """The kind of a task name (`classify`, `choice`, `generate`), as the recipe schema allows them."""
    return KINDS[name]


__all__ = ["KINDS", "TaskKind", "TeacherBatch", "cut_warning", "part_weights", "pooled_layers", "task_kind"]
