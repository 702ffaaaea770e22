"""The interface every task kind implements, and what the kinds share.

A task kind (``classify``, ``choice``, ``generate``) decides how examples become tensors for a
model's head (``encode``), what the model's output means (``forward``), what the loss trains
(``loss``, ``units``), how a student is validated and a model evaluated, what a teacher answers,
and what `kd bench` times. The training loop, the teacher cache, `kd eval` and `kd bench` call
these methods and never test the task's name, so a new kind is a new module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from kdcli.batching import gather

if TYPE_CHECKING:
    import torch

    from kdcli.job import Job, TeacherSettings
    from kdcli.models import TaskModel, TaskOutput


@dataclass
class TeacherBatch:
    """A teacher's answer for a batch: ``logits`` [B, C]; ``hidden`` teacher layer -> pooled [B, ..., D].

    generate, token level: ``token_logprobs`` and ``token_ids`` [N, k] for the N answer tokens of
    the batch (row after row, in order), ``lengths`` the answer tokens of each row, ``targets``
    [N] the gold tokens (for the cache's accuracy). Sequence level: ``texts``, the greedy answers.
    """

    logits: "torch.Tensor | None" = None
    hidden: dict[int, "torch.Tensor"] = field(default_factory=dict)
    token_logprobs: "torch.Tensor | None" = None
    token_ids: "torch.Tensor | None" = None
    lengths: list[int] | None = None
    targets: "torch.Tensor | None" = None
    texts: list[str] | None = None


@dataclass
class Predictions:
    """What `kd eval` scores: the model's answers to ``rows`` (class/option indices, or texts)."""

    rows: list[dict]
    answers: list[Any]


class TaskKind(ABC):
    """One task kind. Subclasses implement every method; the attributes describe it to reports."""

    name: str
    primary: str  # the quality a student "keeps", and that picks the best row in `kd compare`
    compare_columns: tuple[str, ...]  # the study's table for this kind (keys of report's columns)
    hidden_states: bool  # teachers can teach pooled hidden states (the hidden-state MSE)
    token_distributions: bool  # token-level KD compares next-token distributions: a shared vocabulary is needed
    drift_unit: str  # what one of `kd eval --against`'s compared distributions covers

    # ----------------------------------------------------------------- data

    @abstractmethod
    def num_classes(self, manifest: dict[str, Any]) -> int:
        """Classes or options the model scores, from a prepared stage's manifest (0: free text)."""

    @abstractmethod
    def scorable(self, row: dict) -> bool:
        """Whether a row can be scored: it is labelled, or it has reference answers."""

    def scored_rows(self, rows: Sequence[dict]) -> Sequence[dict]:
        """The rows that can be scored; ``rows`` itself when all of them can (a split is not copied)."""
        kept = [i for i, row in enumerate(rows) if self.scorable(row)]
        return rows if len(kept) == len(rows) else gather(rows, kept)

    # ----------------------------------------------------------------- a model's input and output

    @abstractmethod
    def encode(self, model: "TaskModel", examples: list[dict], max_length: int | None = None,
               template: str | None = None, answer_max_length: int | None = None) -> dict[str, "torch.Tensor"]:
        """Tensors for a batch of normalised examples, always with ``labels``."""

    @abstractmethod
    def forward(self, model: "TaskModel", batch: dict[str, "torch.Tensor"],
                output_hidden_states: bool = False) -> "TaskOutput":
        """The model's output for an ``encode`` batch, as the loss and metrics read it."""

    @abstractmethod
    def lengths(self, model: "TaskModel", examples: list[dict], max_length: int | None = None,
                template: str | None = None, answer_max_length: int | None = None) -> list[int]:
        """The tokens of each example as ``encode`` gives it to the model, before padding: what the
        inference passes sort their batches by (``kdcli.batching``)."""

    def teacher_lengths(self, model: "TaskModel", examples: list[dict], settings: "TeacherSettings") -> list[int]:
        """The tokens of each example as ``teacher_answer`` gives it to the model (the cache sorts by them)."""
        return self.lengths(model, examples, settings.max_length, settings.template, settings.answer_max_length)

    # ----------------------------------------------------------------- training

    @abstractmethod
    def units(self, job: "Job", examples: list[dict], answers: dict[str, TeacherBatch]) -> dict[str, float]:
        """Per loss term, the units a micro-batch's mean is over (examples, or answer tokens)."""

    @abstractmethod
    def loss(self, job: "Job", examples: list[dict], answers: dict[str, TeacherBatch],
             projections: Any) -> tuple["torch.Tensor", dict[str, "torch.Tensor"], "TaskOutput"]:
        """The loss of one micro-batch: total, its parts (each a mean over ``units``), the student's output."""

    @abstractmethod
    def validate(self, model: "TaskModel", rows: list[dict], batch_size: int, max_length: int, template: str | None,
                 metric: str | None, answer_max_length: int) -> dict[str, float]:
        """Validation scores of a student: the loss on gold answers, and the metrics the recipe can select."""

    def inputs_cut(self, model: "TaskModel", rows: list[dict], max_length: int,
                   template: str | None) -> tuple[int, int] | None:
        """How many rows' inputs are longer than ``max_length`` tokens (and so are cut), and the longest
        length; None where it is not counted."""
        return None

    def gold_loss(self, model: "TaskModel", rows: list[dict], batch_size: int, max_length: int,
                  template: str | None, answer_max_length: int) -> float | None:
        """`kd eval`'s loss of a model on the gold answers, where one number compares every model that
        answers (free text, teacher-forced); None where teachers may order their classes differently."""
        return None

    def with_student_samples(self, job: "Job", examples: list[dict]) -> list[dict]:
        """On-policy KD: the examples with answers the student sampled (``sample_ids``) to be trained on.
        Only free-text answers can be sampled; the recipe allows on-policy KD for task generate alone."""
        raise NotImplementedError(f"on-policy distillation samples free-text answers; task {self.name} has none")

    # ----------------------------------------------------------------- teachers

    @abstractmethod
    def teacher_answer(self, model: "TaskModel", examples: list[dict], settings: "TeacherSettings") -> TeacherBatch:
        """What a live teacher says about a batch (eval mode, no gradients)."""

    # ----------------------------------------------------------------- kd eval and kd bench

    @abstractmethod
    def predict(self, model: "TaskModel", rows: list[dict], batch_size: int, max_length: int, template: str | None,
                max_new_tokens: int, on_batch: Callable[[int], None] | None = None) -> list[Any]:
        """The model's answers to rows: argmax indices, or greedy texts; ``on_batch(rows)`` after each batch."""

    @abstractmethod
    def answer_logits(self, model: "TaskModel", examples: list[dict], max_length: int, template: str | None,
                      answer_max_length: int) -> "torch.Tensor":
        """The logits a model's answers come from, one row per scored unit (no gradients): [B, C] over a
        row's classes or options; generate: [N, V] for the N gold answer tokens, teacher-forced."""

    @abstractmethod
    def score(self, rows: list[dict], answers: list[Any], manifest: dict[str, Any]) -> dict[str, Any]:
        """`kd eval`'s metrics and extras (histograms, shortcut warning) for a model's answers."""

    @abstractmethod
    def same_answer(self, mine: Any, theirs: Any) -> bool:
        """Whether two models agree on one example."""

    @abstractmethod
    def disagreement(self, row: dict, gold: Any, teacher: Any, model: Any, manifest: dict[str, Any]) -> dict[str, Any]:
        """One example where a model and a teacher differ, as `kd eval` shows it."""

    @abstractmethod
    def bench_inputs(self, model: "TaskModel", examples: list[dict], max_length: int,
                     template: str | None) -> dict[str, "torch.Tensor"]:
        """An encoded batch of what `kd bench` times, on the model's device."""

    @abstractmethod
    def bench_call(self, model: "TaskModel", max_new_tokens: int) -> tuple[Callable[[dict], Any], str]:
        """The timed call and a sentence saying what it times."""


def cut_warning(task: TaskKind, model: "TaskModel", rows: list[dict], max_length: int, template: str | None,
                where: str) -> str | None:
    """A warning when some of ``rows``' inputs are longer than ``max_length`` (what is cut, and how to avoid it)."""
    counted = task.inputs_cut(model, rows, max_length, template)
    if not counted or not counted[0]:
        return None
    cut, longest = counted
    lost = "start" if model.kind == "causal" else "end"
    return (f"{where}: {cut} of {len(rows)} inputs are longer than data.max_length = {max_length} tokens "
            f"(the longest has {longest}) and lose their {lost}; raise data.max_length to keep them whole")


def pooled_layers(output: "TaskOutput", layers: list[int], pooling: str, batch_size: int) -> dict[int, "torch.Tensor"]:
    """Pool the listed transformer blocks' token states: layer j is ``hidden_states[j + 1]``.

    Multiple-choice encoders see B*C sequences; their pooled states are reshaped to [B, C, D]
    so that a cached row always belongs to one example.
    """
    from kdcli.losses import pool_hidden

    pooled = {}
    mask = output.attention_mask
    for layer in layers:
        states = pool_hidden(output.hidden_states[layer + 1], mask, pooling)
        pooled[layer] = states.reshape(batch_size, -1, states.shape[-1]).squeeze(1)
    return pooled


def part_weights(cfg) -> dict[str, float]:
    """How much each loss term counts in the total (cfg: a LossConfig)."""
    return {"ce": cfg.alpha, "kd": 1 - cfg.alpha, "hidden": cfg.beta, "diversity": cfg.gamma}
