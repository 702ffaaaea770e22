"""`kd distill`: train a student stage by stage, from its teachers (cached or live) and the gold labels.

Each stage's best student is saved under ``stages/STAGE/ROLE/`` and is where the next stage
starts; the last one becomes the role's final model (``student/``, ``dataset/``,
``student-NAME/``). A stage whose output was made from the same inputs is skipped.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

from rich.console import Console

from kdcli.data.stage import Rows, stage_data
from kdcli.job import Job, Tracking
from kdcli.recipe import Recipe, Stage, fingerprint
from kdcli.roles import DATASET, STUDENT, Role, initial_student, require_teacher
from kdcli.rundir import RunDir, atomic_dir, done_state, mark_done, record_recipe, write_json
from kdcli.tasks import cut_warning, task_kind
from kdcli.teachers import finetune_teachers, open_teachers, preflight
from kdcli.train import JobResult, append_metrics, cannot_resume, identity_changes, run_job


def _fraction(rows: Rows, fraction: float, seed: int) -> Rows:
    """A seeded random share of the rows (at least one); rows keep their `idx` for cache lookups."""
    keep = max(1, round(len(rows) * fraction))
    return rows.share(random.Random(seed).sample(range(len(rows)), keep))


def _stage_identity(recipe: Recipe, stage: Stage, role: Role, data_fingerprint: str | None,
                    previous: str | None) -> dict:
    """Everything that shapes a stage's student: its fingerprint says whether the stage is up to date."""
    teachers = {} if role == DATASET else {n: recipe.teachers[n].model_dump(mode="json") for n in stage.teachers or []}
    return {
        "student": recipe.student.model_dump(mode="json"), "stage": _stage_dump(stage), "role": str(role),
        "teachers": teachers, "data": data_fingerprint, "seed": recipe.seed, "previous": previous,
    }


def _stage_dump(stage: Stage) -> dict:
    """The stage's settings as its identity holds them. A stage without a transfer set leaves the key out,
    as stages did before transfer sets existed: their outputs and checkpoints stay current."""
    dumped = stage.model_dump(mode="json")
    if dumped["data"]["transfer"] is None:
        del dumped["data"]["transfer"]
    return dumped


def _job_identity(identity: dict, train_fraction: float) -> dict:
    """The stage identity as a checkpoint records it: the stage's sections at the top, so that a change
    is named as the recipe names it (``train.lr``, ``loss.alpha``, ``seed``)."""
    rest = {key: value for key, value in identity.items() if key not in ("stage", "data")}
    return {**identity["stage"], **rest, "data_fingerprint": identity["data"], "train_fraction": train_fraction}


def _stages(recipe: Recipe, role: Role, out: RunDir) -> list[tuple[Stage, str]]:
    """Each stage as ``role`` trains it, with the name of its training job (``main``, ``main.dataset``)."""
    stages = []
    for stage in recipe.resolved_stages():
        if role.kind == "solo":
            stage = _solo_stage(recipe, stage, role.name)
        stages.append((stage, stage.name if role == STUDENT else f"{stage.name}.{out.final(role).name}"))
    return stages


def _refuse_a_changed_resume(recipe: Recipe, role: Role, out: RunDir, train_fraction: float) -> None:
    """--resume under a recipe that changed what shaped the checkpoints is refused before anything is
    prepared, fine-tuned or loaded (a new seed would re-split the data first). The data's own
    fingerprint is compared when the job starts (``train.resume_problem``), once it is known."""
    for stage, job_name in _stages(recipe, role, out):
        identity = _job_identity(_stage_identity(recipe, stage, role, None, None), train_fraction)
        changes = identity_changes(out.checkpoints(job_name), identity, ignore=("data_fingerprint", "previous"))
        if changes:
            raise cannot_resume(job_name, out.checkpoints(job_name),
                                "they were made with another recipe; changed: " + "; ".join(changes))


def _solo_stage(recipe: Recipe, stage: Stage, name: str) -> Stage:
    """The stage as a student taught by ``name`` alone sees it: the other teachers dropped, and the
    hidden MSE with them when ``name`` has no layer map (a stage without ``name`` trains on labels)."""
    teachers = [n for n in stage.teachers or [] if n == name]
    loss = stage.loss
    if not teachers:
        loss = loss.model_copy(update={"alpha": 1.0, "beta": 0.0})
    elif recipe.teachers[name].hidden is None:
        loss = loss.model_copy(update={"beta": 0.0})
    return stage.model_copy(update={"teachers": teachers, "loss": loss})


def distill(recipe: Recipe, *, resume: bool = False, role: Role = STUDENT, console: Console | None = None,
            show_progress: bool = True, on_eval=None, train_fraction: float = 1.0,
            workdir: RunDir | None = None) -> list[JobResult]:
    """Run every stage in order for ``role``: `student` (every teacher), `dataset` (labels only) or a
    solo student (teacher NAME alone).

    Data, teachers and caches come from the recipe's run directory; checkpoints, stage outputs,
    the final model and metrics go to ``workdir`` (default: the same directory). `kd tune` runs
    its trials in their own workdirs on ``train_fraction`` of each train split, reporting every
    validation to ``on_eval`` (see ``train.run_job``).
    """
    from kdcli.runtime import check_trackers, describe, make_accelerator

    console = console or Console()
    check_trackers(recipe.log.report_to)  # before any work: preflight may prepare data
    run = RunDir.for_recipe(recipe)
    out = workdir or run
    if role.kind == "solo":
        require_teacher(recipe, role.name)
    if resume:
        _refuse_a_changed_resume(recipe, role, out, train_fraction)
    preflight(recipe, run)
    accelerator = make_accelerator(recipe.train.mixed_precision, recipe.log.report_to, out.logs)
    if role == STUDENT:
        finetune_teachers(recipe, run, accelerator, console)
    else:
        needed = [n for n in (role.teacher, recipe.student.from_teacher) if n]
        finetune_teachers(recipe, run, accelerator, console, names=list(dict.fromkeys(needed)))
    results = []
    previous: Path | None = None
    previous_fingerprint: str | None = None
    for stage, job_name in _stages(recipe, role, out):
        data = stage_data(recipe, run, stage)
        rows = data.rows  # the stage's splits as prepared (and cached); a tune trial trains on a share of train
        if train_fraction < 1.0:
            rows = {**rows, "train": _fraction(rows["train"], train_fraction, recipe.seed)}
        identity = _stage_identity(recipe, stage, role, data.fingerprint, previous_fingerprint)
        wanted = fingerprint(identity) + f"-{train_fraction:g}"
        output = out.stage_output(stage.name, role)
        finished, damage = done_state(output, wanted)
        if finished:
            console.print(f"stage {stage.name} ({role}) is up to date: {output}")
            previous, previous_fingerprint = output, wanted
            continue
        if damage:
            console.print(f"[yellow]stage {stage.name} ({role}): {output} is not whole ({damage}); "
                          "training it again[/]")
        stage_started = time.perf_counter()
        student = initial_student(recipe, run, data.num_classes, previous)
        cut = cut_warning(task_kind(recipe.task), student, rows["train"], stage.data.max_length, stage.data.template,
                          f"stage {stage.name}, train")
        if cut and accelerator.is_main_process:
            console.print(f"[yellow]{cut}[/]")
        loss, sources, taught = stage.loss, {}, {}
        if role == DATASET or not stage.teachers:
            loss = stage.loss.model_copy(update={"alpha": 1.0, "beta": 0.0})
        else:
            taught = open_teachers(recipe, run, stage, data, student, accelerator, console)
            sources = taught.pop("sources")
            if sources:
                console.print("teachers: " + ", ".join(f"{n} ({s})" for n, s in sources.items()))
        # Transfer rows have no label: only a teacher's answers teach from them.
        transfer_share = stage.data.transfer.share if stage.data.transfer is not None and taught else 0.0
        job = Job(
            name=job_name, student=student, rows=rows, loss=loss, train=stage.train, seed=recipe.seed,
            max_length=stage.data.max_length, template=stage.data.template, checkpoint_dir=out.checkpoints(job_name),
            output_dir=output, metrics_path=out.metrics, label_prior=data.label_prior,
            extra_metadata={"role": str(role), "label_names": data.manifest.get("label_names", []),
                            "teachers": sources},
            answer_max_length=stage.data.answer_max_length, identity=_job_identity(identity, train_fraction),
            transfer_share=transfer_share, tracking=Tracking.for_recipe(recipe), **taught,
        )
        result = run_job(job, accelerator, resume=resume, console=console, show_progress=show_progress, on_eval=on_eval)
        if accelerator.is_main_process:
            mark_done(output, {"fingerprint": wanted, "steps": result.steps, "best_metric": result.best_metric,
                               "best_step": result.best_step, "stopped_early": result.stopped_early,
                               "samples_per_second": result.samples_per_second})
        accelerator.wait_for_everyone()
        # The whole stage's pace, beside the optimizer steps' own: validation, saving and setup cost time too.
        result.wall_seconds = time.perf_counter() - stage_started
        if accelerator.is_main_process:
            append_metrics(out.metrics, job_name, {"kind": "done", "step": result.steps, "samples": result.samples,
                                                   "wall_seconds": result.wall_seconds,
                                                   "wall_samples_per_s": result.wall_samples_per_second,
                                                   "samples_per_s": result.samples_per_second})
        results.append(result)
        previous, previous_fingerprint = output, wanted
    if previous is not None and accelerator.is_main_process:
        with atomic_dir(out.final(role)) as tmp:
            shutil.copytree(previous, tmp, dirs_exist_ok=True)
        # Recorded once the run succeeded: a failed command leaves the run as it was.
        record_recipe(recipe, out.resolved_recipe)
        write_json(out.env, describe(accelerator, requested_precision=recipe.train.mixed_precision))
    accelerator.wait_for_everyone()
    return results
