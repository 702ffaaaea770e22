"""On-policy distillation (``loss.kd_level = "on_policy"``): the student samples answers, the live
teachers score every sampled token over the full vocabulary (GKD)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import jobs
import kit
from clirun import kd
from jobs import qa_rows
from kdcli import train
from kdcli.cache import LiveTeacher
from kdcli.job import Job, TeacherSettings
from kdcli.models import load_task_model, student_from_teacher
from kdcli.recipe import LossConfig, TeacherConfig, TrainConfig
from kdcli.runtime import make_accelerator
from kdcli.tasks import task_kind

GENERATE = task_kind("generate")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return kit.make_model_dir(tmp_path_factory.mktemp("op-models"), "llama", "causal", layers=2)


def _teacher(path: Path, seed: int):
    model = load_task_model(TeacherConfig(ref=str(path)), "generate", 0)
    generator = torch.Generator().manual_seed(seed)  # a "trained" teacher: other weights, same tokenizer
    with torch.no_grad():
        for parameter in model.model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def on_policy_job(llama: Path, out: Path, *, fraction: float = 1.0, kd_level: str = "on_policy", teachers: int = 1,
                  max_steps: int = 3, checkpoint_every: int = 10_000, dropout: bool = False, **loss) -> Job:
    made = [_teacher(llama, seed) for seed in range(1, teachers + 1)]
    torch.manual_seed(0)
    student = student_from_teacher(made[0], [0])
    if not dropout:
        jobs.without_dropout(student.model)
    vocab = student.vocab_size
    data = qa_rows(40)
    settings = TeacherSettings(max_length=32, kd_level=kd_level, temperature=1.0, answer_max_length=8,
                               top_k=None if kd_level == "on_policy" else vocab)
    return Job(
        name="main", student=student,
        rows={"train": data[:32], "validation": [dict(r, idx=i) for i, r in enumerate(data[32:])]},
        loss=LossConfig(**{"alpha": 0.5, **loss}, temperature=1.0, kd_level=kd_level, top_k=vocab,
                        on_policy_fraction=fraction),
        train=TrainConfig(max_steps=max_steps, batch_size=8, grad_accum=1, lr=1e-3, eval_every=10_000,
                          checkpoint_every=checkpoint_every, log_every=8, eval_batch_size=8),
        seed=0, max_length=32, template=None, checkpoint_dir=out / "checkpoints", output_dir=out / "student",
        metrics_path=out / "metrics.jsonl",
        teachers={f"t{i}": LiveTeacher(model, settings) for i, model in enumerate(made)},
        teacher_weights={f"t{i}": 1.0 + i for i in range(teachers)}, answer_max_length=8,
    )


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return jobs.state_dict(train._checkpoints(out / "checkpoints")[0])


def test_reverse_kl_is_the_default_divergence_of_on_policy_kd():
    assert LossConfig(kd_level="on_policy").divergence == "reverse_kl"
    assert LossConfig(kd_level="on_policy", divergence="jsd").divergence == "jsd"
    assert LossConfig().divergence == "forward_kl"


def test_with_no_on_policy_steps_it_is_token_level_kd_over_the_full_vocabulary(llama, tmp_path):
    for name, kd_level in (("on_policy", "on_policy"), ("token", "token")):
        job = on_policy_job(llama, tmp_path / name, fraction=0.0, kd_level=kd_level, divergence="forward_kl")
        train.run_job(job, make_accelerator(), show_progress=False)
    first, second = _weights(tmp_path / "on_policy"), _weights(tmp_path / "token")
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_samples_are_the_students_tokens_up_to_eos_and_they_are_the_kd_targets(llama, tmp_path):
    job = on_policy_job(llama, tmp_path)
    examples = qa_rows(6)
    sampled = GENERATE.with_student_samples(job, examples)
    eos = job.student.tokenizer.eos_token_id
    for example in sampled:
        ids = example["sample_ids"]
        assert 1 <= len(ids) <= 8 and eos not in ids[:-1]  # up to and with the first EOS, or cut at 8
    batch = GENERATE.encode(job.student, sampled, 32, None, 8)
    targets = [[t for t in row if t != -100] for row in batch["labels"].tolist()]
    assert targets == [ex["sample_ids"] for ex in sampled]
    answers = train.teacher_answers(job, sampled, "train")
    units = GENERATE.units(job, sampled, answers)
    assert units["kd"] == sum(len(ex["sample_ids"]) for ex in sampled)  # normalised by generated tokens
    assert units["ce"] == GENERATE.units(job, examples, {})["ce"]  # CE stays on the gold answers
    assert answers["t0"].token_logprobs.shape[-1] == job.student.vocab_size  # the full vocabulary


def test_without_ce_an_on_policy_step_runs_the_student_on_its_samples_alone(llama, tmp_path, monkeypatch):
    """alpha = 0: the gold answers are never read, so the student is not run on them (TRL's GKD does
    the same work); the loss is the KD on the samples either way."""
    examples = GENERATE.with_student_samples(on_policy_job(llama, tmp_path), qa_rows(4))
    losses = {}
    for alpha in (0.0, 0.5):
        job = on_policy_job(llama, tmp_path / str(alpha), alpha=alpha)
        answers = train.teacher_answers(job, examples, "train")
        seen = []
        forward = GENERATE.forward
        monkeypatch.setattr(GENERATE, "forward",
                            lambda model, batch, **kw: seen.append(batch) or forward(model, batch, **kw))
        _, parts, _ = train.compute_loss(job, examples, "train", None, answers)
        monkeypatch.undo()
        losses[alpha] = float(parts["kd"])
        sampled = [[t for t in row if t != -100] for row in seen[-1]["labels"].tolist()]
        assert sampled == [ex["sample_ids"] for ex in examples] and len(seen) == (1 if alpha == 0 else 2)
    assert losses[0.0] == pytest.approx(losses[0.5], rel=1e-6)


def test_sampling_is_seeded_and_a_resumed_run_equals_the_uninterrupted_one(llama, tmp_path):
    """Dropout on: the RNG that draws dropout masks also draws the samples, and a checkpoint restores it."""
    def job(out: Path) -> Job:
        return on_policy_job(llama, out, max_steps=4, checkpoint_every=16, dropout=True, fraction=0.5)

    train.run_job(job(tmp_path / "a"), make_accelerator(), show_progress=False)
    train.run_job(job(tmp_path / "b"), make_accelerator(), show_progress=False)
    assert all(torch.equal(v, _weights(tmp_path / "b")[k]) for k, v in _weights(tmp_path / "a").items())
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000004")
    train.run_job(job(tmp_path / "b"), make_accelerator(), resume=True, show_progress=False)
    assert all(torch.equal(v, _weights(tmp_path / "b")[k]) for k, v in _weights(tmp_path / "a").items())
    # Which steps sampled depends on (seed, step) alone.
    drawn = [train.on_policy_step(job(tmp_path / "c"), step) for step in range(40)]
    assert 5 < sum(drawn) < 35 and drawn == [train.on_policy_step(job(tmp_path / "d"), s) for s in range(40)]
    assert drawn[:4] == [False, True, False, True]  # the run above had both kinds of step, on both sides of the resume


def test_several_teachers_are_weighted_on_the_students_samples(llama, tmp_path):
    job = on_policy_job(llama, tmp_path, teachers=2)
    result = train.run_job(job, make_accelerator(), show_progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(r["kd"])) for r in records if r["kind"] == "train")
    train.run_job(on_policy_job(llama, tmp_path / "one", teachers=1), make_accelerator(), show_progress=False)
    assert any(not torch.equal(v, _weights(tmp_path / "one")[k]) for k, v in _weights(tmp_path).items())


# --------------------------------------------------------------------------- through the CLI


@pytest.fixture
def workdir(here) -> Path:
    jobs.write_trivia("trivia.jsonl")
    return here


def _recipe(llama: Path) -> str:
    jobs.write_recipe("op.toml", {
        "name": "op", "task": "generate",
        "data": {"format": "triviaqa", "path": "trivia.jsonl", "max_length": 32, "answer_max_length": 6},
        "student": {"from_teacher": "big", "layers": [0]},
        "teachers": {"big": {"ref": str(llama)}},
        "loss": {"alpha": 0.5, "kd_level": "on_policy", "on_policy_fraction": 0.5, "sampling_temperature": 0.8},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-3, "eval_every": 16, "eval_batch_size": 16,
                  "metric": "token_f1"},
        "eval": {"max_new_tokens": 4, "batch_size": 16},
    })
    return "op.toml"


@pytest.mark.slow
def test_on_policy_distillation_through_the_cli_with_a_live_teacher_only(llama, workdir):
    recipe = _recipe(llama)
    refused = kd("cache-teachers", recipe, code=1)
    assert "distils on-policy" in refused.stderr and "nothing to cache" in refused.stderr
    assert "big (live)" in kd("distill", recipe).output
    resolved = (workdir / "runs" / "op" / "recipe.resolved.toml").read_text()
    assert 'divergence = "reverse_kl"' in resolved
    assert json.loads(kd("eval", recipe, "--json").stdout)["n"] > 0


def test_on_policy_is_refused_for_tasks_without_free_text_answers(here):
    jobs.write_recipe("r.toml", {"name": "r", "task": "classify", "student": {"ref": "m"},
                                 "data": {"format": "jsonl", "path": "s.jsonl"},
                                 "loss": {"kd_level": "on_policy"}})
    assert "loss.kd_level: on_policy needs task 'generate'" in kd("check", "r.toml", code=1).stderr
