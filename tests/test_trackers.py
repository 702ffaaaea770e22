"""Experiment trackers (`[log] report_to`): what a training job reports to them, and the refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import jobs
from clirun import kd
from kdcli import recipe as recipe_mod
from kdcli import train
from kdcli.errors import KdError, RecipeError
from kdcli.job import Tracking
from kdcli.runtime import make_accelerator

pytestmark = pytest.mark.usefixtures("here")  # every command in an empty directory, without KD_DEBUG

RECIPE = {
    "name": "tracked", "task": "classify",
    "data": {"format": "fpb", "path": "sentences.txt"},
    "student": {"ref": "student-model"},
    "loss": {"alpha": 1.0},
}


def test_an_unknown_tracker_is_refused_with_the_ones_kd_knows():
    with pytest.raises(RecipeError) as caught:
        recipe_mod.validate(RECIPE | {"log": {"report_to": ["tensorboard", "neptune"]}})
    assert caught.value.problems == [
        "log.report_to.1: Input should be 'tensorboard', 'wandb', 'mlflow' or 'trackio'"]
    with pytest.raises(RecipeError, match="wandb named more than once"):
        recipe_mod.validate(RECIPE | {"log": {"report_to": ["wandb", "tensorboard", "wandb"]}})
    assert recipe_mod.validate(RECIPE).log.report_to == []  # by default no tracker


def test_the_config_is_the_recipe_with_one_dotted_key_a_value():
    recipe = recipe_mod.validate(RECIPE | {"log": {"report_to": ["tensorboard"]},
                                           "bench": {"batch_sizes": [1, 8]}})
    tracking = Tracking.for_recipe(recipe)
    assert tracking.project == "tracked"
    config = tracking.config
    assert config["train.lr"] == recipe.train.lr and config["loss.alpha"] == 1.0
    assert config["bench.batch_sizes.0"] == 1 and config["bench.batch_sizes.1"] == 8
    assert config["log.report_to.0"] == "tensorboard"
    assert all(value is None or isinstance(value, (bool, int, float, str)) for value in config.values())


def test_a_missing_tracker_package_stops_every_command_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb finds
    jobs.write_recipe("r.toml", RECIPE | {"log": {"report_to": ["tensorboard", "wandb"]},
                                          "search": {"train.lr": {"log_uniform": [1e-5, 1e-3]}}})
    for command in ("check", "distill", "cache-teachers", "run", "tune"):
        result = kd(command, "r.toml", code=1)
        assert "error: log.report_to: the wandb package is not installed" in result.stderr, command
        assert "hint: pip install 'kdcli[wandb]' (or pip install wandb)" in result.stderr, command
    assert not (tmp_path / "runs").exists()


def test_a_tracker_that_cannot_start_its_run_is_a_kd_error(monkeypatch, tmp_path):
    from accelerate.tracking import TensorBoardTracker

    def refuse(self):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(TensorBoardTracker, "start", refuse)
    accelerator = make_accelerator(trackers=["tensorboard"], logging_dir=tmp_path / "logs")
    with pytest.raises(KdError, match=r"main: an experiment tracker could not start its run \(PermissionError"):
        train._start_tracking(accelerator, "main", Tracking("p", {}), 0)
    assert accelerator.trackers == []  # the next job starts from nothing
    # A job without tracking, or an accelerator without trackers, reports to nothing.
    assert not train._start_tracking(accelerator, "main", None, 0)
    assert not train._start_tracking(make_accelerator(), "main", Tracking("p", {}), 0)


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard run folder, as TensorBoard shows them: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _metrics(path: Path, stage: str) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [line for line in lines if line["stage"] == stage]


@pytest.mark.slow
def test_distill_reports_every_metrics_line_to_tensorboard(tiny, tmp_path):
    bert = tiny("bert", "sequence-classification", num_labels=3, layers=2)
    jobs.write_recipe("r.toml", {
        "name": "tb", "task": "classify",
        "data": {"format": "jsonl", "path": str(jobs.write_sentences(tmp_path / "s.jsonl", 40)),
                 "label_names": jobs.LABELS, "max_length": 32},
        "student": {"ref": str(bert)},
        "teachers": {"t": {"ref": str(bert), "finetune": {"epochs": 1.0, "batch_size": 8}}},
        "loss": {"alpha": 0.5, "temperature": 2.0},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-3, "eval_every": 8, "log_every": 8,
                  "eval_batch_size": 16},
        "log": {"report_to": ["tensorboard"]},
    })
    kd("distill", "r.toml")
    run = tmp_path / "runs" / "tb"
    for job in ("teacher.t", "main"):  # the teacher's fine-tuning is a run of its own
        scalars = {tag: dict(points) for tag, points in _scalars(run / "logs" / job / "tb").items()}
        lines = _metrics(run / "metrics.jsonl", job)
        trained = [line for line in lines if line["kind"] == "train"]
        evaluated = [line for line in lines if line["kind"] == "eval"]
        assert len(trained) >= 2 and len(evaluated) >= 2, job
        for key in ("loss", "ce", "lr", "samples_per_s", "epoch"):
            assert scalars[f"train/{key}"] == pytest.approx({line["step"]: line[key] for line in trained}), key
        for key in ("loss", "accuracy", "f1"):
            assert scalars[f"eval/{key}"] == pytest.approx({line["step"]: line[f"val_{key}"] for line in evaluated})
        # train.max_grad_norm is 1.0 by default: clipping measures the norm at every step of every line.
        assert set(scalars["train/grad_norm"]) == {line["step"] for line in trained}
        assert all(norm > 0 for norm in scalars["train/grad_norm"].values())
    assert "train/kd" in _scalars(run / "logs" / "main" / "tb")
    assert "train/kd" not in _scalars(run / "logs" / "teacher.t" / "tb")  # labels only


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_a_resumed_job_shows_each_step_once_in_tensorboard(tmp_path, monkeypatch):
    teacher = jobs.make_teacher_dir(tmp_path / "teacher")

    def job():  # a step of 8 samples: a line every step, a validation every 2, a checkpoint every 4
        made = jobs.classify_job(teacher, tmp_path / "out", batch_size=8, grad_accum=1, max_steps=6,
                                 checkpoint_every=32)
        made.tracking = Tracking("kd-test", {})
        return made

    save = train._save_checkpoint

    def die_at_the_end(job_, accelerator, *args):
        if args[-1].step == 6:
            raise _Interrupt  # after steps 5 and 6 were logged, before they were saved
        save(job_, accelerator, *args)

    monkeypatch.setattr(train, "_save_checkpoint", die_at_the_end)
    with pytest.raises(_Interrupt):
        train.run_job(job(), make_accelerator(trackers=["tensorboard"], logging_dir=tmp_path / "logs"),
                      show_progress=False)
    monkeypatch.setattr(train, "_save_checkpoint", save)
    train.run_job(job(), make_accelerator(trackers=["tensorboard"], logging_dir=tmp_path / "logs"), resume=True,
                  show_progress=False)
    scalars = _scalars(tmp_path / "logs" / "main" / "kd-test")
    lines = _metrics(tmp_path / "out" / "metrics.jsonl", "main")
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]  # 5 and 6 once, as metrics.jsonl has them
    assert dict(scalars["train/loss"]) == pytest.approx({line["step"]: line["loss"] for line in lines
                                                         if line["kind"] == "train"})
    assert [step for step, _ in scalars["eval/loss"]] == [2, 4, 6]


@pytest.mark.slow
def test_a_job_reports_to_wandb_offline(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for where in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # nothing in $HOME
        monkeypatch.setenv(where, str(tmp_path / "wandb-home"))
    teacher = jobs.make_teacher_dir(tmp_path / "teacher")
    job = jobs.classify_job(teacher, tmp_path / "out", batch_size=8, grad_accum=1, max_steps=2)
    job.tracking = Tracking("kd-test", {"train.lr": 1e-3})
    train.run_job(job, make_accelerator(trackers=["wandb"], logging_dir=tmp_path / "logs"), show_progress=False)
    runs = list((tmp_path / "logs" / "main" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))  # the run's history, for `wandb sync`
