"""Teachers: checked before any work, fine-tuned where the recipe asks, cached (`kd cache-teachers`),
and opened for a stage, each from its cache when it matches, else live.

Everything here lives in the run directory, and each step skips work whose output is already
there and was made from the same inputs (fingerprints in manifests and ``done.json`` files).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from kdcli.data.stage import StageData, stage_data
from kdcli.errors import CacheError, ModelError
from kdcli.job import Job, TeacherSettings, Tracking
from kdcli.recipe import LossConfig, Recipe, Stage, fingerprint
from kdcli.roles import load_teacher, teacher_spec
from kdcli.rundir import RunDir, done_state, mark_done, read_json, record_recipe
from kdcli.tasks import task_kind

if TYPE_CHECKING:
    from kdcli.models import TaskModel


def _first_stage_with(recipe: Recipe, name: str) -> Stage:
    stages = recipe.resolved_stages()
    return next((s for s in stages if name in (s.teachers or [])), stages[0])


def _finetune_fingerprint(recipe: Recipe, name: str, data: StageData) -> str:
    spec = recipe.teachers[name]
    return fingerprint({"teacher": spec.model_dump(mode="json"), "data": data.fingerprint, "seed": recipe.seed})


def finetune_teachers(recipe: Recipe, run: RunDir, accelerator, console: Console,
                      names: list[str] | None = None) -> None:
    """Fine-tune every teacher with a `finetune` table (labels only); reuse a matching earlier result."""
    from rich.markup import escape

    from kdcli.models import load_task_model
    from kdcli.runtime import seed_everything
    from kdcli.train import resume_problem, run_job

    for name in names if names is not None else list(recipe.teachers):
        spec = recipe.teachers[name]
        if spec.finetune is None:
            continue
        stage = _first_stage_with(recipe, name)
        data = stage_data(recipe, run, stage)
        wanted = _finetune_fingerprint(recipe, name, data)
        finished, damage = done_state(run.teacher(name), wanted)
        if finished:
            continue
        if damage:
            console.print(f"[yellow]the fine-tuned teacher {name} in {run.teacher(name)} is not whole ({damage})[/]")
        console.print(f"fine-tuning teacher [bold]{name}[/] on {stage.name}/train ({len(data.rows['train'])} rows)")
        seed_everything(recipe.seed)  # the new classification head is drawn here
        # Fine-tuned in full precision: bitsandbytes' int8 and NF4 weights do not train. load_in_8bit/4bit apply
        # to the fine-tuned copy, when it is cached or used live.
        full = spec.model_copy(update={"load_in_8bit": False, "load_in_4bit": False})
        model = load_task_model(full, recipe.task, data.num_classes, max_length=stage.data.max_length)
        ft = spec.finetune
        train = recipe.train.model_copy(
            update={"epochs": ft.epochs, "lr": ft.lr, "batch_size": ft.batch_size, "grad_accum": 1,
                    "warmup_ratio": ft.warmup_ratio, "weight_decay": ft.weight_decay, "max_steps": None}
        )
        job = Job(
            name=f"teacher.{name}", student=model, rows=data.rows, loss=LossConfig(alpha=1.0), train=train,
            seed=recipe.seed, max_length=stage.data.max_length, template=stage.data.template,
            answer_max_length=stage.data.answer_max_length, checkpoint_dir=run.checkpoints(f"teacher.{name}"),
            output_dir=run.teacher(name), metrics_path=run.metrics, label_prior=data.label_prior,
            extra_metadata={"label_names": data.manifest.get("label_names", [])},
            identity={"teacher": spec.model_dump(mode="json"), "data": data.fingerprint, "seed": recipe.seed,
                      "train": train.model_dump(mode="json")},
            tracking=Tracking.for_recipe(recipe),
        )
        # A teacher's fine-tuning always continues where it stopped, unless that would not be exact.
        problem = resume_problem(job)
        if problem:
            console.print(f"[yellow]the checkpoints of {job.name} cannot be resumed ({escape(problem)}): "
                          "fine-tuning from the start[/]")
        run_job(job, accelerator, resume=not problem, console=console)
        if accelerator.is_main_process:
            mark_done(run.teacher(name), {"fingerprint": wanted})
        accelerator.wait_for_everyone()


def student_layers(recipe: Recipe) -> int:
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


def settings(recipe: Recipe, stage: Stage, name: str, hidden_layers: list[int]) -> TeacherSettings:
    """How teacher ``name`` is asked in ``stage``."""
    hidden = recipe.teachers[name].hidden
    return TeacherSettings(
        hidden_layers=tuple(sorted(set(hidden_layers))), pooling=hidden.pooling if hidden else "mean",
        max_length=stage.data.max_length, template=stage.data.template, kd_level=stage.loss.kd_level,
        # On-policy: the teacher scores the student's samples live, over the whole vocabulary.
        top_k=None if stage.loss.kd_level == "on_policy" else stage.loss.top_k, temperature=stage.loss.temperature,
        answer_max_length=stage.data.answer_max_length,
    )


def cache_identity(recipe: Recipe, run: RunDir, stage: Stage, name: str,
                   data: StageData) -> tuple[dict[str, Any], TeacherSettings]:
    """Everything a teacher's cached outputs depend on, computed without loading the teacher, and
    the settings a live teacher answers with to match it."""
    from kdcli.cache import expected_manifest
    from kdcli.models import load_config, load_tokenizer, resolve_ref, tokenizer_fingerprint, weights_fingerprint

    spec = teacher_spec(recipe, run, name)
    resolved = Path(resolve_ref(spec.ref, spec.gguf_file))
    # A Hub model is identified by name and revision: hashing it would mean downloading it.
    local = resolved.is_dir()
    weights = (weights_fingerprint(resolved / spec.gguf_file if spec.gguf_file else resolved) if local
               else f"hub:{spec.ref}@{spec.revision or 'main'}")
    if spec.adapter:
        weights += "+" + weights_fingerprint(resolve_ref(spec.adapter, adapter=True))
    loaded_tokenizer = load_tokenizer(spec)
    layers = []
    if stage.loss.beta > 0 and recipe.teachers[name].hidden is not None and task_kind(recipe.task).hidden_states:
        pairs = hidden_pairs(recipe, name, student_layers(recipe), load_config(spec).num_hidden_layers)
        layers = [t for _, t in pairs]
    asked = settings(recipe, stage, name, layers)
    identity = expected_manifest(
        teacher_ref=spec.ref, revision=spec.revision, weights=weights,
        tokenizer=tokenizer_fingerprint(loaded_tokenizer),
        data_fingerprint=data.fingerprint, task=recipe.task, num_classes=data.num_classes,
        quantisation="8bit" if spec.load_in_8bit else "4bit" if spec.load_in_4bit else "none", dtype=spec.dtype,
        settings=asked, vocab_size=len(loaded_tokenizer),
    )
    return identity, asked


def check_vocabularies(recipe: Recipe) -> None:
    """Token-level KD on next-token distributions (generate): every teacher must share the student's
    vocabulary (checked on the tokenizers alone, before any model is loaded); a mismatch suggests
    sequence-level KD."""
    from kdcli.models import check_shared_vocabulary, load_tokenizer

    token_level = task_kind(recipe.task).token_distributions
    names = sorted({n for s in recipe.resolved_stages() if token_level and s.loss.kd_level != "sequence"
                    for n in s.teachers or []})
    if not names:
        return
    origin = recipe.student.from_teacher
    student_tokenizer = load_tokenizer(recipe.teachers[origin] if origin else recipe.student)
    for name in names:
        if name != origin:
            check_shared_vocabulary(student_tokenizer, load_tokenizer(recipe.teachers[name]), name)


def check_chat_templates(recipe: Recipe) -> None:
    """Chat format: the student and every teacher of a chat stage render prompts with their own chat
    template, so each must have one (checked on the tokenizers, before any model is loaded)."""
    from kdcli.models import check_chat_template, load_tokenizer

    chat = [s for s in recipe.resolved_stages() if s.data.chat or s.data.format == "messages"]
    if not chat:
        return
    origin = recipe.student.from_teacher
    check_chat_template(load_tokenizer(recipe.teachers[origin] if origin else recipe.student),
                        f"student {recipe.student.ref or 'cut from ' + str(origin)}")
    for name in sorted({n for s in chat for n in s.teachers or []}):
        check_chat_template(load_tokenizer(recipe.teachers[name]), f"teacher {name} ({recipe.teachers[name].ref})")


def preflight(recipe: Recipe, run: RunDir) -> None:
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
    layers = student_layers(recipe)
    check_vocabularies(recipe)
    check_chat_templates(recipe)
    for stage in recipe.resolved_stages():
        data = stage_data(recipe, run, stage)
        for name in stage.teachers or []:
            check_label_count(recipe.teachers[name], configs[name], recipe.task, data.num_classes)
            if stage.loss.beta > 0:
                hidden_pairs(recipe, name, layers, configs[name].num_hidden_layers)


def cached_rows(data: StageData) -> dict[str, int]:
    """The rows a stage's teacher cache holds, per split."""
    from kdcli.cache import SPLITS

    return {split: len(data.rows[split]) for split in SPLITS if split in data.rows}


def cache_teachers(recipe: Recipe, *, force: bool = False, console: Console | None = None,
                   quiet: bool = False) -> list[dict[str, Any]]:
    """`kd cache-teachers`: build the cache of every teacher of every stage (fine-tuning first where
    asked). Returns one report per cache."""
    from kdcli.cache import LiveTeacher, build_cache, check_cache
    from kdcli.progress import phase_progress
    from kdcli.runtime import check_trackers, from_main_process, make_accelerator

    console = console or Console(stderr=quiet)  # quiet: stdout is kept for the caller's JSON
    check_trackers(recipe.log.report_to)  # before any work: preflight may prepare data
    run = RunDir.for_recipe(recipe)
    preflight(recipe, run)
    accelerator = make_accelerator(recipe.train.mixed_precision, recipe.log.report_to, run.logs)
    finetune_teachers(recipe, run, accelerator, console)
    reports = []
    for stage in recipe.resolved_stages():
        if stage.loss.live_teachers_only:
            if not quiet:
                console.print(f"stage {stage.name}: on-policy, its teachers run live (nothing to cache)")
            continue
        data = stage_data(recipe, run, stage)
        for name in stage.teachers or []:
            path = run.cache(stage.name, name)
            identity, asked = cache_identity(recipe, run, stage, name, data)
            up_to_date = False
            if not force and accelerator.is_main_process:
                try:
                    check_cache(path, identity, name, cached_rows(data))
                    up_to_date = True
                except CacheError as exc:
                    if (path / "manifest.json").exists() and not quiet:
                        console.print(f"[yellow]rebuilding the cache of {name}: {exc.message}[/]")
            # Every process runs a share of a build, so the main process's verdict is every process's.
            if from_main_process(accelerator, up_to_date):
                manifest = read_json(path / "manifest.json")
                reports.append({"stage": stage.name, "teacher": name, "skipped": True, **_report(manifest, path)})
                continue
            model = load_teacher(recipe, run, name, data.num_classes)
            model.model.to(accelerator.device)
            live = LiveTeacher(model, asked)
            splits = {split: data.rows[split] for split in cached_rows(data)}
            progress = None if quiet or not accelerator.is_main_process else phase_progress(console)
            if progress:
                progress.start()
            try:
                # Each process runs its share of the batches; the main process writes the shards and manifest.
                manifest = build_cache(path, live, splits, identity, stage.train.eval_batch_size, progress,
                                       processes=accelerator)
            finally:
                if progress:
                    progress.stop()
            if accelerator.is_main_process:
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
        **({"bytes_per_token": manifest["bytes_per_token"], "tokens": manifest.get("tokens"),
            "top_k": manifest.get("top_k_stored")}
           if "bytes_per_token" in manifest else {}),
    }


def open_teachers(recipe: Recipe, run: RunDir, stage: Stage, data: StageData, student: "TaskModel", accelerator,
                  console: Console) -> dict[str, Any]:
    """The stage's teachers for a ``Job``: each from its cache when it matches, else live; with their
    weights, layer maps, widths and pooling (the Job's fields) and where each came from (``sources``)."""
    from kdcli.cache import CachedTeacher, LiveTeacher, check_cache
    from kdcli.models import check_compatible, load_config

    if not task_kind(recipe.task).hidden_states and stage.loss.beta > 0:
        raise ModelError(f"stage {stage.name}: the hidden-state MSE (loss.beta) is not available for task "
                         f"{recipe.task}", "set loss.beta = 0")
    teachers, pairs, widths, pooling, live_models, sources = {}, {}, {}, {}, {}, {}
    for name in stage.teachers or []:
        identity, asked = cache_identity(recipe, run, stage, name, data)
        pooling[name] = asked.pooling
        path = run.cache(stage.name, name)
        if not stage.loss.live_teachers_only:
            try:
                check_cache(path, identity, name, cached_rows(data))
                teachers[name] = CachedTeacher(path, accelerator.device)
                sources[name] = "cache"
            except CacheError as exc:
                if (path / "manifest.json").exists():
                    console.print(f"[yellow]{exc.message}: using the live teacher ({exc.hint})[/]")
        if name not in teachers:
            model = load_teacher(recipe, run, name, data.num_classes)
            model.model.to(accelerator.device)
            live_models[name] = model
            teachers[name] = LiveTeacher(model, asked)
            sources[name] = "live"
        if stage.loss.beta > 0 and recipe.teachers[name].hidden is not None:
            config = (live_models[name].model.config if name in live_models
                      else load_config(teacher_spec(recipe, run, name)))
            pairs[name] = hidden_pairs(recipe, name, student.num_layers, config.num_hidden_layers)
            widths[name] = config.hidden_size
    check_compatible(student, live_models, {n: p for n, p in pairs.items() if n in live_models})
    return {"teachers": teachers, "teacher_weights": {n: recipe.teachers[n].weight for n in teachers},
            "hidden_pairs": pairs, "teacher_widths": widths, "pooling": pooling, "sources": sources}
