"""`kd tune`: the study's hyperparameter search (stage 0), on Optuna.

The recipe's ``[search]`` table declares the space by dotted recipe key. Each trial samples
one value per key, applies them to the raw recipe exactly like ``--set`` overrides (so a
top-level ``train.lr`` reaches every stage that does not set its own), validates the result,
and runs a short distillation on a fraction of each train split in
``runs/NAME/tune/trial-N/``, reading the teachers from the cache built once before the
trials. Its score is the last stage's best validation ``train.metric``; intermediate
validations feed a median pruner that stops trials falling behind.

The study lives in an Optuna RDB storage (``runs/NAME/tune.db`` unless ``--storage`` names
another), so an interrupted ``kd tune`` continues where it stopped and several machines can
share one study. The best values are written as a params overlay, ``runs/NAME/tune/best.toml``,
that ``kd distill --params`` and ``kd run --params`` apply.
"""

from __future__ import annotations

import math
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from kdcli.errors import KdError, RecipeError
from kdcli.metrics import MAXIMISED
from kdcli.recipe import Recipe, SearchDistribution, apply_overrides, validate
from kdcli.rundir import RunDir, write_text_atomic
from kdcli.runtime import check_trackers

if TYPE_CHECKING:
    import optuna

SAMPLERS = ("random", "tpe")
# Sections a trial may vary. Teachers are fine-tuned and cached once, before the trials, so
# searching them would re-run them per trial; the run's name, task or seed would make each
# trial a different run.
SEARCHABLE = ("data", "loss", "train", "student")
STAGE_SEARCHABLE = ("data", "loss", "train")
SEARCH_EXAMPLE = (
    'add a [search] table to the recipe, e.g.\n'
    '  [search]\n'
    '  "train.lr" = {log_uniform = [1e-5, 1e-3]}\n'
    '  "loss.alpha" = {uniform = [0.1, 0.9]}\n'
    '  "loss.temperature" = {choice = [1, 2, 4, 8]}'
)


def default_storage(recipe: Recipe) -> str:
    return f"sqlite:///{RunDir.for_recipe(recipe).root / 'tune.db'}"


def best_params_path(recipe: Recipe) -> Path:
    return RunDir.for_recipe(recipe).root / "tune" / "best.toml"


# --------------------------------------------------------------------------- checks


def check_arguments(recipe: Recipe, raw: dict[str, Any], *, trials: int, fraction: float, sampler: str) -> None:
    """Refuse a study that cannot run, before anything is written."""
    if not recipe.search:
        raise KdError("the recipe has no [search] table, so there is nothing to tune", SEARCH_EXAMPLE)
    if trials < 1:
        raise KdError(f"--trials {trials}: a study needs at least one trial", "use --trials 25, as the study did")
    if not 0 < fraction <= 1:  # also refuses nan
        raise KdError(
            f"--fraction {fraction:g}: the share of the train split must be in (0, 1]",
            "use --fraction 0.05 for 5% of the train split (the study's choice), or 1 for all of it",
        )
    if sampler not in SAMPLERS:
        raise KdError(f"--sampler {sampler!r}: unknown sampler", f"use one of: {', '.join(SAMPLERS)}")
    problems = [problem for key in recipe.search if (problem := _unsearchable(key, raw))]
    if problems:
        raise RecipeError(
            problems,
            source="search",
            hint="search data, loss, train or student keys (stages.N.train.lr for one stage); "
            "teachers are fine-tuned and cached once, before the trials",
        )
    check_trackers(recipe.log.report_to)  # the teachers' fine-tuning reports to them (the trials to none)


def _unsearchable(key: str, raw: dict[str, Any]) -> str | None:
    parts = key.split(".")
    if parts[0] == "stages":
        if len(parts) < 4 or parts[2] not in STAGE_SEARCHABLE:
            return f"search.{key}: kd tune varies a stage's {', '.join(STAGE_SEARCHABLE)} keys only"
        return None
    if parts[0] not in SEARCHABLE:
        return f"search.{key}: kd tune varies {', '.join(SEARCHABLE)} keys only"
    stages = raw.get("stages") or []
    if parts[0] in STAGE_SEARCHABLE and stages and all(_is_set(stage.get(parts[0], {}), parts[1:]) for stage in stages):
        return f"search.{key}: every stage sets its own {key}, so the top-level value is never used"
    return None


def _is_set(table: Any, parts: list[str]) -> bool:
    for part in parts:
        if not isinstance(table, dict) or part not in table:
            return False
        table = table[part]
    return True


# --------------------------------------------------------------------------- the study


def open_study(recipe: Recipe, *, storage: str | None, sampler: str, fraction: float,
               pruner: "optuna.pruners.BasePruner | None" = None) -> "optuna.Study":
    """Create or load the study named after the recipe; KdError when the storage cannot be opened
    or holds a study made with another metric or fraction (its scores would not compare)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # kd prints each trial, and why one failed, itself
    local = storage is None
    url = storage or default_storage(recipe)
    if local:
        RunDir.for_recipe(recipe).root.mkdir(parents=True, exist_ok=True)
    metric = _metric(recipe)
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and have been since 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # A shared storage is written by several machines: a trial whose machine stops sending
            # heartbeats is failed by the others, so it neither blocks the count nor stays RUNNING.
            rdb = (optuna.storages.RDBStorage(url) if local
                   else optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180))
            study = optuna.create_study(storage=rdb, study_name=recipe.name, load_if_exists=True,
                                        direction="maximize" if metric in MAXIMISED else "minimize")
    except Exception as exc:  # sqlalchemy, a missing database driver, a bad URL: all mean "cannot open"
        raise KdError(
            f"cannot open the study storage {_shown(url)}: {type(exc).__name__}: {exc}",
            "give an Optuna RDB URL that this machine can reach, e.g. sqlite:///tune.db or "
            "postgresql://USER:PASSWORD@HOST/DB (needs the psycopg2 package)",
        ) from None
    recorded = study.user_attrs
    if not recorded:
        study.set_user_attr("metric", metric)
        study.set_user_attr("fraction", fraction)
    elif recorded.get("metric") != metric or recorded.get("fraction") != fraction:
        raise KdError(
            f"the study '{recipe.name}' in {_shown(url)} was run with metric {recorded.get('metric')} on "
            f"--fraction {recorded.get('fraction')}, not {metric} on --fraction {fraction:g}: "
            "its scores would not compare",
            f"rerun with --fraction {recorded.get('fraction')} and the same train.metric, or start a new study "
            + ("by deleting that tune.db" if local else "under another storage"),
        )
    if local:
        # We hold the run lock, so no other process is running a trial of this study: a RUNNING
        # trial was left by a process that was killed. Failed without an `error`, it is not counted.
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(trial.number, state=TrialState.FAIL)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    # Seeded by the recipe and the trials so far, so a resumed study draws new values rather
    # than repeating its first ones. Machines sharing a study draw independently (unseeded):
    # with one seed they would all try the same values. Optuna takes seeds below 2**32: wrap around.
    seed = (recipe.seed + len(study.trials)) % 2**32 if local else None
    chosen = optuna.samplers.RandomSampler(seed=seed) if sampler == "random" else optuna.samplers.TPESampler(seed=seed)
    return optuna.load_study(study_name=recipe.name, storage=rdb, sampler=chosen,
                             pruner=pruner or optuna.pruners.MedianPruner())


def counted(trial: "optuna.trial.FrozenTrial") -> bool:
    """A trial that has its outcome: complete, pruned, or failed for a reason (an invalid
    combination of values). A trial interrupted or killed is not counted and is made up for."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and "error" in trial.user_attrs
    )


def run_trials(study: "optuna.Study", recipe: Recipe, raw: dict[str, Any], *, trials: int, fraction: float,
               console: Console, quiet: bool = False) -> None:
    """Cache the teachers once, then run trials until the study has ``trials`` counted ones."""

    from kdcli.distill import distill
    from kdcli.teachers import cache_teachers

    done = sum(counted(t) for t in study.get_trials(deepcopy=False))
    if done >= trials:
        console.print(f"the study already has {done} finished trials (--trials {trials}): nothing to run")
        return
    cache_teachers(recipe, console=console, quiet=quiet)
    run = RunDir.for_recipe(recipe)
    metric = _metric(recipe)
    console.print(f"running {trials - done} of {trials} trials on {fraction:.0%} of the train split "
                  f"({done} done before)")

    def objective(trial: optuna.Trial) -> float:
        values = {key: _suggest(trial, key, space) for key, space in recipe.search.items()}
        workdir = RunDir(run.root / "tune" / f"trial-{trial.number}")
        try:
            # A trial reports to no tracker: its curve is in the study and its metrics.jsonl, and its workdir
            # is emptied but for that file.
            overrides = [f"{k}={_toml_value(v)}" for k, v in values.items()] + ["log.report_to=[]"]
            sampled = validate(apply_overrides(raw, overrides), source=f"trial {trial.number}")
            results = distill(sampled, console=console, show_progress=False, train_fraction=fraction,
                                     workdir=workdir, on_eval=_Reporter(trial, sampled, metric))
        except KdError as exc:  # e.g. values that do not combine, or a batch larger than the fraction
            trial.set_user_attr("error", f"{exc.message} ({exc.hint})" if exc.hint else exc.message)
            raise
        finally:
            _keep_only_metrics(workdir)
        return results[-1].best_metric

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        console.print(_one_line(trial, metric), markup=False, highlight=False)
        # Machines sharing a study each stop once the study as a whole has enough trials.
        if sum(counted(t) for t in study.get_trials(deepcopy=False)) >= trials:
            study.stop()

    study.optimize(objective, n_trials=trials - done, catch=(KdError,), callbacks=[after_trial])


class _Reporter:
    """``on_eval`` for one trial: reports each validation to Optuna and prunes a trial that falls
    behind the median of earlier trials at the same step.

    The median pruner compares trials step by step, so steps are training samples seen snapped
    down to the stage's ``eval_every`` grid (trials with different batch sizes validate at slightly
    different sample counts) and counted on across stages (each stage counts from zero again).
    """

    def __init__(self, trial: "optuna.Trial", recipe: Recipe, metric: str) -> None:
        self.trial, self.metric = trial, metric
        self.grid = [stage.train.eval_every for stage in recipe.resolved_stages()]
        self.stage, self.stage_samples, self.offset, self.last_step = 0, 0, 0, 0

    def __call__(self, samples: int, scores: dict[str, float]) -> None:
        import optuna

        if samples <= self.stage_samples:  # the next stage has begun
            self.stage = min(self.stage + 1, len(self.grid) - 1)
            self.offset = self.last_step
        self.stage_samples = samples
        every = self.grid[self.stage]
        step = self.offset + samples // every * every
        if step <= self.last_step:
            return  # a stage's last validation, off the grid; the trial's score includes it anyway
        self.last_step = step
        value = scores.get(self.metric, scores["loss"])  # train.py's fallback for a metric the task lacks
        self.trial.report(value, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.metric} {value:.4f} after {step} samples is below the median")


def _suggest(trial: "optuna.Trial", key: str, space: SearchDistribution) -> Any:
    if space.uniform is not None:
        return trial.suggest_float(key, *space.uniform)
    if space.log_uniform is not None:
        return trial.suggest_float(key, *space.log_uniform, log=True)
    if space.int_uniform is not None:
        return trial.suggest_int(key, *space.int_uniform)
    return trial.suggest_categorical(key, space.choice)


def _toml_value(value: Any) -> str:
    """A sampled value as the TOML text of a ``--set`` override (floats round-trip exactly)."""
    import tomli_w

    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def _keep_only_metrics(workdir: RunDir) -> None:
    """A trial's checkpoints and models are a full student each; only its validation curve is kept."""
    if not workdir.root.is_dir():
        return
    for child in workdir.root.iterdir():
        if child != workdir.metrics:
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def _metric(recipe: Recipe) -> str:
    return recipe.resolved_stages()[-1].train.metric


def _shown(url: str) -> str:
    """The storage URL without its password, for messages and output."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy can parse: the message says so anyway
        return url


# --------------------------------------------------------------------------- results


@dataclass
class TuneResult:
    study: str
    storage: str
    metric: str
    direction: str
    fraction: float
    trials: list[dict[str, Any]]  # best first: number, state, score, params, seconds, error
    best: dict[str, Any] | None  # number, score, params
    best_params_file: str | None
    importance: dict[str, float] | None
    importance_note: str | None  # why there is no importance

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarise(study: "optuna.Study", recipe: Recipe, *, storage: str | None) -> TuneResult:
    """The trials sorted by score, the best values written to best.toml, and each parameter's importance."""
    from optuna.trial import TrialState

    metric = _metric(recipe)
    maximise = metric in MAXIMISED
    rows = [_row(t) for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
    order = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "FAIL": 3}

    def best_first(row: dict[str, Any]) -> tuple:
        score = row["score"]
        ranked = 0.0 if score is None else -score if maximise else score
        return order[row["state"]], score is None, ranked, row["number"]

    rows.sort(key=best_first)
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    best = {k: complete[0][k] for k in ("number", "score", "params")} if complete else None
    path = None
    if best is not None:
        path = best_params_path(recipe)
        write_text_atomic(path, _overlay_toml(best, metric, study, len(complete)))
    importance, note = _importance(study, recipe, len(complete))
    return TuneResult(
        study=recipe.name, storage=_shown(storage or default_storage(recipe)), metric=metric,
        direction="maximize" if maximise else "minimize", fraction=study.user_attrs.get("fraction"),
        trials=rows, best=best, best_params_file=str(path) if path else None, importance=importance,
        importance_note=note,
    )


def _row(trial: "optuna.trial.FrozenTrial") -> dict[str, Any]:
    from optuna.trial import TrialState

    seconds = None
    if trial.datetime_start and trial.datetime_complete:
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
    error = trial.user_attrs.get("error")
    if trial.state == TrialState.FAIL and error is None:
        error = "interrupted (not counted; made up for by another trial)"
    score = trial.value if trial.value is not None and math.isfinite(trial.value) else None
    return {"number": trial.number, "state": trial.state.name, "score": score, "params": trial.params,
            "seconds": seconds, "error": error}


def _overlay_toml(best: dict[str, Any], metric: str, study: "optuna.Study", complete: int) -> str:
    """The best values as TOML tables (``[train]`` ``lr = ...``; ``[stages.1.train]`` for one stage)."""
    import tomli_w

    tables: dict[str, Any] = {}
    for key, value in best["params"].items():
        *parents, leaf = key.split(".")
        node = tables
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    fraction = study.user_attrs.get("fraction")
    header = (
        f"# kd tune: the best of {complete} completed trials of study '{study.study_name}': trial {best['number']}, "
        f"{metric} {best['score']:.4f} on {fraction:.0%} of the train split.\n"
        "# Apply it with: kd distill RECIPE --params THIS_FILE (or kd run RECIPE --params THIS_FILE)\n\n"
    )
    return header + tomli_w.dumps(tables)


def _importance(study: "optuna.Study", recipe: Recipe, complete: int) -> tuple[dict[str, float] | None, str | None]:
    import optuna

    if complete < 2:
        return None, f"needs at least 2 completed trials ({complete} so far)"
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=recipe.seed)
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator)), None
    except (ValueError, RuntimeError) as exc:  # e.g. no parameter varies across the completed trials
        return None, f"Optuna could not compute it: {exc}"


def print_result(result: TuneResult, recipe_path: Path, console: Console) -> None:
    from rich.table import Table

    keys = list(dict.fromkeys(key for row in result.trials for key in row["params"]))
    table = Table(title=f"kd tune {result.study}: {len(result.trials)} trials, {result.metric} "
                        f"({'higher' if result.direction == 'maximize' else 'lower'} is better)")
    table.add_column("trial", justify="right")
    for key in keys:
        table.add_column(key, justify="right")
    table.add_column(result.metric, justify="right")
    table.add_column("state")
    table.add_column("time", justify="right")
    for row in result.trials:
        style = "bold green" if result.best and row["number"] == result.best["number"] else None
        table.add_row(
            str(row["number"]), *(_shown_value(row["params"].get(key)) for key in keys),
            "–" if row["score"] is None else f"{row['score']:.4f}", row["state"],
            "–" if row["seconds"] is None else f"{row['seconds']:.1f} s", style=style,
        )
    console.print(table)
    for row in result.trials:
        if row["error"]:
            console.print(f"trial {row['number']} {_STATE_WORDS[row['state']]}: {row['error']}",
                          markup=False, highlight=False)
    if result.importance:
        console.print("parameter importance (fANOVA): "
                      + ", ".join(f"{key} {value:.2f}" for key, value in result.importance.items()))
    else:
        console.print(f"parameter importance: {result.importance_note}")
    if result.best is None:
        console.print("no trial has completed yet, so there is no best.toml")
        return
    shown = _relative(Path(result.best_params_file))
    console.print(f"best: trial {result.best['number']}, {result.metric} {result.best['score']:.4f} -> {shown}",
                  markup=False)
    console.print(f"apply it: kd distill {recipe_path} --params {shown}", markup=False, highlight=False)


_STATE_WORDS = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running"}


def _one_line(trial: "optuna.trial.FrozenTrial", metric: str) -> str:
    row = _row(trial)
    values = ", ".join(f"{k}={_shown_value(v)}" for k, v in row["params"].items())
    score = "" if row["score"] is None else f" {metric} {row['score']:.4f}"
    time = "" if row["seconds"] is None else f" ({row['seconds']:.1f} s)"
    reason = f": {row['error']}" if row["error"] else ""
    return f"trial {row['number']} {_STATE_WORDS[row['state']]}{score}{time} [{values}]{reason}"


def _relative(path: Path) -> Path:
    """A path under the current directory as the user would type it."""
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path


def _shown_value(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.3g}" if isinstance(value, float) else str(value)
