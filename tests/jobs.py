"""Training jobs on tiny models, shared by the invariance tests and the 2-process script, and the
one writer of recipe files for every test (``write_recipe``).

Kept free of pytest so that ``tests/distributed_job.py`` can build the very same job
under torchrun.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import tomli_w
import torch

import kit
from kdcli.cache import LiveTeacher
from kdcli.job import Job, TeacherSettings
from kdcli.models import load_task_model, student_from_teacher
from kdcli.recipe import LossConfig, TeacherConfig, TrainConfig

LABELS = ["negative", "neutral", "positive"]
CUES = {0: ["fell", "cut", "weakened", "losses"], 1: ["unchanged", "expected", "remain", "proposed"],
        2: ["rose", "grew", "raised", "increased"]}


def rows(n: int, seed: int = 0, weights: tuple[float, ...] = (1, 1, 1)) -> list[dict]:
    """Normalised classify examples whose label is given away by one cue word."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.choices(range(3), weights=weights)[0]
        text = f"sales {rng.choice(CUES[label])} by {rng.randint(1, 40)} percent in the quarter"
        out.append({"id": str(i), "text": text, "options": [], "label": label, "answers": [], "idx": i})
    return out


def write_sentences(path: Path, n: int, seed: int = 3) -> Path:
    """``rows(n, seed)`` as a jsonl file of {"text", "label" (a name)}: what `kd prepare` reads."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows(n, seed=seed):
            handle.write(json.dumps({"text": row["text"], "label": LABELS[row["label"]]}) + "\n")
    return path


def write_recipe(path: Path | str, recipe: dict[str, Any]) -> Path:
    """Write ``recipe`` (the tables of a recipe file, as dicts and lists) as TOML at ``path``.

    Every test that needs a recipe file writes it here; ``None`` values are left out (TOML has no null).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(_without_none(recipe)), encoding="utf-8")
    return path


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def write_classify_run(root: Path, model: Path, *, name: str, rows: int, loss: dict, train: dict) -> Path:
    """``root/recipe.toml``: ``model`` distilled into a copy of itself (a live teacher) on ``rows``
    sentences written beside it; the CLI-level tests run kd on it in subprocesses."""
    root.mkdir(parents=True, exist_ok=True)
    write_sentences(root / "s.jsonl", rows)
    return write_recipe(root / "recipe.toml", {
        "name": name, "task": "classify",
        "data": {"format": "jsonl", "path": "s.jsonl", "label_names": LABELS},
        "student": {"ref": str(model)},
        "teachers": {"t": {"ref": str(model)}},
        "loss": loss,
        "train": train,
        "bench": {"iters": 2, "warmup": 1, "max_seconds": 1, "max_examples": 8},  # a quick timing: no test needs more
    })


def without_dropout(model: torch.nn.Module) -> None:
    """Dropout draws different masks for different micro-batch shapes; invariance tests switch it off."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def transfer_rows(n: int) -> list[dict]:
    """Unlabelled rows of the same kind (as `kd prepare` stores a transfer set: label -1)."""
    return [dict(row, id=f"t{i}", label=-1) for i, row in enumerate(rows(n, seed=2))]


def classify_job(teacher_dir: Path, out: Path, *, batch_size: int, grad_accum: int, max_steps: int = 6,
                 dropout: bool = True, checkpoint_every: int = 10_000, seed: int = 0, gamma: float = 0.0,
                 transfer_share: float = 0.0, loss: dict | None = None) -> Job:
    """Student = layers [0, 2] of the tiny BERT teacher, distilled with KL + hidden MSE from the live teacher
    (``loss`` overrides those settings); with ``transfer_share``, 40 transfer rows make that share of each
    micro-batch."""
    teacher = load_task_model(TeacherConfig(ref=str(teacher_dir), finetune={}), "classify", 3)
    torch.manual_seed(seed)
    student = student_from_teacher(teacher, [0, 2])
    if not dropout:
        without_dropout(student.model)
    data = rows(64, seed=1)
    return Job(
        name="main", student=student,
        rows={"train": data[:48], "validation": [dict(r, idx=i) for i, r in enumerate(data[48:])],
              **({"transfer": transfer_rows(40)} if transfer_share else {})},
        loss=LossConfig(**{"alpha": 0.5, "temperature": 2.0, "beta": 1.0, "gamma": gamma, **(loss or {})}),
        train=TrainConfig(max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=1e-3, eval_every=16,
                          checkpoint_every=checkpoint_every, log_every=8, eval_batch_size=16),
        seed=seed, max_length=32, template=None,
        checkpoint_dir=out / "checkpoints", output_dir=out / "student", metrics_path=out / "metrics.jsonl",
        teachers={"t": LiveTeacher(teacher, TeacherSettings(hidden_layers=(1, 3), max_length=32))},
        teacher_weights={"t": 1.0},
        hidden_pairs={"t": [(0, 1), (1, 3)]}, teacher_widths={"t": teacher.hidden_size}, pooling={"t": "mean"},
        label_prior=[1 / 3] * 3, extra_metadata={"label_names": LABELS}, transfer_share=transfer_share,
    )


def checkpointed_job(teacher_dir: Path, out: Path, world: int) -> Job:
    """12 steps of 4 samples (2 processes x batch 2, or 1 x batch 2 x accumulation 2), validated and
    checkpointed every 4 steps; the best model is the one of least validation loss (the last, here)."""
    job = classify_job(teacher_dir, out, batch_size=2, grad_accum=2 // world, max_steps=12, checkpoint_every=16,
                       dropout=False)
    job.train.metric = "loss"
    return job


def make_teacher_dir(root: Path) -> Path:
    return kit.make_model_dir(root, "bert", "sequence-classification", num_labels=3, layers=4)


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


QUESTIONS = [
    ("What is the capital of France", ["Paris", "Paris city"]),
    ("Which planet is known as the red planet", ["Mars"]),
    ("Who wrote Hamlet", ["William Shakespeare", "Shakespeare"]),
    ("How many legs does a spider have", ["eight", "8"]),
    ("Which river flows through Egypt", ["the Nile", "Nile"]),
]


def qa_rows(n: int) -> list[dict]:
    """Normalised generate examples (what `prepare` makes of a TriviaQA file)."""
    out = []
    for i in range(n):
        question, answers = QUESTIONS[i % len(QUESTIONS)]
        out.append({"id": str(i), "text": f"{question} {i}?", "options": [], "label": -1, "answers": answers, "idx": i})
    return out


def write_trivia(path: Path | str, n: int = 40) -> Path:
    """``qa_rows(n)`` as a TriviaQA file (the llm-foundry subset: context, answer, aliases)."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as handle:
        for row in qa_rows(n):
            handle.write(json.dumps({"context": f"Question: {row['text']}\nAnswer:", "answer": row["answers"][0],
                                     "aliases": row["answers"]}) + "\n")
    return path


def free_port() -> int:
    """A TCP port free now on this machine, for a torchrun rendezvous (tests may run in parallel)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
