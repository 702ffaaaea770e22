"""From a recipe to training jobs: teachers (fine-tuned, cached or live), students, stages.

The CLI commands call the four entry points here: ``finetune_teachers``,
``cache_teachers``, ``distill`` and ``load_role``. Everything they produce lives in
the run directory, and each step skips work whose output is already there and was
made from the same inputs (fingerprints in manifests and ``done.json`` files).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from kdcli.errors import CacheError, ModelError
from kdcli.recipe import LossConfig, ModelSpec, Recipe, Stage, fingerprint
from kdcli.rundir import RunDir, atomic_dir, read_json, record_recipe, role_filename, write_json

if TYPE_CHECKING:
    from kdcli.models import TaskModel
    from kdcli.train import JobResult

ROLES = ("student", "dataset")


def trained_role(role: str) -> bool:
    """Roles whose model `kd distill` trains: `student`, `dataset` and `student:NAME` (taught by NAME alone)."""
    return role in ROLES or role.startswith("student:")


def solo_teacher(role: str) -> str | None:
    """`student:minilm` -> `minilm`; None for every other role."""
    return role.split(":", 1)[1] if role.startswith("student:") else None


def require_teacher(recipe: Recipe, name: str) -> None:
    if name not in recipe.teachers:
        raise ModelError(f"no teacher named '{name}' in the recipe", f"use one of: {', '.join(recipe.teachers) or '(none)'}")


# --------------------------------------------------------------------------- data


@dataclass
class StageData:
    rows: dict[str, list[dict]]
    manifest: dict[str, Any]
    num_classes: int
    label_prior: list[float] | None

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]


def stage_data(recipe: Recipe, run: RunDir, stage: Stage, console: Console) -> StageData:
    """The stage's prepared splits (running `prepare` first when they are missing or stale)."""
    from kdcli.data import load_prepared, prepare_recipe

    from kdcli.runtime import process_state

    # Under several processes the main one prepares; the others then find it up to date.
    with process_state().main_process_first():
        prepare_recipe(recipe, quiet=True)
    splits, manifest = load_prepared(run, stage.name)
    rows = {name: [dict(row, idx=i) for i, row in enumerate(split.to_list())] for name, split in splits.items()}
    if recipe.task == "classify":
        num_classes = len(manifest["label_names"])
    elif recipe.task == "generate":
        num_classes = 0  # answers are text: no classes, no label prior
    else:
        num_classes = int(manifest["num_options"])
    histogram = [0] * num_classes
    for row in rows.get("train", []):
        if 0 <= row["label"] < num_classes:
            histogram[row["label"]] += 1
    total = sum(histogram)
    prior = [count / total for count in histogram] if total else None
    return StageData(rows, manifest, num_classes, prior)


# --------------------------------------------------------------------------- teachers


def teacher_spec(recipe: Recipe, run: RunDir, name: str) -> ModelSpec:
    """The teacher as it will be used: a fine-tuned teacher is read from the run directory."""
    teacher = recipe.teachers[name]
    if teacher.finetune is None:
        return teacher
    return teacher.model_copy(update={"ref": str(run.teacher(name)), "revision": None, "gguf_file": None})


def _first_stage_with(recipe: Recipe, name: str) -> Stage:
    stages = recipe.resolved_stages()
    return next((s for s in stages if name in (s.teachers or [])), stages[0])


def _finetune_fingerprint(recipe: Recipe, name: str, data: StageData) -> str:
    teacher = recipe.teachers[name]
    return fingerprint({"teacher": teacher.model_dump(mode="json"), "data": data.fingerprint, "seed": recipe.seed})


def finetune_teachers(recipe: Recipe, run: RunDir, accelerator, console: Console, names: list[str] | None = None) -> None:
    """Fine-tune every teacher with a `finetune` table (labels only); reuse a matching earlier result."""
    from kdcli.models import load_task_model
    from kdcli.runtime import seed_everything
    from kdcli.train import Job, run_job

    for name in names if names is not None else list(recipe.teachers):
        teacher = recipe.teachers[name]
        if teacher.finetune is None:
            continue
        stage = _first_stage_with(recipe, name)
        data = stage_data(recipe, run, stage, console)
        wanted = _finetune_fingerprint(recipe, name, data)
        done = run.teacher(name) / "done.json"
        if done.is_file() and read_json(done).get("fingerprint") == wanted:
            continue
        console.print(f"fine-tuning teacher [bold]{name}[/] on {stage.name}/train ({len(data.rows['train'])} rows)")
        seed_everything(recipe.seed)  # the new classification head is drawn here
        model = load_task_model(teacher, recipe.task, data.num_classes, max_length=stage.data.max_length)
        ft = teacher.finetune
        train = recipe.train.model_copy(
            update={"epochs": ft.epochs, "lr": ft.lr, "batch_size": ft.batch_size, "grad_accum": 1,
                    "warmup_ratio": ft.warmup_ratio, "weight_decay": ft.weight_decay, "max_steps": None}
        )
        job = Job(
            name=f"teacher.{name}", student=model, rows=data.rows, loss=LossConfig(alpha=1.0), train=train,
            seed=recipe.seed, max_length=stage.data.max_length, template=stage.data.template,
            answer_max_length=stage.data.answer_max_length, checkpoint_dir=run.checkpoints(f"teacher.{name}"), output_dir=run.teacher(name), metrics_path=run.metrics,
            label_prior=data.label_prior, extra_metadata={"label_names": data.manifest.get("label_names", [])},
        )
        run_job(job, accelerator, resume=True, console=console)
        if accelerator.is_main_process:
            write_json(done, {"fingerprint": wanted})
        accelerator.wait_for_everyone()


def load_teacher(recipe: Recipe, run: RunDir, name: str, num_classes: int) -> "TaskModel":
    from kdcli.models import load_task_model

    spec = teacher_spec(recipe, run, name)
    if recipe.teachers[name].finetune is not None and not (run.teacher(name) / "done.json").is_file():
        raise ModelError(
            f"teacher '{name}' has a finetune table but has not been fine-tuned yet",
            "run `kd distill RECIPE` or `kd run RECIPE`, which fine-tune it first",
        )
    return load_task_model(spec, recipe.task, num_classes)


def _student_layers(recipe: Recipe) -> int:
    """How many blocks the student has, without loading it (for the teachers' layer maps)."""
    from kdcli.models import load_config

    if recipe.student.from_teacher:
        return len(recipe.student.layers)
    return load_config(recipe.student).num_hidden_layers


def hidden_pairs(recipe: Recipe, name: str, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    from kdcli.losses import layer_pairs

    hidden = recipe.teachers[name].hidden
    if hidden is None:
        return []
    try:
        return layer_pairs(hidden.map, student_layers, teacher_layers, hidden.pairs or None)
    except ValueError as exc:
        raise ModelError(f"teachers.{name}.hidden: {exc}", "fix the layer map in the recipe") from None


def cache_identity(recipe: Recipe, run: RunDir, stage: Stage, name: str, data: StageData) -> dict[str, Any]:
    """Everything a teacher's cached outputs depend on, computed without loading the teacher."""
    from kdcli.cache import expected_manifest
    from kdcli.models import load_config, load_tokenizer, resolve_ref, tokenizer_fingerprint, weights_fingerprint

    spec = teacher_spec(recipe, run, name)
    resolved = Path(resolve_ref(spec.ref, spec.gguf_file))
    # A Hub model is identified by name and revision: hashing it would mean downloading it.
    local = resolved.is_dir()
    weights = weights_fingerprint(resolved / spec.gguf_file if spec.gguf_file else resolved) if local else f"hub:{spec.ref}@{spec.revision or 'main'}"
    loaded_tokenizer = load_tokenizer(spec)
    tokenizer = tokenizer_fingerprint(loaded_tokenizer)
    layers = []
    if stage.loss.beta > 0 and recipe.teachers[name].hidden is not None:
        pairs = hidden_pairs(recipe, name, _student_layers(recipe), load_config(spec).num_hidden_layers)
        layers = [t for _, t in pairs]
    quantisation = "8bit" if spec.load_in_8bit else "4bit" if spec.load_in_4bit else "none"
    hidden = recipe.teachers[name].hidden
    generate: dict[str, Any] = {}
    if recipe.task == "generate":
        token = stage.loss.kd_level == "token"
        generate = dict(
            kd_level=stage.loss.kd_level, answer_max_length=stage.data.answer_max_length,
            top_k=stage.loss.top_k if token else None, temperature=stage.loss.temperature if token else None,
            vocab_size=len(loaded_tokenizer) if token else None,
        )
        layers = []
    return expected_manifest(
        teacher_ref=spec.ref, revision=spec.revision, weights=weights, tokenizer=tokenizer,
        data_fingerprint=data.fingerprint, task=recipe.task, num_classes=data.num_classes,
        quantisation=quantisation, dtype=spec.dtype, hidden_layers=layers,
        pooling=hidden.pooling if hidden else "mean", max_length=stage.data.max_length, template=stage.data.template,
        **generate,
    )


def live_teacher(model: "TaskModel", identity: dict[str, Any], pooling: str, stage: Stage):
    """A LiveTeacher answering as the cache described by ``identity`` would (generate: top k at T)."""
    from kdcli.cache import LiveTeacher

    return LiveTeacher(
        model, identity["hidden_layers"], pooling, stage.data.max_length, stage.data.template,
        kd_level=stage.loss.kd_level, top_k=stage.loss.top_k, temperature=stage.loss.temperature,
        answer_max_length=stage.data.answer_max_length,
    )


def check_vocabularies(recipe: Recipe) -> None:
    """generate, token-level KD: every teacher must share the student's vocabulary (checked on
    the tokenizers alone, before any model is loaded); a mismatch suggests sequence-level KD."""
    from kdcli.models import check_shared_vocabulary, load_tokenizer

    if recipe.task != "generate":
        return
    names = sorted({n for s in recipe.resolved_stages() if s.loss.kd_level == "token" for n in s.teachers or []})
    if not names:
        return
    origin = recipe.student.from_teacher
    student_tokenizer = load_tokenizer(recipe.teachers[origin] if origin else recipe.student)
    for name in names:
        if name != origin:
            check_shared_vocabulary(student_tokenizer, load_tokenizer(recipe.teachers[name]), name)


def cache_teachers(recipe: Recipe, *, force: bool = False, console: Console | None = None, quiet: bool = False) -> list[dict[str, Any]]:
    """Build the cache of every teacher of every stage (fine-tuning first where asked). Returns reports."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from kdcli.cache import build_cache, check_cache
    from kdcli.runtime import make_accelerator

    console = console or Console(stderr=quiet)  # quiet: stdout is kept for the caller's JSON
    run = RunDir.for_recipe(recipe)
    preflight(recipe, run, console)
    accelerator = make_accelerator(recipe.train.mixed_precision)
    finetune_teachers(recipe, run, accelerator, console)
    reports = []
    for stage in recipe.resolved_stages():
        data = stage_data(recipe, run, stage, console)
        for name in stage.teachers or []:
            path = run.cache(stage.name, name)
            identity = cache_identity(recipe, run, stage, name, data)
            if not force:
                try:
                    check_cache(path, identity, name)
                    manifest = read_json(path / "manifest.json")
                    reports.append({"stage": stage.name, "teacher": name, "skipped": True, **_report(manifest, path)})
                    continue
                except CacheError as exc:
                    if (path / "manifest.json").exists() and not quiet:
                        console.print(f"[yellow]rebuilding the cache of {name}: {exc.message}[/]")
            if not accelerator.is_main_process:
                continue  # one process writes the cache; the others wait below
            model = load_teacher(recipe, run, name, data.num_classes)
            model.model.to(accelerator.device)
            hidden = recipe.teachers[name].hidden
            live = live_teacher(model, identity, hidden.pooling if hidden else "mean", stage)
            splits = {split: data.rows[split] for split in ("train", "validation") if split in data.rows}
            progress = None if quiet else Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
            )
            if progress:
                progress.start()
            try:
                manifest = build_cache(path, live, splits, identity, stage.train.eval_batch_size, progress)
            finally:
                if progress:
                    progress.stop()
            reports.append({"stage": stage.name, "teacher": name, "skipped": False, **_report(manifest, path)})
            del model, live
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        record_recipe(recipe, run.resolved_recipe)  # once it succeeded: a failed command changes nothing
    return reports


def _report(manifest: dict[str, Any], path: Path) -> dict[str, Any]:
    splits = manifest.get("splits", {})
    return {
        "path": str(path),
        "rows": {k: v["rows"] for k, v in splits.items()},
        "bytes": manifest.get("bytes"),
        "rows_per_second": manifest.get("rows_per_second"),
        "validation_accuracy": splits.get("validation", {}).get("accuracy"),
        **({"bytes_per_token": manifest["bytes_per_token"],
            "tokens": manifest.get("tokens"), "top_k": manifest.get("top_k_stored")}
           if "bytes_per_token" in manifest else {}),
    }


def open_teachers(recipe: Recipe, run: RunDir, stage: Stage, data: StageData, student: "TaskModel", accelerator, console: Console):
    """The stage's teachers, each from its cache when it matches, else live; plus their layer maps."""
    from kdcli.cache import CachedTeacher, check_cache
    from kdcli.models import check_compatible

    if recipe.task == "generate" and stage.loss.beta > 0:
        raise ModelError(f"stage {stage.name}: the hidden-state MSE (loss.beta) is not available for task generate",
                         "set loss.beta = 0")
    teachers, pairs, widths, pooling, live_models, sources = {}, {}, {}, {}, {}, {}
    for name in stage.teachers or []:
        identity = cache_identity(recipe, run, stage, name, data)
        hidden = recipe.teachers[name].hidden
        pooling[name] = hidden.pooling if hidden else "mean"
        path = run.cache(stage.name, name)
        try:
            check_cache(path, identity, name)
            teachers[name] = CachedTeacher(path, accelerator.device)
            sources[name] = "cache"
        except CacheError as exc:
            if (path / "manifest.json").exists():
                console.print(f"[yellow]{exc.message}: using the live teacher ({exc.hint})[/]")
            model = load_teacher(recipe, run, name, data.num_classes)
            model.model.to(accelerator.device)
            live_models[name] = model
            teachers[name] = live_teacher(model, identity, pooling[name], stage)
            sources[name] = "live"
        if stage.loss.beta > 0 and hidden is not None:
            config = live_models[name].model.config if name in live_models else _teacher_config(recipe, run, name)
            pairs[name] = hidden_pairs(recipe, name, student.num_layers, config.num_hidden_layers)
            widths[name] = config.hidden_size
    check_compatible(student, live_models, {n: p for n, p in pairs.items() if n in live_models})
    return teachers, pairs, widths, pooling, sources


def _teacher_config(recipe: Recipe, run: RunDir, name: str):
    from kdcli.models import load_config

    return load_config(teacher_spec(recipe, run, name))


def preflight(recipe: Recipe, run: RunDir, console: Console) -> None:
    """Check label counts, the student's layers and every layer map against the models' configs,
    before any training or caching (configs are cheap; a mistake found after an hour is not)."""
    from kdcli.models import check_label_count, load_config

    configs = {name: load_config(spec) for name, spec in recipe.teachers.items()}
    if recipe.student.from_teacher:
        depth = configs[recipe.student.from_teacher].num_hidden_layers
        wrong = [i for i in recipe.student.layers if i >= depth]
        if wrong:
            raise ModelError(
                f"student.layers {wrong}: teacher '{recipe.student.from_teacher}' has layers 0..{depth - 1}",
                "pick layers that exist in the teacher",
            )
    student_layers = _student_layers(recipe)
    check_vocabularies(recipe)
    for stage in recipe.resolved_stages():
        data = stage_data(recipe, run, stage, console)
        for name in stage.teachers or []:
            check_label_count(recipe.teachers[name], configs[name], recipe.task, data.num_classes)
            if stage.loss.beta > 0:
                hidden_pairs(recipe, name, student_layers, configs[name].num_hidden_layers)


# --------------------------------------------------------------------------- students and stages


def initial_student(recipe: Recipe, run: RunDir, num_classes: int, previous: Path | None) -> "TaskModel":
    """Stage 1 starts from the recipe's student (pretrained or cut from a teacher); later stages from the previous best."""
    from kdcli.models import load_task_model, student_from_teacher
    from kdcli.runtime import seed_everything

    seed_everything(recipe.seed)  # a student with a new head draws it while loading
    if previous is not None:
        spec = recipe.student.model_copy(update={"ref": str(previous), "from_teacher": None, "layers": [],
                                                 "revision": None, "gguf_file": None})
        return load_task_model(spec, recipe.task, num_classes)
    if recipe.student.from_teacher:
        teacher = load_teacher(recipe, run, recipe.student.from_teacher, num_classes)
        return student_from_teacher(teacher, recipe.student.layers)
    return load_task_model(recipe.student, recipe.task, num_classes)


def _fraction(rows: list[dict], fraction: float, seed: int) -> list[dict]:
    """A seeded random share of the rows (at least one); rows keep their `idx` for cache lookups."""
    import random

    keep = max(1, round(len(rows) * fraction))
    return random.Random(seed).sample(rows, keep)


def _stage_fingerprint(recipe: Recipe, stage: Stage, role: str, data: StageData, previous: str | None) -> str:
    teachers = {} if role == "dataset" else {n: recipe.teachers[n].model_dump(mode="json") for n in stage.teachers or []}
    return fingerprint({
        "student": recipe.student.model_dump(mode="json"), "stage": stage.model_dump(mode="json"), "role": role,
        "teachers": teachers, "data": data.fingerprint, "seed": recipe.seed, "previous": previous,
    })


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


def distill(recipe: Recipe, *, resume: bool = False, role: str = "student", console: Console | None = None,
            show_progress: bool = True, on_eval=None, train_fraction: float = 1.0,
            workdir: RunDir | None = None) -> list["JobResult"]:
    """Run every stage in order; `role = "dataset"` trains the same student on labels only,
    `role = "student:NAME"` distils it from teacher NAME alone.

    Data, teachers and caches come from the recipe's run directory; checkpoints, stage outputs,
    the final model and metrics go to ``workdir`` (default: the same directory). `kd tune` runs
    its trials in their own workdirs on ``train_fraction`` of each train split, reporting every
    validation to ``on_eval`` (see ``train.run_job``).
    """
    from kdcli.runtime import describe, make_accelerator
    from kdcli.train import Job, run_job

    console = console or Console()
    run = RunDir.for_recipe(recipe)
    out = workdir or run
    solo = solo_teacher(role)
    if solo is not None:
        require_teacher(recipe, solo)
    preflight(recipe, run, console)
    accelerator = make_accelerator(recipe.train.mixed_precision)
    if role == "student":
        finetune_teachers(recipe, run, accelerator, console)
    else:
        needed = [n for n in (solo, recipe.student.from_teacher) if n]
        finetune_teachers(recipe, run, accelerator, console, names=list(dict.fromkeys(needed)))
    results = []
    previous: Path | None = None
    previous_fingerprint: str | None = None
    for stage in recipe.resolved_stages():
        if solo is not None:
            stage = _solo_stage(recipe, stage, solo)
        data = stage_data(recipe, run, stage, console)
        if train_fraction < 1.0:
            data.rows["train"] = _fraction(data.rows["train"], train_fraction, recipe.seed)
        wanted = _stage_fingerprint(recipe, stage, role, data, previous_fingerprint) + f"-{train_fraction:g}"
        output = out.stage_output(stage.name, role)
        done = output / "done.json"
        if done.is_file() and read_json(done).get("fingerprint") == wanted:
            console.print(f"stage {stage.name} ({role}) is up to date: {output}")
            previous, previous_fingerprint = output, wanted
            continue
        student = initial_student(recipe, run, data.num_classes, previous)
        loss, teachers = stage.loss, {}
        pairs, widths, pooling, sources = {}, {}, {}, {}
        if role == "dataset" or not stage.teachers:
            loss = stage.loss.model_copy(update={"alpha": 1.0, "beta": 0.0})
        else:
            teachers, pairs, widths, pooling, sources = open_teachers(recipe, run, stage, data, student, accelerator, console)
            if sources:
                console.print("teachers: " + ", ".join(f"{n} ({s})" for n, s in sources.items()))
        job_name = stage.name if role == "student" else f"{stage.name}.{role_filename(role)}"
        job = Job(
            name=job_name,
            student=student, rows=data.rows, loss=loss, train=stage.train, seed=recipe.seed,
            max_length=stage.data.max_length, template=stage.data.template,
            checkpoint_dir=out.checkpoints(job_name),
            output_dir=output, metrics_path=out.metrics, teachers=teachers,
            teacher_weights={n: recipe.teachers[n].weight for n in teachers},
            hidden_pairs=pairs, teacher_widths=widths, pooling=pooling, label_prior=data.label_prior,
            extra_metadata={"role": role, "label_names": data.manifest.get("label_names", []), "teachers": sources},
            answer_max_length=stage.data.answer_max_length,
        )
        result = run_job(job, accelerator, resume=resume, console=console, show_progress=show_progress, on_eval=on_eval)
        if accelerator.is_main_process:
            write_json(done, {"fingerprint": wanted, "steps": result.steps, "best_metric": result.best_metric,
                              "best_step": result.best_step, "stopped_early": result.stopped_early,
                              "samples_per_second": result.samples_per_second})
        accelerator.wait_for_everyone()
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



def check_role(recipe: Recipe, role: str) -> None:
    """Raise, before any work, when the model a role names has not been made yet."""
    run = RunDir.for_recipe(recipe)
    teacher = role.split(":", 1)[1] if role.startswith("teacher:") else solo_teacher(role)
    if teacher is not None:
        require_teacher(recipe, teacher)
    if trained_role(role):
        if not (run.final(role) / "config.json").is_file():
            option = {"student": "", "dataset": " --no-teachers"}.get(role, f" --teacher {teacher}")
            raise ModelError(f"there is no trained {role} model at {run.final(role)}", f"run `kd distill RECIPE{option}` first")
        return
    if role == "baseline" and recipe.student.from_teacher:
        teacher = recipe.student.from_teacher
    if teacher is not None and recipe.teachers[teacher].finetune and not (run.teacher(teacher) / "done.json").is_file():
        raise ModelError(
            f"teacher '{teacher}' has a finetune table but has not been fine-tuned yet",
            "run `kd distill RECIPE` or `kd run RECIPE`, which fine-tune it first",
        )


def load_role(recipe: Recipe, role: str, num_classes: int) -> "TaskModel":
    """The model a role names: `student`, `dataset`, `student:NAME`, `baseline` (the student before
    training), `teacher:NAME`, or any model reference (a path, a Hub id, `package:...`)."""
    from kdcli.models import load_task_model

    check_role(recipe, role)
    run = RunDir.for_recipe(recipe)
    if trained_role(role):
        spec = recipe.student.model_copy(update={"ref": str(run.final(role)), "from_teacher": None, "layers": [],
                                                 "revision": None, "gguf_file": None})
        return load_task_model(spec, recipe.task, num_classes)
    if role == "baseline":
        return initial_student(recipe, run, num_classes, previous=None)
    if role.startswith("teacher:"):
        return load_teacher(recipe, run, role.split(":", 1)[1], num_classes)
    return load_task_model(ModelSpec(ref=role), recipe.task, num_classes)


def _inputs_of(recipe: Recipe, run: RunDir, role: str) -> list[Path]:
    """Files whose change makes a role's eval/bench result stale."""
    inputs = [run.resolved_recipe, run.data(recipe.resolved_stages()[-1].name) / "manifest.json"]
    if trained_role(role):
        inputs.append(run.final(role) / "done.json")
    elif role.startswith("teacher:"):
        inputs.append(run.teacher(role.split(":", 1)[1]) / "done.json")
    elif role == "baseline" and recipe.student.from_teacher:
        inputs.append(run.teacher(recipe.student.from_teacher) / "done.json")
    return [p for p in inputs if p.exists()]


def _fresh(result: Path, inputs: list[Path]) -> bool:
    return result.is_file() and all(result.stat().st_mtime >= p.stat().st_mtime for p in inputs)


def run_all(recipe: Recipe, console: Console | None = None) -> Path:
    """`kd run`: prepare, fine-tune and cache teachers, distil (with and without teachers), evaluate
    and benchmark every role, then compare. Each step skips what is already done and current.
    Returns the run directory."""
    from kdcli.bench import bench_role
    from kdcli.data import prepare_recipe
    from kdcli.evaluate import evaluate_role
    from kdcli.report import collect_run, print_cache_summary, print_compare, print_distill_summary, print_prepare_summary

    console = console or Console()
    run = RunDir.for_recipe(recipe)

    def step(title: str) -> None:
        console.rule(f"[bold]{title}")

    step("prepare")
    print_prepare_summary(prepare_recipe(recipe))
    if recipe.teachers:
        step("teachers: fine-tune and cache")
        print_cache_summary(cache_teachers(recipe, console=console), console)
        step("distil: student trained on the dataset alone")
        print_distill_summary(distill(recipe, role="dataset", console=console), console)
    step("distil: student")
    print_distill_summary(distill(recipe, console=console), console)
    solos = [f"student:{name}" for name in recipe.single_teacher_students]
    for role in solos:
        step(f"distil: student taught by {solo_teacher(role)} alone")
        print_distill_summary(distill(recipe, role=role, console=console), console)

    roles = [f"teacher:{name}" for name in recipe.teachers] + ["baseline"]
    roles += ["dataset", *solos, "student"] if recipe.teachers else ["student"]
    step("evaluate and benchmark")
    for role in roles:
        inputs = _inputs_of(recipe, run, role)
        if _fresh(run.eval(role), inputs):
            console.print(f"eval {role}: up to date")
        else:
            result = evaluate_role(recipe, role, console=console)
            metrics = result["metrics"]
            if "accuracy" in metrics:
                console.print(f"eval {role}: accuracy {metrics['accuracy']:.4f}")
            else:
                console.print(f"eval {role}: exact match {metrics['exact_match']:.4f}, token F1 {metrics['f1']:.4f}")
        if _fresh(run.bench(role), inputs):
            console.print(f"bench {role}: up to date")
        else:
            result = bench_role(recipe, role, console=console)
            console.print(f"bench {role}: done")
    step("compare")
    print_compare([collect_run(run.root)], console)
    return run.root
