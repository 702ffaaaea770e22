"""Roles: the models a run makes or uses, named once on the command line and parsed once here.

A role is ``student`` (distilled from every teacher), ``dataset`` (the same student trained on
labels alone), ``student:NAME`` (taught by teacher NAME alone), ``baseline`` (the student before
training), ``teacher:NAME``, ``export:ROLE-FORMAT`` (a trained role as `kd export` wrote it in
FORMAT: ``export:student-onnx-int8``, ``export:student:NAME-torch-int8``), or any model reference (a
path, a Hub id, ``package:...``).
``Role.parse`` turns the text into a value; everything else here answers questions about it: has
its model been made (``check``), load it (``load``), describe it in a table (``describe``), and
where its weights are (``saved_dir``). The teacher and student loaders the roles need
(``teacher_spec``, ``load_teacher``, ``initial_student``) live here too, for the commands above.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.errors import ModelError
from kdcli.exported import FORMATS
from kdcli.recipe import ModelSpec, Recipe, did_you_mean
from kdcli.rundir import RunDir

if TYPE_CHECKING:
    from kdcli.models import TaskModel

TRAINED = ("student", "dataset", "solo")


@dataclass(frozen=True)
class Role:
    """``kind`` is student, dataset, solo (``student:NAME``), baseline, teacher, export or model; ``name`` is the
    teacher of a solo or teacher role, the exported role (its text) of an export, or the reference of a model role;
    ``format`` is an export's (empty where the text names none of ``exported.FORMATS``)."""

    kind: str
    name: str = ""
    format: str = ""

    @classmethod
    def parse(cls, text: str) -> "Role":
        prefix, colon, rest = text.partition(":")
        if colon and prefix == "teacher":
            return cls("teacher", rest)
        if colon and prefix == "student":
            return cls("solo", rest)
        if colon and prefix == "export":
            # Formats do not end one another ("-onnx" is no ending of "-onnx-int8"), so at most one matches.
            fmt = next((f for f in FORMATS if rest.endswith(f"-{f}")), "")
            return cls("export", rest.removesuffix(f"-{fmt}") if fmt else rest, fmt)
        if text in ("student", "dataset", "baseline"):
            return cls(text)
        return cls("model", text)

    def __str__(self) -> str:
        if self.kind == "teacher":
            return f"teacher:{self.name}"
        if self.kind == "solo":
            return f"student:{self.name}"
        if self.kind == "export":
            return f"export:{self.name}-{self.format}" if self.format else f"export:{self.name}"
        return self.name if self.kind == "model" else self.kind

    @property
    def trained(self) -> bool:
        """`kd distill` trains this role's model (into runs/NAME/ROLE/)."""
        return self.kind in TRAINED

    @property
    def teacher(self) -> str | None:
        """The teacher a teacher role names, or that a solo student is taught by."""
        return self.name if self.kind in ("teacher", "solo") else None

    @property
    def distill_option(self) -> str:
        """The `kd distill` option that trains this role."""
        return {"student": "", "dataset": " --no-teachers"}.get(self.kind, f" --teacher {self.name}")

    @property
    def source(self) -> "Role":
        """The role an export was written from."""
        return Role.parse(self.name)


STUDENT = Role("student")
DATASET = Role("dataset")
BASELINE = Role("baseline")


def solo_role(name: str) -> Role:
    return Role("solo", name)


def teacher_role(name: str) -> Role:
    return Role("teacher", name)


# --------------------------------------------------------------------------- teachers and students


def require_teacher(recipe: Recipe, name: str) -> None:
    if name not in recipe.teachers:
        raise ModelError(f"no teacher named '{name}' in the recipe" + did_you_mean(name, list(recipe.teachers)),
                         f"use one of: {', '.join(recipe.teachers) or '(none)'}")


def teacher_spec(recipe: Recipe, run: RunDir, name: str) -> ModelSpec:
    """The teacher as it will be used: a fine-tuned teacher is read from the run directory."""
    spec = recipe.teachers[name]
    if spec.finetune is None:
        return spec
    # The fine-tuned weights already hold the adapter (if any) it was fine-tuned from.
    return spec.model_copy(update={"ref": str(run.teacher(name)), "revision": None, "gguf_file": None,
                                   "adapter": None})


def _require_finetuned(recipe: Recipe, run: RunDir, name: str) -> None:
    if recipe.teachers[name].finetune is not None and not (run.teacher(name) / "done.json").is_file():
        raise ModelError(
            f"teacher '{name}' has a finetune table but has not been fine-tuned yet",
            "run `kd distill RECIPE` or `kd run RECIPE`, which fine-tune it first",
        )


def load_teacher(recipe: Recipe, run: RunDir, name: str, num_classes: int,
                 full_precision: bool = False) -> "TaskModel":
    """Teacher ``name`` as the recipe loads it; with ``full_precision``, without its load_in_8bit/4bit."""
    from kdcli.models import load_task_model

    _require_finetuned(recipe, run, name)
    spec = teacher_spec(recipe, run, name)
    if full_precision:
        spec = spec.model_copy(update={"load_in_8bit": False, "load_in_4bit": False})
    return load_task_model(spec, recipe.task, num_classes)


def initial_student(recipe: Recipe, run: RunDir, num_classes: int, previous: Path | None) -> "TaskModel":
    """Stage 1 starts from the recipe's student (pretrained or cut from a teacher); later stages from the
    previous best."""
    from kdcli.models import load_task_model, student_from_teacher
    from kdcli.runtime import seed_everything

    seed_everything(recipe.seed)  # a student with a new head draws it while loading
    if previous is not None:
        student = load_task_model(_saved_student(recipe, previous), recipe.task, num_classes)
    elif recipe.student.from_teacher:
        # Cut from the unquantised weights: a student trains in full precision, and int8/NF4 blocks cannot be copied.
        teacher = load_teacher(recipe, run, recipe.student.from_teacher, num_classes, full_precision=True)
        student = student_from_teacher(teacher, recipe.student.layers)
    else:
        student = load_task_model(recipe.student, recipe.task, num_classes)
    if recipe.student.lora is None:
        return student
    from dataclasses import replace

    from kdcli.lora import with_lora

    return replace(student, model=with_lora(student.model, student.kind, recipe.student.lora))


def _saved_student(recipe: Recipe, path: Path) -> ModelSpec:
    """The recipe's student spec, pointed at weights kd saved."""
    return recipe.student.model_copy(update={"ref": str(path), "from_teacher": None, "layers": [],
                                             "revision": None, "gguf_file": None})


# --------------------------------------------------------------------------- what a role is


def check(recipe: Recipe, role: Role) -> None:
    """Raise, before any work, when the model a role names has not been made yet (or, for an export, when its
    files are damaged or its source has been trained again since)."""
    run = RunDir.for_recipe(recipe)
    if role.kind == "export":
        _check_export(run, role)
        return
    if role.teacher is not None:
        require_teacher(recipe, role.teacher)
    if role.trained:
        if not (run.final(role) / "config.json").is_file():
            raise ModelError(f"there is no trained {role} model at {run.final(role)}",
                             f"run `kd distill RECIPE{role.distill_option}` first")
        return
    origin = recipe.student.from_teacher if role.kind == "baseline" else role.teacher
    if origin is not None:
        _require_finetuned(recipe, run, origin)


def require_exportable(role: Role) -> None:
    """`kd export` writes the models kd trained."""
    if not role.trained:
        raise ModelError(f"{role} is not a model kd trained, and only those are exported",
                         "export student, dataset or student:NAME (`kd distill` trains them)")


def _check_export(run: RunDir, role: Role) -> None:
    from kdcli.exported import whole
    from kdcli.models import weights_fingerprint

    if not role.format:
        raise ModelError(f"'{role}' names no export format",
                         f"write export:ROLE-FORMAT, FORMAT one of {', '.join(FORMATS)}: export:student-onnx-int8")
    source = role.source
    require_exportable(source)
    folder = run.export(source, role.format)
    again = f"run `kd export RECIPE --model {source} --format {role.format}`"
    manifest, damage = whole(folder)
    if manifest is None:
        raise ModelError(f"{folder} is damaged ({damage})" if damage else f"there is no {role.format} export of "
                         f"{source} at {folder}", again)
    made = run.final(source)
    if (made / "config.json").is_file() and weights_fingerprint(made) != manifest["source"]["weights"]:
        raise ModelError(f"{folder} was exported from another {source} model than the one in {made} "
                         "(it was trained again since)", again)


def load(recipe: Recipe, role: Role, num_classes: int) -> "TaskModel":
    """The model a role names, checked first (see ``check``)."""
    from kdcli.models import load_task_model

    check(recipe, role)
    run = RunDir.for_recipe(recipe)
    if role.kind == "export":
        from kdcli.exported import load as load_export

        model = load_export(run.export(role.source, role.format))
        if model.num_classes != num_classes:
            raise ModelError(f"{role} scores {model.num_classes} classes or options, the data {num_classes}",
                             f"export {role.source} again from the model trained on this data")
        return model
    if role.trained:
        return load_task_model(_saved_student(recipe, run.final(role)), recipe.task, num_classes)
    if role.kind == "baseline":
        return initial_student(recipe, run, num_classes, previous=None)
    if role.kind == "teacher":
        return load_teacher(recipe, run, role.name, num_classes)
    return load_task_model(ModelSpec(ref=role.name), recipe.task, num_classes)


def describe(recipe: dict[str, Any], role: Role) -> str:
    """What a role is, in a table cell: a Hub id, a path, or how the student was built.

    Takes the recipe as a plain dict (``recipe.resolved.toml`` parsed), so ``kd compare``
    can describe roles of runs whose recipe this kd version would not validate.
    """
    student = recipe.get("student", {})
    if role.kind == "export":
        fmt = FORMATS.get(role.format)
        return f"{describe(recipe, role.source)}, {fmt.label if fmt else 'export'}"
    if role.kind == "teacher":
        spec = recipe.get("teachers", {}).get(role.name, {})
        ref = _short_ref(spec.get("ref", "?"))
        return f"{ref} (fine-tuned)" if spec.get("finetune") else ref
    if role.kind == "model":
        return role.name
    base = (_short_ref(student["ref"]) if student.get("ref")
            else f"{student.get('from_teacher')} layers {student.get('layers')}")
    if role.kind == "solo":
        return f"{base}, distilled from {role.name} alone"
    return base + {"baseline": "", "student": ", distilled", "dataset": ", labels only"}[role.kind]


def result_header(recipe: Recipe, role: Role, model: "TaskModel", stage: str, split: str) -> dict[str, Any]:
    """What every eval and bench result says about the model it measured and the data it ran on."""
    from kdcli.models import parameter_count, weight_quantization

    return {"role": str(role), "model": describe(recipe.model_dump(mode="json"), role),
            "ref": str(model.model.name_or_path), "task": recipe.task, "stage": stage, "split": split,
            "parameters": parameter_count(model), "quantization": weight_quantization(model.model)}


def _short_ref(ref: str) -> str:
    """A local directory by its name (the full path is in ``ref``); Hub ids and package refs unchanged."""
    if ref.startswith(("/", ".", "~")) or "\\" in ref:
        return ref.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return ref


def saved_dir(recipe: Recipe, run: RunDir, role: Role) -> Path | None:
    """The directory a role's weights are loaded from, when there is one on this machine."""
    from kdcli.models import resolve_ref

    if role.trained:
        return run.final(role)
    if role.kind == "export":
        return run.export(role.source, role.format)
    if role.kind == "baseline":
        return None  # built in memory (cut from a teacher, or a Hub model's untrained head)
    ref = teacher_spec(recipe, run, role.name).ref if role.kind == "teacher" else role.name
    try:
        path = Path(resolve_ref(ref))
    except ModelError:
        return None
    return path if path.is_dir() else None


def every_role(recipe: Recipe) -> list[Role]:
    """Every teacher, the baseline, the dataset student (with teachers), the single-teacher students and the student."""
    roles = [teacher_role(name) for name in recipe.teachers] + [BASELINE]
    if recipe.teachers:
        roles.append(DATASET)
    return roles + [solo_role(name) for name in recipe.single_teacher_students] + [STUDENT]
