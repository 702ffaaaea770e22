"""The `kd` command line: thin commands over the engine modules.

Heavy imports (torch, transformers, datasets) happen inside the commands so that
`kd --help` answers at once. Every command goes through one error boundary:
a KdError prints `error:` and `hint:` and exits 1 without a traceback
(KD_DEBUG=1 shows it); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional, TypeVar

import typer

from kdcli import __version__
from kdcli.errors import Interrupted, KdError

app = typer.Typer(
    name="kd",
    help="Distil large language models into small, fast ones for one domain, and measure what the student keeps.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)

RecipeArg = Annotated[Path, typer.Argument(help="The TOML recipe.", show_default=False, metavar="RECIPE")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set", help="Override a recipe key: --set train.lr=3e-5 (repeatable; values are TOML).", show_default=False,
        metavar="KEY=VALUE",
    ),
]
# Flags show no value type (metavar ""): Typer would print <bool> where nothing is typed.
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.", metavar="")]

F = TypeVar("F", bound=Callable[..., Any])


def _error_boundary(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            from kdcli.rundir import file_error

            # The atomic writers name the output they were writing; this catches every other write (and
            # read) the user can fix: a full disk, a read-only folder, a file in the way, a symlink loop.
            error = None if os.environ.get("KD_DEBUG") else file_error(exc)
            if error is None:
                raise
            _print_error(error)
            raise typer.Exit(1) from None
        except KdError as exc:
            if os.environ.get("KD_DEBUG"):
                raise
            _print_error(exc)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (see main)
            if os.environ.get("KD_DEBUG"):
                raise
            _print_error(exc if isinstance(exc, Interrupted) else Interrupted(
                "interrupted", "every output is written whole or not at all: run the command again to go on"))
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _print_error(exc: KdError | Interrupted) -> None:
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    err.print(f"[bold red]error:[/] {escape(exc.message)}")
    if exc.hint:
        err.print(f"[bold]hint:[/] {escape(exc.hint)}")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.",
                           metavar="")
    ] = False,
) -> None:
    """Distil large language models into small, fast ones for one domain, and measure what the student keeps."""


def _load(recipe_path: Path, overrides: list[str] | None):
    from kdcli import recipe

    return recipe.load(recipe_path, overrides or [])


@contextmanager
def _locked(recipe) -> Iterator[None]:
    """The run's lock, held by every command that writes into the run directory. When the command
    succeeds, the cards of the run's models are written again from what it left (``kdcli.card``)."""
    from kdcli.rundir import RunDir, run_lock

    with run_lock(RunDir.for_recipe(recipe)):
        yield
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, the main process writes them
            from kdcli.card import write_cards

            write_cards(recipe)


def _record(recipe, replace: bool = True) -> None:
    from kdcli.rundir import RunDir, record_recipe

    record_recipe(recipe, RunDir.for_recipe(recipe).resolved_recipe, replace=replace)


def _emit_json(payload: Any) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str))


@app.command()
@_error_boundary
def check(recipe_path: RecipeArg, overrides: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Validate a recipe (and overrides) without running anything; print what it would do."""
    from kdcli import recipe as recipe_mod
    from kdcli.errors import RecipeError
    from kdcli.rundir import RunDir
    from kdcli.runtime import check_trackers

    try:
        recipe = _load(recipe_path, overrides)
    except RecipeError as exc:
        exc.hint = exc.hint.replace("; `kd check RECIPE` validates without running anything", "")  # this is kd check
        raise
    check_trackers(recipe.log.report_to)
    run = RunDir.for_recipe(recipe)
    stages = recipe.resolved_stages()
    from kdcli.data.files import source_files, transfer_files
    from kdcli.models import offline_problem

    for stage in stages:  # a missing data file fails here, not an hour into `kd run`
        source_files(stage.data)
        transfer_files(stage.data)
    specs = [("student", recipe.student), *((f"teacher {n}", t) for n, t in recipe.teachers.items())]
    warnings = [f"{who}: {problem}" for who, spec in specs if spec.ref
                and (problem := offline_problem(spec.ref, spec.gguf_file, spec.revision))]
    if as_json:
        from kdcli.report import last_transfer

        # Each transfer set as last prepared (None: not yet, or with other settings): check reads no data.
        transfer = {stage.name: last_transfer(stage, run)[1] for stage in stages if stage.data.transfer}
        _emit_json({"ok": True, "run_dir": str(run.root), "recipe": recipe.model_dump(mode="json"),
                    "warnings": warnings, **({"transfer": transfer} if transfer else {})})
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from kdcli.report import print_transfer_plan

    console = Console()
    table = Table(title=f"{recipe_path}: valid ({recipe.task})", show_lines=False)
    table.add_column("#", justify="right")  # the index --set stages.N takes
    table.add_column("stage")
    table.add_column("data", overflow="fold")  # a path cut short with … cannot be checked
    for column in ("teachers", "loss", "schedule"):
        table.add_column(column)
    for index, stage in enumerate(stages):
        source = stage.data.path or ", ".join(f"{k}={v}" for k, v in stage.data.files.items()) or stage.data.hub_name
        loss = f"alpha={stage.loss.alpha:g} T={stage.loss.temperature:g} {stage.loss.divergence}"
        if stage.loss.beta:
            loss += f" beta={stage.loss.beta:g}"
        if stage.loss.gamma:
            loss += f" gamma={stage.loss.gamma:g}"
        length = f"{stage.train.max_steps} steps" if stage.train.max_steps else f"{stage.train.epochs:g} ep"
        schedule = f"{length}, bs {stage.train.batch_size}x{stage.train.grad_accum}, lr {stage.train.lr:g}"
        data = f"{stage.data.format}: {source}" + (" + transfer set" if stage.data.transfer else "")
        table.add_row(str(index), stage.name, data, ", ".join(stage.teachers or []) or "(labels only)", loss,
                      schedule)
    console.print(table)
    student = recipe.student.ref or f"from teacher '{recipe.student.from_teacher}' layers {recipe.student.layers}"
    console.print(f"student: {student}")
    for name, teacher in recipe.teachers.items():
        extras = [k for k in ("load_in_8bit", "load_in_4bit") if getattr(teacher, k)]
        extras += ["finetune first"] if teacher.finetune else []
        console.print(f"teacher {name}: {teacher.ref}" + (f" ({', '.join(extras)})" if extras else ""))
    print_transfer_plan(stages, run, console)
    if recipe.log.report_to:
        console.print(f"trackers: {', '.join(recipe.log.report_to)} (local files in {run.logs})")
    console.print(f"run directory: {run.root}")
    console.print(f"recipe fingerprint: {recipe_mod.fingerprint(recipe)}")
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")


@app.command()
@_error_boundary
def prepare(
    recipe_path: RecipeArg,
    overrides: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Prepare again even if nothing changed.", metavar="")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Read the dataset, normalise it to kd's schema, split it and save it under the run directory."""
    from kdcli.data import prepare_recipe
    from kdcli.report import print_prepare_summary

    recipe = _load(recipe_path, overrides)
    with _locked(recipe):
        results = prepare_recipe(recipe, force=force, quiet=as_json)
        _record(recipe)
    if as_json:
        _emit_json([r.to_json() for r in results])
    else:
        print_prepare_summary(results)


@app.command("cache-teachers")
@_error_boundary
def cache_teachers(
    recipe_path: RecipeArg,
    overrides: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild caches even if they match.", metavar="")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run each teacher once over the data and store its outputs for distillation."""
    from kdcli.report import print_cache_summary
    from kdcli.teachers import cache_teachers as build

    recipe = _load(recipe_path, overrides)
    taught = [s for s in recipe.resolved_stages() if s.teachers]
    if taught and all(s.loss.live_teachers_only for s in taught):
        from kdcli.errors import CacheError

        raise CacheError(
            "every stage with teachers distils on-policy: the teachers score the student's own samples, new at "
            "every step, so there is nothing to cache",
            "run `kd distill RECIPE`, which runs the teachers live; a cache serves kd_level = 'token' or 'sequence'",
        )
    with _locked(recipe):
        reports = build(recipe, force=force, quiet=as_json)  # quiet: nothing but the JSON on stdout
    if as_json:
        _emit_json(reports)
    else:
        print_cache_summary(reports)


@app.command()
@_error_boundary
def distill(
    recipe_path: RecipeArg,
    overrides: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint.", metavar="")] = False,
    no_teachers: Annotated[
        bool, typer.Option("--no-teachers", help="Train the same student on labels only (the `dataset` role).",
                           metavar="")
    ] = False,
    teacher: Annotated[
        Optional[str],
        typer.Option("--teacher", help="Distil from this teacher alone (the `student:NAME` role).", show_default=False,
                     metavar="NAME"),
    ] = None,
    params: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--params",
            help="TOML overlay merged over the recipe before --set, e.g. runs/NAME/tune/best.toml (repeatable).",
            show_default=False, metavar="TOML",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the student from the teachers (and gold labels), stage by stage."""
    from rich.console import Console

    from kdcli import recipe as recipe_mod
    from kdcli.distill import distill as run_stages
    from kdcli.report import print_distill_summary
    from kdcli.roles import DATASET, STUDENT, solo_role

    if no_teachers and teacher:
        raise KdError("--no-teachers and --teacher contradict each other", "give one of them")
    recipe = recipe_mod.load(recipe_path, overrides or [], params=params or [])
    role = DATASET if no_teachers else solo_role(teacher) if teacher else STUDENT
    # With --json, stdout carries one JSON document; everything said along the way goes to stderr.
    with _locked(recipe):
        results = run_stages(recipe, resume=resume, role=role, show_progress=not as_json,
                             console=Console(stderr=as_json))
    if as_json:
        from dataclasses import asdict

        _emit_json([asdict(r) for r in results])
    else:
        print_distill_summary(results)


@app.command("export")
@_error_boundary
def export_(
    recipe_path: RecipeArg,
    overrides: SetOpt = None,
    model: Annotated[
        str, typer.Option("--model", help="The trained model: student, dataset or student:NAME.", metavar="ROLE")
    ] = "student",
    fmt: Annotated[
        str,
        typer.Option("--format", help="onnx (fp32), onnx-int8 (int8 weights, ONNX Runtime) or torch-int8 (PyTorch, "
                     "int8 linear layers; every task, generate included).", metavar="FORMAT"),
    ] = "onnx",
    as_json: JsonOpt = False,
) -> None:
    """Write a trained model for deployment into runs/NAME/export/ROLE-FORMAT/, checked against the model; eval,
    bench and compare it as --model export:ROLE-FORMAT."""
    from kdcli.export import export_role
    from kdcli.report import print_export
    from kdcli.roles import Role

    recipe = _load(recipe_path, overrides)
    with _locked(recipe):
        result = export_role(recipe, Role.parse(model), fmt)
        _record(recipe, replace=False)
    if as_json:
        _emit_json(result)
    else:
        print_export(result, recipe_path)


@app.command("eval")
@_error_boundary
def eval_(
    recipe_path: RecipeArg,
    overrides: SetOpt = None,
    model: Annotated[
        str, typer.Option("--model", help="student, student:NAME, teacher:NAME, baseline, dataset, export:ROLE-FORMAT "
                          "or a model path.", metavar="ROLE")
    ] = "student",
    split: Annotated[
        Optional[str], typer.Option("--split", help="Split to score (default: the recipe's).", metavar="SPLIT")
    ] = None,
    data: Annotated[Optional[Path], typer.Option(
        "--data", help="Score every row of this file instead of a split (no train split needed).",
        exists=True, dir_okay=False, show_default=False, metavar="FILE")] = None,
    data_format: Annotated[Optional[str], typer.Option(
        "--format", help="The --data file's format, as data.format (default: the recipe's).", show_default=False,
        metavar="FORMAT")] = None,
    against: Annotated[Optional[str], typer.Option(
        "--against", help="full-precision: a teacher loaded in 8 or 4 bit is also loaded unquantised, and the "
        "drift is reported (same answers, KL, same most likely class or token).", show_default=False,
        metavar="REFERENCE")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Score a model on a split, or on any file: accuracy, F1, and agreement with the teachers."""
    from kdcli.evaluate import evaluate_role
    from kdcli.report import print_eval
    from kdcli.roles import Role

    recipe = _load(recipe_path, overrides)
    if data_format is not None:
        from typing import get_args

        from kdcli.recipe import Format

        if data is None:
            raise KdError("--format is the format of a --data file", "add --data FILE, or drop --format")
        if data_format not in get_args(Format) or data_format == "hub":
            raise KdError(f"--format {data_format!r} is not a file format",
                          "use one of: " + ", ".join(f for f in get_args(Format) if f != "hub"))
    with _locked(recipe):  # eval writes its result (and the model cards); never the run's data or recipe
        from rich.console import Console

        # Progress on stderr: stdout carries the table, or the JSON document.
        result = evaluate_role(recipe, Role.parse(model), split, console=Console(stderr=True), data_file=data,
                               data_format=data_format, against=against)
        _record(recipe, replace=False)
    if as_json:
        _emit_json(result)
    else:
        print_eval(result)


@app.command()
@_error_boundary
def bench(
    recipe_path: Annotated[
        Optional[Path], typer.Argument(help="The TOML recipe (default: the latest run).", show_default=False,
                                       metavar="RECIPE")
    ] = None,
    overrides: SetOpt = None,
    model: Annotated[
        str,
        typer.Option("--model", help="student, student:NAME, teacher:NAME, baseline, dataset, export:ROLE-FORMAT or "
                     "a model path; several, comma-separated, are timed together, round-robin; all = every role.",
                     metavar="ROLE[,ROLE...]"),
    ] = "student",
    as_json: JsonOpt = False,
) -> None:
    """Measure latency, throughput, size and memory of models on real inputs, timed together, round-robin."""
    from kdcli.bench import bench_roles, latest_run, roles_for_all
    from kdcli.errors import ModelError
    from kdcli.report import print_bench
    from kdcli.roles import Role
    from kdcli.rundir import RunDir

    if recipe_path is None:
        recipe_path = latest_run()
        if not as_json:
            typer.echo(f"using the latest run: {recipe_path}", err=True)
    recipe = _load(recipe_path, overrides)
    names = [name.strip() for name in model.split(",") if name.strip()]
    roles = [role for name in names
             for role in (roles_for_all(recipe, RunDir.for_recipe(recipe)) if name == "all" else [Role.parse(name)])]
    skipped: dict[str, str] = {}
    with _locked(recipe):  # bench writes its results (and the model cards); never the run's data or recipe
        # With all, a model not there yet (a teacher not fine-tuned, say) is skipped; a named one must be there.
        results = bench_roles(recipe, roles, skipped=skipped if "all" in names else None)
        if not results:
            raise ModelError("no model of this recipe could be benchmarked",
                             "; ".join(f"{r}: {w}" for r, w in skipped.items()))
        _record(recipe, replace=False)
    if as_json:
        _emit_json({"results": results, "skipped": skipped})
    else:
        print_bench(results, skipped)


@app.command()
@_error_boundary
def compare(
    runs: Annotated[
        Optional[list[Path]],
        typer.Argument(help="Run directories or recipes (default: every run in ./runs).", show_default=False,
                       metavar="RUN"),
    ] = None,
    fmt: Annotated[
        Optional[str], typer.Option("--format", help="Write the table as md, csv or json.", metavar="md|csv|json")
    ] = None,
    output: Annotated[
        Optional[Path], typer.Option("--output", help="Write --format output to this file instead of stdout.",
                                     metavar="FILE")
    ] = None,
    plots: Annotated[bool, typer.Option("--plots", help="Write loss and accuracy/latency plots.", metavar="")] = False,
    mean: Annotated[
        bool,
        typer.Option(
            "--mean", help="One table: the runs (one recipe under several seeds) averaged role by role, ± std.",
            metavar="",
        ),
    ] = False,
    wide: Annotated[
        bool, typer.Option("--wide", help="Every column, however narrow the terminal.", metavar="")
    ] = False,
) -> None:
    """Put teachers and students side by side: accuracy, F1, latency, size."""
    from kdcli.report import (
        collect_runs,
        mean_table,
        plot_losses,
        plot_quality_speed,
        print_compare,
        render_compare,
        run_roots,
    )
    from kdcli.rundir import write_text_atomic

    if fmt not in (None, "md", "csv", "json"):
        raise typer.BadParameter(f"{fmt!r} is not one of md, csv, json", param_hint="--format")
    if output is not None and fmt is None:
        raise typer.BadParameter("--output needs --format", param_hint="--output")
    run_tables = collect_runs(run_roots(runs or []))  # a damaged file is left out, with a warning naming it
    tables = [mean_table(run_tables)] if mean else run_tables
    if fmt is None:
        print_compare(tables, wide=wide)
    else:
        text = render_compare(tables, fmt)
        if output is None:
            typer.echo(text, nl=False)
        else:
            write_text_atomic(output, text)
    if plots:
        from contextlib import ExitStack

        from kdcli.rundir import RunDir, run_lock

        with ExitStack() as locks:  # the plots are written into each run directory
            for table in run_tables:
                locks.enter_context(run_lock(RunDir(table.root.resolve())))
            written = [path for table in run_tables for path in plot_losses(table)] + plot_quality_speed(run_tables)
        for path in written:
            typer.echo(f"plot: {path}", err=fmt is not None and output is None)


@app.command()
@_error_boundary
def run(
    recipe_path: RecipeArg,
    overrides: SetOpt = None,
    params: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--params",
            help="TOML overlay merged over the recipe before --set, e.g. runs/NAME/tune/best.toml (repeatable).",
            show_default=False, metavar="TOML",
        ),
    ] = None,
) -> None:
    """Every step in order: prepare, cache-teachers, distill (with and without teachers), eval, bench, compare."""
    from kdcli import recipe as recipe_mod
    from kdcli.pipeline import run_all

    recipe = recipe_mod.load(recipe_path, overrides or [], params=params or [])
    with _locked(recipe):
        run_all(recipe)


@app.command()
@_error_boundary
def tune(
    recipe_path: RecipeArg,
    overrides: SetOpt = None,
    trials: Annotated[
        int, typer.Option("--trials", help="Trials the study should have; a rerun runs only the missing ones.",
                          metavar="N")
    ] = 25,
    fraction: Annotated[float, typer.Option("--fraction", help="Share of each train split a trial trains on.",
                                                      metavar="SHARE")] = 0.05,
    sampler: Annotated[
        str, typer.Option("--sampler", help="random (as the study did) or tpe.", metavar="random|tpe")
    ] = "random",
    storage: Annotated[
        Optional[str],
        typer.Option("--storage", help="Optuna RDB URL of the study (default sqlite:///runs/NAME/tune.db); "
                     "machines sharing one run trials of one study.", show_default=False, metavar="URL"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Search hyperparameters on a fraction of the data (the study's stage 0); writes runs/NAME/tune/best.toml."""
    from rich.console import Console

    from kdcli import recipe as recipe_mod
    from kdcli import tune as tuning

    raw = recipe_mod.load_raw(recipe_path, overrides or [])
    recipe = recipe_mod.validate(raw, source=str(recipe_path))
    tuning.check_arguments(recipe, raw, trials=trials, fraction=fraction, sampler=sampler)
    console = Console(stderr=as_json)  # with --json, stdout carries the JSON document alone
    with _locked(recipe):
        study = tuning.open_study(recipe, storage=storage, sampler=sampler, fraction=fraction)
        _record(recipe)
        tuning.run_trials(study, recipe, raw, trials=trials, fraction=fraction, console=console, quiet=as_json)
        result = tuning.summarise(study, recipe, storage=storage)
    if as_json:
        _emit_json(result.to_json())
    else:
        tuning.print_result(result, recipe_path, console)


recipes_app = typer.Typer()
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback(invoke_without_command=True)
@_error_boundary
def recipes(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List the recipes shipped with kd (task, models, data, what each needs); `copy` copies one to edit."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console

    from kdcli import catalogue

    found = catalogue.entries()
    if as_json:
        _emit_json([item.to_json() for item in found])
    else:
        catalogue.print_catalogue(found, Console())


@recipes_app.command("copy")
@_error_boundary
def recipes_copy(
    name: Annotated[
        str, typer.Argument(help="A recipe's name, as `kd recipes` lists it.", show_default=False, metavar="NAME")
    ],
    dest: Annotated[
        Optional[Path],
        typer.Argument(help="A file, or an existing folder (default: ./NAME.toml); .toml is added when missing.",
                       show_default=False, metavar="DEST"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace DEST if it exists.", metavar="")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Copy a shipped recipe to edit it; refuses to replace an existing file without --force."""
    from rich.console import Console

    from kdcli import catalogue

    copied = catalogue.copy(name, dest, force=force)
    if as_json:
        _emit_json(copied.to_json())
    else:
        catalogue.print_copied(copied, Console())


@app.command()
@_error_boundary
def push(
    recipe_path: RecipeArg,
    repo: Annotated[
        str, typer.Option("--repo", help="The Hub repository: NAMESPACE/NAME (made when it does not exist).",
                          show_default=False, metavar="NAMESPACE/NAME")
    ],
    overrides: SetOpt = None,
    model: Annotated[
        str, typer.Option("--model", help="student, dataset, student:NAME or a fine-tuned teacher:NAME.",
                          metavar="ROLE")
    ] = "student",
    private: Annotated[bool, typer.Option("--private", help="Make a new repository private.", metavar="")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Upload a model kd saved, with its model card, to the Hugging Face Hub (HF_ENDPOINT when set)."""
    from kdcli.push import push_role
    from kdcli.roles import Role

    recipe = _load(recipe_path, overrides)
    with _locked(recipe):  # the card is written again from the run's files, as after every command
        result = push_role(recipe, Role.parse(model), repo, private=private)
    if as_json:
        _emit_json(result)
        return
    state = ("new, private" if private else "new, public") if result["created"] else "existing; visibility unchanged"
    typer.echo(f"pushed {result['role']} ({len(result['files'])} files from {result['folder']}) to "
               f"{result['url']} ({state})")
    typer.echo(f"commit: {result['commit_url']}")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (a scheduler, `kill`) stops kd the way Ctrl-C does, and says where


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _interrupt)
    if int(os.environ.get("RANK", "0")) != 0:
        # Under torchrun / accelerate launch only the main process reports; errors still reach stderr.
        sys.stdout = open(os.devnull, "w")
    app(prog_name="kd")


if __name__ == "__main__":
    sys.exit(main())
