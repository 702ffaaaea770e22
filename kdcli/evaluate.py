"""`kd eval`: score one model on a split and save ``runs/NAME/eval/ROLE.json``.

``evaluate_role`` loads the role, predicts the split of the recipe's LAST stage (the student's
final task), compares with every teacher of that stage, and writes the result. What a model's
answers are and how they are scored is the task kind's (``kdcli.tasks``); the scores themselves
are pure functions (``kdcli.metrics``).

The saved JSON (what ``kd compare`` reads) has: ``role``, ``model`` (a description),
``ref`` (the weights loaded; a baseline cut from a teacher shows that teacher's), ``task``, ``stage``,
``split``, ``data_fingerprint``, ``n``, ``parameters``, ``seconds``, ``examples_per_second``,
``max_new_tokens``, ``inputs_cut`` (a warning or null), ``metrics`` (classify and choice: accuracy,
f1, precision, recall, per_class, confusion, label_names; generate: exact_match, f1, precision,
recall, SQuAD-normalised, best alias per question, and loss, the cross-entropy per gold answer
token), ``shortcut`` (a warning or null), ``answer_histogram`` and ``gold_histogram`` (choice),
``predictions`` (generate), ``agreement`` ({teacher: rate}), ``agreement_skipped``
({teacher: why}), ``disagreements`` and ``env``.
"""

from __future__ import annotations

import functools
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.data.stage import file_data, stage_data
from kdcli.errors import KdError, ModelError
from kdcli.models import place
from kdcli.recipe import Recipe
from kdcli.roles import Role, load, result_header, teacher_role
from kdcli.rundir import RunDir, write_json
from kdcli.tasks import cut_warning, task_kind

if TYPE_CHECKING:
    from rich.console import Console


def evaluate_role(recipe: Recipe, role: Role, split: str | None = None, console: "Console | None" = None,
                  data_file: Path | None = None, data_format: str | None = None) -> dict[str, Any]:
    """Score ``role`` on ``split`` (default ``eval.split``) of the last stage, or on every row of
    ``data_file`` (in ``data_format``, default the stage's; saved apart, see ``RunDir.eval_file``),
    save and return the result."""
    from kdcli.roles import check
    from kdcli.runtime import describe as environment

    check(recipe, role)  # a missing model is reported before any data is prepared
    if data_file is not None and split is not None:
        raise KdError("--data and --split both say what to score", "give one of them")
    split = "file" if data_file is not None else split or recipe.eval.split
    if split == "transfer":
        raise KdError("the transfer split holds unlabelled inputs, which only the teachers label: there is nothing "
                      "in it to score", "score a labelled split: --split test or --split validation")
    task = task_kind(recipe.task)
    run = RunDir.for_recipe(recipe)
    stage = recipe.resolved_stages()[-1]
    if data_file is not None:
        data = file_data(recipe, run, stage, data_file, data_format)
    else:
        data = stage_data(recipe, run, stage, replace=False)
    if split not in data.rows:
        raise KdError(f"stage '{stage.name}' has no '{split}' split (it has: {', '.join(data.rows)})",
                      "pick one with --split, or add it to data.split")
    rows = task.scored_rows(data.rows[split])
    if not rows:
        where = str(data_file) if data_file is not None else f"the {split} split of stage '{stage.name}'"
        raise KdError(f"{where} has nothing to score (no labels or reference answers)",
                      "score another file, or another split with --split")
    cfg = recipe.eval

    def answer(model, who: str) -> list[Any]:
        progress = on_batch = None
        if console is not None:
            from kdcli.progress import phase_progress

            progress = phase_progress(console)
            progress.start()
            bar = progress.add_task(f"{who} on {split}", total=len(rows))
            on_batch = functools.partial(progress.advance, bar)
        try:
            return task.predict(model, rows, cfg.batch_size, stage.data.max_length, stage.data.template,
                                cfg.max_new_tokens, on_batch=on_batch)
        finally:
            if progress is not None:
                progress.stop()

    model = load(recipe, role, data.num_classes)
    device = place(model)
    cut = cut_warning(task, model, rows, stage.data.max_length, stage.data.template, f"{role}, {split}")
    started = time.perf_counter()
    mine = answer(model, str(role))
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        **result_header(recipe, role, model, stage.name, split),
        "data_fingerprint": data.fingerprint,
        **({"data": data.manifest["source"]} if data_file is not None else {}),
        "n": len(rows),
        "seconds": seconds,
        "examples_per_second": len(rows) / seconds,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "max_new_tokens": cfg.max_new_tokens,
        "inputs_cut": cut,
        **task.score(rows, mine, data.manifest),
        "agreement": {},
        "agreement_skipped": {},
        "disagreements": [],
        "env": {**environment(), "device": str(device), "dtype": str(model.model.dtype).removeprefix("torch.")},
    }
    loss = task.gold_loss(model, rows, cfg.batch_size, stage.data.max_length, stage.data.template,
                          stage.data.answer_max_length)
    if loss is not None:
        result["metrics"]["loss"] = loss
    del model  # teachers load next; one model in memory at a time

    for name in stage.teachers or []:
        if role == teacher_role(name):
            continue
        try:
            other = load(recipe, teacher_role(name), data.num_classes)
        except ModelError as exc:
            result["agreement_skipped"][name] = exc.message
            continue
        place(other)
        theirs = answer(other, f"teacher:{name}")
        del other
        same = [task.same_answer(a, b) for a, b in zip(mine, theirs)]
        result["agreement"][name] = sum(same) / len(same)
        for i in [i for i, agree in enumerate(same) if not agree][: cfg.examples]:
            row = rows[i]
            result["disagreements"].append(
                {"teacher": name, **task.disagreement(row, row["label"], theirs[i], mine[i], data.manifest)})
    path = run.eval_file(role, data_file, data.fingerprint) if data_file is not None else run.eval(role)
    write_json(path, result)
    result["path"] = str(path)
    return result
