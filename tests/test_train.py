"""Invariance tests for the training loop: the silent bugs (TRL tests/invariant style)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import jobs
from kdcli import train
from kdcli.cache import CachedTeacher, build_cache
from kdcli.errors import KdError
from kdcli.runtime import make_accelerator


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return jobs.make_teacher_dir(tmp_path_factory.mktemp("teacher"))


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return jobs.state_dict(train._checkpoints(out / "checkpoints")[0])


def test_cached_teacher_gives_the_same_loss_as_the_live_teacher(teacher_dir, tmp_path):
    job = jobs.classify_job(teacher_dir, tmp_path, batch_size=8, grad_accum=1, dropout=False)
    live = job.teachers["t"]
    build_cache(tmp_path / "cache", live, {"train": job.rows["train"]}, {"hidden_layers": [1, 3]}, batch_size=5)
    cached = CachedTeacher(tmp_path / "cache")
    projections = train._projections(job)
    batch = job.rows["train"][8:16]
    live_total, live_parts, _ = train.compute_loss(job, batch, "train", projections)
    job.teachers = {"t": cached}
    cached_total, cached_parts, _ = train.compute_loss(job, batch, "train", projections)
    assert set(live_parts) == {"ce", "kd", "hidden"}
    for name in live_parts:
        assert float(live_parts[name].detach()) == pytest.approx(float(cached_parts[name].detach()), abs=1e-5), name
    assert float(live_total.detach()) == pytest.approx(float(cached_total.detach()), abs=1e-5)


def test_cached_teacher_gives_the_same_loss_as_the_live_teacher_on_transfer_rows(teacher_dir, tmp_path):
    job = jobs.classify_job(teacher_dir, tmp_path, batch_size=8, grad_accum=1, dropout=False, transfer_share=0.5)
    live = job.teachers["t"]
    build_cache(tmp_path / "cache", live, {"train": job.rows["train"], "transfer": job.rows["transfer"]},
                {"hidden_layers": [1, 3]}, batch_size=5)
    projections = train._projections(job)
    batch = job.rows["transfer"][30:38]  # rows no train index would find: the cache must read the transfer split
    live_total, live_parts, _ = train.compute_loss(job, batch, "transfer", projections)
    job.teachers = {"t": CachedTeacher(tmp_path / "cache")}
    cached_total, cached_parts, _ = train.compute_loss(job, batch, "transfer", projections)
    assert set(live_parts) == {"ce", "kd", "hidden"} and float(live_parts["ce"]) == 0.0  # no labels: no CE
    for name in live_parts:
        assert float(live_parts[name].detach()) == pytest.approx(float(cached_parts[name].detach()), abs=1e-5), name
    assert float(live_total.detach()) == pytest.approx(float(cached_total.detach()), abs=1e-5)


def test_transfer_rows_come_from_seeded_passes_that_cross_steps():
    steps = [train.stream_examples(10, 3, step, 4) for step in range(5)]  # 20 rows: two passes over 10
    assert steps == [train.stream_examples(10, 3, step, 4) for step in range(5)]
    drawn = [i for step in steps for i in step]
    assert sorted(drawn[:10]) == sorted(drawn[10:]) == list(range(10)) and drawn[:10] != drawn[10:]
    assert train.stream_examples(10, 4, 0, 4) != steps[0]  # another seed, another order
    assert train.stream_examples(10, 3, 0, 4) != train.step_examples(10, 3, 0, 2, 4)  # not train's order


@pytest.mark.slow
def test_with_transfer_rows_batch_8_accumulation_1_equals_batch_2_accumulation_4(teacher_dir, tmp_path):
    for name, batch, accum in (("a", 8, 1), ("b", 2, 4)):
        train.run_job(jobs.classify_job(teacher_dir, tmp_path / name, batch_size=batch, grad_accum=accum,
                                        dropout=False, transfer_share=0.5),
                      make_accelerator(), show_progress=False)
    assert jobs.max_difference(_final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")) < 1e-5


@pytest.mark.slow
def test_transfer_rows_add_nothing_to_ce(teacher_dir, tmp_path):
    """Labels only (alpha 1, no hidden MSE): four labelled and four transfer rows a step train exactly as the
    same four labelled rows alone. CE is over labelled rows and counts only them; if the transfer rows
    counted, each step's CE would weigh half as much."""
    labels_only = {"alpha": 1.0, "beta": 0.0}
    train.run_job(jobs.classify_job(teacher_dir, tmp_path / "mixed", batch_size=8, grad_accum=1, dropout=False,
                                    transfer_share=0.5, loss=labels_only), make_accelerator(), show_progress=False)
    train.run_job(jobs.classify_job(teacher_dir, tmp_path / "alone", batch_size=4, grad_accum=1, dropout=False,
                                    loss=labels_only), make_accelerator(), show_progress=False)
    assert jobs.max_difference(_final_weights(tmp_path / "mixed"), _final_weights(tmp_path / "alone")) < 1e-6


@pytest.mark.slow
def test_batch_8_accumulation_1_equals_batch_2_accumulation_4(teacher_dir, tmp_path):
    for name, batch, accum in (("a", 8, 1), ("b", 2, 4)):
        train.run_job(jobs.classify_job(teacher_dir, tmp_path / name, batch_size=batch, grad_accum=accum,
                                        dropout=False),
                      make_accelerator(), show_progress=False)
    assert jobs.max_difference(_final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")) < 1e-5


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_uninterrupted_run(teacher_dir, tmp_path, monkeypatch):
    # Dropout stays on: the resumed run must restore the RNG as well as weights and optimizer.
    def job(out):
        return jobs.classify_job(teacher_dir, out, batch_size=8, grad_accum=1, max_steps=6, checkpoint_every=16)

    train.run_job(job(tmp_path / "whole"), make_accelerator(), show_progress=False)

    save = train._save_checkpoint

    def save_then_die(job_, accelerator, *args):
        save(job_, accelerator, *args)
        if args[-1].step == 4:
            raise _Interrupt

    monkeypatch.setattr(train, "_save_checkpoint", save_then_die)
    with pytest.raises(_Interrupt):
        train.run_job(job(tmp_path / "parts"), make_accelerator(), show_progress=False)
    monkeypatch.setattr(train, "_save_checkpoint", save)
    result = train.run_job(job(tmp_path / "parts"), make_accelerator(), resume=True, show_progress=False)

    assert result.steps == 6
    assert jobs.max_difference(_final_weights(tmp_path / "whole"), _final_weights(tmp_path / "parts")) < 1e-6


def test_a_checkpoint_made_under_another_recipe_is_never_resumed(teacher_dir, tmp_path):
    identity = {"stage": {"train": {"lr": 1e-3, "log_every": 8}}, "seed": 0}

    def job(**changed):
        made = jobs.classify_job(teacher_dir, tmp_path, batch_size=8, grad_accum=1, max_steps=2, checkpoint_every=8)
        made.identity = {"stage": {"train": {**identity["stage"]["train"], **changed}}, "seed": 0}
        return made

    train.run_job(job(), make_accelerator(), show_progress=False)
    newest = train._checkpoints(tmp_path / "checkpoints")[0]
    assert json.loads((newest / "identity.json").read_text()) == identity
    with pytest.raises(KdError, match=r"changed: stage\.train\.lr: 0\.001 -> 0\.5") as refused:
        train.run_job(job(lr=0.5), make_accelerator(), resume=True, show_progress=False)
    assert "without --resume" in refused.value.hint
    assert train._checkpoints(tmp_path / "checkpoints")[0] == newest  # nothing touched
    # What is logged or kept never changes the weights: a resume may change it.
    assert train.resume_problem(job(log_every=100)) is None
    assert train.run_job(job(log_every=100), make_accelerator(), resume=True, show_progress=False).steps == 2


def test_resume_falls_back_past_a_corrupted_checkpoint(teacher_dir, tmp_path):
    job = jobs.classify_job(teacher_dir, tmp_path, batch_size=8, grad_accum=1, max_steps=4, checkpoint_every=16)
    train.run_job(job, make_accelerator(), show_progress=False)
    newest, older = train._checkpoints(tmp_path / "checkpoints")[:2]
    (newest / "model.safetensors").write_bytes(b"garbage")
    from rich.console import Console

    console = Console(record=True, width=200)
    result = train.run_job(jobs.classify_job(teacher_dir, tmp_path, batch_size=8, grad_accum=1, max_steps=4,
                                             checkpoint_every=16),
                           make_accelerator(), resume=True, console=console, show_progress=False)
    text = console.export_text()
    assert f"checkpoint {newest.name} cannot be loaded" in text
    assert f"resuming main from {older.name}" in text
    assert result.steps == 4


def test_a_non_finite_loss_stops_naming_the_step_and_term(teacher_dir, tmp_path, monkeypatch):
    from kdcli import losses

    calls = {"n": 0}
    real = losses.hidden_mse

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] > 2 * 3 else value  # two layer pairs per step: NaN from step 4

    monkeypatch.setattr(losses, "hidden_mse", poisoned)
    job = jobs.classify_job(teacher_dir, tmp_path, batch_size=8, grad_accum=1, max_steps=6, checkpoint_every=16)
    with pytest.raises(KdError) as caught:
        train.run_job(job, make_accelerator(), show_progress=False)
    assert "step 4" in caught.value.message and "hidden" in caught.value.message
    assert "step-00000002" in caught.value.hint  # the last good checkpoint, named
    assert torch.isfinite(next(iter(jobs.state_dict(tmp_path / "checkpoints" / "step-00000002").values()))).all()


def test_too_little_data_for_one_step_is_a_clear_error(teacher_dir, tmp_path):
    job = jobs.classify_job(teacher_dir, tmp_path, batch_size=32, grad_accum=4)
    with pytest.raises(KdError, match="fewer than one optimizer step"):
        train.run_job(job, make_accelerator(), show_progress=False)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not found")
def test_two_processes_equal_one_process_with_matching_accumulation(teacher_dir, tmp_path):
    script = Path(__file__).parent / "distributed_job.py"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(jobs.free_port()),
                    str(script), str(teacher_dir), str(tmp_path / "two"), "4", "1"],
                   check=True, env=env, capture_output=True, timeout=300)
    subprocess.run([sys.executable, str(script), str(teacher_dir), str(tmp_path / "one"), "4", "2"],
                   check=True, env=env, capture_output=True, timeout=300)
    assert jobs.max_difference(_final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")) < 1e-5


def test_a_resumed_job_logs_each_step_once(teacher_dir, tmp_path):
    job = jobs.classify_job(teacher_dir, tmp_path, batch_size=8, grad_accum=1, max_steps=4, checkpoint_every=16)
    job.train.log_every = 8  # every step
    train.run_job(job, make_accelerator(), show_progress=False)
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000004")  # as if killed after the step-2 checkpoint
    train.run_job(job, make_accelerator(), resume=True, show_progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [2, 4]
    # A fresh start replaces the job's history instead of adding to it.
    train.run_job(job, make_accelerator(), show_progress=False)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == len(records)
