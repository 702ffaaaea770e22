"""`kd tune` end to end on tiny models and data: the study, resuming, pruning, best.toml, bad input.

One test trains real tiny students; the others replace `distill` with a stand-in whose
score follows the sampled values, so pruning and interruption are deterministic and fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from rich.console import Console

import jobs
from clirun import kd
from kdcli import distill as distill_mod
from kdcli import recipe as recipe_mod
from kdcli import tune
from kdcli.errors import RecipeError
from kdcli.recipe import tomllib
from kdcli.train import JobResult


@pytest.fixture(scope="module")
def teacher(tiny) -> Path:
    return tiny("bert", "sequence-classification", num_labels=3, layers=2)


@pytest.fixture
def workdir(here) -> Path:
    jobs.write_sentences(here / "sentences.jsonl", 60)
    return here


SEARCH = {
    "train.lr": {"log_uniform": [1e-4, 1e-2]},
    "loss.alpha": {"uniform": [0.1, 0.9]},
    "train.batch_size": {"choice": [2, 4]},
}


def write_recipe(teacher: Path, search: dict | None = SEARCH, **top) -> str:
    """A one-teacher recipe with a [search] table (none when ``search`` is None); ``top``: more top-level keys."""
    jobs.write_recipe("tune.toml", {
        "name": "tun", "task": "classify",
        "data": {"format": "jsonl", "path": "sentences.jsonl", "label_names": jobs.LABELS},
        "student": {"from_teacher": "bert", "layers": [0]},
        "teachers": {"bert": {"ref": str(teacher)}},
        "train": {"epochs": 1, "batch_size": 4, "eval_every": 4, "checkpoint_every": 1000, "log_every": 1000,
                  "eval_batch_size": 32},
        "search": search,
    } | top)
    return "tune.toml"


def study_trials(name: str = "tun") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{Path('runs', name, 'tune.db').resolve()}").trials


@pytest.mark.slow
def test_a_study_runs_resumes_and_writes_an_overlay_that_distill_applies(teacher, workdir):
    recipe = write_recipe(teacher)
    first = kd("tune", recipe, "--trials", "4", "--fraction", "0.5")
    run = workdir / "runs" / "tun"
    assert (run / "tune.db").is_file()
    assert "bert (cache)" in first.output and "(live)" not in first.output  # teachers run once, before the trials
    assert "kd tune tun: 4 trials" in first.output and "parameter importance" in first.output
    assert len(study_trials()) == 4
    # A trial keeps its validation curve, not its checkpoints and models.
    assert [p.name for p in (run / "tune" / "trial-0").iterdir()] == ["metrics.jsonl"]

    again = kd("tune", recipe, "--trials", "6", "--fraction", "0.5", "--json")
    result = json.loads(again.stdout)
    assert sorted(t["number"] for t in result["trials"]) == list(range(6))  # 2 more, none repeated
    assert "running 2 of 6 trials" in again.stderr
    params = [tuple(sorted(t.params.items())) for t in study_trials()]
    assert len(set(params)) == 6  # the resumed sampler draws new values
    assert "nothing to run" in kd("tune", recipe, "--trials", "6", "--fraction", "0.5").output

    best = result["best"]
    scores = [t["score"] for t in result["trials"] if t["state"] == "COMPLETE"]
    assert best["score"] == max(scores) == result["trials"][0]["score"]
    overlay = run / "tune" / "best.toml"
    assert result["best_params_file"] == str(overlay)
    assert "[train]" in overlay.read_text() and "[loss]" in overlay.read_text()
    tuned = recipe_mod.load(recipe, params=[overlay])
    assert tuned.train.lr == best["params"]["train.lr"] and tuned.loss.alpha == best["params"]["loss.alpha"]
    assert tuned.train.batch_size == best["params"]["train.batch_size"]
    # The run's resolved recipe is its own again, not the last trial's.
    assert recipe_mod.validate(tomllib.loads((run / "recipe.resolved.toml").read_text())).train.lr == 5e-5

    kd("distill", recipe, "--params", str(overlay), "--json")
    resolved = (run / "recipe.resolved.toml").read_text()
    assert f"lr = {best['params']['train.lr']!r}" in resolved


class FakeDistill:
    """Stands in for kdcli.distill.distill: reports `loss.alpha` as the accuracy at four validations."""

    def __init__(self, interrupt_on: int | None = None) -> None:
        self.calls, self.interrupt_on = 0, interrupt_on

    def __call__(self, recipe, *, on_eval, workdir, train_fraction, **_):
        self.calls += 1
        if self.calls == self.interrupt_on:
            raise KeyboardInterrupt
        workdir.root.mkdir(parents=True, exist_ok=True)
        (workdir.root / "student").mkdir()
        for samples in (4, 8, 12, 16):
            on_eval(samples, {"loss": 1.0, "accuracy": recipe.loss.alpha, "f1": 0.0})
        return [JobResult("main", workdir.root, 4, 16, recipe.loss.alpha, 4, False, 0.1, 160.0, 16)]


@pytest.mark.slow
def test_an_interrupted_study_resumes_and_makes_up_the_lost_trials(teacher, workdir, monkeypatch):
    recipe = write_recipe(teacher)
    monkeypatch.setattr(distill_mod, "distill", FakeDistill(interrupt_on=3))
    kd("tune", recipe, "--trials", "4", code=130)
    assert [t.state for t in study_trials()] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL]
    assert not (workdir / "runs" / "tun" / "tune" / "trial-2" / "student").exists()  # cleaned up even so

    # A process killed mid-trial leaves its trial RUNNING.
    storage = f"sqlite:///{(workdir / 'runs' / 'tun' / 'tune.db')}"
    optuna.load_study(study_name="tun", storage=storage).ask()

    monkeypatch.setattr(distill_mod, "distill", FakeDistill())
    resumed = kd("tune", recipe, "--trials", "4")
    states = [t.state for t in study_trials()]
    assert states.count(TrialState.COMPLETE) == 4 and states.count(TrialState.FAIL) == 2
    assert states.count(TrialState.RUNNING) == 0
    assert "interrupted (not counted" in resumed.output


@pytest.mark.slow
def test_a_study_in_another_storage_leaves_no_tune_db_in_the_run(teacher, workdir, monkeypatch):
    recipe = write_recipe(teacher)
    fake = FakeDistill()
    monkeypatch.setattr(distill_mod, "distill", fake)
    result = json.loads(kd("tune", recipe, "--trials", "2", "--storage", "sqlite:///shared.db", "--json").stdout)
    assert result["storage"] == "sqlite:///shared.db" and len(result["trials"]) == 2
    assert (workdir / "shared.db").is_file() and not (workdir / "runs" / "tun" / "tune.db").exists()
    assert (workdir / "runs" / "tun" / "tune" / "best.toml").is_file()

    # Scores made on another share of the data would not compare: refused, nothing run.
    other = kd("tune", recipe, "--trials", "3", "--storage", "sqlite:///shared.db", "--fraction", "0.5", code=1)
    assert "would not compare" in other.stderr and "hint:" in other.stderr
    assert fake.calls == 2


def test_validations_are_reported_on_one_growing_grid_across_stages(teacher, workdir):
    recipe = recipe_mod.load(
        write_recipe(teacher, stages=[{"name": "one"}, {"name": "two", "train": {"eval_every": 8}}])
    )

    class Trial:
        def __init__(self):
            self.reported = []

        def report(self, value, step):
            self.reported.append((step, value))

        def should_prune(self):
            return False

    trial = Trial()
    report = tune._Reporter(trial, recipe, "accuracy")
    # Stage one validates every 4 samples and last at 10; stage two every 8 samples, from zero again.
    for samples, accuracy in [(4, 0.1), (8, 0.2), (10, 0.3), (8, 0.4), (17, 0.5), (20, 0.6)]:
        report(samples, {"loss": 1.0, "accuracy": accuracy})
    assert trial.reported == [(4, 0.1), (8, 0.2), (16, 0.4), (24, 0.5)]


@pytest.mark.slow
def test_trials_that_fall_behind_are_pruned_and_invalid_combinations_fail_with_the_reason(teacher, workdir,
                                                                                          monkeypatch):
    # Labels only: alpha below 1 is not a valid recipe, so every trial that samples 0.5 fails.
    path = write_recipe(teacher, search={"loss.alpha": {"choice": [0.5, 1.0]}, "train.lr": {"uniform": [1e-4, 1e-3]}},
                        loss={"alpha": 1.0}, stages=[{"name": "main", "teachers": []}])
    raw = recipe_mod.load_raw(path)
    recipe = recipe_mod.validate(raw)
    monkeypatch.setattr(distill_mod, "distill", FakeDistill())
    study = tune.open_study(recipe, storage=None, sampler="random", fraction=0.5,
                            pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    tune.run_trials(study, recipe, raw, trials=8, fraction=0.5, console=Console(quiet=True))
    result = tune.summarise(study, recipe, storage=None)
    states = {t["state"] for t in result.trials}
    assert {"COMPLETE", "FAIL"} <= states, states
    failed = [t for t in result.trials if t["state"] == "FAIL"]
    assert all("alpha" in t["error"] and "no teachers" in t["error"] for t in failed)
    assert all(t["params"]["loss.alpha"] == 0.5 for t in failed)
    assert sum(tune.counted(t) for t in study.trials) == 8  # failed combinations count: they are results

    # With teachers, low alpha scores worse and is pruned against the median.
    path = write_recipe(teacher, search={"loss.alpha": {"uniform": [0.0, 1.0]}})
    raw = recipe_mod.load_raw(path, ["name=tun2"])
    recipe = recipe_mod.validate(raw)
    study = tune.open_study(recipe, storage=None, sampler="random", fraction=0.5,
                            pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    tune.run_trials(study, recipe, raw, trials=8, fraction=0.5, console=Console(quiet=True))
    result = tune.summarise(study, recipe, storage=None)
    pruned = [t for t in result.trials if t["state"] == "PRUNED"]
    assert pruned, result.trials
    assert result.trials[0]["state"] == "COMPLETE" and result.best["params"]["loss.alpha"] == max(
        t["params"]["loss.alpha"] for t in result.trials)


def test_a_resumed_study_of_the_largest_seed_still_draws(here):
    """The sampler is seeded with the recipe's seed plus the trials so far, which can pass 2**32 - 1."""
    recipe = recipe_mod.load(write_recipe(Path("teacher"), seed=2**32 - 1))
    for _ in range(2):  # the second study has one trial: seed 2**32, past what Optuna takes
        tune.open_study(recipe, storage=None, sampler="random", fraction=0.5).ask().suggest_float("x", 0.0, 1.0)


def test_a_params_overlay_reaches_one_stage_by_index(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jobs.write_recipe("stages.toml", {
        "name": "s", "task": "classify", "data": {"format": "jsonl", "path": "x.jsonl"}, "student": {"ref": "m"},
        "loss": {"alpha": 1.0}, "stages": [{"name": "one"}, {"name": "two", "train": {"lr": 1e-4}}],
    })
    jobs.write_recipe("best.toml", {"train": {"epochs": 2.0}, "stages": {"1": {"train": {"lr": 0.0003}}}})
    recipe = recipe_mod.load("stages.toml", params=["best.toml"])
    assert [s.train.lr for s in recipe.stages] == [5e-5, 0.0003]
    assert [s.train.epochs for s in recipe.stages] == [2.0, 2.0]
    jobs.write_recipe("bad.toml", {"stages": {"2": {"train": {"lr": 0.1}}}})
    with pytest.raises(RecipeError, match=r"stages\.2: not a stage index \(the recipe has 2 stages\)"):
        recipe_mod.load("stages.toml", params=["bad.toml"])
    with pytest.raises(RecipeError, match="no params file at"):
        recipe_mod.load("stages.toml", params=["missing.toml"])


@pytest.mark.parametrize(
    "search, args, message",
    [
        (None, [], "has no [search] table"),
        ({"train.lr": {"uniform": [1e-3, 1e-4]}}, [], "uniform needs low < high"),
        (SEARCH, ["--fraction", "0"], "--fraction 0: the share"),
        (SEARCH, ["--fraction", "1.5"], "--fraction 1.5: the share"),
        (SEARCH, ["--trials", "0"], "--trials 0"),
        (SEARCH, ["--sampler", "grid"], "--sampler 'grid'"),
        ({"teachers.bert.weight": {"uniform": [0.5, 1.0]}}, [], "search.teachers.bert.weight"),
        (SEARCH, ["--storage", "nonsense://nowhere"], "cannot open the study storage nonsense://nowhere"),
        (SEARCH, ["--storage", "sqlite:////no/such/dir/x.db"], "cannot open the study storage"),
    ],
)
def test_bad_input_says_what_and_writes_nothing(teacher, workdir, search, args, message):
    recipe = write_recipe(teacher, search=search)
    result = kd("tune", recipe, *args, code=1)
    assert message in result.stderr and "hint:" in result.stderr
    assert not (workdir / "runs").exists()
