"""What one training run needs (``Job``) and how a teacher is asked (``TeacherSettings``).

Plain data, built by the commands above (``teachers``, ``distill``) and read by the task kinds
and the training loop below them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.recipe import LossConfig, Recipe, TrainConfig

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


@dataclass(frozen=True)
class Tracking:
    """How a job reports to the experiment trackers its accelerator was made with (`[log] report_to`):
    a run named after the job in ``project``, with ``config`` as its hyperparameters."""

    project: str
    config: dict[str, Any]

    @classmethod
    def for_recipe(cls, recipe: Recipe) -> "Tracking":
        """The recipe's name as the project, the resolved recipe as the config, one value a dotted key
        (``train.lr``, ``stages.0.loss.alpha``): every tracker takes flat scalars, TensorBoard nothing else."""
        return cls(project=recipe.name, config=_flat(recipe.model_dump(mode="json")))


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, (dict, list)):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        return {key: leaf for name, item in items for key, leaf in _flat(item, f"{prefix}{name}.").items()}
    return {prefix.removesuffix("."): value}


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
    # The job's run in the experiment trackers; None: it reports to none, whatever its accelerator has.
    tracking: Tracking | None = None
