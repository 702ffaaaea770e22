"""LoRA students (`[student] lora = {...}`, peft): adapters trained on a frozen student, saved merged and
as an adapter; and teachers that are a base model plus an adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import jobs
import kit
from clirun import kd
from jobs import qa_rows
from kdcli.errors import ModelError
from kdcli.lora import with_lora
from kdcli.models import load_task_model
from kdcli.recipe import LoraConfig, TeacherConfig
from kdcli.tasks import task_kind

pytest.importorskip("peft")
GENERATE = task_kind("generate")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return kit.make_model_dir(tmp_path_factory.mktemp("lora-models"), "llama", "causal", layers=2)


def _logits(model, rows) -> torch.Tensor:
    with torch.no_grad():
        return GENERATE.forward(model, GENERATE.encode(model, rows, 32, None, 8)).logits


def test_only_the_adapters_train_and_the_student_is_saved_merged_and_as_an_adapter(llama, tmp_path):
    student = load_task_model(TeacherConfig(ref=str(llama)), "generate", 0)
    student.model = with_lora(student.model, student.kind, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = {name for name, p in student.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    with torch.no_grad():  # a trained adapter: B is zero at first, which would make merging a no-op
        for name, parameter in student.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    rows = qa_rows(4)
    student.model.eval()
    trained = _logits(student, rows)
    student.save(tmp_path / "student")

    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student")  # no peft needed
    assert not any("lora" in name for name in merged.state_dict())
    reloaded = load_task_model(TeacherConfig(ref=str(tmp_path / "student")), "generate", 0)
    assert torch.allclose(_logits(reloaded, rows), trained, atol=1e-5)
    assert not torch.allclose(_logits(load_task_model(TeacherConfig(ref=str(llama)), "generate", 0), rows), trained,
                              atol=1e-3)
    # The adapter alone, on the base model: a teacher made of the two is the same model.
    assert (tmp_path / "student" / "adapter" / "adapter_config.json").is_file()
    teacher = load_task_model(TeacherConfig(ref=str(llama), adapter=str(tmp_path / "student" / "adapter")),
                              "generate", 0)
    assert torch.allclose(_logits(teacher, rows), trained, atol=1e-5)


def test_a_bad_adapter_or_target_is_a_clear_error(llama, tmp_path):
    student = load_task_model(TeacherConfig(ref=str(llama)), "generate", 0)
    with pytest.raises(ModelError, match="student.lora"):
        with_lora(student.model, student.kind, LoraConfig(target_modules=["no_such_module"]))
    (tmp_path / "adapter").mkdir()
    with pytest.raises(ModelError, match="adapter_config.json"):
        load_task_model(TeacherConfig(ref=str(llama), adapter=str(tmp_path / "adapter")), "generate", 0)


# --------------------------------------------------------------------------- through the CLI


@pytest.fixture
def workdir(here) -> Path:
    jobs.write_trivia("trivia.jsonl")
    jobs.write_sentences(here / "s.jsonl", 60)
    return here


@pytest.mark.slow
def test_a_lora_student_distils_resumes_and_evaluates_through_the_cli(llama, workdir):
    jobs.write_recipe("lora.toml", {
        "name": "lora", "task": "generate",
        "data": {"format": "triviaqa", "path": "trivia.jsonl", "max_length": 32, "answer_max_length": 6},
        "student": {"from_teacher": "big", "layers": [0], "lora": {"r": 4, "alpha": 8.0}},
        "teachers": {"big": {"ref": str(llama)}},
        "loss": {"alpha": 0.5, "top_k": 8},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "eval_every": 16, "checkpoint_every": 16,
                  "eval_batch_size": 16, "keep_last": 5},
        "eval": {"max_new_tokens": 4, "batch_size": 16},
    })
    kd("distill", "lora.toml")
    run = workdir / "runs" / "lora"
    first = (run / "student" / "model.safetensors").read_bytes()
    assert (run / "student" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads(kd("eval", "lora.toml", "--json").stdout)["n"] > 0
    # A resume from the step-2 checkpoint (adapters and all) ends where the uninterrupted run did.
    import shutil

    shutil.rmtree(run / "checkpoints" / "main" / "step-00000004")
    (run / "stages" / "main" / "student" / "done.json").unlink()
    assert "resuming main from step-00000002" in kd("distill", "lora.toml", "--resume").output
    assert (run / "student" / "model.safetensors").read_bytes() == first


@pytest.mark.slow
def test_a_lora_classifier_trains_its_new_head_too(tiny, workdir):
    bert = tiny("bert", "sequence-classification", num_labels=3, layers=2)
    jobs.write_recipe("cls.toml", {
        "name": "cls", "task": "classify",
        "data": {"format": "jsonl", "path": "s.jsonl", "label_names": jobs.LABELS},
        "student": {"ref": str(bert), "lora": {"r": 4, "target_modules": ["query", "value"]}},
        "train": {"max_steps": 2, "batch_size": 8, "lr": 1e-2, "eval_every": 10_000},
        "loss": {"alpha": 1.0},
    })
    kd("distill", "cls.toml")
    saved = transformers.AutoModelForSequenceClassification.from_pretrained(workdir / "runs" / "cls" / "student")
    base = transformers.AutoModelForSequenceClassification.from_pretrained(bert)
    assert not torch.equal(saved.classifier.weight, base.classifier.weight)  # the head was trained
    assert saved.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
