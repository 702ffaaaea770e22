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

A teacher loaded in 8 or 4 bit can be scored ``against="full-precision"``: the same teacher is then loaded
again without quantisation, beside it, and ``against`` records how far the quantised one drifts from it,
on the same rows: its own metrics, how often the two answer the same, and over every scored unit (a row's
classes or options; generate: each gold answer token, teacher-forced, over the vocabulary) the KL
divergence KL(full || quantised) in nats, how often their most likely class or token is the same, and
the largest logit difference (as `kd export` checks an export).
That is what a cache made by the quantised teacher changes for the student.
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
from kdcli.roles import Role, load, load_teacher, result_header, teacher_role
from kdcli.rundir import RunDir, write_json
from kdcli.tasks import cut_warning, task_kind

if TYPE_CHECKING:
    from rich.console import Console

    from kdcli.models import TaskModel
    from kdcli.tasks.base import TaskKind


AGAINST = ("full-precision",)


def evaluate_role(recipe: Recipe, role: Role, split: str | None = None, console: "Console | None" = None,
                  data_file: Path | None = None, data_format: str | None = None,
                  against: str | None = None) -> dict[str, Any]:
    """Score ``role`` on ``split`` (default ``eval.split``) of the last stage, or on every row of
    ``data_file`` (in ``data_format``, default the stage's; saved apart, see ``RunDir.eval_file``),
    save and return the result; ``against`` (see the module docstring) adds the drift from a reference."""
    from kdcli.roles import check
    from kdcli.runtime import describe as environment

    if against is not None:
        _check_against(recipe, role, against)
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
    if against is not None:
        reference = load_teacher(recipe, run, role.name, data.num_classes, full_precision=True)
        place(reference)
        theirs = answer(reference, f"{role} in full precision")
        result["against"] = {
            "reference": against, "quantization": result["quantization"],
            "metrics": task.score(rows, theirs, data.manifest)["metrics"],
            "agreement": sum(map(task.same_answer, mine, theirs)) / len(rows),
            **_drift(task, model, reference, rows, cfg.batch_size, stage.data.max_length, stage.data.template,
                     stage.data.answer_max_length),
        }
        del reference
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


def _check_against(recipe: Recipe, role: Role, against: str) -> None:
    if against not in AGAINST:
        raise KdError(f"--against {against!r} is not a reference kd knows", f"use one of: {', '.join(AGAINST)}")
    spec = recipe.teachers.get(role.name) if role.kind == "teacher" else None
    if spec is None or not (spec.load_in_8bit or spec.load_in_4bit):
        raise KdError(f"--against full-precision compares a teacher loaded in 8 or 4 bit with itself unquantised; "
                      f"{role} is not quantised",
                      "score a teacher whose recipe table sets load_in_8bit or load_in_4bit, or drop --against")


def _drift(task: "TaskKind", model: "TaskModel", reference: "TaskModel", rows: list[dict], batch_size: int,
           max_length: int, template: str | None, answer_max_length: int) -> dict[str, Any]:
    """How far ``model``'s distributions are from ``reference``'s over every scored unit of ``rows``: the mean
    KL(reference || model) in nats, and the share of units whose most likely class or token is the same."""
    from kdcli import losses
    from kdcli.batching import gather, length_sorted_batches, measured_lengths

    lengths = measured_lengths(rows, lambda part: task.lengths(reference, part, max_length, template,
                                                               answer_max_length))
    kl_sum, same, units, largest = 0.0, 0, 0, 0.0
    for index in length_sorted_batches(lengths, batch_size):
        chunk = gather(rows, index)
        theirs = task.answer_logits(reference, chunk, max_length, template, answer_max_length)
        mine = task.answer_logits(model, chunk, max_length, template, answer_max_length).to(theirs.device)
        kl_sum += float(losses.divergence(mine, theirs.softmax(-1), "forward_kl")) * len(theirs)
        same += int((mine.argmax(-1) == theirs.argmax(-1)).sum())
        units += len(theirs)
        largest = max(largest, float((mine - theirs).abs().max()))
    # Every scored row has a unit (a row; generate: at least its EOS). KL >= 0; two nearly equal
    # distributions can sum to -1e-8 in float32.
    return {"unit": task.drift_unit, "units": units, "kl": max(0.0, kl_sum / units), "top1_agreement": same / units,
            "max_abs_difference": largest}
