"""`kd run`: every step of a recipe in order, skipping what is already done and current.

prepare, fine-tune and cache teachers, distil (with and without teachers, and each single-teacher
student the recipe lists), evaluate and benchmark every role, then compare. An eval or bench
result is current when it is newer than every file it depends on (``_inputs_of``).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from kdcli.bench import bench_role
from kdcli.data import prepare_recipe
from kdcli.distill import distill
from kdcli.evaluate import evaluate_role
from kdcli.recipe import Recipe
from kdcli.report import collect_run, print_cache_summary, print_compare, print_distill_summary, print_prepare_summary
from kdcli.roles import BASELINE, DATASET, Role, every_role
from kdcli.rundir import RunDir
from kdcli.runtime import check_trackers
from kdcli.teachers import cache_teachers


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
    """Every step in order; returns the run directory."""
    console = console or Console()
    check_trackers(recipe.log.report_to)  # before prepare, the first step
    run = RunDir.for_recipe(recipe)
    roles = every_role(recipe)

    def step(title: str) -> None:
        console.rule(f"[bold]{title}")

    step("prepare")
    print_prepare_summary(prepare_recipe(recipe))
    if recipe.teachers:
        step("teachers: fine-tune and cache")
        print_cache_summary(cache_teachers(recipe, console=console), console)
        step("distil: student trained on the dataset alone")
        print_distill_summary(distill(recipe, role=DATASET, console=console), console)
    step("distil: student")
    print_distill_summary(distill(recipe, console=console), console)
    for role in (r for r in roles if r.kind == "solo"):
        step(f"distil: student taught by {role.name} alone")
        print_distill_summary(distill(recipe, role=role, console=console), console)

    step("evaluate and benchmark")
    for role in roles:
        inputs = _inputs_of(recipe, run, role)
        if _fresh(run.eval(role), inputs):
            console.print(f"eval {role}: up to date")
        else:
            metrics = evaluate_role(recipe, role, console=console)["metrics"]
            if "accuracy" in metrics:
                console.print(f"eval {role}: accuracy {metrics['accuracy']:.4f}")
            else:
                console.print(f"eval {role}: exact match {metrics['exact_match']:.4f}, token F1 {metrics['f1']:.4f}")
        if _fresh(run.bench(role), inputs):
            console.print(f"bench {role}: up to date")
        else:
            bench_role(recipe, role, console=console)
            console.print(f"bench {role}: done")
    step("compare")
    print_compare([collect_run(run.root)], console)
    return run.root
