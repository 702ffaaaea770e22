"""What one training run needs (``Job``) and how a teacher is asked (``TeacherSettings``).

Plain data, built by the commands above (``teachers``, ``distill``) and read by the task kinds
and the training loop below them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.recipe import LossConfig, TrainConfig

if TYPE_CHECKING:
    from kdcli.models import TaskModel


@dataclass(frozen=True)
class TeacherSettings:
    """Everything a teacher's answers depend on besides its weights and the data: a live teacher
    answers with them, and a cache is identified by them (``cache.expected_manifest``)."""

    hidden_layers: tuple[int, ...] = ()  # teacher blocks whose pooled states are asked for (hidden MSE)
    pooling: str = "mean"
    max_length: int = 128
    template: str | None = None
    kd_level: str = "token"  # generate: token-level distributions, greedy answers ("sequence"), or "on_policy"
    top_k: int | None = None  # generate, token level: log-probs kept per answer token (None: all of them)
    temperature: float = 1.0  # generate, token level: the log-probs are softened at it
    answer_max_length: int = 32  # generate: answer tokens (EOS included)


@dataclass
class Job:
    """Everything one training run needs; built by ``kdcli.distill`` and ``kdcli.teachers`` from a recipe."""

    name: str
    student: "TaskModel"
    rows: dict[str, Sequence[dict]]  # split -> rows (``kdcli.data.stage.Rows``: read from disk as asked for)
    loss: LossConfig
    train: TrainConfig
    seed: int
    max_length: int
    template: str | None
    checkpoint_dir: Path
    output_dir: Path
    metrics_path: Path
    teachers: dict[str, Any] = field(default_factory=dict)  # LiveTeacher | CachedTeacher
    teacher_weights: dict[str, float] = field(default_factory=dict)
    hidden_pairs: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    teacher_widths: dict[str, int] = field(default_factory=dict)
    pooling: dict[str, str] = field(default_factory=dict)
    label_prior: list[float] | None = None
    extra_metadata: dict[str, Any] = field(default_factory=dict)
    answer_max_length: int = 32  # generate: answer tokens kept as targets; also the validation's generation length
    # The share of each micro-batch drawn from rows["transfer"] (unlabelled rows the teachers answer); 0: none.
    transfer_share: float = 0.0
    # What shapes the trained weights (recipe sections, data fingerprint, seed): every checkpoint records it,
    # and one made under another identity is never resumed (``train.resume_problem``).
    identity: dict[str, Any] = field(default_factory=dict)
