"""A stage's prepared data as training, caching and evaluation read it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kdcli.data.prepare import load_prepared, prepare_recipe
from kdcli.recipe import Recipe, Stage
from kdcli.rundir import RunDir


@dataclass
class StageData:
    rows: dict[str, list[dict]]  # split -> normalised rows, each with its index in the split as `idx`
    manifest: dict[str, Any]
    num_classes: int  # classes or options the model scores; 0 for free-text answers
    label_prior: list[float] | None  # the train split's label shares (diversity penalty); None without labels

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]


def stage_data(recipe: Recipe, run: RunDir, stage: Stage, replace: bool = True) -> StageData:
    """The stage's prepared splits (running `prepare` first when they are missing, or stale and
    ``replace`` allows it: readers of a run never replace its data)."""
    from kdcli.runtime import process_state
    from kdcli.tasks import task_kind

    # Under several processes the main one prepares; the others then find it up to date.
    with process_state().main_process_first():
        prepare_recipe(recipe, quiet=True, replace=replace)
    splits, manifest = load_prepared(run, stage.name)
    rows = {name: [_row(row, i, stage) for i, row in enumerate(split.to_list())] for name, split in splits.items()}
    num_classes = task_kind(recipe.task).num_classes(manifest)
    histogram = [0] * num_classes
    for row in rows.get("train", []):
        if 0 <= row["label"] < num_classes:
            histogram[row["label"]] += 1
    total = sum(histogram)
    prior = [count / total for count in histogram] if total else None
    return StageData(rows, manifest, num_classes, prior)


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
