"""`kd run`: every step of a recipe in order, skipping what is already done and current.

prepare, fine-tune and cache teachers, distil (with and without teachers, and each single-teacher
student the recipe lists), evaluate and benchmark every role, then compare. An eval or bench
result is current when it is newer than every file it depends on (``_inputs_of``).
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from kdcli.bench import bench_roles
from kdcli.data import prepare_recipe
from kdcli.distill import distill
from kdcli.evaluate import evaluate_role
from kdcli.recipe import Recipe
from kdcli.report import (
    collect_run,
    print_cache_summary,
    print_compare,
    print_distill_summary,
    print_prepare_summary,
    print_step_times,
)
from kdcli.roles import BASELINE, DATASET, Role, every_role
from kdcli.rundir import RunDir
from kdcli.runtime import check_trackers, make_accelerator
from kdcli.teachers import cache_teachers, finetune_teachers, preflight


def _inputs_of(recipe: Recipe, run: RunDir, role: Role) -> list[Path]:
    """Files whose change makes a role's eval/bench result stale."""
    inputs = [run.resolved_recipe, run.data(recipe.resolved_stages()[-1].name) / "manifest.json"]
    origin = recipe.student.from_teacher if role == BASELINE else role.teacher if role.kind == "teacher" else None
    if role.trained:
        inputs.append(run.final(role) / "done.json")
    elif origin:
        inputs.append(run.teacher(origin) / "done.json")
    return [p for p in inputs if p.exists()]


def _fresh(result: Path, inputs: list[Path]) -> bool:
    return result.is_file() and all(result.stat().st_mtime >= p.stat().st_mtime for p in inputs)


def run_all(recipe: Recipe, console: Console | None = None) -> Path:
    """Every step in order; returns the run directory. The summary ends with each step's wall time."""
    console = console or Console()
    check_trackers(recipe.log.report_to)  # before prepare, the first step
    run = RunDir.for_recipe(recipe)
    roles = every_role(recipe)
    starts: list[tuple[str, float]] = []  # each step's title and when it started

    def step(title: str) -> None:
        starts.append((title, time.perf_counter()))
        console.rule(f"[bold]{title}")

    step("prepare")
    print_prepare_summary(prepare_recipe(recipe))
    if recipe.teachers:
        if any(spec.finetune is not None for spec in recipe.teachers.values()):
            step("teachers: fine-tune")
            preflight(recipe, run)
            accelerator = make_accelerator(recipe.train.mixed_precision, recipe.log.report_to, run.logs)
            finetune_teachers(recipe, run, accelerator, console)
        step("teachers: cache")
        print_cache_summary(cache_teachers(recipe, console=console), console)
        step("distil: student trained on the dataset alone")
        print_distill_summary(distill(recipe, role=DATASET, console=console), console)
    step("distil: student")
    print_distill_summary(distill(recipe, console=console), console)
    for role in (r for r in roles if r.kind == "solo"):
        step(f"distil: student taught by {role.name} alone")
        print_distill_summary(distill(recipe, role=role, console=console), console)

    step("evaluate")
    for role in roles:
        if _fresh(run.eval(role), _inputs_of(recipe, run, role)):
            console.print(f"eval {role}: up to date")
            continue
        metrics = evaluate_role(recipe, role, console=console)["metrics"]
        if "accuracy" in metrics:
            console.print(f"eval {role}: accuracy {metrics['accuracy']:.4f}")
        else:
            console.print(f"eval {role}: exact match {metrics['exact_match']:.4f}, token F1 {metrics['f1']:.4f}")
    step("benchmark")
    # Timed together or not at all: a role benched alone, at another moment, would not pair with the rest.
    if all(_fresh(run.bench(role), _inputs_of(recipe, run, role)) for role in roles):
        console.print("bench: every role up to date")
    else:
        for result in bench_roles(recipe, roles, console=console):
            console.print(f"bench {result['role']}: {result['batches']['1']['latency_ms_per_example']['p50']:.3f} "
                          "ms/example at batch 1")
    step("compare")
    print_compare([collect_run(run.root)], console)
    ends = [started for _, started in starts[1:]] + [time.perf_counter()]
    print_step_times([(title, end - started) for (title, started), end in zip(starts, ends)], console)
    return run.root
